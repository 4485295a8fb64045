"""`TokenSet` moves a recursion step's tokens as whole rows of the `[S * B, D]` stream
(`kernels.stream_rows`): every operation, in every layout, equals its per-token definition, a
loop over (position, sequence) pairs, in values and gradients."""

from __future__ import annotations

import pytest
import torch

from mor_megatron.model.token_set import TokenSet

S, B, D = 10, 3, 5


def _mask(seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    mask = torch.rand(S, B, generator=generator) < 0.5
    mask[:, 1] = False  # a sequence with no active token
    mask[0, 0] = True
    return mask


def _token_set(layout: str) -> TokenSet:
    if layout == "dense":  # sorted top-k rows per sequence, as the expert-choice router gives them
        generator = torch.Generator().manual_seed(1)
        return TokenSet.dense(torch.stack([torch.randperm(S, generator=generator)[:4].sort().values
                                           for _ in range(B)], dim=1))
    return TokenSet.padded(_mask(), multiple=3) if layout == "padded" else TokenSet.packed(_mask())


def _pairs(tokens: TokenSet) -> list[tuple[tuple[int, ...], int, int]]:
    """(element of the set's layout, stream position, sequence) of every row the set holds."""
    if tokens.layout == "packed":
        return [((t, 0), int(p), int(q)) for t, (p, q) in enumerate(zip(tokens.positions, tokens.seq_ids))]
    rows, width = tokens.index.shape
    return [((j, b), int(tokens.index[j, b]), b) for j in range(rows) for b in range(width)]


def _set_shape(tokens: TokenSet) -> tuple[int, int]:
    """The set's `[rows, columns]`: `[k, B]` / `[m, B]`, packed `[t, 1]`."""
    return tuple(tokens.index.shape) if tokens.layout != "packed" else (tokens.index.shape[0], 1)


def _inputs(tokens: TokenSet):
    generator = torch.Generator().manual_seed(2)
    shape = _set_shape(tokens)
    hidden = torch.randn(S, B, D, generator=generator, dtype=torch.float64, requires_grad=True)
    update = torch.randn(*shape, D, generator=generator, dtype=torch.float64, requires_grad=True)
    gate = torch.rand(*shape, generator=generator, dtype=torch.float64, requires_grad=True)
    return hidden, update, gate


def _loop_gather(tokens, hidden):
    out = hidden.new_zeros(*_set_shape(tokens), *hidden.shape[2:])
    for element, position, seq in _pairs(tokens):
        out[element] = hidden[position, seq]
    return out


def _loop_scatter(tokens, hidden, update, gate=None):
    """A pad (padded layout) writes its row's own value back, or adds nothing."""
    out = hidden.clone()
    for element, position, seq in _pairs(tokens):
        real = tokens.valid is None or bool(tokens.valid[element])
        if gate is None:
            out[position, seq] = update[element] if real else hidden[position, seq]
        elif real:
            out[position, seq] = out[position, seq] + gate[element] * update[element]
    return out


def _grads(output: torch.Tensor, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    cotangent = torch.linspace(-1, 1, output.numel(), dtype=output.dtype).view_as(output)
    grads = torch.autograd.grad(output, inputs, cotangent, allow_unused=True)
    return tuple(torch.zeros_like(x) if g is None else g for x, g in zip(inputs, grads))


@pytest.mark.parametrize("layout", ["dense", "padded", "packed"])
def test_token_set_operations_equal_their_per_token_definitions(layout):
    tokens = _token_set(layout)
    hidden, update, gate = _inputs(tokens)
    cases = {
        "gather": (lambda: tokens.gather(hidden), lambda: _loop_gather(tokens, hidden), (hidden,)),
        "gather_values": (lambda: tokens.gather_values(hidden[..., 0]),
                          lambda: _loop_gather(tokens, hidden[..., 0]), (hidden,)),
        "scatter": (lambda: tokens.scatter(hidden, update), lambda: _loop_scatter(tokens, hidden, update),
                    (hidden, update)),
        "gated_scatter_add": (lambda: tokens.gated_scatter_add(hidden, gate, update, backend="torch"),
                              lambda: _loop_scatter(tokens, hidden, update, gate), (hidden, update, gate)),
    }
    for name, (model, loop, inputs) in cases.items():
        got, expect = model(), loop()
        torch.testing.assert_close(got, expect, rtol=0, atol=0, msg=lambda m: f"{layout} {name}: {m}")
        for g, e in zip(_grads(got, inputs), _grads(expect, inputs)):
            torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-12, msg=lambda m: f"{layout} {name} grad: {m}")
    freqs = torch.randn(S, 1, 1, 4, dtype=torch.float64)
    expect = freqs.new_zeros(*_set_shape(tokens), 1, 4)
    for element, position, _ in _pairs(tokens):
        expect[element] = freqs[position, 0]
    torch.testing.assert_close(tokens.rotary(freqs), expect, rtol=0, atol=0)

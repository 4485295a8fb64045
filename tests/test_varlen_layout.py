"""The padded layout of a recursion step with a variable token count per sequence (token-choice,
threshold expert-choice; docs/DESIGN.md 4.1, `TokenSet.padded`): pads never reach real tokens,
the model equals the packed layout's results, and attention costs per sequence, not over the
micro-batch packed into one sequence."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from model_helpers import batch, build, tiny_config
from mor_megatron.model.attention import ActiveTokenAttention
from mor_megatron.model.token_set import TokenSet

pytestmark = pytest.mark.usefixtures("parallel")


def _mask(seq: int = 12, batch_size: int = 4, seed: int = 0) -> torch.Tensor:
    """A `[S, B]` active mask with uneven counts, one sequence without any active token."""
    generator = torch.Generator().manual_seed(seed)
    mask = torch.rand(seq, batch_size, generator=generator) < 0.45
    mask[:, 2] = False
    return mask


def test_padded_set_orders_real_tokens_and_puts_pads_last():
    mask = _mask()
    counts = mask.sum(0)
    tokens = TokenSet.padded(mask, multiple=5)
    rows = tokens.index.shape[0]
    assert rows == -(-int(counts.max()) // 5) * 5 and rows < mask.shape[0]
    for b in range(mask.shape[1]):
        real = int(counts[b])
        assert tokens.valid[:, b].tolist() == [True] * real + [False] * (rows - real)
        assert tokens.index[:real, b].tolist() == mask[:, b].nonzero().squeeze(1).tolist()
        assert tokens.positions[:real, b].tolist() == tokens.index[:real, b].tolist()
        # pads: inactive rows of their own sequence, positions past S in increasing order
        assert not mask[tokens.index[real:, b], b].any()
        assert tokens.positions[real:, b].tolist() == [12 + j for j in range(real, rows)]
        assert len(set(tokens.index[:, b].tolist())) == rows
    # never more rows than the sequence has; nothing active: no rows
    assert TokenSet.padded(torch.ones(12, 2, dtype=torch.bool), multiple=5).index.shape == (12, 2)
    assert TokenSet.padded(torch.zeros(12, 2, dtype=torch.bool), multiple=5).count == 0


def test_padded_scatters_leave_every_row_but_the_real_ones_unchanged():
    mask = _mask()
    tokens = TokenSet.padded(mask, multiple=5)
    hidden = torch.randn(*mask.shape, 3)
    update = torch.full((tokens.index.shape[0], mask.shape[1], 3), 1e30)  # pads: 1e30 too
    replaced = tokens.scatter(hidden, update)
    assert torch.equal(replaced[~mask], hidden[~mask]) and bool((replaced[mask] == 1e30).all())
    gate = torch.ones(update.shape[:2])
    added = tokens.gated_scatter_add(hidden, gate, update, backend="torch")
    assert torch.equal(added[~mask], hidden[~mask]) and bool((added[mask] == hidden[mask] + 1e30).all())
    empty = TokenSet.padded(torch.zeros_like(mask))
    assert torch.equal(empty.scatter(hidden, empty.gather(hidden)), hidden)
    assert torch.equal(empty.gated_scatter_add(hidden, empty.gather_values(gate[:0]), empty.gather(hidden)), hidden)


@pytest.mark.parametrize("role", ["none", "read"])
def test_padded_attention_real_rows_ignore_pads_and_nothing_is_nan(role):
    """Real queries' outputs do not depend on what pad rows hold (as queries, keys or values);
    every output, pads' included, is finite. "read": queries of a partial set against the keys
    a full set stored (KV sharing), as later recursion steps do."""
    config = tiny_config()
    attention = ActiveTokenAttention(config, 1)
    mask = _mask()
    mask[:, 2] = mask[:, 0]  # a query set every stored sequence can serve
    tokens = TokenSet.padded(mask, multiple=5)
    generator = torch.Generator().manual_seed(1)
    rows, batch_size = tokens.index.shape
    qkv = [torch.randn(rows, batch_size, heads, 16, generator=generator) for heads in (4, 2, 2)]
    store: dict = {}
    if role == "read":
        full = TokenSet.padded(torch.ones_like(mask))
        stored = [torch.randn(mask.shape[0], batch_size, heads, 16, generator=generator) for heads in (4, 2, 2)]
        attention(*stored, full.attention_context(store, "write"))
    outs = []
    for fill in (0.0, 1e3):
        padded = [torch.where(tokens.valid[..., None, None], t, torch.full_like(t, fill)) for t in qkv]
        outs.append(attention(*padded, tokens.attention_context(store, role)))
    assert all(bool(out.isfinite().all()) for out in outs)
    torch.testing.assert_close(outs[0][tokens.valid], outs[1][tokens.valid], rtol=0, atol=1e-6)


CASES = [
    ("token_choice", "recursion_wise", "topk"),
    ("token_choice", "share_first", "topk"),
    ("expert_choice", "recursion_wise", "threshold"),
    ("expert_choice", "share_first", "threshold"),
]


@pytest.mark.parametrize("buckets", [0, 4], ids=["eager", "bucketed"])
@pytest.mark.parametrize("router,kv_mode,mode", CASES)
def test_padded_layout_equals_packed_layout(router, kv_mode, mode, buckets):
    """Loss and every gradient with the local backend's padded layout == the packed layout (the
    one before it, and still the te backend's), fp32, 1e-5; with and without token buckets."""
    config = tiny_config(router=router, kv_mode=kv_mode)
    model = build(config)
    assert model.decoder.varlen_layout == "padded"
    tokens, positions = batch(config, batch_size=3)
    runs = {}
    for layout in ("packed", "padded"):
        model.decoder.varlen_layout = layout
        model.decoder.set_token_buckets(buckets)
        model.zero_grad(set_to_none=True)
        loss = model(tokens, positions, None, labels=torch.roll(tokens, -1, 1),
                     extra_block_kwargs={"routing_mode": mode}).mean()
        loss.backward()
        out = model.decoder.router_output
        grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
        runs[layout] = loss.detach(), grads, out.run_tokens, out.selected_tokens
    (loss_a, grads_a, _, selected_a), (loss_b, grads_b, run_b, selected_b) = runs["packed"], runs["padded"]
    assert [int(n) for n in selected_a] == [int(n) for n in selected_b]
    assert any(int(run) > int(n) for run, n in zip(run_b, selected_b))  # pads did run
    torch.testing.assert_close(loss_b, loss_a, rtol=0, atol=1e-5)
    assert grads_b.keys() == grads_a.keys()
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=0, atol=1e-5, msg=name)


@pytest.mark.parametrize("kv_mode", ["recursion_wise", "share_first"])
def test_token_choice_attention_is_per_sequence_at_2048_by_8(kv_mode, monkeypatch):
    """Sequence 2048, micro-batch 8: no attention call of the model (every recursion step's
    included) gets a mask or computes a per-head score matrix above B x S^2 elements. The packed
    layout put the micro-batch into one sequence: a (B x S)^2 mask at step 1, B times over."""
    seq, batch_size = 2048, 8
    config = tiny_config(router="token_choice", kv_mode=kv_mode, hidden_size=32, num_attention_heads=2,
                         num_query_groups=1, ffn_hidden_size=64, seq_length=seq, effective_layers=5)
    model = build(config).eval()
    seen = []

    def recording_sdpa(q, k, v, attn_mask=None, **kwargs):  # [b, h, s, d]: shapes only, no math
        mask = 0 if attn_mask is None else attn_mask.numel()
        seen.append(max(mask, q.shape[0] * q.shape[2] * k.shape[2]))
        return torch.zeros_like(q)

    monkeypatch.setattr(F, "scaled_dot_product_attention", recording_sdpa)
    tokens, positions = batch(config, batch_size=batch_size)
    with torch.no_grad():
        model(tokens, positions, None)
    plan = config.recursion_plan
    assert len(seen) == len(plan.prefix) + len(plan.suffix) + len(plan.block) * config.num_recursions
    assert max(seen) <= batch_size * seq**2, max(seen) / (batch_size * seq**2)


@pytest.mark.distributed
def test_padded_layout_equals_packed_layout_at_tp2_pp2(tmp_path):
    """The same equality through the trainer's model build and micro-batch schedule at TP=2 x PP=2
    (4 gloo processes, tests/varlen_layout_worker.py): per case, both layouts' mean LM loss on
    every rank equals the single-process packed model's, fp32, 1e-5."""
    import json
    import os
    import subprocess
    import sys

    from train_helpers import _free_port, repo_root, write_config
    from varlen_layout_worker import CASES, _batches

    from mor_megatron.model import MoRGPTModel
    from mor_megatron.training.config import load_run_config
    from mor_megatron.weights import save_weights

    config = write_config(tmp_path / "run.yaml", {"train": "unused"})
    want = {}
    for name, (case, mode) in CASES.items():
        run = load_run_config(config, case)
        torch.manual_seed(3)
        model = MoRGPTModel(run.model)
        save_weights(model, str(tmp_path / "weights" / name))
        model.decoder.varlen_layout = "packed"
        (batch,) = _batches(run.model.vocab_size, run.training.micro_batch_size, run.model.seq_length)
        with torch.no_grad():
            per_token = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"],
                              extra_block_kwargs={"routing_mode": mode})
        want[name] = float(per_token.mean())
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "4", "--master_port",
               str(_free_port()), "tests/varlen_layout_worker.py", str(config), str(tmp_path / "weights"),
               str(tmp_path), "parallel.pipeline_model_parallel_size=2", "parallel.tensor_model_parallel_size=2"]
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env, cwd=repo_root())
    assert done.returncode == 0, done.stderr[-4000:]
    for rank in range(4):
        got = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert got.keys() == want.keys()
        for name, losses in got.items():
            assert losses["packed"] == pytest.approx(want[name], abs=1e-5), (rank, name)
            assert losses["padded"] == pytest.approx(losses["packed"], abs=1e-5), (rank, name)

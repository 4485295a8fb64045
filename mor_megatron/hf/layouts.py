"""Tensor names and layouts: mor-megatron (TP=1 `state_dict`) <-> Hugging Face Llama / MoR.

- `linear_qkv` rows are grouped per KV group, `[q heads of the group, k, v]` repeated over groups;
  HF keeps separate `q_proj` / `k_proj` / `v_proj`.
- `linear_fc1` is `[gate; up]` (at TP=1); HF keeps `gate_proj` / `up_proj`.
- `linear_proj` -> `o_proj`, `linear_fc2` -> `down_proj`, `pre_mlp_layernorm` ->
  `post_attention_layernorm`; routers keep their own names (`model.routers.R`, `model.aux_routers.R`,
  `model.router`).

Both directions check every tensor's shape against the config and consume every source tensor;
anything missing, misshapen or left over is a `ConversionError` naming the tensor.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import torch
from torch import Tensor

from mor_megatron.config import MoRConfig
from mor_megatron.errors import UserError


class ConversionError(UserError, ValueError):
    """A checkpoint that does not fit the conversion, in one line naming the tensor and the fix."""


@dataclass(frozen=True)
class Dims:
    """The shapes a conversion needs, from either side's config."""

    hidden: int
    heads: int
    groups: int
    head_dim: int
    ffn: int
    vocab: int
    layers: int  # unique layers (those owning weights)
    router: str = "none"
    num_recursions: int = 1
    aux_router: bool = False
    tied: bool = True

    @classmethod
    def from_mor(cls, config: MoRConfig) -> "Dims":
        return cls(
            hidden=config.hidden_size,
            heads=config.num_attention_heads,
            groups=config.num_query_groups or config.num_attention_heads,
            head_dim=config.head_dim,
            ffn=config.ffn_hidden_size,
            vocab=config.vocab_size,
            layers=config.num_layers,
            router=config.router,
            num_recursions=config.num_recursions,
            aux_router=config.aux_router,
            tied=config.tie_embeddings,
        )


@dataclass(frozen=True)
class Entry:
    """One megatron tensor and the HF tensor(s) it becomes; `kind` is copy, qkv or fc1."""

    megatron: str
    hf: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]  # HF shapes, in `hf` order
    kind: str = "copy"

    @property
    def megatron_shape(self) -> tuple[int, ...]:
        if self.kind == "copy":
            return self.shapes[0]
        return (sum(shape[0] for shape in self.shapes),) + self.shapes[0][1:]


def _layer_entries(i: int, d: Dims) -> list[Entry]:
    m, h = f"decoder.layers.{i}.", f"model.layers.{i}."
    q, kv = d.heads * d.head_dim, d.groups * d.head_dim
    return [
        Entry(m + "input_layernorm.weight", (h + "input_layernorm.weight",), ((d.hidden,),)),
        Entry(
            m + "self_attention.linear_qkv.weight",
            tuple(h + f"self_attn.{p}_proj.weight" for p in "qkv"),
            ((q, d.hidden), (kv, d.hidden), (kv, d.hidden)),
            "qkv",
        ),
        Entry(m + "self_attention.linear_proj.weight", (h + "self_attn.o_proj.weight",), ((d.hidden, q),)),
        Entry(m + "pre_mlp_layernorm.weight", (h + "post_attention_layernorm.weight",), ((d.hidden,),)),
        Entry(
            m + "mlp.linear_fc1.weight",
            (h + "mlp.gate_proj.weight", h + "mlp.up_proj.weight"),
            ((d.ffn, d.hidden), (d.ffn, d.hidden)),
            "fc1",
        ),
        Entry(m + "mlp.linear_fc2.weight", (h + "mlp.down_proj.weight",), ((d.hidden, d.ffn),)),
    ]


def entries(d: Dims) -> list[Entry]:
    """Every tensor of a model with dimensions `d`."""
    out = [Entry("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), ((d.vocab, d.hidden),))]
    for i in range(d.layers):
        out += _layer_entries(i, d)
    out.append(Entry("decoder.final_layernorm.weight", ("model.norm.weight",), ((d.hidden,),)))
    if not d.tied:
        out.append(Entry("output_layer.weight", ("lm_head.weight",), ((d.vocab, d.hidden),)))
    if d.router == "expert_choice":
        for r in range(d.num_recursions):
            out.append(Entry(f"decoder.routers.{r}.linear.weight", (f"model.routers.{r}.weight",), ((1, d.hidden),)))
            if d.aux_router:
                out.append(
                    Entry(f"decoder.routers.{r}.aux.weight", (f"model.aux_routers.{r}.weight",), ((1, d.hidden),))
                )
    elif d.router == "token_choice":
        out.append(Entry("decoder.router.linear.weight", ("model.router.weight",), ((d.num_recursions, d.hidden),)))
    return out


# -- tensor layouts -------------------------------------------------------------------------------


def split_qkv(weight: Tensor, d: Dims) -> tuple[Tensor, Tensor, Tensor]:
    """Megatron's per-group `[q_g, k_g, v_g]` rows -> q `[H*hd, D]`, k and v `[G*hd, D]`."""
    per_group = d.heads // d.groups
    grouped = weight.reshape(d.groups, (per_group + 2) * d.head_dim, weight.shape[-1])
    q, k, v = grouped.split([per_group * d.head_dim, d.head_dim, d.head_dim], dim=1)
    return tuple(t.reshape(-1, weight.shape[-1]).contiguous() for t in (q, k, v))


def merge_qkv(q: Tensor, k: Tensor, v: Tensor, d: Dims) -> Tensor:
    """Inverse of `split_qkv`."""
    size = q.shape[-1]
    per_group = d.heads // d.groups
    parts = (
        q.reshape(d.groups, per_group * d.head_dim, size),
        k.reshape(d.groups, d.head_dim, size),
        v.reshape(d.groups, d.head_dim, size),
    )
    return torch.cat(parts, dim=1).reshape(-1, size).contiguous()


def _split(entry: Entry, tensor: Tensor, d: Dims) -> tuple[Tensor, ...]:
    if entry.kind == "qkv":
        return split_qkv(tensor, d)
    if entry.kind == "fc1":
        return tuple(t.contiguous() for t in tensor.chunk(2, dim=0))
    return (tensor,)


def _merge(entry: Entry, tensors: list[Tensor], d: Dims) -> Tensor:
    if entry.kind == "qkv":
        return merge_qkv(*tensors, d)
    if entry.kind == "fc1":
        return torch.cat(tensors, dim=0).contiguous()
    return tensors[0]


def _check(name: str, tensor: Tensor, shape: tuple[int, ...], source: str) -> None:
    if tuple(tensor.shape) != tuple(shape):
        raise ConversionError(
            f"tensor {name} in {source} has shape {tuple(tensor.shape)} but the config gives "
            f"{tuple(shape)}: use the config the weights were made with"
        )


def _take(state: dict[str, Tensor], name: str, source: str) -> Tensor:
    if name not in state:
        raise ConversionError(f"{source} has no tensor {name}: the weights do not fit the config")
    return state[name]


def _leftovers(state: Iterable[str], used: set[str], source: str, ignore: Callable[[str], bool]) -> None:
    left = sorted(name for name in state if name not in used and not ignore(name))
    if left:
        more = f" (and {len(left) - 1} more)" if len(left) > 1 else ""
        raise ConversionError(
            f"{source} holds tensor {left[0]}{more} that the config has no place for: "
            "use the config the weights were made with"
        )


def stream_megatron_to_hf(
    names: Iterable[str], read: Callable[[str], Tensor], d: Dims, source: str = "checkpoint"
) -> Iterator[tuple[str, Tensor]]:
    """A TP=1 megatron model, one tensor at a time -> HF (name, tensor) pairs: `names` are every
    tensor the source holds, `read(name)` gives one (so memory holds one group at a time). Every
    needed tensor present and every one consumed is checked before the first is read."""
    available = set(names)
    needed = entries(d)
    for entry in needed:
        if entry.megatron not in available:
            raise ConversionError(f"{source} has no tensor {entry.megatron}: the weights do not fit the config")
    _leftovers(available, {entry.megatron for entry in needed}, source, lambda name: name.endswith("_extra_state"))
    for entry in needed:
        tensor = read(entry.megatron)
        _check(entry.megatron, tensor, entry.megatron_shape, source)
        for name, part, shape in zip(entry.hf, _split(entry, tensor, d), entry.shapes):
            _check(name, part, shape, source)
            yield name, part


def megatron_to_hf(state: dict[str, Tensor], d: Dims, source: str = "checkpoint") -> dict[str, Tensor]:
    """A TP=1 megatron `state_dict` -> HF tensors (every source tensor consumed)."""
    return {name: part.detach().clone() for name, part in stream_megatron_to_hf(state, state.__getitem__, d, source)}


def hf_to_megatron(state: dict[str, Tensor], d: Dims, source: str = "HF model") -> dict[str, Tensor]:
    """HF tensors -> a TP=1 megatron `state_dict` (every source tensor consumed; a tied
    `lm_head.weight` and rotary buffers are allowed to be left over)."""
    out: dict[str, Tensor] = {}
    used: set[str] = set()
    for entry in entries(d):
        parts = []
        for name, shape in zip(entry.hf, entry.shapes):
            tensor = _take(state, name, source)
            _check(name, tensor, shape, source)
            parts.append(tensor)
            used.add(name)
        out[entry.megatron] = _merge(entry, parts, d)
    ignored = ("rotary_emb.inv_freq",) + (("lm_head.weight",) if d.tied else ())
    _leftovers(state, used, source, lambda name: name.endswith(ignored))
    return out

"""`torch.compile` for training: each transformer layer compiled once, in place, as torchtitan does
per block (torchtitan/models/llama3/infra/parallelize.py `apply_compile`).

What is compiled is each layer's `forward`, not the module call: the layer's own hooks and the
activation-recompute wrapper stay outside the graph and run eagerly around it. Dynamo treats the
layer modules as inputs, so the identical layers of a model (and a shared layer called at every
recursion) reuse one graph per input signature:
- dense steps (expert-choice top-k) have a static k_r per step: one graph per distinct k_r and
  per KV role of the step;
- variable steps (token-choice) vary per batch: the decoder pads their token count to a bucket
  multiple (`MoRDecoder.set_token_buckets`: the padded layout's row count m to a multiple of
  ceil(S / buckets), the packed layout's t by the FP8 alignment pads of `model/precision.py`;
  docs/DESIGN.md 4.1), so the graphs are bounded by the bucket count per role.
Shapes are compiled static (`dynamic=False`): no symbolic-shape recompiles, and CUDA graphs
stay possible. Evaluation (no grad) adds one graph per shape; activation recompute adds none.

Under ZeRO-3 DeepSpeed hooks every submodule inside the layer with `torch.compiler.disable`d
gather hooks: the layer's graph breaks at each submodule call (correct, bounded; marking the
layers as ZeRO-3 leaf modules instead fails in backward with DeepSpeed 0.19.8). Megatron's
tensor-parallel autograd functions trace without a break under gloo once its two per-call
warnings are out of the graph (`_quiet_megatron_warnings`). With dropout > 0 the compiled RNG
stream differs from eager's.
"""

from __future__ import annotations

import functools
from typing import Callable, Optional

import torch
from torch import nn

from mor_megatron.model.decoder import MoRDecoder
from mor_megatron.parallel.cpu_shims import shim_m_suspended

__all__ = ["TOKEN_BUCKETS", "compile_layers", "compile_enabled"]

# variable (token-choice) steps: rows per sequence padded up to ceil(S / TOKEN_BUCKETS) multiples
# (packed: tokens to ceil(S * B / TOKEN_BUCKETS) multiples), so each role compiles at most
# TOKEN_BUCKETS graphs
TOKEN_BUCKETS = 8
# graphs one layer forward may hold (dynamo's default, 8, falls back to eager beyond it):
# (buckets or distinct k_r, plus the full sequence) x KV roles x train / eval
_RECOMPILE_LIMIT = 64


def compile_enabled(setting: Optional[bool], device: torch.device) -> bool:
    """`training.compile` resolved: None (auto) compiles where it pays, on CUDA."""
    return device.type == "cuda" if setting is None else bool(setting)


def _quiet_megatron_warnings() -> None:
    """Two megatron-core 0.16 warnings a graph cannot hold, each a graph break at every linear:
    `RowParallelLinear.forward` passes `tp_group=None` to its linear, whose
    `get_tensor_model_parallel_group_if_none` then warns on rank 0 at every call (under compile:
    the same default group without the warning), and the TP linear's one-time advice below."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import layers

    original = layers.get_tensor_model_parallel_group_if_none
    if getattr(original, "_mor_quiet", False):
        return

    def default_tp_group(tp_group, is_expert=False, check_initialized=True):
        if (
            tp_group is None
            and torch.compiler.is_compiling()
            and torch.distributed.is_initialized()
            and parallel_state.is_initialized()
        ):
            getter = (
                parallel_state.get_expert_tensor_parallel_group
                if is_expert
                else parallel_state.get_tensor_model_parallel_group
            )
            return getter(check_initialized=check_initialized)
        return original(tp_group, is_expert=is_expert, check_initialized=check_initialized)

    default_tp_group._mor_quiet = True
    layers.get_tensor_model_parallel_group_if_none = default_tp_group
    # its one-time CUDA_DEVICE_MAX_CONNECTIONS advice (TP > 1) would also break the graph, and
    # flipping the flag a graph reads would recompile it: count the advice as given
    layers.linear_with_grad_accumulation_and_async_allreduce.warned = True


def _without_shim_m(forward: Callable) -> Callable:
    """The compiled forward run without the CPU shim's torch-function mode (a layer names no
    CUDA device): autograd's backward, where an activation recompute calls the forward again,
    runs without that mode, and dynamo guards on the mode stack; a no-op on CUDA."""

    @functools.wraps(forward)
    def call(*args, **kwargs):
        with shim_m_suspended():
            return forward(*args, **kwargs)

    return call


def _decoders(model: nn.Module) -> list[MoRDecoder]:
    return [module for module in model.modules() if isinstance(module, MoRDecoder)]


def compile_layers(model: nn.Module, config, backend: str = "inductor") -> int:
    """Compile, in place, the forward of every layer in each `MoRDecoder.layers` of `model` (a
    model stage, or a DeepSpeed engine's module); return how many layers were compiled.

    `config` is the model's `MoRConfig`. `backend` is torch.compile's (tests use "aot_eager": the
    same dynamo tracing, guards and recompiles without inductor's code generation)."""
    _quiet_megatron_warnings()
    limit = getattr(torch._dynamo.config, "recompile_limit", None)
    if limit is not None and limit < _RECOMPILE_LIMIT:
        torch._dynamo.config.recompile_limit = _RECOMPILE_LIMIT
    compiled = 0
    for decoder in _decoders(model):
        # variable steps in training: token-choice's (expert-choice's top-k steps are dense)
        decoder.set_token_buckets(TOKEN_BUCKETS if config.router == "token_choice" else 0)
        for layer in decoder.layers.values():
            if getattr(layer, "_mor_compiled", False):
                continue
            layer.forward = _without_shim_m(torch.compile(layer.forward, backend=backend, dynamic=False))
            layer._mor_compiled = True
            compiled += 1
    return compiled

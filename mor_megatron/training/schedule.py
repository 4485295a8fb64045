"""The micro-batch schedule shared by training and evaluation, and the optimizer step on top of it.

`run_microbatches` runs a list of micro-batches forward (and backward when training) through this
rank's stage at any layout: at PP = 1 one after the other (training through DeepSpeed's managed
gradient accumulation), at PP > 1 through megatron-core's own pipeline schedule
(`get_forward_backward_func`, `forward_only` for evaluation). `train_step` is one optimizer step
over a global batch: the LM loss (mean over the micro-batches, averaged over data-parallel ranks,
the same on every rank), the gradient norm and the router statistics of the step.
"""

from __future__ import annotations

import contextlib
import itertools
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Collection, Iterator, Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler
from torch import Tensor

from mor_megatron.device import collective_device, compute_device, to_device
from mor_megatron.model.routing import RouterOutput
from mor_megatron.model.boundary import extra_channels
from mor_megatron.model.rules import Unit
from mor_megatron.parallel.setup import sync_replica_grads
from mor_megatron.training.fp8 import refresh_fp8_weight_cache
from mor_megatron.training.grad_clip import clip_factor, global_grad_norm
from mor_megatron.training.optimizer import clipped, plain_fp32_update, skipped_unless_finite


@dataclass
class StepResult:
    loss: float  # LM loss averaged over the global batch (valid on every rank)
    grad_norm: float
    lr: float
    router: list[RouterOutput] = field(default_factory=list)  # this stage's, one per micro-batch
    finite: bool = True
    # (data-parallel rank, micro-batch index) of the first non-finite micro-batch loss, when the
    # step was not finite and a loss (not only a gradient) was the cause
    bad_microbatch: Optional[tuple[int, int]] = None


@dataclass
class MicrobatchOutputs:
    """What running a list of micro-batches leaves on this rank."""

    # LM loss (or what `reduce` kept) of each; empty on stages before the last
    losses: list[Tensor] = field(default_factory=list)
    router: list[RouterOutput] = field(default_factory=list)  # this stage's, one per micro-batch

    def mean_loss(self) -> float:
        """Mean LM loss over the micro-batches and the data-parallel ranks, the same on every rank."""
        loss = torch.stack(self.losses).mean() if self.losses else torch.zeros((), device=compute_device())
        return float(dp_mean(broadcast_from_last_stage(loss)))


@contextlib.contextmanager
def evaluation_mode(model):
    """A forward-only pass's model state: eval mode (no dropout) and, with FP8, the weight cache
    requantized from the current weights (it still holds those before the last update)."""
    model.eval()
    if model.config.fp8:
        refresh_fp8_weight_cache(model)
    try:
        yield model
    finally:
        model.train()


def lm_loss(per_token: Tensor, loss_mask: Tensor) -> Tensor:
    mask = loss_mask.to(per_token.dtype)
    return (per_token * mask).sum() / mask.sum().clamp(min=1.0)


def forward_batch(module, batch: dict) -> tuple[Tensor, Tensor]:
    """(per-token LM loss, loss mask) of one host micro-batch: the one place a batch moves to the
    compute device (training and evaluation, pipelined or not)."""
    batch = to_device(batch)
    return module(batch["tokens"], batch["position_ids"], None, labels=batch["labels"]), batch["loss_mask"]


def broadcast_from_last_stage(value: Tensor) -> Tensor:
    """Pipeline stages other than the last have no loss: give them the last stage's."""
    if parallel_state.get_pipeline_model_parallel_world_size() == 1:
        return value
    group = parallel_state.get_pipeline_model_parallel_group()
    last = parallel_state.get_pipeline_model_parallel_last_rank()
    value = value.to(collective_device(group))
    dist.broadcast(value, src=last, group=group)
    return value


def dp_mean(value: Tensor) -> Tensor:
    if parallel_state.get_data_parallel_world_size() > 1:
        group = parallel_state.get_data_parallel_group()
        value = value.to(collective_device(group))
        dist.all_reduce(value, group=group)
        value /= parallel_state.get_data_parallel_world_size()
    return value


def _first_bad_microbatch(losses: list[Tensor], count: int) -> Optional[tuple[int, int]]:
    """The lowest (data-parallel rank, micro-batch index) whose loss is not finite, agreed by every
    rank; `losses` is empty on pipeline stages before the last, which learn it from the last."""
    none = float(parallel_state.get_data_parallel_world_size() * count)
    index = next((i for i, loss in enumerate(losses) if not torch.isfinite(loss).all()), None)
    group = parallel_state.get_data_parallel_group()
    code = torch.tensor([none if index is None else float(parallel_state.get_data_parallel_rank() * count + index)],
                        device=collective_device(group))
    if parallel_state.get_data_parallel_world_size() > 1:
        dist.all_reduce(code, op=dist.ReduceOp.MIN, group=group)
    code = int(broadcast_from_last_stage(code).item())
    return None if code >= none else divmod(code, count)


def run_microbatches(
    engine,
    batches: Collection[dict],
    *,
    forward_only: bool,
    forward: Optional[Callable[[Any, dict], tuple[Tensor, Any]]] = None,
    reduce: Optional[Callable[[Tensor, Any], Tensor]] = None,
) -> MicrobatchOutputs:
    """Run `batches` (host micro-batches) forward, and backward unless `forward_only`, through
    this rank's stage of `engine.module`.

    `forward(module, batch)` gives (stage output, context) and, on the last stage,
    `reduce(output, context)` the tensor kept per micro-batch in `outputs.losses`: by default (None)
    the LM loss (`forward_batch`, `lm_loss`); a forward-only pass may keep other per-token results
    (training.eval_tasks keeps log-probs, `training/eval_tasks.py`).

    Training leaves the gradients accumulated for the update, which is the caller's: at PP = 1
    DeepSpeed has counted every micro-batch but the last, whose `engine.step()` updates.
    """
    model = engine.module
    outputs = MicrobatchOutputs()
    # the defaults are looked up here, at the call, not bound at definition: the fault tests
    # replace `schedule.lm_loss` to poison every loss (tests/test_faults.py, tests/fakegpu/probe.py)
    forward = forward or forward_batch
    reduce = reduce or lm_loss

    def forward_step(iterator: Iterator[dict], module):
        output, context = forward(module, next(iterator))
        if model.router_output is not None:
            outputs.router.append(model.router_output)

        def loss_func(last_stage_output: Tensor):
            loss = reduce(last_stage_output, context)
            outputs.losses.append(loss.detach().clone())  # the pipeline schedule divides `loss` in place
            return loss, {}

        return output, loss_func

    with torch.no_grad() if forward_only else contextlib.nullcontext():
        if parallel_state.get_pipeline_model_parallel_world_size() > 1:
            _pipelined(forward_step, model, batches, forward_only)
        else:
            _unpipelined(forward_step, engine, batches, forward_only)
    return outputs


def _unpipelined(forward_step: Callable, engine, batches: Collection[dict], forward_only: bool) -> None:
    """PP = 1: one micro-batch after the other; training through DeepSpeed's forward and backward
    (its managed accumulation, any ZeRO stage), evaluation through the bare module."""
    iterator = iter(batches)
    for index in range(len(batches)):
        if index and not forward_only:
            engine.step()  # DeepSpeed counts the previous micro-batch here; no update before the last
        output, loss_func = forward_step(iterator, engine.module if forward_only else engine)
        loss, _ = loss_func(output)
        if not forward_only:
            engine.backward(loss)  # DeepSpeed divides by the accumulation steps


def _pipelined(forward_step: Callable, model, batches: Collection[dict], forward_only: bool) -> None:
    """PP > 1: megatron-core's schedule (1F1B, or forward only) sends the hidden states and the
    packed routing state between stages."""
    iterator = iter(batches)
    first = next(iterator)
    seq_length, micro_batch_size = first["tokens"].shape[1], first["tokens"].shape[0]
    shape = [(seq_length, micro_batch_size, model.config.hidden_size + extra_channels(model.config))]
    get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=itertools.chain([first], iterator),
        model=model,
        num_microbatches=len(batches),
        seq_length=seq_length,
        micro_batch_size=micro_batch_size,
        forward_only=forward_only,
        adjust_tensor_shapes_fn=lambda recv, send: (shape, shape),
    )


def train_step(engine, batches: list[dict], stages: Optional[list[list[Unit]]] = None) -> StepResult:
    """Run one global batch (this rank's micro-batches) and one optimizer step.

    A non-finite loss gives non-finite gradients, and the update is skipped and the gradients
    dropped (by DeepSpeed's ZeRO optimizer at stages 1-3; at ZeRO-0 by
    `skipped_unless_finite`); the result says so (`finite=False`) so the caller can count
    consecutive failures.
    """
    MoEAuxLossAutoScaler.set_loss_scale(torch.tensor(1.0 / len(batches), device=compute_device()))
    if engine.module.config.fp8:  # requantize the FP8 weight cache from this step's weights
        refresh_fp8_weight_cache(engine)
    lr = _current_lr(engine)
    outputs = run_microbatches(engine, batches, forward_only=False)
    norm, factor, params = None, None, []
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        sync_replica_grads(engine.module, engine.module.config, stages)
    elif not engine.zero_optimization():
        # without ZeRO DeepSpeed keeps no norm: measure it by DeepSpeed's rule (grad_clip.py), and
        # clip where DeepSpeed would clip plain fp32 gradients (`plain_fp32_update`), in the update
        params = list(engine.module.parameters())
        norm = global_grad_norm(params, engine.mpu)
        if plain_fp32_update(engine):
            factor = clip_factor(norm, engine.gradient_clipping() or math.inf)
    with skipped_unless_finite(engine, norm), clipped(engine, params, factor):  # ZeRO-0's skip and clip
        engine.step()  # the update (at PP = 1 the last micro-batch's call of DeepSpeed's accumulation)
    loss = outputs.mean_loss()
    if norm is None:
        norm = engine.get_global_grad_norm()
        norm = float(norm) if norm is not None else float("nan")
    finite = math.isfinite(loss) and math.isfinite(norm) and engine.was_step_applied()
    bad = None if finite else _first_bad_microbatch(outputs.losses, len(batches))
    return StepResult(loss, norm, lr, outputs.router, finite=finite, bad_microbatch=bad)


def _current_lr(engine) -> float:
    """The learning rate the coming update uses."""
    return float(engine.optimizer.param_groups[0]["lr"])

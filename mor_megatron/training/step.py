"""One optimizer step over a global batch: forward/backward of every micro-batch, then DeepSpeed.

Returns the LM loss (mean over this rank's micro-batches, averaged over data-parallel ranks on the
last stage), the gradient norm, and the router statistics of the step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterator, Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func
from deepspeed.runtime.utils import clip_grad_norm_
from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler
from torch import Tensor

from mor_megatron.device import collective_device, compute_device, to_device
from mor_megatron.model.routing import RouterOutput
from mor_megatron.model.units import extra_channels, Unit
from mor_megatron.parallel.replicas import sync_replica_grads
from mor_megatron.training.fp8 import refresh_fp8_weight_cache


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


def _unpipelined(engine, batches: list[dict]) -> tuple[list[Tensor], list[RouterOutput], Optional[float]]:
    model, losses, routers, norm = engine.module, [], [], None
    for index, batch in enumerate(batches):
        loss = lm_loss(*forward_batch(engine, batch))
        engine.backward(loss)  # DeepSpeed divides by the accumulation steps
        if index == len(batches) - 1 and not engine.zero_optimization():
            # without ZeRO DeepSpeed clips but does not keep the norm: measure it the same way
            norm = float(clip_grad_norm_(model.parameters(), float("inf"), mpu=engine.mpu))
        engine.step()  # managed accumulation: only the last micro-batch's call updates
        losses.append(loss.detach())
        if model.router_output is not None:
            routers.append(model.router_output)
    return losses, routers, norm


def _pipelined(
    engine, batches: list[dict], stages: list[list[Unit]]
) -> tuple[list[Tensor], list[RouterOutput], None]:
    model, config = engine.module, engine.module.config
    losses: list[Tensor] = []
    routers: list[RouterOutput] = []

    def forward_step(iterator: Iterator[dict], module):
        output, loss_mask = forward_batch(module, next(iterator))
        if module.router_output is not None:
            routers.append(module.router_output)

        def loss_func(per_token: Tensor):
            loss = lm_loss(per_token, loss_mask)
            losses.append(loss.detach().clone())  # the schedule divides `loss` in place
            return loss, {"lm loss": losses[-1]}

        return output, loss_func

    tokens = batches[0]["tokens"]
    channels = config.hidden_size + extra_channels(config)
    shape = [(tokens.shape[1], tokens.shape[0], channels)]
    get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=iter(batches),
        model=model,
        num_microbatches=len(batches),
        seq_length=tokens.shape[1],
        micro_batch_size=tokens.shape[0],
        forward_only=False,
        adjust_tensor_shapes_fn=lambda recv, send: (shape, shape),
    )
    sync_replica_grads(model, config, stages)
    engine.step()
    return losses, routers, None


def train_step(engine, batches: list[dict], stages: Optional[list[list[Unit]]] = None) -> StepResult:
    """Run one global batch (this rank's micro-batches) and one optimizer step.

    A non-finite loss gives non-finite gradients, and DeepSpeed's ZeRO optimizer (stages 1-3)
    then skips the update and drops the gradients; the result says so (`finite=False`) so the
    caller can count consecutive failures.
    """
    MoEAuxLossAutoScaler.set_loss_scale(torch.tensor(1.0 / len(batches), device=compute_device()))
    if engine.module.config.fp8:  # requantize the FP8 weight cache from this step's weights
        refresh_fp8_weight_cache(engine)
    lr = _current_lr(engine)
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        losses, routers, norm = _pipelined(engine, batches, stages)
    else:
        losses, routers, norm = _unpipelined(engine, batches)
    loss = torch.stack(losses).mean() if losses else torch.zeros((), device=compute_device())
    loss = float(dp_mean(broadcast_from_last_stage(loss)))
    if norm is None:
        norm = engine.get_global_grad_norm()
        norm = float(norm) if norm is not None else float("nan")
    finite = math.isfinite(loss) and math.isfinite(norm) and engine.was_step_applied()
    bad = None if finite else _first_bad_microbatch(losses, len(batches))
    return StepResult(loss, norm, lr, routers, finite=finite, bad_microbatch=bad)


def _current_lr(engine) -> float:
    """The learning rate the coming update uses."""
    return float(engine.optimizer.param_groups[0]["lr"])

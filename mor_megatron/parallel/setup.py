"""The parallel entry point: what code above `parallel/` calls to put a built model on its layout.

Order of a run: `state.initialize_parallel` (process groups, device binding, the CPU shims) before
any model is built; then, once per built model stage, `parallelize`; then every optimizer step
sums the replicas' gradients with `sync_replica_grads` (replicas.py), over the groups made here.

`shim_m_suspended` is the one piece of the CPU shims that code outside `parallel/` needs
(decoding skips shim M's per-call dispatch); it is reached here, never in `cpu_shims` directly.
"""

from __future__ import annotations

from torch import nn

from mor_megatron.config import MoRConfig
from mor_megatron.model.rules import Unit
from mor_megatron.parallel.cpu_shims import shim_m_suspended
from mor_megatron.parallel.replicas import mark_embedding_replica, setup_replicas, sync_replica_grads

__all__ = ["parallelize", "shim_m_suspended", "sync_replica_grads"]


def parallelize(model: nn.Module, config: MoRConfig, stages: list[list[Unit]]) -> None:
    """Wire this rank's stage `model` (already on its compute device: the broadcasts take device
    tensors) into the pipeline: the shared block's replicas made equal and marked (gradient norm,
    dist-checkpoint main copy), their gradient group created, the tied embedding's last-stage
    copy marked. Collective: every rank calls it once, after `initialize_parallel`."""
    setup_replicas(model, config, stages)
    mark_embedding_replica(model)

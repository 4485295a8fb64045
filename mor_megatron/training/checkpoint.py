"""Checkpoints: exact resume at the same layout, layout-free resume at any other.

One checkpoint is a directory `SAVE_DIR/step_00000123/` holding
- DeepSpeed's own files (`engine.save_checkpoint`): module, ZeRO optimizer partitions, scheduler,
  for an exact resume at the same TP/PP/DP layout and ZeRO stage;
- `universal/`: a megatron dist-checkpoint of the weights plus the full (unpartitioned) AdamW
  state of every parameter, keyed by global parameter names with tensor-parallel sharding
  metadata, so it loads at any TP/PP/DP layout;
- `rng/rank_R.pt`: each rank's RNG states;
- `meta.json`, written last: step, consumed samples/tokens, layout, the full run config, and a
  manifest (every file with its size).

Atomicity: everything is written into `step_N.partial/`; after every rank finished (a barrier)
rank 0 writes the manifest, renames the directory and only then points `latest` at it (write to
a temporary file, then `os.replace`). An interrupted save leaves a `.partial` directory that is
never loaded, and the previous checkpoint untouched; a save that fails on a write (disk full)
removes its `.partial` directory and stops the run naming the intact previous checkpoint and the
write's own cause. Weights or optimizer state holding a non-finite value are never written: such a
checkpoint could not be resumed, and it would displace a good one from `keep_checkpoints`.

Loading validates before any tensor is used: the manifest (every file present at its size), the
model's identity hash (a checkpoint of another model is refused, naming the settings that differ)
and, for layout-free loads, every tensor's global shape.
"""

from __future__ import annotations

import errno
import hashlib
import json
import multiprocessing
import os
import shutil
from dataclasses import asdict, dataclass
from multiprocessing.managers import SyncManager
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
from deepspeed.utils import (
    safe_get_full_fp32_param,
    safe_get_full_optimizer_state,
    safe_set_full_fp32_param,
    safe_set_full_optimizer_state,
)
from megatron.core import dist_checkpointing, parallel_state, tensor_parallel
from megatron.core.dist_checkpointing.optimizer import (
    get_param_id_to_sharded_param_map,
    make_sharded_optimizer_tensor,
)

from mor_megatron.device import collective_device, compute_device
from mor_megatron.training import faults
from mor_megatron.training.optimizer import adam_step_state, sync_learning_rate
from mor_megatron.checkpoint_files import (
    LATEST,
    CheckpointError,
    checkpoint_dirs,
    checkpoint_problem,
    exit_with_parent,
    find_latest,
    manifest,
    read_meta,
    tag_for,
    write_atomic,
)
from mor_megatron.weights import check_shapes as _check_shapes
from mor_megatron.yaml_config import dump_model_config

FORMAT_VERSION = 1
ADAM_STATES = ("exp_avg", "exp_avg_sq")


@dataclass
class TrainState:
    step: int = 0
    consumed_samples: int = 0
    consumed_tokens: int = 0


# Dumped model settings that change neither the weights a checkpoint holds nor what they compute
# (training-only terms, initialisation, precision, kernels); every other dumped setting is part
# of the identity. Run-only settings (layout, bf16, FP8, recompute) are not dumped at all.
_NOT_IDENTITY = frozenset({
    # training-only terms
    "hidden_dropout", "attention_dropout", "seq_length", "router_aux_loss_coeff",
    "router_z_loss_coeff", "router_balance_loss_coeff", "aux_router_loss_coeff",
    "token_choice_capacity_factor",
    # initialisation
    "init_method_std", "embedding_init_method_std",
    # precision ("bf16" only in meta.json files written before it became run-only)
    "params_dtype", "bf16", "fp16", "fp32_residual_connection",
    # kernels and schedule
    "scatter_kernel", "gradient_accumulation_fusion", "bias_activation_fusion", "bias_dropout_fusion",
    "apply_rope_fusion", "cross_entropy_loss_fusion", "cross_entropy_fusion_impl", "deterministic_mode",
    "deallocate_pipeline_outputs", "batch_p2p_comm", "cp_comm_type",
})


def model_identity(config) -> dict:
    """The settings that define the model a checkpoint belongs to: its dumped settings less
    `_NOT_IDENTITY` (hash unchanged for checkpoints written before inherited fields were dumped,
    unless their config set one of those fields, which was then lost from meta.json)."""
    return {k: v for k, v in dump_model_config(config).items() if k not in _NOT_IDENTITY}


def identity_hash(identity: dict) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def _check_identity(meta: dict, config, directory: Path) -> None:
    """Refuse a checkpoint of another model before any of its tensors is read."""
    if "model_hash" not in meta:
        return  # written before identities were recorded
    current = model_identity(config)
    if meta["model_hash"] == identity_hash(current):
        return
    saved = meta.get("model_identity", {})
    differences = [
        f"{key} {saved.get(key, 'default')} in the checkpoint, {current.get(key, 'default')} in the config"
        for key in sorted(set(saved) | set(current))
        if saved.get(key) != current.get(key)
    ]
    raise CheckpointError(
        f"{directory} holds another model ({'; '.join(differences) or 'identity hash differs'}): "
        "resume with the model config it was saved with, or point training.save_dir at a new directory"
    )


def _layout(engine) -> dict:
    return {
        "tensor_model_parallel_size": parallel_state.get_tensor_model_parallel_world_size(),
        "pipeline_model_parallel_size": parallel_state.get_pipeline_model_parallel_world_size(),
        "data_parallel_size": parallel_state.get_data_parallel_world_size(),
        "zero_stage": engine.zero_optimization_stage(),
    }


# -- layout-free ("universal") state --------------------------------------------------------------


def _trained_params(model) -> list[torch.nn.Parameter]:
    """Parameters in a fixed order (ZeRO replaces the optimizer's own lists by flat buffers)."""
    return [p for p in model.parameters() if p.requires_grad]


def _link_zero_states(engine, step: Optional[int] = None) -> None:
    """Make DeepSpeed's per-parameter views of the ZeRO-1/2 (or BF16_Optimizer) AdamW state cover
    every group.

    DeepSpeed links them once, right after the first group's first update, so later groups are
    left out; relinking fixes that. With `step` (loading into a fresh engine) the flat states are
    created first, as AdamW would have after `step` updates.
    """
    zero = engine.optimizer
    if not hasattr(zero, "_lazy_init_hp_params_optimizer_state"):
        return
    if step is not None:
        # ZeRO-1/2's flat fp32 partitions; DeepSpeed's BF16_Optimizer (bf16 with fp32 gradient
        # accumulation at ZeRO-1) names them differently
        flats = getattr(zero, "single_partition_of_fp32_groups", None) or zero.fp32_groups_flat_partition
        for flat in flats:
            state = zero.optimizer.state[flat]
            state["step"] = adam_step_state(zero.optimizer, flat, step)
            for key in ADAM_STATES:
                state.setdefault(key, torch.zeros_like(flat))
    zero._hp_optimizer_states_linked = False
    zero._lazy_init_hp_params_optimizer_state()


def _get_state(engine, param, key: str) -> torch.Tensor:
    if hasattr(param, "_hp_mapping") or hasattr(param, "ds_id"):
        return safe_get_full_optimizer_state(param, key)
    state = engine.basic_optimizer.state.get(param, {})
    return state[key] if key in state else torch.zeros_like(param, dtype=torch.float32)


def _fp32(engine, param) -> torch.Tensor:
    if hasattr(param, "_hp_mapping") or hasattr(param, "ds_id"):
        return safe_get_full_fp32_param(param)
    return param.detach().float()


def universal_state(engine, model, with_values: bool = True) -> dict:
    """Sharded state dict of weights and AdamW moments; empty buffers when `with_values` is off
    (the load side)."""
    model_state = model.sharded_state_dict()
    if with_values:
        _link_zero_states(engine)
    params = _trained_params(model)
    by_id = get_param_id_to_sharded_param_map(model_state, params)
    optimizer: dict = {}
    for index, param in enumerate(params):
        sharded = by_id.get(index)
        if sharded is None:
            continue
        for key in ("fp32_param",) + ADAM_STATES:
            if with_values:
                value = _fp32(engine, param) if key == "fp32_param" else _get_state(engine, param, key)
            else:
                # on the parameter's device: eight ranks of a node holding fp32 weights and two
                # moments each in host memory would need several times the model's size there
                value = torch.empty(param.shape, dtype=torch.float32, device=param.device)
            optimizer[f"{key}.{index}"] = make_sharded_optimizer_tensor(sharded, value.float(), f"optimizer.{key}")
    return {"model": model_state, "optimizer": optimizer}


def _load_universal(engine, model, directory: Path, step: int) -> None:
    if engine.zero_optimization_stage() == 3:
        raise CheckpointError(
            f"{directory}: resuming at another layout is supported for ZeRO stages 0-2; "
            "resume with the layout it was saved at, or use zero_stage 1 or 2"
        )
    expected = universal_state(engine, model, with_values=False)
    _check_shapes(expected["model"], directory)
    loaded = dist_checkpointing.load(expected, str(directory))
    model.load_state_dict(loaded["model"])
    _link_zero_states(engine, step)
    params = _trained_params(model)
    for index, param in enumerate(params):
        values = {key: loaded["optimizer"].get(f"{key}.{index}") for key in ("fp32_param",) + ADAM_STATES}
        if values["fp32_param"] is None:
            continue
        if hasattr(param, "_hp_mapping"):
            safe_set_full_fp32_param(param, values["fp32_param"])
            for key in ADAM_STATES:
                safe_set_full_optimizer_state(param, values[key], key)
        else:
            with torch.no_grad():
                param.copy_(values["fp32_param"])
            engine.basic_optimizer.state[param] = {
                "step": adam_step_state(engine.basic_optimizer, param, step),
                # the buffers `universal_state` allocated for this load: kept, not copied (a copy
                # held both, 8 more bytes per parameter, at TP=1 of the 1.7B 6 GB: tools/rehearse.py)
                **{key: values[key].to(param.device) for key in ADAM_STATES},
            }
    optimizer = engine.basic_optimizer
    for param, state in optimizer.state.items():
        if "step" in state:
            state["step"] = adam_step_state(optimizer, param, step)


# -- save -------------------------------------------------------------------------------------------


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _rng_state() -> dict:
    return {
        "torch": torch.get_rng_state(),
        # this rank's own GPU only: a resume may see another number of GPUs per process
        "cuda": torch.cuda.get_rng_state() if compute_device().type == "cuda" else None,
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }


def _orphan_safe_write_queue() -> None:
    """megatron's dist-checkpoint writer reports through a queue served by a spawned
    multiprocessing Manager. A SIGKILLed trainer leaves that server running for ever, holding the
    trainer's stdout open (so launchers and log pipes never finish): serve the queue from a Manager
    that exits with its parent instead."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if getattr(filesystem_async, "_results_queue", "missing") is not None:
        return  # already made (or megatron no longer has this global)
    manager = SyncManager(ctx=multiprocessing.get_context("spawn"))
    manager.start(exit_with_parent, (os.getpid(),))
    filesystem_async._results_queue = manager.Queue()  # the proxy keeps the manager alive


def save_checkpoint(engine, model, state: TrainState, save_dir: str, config: dict) -> Path:
    """Write a complete checkpoint for `state.step`; returns its directory.

    A write that fails (disk full, quota, I/O error) on any rank removes the partial directory and
    raises `CheckpointError` naming the previous, intact checkpoint. Any exception counts: torch's
    own writer reports a full disk as a `RuntimeError` ("unexpected pos ..."), not an `OSError`.
    """
    root = Path(save_dir)
    tag = tag_for(state.step)
    partial = root / f"{tag}.partial"
    final = root / tag
    rank = dist.get_rank() if dist.is_initialized() else 0
    universal = universal_state(engine, model)
    _refuse_non_finite(universal, root, state.step)
    failure: Optional[Exception] = None
    try:
        if rank == 0:
            root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(partial, ignore_errors=True)
            (partial / "universal").mkdir(parents=True)
            (partial / "rng").mkdir()
        _barrier()
        client = {"train_state": asdict(state), "format": FORMAT_VERSION}
        engine.save_checkpoint(str(root), tag=partial.name, client_state=client, save_latest=False)
        faults.reached("checkpoint-deepspeed")
        _orphan_safe_write_queue()
        dist_checkpointing.save(universal, str(partial / "universal"))
        faults.reached("checkpoint-universal")
        torch.save(_rng_state(), partial / "rng" / f"rank_{rank}.pt")
    except Exception as err:  # noqa: BLE001 - every failed write must leave the previous checkpoint usable
        failure = err
    _stop_if_any_write_failed(failure, partial, root, state.step)
    if rank == 0:
        identity = model_identity(model.config)
        meta = {
            "format": FORMAT_VERSION,
            "tag": tag,
            "train_state": asdict(state),
            "layout": _layout(engine),
            "world_size": dist.get_world_size() if dist.is_initialized() else 1,
            "model_hash": identity_hash(identity),
            "model_identity": identity,
            "config": config,
            "files": manifest(partial),
        }
        write_atomic(partial / "meta.json", json.dumps(meta, indent=1))
        faults.reached("checkpoint-meta")
        shutil.rmtree(final, ignore_errors=True)
        os.replace(partial, final)
        faults.reached("checkpoint-latest")
        write_atomic(root / LATEST, tag + "\n")
    _barrier()
    return final


def _tensors(universal: dict) -> list[tuple[str, torch.Tensor]]:
    """The named tensors of a universal state (weights, then fp32 weights and AdamW moments)."""
    named = []
    for part in ("model", "optimizer"):
        for key, value in universal[part].items():
            data = getattr(value, "data", None)
            if isinstance(data, torch.Tensor) and data.is_floating_point():
                named.append((getattr(value, "key", key), data))
    return named


def _refuse_non_finite(universal: dict, root: Path, step: int) -> None:
    """Every rank agrees, in one device read, whether any tensor it would save is non-finite; if
    so nothing is written and every rank raises the same line."""
    named = _tensors(universal)
    device = collective_device()
    flags = [tensor.isfinite().all() for _, tensor in named]
    bad = (~torch.stack(flags)).sum().to(device, torch.float32) if flags else torch.zeros((), device=device)
    if dist.is_initialized():
        dist.all_reduce(bad, op=dist.ReduceOp.SUM)
    if not bad.item():
        return
    here = [name for (name, _), flag in zip(named, flags) if not bool(flag)]
    first = f" (first: {here[0]})" if here else " (on another rank)"
    previous = find_latest(str(root), log=lambda message: None)
    kept = f"{previous} is kept" if previous else "no earlier checkpoint exists"
    raise CheckpointError(
        f"checkpoint for step {step} not written: {int(bad.item())} weight or optimizer tensors hold "
        f"non-finite values{first}, which no run could resume from; {kept}; lower training.lr or "
        "check the data, then resume from the last checkpoint"
    )


def _save_fix(failure: Optional[Exception], root: Path) -> str:
    """What to do about a failed write, from its own cause (not every failure is a full disk)."""
    space = f"free space under {root} (or set training.save_dir elsewhere) and relaunch"
    if failure is None:
        return "the failing rank printed its own cause: fix that and relaunch"
    code = getattr(failure, "errno", None)
    if code in (errno.ENOSPC, errno.EDQUOT) or "unexpected pos" in str(failure):
        # torch's own writer reports a short write (full disk or quota) as "unexpected pos"
        return f"{shutil.disk_usage(root).free / 2**20:,.0f} MiB free there; {space}"
    if code in (errno.EACCES, errno.EPERM):
        return f"make {root} writable for this user (or set training.save_dir elsewhere) and relaunch"
    if code == errno.EROFS:
        return f"{root} is on a read-only file system: set training.save_dir to a writable place and relaunch"
    return "fix that cause (or set training.save_dir elsewhere) and relaunch"


def _stop_if_any_write_failed(failure: Optional[Exception], partial: Path, root: Path, step: int) -> None:
    """All ranks agree whether the save failed; if so the partial directory goes (freeing its
    space) and every rank raises the same one-line error."""
    flag = torch.tensor([1.0 if failure is not None else 0.0], device=collective_device())
    if dist.is_initialized():
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    if not flag.item():
        return
    if not dist.is_initialized() or dist.get_rank() == 0:
        shutil.rmtree(partial, ignore_errors=True)
    _barrier()
    previous = find_latest(str(root), log=lambda message: None)
    kept = f"{previous} is intact and will be resumed from" if previous else "no earlier checkpoint exists"
    raise CheckpointError(
        f"checkpoint for step {step} not written ({_one_line(failure)}); the partial save was removed "
        f"and {kept}; {_save_fix(failure, root)}"
    ) from failure


def _one_line(failure: Optional[Exception]) -> str:
    if failure is None:
        return "a write failed on another rank"
    if isinstance(failure, OSError) and failure.strerror:
        return f"{failure.strerror}: {failure.filename}"
    text = " ".join(str(failure).split())
    return f"{type(failure).__name__}: {text[:200]}"


def prune_checkpoints(save_dir: str, keep: int) -> None:
    """Remove all but the newest `keep` complete checkpoints (rank 0 only)."""
    if keep <= 0 or (dist.is_initialized() and dist.get_rank() != 0):
        return
    for old in checkpoint_dirs(save_dir)[keep:]:  # newest first
        shutil.rmtree(old, ignore_errors=True)


# -- find and load ------------------------------------------------------------------------------------


def load_checkpoint(engine, model, directory: Path, log=print) -> TrainState:
    """Restore weights, optimizer, scheduler and RNG from `directory` (validated first)."""
    problem = checkpoint_problem(directory)
    if problem:
        raise CheckpointError(f"cannot resume: {problem}; remove it or point training.save_dir elsewhere")
    meta = read_meta(directory)
    _check_identity(meta, model.config, directory)
    state = TrainState(**meta["train_state"])
    rank = dist.get_rank() if dist.is_initialized() else 0
    if meta["layout"] == _layout(engine):
        path, _ = engine.load_checkpoint(
            str(directory.parent), tag=directory.name, load_module_strict=False
        )
        if path is None:
            raise CheckpointError(f"{directory}: DeepSpeed found no checkpoint files for this rank")
        rng_file = directory / "rng" / f"rank_{rank}.pt"
        if rng_file.is_file():
            _restore_rng(torch.load(rng_file, weights_only=True))
    else:
        log(
            f"checkpoint {directory.name} was saved at layout {meta['layout']}; loading its "
            f"layout-free form into {_layout(engine)}"
        )
        _load_universal(engine, model, directory / "universal", state.step)
    sync_learning_rate(engine, state.step)
    return state


def _restore_rng(saved: dict) -> None:
    torch.set_rng_state(saved["torch"])
    cuda = saved.get("cuda")  # a CPU run's checkpoint has none (older ones: an empty list)
    if isinstance(cuda, torch.Tensor) and compute_device().type == "cuda":
        torch.cuda.set_rng_state(cuda)
    tensor_parallel.get_cuda_rng_tracker().set_states(saved["tracker"])

"""In-process checks on the fake GPU, in 2 processes under torchrun with MOR_FAKE_GPU=1 and
MOR_DEVICE=fakegpu (tests/test_device_faults.py starts it once and reads its results).

`python -m torch.distributed.run --nproc_per_node 2 tests/fakegpu/probe.py CONFIG OUT.json`

Each check records {"ok": bool, "detail": str}: the device's own behaviour (a host batch into a model
on it fails, a host tensor in a collective of its group is refused, every collective gives the right
values), the library's collectives (their control tensors must be on the group's device) and the
trainer's non-finite-step path (a poisoned loss) at DP 2, PP 2 and TP 2. Rank 0 writes OUT.json.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # this checkout's mor_megatron, not an installed one
CHECKS: dict[str, dict] = {}
DEVICE = torch.device("fakegpu")


def check(name):
    """Run the check now; an exception is its failure, recorded by its first line."""
    def record(fn):
        try:
            detail = fn()
            CHECKS[name] = {"ok": True, "detail": str(detail or "")}
        except Exception as err:  # noqa: BLE001 - every failure is a result to report
            CHECKS[name] = {"ok": False, "detail": f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"}
        dist.barrier()  # a failed check on one rank must not desynchronise the next
        return fn
    return record


def refused(fn, *args) -> str:
    """The first line of the error `fn(*args)` raises; an AssertionError if it raises none."""
    try:
        fn(*args)
    except Exception as err:  # noqa: BLE001
        return str(err).splitlines()[0]
    raise AssertionError("no error raised")


def main(config: str, out: str) -> None:
    from mor_megatron.parallel.state import initialize_parallel
    from mor_megatron.training.config import load_run_config

    run = load_run_config(config, [f"logging.dir={tempfile.mkdtemp()}"])
    initialize_parallel(1, 1, run.training.seed)  # DP 2 over the fake backend
    rank, world = dist.get_rank(), dist.get_world_size()

    @check("default group backend")
    def _():
        assert dist.get_backend() == "fakenccl", dist.get_backend()
        return dist.get_backend()

    @check("host batch into a model on fakegpu")
    def _():
        from mor_megatron.data import ValidationBatches
        from mor_megatron.training.loop import build_model

        model = build_model(run)[0].to(DEVICE)
        batch = next(iter(ValidationBatches(run.data.valid, run.model.seq_length, 2)))
        return refused(model, batch["tokens"], batch["position_ids"], None)

    @check("host tensor in a collective")
    def _():
        return refused(dist.all_reduce, torch.ones(3))

    @check("collectives on fakegpu")
    def _():
        return _collectives(rank, world)

    @check("AdamW step state of a checkpoint load on fakegpu")
    def _():
        return _loaded_adamw_step()

    for name, fn in _library_collectives(run).items():
        check(f"library collective: {name}")(fn)

    for name, layout in (("non-finite steps at DP 2", (1, 1)), ("non-finite steps at PP 2", (1, 2)),
                         ("non-finite steps at TP 2", (2, 1))):
        @check(name)
        def _():
            return _poisoned_run(config, layout)

    if rank == 0:
        Path(out).write_text(json.dumps(CHECKS, indent=1))


def _loaded_adamw_step() -> str:
    """A checkpoint load's AdamW `step` state (`optimizer.adam_step_state`) lies where torch's own
    AdamW keeps it on a GPU: on the device in float32 for the fused kernel the trainer runs there,
    a host scalar for the unfused one; and the optimizer steps on from it."""
    from mor_megatron.device import fused_optimizer_kernels
    from mor_megatron.training.optimizer import adam_step_state

    assert fused_optimizer_kernels(DEVICE), "torch has no fused AdamW for the fake GPU"
    placed = []
    for fused in (True, None):
        param = torch.nn.Parameter(torch.ones(4, device=DEVICE))
        param.grad = torch.full((4,), 0.5, device=DEVICE)
        optimizer = torch.optim.AdamW([param], lr=0.1, fused=fused)
        optimizer.step()  # torch creates the state
        torchs, ours = optimizer.state[param]["step"], adam_step_state(optimizer, param, 1)
        assert (torchs.device, torchs.dtype, float(torchs)) == (ours.device, ours.dtype, 1.0), (torchs, ours)
        optimizer.state[param]["step"] = adam_step_state(optimizer, param, 3)
        optimizer.step()
        assert float(optimizer.state[param]["step"]) == 4.0
        placed.append(f"{'fused' if fused else 'unfused'}: {ours.device}")
    return ", ".join(placed)


def _collectives(rank: int, world: int) -> str:
    """Every collective the backend implements, with the values NCCL would give."""
    def full(value, n=4):
        return torch.full((n,), float(value), device=DEVICE)

    def expect(tensor, values):
        assert tensor.device.type == "fakegpu", tensor.device
        assert tensor.cpu().tolist() == [float(v) for v in values], (tensor.cpu().tolist(), values)

    x = full(rank + 1)
    dist.all_reduce(x)
    expect(x, [3] * 4)
    x = full(rank + 1)
    dist.all_reduce(x, op=dist.ReduceOp.MAX)
    expect(x, [2] * 4)
    x = full(rank)
    dist.broadcast(x, src=1)
    expect(x, [1] * 4)
    x = full(rank + 1)
    dist.reduce(x, dst=0)
    if rank == 0:
        expect(x, [3] * 4)
    out = torch.empty(4 * world, device=DEVICE)
    dist.all_gather_into_tensor(out, full(rank, 4))
    expect(out, [0] * 4 + [1] * 4)
    outs = [torch.empty(4, device=DEVICE) for _ in range(world)]
    dist.all_gather(outs, full(rank + 5))
    expect(torch.cat(outs), [5] * 4 + [6] * 4)
    out = torch.empty(2, device=DEVICE)
    dist.reduce_scatter_tensor(out, torch.arange(4.0, device=DEVICE))
    expect(out, [0, 2] if rank == 0 else [4, 6])
    out = torch.empty(2, device=DEVICE)
    dist.reduce_scatter(out, [full(1, 2), full(2, 2)])
    expect(out, [2, 2] if rank == 0 else [4, 4])
    out = torch.empty(4, device=DEVICE)
    dist.all_to_all_single(out, torch.arange(4.0, device=DEVICE) + 10 * rank)
    expect(out, [0, 1, 10, 11] if rank == 0 else [2, 3, 12, 13])
    gathered = [torch.empty(4, device=DEVICE) for _ in range(world)] if rank == 0 else None
    dist.gather(full(rank + 7), gathered, dst=0)
    if rank == 0:
        expect(torch.cat(gathered), [7] * 4 + [8] * 4)
    out = torch.empty(4, device=DEVICE)
    dist.scatter(out, [full(20), full(21)] if rank == 0 else None, src=0)
    expect(out, [20 + rank] * 4)
    peer = 1 - rank
    received = torch.empty(4, device=DEVICE)
    works = [dist.isend(full(30 + rank), peer), dist.irecv(received, peer)]
    for work in works:
        work.wait()
    expect(received, [30 + peer] * 4)
    objects = [None, None]
    dist.all_gather_object(objects, {"rank": rank})
    assert objects == [{"rank": 0}, {"rank": 1}], objects
    dist.barrier()
    return "all_reduce (sum, max), broadcast, reduce, all_gather(_into_tensor), reduce_scatter(_tensor), " \
           "all_to_all_single, gather, scatter, isend/irecv, all_gather_object, barrier"


def _library_collectives(run) -> dict:
    """The library's own collectives (their control tensors must be on the group's device), each
    on the data-parallel group of the fake backend."""
    from megatron.core import parallel_state

    from mor_megatron.model.routing import expert_choice_losses
    from mor_megatron.training.checkpoint import _stop_if_any_write_failed
    from mor_megatron.training.loop import _Preemption
    from mor_megatron.training.metrics import _reduce_over_data_parallel
    from mor_megatron.training.schedule import _first_bad_microbatch

    def router_losses():
        logits = torch.zeros(4, 2, device=DEVICE)
        candidates = torch.ones(4, 2, dtype=torch.bool, device=DEVICE)
        group = parallel_state.get_data_parallel_group()
        expert_choice_losses(run.model, logits, None, candidates, candidates, dp_group=group)

    def save_failure_vote():
        root = Path(tempfile.mkdtemp())
        _stop_if_any_write_failed(None, root / "step.partial", root, 1)

    def first_bad():  # rank 1's only micro-batch is the bad one, on both ranks
        bad = _first_bad_microbatch([torch.tensor(float("nan") if dist.get_rank() == 1 else 1.0, device=DEVICE)], 1)
        assert bad == (1, 0), bad
        return bad

    def dp_stats():
        stats = _reduce_over_data_parallel({"x": float(dist.get_rank())})
        assert stats["x"] == 0.5, stats
        return stats

    return {
        "_first_bad_microbatch": first_bad,
        "_reduce_over_data_parallel": dp_stats,
        "_stop_if_any_write_failed": save_failure_vote,
        "_Preemption.agreed": lambda: _Preemption().agreed(),
        "expert_choice_losses": router_losses,
    }


def _poisoned_run(config: str, layout: tuple[int, int]) -> str:
    """The trainer in this process (as tests/test_faults.py runs it) with every LM loss NaN: it must
    skip both steps, find the first bad micro-batch across ranks and stop with one line."""
    from mor_megatron.training import schedule
    from mor_megatron.training.config import load_run_config
    from mor_megatron.training.loop import TrainingError, pretrain

    tp, pp = layout
    overrides = [f"logging.dir={tempfile.mkdtemp()}", "training.train_steps=2", "training.max_bad_steps=2",
                 f"parallel.tensor_model_parallel_size={tp}", f"parallel.pipeline_model_parallel_size={pp}",
                 "logging.tensorboard=false"]
    original = schedule.lm_loss
    schedule.lm_loss = lambda per_token, mask: original(per_token, mask) * float("nan")
    try:
        pretrain(load_run_config(config, overrides), log=lambda message: None)
    except TrainingError as err:
        message = str(err)
        assert message.startswith("stopping at step 2: 2 non-finite steps in a row"), message
        return message.split(";")[0]
    finally:
        schedule.lm_loss = original
    raise AssertionError("the run did not stop")


if __name__ == "__main__":
    main(*sys.argv[1:3])
    dist.destroy_process_group()
    os._exit(0)  # no teardown of the DeepSpeed engines and checkpoint helpers the checks left

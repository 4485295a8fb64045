"""Step metrics: router statistics reduced over ranks, throughput and MFU, TensorBoard + JSONL."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from mor_megatron.device import collective_device, compute_device
from mor_megatron.model.routing import RouterOutput

if TYPE_CHECKING:  # tensorboard is imported only by runs that write to it
    from tensorboard.compat.proto.summary_pb2 import Summary

# Dense bf16 peak TFLOP/s per GPU, for MFU when logging.peak_tflops is not given.
GPU_PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0}


def router_metrics(outputs: list[RouterOutput]) -> dict[str, float]:
    """This stage's router statistics for one step: mean over micro-batches, then over
    data-parallel ranks (with the DP spread of active tokens), then merged across stages."""
    local: dict[str, float] = {}
    for output in outputs:
        for key, value in output.metrics().items():
            local[key] = local.get(key, 0.0) + value / len(outputs)
    local = _reduce_over_data_parallel(local)
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        gathered: list = [None] * parallel_state.get_pipeline_model_parallel_world_size()
        dist.all_gather_object(gathered, local, group=parallel_state.get_pipeline_model_parallel_group())
        local = {key: value for stage in gathered for key, value in stage.items()}
    return local


def as_run_fractions(router: dict[str, float], num_recursions: int, slots: int) -> Optional[list[float]]:
    """Per recursion step, the rows the shared block ran on (`router/r{r}/run_tokens`, pads
    included, mean per micro-batch) over the micro-batch's `slots` (B x S): what
    `report.training_flops_per_token` counts as run. None without the statistics (no router)."""
    keys = [f"router/r{r}/run_tokens" for r in range(1, num_recursions + 1)]
    if not all(key in router for key in keys):
        return None
    return [router[key] / slots for key in keys]


def _reduce_over_data_parallel(values: dict[str, float]) -> dict[str, float]:
    if parallel_state.get_data_parallel_world_size() == 1 or not values:
        return values
    group = parallel_state.get_data_parallel_group()
    keys = sorted(values)
    local = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=collective_device(group))
    mean, low, high = local.clone(), local.clone(), local.clone()
    dist.all_reduce(mean, group=group)
    dist.all_reduce(low, op=dist.ReduceOp.MIN, group=group)
    dist.all_reduce(high, op=dist.ReduceOp.MAX, group=group)
    mean /= parallel_state.get_data_parallel_world_size()
    out = dict(zip(keys, mean.tolist()))
    for key, lo, hi in zip(keys, low.tolist(), high.tolist()):
        if key.endswith("/selected_tokens"):
            out[key + "_dp_min"], out[key + "_dp_max"] = lo, hi
    return out


def dense_matmul_tflops(size: int = 1024, repeats: int = 5) -> float:
    """Measured dense fp32 `torch.mm` TFLOP/s on this CPU (the MFU reference without a GPU)."""
    a, b = torch.randn(size, size), torch.randn(size, size)  # host: probes the CPU's own peak
    torch.mm(a, b)
    start = time.perf_counter()
    for _ in range(repeats):
        torch.mm(a, b)
    return 2 * size**3 * repeats / (time.perf_counter() - start) / 1e12


def peak_tflops(configured: Optional[float]) -> Optional[float]:
    """Peak per device for MFU: configured, a GPU table entry, or a CPU matmul probe."""
    if configured:
        return configured
    if compute_device().type == "cuda":
        name = torch.cuda.get_device_name(compute_device())
        return next((v for k, v in GPU_PEAK_TFLOPS.items() if k in name), None)
    return dense_matmul_tflops()


def _drop_partial_last_line(path: Path) -> None:
    """A process killed mid-write can leave half a JSON line; cut it before appending more."""
    if not path.is_file():
        return
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        with open(path, "r+b") as handle:
            handle.truncate(data.rfind(b"\n") + 1)


def read_metrics(run_dir: str | Path) -> list[dict]:
    """A run's metrics.jsonl as its steps ended: the last record of each step, in step order (a
    run resumed from step N reran the steps past N that a crash lost; `MetricsWriter`). A half
    line left by a process killed mid-write is ignored; no file: no records."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    by_step: dict[int, dict] = {}
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # only ever the last line, cut by a kill (the writer drops it on reopening)
        by_step[record["step"]] = record
    return [by_step[step] for step in sorted(by_step)]


def scalars_summary(metrics: dict[str, float]) -> Summary:
    """One TensorBoard `Summary` holding every metric as the value `SummaryWriter.add_scalar`
    writes (`simple_value`, its default style): one event a step instead of one per metric,
    without add_scalar's per-call conversions (about 36 us each here, ~30 metrics a step)."""
    from tensorboard.compat.proto.summary_pb2 import Summary

    return Summary(value=[Summary.Value(tag=key, simple_value=float(value)) for key, value in metrics.items()])


class MetricsWriter:
    """Rank 0 writes every metric to TensorBoard and to `metrics.jsonl` in the run directory.

    metrics.jsonl is flushed every step (the record a crash keeps). TensorBoard's event file is
    flushed every `TB_FLUSH_SECONDS` and at `flush()`, which the trainer calls before each
    checkpoint, so every step up to a checkpoint is on disk in both: a flush waits for
    TensorBoard's writer thread, about a millisecond a step on two busy cores.

    A run resumed at step N appends to both. metrics.jsonl keeps every record (the steps past N
    that a crash lost are there before their reruns: `read_metrics` keeps the last of each step);
    TensorBoard is told to hide its own records past N (`purge_step`), so its curves do not
    double back at a resume.
    """

    TB_FLUSH_SECONDS = 5.0

    def __init__(self, run_dir: str, tensorboard: bool, enabled: bool, resumed_at: Optional[int] = None) -> None:
        self.enabled = enabled
        self.tb = None
        self.jsonl = None
        self._tb_flushed = time.monotonic()
        if not enabled:
            return
        directory = Path(run_dir)
        directory.mkdir(parents=True, exist_ok=True)
        _drop_partial_last_line(directory / "metrics.jsonl")
        self.jsonl = open(directory / "metrics.jsonl", "a")
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            purge = None if resumed_at is None else resumed_at + 1
            self.tb = SummaryWriter(log_dir=str(directory / "tensorboard"), purge_step=purge)

    def write(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        self.jsonl.write(json.dumps({"step": step, **metrics}) + "\n")
        self.jsonl.flush()
        if self.tb is not None:
            self.tb.file_writer.add_summary(scalars_summary(metrics), step)
            if time.monotonic() - self._tb_flushed >= self.TB_FLUSH_SECONDS:
                self.flush()

    def flush(self) -> None:
        """Everything written so far on disk (TensorBoard's queue drained)."""
        if self.tb is not None:
            self.tb.flush()
            self._tb_flushed = time.monotonic()

    def close(self) -> None:
        if self.jsonl is not None:
            self.jsonl.close()
        if self.tb is not None:
            self.tb.close()

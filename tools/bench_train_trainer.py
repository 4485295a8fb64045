"""The `trainer` worker of tools/bench_train.py: `mor-pretrain` itself, timed step by step from outside.

The worker calls `mor_megatron.pretrain.main` (run config loading, the DeepSpeed engine, the data
loader over a token shard, router statistics, metrics.jsonl + TensorBoard and the log line of
every step, as a user's run does) and takes its step boundaries from the training loop's own
per-step call of `faults.begin_step`: one timed step is everything from one boundary to the next
(data, forward, backward, DeepSpeed's update, metrics, logging, the preemption check). At each
boundary past the warm-up the worker waits for the parent's next command, so that its steps
interleave with the other models' as in the model-only workers; on "done" it leaves the loop
there (no final checkpoint: `training.save_interval` is 0 and the last step never starts).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np


class _Finished(BaseException):
    """Leaves the training loop at a step boundary: a BaseException, so no `except Exception` on
    the way (run_cli, the loop) mistakes it for a failure."""


def write_random_shard(prefix: str, vocab_size: int, seq_length: int, samples: int, seed: int) -> None:
    """A token shard of `samples` documents of `seq_length` random ids (+ EOS): one sample each."""
    from mor_megatron.data.shards import ShardWriter

    rng = np.random.default_rng(seed)
    writer = ShardWriter(prefix, vocab_size, eos_id=vocab_size - 1)
    for _ in range(samples):
        writer.add(rng.integers(0, vocab_size - 1, seq_length))
    writer.close()


def shard_samples(warmup: int, steps: int, batch_size: int) -> int:
    """Samples the trainer reads in a benchmark run (its last, untimed step included), with room."""
    return (warmup + steps + 2) * batch_size + 8


def run_sections(spec: dict, run_dir: str, data_prefix: str) -> dict[str, Any]:
    """The YAML run config of one trainer job: the model of the model-only job, its batch as one
    micro-batch, its gradient clip (`spec["grad_clip"]`, the trainer's default unless overridden),
    the training and logging defaults a user's run has (the unset ZeRO stage, metrics.jsonl,
    TensorBoard, a log line per step), checkpoints off."""
    training = {
        "micro_batch_size": spec["batch_size"],
        "global_batch_size": spec["batch_size"],
        "train_steps": spec["warmup"] + spec["steps"] + 1,  # the last step never starts
        "seed": spec["seed"],
        "lr": spec["lr"],
        "grad_clip": spec["grad_clip"],  # the model-only loop's clip too
        "lr_schedule": "constant",
        "bf16": spec["dtype"] == "bfloat16",
        "save_interval": 0,
        "resume": False,
    }
    from mor_megatron.training.config import TrainingConfig

    if spec.get("compile") or "compile" in TrainingConfig.__dataclass_fields__:
        training["compile"] = bool(spec.get("compile"))  # explicit: its default compiles on CUDA
    return {
        "model": spec["model"],
        "data": {"train": data_prefix},
        "training": training,
        "logging": {"dir": run_dir, "progress": False, "log_interval": 1},
    }


class TrainerSession:
    """One `mor-pretrain` run driven by the worker protocol of tools/bench_train.py."""

    def __init__(self, spec: dict, say: Callable[..., None], read_command: Callable[[], str]) -> None:
        import torch

        self.torch = torch
        self.spec = spec
        self.say = say
        self.read_command = read_command
        self.cuda = torch.cuda.is_available()
        self.model = None
        self.started = self.started_cpu = 0.0

    # the two calls the training loop makes into mor_megatron.training.faults
    def _install(self, original: Callable, model) -> None:
        self.model = model
        original(model)

    def _begin_step(self, original: Callable, step: int) -> None:
        if self.cuda:
            self.torch.cuda.synchronize()
        elapsed = time.perf_counter() - self.started
        cpu = time.process_time() - self.started_cpu
        done = step - 1  # steps finished before this one
        warmup = self.spec["warmup"]
        if done > warmup:
            self.say("STEP", repr(elapsed), "None", repr(cpu))
        if done >= warmup:
            if done == warmup:
                self.say("WARM")
            command = self.read_command()
            if command != "step":
                raise _Finished(command)
        original(step)
        if self.cuda:
            self.torch.cuda.synchronize()
        self.started, self.started_cpu = time.perf_counter(), time.process_time()

    def run(self, config_path: str) -> Optional[str]:
        """Train until the parent stops asking for steps; returns its last command."""
        from mor_megatron import pretrain
        from mor_megatron.training import faults

        install, begin_step = faults.install, faults.begin_step
        faults.install = lambda model: self._install(install, model)
        faults.begin_step = lambda step: self._begin_step(begin_step, step)
        try:
            code = pretrain.main(["--config", config_path, *self.spec.get("trainer_overrides", [])])
        except _Finished as finished:
            return str(finished)
        finally:
            faults.install, faults.begin_step = install, begin_step
        raise RuntimeError(f"mor-pretrain ended (exit code {code}) before the benchmark was done")

    def compiled_layers(self) -> int:
        """Layers the trainer's compile setting compiled (parallel/compile.py marks them)."""
        if self.model is None:
            return 0
        return sum(1 for module in self.model.modules() if getattr(module, "_mor_compiled", False))

    def params(self) -> int:
        return sum(p.numel() for p in self.model.parameters()) if self.model is not None else 0

    def param_dtypes(self) -> list[str]:
        if self.model is None:
            return []
        return sorted({str(p.dtype).removeprefix("torch.") for p in self.model.parameters()})


def _metric_rows(run_dir: str, first: int, last: int) -> list[dict]:
    """The trainer's own metrics.jsonl rows of steps first..last."""
    path = Path(run_dir) / "metrics.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []
    return [row for row in rows if first <= row["step"] <= last]


def losses(run_dir: str, first: int, last: int) -> list[float]:
    """The trainer's own logged losses of steps first..last (metrics.jsonl)."""
    return [row["train/loss"] for row in _metric_rows(run_dir, first, last)]


def routing(run_dir: str, first: int, last: int) -> Optional[dict[str, list]]:
    """Per step first..last, the tokens of each recursion step as routed and as run (pads
    included; `router/r{r}/selected_tokens`, `router/r{r}/run_tokens`, one micro-batch per step
    here), as the model-only worker records them; None for a model without a router."""
    rows = _metric_rows(run_dir, first, last)
    out: dict[str, list] = {"run_tokens": [], "selected_tokens": []}
    for row in rows:
        for key in out:
            values, r = [], 1
            while f"router/r{r}/{key}" in row:
                values.append(row[f"router/r{r}/{key}"])
                r += 1
            out[key].append(values)
    return out if rows and all(out["run_tokens"]) else None


def trainer_worker(say: Callable[..., None], memory_factory: Callable[[], Any]) -> int:
    """The worker protocol of tools/bench_train.py (READY was said by the caller): spec line; WARM
    after the warm-up steps; STEP per "step"; RESULT on "done"."""
    import torch
    import yaml

    line = sys.stdin.readline()
    if not line.strip():
        return 1
    spec = json.loads(line)
    if not torch.cuda.is_available():
        torch.set_num_threads(spec["threads"])
    run_dir = spec["run_dir"]
    config_path = os.path.join(run_dir, "run.yaml")
    os.makedirs(run_dir, exist_ok=True)
    Path(config_path).write_text(yaml.safe_dump(run_sections(spec, run_dir, spec["data_prefix"])))

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
        memory = None
    else:
        memory = memory_factory()
        memory.start()
    session = TrainerSession(spec, say, lambda: sys.stdin.readline().strip())
    command = session.run(config_path)
    if command != "done":
        return 1
    out: dict[str, Any] = {
        "params": session.params(),
        "param_dtypes": session.param_dtypes(),
        "torch_threads": torch.get_num_threads(),
        "compiled_layers": session.compiled_layers(),
        "losses": losses(run_dir, spec["warmup"] + 1, spec["warmup"] + spec["steps"]),
    }
    routed = routing(run_dir, spec["warmup"] + 1, spec["warmup"] + spec["steps"])
    if routed is not None:
        out["routing"] = routed
    if memory is None:
        out.update(peak_memory_bytes=int(torch.cuda.max_memory_allocated()),
                   memory_method="torch.cuda.max_memory_allocated")
    else:
        out.update(memory.stop())
    say("RESULT", json.dumps(out))
    return 0

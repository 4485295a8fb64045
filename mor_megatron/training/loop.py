"""The pretraining loop, top to bottom: set up, resume, step, log, evaluate, checkpoint."""

from __future__ import annotations

import math
import os
import signal
import sys
import time
from typing import Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from mor_megatron.config import MoRConfig
from mor_megatron.data import PretrainingBatches, ValidationBatches
from mor_megatron.device import collective_device, compute_device
from mor_megatron.errors import UserError
from mor_megatron.model import MoRGPTModel
from mor_megatron.parallel.pipeline import describe_stages, plan_stages
from mor_megatron.parallel.compile import compile_enabled, compile_layers
from mor_megatron.parallel.setup import parallelize
from mor_megatron.parallel.state import initialize_parallel
from mor_megatron.report import training_flops_per_token
from mor_megatron.training.checkpoint import (
    TrainState,
    load_checkpoint,
    prune_checkpoints,
    save_checkpoint,
)
from mor_megatron.training import faults, memory_probe
from mor_megatron.paths import RunLock, writable_dir
from mor_megatron.checkpoint_files import checkpoint_dirs, find_latest
from mor_megatron.weights import load_weights
from mor_megatron.training.config import RunConfig, check_data, check_layout, run_config_dict
from mor_megatron.training.eval_tasks import TaskEvaluation, check_eval_tasks, summary_line
from mor_megatron.training.optimizer import build_engine, zero_partitions_nothing
from mor_megatron.model.precision import check_fp8_supported
from mor_megatron.training.metrics import MetricsWriter, as_run_fractions, peak_tflops, router_metrics
from mor_megatron.training.schedule import evaluation_mode, run_microbatches, train_step


class TrainingError(UserError, RuntimeError):
    """The run cannot go on; the message says why and what to do."""


def _is_logger() -> bool:
    """Rank that prints and writes logs: the first rank of the last pipeline stage."""
    return (
        parallel_state.is_pipeline_last_stage(ignore_virtual=True)
        and parallel_state.get_data_parallel_rank() == 0
        and parallel_state.get_tensor_model_parallel_rank() == 0
    )


def build_model(run: RunConfig) -> tuple[MoRGPTModel, MoRConfig, list]:
    """This rank's pipeline stage of the model, replicas set up, from the run's model config as
    `load_run_config` built it (layout, bf16 and recompute included)."""
    config = run.model
    check_fp8_supported(config, backend=run.training.backend)
    stages = plan_stages(config, run.parallel.pipeline_model_parallel_size)
    rank = parallel_state.get_pipeline_model_parallel_rank()
    model = MoRGPTModel(
        config,
        backend=run.training.backend,
        pre_process=rank == 0,
        post_process=rank == len(stages) - 1,
        units=stages[rank],
    )
    # onto the compute device before replicas are broadcast (collectives take device tensors);
    # megatron's own GPU-initialised weights are there already
    model.to(compute_device())
    parallelize(model, config, stages)
    return model, config, stages


def evaluate(engine, batches: ValidationBatches) -> float:
    """Mean validation LM loss over the held-out batches (same on every rank)."""
    with evaluation_mode(engine.module):
        outputs = run_microbatches(engine, batches, forward_only=True)
    return outputs.mean_loss()


class _Preemption:
    """SIGTERM (SLURM preemption, torchrun shutdown) or Ctrl-C (SIGINT) asks for a checkpoint and a
    clean exit at the end of the step; a second Ctrl-C stops at once (`KeyboardInterrupt`, one line
    from `errors.run_cli`; the last complete checkpoint stays). `restore` puts back the handlers
    that were there before."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.requested: Optional[str] = None
        self._previous = {number: signal.signal(number, self._handler) for number in self.SIGNALS}

    def _handler(self, signum, frame) -> None:
        if signum == signal.SIGINT and self.requested == "SIGINT":
            raise KeyboardInterrupt
        self.requested = signal.Signals(signum).name

    def restore(self) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)

    def agreed(self) -> bool:
        """Every rank must stop at the same step: any rank's signal counts for all (one rank:
        its own, without a collective every step)."""
        if dist.get_world_size() == 1:
            return self.requested is not None
        flag = torch.tensor([1.0 if self.requested else 0.0], device=collective_device())
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


def pretrain(run: RunConfig, log=print) -> dict:
    """Train as configured; returns the final metrics. Resumes from the newest checkpoint.

    First (global rank 0) the run's directories are checked writable and `logging.dir` is held
    for this run alone while it lives (`paths.RunLock`)."""
    if os.environ.get("RANK", "0") != "0":
        return _pretrain(run, log)
    lock = RunLock(run.logging.dir)  # checks logging.dir first
    writable_dir(run.checkpoint_dir, "training.save_dir" if run.training.save_dir else "logging.dir")
    with lock:
        return _pretrain(run, log)


def _restart_note() -> str:
    """Where torchrun restarted this worker group (`--max-restarts`): which restart it is."""
    count = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    if count in ("", "0"):
        return ""
    return f" (torchrun restart {count} of {os.environ.get('TORCHELASTIC_MAX_RESTARTS', '?')})"


def _pretrain(run: RunConfig, log) -> dict:
    t = run.training
    initialize_parallel(run.parallel.tensor_model_parallel_size, run.parallel.pipeline_model_parallel_size, t.seed)
    dp = check_layout(run, dist.get_world_size())
    say = log if _is_logger() else (lambda *a, **k: None)
    check_data(run)  # tokenizer and every shard, in seconds, before a model is built or a file written
    check_eval_tasks(t.eval_tasks)  # lm-eval installed, every task found

    model, config, stages = build_model(run)
    say(describe_stages(config, stages))
    num_microbatches = t.global_batch_size // (t.micro_batch_size * dp)
    latest = find_latest(run.checkpoint_dir, log=say) if t.resume else None
    if t.resume and latest is None and checkpoint_dirs(run.checkpoint_dir):
        raise TrainingError(
            f"no complete checkpoint in {run.checkpoint_dir} (every one is damaged, see above): repair "
            "or move them away, or set training.resume=false to start over beside them"
        )
    if latest is None and t.init_from:
        # before the engine exists: ZeRO copies the weights into its fp32 master at creation
        load_weights(model, t.init_from)
        say(f"initialised weights from {t.init_from}")
    if compile_enabled(t.compile, compute_device()):  # each layer's forward, before DeepSpeed hooks in
        say(f"torch.compile ({t.compile_backend}): {compile_layers(model, config, backend=t.compile_backend)} layers")
    engine = build_engine(model, t, t.micro_batch_size, num_microbatches)
    if t.zero_stage is None:
        stage = engine.zero_optimization_stage()
        say(f"ZeRO stage {stage} (training.zero_stage unset: "
            + ("one data-parallel rank in fp32, where ZeRO-1 would partition nothing)" if stage == 0 else "the default)"))
    if not engine.enable_backward_allreduce:
        say("one data-parallel rank and no ZeRO optimizer: DeepSpeed's gradient all-reduce is skipped")
    elif zero_partitions_nothing(engine):
        say(f"note: training.zero_stage={t.zero_stage} at one data-parallel rank partitions nothing and copies every "
            "gradient into its partition each step; training.zero_stage=0 gives the same updates faster (README: "
            "Benchmarks, the trainer at one data-parallel rank)")
    faults.install(model)
    memory_probe.install(model, engine)  # MOR_MEMORY_PROBE only (tools/rehearse.py)
    state = TrainState()
    if latest is not None:
        state = load_checkpoint(engine, model, latest, log=say)
        say(f"resumed from {latest} at step {state.step}{_restart_note()}")

    dp_rank = parallel_state.get_data_parallel_rank()
    data = PretrainingBatches(
        run.data.train, config.seq_length, t.micro_batch_size, t.global_batch_size,
        dp_rank=dp_rank, dp_size=dp, seed=t.seed, consumed_samples=state.consumed_samples,
    )
    valid = (
        ValidationBatches(run.data.valid, config.seq_length, t.micro_batch_size, dp_rank=dp_rank,
                          dp_size=dp, max_microbatches=t.eval_batches)
        if run.data.valid
        else None
    )
    tasks = TaskEvaluation(engine, t, run.data.tokenizer, quiet=not _is_logger()) if t.eval_tasks else None
    writer = MetricsWriter(run.logging.dir, run.logging.tensorboard, enabled=_is_logger(),
                           resumed_at=state.step if latest is not None else None)
    peak = peak_tflops(run.logging.peak_tflops)
    tokens_per_step = t.global_batch_size * config.seq_length
    progress = _progress_bar(run, state.step) if _is_logger() else None
    bad_steps, metrics, started = 0, {}, (time.perf_counter(), state.step)
    stop_at = state.step + t.exit_after_steps if t.exit_after_steps else t.train_steps

    def checkpoint() -> None:
        writer.flush()  # the metrics of every step up to this checkpoint on disk before it
        path = save_checkpoint(engine, model, state, run.checkpoint_dir, run_config_dict(run))
        prune_checkpoints(run.checkpoint_dir, t.keep_checkpoints)
        say(f"saved checkpoint {path}")

    preemption = _Preemption()
    try:
        while state.step < t.train_steps:
            faults.begin_step(state.step + 1)
            consumed_before = data.consumed_samples
            start = time.perf_counter()
            result = train_step(engine, data.next_global_batch(), stages)
            elapsed = time.perf_counter() - start
            state.step += 1
            state.consumed_samples = data.consumed_samples
            state.consumed_tokens += tokens_per_step

            bad_steps = 0 if result.finite else bad_steps + 1
            if not result.finite:
                culprit = _describe_bad_microbatch(result, data, consumed_before)
                say(f"step {state.step}: non-finite loss {result.loss} / grad norm {result.grad_norm} ({culprit}): "
                    f"update skipped ({bad_steps} in a row)")
                if bad_steps >= t.max_bad_steps:
                    raise TrainingError(
                        f"stopping at step {state.step}: {bad_steps} non-finite steps in a row, the last in "
                        f"{culprit}; lower training.lr or check that data, then resume from the last checkpoint"
                    )

            router = router_metrics(result.router)
            # FLOPs as run: the shared block's rows per step, pads included (docs/DESIGN.md 4.1)
            slots = t.micro_batch_size * config.seq_length
            fractions = as_run_fractions(router, config.num_recursions, slots)
            flops_per_token = training_flops_per_token(config, fractions)
            tflops = flops_per_token * tokens_per_step / elapsed / dist.get_world_size() / 1e12
            metrics = {
                "train/loss": result.loss,
                "train/lr": result.lr,
                "train/grad_norm": result.grad_norm,
                "train/tokens_per_s": tokens_per_step / elapsed,
                "train/tflops_per_device": tflops,
                "train/step_time_s": elapsed,
                "train/skipped_steps": float(engine.skipped_steps),
                **router,
            }
            if peak:
                metrics["train/mfu"] = tflops / peak
            last = state.step == t.train_steps
            leaving = state.step >= stop_at
            due = bool(t.eval_interval and state.step % t.eval_interval == 0) or last
            if valid is not None and due:
                metrics["valid/loss"] = evaluate(engine, valid)
                metrics["valid/perplexity"] = math.exp(min(metrics["valid/loss"], 50.0))
            if tasks is not None and due:
                scores = tasks()
                metrics.update(scores)
                say(summary_line(state.step, scores))
            evaluated = due and (valid is not None or tasks is not None)
            if state.step % run.logging.log_interval == 0 or last or evaluated:  # evaluations are always kept
                writer.write(state.step, metrics)
            if progress is not None:
                progress.update(1)
                progress.set_postfix(loss=f"{result.loss:.4f}", tok_s=f"{tokens_per_step / elapsed:,.0f}")
            elif state.step % run.logging.log_interval == 0 or last:
                say(_progress_line(state.step, t.train_steps, metrics, started))
            saved = (t.save_interval and state.step % t.save_interval == 0) or last or leaving
            if saved:
                checkpoint()
            if leaving and not last:
                say(f"training.exit_after_steps reached at step {state.step}; relaunch to continue")
                break
            if preemption.agreed():
                if not saved:
                    checkpoint()
                say(f"{preemption.requested or 'a signal on another rank'} received: checkpoint written at step "
                    f"{state.step}; relaunch to resume")
                break
        if progress is not None:
            progress.close()
        writer.close()
    finally:
        preemption.restore()
    return metrics


def _describe_bad_microbatch(result, data: PretrainingBatches, consumed_before: int) -> str:
    """Where a non-finite step came from: the micro-batch and its global sample ids."""
    if result.bad_microbatch is None:
        return "every micro-batch loss finite: the gradient was not"
    dp_rank, index = result.bad_microbatch
    ids = data.sample_indices(consumed_before, index, dp_rank=dp_rank)
    return (f"micro-batch {index + 1}/{data.num_microbatches} of data-parallel rank {dp_rank}, "
            f"global samples {int(ids[0])}-{int(ids[-1])}")


def _progress_line(step: int, total: int, metrics: dict, started: tuple[float, int]) -> str:
    """A log line for non-interactive output (SLURM logs) in place of the progress bar."""
    rate = (time.perf_counter() - started[0]) / max(1, step - started[1])
    eta = int(rate * (total - step))
    line = (
        f"step {step}/{total} | loss {metrics['train/loss']:.4f} | lr {metrics['train/lr']:.3g} | "
        f"grad norm {metrics['train/grad_norm']:.3f} | {metrics['train/tokens_per_s']:,.0f} tok/s | "
        f"ETA {eta // 3600}:{eta // 60 % 60:02d}:{eta % 60:02d}"
    )
    if "valid/loss" in metrics:
        line += f" | valid loss {metrics['valid/loss']:.4f}"
    return line


def _progress_bar(run: RunConfig, start: int):
    """tqdm on an interactive terminal; plain log lines otherwise."""
    if not run.logging.progress or not sys.stdout.isatty():
        return None
    from tqdm import tqdm

    return tqdm(total=run.training.train_steps, initial=start, desc="pretrain", unit="step",
                file=sys.stdout, dynamic_ncols=True)

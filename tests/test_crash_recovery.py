"""Crash anywhere, lose nothing: a 2-process run is SIGKILLed ten times, each time on a random
rank at a random point (inside forward, backward, the optimizer step, or between the writes of a
checkpoint save); each relaunch with the same command resumes from the newest complete checkpoint
(never a partial one) and its losses equal those of an uninterrupted run, exactly (CPU is
deterministic). A disk filling up during a save leaves the previous checkpoint intact."""

import os
import random

import pytest
import torch

from train_helpers import launch, metrics, series, tensorboard_scalars, tree_digest, write_config

pytestmark = pytest.mark.distributed

TRAIN_STEPS, SAVE_EVERY = 14, 2
STEP_POINTS = ("forward", "backward", "optimizer")
SAVE_POINTS = ("checkpoint-deepspeed", "checkpoint-universal", "checkpoint-meta", "checkpoint-latest")
RANK0_ONLY = ("checkpoint-meta", "checkpoint-latest")  # rank 0 alone renames and moves the pointer


def _plans() -> list[tuple[int, str]]:
    """Seeded order and ranks of the ten trials: each step point twice, each save point once."""
    rng = random.Random(2026)
    points = list(STEP_POINTS) * 2 + list(SAVE_POINTS)
    rng.shuffle(points)
    return [(0 if point in RANK0_ONLY else rng.randrange(2), point) for point in points]


def _kill_step(trial: int, point: str, resumed: int) -> int:
    """A seeded step after the one the run resumes from (a save step for save points)."""
    rng = random.Random(trial)
    if point in SAVE_POINTS:
        return resumed - resumed % SAVE_EVERY + SAVE_EVERY * rng.randint(1, 2)
    return resumed + rng.randint(2, 3)


def _newest_complete_after(step: int, point: str) -> int:
    """Independent of the code under test: which save must be the newest complete one."""
    if point == "checkpoint-latest":
        return step  # renamed into place; only the pointer lags
    before = step - 1
    return before - before % SAVE_EVERY


def test_ten_random_kills_each_resume_exactly(corpus, tmp_path):
    config = write_config(tmp_path / "run.yaml", corpus, training={
        "train_steps": TRAIN_STEPS, "save_interval": SAVE_EVERY, "keep_checkpoints": 0, "micro_batch_size": 1,
        "lr": 0.01, "grad_clip": 1.0, "warmup_steps": 1})
    launch(config, tmp_path / "reference", nproc=2)
    reference = series(tmp_path / "reference", "train/loss")
    run_dir = tmp_path / "run"
    resumed, seen, previous = 0, 0, None
    for trial, (rank, point) in enumerate(_plans()):
        step = _kill_step(trial, point, resumed)
        assert step <= TRAIN_STEPS
        result = launch(config, run_dir, nproc=2, check=False, env={"MOR_FAULT_INJECT": f"{rank}:{step}:{point}"})
        log = result.stdout + "\n".join(line for line in result.stderr.splitlines() if "Error" in line or "error" in line)
        root_cause = result.stderr.split("Root Cause")[-1]
        assert f"rank      : {rank} " in root_cause and "(SIGKILL)" in root_cause, \
            f"trial {trial}: the fault {rank}:{step}:{point} did not fire first\n{log[-3000:]}"
        if previous == "checkpoint-latest":  # the pointer lags one save behind the newest complete one
            assert f"is older: a save stopped before updating it; using the newest complete checkpoint " \
                   f"step_{resumed:08d}" in result.stdout
        previous = point
        if resumed:
            assert f"at step {resumed}" in result.stdout, f"trial {trial}: expected a resume at {resumed}\n{log[-3000:]}"
        else:
            assert "resumed from" not in result.stdout
        rows = metrics(run_dir)[seen:]
        seen += len(rows)
        assert [row["step"] for row in rows] == list(range(resumed + 1, step + 1 if point in SAVE_POINTS else step))
        assert [row["train/loss"] for row in rows] == reference[resumed:resumed + len(rows)], f"trial {trial}"
        resumed = _newest_complete_after(step, point)
        if point == "checkpoint-meta":
            assert (run_dir / "checkpoints" / f"step_{step:08d}.partial" / "meta.json").is_file()

    final = launch(config, run_dir, nproc=2)
    assert f"at step {resumed}" in final.stdout
    rows = metrics(run_dir)[seen:]
    assert [row["train/loss"] for row in rows] == reference[resumed:]
    # TensorBoard across the ten kills: every step once, with its final value (its writer is
    # flushed on a timer and before each checkpoint, not every step; the ordering itself:
    # test_metrics_reach_disk_before_each_checkpoint)
    assert tensorboard_scalars(run_dir, "train/loss") == {
        step: pytest.approx(loss, rel=1e-6) for step, loss in enumerate(reference, start=1)}  # fp32 events


def test_metrics_reach_disk_before_each_checkpoint(corpus, tmp_path, monkeypatch, parallel):
    """Every checkpoint is preceded by a flush of the metrics writer after the last step's write,
    so the TensorBoard events of every step up to a checkpoint survive a kill that follows it (the
    timed flush is kept out of the way)."""
    from mor_megatron.training import loop
    from mor_megatron.training.config import load_run_config
    from mor_megatron.training.metrics import MetricsWriter

    order = []
    monkeypatch.setattr(MetricsWriter, "TB_FLUSH_SECONDS", float("inf"))
    for name in ("write", "flush"):
        real = getattr(MetricsWriter, name)
        monkeypatch.setattr(MetricsWriter, name, lambda self, *a, _real=real, _name=name, **k: (
            order.append(_name), _real(self, *a, **k))[1])
    save = loop.save_checkpoint
    monkeypatch.setattr(loop, "save_checkpoint", lambda *a, **k: (order.append("save"), save(*a, **k))[1])
    config = write_config(tmp_path / "run.yaml", corpus, training={"train_steps": 4, "save_interval": 2})
    loop.pretrain(load_run_config(config, [f"logging.dir={tmp_path / 'run'}"]), log=lambda message: None)
    saves = [i for i, event in enumerate(order) if event == "save"]
    assert len(saves) == 2 and order.count("write") == 4, order
    for i in saves:
        assert order[i - 1] == "flush" and "write" in order[:i], order


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (Linux)")
def test_disk_full_during_a_save_keeps_the_previous_checkpoint(corpus, tmp_path, monkeypatch, parallel):
    """The second save's first file goes to /dev/full, where every write fails with ENOSPC: the
    real kernel error through torch's real writer (which reports it as a RuntimeError)."""
    from mor_megatron.checkpoint_files import CheckpointError
    from mor_megatron.training.config import load_run_config
    from mor_megatron.training.loop import pretrain

    config = write_config(tmp_path / "run.yaml", corpus, training={"train_steps": 4, "save_interval": 2})
    run_dir = tmp_path / "run"
    run = load_run_config(config, [f"logging.dir={run_dir}", "training.exit_after_steps=2"])
    pretrain(run, log=lambda message: None)
    kept = run_dir / "checkpoints" / "step_00000002"
    before = tree_digest(kept)

    real_save = torch.save

    def onto_a_full_disk(obj, path, *args, **kwargs):
        if "step_00000004.partial" in str(path):
            path = "/dev/full"
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(torch, "save", onto_a_full_disk)
    run = load_run_config(config, [f"logging.dir={run_dir}"])
    with pytest.raises(CheckpointError) as raised:
        pretrain(run, log=lambda message: None)
    message = str(raised.value)
    assert "\n" not in message
    assert message.startswith("checkpoint for step 4 not written (RuntimeError: ") and " MiB free there; " in message
    assert f"{kept} is intact" in message and "free space under" in message
    assert tree_digest(kept) == before
    assert not (run_dir / "checkpoints" / "step_00000004.partial").exists()
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_00000002"


def test_a_killed_trainer_leaves_no_checkpoint_helper_running(tmp_path):
    """megatron's checkpoint writer serves a queue from a spawned process; after a SIGKILL of the
    trainer it must exit too, or it would hold the trainer's output open and the launch never ends."""
    import subprocess
    import sys

    script = tmp_path / "trainer.py"
    script.write_text(
        "import os, signal\n"
        "if __name__ == '__main__':\n"
        "    from megatron.core.dist_checkpointing.strategies import filesystem_async\n"
        "    from mor_megatron.training.checkpoint import _orphan_safe_write_queue\n"
        "    _orphan_safe_write_queue()\n"
        "    queue = filesystem_async._results_queue\n"
        "    queue.put('served')\n"
        "    print(queue.get(), flush=True)\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    # capture_output waits for every holder of the pipes: a surviving helper would time out
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert result.returncode == -9 and result.stdout.splitlines()[-1] == "served"


def test_non_finite_weights_are_never_saved(corpus, tmp_path, parallel, monkeypatch):
    """A step that leaves a weight non-finite (here: set so after the real step) must not be
    saved: before the fix the end-of-run save wrote the inf/nan tensors and the run exited 0."""
    from mor_megatron.checkpoint_files import CheckpointError
    from mor_megatron.training import loop
    from mor_megatron.training.config import load_run_config

    real_step = loop.train_step

    def step_then_overflow(engine, batches, stages):
        result = real_step(engine, batches, stages)
        with torch.no_grad():
            next(engine.module.parameters()).fill_(float("inf"))
        return result

    monkeypatch.setattr(loop, "train_step", step_then_overflow)
    config = write_config(tmp_path / "run.yaml", corpus, training={"train_steps": 1})
    run = load_run_config(config, [f"logging.dir={tmp_path / 'run'}"])
    with pytest.raises(CheckpointError) as raised:
        loop.pretrain(run, log=lambda message: None)
    message = str(raised.value)
    assert message.startswith("checkpoint for step 1 not written: ") and "hold non-finite values (first: " in message
    assert "no earlier checkpoint exists" in message and "\n" not in message
    assert not any((tmp_path / "run" / "checkpoints").glob("step_*"))


@pytest.mark.parametrize("failure, fix, not_fix", [
    (PermissionError(13, "Permission denied", "/ckpt/x"), "writable for this user", "free space"),
    (OSError(30, "Read-only file system", "/ckpt/x"), "read-only file system", "free space"),
    (OSError(28, "No space left on device", "/ckpt/x"), "free space under", "writable"),
    (ValueError("a bug"), "fix that cause", "free space"),
])
def test_a_failed_save_names_its_own_cause(tmp_path, failure, fix, not_fix):
    """Before, every failed save ended in "free space under ...", also when the disk was fine."""
    from mor_megatron.checkpoint_files import CheckpointError
    from mor_megatron.training.checkpoint import _stop_if_any_write_failed

    partial = tmp_path / "step_00000003.partial"
    partial.mkdir()
    with pytest.raises(CheckpointError) as raised:
        _stop_if_any_write_failed(failure, partial, tmp_path, 3)
    message = str(raised.value)
    assert fix in message and not_fix not in message and not partial.exists()

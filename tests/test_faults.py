"""Faults during training: SIGTERM saves and exits, non-finite steps are skipped and counted and
stop the run after `max_bad_steps` in a row, recomputation changes nothing but memory."""

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from train_helpers import launch, metrics, repo_root, series, write_config

pytestmark = pytest.mark.distributed


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_writes_a_checkpoint_and_exits_cleanly(corpus, tmp_path, signum):
    """SIGTERM (preemption) and Ctrl-C (SIGINT: before, a 75-line KeyboardInterrupt traceback and
    no checkpoint) both save at the end of the step and exit 0 with one line."""
    config = write_config(tmp_path / "run.yaml", corpus, training={"train_steps": 500})
    run_dir = tmp_path / "run"
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    process = subprocess.Popen(
        [sys.executable, "-m", "mor_megatron.pretrain", "--config", str(config), f"logging.dir={run_dir}"],
        cwd=repo_root(), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    deadline = time.time() + 180
    while time.time() < deadline:
        if (run_dir / "metrics.jsonl").exists() and len(series(run_dir, "train/loss")) >= 2:
            break
        time.sleep(0.2)
    process.send_signal(signum)
    output = process.communicate(timeout=120)[0]
    assert process.returncode == 0, output[-3000:]
    step = len(series(run_dir, "train/loss"))
    assert f"{signal.Signals(signum).name} received: checkpoint written at step" in output
    assert "Traceback" not in output
    assert (run_dir / "checkpoints" / f"step_{step:08d}" / "meta.json").is_file()


def test_ctrl_c_in_process_saves_then_restores_the_handlers(corpus, tmp_path, monkeypatch, parallel):
    """Ctrl-C during step 2 of an in-process run: the step finishes, a checkpoint of step 2 is
    written, pretrain returns, and the caller's own SIGINT/SIGTERM handlers are back."""
    from mor_megatron.training import loop
    from mor_megatron.training.config import load_run_config

    real_step, steps = loop.train_step, []

    def step_with_ctrl_c(*args, **kwargs):
        steps.append(len(steps) + 1)
        if len(steps) == 2:
            os.kill(os.getpid(), signal.SIGINT)
        return real_step(*args, **kwargs)

    monkeypatch.setattr(loop, "train_step", step_with_ctrl_c)
    before = {number: signal.getsignal(number) for number in (signal.SIGINT, signal.SIGTERM)}
    config = write_config(tmp_path / "run.yaml", corpus, training={"train_steps": 50})
    lines = []
    loop.pretrain(load_run_config(config, [f"logging.dir={tmp_path / 'run'}"]), log=lines.append)
    assert steps == [1, 2] and "SIGINT received: checkpoint written at step 2; relaunch to resume" in lines
    assert (tmp_path / "run" / "checkpoints" / "step_00000002" / "meta.json").is_file()
    assert {number: signal.getsignal(number) for number in before} == before


def test_recomputation_gives_the_same_training(expert_setup):
    config, overrides, reference, root = expert_setup
    run_dir = root / "recompute"
    launch(config, run_dir, overrides + ["training.recompute=true"])
    for key in ("train/loss", "train/grad_norm"):
        assert series(run_dir, key) == pytest.approx(series(reference, key), rel=1e-6)


def _run_in_process(config, run_dir, overrides, nan_steps, monkeypatch, microbatch=None):
    """pretrain() in this process with the LM loss poisoned at the given (1-based) steps, in every
    micro-batch or only in the given (0-based) one."""
    from mor_megatron.training import schedule
    from mor_megatron.training.config import load_run_config
    from mor_megatron.training.loop import pretrain

    calls = {"step": 0, "micro": 0}
    original = schedule.lm_loss
    original_train_step = schedule.train_step

    def counting_train_step(*args, **kwargs):
        calls["step"] += 1
        calls["micro"] = 0
        return original_train_step(*args, **kwargs)

    def poisoned(per_token, mask):
        loss = original(per_token, mask)
        calls["micro"] += 1
        hit = calls["step"] in nan_steps and microbatch in (None, calls["micro"] - 1)
        return loss * float("nan") if hit else loss

    monkeypatch.setattr(schedule, "lm_loss", poisoned)
    monkeypatch.setattr("mor_megatron.training.loop.train_step", counting_train_step)
    run = load_run_config(config, [f"logging.dir={run_dir}", *overrides])
    return pretrain(run, log=lambda message: None)


def test_non_finite_steps_are_skipped_and_counted(corpus, tmp_path, monkeypatch, parallel):
    """One process in fp32 runs ZeRO-0 (the unset stage), where DeepSpeed would apply a NaN update:
    the skip there must leave the run as ZeRO-1's own skip does (same losses and LR after it)."""
    config = write_config(tmp_path / "run.yaml", corpus, training={"train_steps": 6})
    runs = {}
    for name, overrides in (("zero0", []), ("zero1", ["training.zero_stage=1"])):
        _run_in_process(config, tmp_path / name, overrides, nan_steps={2, 3}, monkeypatch=monkeypatch)
        runs[name] = metrics(tmp_path / name)
        assert [row["train/skipped_steps"] for row in runs[name]] == [0, 1, 2, 2, 2, 2], name
        assert all(torch.isfinite(torch.tensor(row["train/loss"])) for row in runs[name][3:]), name
    for key in ("train/loss", "train/lr"):
        zero0, zero1 = ([row[key] for i, row in enumerate(rows) if i not in (1, 2)] for rows in runs.values())
        assert zero0 == pytest.approx(zero1, rel=1e-5), key


def test_too_many_non_finite_steps_stop_the_run(corpus, tmp_path, monkeypatch, parallel):
    from mor_megatron.training.loop import TrainingError

    config = write_config(tmp_path / "run.yaml", corpus, training={"train_steps": 8, "max_bad_steps": 3})
    # 4 samples a step in 2 micro-batches: step 4 starts at sample 12, its second micro-batch is 14-15
    with pytest.raises(TrainingError) as raised:
        _run_in_process(config, tmp_path / "stop", [], nan_steps={2, 3, 4, 5}, monkeypatch=monkeypatch, microbatch=1)
    assert str(raised.value).startswith(
        "stopping at step 4: 3 non-finite steps in a row, the last in micro-batch 2/2 of data-parallel rank 0, "
        "global samples 14-15;")

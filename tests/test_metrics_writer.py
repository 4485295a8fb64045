"""MetricsWriter across a resume: TensorBoard (read back by tensorboard's own event reader) shows each
step once, with the rerun's value; metrics.jsonl keeps every record, the rerun's last."""

import json

import pytest

from mor_megatron.training.metrics import MetricsWriter
from train_helpers import tensorboard_scalars

pytest.importorskip("tensorboard")


@pytest.mark.parametrize("resume", [True, False], ids=["resumed", "resume-not-declared"])
def test_a_resumed_run_shows_each_step_once_with_its_rerun_value(tmp_path, resume):
    first = MetricsWriter(str(tmp_path), tensorboard=True, enabled=True)
    for step in range(1, 6):  # steps 4 and 5 are lost by the crash: the checkpoint is at 3
        first.write(step, {"train/loss": 10.0 + step})
    first.close()
    again = MetricsWriter(str(tmp_path), tensorboard=True, enabled=True, resumed_at=3 if resume else None)
    for step in range(4, 7):
        again.write(step, {"train/loss": 20.0 + step})
    again.close()

    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 4, 5, 6]  # nothing written is dropped
    last = {r["step"]: r["train/loss"] for r in rows}
    assert last == {1: 11.0, 2: 12.0, 3: 13.0, 4: 24.0, 5: 25.0, 6: 26.0}
    if resume:
        assert tensorboard_scalars(tmp_path, "train/loss") == last
    else:  # what the trainer did before it declared the resume: the lost steps' values shown too
        with pytest.raises(AssertionError):
            tensorboard_scalars(tmp_path, "train/loss")


def test_read_metrics_keeps_the_last_record_of_each_step(tmp_path):
    """A run resumed at step 2 after a crash at step 4 logged steps 3-4 twice, and a kill cut its
    last line: the reader gives each step once, as rerun, in order."""
    from mor_megatron.training.metrics import read_metrics

    lines = [{"step": s, "train/loss": 10.0 - s} for s in (1, 2, 3, 4)]
    lines += [{"step": s, "train/loss": 20.0 - s} for s in (3, 4, 5)]
    text = "".join(json.dumps(line) + "\n" for line in lines) + '{"step": 6, "train/lo'
    (tmp_path / "metrics.jsonl").write_text(text)
    assert [(r["step"], r["train/loss"]) for r in read_metrics(tmp_path)] == [
        (1, 9.0), (2, 8.0), (3, 17.0), (4, 16.0), (5, 15.0)]
    assert read_metrics(tmp_path / "missing") == []


def test_tensorboard_shows_what_add_scalar_would(tmp_path):
    """One event a step with every metric (`scalars_summary`) reads back, tag by tag, as
    torch's `SummaryWriter.add_scalar` per metric writes it (the baseline)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.tensorboard import SummaryWriter

    steps = {step: {"train/loss": 3.5 - step / 7, "train/skipped_steps": step // 2,
                    "router/r2/selected_tokens": 170.0 * step, "train/lr": -1e-30 * step}
             for step in range(1, 5)}
    ours = MetricsWriter(str(tmp_path / "ours"), tensorboard=True, enabled=True)
    baseline = SummaryWriter(log_dir=str(tmp_path / "baseline" / "tensorboard"))
    for step, metrics in steps.items():
        ours.write(step, metrics)
        for key, value in metrics.items():
            baseline.add_scalar(key, value, step)
    ours.close()
    baseline.close()

    def scalars(run_dir):
        events = EventAccumulator(str(run_dir / "tensorboard"))
        events.Reload()
        return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}

    got, expect = scalars(tmp_path / "ours"), scalars(tmp_path / "baseline")
    assert sorted(expect) == sorted(steps[1]) and got == expect


def test_flush_puts_every_written_step_on_disk_before_a_kill(tmp_path):
    """TensorBoard is flushed on a timer and at `flush()` (the trainer's, before each checkpoint),
    not every step: a process killed right after `flush()` (no close, no atexit) leaves every step
    written before it readable; steps written after it may be lost, as the rerun replaces them."""
    import subprocess
    import sys

    script = (
        "import os, sys\n"
        "from mor_megatron.training.metrics import MetricsWriter\n"
        "writer = MetricsWriter(sys.argv[1], tensorboard=True, enabled=True)\n"
        "for step in range(1, 4):\n"
        "    writer.write(step, {'train/loss': 10.0 + step})\n"
        "writer.flush()\n"
        "writer.write(4, {'train/loss': 14.0})\n"
        "os._exit(0)\n"
    )
    subprocess.run([sys.executable, "-c", script, str(tmp_path)], check=True, timeout=120)
    shown = tensorboard_scalars(tmp_path, "train/loss")
    assert {step: shown[step] for step in (1, 2, 3)} == {1: 11.0, 2: 12.0, 3: 13.0}, shown
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]  # metrics.jsonl: flushed every step

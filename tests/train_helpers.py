"""Run the real pretraining CLI (1 process or `torchrun --nproc_per_node 2`) on a tiny model."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

from mor_megatron.paths import LOCK_FILE

TINY_RUN = {
    "model": {
        "hidden_size": 64,
        "num_attention_heads": 4,
        "num_query_groups": 2,
        "ffn_hidden_size": 128,
        "vocab_size": 512,
        "seq_length": 32,
        "effective_layers": 8,
        "num_recursions": 3,
    },
    "training": {
        "micro_batch_size": 2,
        "global_batch_size": 4,
        "train_steps": 5,
        "lr": 0.003,
        "warmup_steps": 2,
        "grad_clip": 0.1,  # small so that clipping is active and tested
        "seed": 7,
    },
    "logging": {"tensorboard": True, "progress": False},
}


def make_corpus(directory: Path) -> dict:
    prefix = directory / "stdlib"
    subprocess.run(
        [sys.executable, "tools/preprocess_data.py", "--input", "stdlib", "--output-prefix", str(prefix),
         "--train-tokenizer", "--vocab-size", "512", "--max-documents", "40", "--no-progress"],
        check=True, capture_output=True, cwd=repo_root(),
    )
    return {
        "train": f"{prefix}_train",
        "valid": f"{prefix}_valid",
        "tokenizer": str(directory / "tokenizer"),
    }


def repo_root() -> Path:
    return Path(__file__).resolve().parent.parent


def write_config(path: Path, corpus: dict, model: dict | None = None, **sections) -> Path:
    run = json.loads(json.dumps(TINY_RUN))
    run["model"].update(model or {})
    run["data"] = dict(corpus)
    for name, values in sections.items():
        run.setdefault(name, {}).update(values)
    path.write_text(yaml.safe_dump(run))
    return path


def launch(config: Path, run_dir: Path, overrides: list[str] = (), nproc: int = 1, timeout: int = 300,
           check: bool = True, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run pretraining; the run directory and its checkpoints go to `run_dir`."""
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **(env or {}))
    args = ["--config", str(config), f"logging.dir={run_dir}", *overrides]
    if nproc == 1:
        command = [sys.executable, "-m", "mor_megatron.pretrain", *args]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                   "--master_port", str(_free_port()), "-m", "mor_megatron.pretrain", *args]
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env, cwd=repo_root())
    if check and result.returncode != 0:
        raise AssertionError(f"run failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}")
    return result


def one_error_line(rc: int, out: str, err: str, phrase: str = "", prefix: str = "error: ", code: int = 2) -> str:
    """Assert a failed command printed exactly one non-empty error line (starting with `prefix`,
    containing `phrase`), no traceback, and exited with `code`; returns the line."""
    assert rc == code, (rc, out[-2000:], err[-3000:])
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith(prefix) and lines[0][len(prefix):].strip(), err[-3000:]
    assert phrase in lines[0], lines[0]
    assert "Traceback" not in out + err
    return lines[0]


def tree_digest(*roots: Path) -> dict[str, str]:
    """sha256 of every file under `roots`, by path: what a failed launch must leave alone (the
    live-run lock aside: each launch writes its own pid there, `mor_megatron.paths.RunLock`)."""
    return {
        str(path): hashlib.sha256(path.read_bytes()).hexdigest()
        for root in roots for path in sorted(Path(root).rglob("*")) if path.is_file() and path.name != LOCK_FILE
    }


def metrics(run_dir: Path) -> list[dict]:
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def series(run_dir: Path, key: str) -> list[float]:
    return [m[key] for m in metrics(run_dir)]


def tensorboard_scalars(run_dir: Path, tag: str) -> dict[int, float]:
    """`tag`'s values by step in `run_dir/tensorboard`, read by tensorboard's own event reader
    (every event file, purges applied); no step may be shown twice."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(Path(run_dir) / "tensorboard"))
    events.Reload()
    steps = [(e.step, e.value) for e in events.Scalars(tag)]
    assert len({s for s, _ in steps}) == len(steps), steps  # no step shown twice
    return dict(steps)


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]

"""Bad input, one clear line (issue #8): each row gives one bad input to a real CLI and checks
that it exits non-zero (2: a user error) with exactly one stderr line naming the problem and the fix,
prints no traceback (unless --debug), and leaves what is already written byte for byte intact.

mor-pretrain rows run `mor_megatron.pretrain.main(argv)` in this process (a world of one, as
`python -m mor_megatron.pretrain` is) against an existing run directory (metrics + checkpoints of a
real 2-step run); rows that need a process environment (rendezvous variables, launchers under a
fake SLURM allocation) run as subprocesses. Preprocessing rows run `tools/preprocess_data.py`'s
`main(argv)` against an existing output prefix.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from slurm_helpers import fake_slurm_env, install_fake_slurm
from train_helpers import one_error_line, repo_root, tree_digest, write_config

ROOT = repo_root()
SEQ = 32  # the tiny run's model.seq_length
# Variables the launchers read: cleared so the caller's shell cannot steer a row.
LAUNCH_VARS = ("NNODES", "NPROC_PER_NODE", "GPUS_PER_NODE", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT",
               "RDZV_ID", "LOCAL_ADDR", "MAX_RESTARTS", "DRY_RUN", "MOR_ENTRY", "CONFIG", "RUN_DIR",
               "MOR_REPO", "RDZV_ADDR", "RDZV_PORT", "SRUN_EXTRA_ARGS", "AUTO_REQUEUE", "CUDA_VISIBLE_DEVICES")


@pytest.fixture(scope="module")
def existing(corpus, parallel, tmp_path_factory):
    """A finished 2-step run (metrics.jsonl, checkpoints/) that every failing launch points at."""
    from mor_megatron.pretrain import main

    root = tmp_path_factory.mktemp("bad_input")
    config = write_config(root / "run.yaml", corpus, training={"train_steps": 2},
                          logging={"tensorboard": False, "peak_tflops": 1.0})
    run_dir = root / "run"
    sigterm = signal.getsignal(signal.SIGTERM)  # the trainer installs its own handler
    try:
        assert main(["--config", str(config), f"logging.dir={run_dir}"]) == 0
    finally:
        signal.signal(signal.SIGTERM, sigterm)
    assert (run_dir / "metrics.jsonl").is_file() and list((run_dir / "checkpoints").glob("step_*/meta.json"))
    return {"config": config, "run_dir": run_dir, "corpus": corpus, "root": root}


# -- shard makers (each returns the prefix to train on) ------------------------------------------


def _copy(src: str, dst: Path, bin_from: str | None = None) -> str:
    shutil.copyfile(src + ".idx", f"{dst}.idx")
    shutil.copyfile((bin_from or src) + ".bin", f"{dst}.bin")
    return str(dst)


def _written(dst: Path, *docs: list[int]) -> str:
    from mor_megatron.data.shards import ShardWriter

    writer = ShardWriter(str(dst), vocab_size=512, eos_id=0)
    for doc in docs:
        writer.add(doc)
    writer.close()
    return str(dst)


def _stale_record(tmp: Path, doc: list[int]) -> str:
    """A shard `BASE_train` whose BASE_meta.json (vocabulary 512) was written for another corpus."""
    prefix = _written(tmp / "stale_train", doc)
    (tmp / "stale_meta.json").write_text(json.dumps({"vocab_size": 512, "tokens": 12345}))
    return prefix


def _truncated(c: dict, tmp: Path) -> str:
    prefix = _copy(c["train"], tmp / "cut")
    with open(prefix + ".bin", "r+b") as f:
        f.truncate(os.path.getsize(prefix + ".bin") // 2)
    return prefix


def _garbled_index(c: dict, tmp: Path) -> str:
    prefix = _copy(c["train"], tmp / "garbled")
    Path(prefix + ".idx").write_bytes(b"not a megatron index")
    return prefix


def _yaml(tmp: Path, text: str) -> str:
    path = tmp / "bad.yaml"
    path.write_text(text)
    return str(path)


def _with_section(e: dict, tmp: Path, section: str) -> str:
    return _yaml(tmp, Path(e["config"]).read_text() + section)


# id -> (make(existing, tmp_path) -> (config path or None, overrides), phrase the line must hold)
PRETRAIN_ROWS = {
    # config
    "config-file-missing": (lambda e, t: (str(t / "missing.yaml"), []), "not found"),
    "config-yaml-syntax": (lambda e, t: (_yaml(t, "model:\n  hidden_size: [64\n"), []), "YAML syntax error at line"),
    "config-unknown-section": (lambda e, t: (_with_section(e, t, "trainig:\n  train_steps: 2\n"), []),
                               "unknown section 'trainig' (did you mean 'training'?)"),
    "config-no-model-section": (lambda e, t: (_yaml(t, "training:\n  train_steps: 2\n"), []), "no 'model:' section"),
    "config-unknown-model-key": (lambda e, t: (None, ["model.hiden_size=64"]), "did you mean 'hidden_size'"),
    "config-unknown-training-key": (lambda e, t: (None, ["training.micro_batchsize=2"]),
                                    "did you mean 'micro_batch_size'"),
    "config-duplicate-key": (lambda e, t: (_yaml(t, "model:\n  hidden_size: 64\n  hidden_size: 96\n"), []),
                             "duplicate key 'hidden_size' at lines 2 and 3: keep one of them"),
    "config-out-of-range": (lambda e, t: (None, ["training.lr=1e400"]),
                            "training.lr=inf is out of range: use a finite number in [0, 1]"),
    "config-override-syntax": (lambda e, t: (None, ["training.train_steps"]), "not of the form section.key=value"),
    "config-wrong-type": (lambda e, t: (None, ["training.train_steps=many"]),
                          "training.train_steps has the wrong type: expected an integer"),
    "config-bool-for-int": (lambda e, t: (None, ["model.hidden_size=true"]), "model.hidden_size has the wrong type"),
    "config-unknown-choice": (lambda e, t: (None, ["model.router=experts"]), "unknown router 'experts': choose one of"),
    "config-derived-key": (lambda e, t: (None, ["model.num_layers=4"]), "model.num_layers is not settable"),
    "config-tp-not-dividing-heads": (lambda e, t: (None, ["parallel.tensor_model_parallel_size=8"]),
                                     "tensor_model_parallel_size=8 must divide num_attention_heads=4"),
    "config-tp-not-dividing-vocab": (lambda e, t: (None, ["parallel.tensor_model_parallel_size=3"]),
                                     "pad the vocabulary to a multiple of 3"),
    "config-pp-more-than-units": (lambda e, t: (None, ["parallel.pipeline_model_parallel_size=6"]),
                                  "exceeds the 5 placeable units of this model: use at most 5 stages"),
    "config-zero3-with-pp": (lambda e, t: (None, ["training.zero_stage=3", "parallel.pipeline_model_parallel_size=2"]),
                             "training.zero_stage=3 with pipeline parallelism: use zero_stage 1"),
    "config-capacities-increasing": (lambda e, t: (None, ["model.capacities=[0.5, 1.0, 0.8]"]),
                                     "increase: hierarchical filtering needs a non-increasing list"),
    "config-capacities-count": (lambda e, t: (None, ["model.capacities=[1.0, 0.5]"]),
                                "capacities has 2 entries but num_recursions=3"),
    "config-depth-vs-recursions": (lambda e, t: (None, ["model.effective_layers=9"]),
                                   "set effective_layers to 8 or 11"),
    "config-vocab-below-tokenizer": (lambda e, t: (None, ["model.vocab_size=256"]),
                                     "smaller than the tokenizer's vocab size 512"),
    "config-global-batch-not-divisible": (lambda e, t: (None, ["training.global_batch_size=3"]),
                                          "global_batch_size=3 is not divisible by micro_batch_size 2"),
    "config-te-backend-on-cpu": (lambda e, t: (None, ["training.backend=te"]), "use backend 'local' on CPU"),
    # output places, checked before anything is built (mor_megatron.paths.writable_dir)
    "logging-dir-is-a-file": (lambda e, t: (None, [f"logging.dir={e['config']}"]), "is a file, not a directory"),
    "save-dir-not-writable": (lambda e, t: (None, [f"training.save_dir={e['config']}/checkpoints"]),
                              "cannot be written (Not a directory): choose a writable place"),
    # data
    "data-train-missing": (lambda e, t: (None, [f"data.train={t / 'nowhere' / 'shard'}"]), "shard file not found"),
    "data-valid-missing": (lambda e, t: (None, [f"data.valid={t / 'nowhere' / 'valid'}"]), "nowhere/valid.idx"),
    "data-empty-shard": (lambda e, t: (None, [f"data.train={_written(t / 'empty')}"]), "is empty"),
    "data-truncated-bin": (lambda e, t: (None, [f"data.train={_truncated(e['corpus'], t)}"]),
                           "(truncated or from another run)"),
    "data-idx-bin-mismatch": (lambda e, t: (None, [
        f"data.train={_copy(e['corpus']['train'], t / 'mixed', bin_from=e['corpus']['valid'])}"]), ".idx expects"),
    "data-idx-unreadable": (lambda e, t: (None, [f"data.train={_garbled_index(e['corpus'], t)}"]), "is unreadable"),
    "data-shorter-than-one-row": (lambda e, t: (None, [f"data.train={_written(t / 'short', [5, 6, 7])}"]),
                                  "fewer than one row"),
    "data-valid-too-small": (lambda e, t: (None, [f"data.valid={_written(t / 'one_row', list(range(1, 41)))}"]),
                             "fewer than micro_batch_size x dp_size = 2"),
    "data-ids-exceed-vocab": (lambda e, t: (None, ["model.vocab_size=256", "data.tokenizer=null"]),
                              "was tokenized with a vocabulary of 512 ids"),
    # no _meta.json beside it (and one that describes another corpus): the ids themselves are read
    "data-ids-exceed-vocab-no-record": (lambda e, t: (None, ["data.tokenizer=null",
                                        f"data.train={_written(t / 'norecord', [5, 600, 7] * 200)}"]),
                                        "holds token id 600, beyond model.vocab_size 512"),
    "data-ids-exceed-vocab-stale-record": (lambda e, t: (None, ["data.tokenizer=null",
                                           f"data.train={_stale_record(t, [5, 700, 7] * 200)}"]),
                                           "holds token id 700, beyond model.vocab_size 512"),
    "data-tokenizer-missing": (lambda e, t: (None, [f"data.tokenizer={t / 'no_tokenizer'}"]), "cannot load tokenizer"),
    "data-blend-not-pairs": (lambda e, t: (None, [f"data.train=0.7 {e['corpus']['train']} 0.3"]),
                             "is not weight/prefix pairs"),
    # launch environment (a world of one in this process)
    "launch-world-size-vs-tp": (lambda e, t: (None, ["parallel.tensor_model_parallel_size=2"]),
                                "world size 1 is not divisible by TP 2 x PP 1"),
}


def test_a_live_run_holds_its_directory(existing, tmp_path, capfd):
    """A second trainer on a run directory that a live process holds is refused in one line naming
    the holder; once the holder is killed (no clean exit) the directory is free again."""
    from mor_megatron.paths import RunLock
    from mor_megatron.pretrain import main

    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from mor_megatron.paths import RunLock; "
         "lock = RunLock(sys.argv[1]).__enter__(); print('held', flush=True); time.sleep(300)",
         str(existing["run_dir"])], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        before = tree_digest(existing["run_dir"])
        capfd.readouterr()
        rc = main(["--config", str(existing["config"]), f"logging.dir={existing['run_dir']}"])
        out, err = capfd.readouterr()
        one_error_line(rc, out, err, f"is in use by a live run (pid {holder.pid} on ")
        assert tree_digest(existing["run_dir"]) == before
    finally:
        holder.kill()
        holder.wait()
    with RunLock(existing["run_dir"]):  # the kernel dropped the killed holder's lock
        pass


def _pretrain_argv(existing: dict, tmp_path: Path, row: str) -> list[str]:
    config, overrides = PRETRAIN_ROWS[row][0](existing, tmp_path)
    return ["--config", config or str(existing["config"]), f"logging.dir={existing['run_dir']}", *overrides]


@pytest.mark.parametrize("row", list(PRETRAIN_ROWS))
def test_pretrain_bad_input(row, existing, tmp_path, capfd):
    from mor_megatron.pretrain import main

    if row == "config-te-backend-on-cpu" and torch.cuda.is_available():
        pytest.skip("a CUDA machine may run backend te")
    argv = _pretrain_argv(existing, tmp_path, row)
    before = tree_digest(existing["run_dir"])
    capfd.readouterr()
    rc = main(argv)
    out, err = capfd.readouterr()
    one_error_line(rc, out, err, PRETRAIN_ROWS[row][1])
    assert tree_digest(existing["run_dir"]) == before


@pytest.mark.parametrize("row", ["config-unknown-training-key", "data-truncated-bin"])
def test_debug_raises_the_error(row, existing, tmp_path):
    from mor_megatron.errors import UserError
    from mor_megatron.pretrain import main

    before = tree_digest(existing["run_dir"])
    with pytest.raises(UserError, match=PRETRAIN_ROWS[row][1].replace("(", r"\(").replace(")", r"\)")):
        main([*_pretrain_argv(existing, tmp_path, row), "--debug"])
    assert tree_digest(existing["run_dir"]) == before


# -- launch environment: real processes ----------------------------------------------------------


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS and not k.startswith("SLURM")}
    env.update(PYTHON=sys.executable, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    env.update(extra)
    return env


def _pretrain_process(existing: dict, *args: str, **env: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "mor_megatron.pretrain", "--config", str(existing["config"]),
               f"logging.dir={existing['run_dir']}", *args]
    return subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=_env(**env), timeout=180)


def test_launch_rendezvous_variables_missing(existing):
    """WORLD_SIZE=2 without MASTER_ADDR/MASTER_PORT (a multi-process world not started by torchrun)."""
    before = tree_digest(existing["run_dir"])
    result = _pretrain_process(existing, WORLD_SIZE="2", RANK="0", LOCAL_RANK="0")
    one_error_line(result.returncode, result.stdout, result.stderr, "WORLD_SIZE=2 but MASTER_ADDR, MASTER_PORT not set")
    assert tree_digest(existing["run_dir"]) == before


def test_debug_prints_the_traceback(existing):
    before = tree_digest(existing["run_dir"])
    result = _pretrain_process(existing, "training.micro_batchsize=2", "--debug")
    assert result.returncode != 0 and "Traceback (most recent call last)" in result.stderr, result.stderr[-3000:]
    assert "ConfigError: " in result.stderr and "did you mean 'micro_batch_size'" in result.stderr
    assert tree_digest(existing["run_dir"]) == before


HOSTS = {"gpu-a17": "10.20.0.17", "gpu-a18": "10.20.0.18", "gpu-b03": "10.20.1.3"}

# id -> (script, environment, phrase); the slurm rows run inside a fake 3-node allocation
LAUNCHER_ROWS = {
    "launch-torchrun-master-addr-missing": ("torchrun.sh", {"NNODES": "2", "NODE_RANK": "1"},
                                            "--master-addr (or MASTER_ADDR) is required on node rank 1 of 2"),
    "launch-torchrun-node-rank-out-of-range": ("torchrun.sh", {"NNODES": "2", "NODE_RANK": "2", "MASTER_ADDR": "10.0.0.1"},
                                               "node rank 2 is out of range for 2 node(s)"),
    "launch-slurm-nnodes-vs-nodelist": ("slurm.sbatch", {"SLURM_NNODES": "2"},
                                        "SLURM_NNODES=2 but SLURM_JOB_NODELIST='gpu-a[17-18],gpu-b03' names 3 host(s)"),
    "launch-slurm-nodelist-missing": ("slurm.sbatch", {"SLURM_JOB_NODELIST": None}, "SLURM_JOB_NODELIST is not set"),
    "launch-slurm-job-id-missing": ("slurm.sbatch", {"SLURM_JOB_ID": None}, "SLURM_JOB_ID is not set"),
}


@pytest.mark.parametrize("row", list(LAUNCHER_ROWS))
def test_launcher_bad_environment(row, existing, tmp_path):
    script, extra, phrase = LAUNCHER_ROWS[row]
    if script == "torchrun.sh":
        env = _env()
        command = ["bash", str(ROOT / "launch" / script), "--dry-run", "--", "--config", str(existing["config"]),
                   f"logging.dir={existing['run_dir']}"]
    else:
        bin_dir = install_fake_slurm(tmp_path / "fakebin", HOSTS)
        env = _env(**fake_slurm_env(bin_dir, "gpu-a[17-18],gpu-b03", 3))
        env.update(DRY_RUN="1", SLURM_SUBMIT_DIR=str(ROOT), CONFIG=str(existing["config"]),
                   RUN_DIR=str(existing["run_dir"]))
        command = ["bash", str(ROOT / "launch" / script)]
    for key, value in extra.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    before = tree_digest(existing["run_dir"])
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=env, timeout=60)
    one_error_line(result.returncode, result.stdout, result.stderr, phrase, prefix=f"{script}: error: ")
    assert result.stdout == ""
    assert tree_digest(existing["run_dir"]) == before


# -- preprocessing --------------------------------------------------------------------------------


def _jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return str(path)


def _latin1(path: Path) -> str:
    path.write_bytes("caf\xe9 au lait".encode("latin-1"))
    return str(path)


# id -> (make(tmp_path, tokenizer) -> arguments besides --output-prefix, phrase)
PREPROCESS_ROWS = {
    "preprocess-input-missing": (lambda t, tok: ["--input", str(t / "nope.jsonl"), "--tokenizer", tok],
                                 "input path not found"),
    "preprocess-non-utf8": (lambda t, tok: ["--input", _latin1(t / "latin.txt"), "--tokenizer", tok],
                            "is not UTF-8 text"),
    "preprocess-unknown-format": (lambda t, tok: ["--input", _jsonl(t / "docs.xyz", [{"text": "a"}]), "--tokenizer", tok],
                                  "unknown input format"),
    "preprocess-empty-input": (lambda t, tok: ["--input", _jsonl(t / "empty.jsonl", []), "--tokenizer", tok],
                               "input has no documents"),
    "preprocess-text-column-missing": (lambda t, tok: ["--input", _jsonl(t / "body.jsonl", [{"body": "a b"}]),
                                                       "--tokenizer", tok], "input has no column 'text'"),
    "preprocess-no-tokenizer-choice": (lambda t, tok: ["--input", _jsonl(t / "docs.jsonl", [{"text": "a"}])],
                                       "pass exactly one of --tokenizer"),
    "preprocess-validation-fraction": (lambda t, tok: ["--input", _jsonl(t / "docs.jsonl", [{"text": "a"}]),
                                                       "--tokenizer", tok, "--validation-fraction", "1.5"],
                                       "argument --validation-fraction: 1.5 is out of range: use a finite number in [0, 1)"),
}


@pytest.fixture
def previous_output(existing, tmp_path):
    """An output prefix that already holds a preprocessing run's files."""
    out = tmp_path / "out"
    out.mkdir()
    corpus = existing["corpus"]
    for split in ("train", "valid"):
        _copy(corpus[split], out / f"prev_{split}")
    shutil.copyfile(corpus["train"][: -len("_train")] + "_meta.json", out / "prev_meta.json")
    return out


@pytest.mark.parametrize("row", list(PREPROCESS_ROWS))
def test_preprocess_bad_input(row, existing, tmp_path, previous_output, capfd):
    from mor_megatron.tools.preprocess_data import main

    args = PREPROCESS_ROWS[row][0](tmp_path, existing["corpus"]["tokenizer"])
    before = tree_digest(previous_output)
    capfd.readouterr()
    # --overwrite: each row's own failure, after the clobber check, must still leave the old output whole
    try:
        rc = main([*args, "--output-prefix", str(previous_output / "prev"), "--cache-dir", str(tmp_path / "cache"),
                   "--no-progress", "--overwrite"])
    except SystemExit as exited:  # an argument outside its range: refused by the parser (cli.ToolParser)
        rc = exited.code
    out, err = capfd.readouterr()
    one_error_line(rc, out, err, PREPROCESS_ROWS[row][1])
    assert "fix:" in err or "--help)" in err
    assert tree_digest(previous_output) == before


def test_preprocess_never_clobbers_without_overwrite(existing, tmp_path, previous_output, capfd):
    """A rerun into a prefix that holds shards, or a tokenizer trained into a folder that holds
    one (shards made with the old one would silently stop matching it), is refused before any
    work; with --overwrite the new run replaces them, and a validation shard the new run does not
    write (here: none held out) goes instead of staying as a stale one from the old corpus."""
    from mor_megatron.tools.preprocess_data import main

    docs = _jsonl(tmp_path / "docs.jsonl", [{"text": f"document {i} " * 20} for i in range(30)])
    prefix, tokenizer = previous_output / "prev", existing["corpus"]["tokenizer"]
    before = tree_digest(previous_output)
    capfd.readouterr()
    assert main(["--input", docs, "--tokenizer", tokenizer, "--output-prefix", str(prefix), "--no-progress"]) == 2
    one_error_line(2, *capfd.readouterr(), "already has shards (prev_train.bin, prev_train.idx, prev_valid.bin")
    trained = tmp_path / "tok"
    shutil.copytree(tokenizer, trained)
    assert main(["--input", docs, "--train-tokenizer", "--vocab-size", "300", "--tokenizer-output", str(trained),
                 "--output-prefix", str(tmp_path / "new"), "--no-progress"]) == 2
    one_error_line(2, *capfd.readouterr(), "already holds a tokenizer")
    assert tree_digest(previous_output) == before and not list(tmp_path.glob("new_*"))
    assert main(["--input", docs, "--tokenizer", tokenizer, "--output-prefix", str(prefix), "--no-progress",
                 "--validation-fraction", "0", "--overwrite"]) == 0
    assert not (previous_output / "prev_valid.bin").exists() and not (previous_output / "prev_valid.idx").exists()
    assert json.loads((previous_output / "prev_meta.json").read_text())["documents"]["train"] == 30


def test_preprocess_debug_raises_the_error(existing, tmp_path, previous_output):
    from mor_megatron.data.errors import DataError
    from mor_megatron.tools.preprocess_data import main

    with pytest.raises(DataError, match="is not UTF-8 text"):
        main(["--input", _latin1(tmp_path / "latin.txt"), "--tokenizer", existing["corpus"]["tokenizer"],
              "--output-prefix", str(previous_output / "prev"), "--no-progress", "--debug"])


# -- handled, not an error ------------------------------------------------------------------------


def test_document_longer_than_the_sequence_is_cut_into_consecutive_rows(existing, tmp_path):
    """Documents are joined with EOS and cut into rows of SEQ + 1 tokens, so a long document is
    simply spread over consecutive rows: no error, no truncation."""
    from mor_megatron.data.dataset import PretrainingBatches
    from mor_megatron.data.shards import TokenStream, read_documents

    doc = list(range(1, 5 * SEQ + 8))  # one document of 167 tokens (+ EOS)
    stream = TokenStream(_written(tmp_path / "long", doc), SEQ)
    tokens = np.array(doc + [0])
    assert stream.num_rows == (len(tokens) - 1) // SEQ == 5
    for r in range(stream.num_rows):
        assert stream.row(r).tolist() == tokens[r * SEQ: r * SEQ + SEQ + 1].tolist()
    batches = PretrainingBatches(str(tmp_path / "long"), SEQ, 2, 4, seed=1)
    for batch in batches.next_global_batch():
        for tokens_row, labels_row in zip(batch["tokens"].tolist(), batch["labels"].tolist()):
            start = tokens_row[0] - 1
            assert tokens_row == doc[start: start + SEQ] and labels_row == (doc + [0])[start + 1: start + SEQ + 1]
    # and the existing run trained on stdlib files far longer than its sequence
    longest = max(len(d) for d in read_documents(existing["corpus"]["train"]))
    assert longest > 10 * SEQ
    losses = [json.loads(line)["train/loss"] for line in (existing["run_dir"] / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 2 and all(math.isfinite(loss) for loss in losses)

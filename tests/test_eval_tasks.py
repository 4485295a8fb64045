"""training.eval_tasks: lm-eval tasks scored by the training engine during pretraining."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from train_helpers import _free_port, launch, metrics, one_error_line, repo_root, write_config

pytest.importorskip("lm_eval")

TASK = "tiny_mc"
DOCS = [
    {"question": "def main(", "choices": ["):", "] =", "import", "class"], "answer": 0},
    {"question": "import os\nimport", "choices": [" sys", " (", " 3", " ]"], "answer": 0},
    {"question": "return", "choices": [" None", " def", " import", " ,"], "answer": 0},
    {"question": "for key, value in", "choices": [" items:", " return", " )", " class"], "answer": 0},
    {"question": "if __name__ ==", "choices": [" '__main__':", " for", " 1", " ["], "answer": 0},
    {"question": "class Foo(", "choices": ["object):", "import", " =", " return"], "answer": 0},
]
# lengths across 2..seq_length (32), an odd count: the last micro-batch is padded
LENGTHS = [32, 7, 2, 19, 11]


def make_task(folder: Path) -> Path:
    """A local multiple-choice lm-eval task (json data beside its YAML): no hub access."""
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / "docs.jsonl"
    data.write_text("".join(json.dumps(doc) + "\n" for doc in DOCS))
    (folder / f"{TASK}.yaml").write_text(
        f"task: {TASK}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: '{{question}}'\n"
        "doc_to_choice: '{{choices}}'\ndoc_to_target: '{{answer}}'\nmetric_list:\n  - metric: acc\n"
    )
    return folder


@pytest.mark.distributed
def test_eval_tasks_logged_at_each_evaluation(corpus, tmp_path):
    """eval/<task>/acc lands in metrics.jsonl at every eval_interval step and the last, not between;
    at PP=2 the logging rank (the last stage) is not the rank lm-eval returns results on."""
    config = write_config(tmp_path / "run.yaml", corpus,
                          training={"eval_interval": 2, "eval_tasks": [str(make_task(tmp_path / "tasks"))],
                                    "eval_tasks_limit": 4})
    run_dir = tmp_path / "run"
    result = launch(config, run_dir, ["parallel.pipeline_model_parallel_size=2"], nproc=2)
    rows = metrics(run_dir)
    assert [row["step"] for row in rows if f"eval/{TASK}/acc" in row] == [2, 4, 5]
    assert all(0.0 <= row[f"eval/{TASK}/acc"] <= 1.0 for row in rows if f"eval/{TASK}/acc" in row)
    assert f"step 4 lm-eval: {TASK}/acc" in result.stdout
    assert "pipeline stage 0" in result.stdout  # what the next test's early error must not reach


def test_missing_task_is_one_line_before_the_model(corpus, tmp_path):
    config = write_config(tmp_path / "run.yaml", corpus, training={"eval_tasks": [str(tmp_path / "none/")]})
    result = launch(config, tmp_path / "run", check=False)
    one_error_line(result.returncode, result.stdout, result.stderr, "task path")
    assert "pipeline stage 0" not in result.stdout  # printed once the model is built


def test_config_errors_are_one_line(tmp_path, monkeypatch):
    from mor_megatron.config import ConfigError
    from mor_megatron.errors import UserError
    from mor_megatron.training.config import load_run_config
    from mor_megatron.training.eval_tasks import check_eval_tasks

    config = write_config(tmp_path / "run.yaml", {"train": "unused"}, training={"eval_tasks": ["arc_easy"]})
    with pytest.raises(ConfigError, match="training.eval_tasks needs data.tokenizer") as caught:
        load_run_config(config)
    assert "\n" not in str(caught.value)
    # lm-eval not installed: the extra to install, in one line
    monkeypatch.setitem(sys.modules, "lm_eval", None)
    monkeypatch.delitem(sys.modules, "mor_megatron.evaluation.harness", raising=False)
    import mor_megatron.evaluation  # an earlier test's import left the submodule on the package too

    monkeypatch.delattr(mor_megatron.evaluation, "harness", raising=False)
    with pytest.raises(UserError, match=r"pip install 'mor-megatron\[eval\]'") as caught:
        check_eval_tasks(["arc_easy"])
    assert "\n" not in str(caught.value)


# -- the scorer against log_softmax of the model's own logits ---------------------------------------


@pytest.fixture(scope="module")
def reference(parallel, tmp_path_factory):
    """A run config, layout-free weights of a model of it, and that model (single process)."""
    from mor_megatron.model import MoRGPTModel
    from mor_megatron.training.config import load_run_config
    from mor_megatron.weights import save_weights

    root = tmp_path_factory.mktemp("scorer")
    config = write_config(root / "run.yaml", {"train": "unused"})
    torch.manual_seed(3)
    model = MoRGPTModel(load_run_config(config).model)
    save_weights(model, str(root / "weights"))
    generator = torch.Generator().manual_seed(5)
    sequences = [torch.randint(0, model.config.vocab_size, (n,), generator=generator).tolist() for n in LENGTHS]
    (root / "sequences.json").write_text(json.dumps(sequences))
    return config, root, model.eval(), sequences


@torch.no_grad()
def expected_scores(model, sequences: list[list[int]]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each sequence alone (no padding), threshold routing, log_softmax in float64."""
    device = next(model.parameters()).device
    out = []
    for sequence in sequences:
        tokens = torch.tensor([sequence], device=device)
        positions = torch.arange(len(sequence), device=device).unsqueeze(0)
        logits = model(tokens, positions, None, extra_block_kwargs={"routing_mode": "threshold"})[0, :-1]
        logprobs = torch.log_softmax(logits.double(), dim=-1)
        targets = tokens[0, 1:]
        out.append((logprobs.gather(-1, targets[:, None])[:, 0].cpu(), (logprobs.argmax(-1) == targets).cpu()))
    return out


def assert_same_scores(got, want) -> None:
    assert len(got) == len(want)
    for (logprobs, greedy), (ref_logprobs, ref_greedy) in zip(got, want):
        assert logprobs.dtype == torch.float64 and greedy.dtype == torch.bool
        torch.testing.assert_close(logprobs, ref_logprobs, rtol=0, atol=1e-5)
        assert torch.equal(greedy, ref_greedy)


def test_engine_scorer_matches_log_softmax(reference):
    from mor_megatron.training.config import load_run_config
    from mor_megatron.training.eval_tasks import EngineScorer
    from mor_megatron.training.loop import build_model
    from mor_megatron.training.optimizer import build_engine
    from mor_megatron.training.schedule import evaluation_mode
    from mor_megatron.weights import load_weights

    config, root, model, sequences = reference
    run = load_run_config(config)
    trained, _, _ = build_model(run)
    load_weights(trained, str(root / "weights"))
    engine = build_engine(trained, run.training, run.training.micro_batch_size, 1)
    with evaluation_mode(engine.module):
        got = EngineScorer(engine, run.training.micro_batch_size)(sequences)
    assert_same_scores(got, expected_scores(model, sequences))


@pytest.mark.distributed
def test_engine_scorer_tp2_pp2_matches_log_softmax(reference, tmp_path):
    """TP=2 x PP=2 (4 gloo processes): the last stage gathers the vocab shards and scores, every rank of
    the first stage gets the same results."""
    config, root, model, sequences = reference
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "4", "--master_port",
               str(_free_port()), "tests/eval_tasks_worker.py", str(config), str(root / "weights"),
               str(root / "sequences.json"), str(tmp_path), "parallel.pipeline_model_parallel_size=2", "parallel.tensor_model_parallel_size=2"]
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env, cwd=repo_root())
    assert done.returncode == 0, done.stderr[-4000:]
    want = expected_scores(model, sequences)
    for rank in range(4):
        assert_same_scores(torch.load(tmp_path / f"rank{rank}.pt"), want)

"""lm-evaluation-harness on a checkpoint (mor_megatron/evaluation, tools/evaluate.py), offline on a
local multiple-choice task: lm-eval's per-choice log-likelihoods and rolling log-likelihoods equal
the log-softmax of the project's own model logits (threshold routing, one unpadded sequence at a
time) on the same tokens; `mor-eval` writes JSON and a table; bad input is one line each."""

import json

import pytest
import torch

from model_helpers import build, tiny_config
from mor_megatron.data.tokenizer import TextTokenizer
from mor_megatron.weights import save_weights
from mor_megatron.yaml_config import dump_model_config

pytest.importorskip("lm_eval")
from lm_eval.api.instance import Instance  # noqa: E402

from mor_megatron.evaluation.harness import MoRLM, evaluate_tasks, flat_metrics  # noqa: E402
from mor_megatron.evaluation.scoring import ModelScorer  # noqa: E402
from mor_megatron.tools import evaluate  # noqa: E402

TEXTS = ["the cat sat on the mat.\n", "a dog ran in the park.\n", "birds fly over the sea.\n"] * 20
DOCS = [
    {"question": "the cat sat on the", "choices": [" mat.", " sea over the park", " dog"], "answer": 0},
    {"question": "a dog ran in", "choices": [" the park.", " birds", " the cat sat on the mat"], "answer": 0},
    {"question": "birds fly", "choices": [" over the sea.", " mat", " in"], "answer": 0},
    {"question": "the dog sat", "choices": [" on the mat.", " fly", " the sea ran in the park over"], "answer": 0},
]
TASK = """task: tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
  - metric: acc_norm
"""


@pytest.fixture(scope="module")
def setup(parallel, tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    tokenizer = TextTokenizer.train(TEXTS, vocab_size=300, output_dir=str(root / "tokenizer"))
    config = tiny_config(vocab_size=320, seq_length=16)  # expert-choice, Nr=3: capacities 1, 2/3, 1/3
    model = build(config, seed=5).eval()
    step = root / "checkpoints" / "step_00000010"
    save_weights(model, str(step / "universal"))
    meta = {"config": {"model": dump_model_config(config), "data": {"tokenizer": str(root / "tokenizer")}},
            "format": 1, "tag": step.name, "train_state": {}, "layout": {}, "model_hash": "", "files": {}}
    (step / "meta.json").write_text(json.dumps(meta))
    tasks = root / "tasks"
    tasks.mkdir()
    (tasks / "data.jsonl").write_text("".join(json.dumps(doc) + "\n" for doc in DOCS))
    (tasks / "tiny_mc.yaml").write_text(TASK.format(data=tasks / "data.jsonl"))
    return root, step, model, tokenizer, tasks


@torch.no_grad()
def reference_logprob(model, context: list[int], continuation: list[int]) -> float:
    """sum log p(continuation | context) from one unpadded forward of the model in threshold routing."""
    tokens = torch.tensor([context + continuation])
    inputs, targets = tokens[:, :-1], tokens[0, 1:]
    positions = torch.arange(inputs.shape[1]).unsqueeze(0)
    logits = model(inputs, positions, None, extra_block_kwargs={"routing_mode": "threshold"})[0]
    logprobs = torch.log_softmax(logits.double(), dim=-1)[torch.arange(len(targets)), targets]
    return float(logprobs[-len(continuation):].sum())


def test_choice_loglikelihoods_match_the_model(setup):
    """Batched (right-padded, 4 rows), sorted and regrouped by lm-eval; each choice's score must be
    the model's own log-likelihood of it (shown failing with top-k routing in the scorer, and with
    the continuation's slice shifted by one)."""
    _, _, model, tokenizer, tasks = setup
    lm = MoRLM(ModelScorer(model, max_rows=4), tokenizer, batch_size=4)
    results = evaluate_tasks(lm, [str(tasks)], log_samples=True)
    samples = results["samples"]["tiny_mc"]
    assert len(samples) == len(DOCS)
    for sample in samples:
        for (context, continuation), response in zip(sample["arguments"], sample["resps"], strict=True):
            context_ids = tokenizer.encode_batch([context])[0]
            continuation_ids = tokenizer.encode_batch([context + continuation])[0][len(context_ids):]
            assert response[0][0] == pytest.approx(reference_logprob(model, context_ids, continuation_ids), abs=1e-4)
    metrics = flat_metrics(results)
    assert set(metrics) == {f"eval/tiny_mc/{m}" for m in ("acc", "acc_stderr", "acc_norm", "acc_norm_stderr")}
    assert 0.0 <= metrics["eval/tiny_mc/acc"] <= 1.0


def test_rolling_loglikelihood_of_a_long_text_matches_the_model(setup):
    """A text of several windows (seq_length 16): each token scored once, the first after EOS,
    later ones with lm-eval's rolling context; the sum must equal the model's window by window."""
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    _, _, model, tokenizer, _ = setup
    text = "".join(TEXTS[:12])
    ids = tokenizer.encode_batch([text])[0]
    assert len(ids) > 2 * model.config.seq_length
    lm = MoRLM(ModelScorer(model, max_rows=3), tokenizer, batch_size=3)
    request = Instance(request_type="loglikelihood_rolling", doc={}, arguments=(text,), idx=0)
    short = Instance(request_type="loglikelihood_rolling", doc={}, arguments=("the cat",), idx=0)
    total, short_total = lm.loglikelihood_rolling([request, short])
    windows = [make_disjoint_window(w) for w in get_rolling_token_windows(ids, tokenizer.eos_id, 15, 1)]
    assert sum(len(continuation) for _, continuation in windows) == len(ids)
    assert total == pytest.approx(sum(reference_logprob(model, c, t) for c, t in windows), abs=1e-4)
    cat = tokenizer.encode_batch(["the cat"])[0]
    assert short_total == pytest.approx(reference_logprob(model, [tokenizer.eos_id], cat), abs=1e-4)


def test_mor_eval_writes_json_and_a_table(setup, tmp_path, capsys):
    _, step, _, _, tasks = setup
    out = tmp_path / "results.json"
    argv = ["--checkpoint", str(step.parent), "--tasks", str(tasks / "tiny_mc.yaml"), "--batch-size", "5",
            "--output", str(out)]
    assert evaluate.main(argv) == 0
    shown = capsys.readouterr().out
    assert "tiny_mc" in shown and "acc_norm" in shown and "|" in shown
    saved = json.loads(out.read_text())
    assert set(saved["results"]["tiny_mc"]) >= {"acc,none", "acc_norm,none"}
    assert saved["config"]["model"].startswith("mor-megatron:")
    # a named task from --include-path evaluates that task only; --overwrite replaces the file
    assert evaluate.main(["--checkpoint", str(step), "--tasks", "tiny_mc", "--include-path", str(tasks),
                          "--limit", "2", "--output", str(out), "--overwrite"]) == 0
    assert json.loads(out.read_text())["config"]["limit"] == 2


def _bad_inputs(step, tasks, tmp_path):
    (tmp_path / "gen.yaml").write_text(TASK.format(data=tasks / "data.jsonl").replace(
        "tiny_mc", "tiny_gen").replace("output_type: multiple_choice", "output_type: generate_until"))
    bare = tmp_path / "bare" / "step_00000010"  # a checkpoint whose run names no tokenizer
    bare.mkdir(parents=True)
    (bare / "universal").symlink_to(step / "universal")
    meta = json.loads((step / "meta.json").read_text())
    meta["config"]["data"] = {}
    (bare / "meta.json").write_text(json.dumps(meta))
    (tmp_path / "taken.json").write_text("{}")
    ok = ["--checkpoint", str(step), "--tasks", str(tasks)]
    return [
        (["--checkpoint", str(step), "--tasks", "no_such_task_xyz"], "unknown lm-eval task 'no_such_task_xyz'"),
        (["--checkpoint", str(step), "--tasks", str(tmp_path / "missing")], "not found"),
        (["--checkpoint", str(step), "--tasks", str(tmp_path / "gen.yaml")], "generate_until"),
        (["--checkpoint", str(bare), "--tasks", str(tasks)], "no tokenizer"),
        ([*ok, "--output", str(tmp_path / "taken.json")], "--overwrite"),
        ([*ok, "--include-path", str(tmp_path / "nowhere")], "not a folder"),
    ]


def test_bad_inputs_are_one_line(setup, tmp_path, capsys):
    _, step, _, _, tasks = setup
    for argv, expected in _bad_inputs(step, tasks, tmp_path):
        assert evaluate.main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("error: ") and expected in err, (argv, err)
    assert (tmp_path / "taken.json").read_text() == "{}"


def test_scores_equal_lm_eval_hf_model_on_the_export(setup, tmp_path):
    """An independent scorer: the same checkpoint exported to Hugging Face (`hf.export`, remote
    code) and evaluated by lm-eval's own `hf` model (its tokenisation, batching and truncation)
    gives every choice the log-likelihood `MoRLM` gives it (1e-4)."""
    import yaml
    from lm_eval.evaluator import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from mor_megatron.hf.export import export

    root, step, model, tokenizer, tasks = setup
    run_yaml = tmp_path / "run.yaml"
    run_yaml.write_text(yaml.safe_dump({"model": json.loads((step / "meta.json").read_text())["config"]["model"],
                                        "data": {"tokenizer": str(root / "tokenizer")}}))
    out = export(str(step / "universal"), str(tmp_path / "hf"), config=str(run_yaml), log=lambda message: None)
    hf = HFLM(pretrained=str(out), trust_remote_code=True, device="cpu", dtype="float32", batch_size=4)
    theirs = simple_evaluate(model=hf, tasks=["tiny_mc"], task_manager=TaskManager(include_path=str(tasks)),
                             log_samples=True)["samples"]["tiny_mc"]
    ours = evaluate_tasks(MoRLM(ModelScorer(model, max_rows=4), tokenizer, batch_size=4), [str(tasks)],
                          log_samples=True)["samples"]["tiny_mc"]
    scores = {}
    for name, samples in (("ours", ours), ("theirs", theirs)):
        scores[name] = {(s["doc_id"], i): r[0][0] for s in samples for i, r in enumerate(s["resps"])}
    assert scores["ours"].keys() == scores["theirs"].keys() and len(scores["ours"]) == 3 * len(DOCS)
    for key, value in scores["ours"].items():
        assert value == pytest.approx(scores["theirs"][key], abs=1e-4), key

"""The inference CLIs on a small checkpoint folder: tools/generate.py, tools/show_depth.py,
tools/bench_decode.py (tiny shapes), and checkpoint loading."""

import json
import re

import pytest
import torch

from model_helpers import build, tiny_config
from mor_megatron.data.tokenizer import TextTokenizer
from mor_megatron.inference import Engine, SamplingParams
from mor_megatron.inference.loading import LoadError, load_model
from mor_megatron.weights import save_weights
from mor_megatron.yaml_config import dump_model_config
from mor_megatron.tools import bench_decode, generate, show_depth

TEXTS = ["def add(a, b):\n    return a + b\n", "for item in items:\n    print(item)\n"] * 20


@pytest.fixture(scope="module")
def checkpoint(parallel, tmp_path_factory):
    root = tmp_path_factory.mktemp("inference_ckpt")
    tokenizer = TextTokenizer.train(TEXTS, vocab_size=300, output_dir=str(root / "tokenizer"))
    config = tiny_config(vocab_size=320, seq_length=48)
    model = build(config, seed=3)
    step = root / "checkpoints" / "step_00000010"
    save_weights(model, str(step / "universal"))
    # what loading reads, plus the keys every complete checkpoint's meta.json has (checkpoint_files.META_KEYS)
    meta = {"config": {"model": dump_model_config(config), "data": {"tokenizer": str(root / "tokenizer")}},
            "format": 1, "tag": step.name, "train_state": {}, "layout": {}, "model_hash": "", "files": {}}
    (step / "meta.json").write_text(json.dumps(meta))
    return root, step, model, tokenizer


def test_load_model_restores_the_weights(checkpoint):
    root, step, model, _ = checkpoint
    loaded, directory, meta = load_model(root / "checkpoints")  # the folder resolves to its step
    assert directory == step and meta["config"]["model"]["vocab_size"] == 320
    tokens = torch.randint(0, 320, (1, 12))
    positions = torch.arange(12).unsqueeze(0)
    with torch.no_grad():
        torch.testing.assert_close(loaded(tokens, positions, None), model.eval()(tokens, positions, None))
    with pytest.raises(LoadError, match="not a directory"):
        load_model(root / "missing")


def test_generate_cli(checkpoint, tmp_path, capsys):
    root, step, model, tokenizer = checkpoint
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("def add(a, b):\nfor item in\n")
    out = tmp_path / "out.jsonl"
    code = generate.main(["--checkpoint", str(step), "--prompts", str(prompts), "--greedy", "--max-tokens", "6",
                          "--output", str(out), "--max-batch", "2"])
    assert code == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["prompt"] for r in records] == ["def add(a, b):", "for item in"]
    # the CLI's tokens are the engine's greedy tokens on the same weights
    ids = tokenizer.encode_batch(["def add(a, b):", "for item in"])
    expected = Engine(model, max_batch=1, max_seq=48).generate(
        ids, SamplingParams(max_tokens=6, stop_token_ids=(tokenizer.eos_id,))
    )
    assert [r["token_ids"] for r in records] == [c.token_ids for c in expected]
    assert all(1 <= r["mean_depth"] <= 3 for r in records)
    assert "tok/s" in capsys.readouterr().err
    # sampling, a stop text and token-id prompts
    ids_file = tmp_path / "ids.txt"
    ids_file.write_text("5 6 7 8\n")
    assert generate.main(["--checkpoint", str(step), "--prompts", str(ids_file), "--token-ids",
                          "--temperature", "0.8", "--top-p", "0.9", "--max-tokens", "4"]) == 0
    assert generate.main(["--checkpoint", str(step), "--prompts", str(prompts), "--stop", "e",
                          "--max-tokens", "8"]) == 0
    assert generate.main(["--checkpoint", str(root / "missing"), "--prompts", str(prompts)]) == 2
    # an inline prompt (as the trainer's closing message prints it) decodes like the file's line
    inline = tmp_path / "inline.jsonl"
    assert generate.main(["--checkpoint", str(step), "--prompt", "def add(a, b):", "--greedy", "--max-tokens", "6",
                          "--output", str(inline)]) == 0
    assert json.loads(inline.read_text())["token_ids"] == records[0]["token_ids"]


BAD_PROMPTS = {  # file name, bytes, extra arguments, what the one line says
    "missing": ("absent.txt", None, [], "not found: check the path"),
    "binary": ("blob.txt", b"\x80\x81\xfe\xff", [], "is not a UTF-8 text file"),
    "jsonl-not-json": ("p.jsonl", b'{"prompt": "a"}\n{oops\n', [], 'line 2 is not a JSON object with a string "prompt"'),
    "jsonl-no-key": ("p.jsonl", b'{"text": "a"}\n', [], 'line 1 is not a JSON object with a string "prompt"'),
    "ids-not-integers": ("ids.txt", b"5 six 7\n", ["--token-ids"], "is not whitespace-separated token ids"),
    "ids-beyond-vocab": ("ids.txt", b"5 320\n", ["--token-ids"], "token id 320 outside the model's vocabulary [0, 320)"),
    "ids-negative": ("ids.txt", b"-1 4\n", ["--token-ids"], "token id -1 outside"),
    "empty-prompt": (None, None, ["--prompt", ""], "prompt 1 has no tokens"),
    "output-is-a-folder": ("ok.txt", b"def\n", ["--output", "."], "is a directory: give a file path"),
}


@pytest.mark.parametrize("case", list(BAD_PROMPTS))
def test_generate_bad_prompts_are_one_line(checkpoint, tmp_path, capsys, case):
    """Before: tracebacks (JSON errors, KeyError, int(), IndexError in the embedding) or a hang."""
    root, step, _, _ = checkpoint
    name, data, extra, phrase = BAD_PROMPTS[case]
    argv = ["--checkpoint", str(step), *extra]
    if name is not None:
        if data is not None:
            (tmp_path / name).write_bytes(data)
        argv += ["--prompts", str(tmp_path / name)]
    if "--output" in extra:
        argv[argv.index(".")] = str(tmp_path)
    capsys.readouterr()
    assert generate.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and phrase in err, err


def test_show_depth_writes_html_and_png(checkpoint, tmp_path, capsys):
    from PIL import Image

    _, step, _, _ = checkpoint
    prefix = tmp_path / "depth"
    code = show_depth.main(["--checkpoint", str(step), "--text", "def add(a, b):\n    return a", "--generate", "4",
                            "--output", str(prefix)])
    assert code == 0
    page = (tmp_path / "depth.html").read_text()
    assert page.count('class="t"') > 10 and "depth 3" in page
    with Image.open(tmp_path / "depth.png") as image:
        assert image.size[0] > 100 and image.size[1] > 20
    assert "wrote" in capsys.readouterr().out


def test_bench_decode_tiny(parallel, capsys):
    code = bench_decode.main([
        "--hidden", "64", "--ffn", "128", "--vocab", "256", "--effective-layers", "5", "--recursions", "3",
        "--batch", "2", "--prompt-len", "4", "--gen-len", "3", "--memory-budget-mib", "4", "--max-batch-cap", "3",
        "--static", "--routing", "spread",  # spread: every tick's step shares fit the static places
        "--host-work",
    ])
    assert code == 0
    out = capsys.readouterr().out
    assert "fixed batch" in out and "max batch in 4 MiB" in out
    assert "static decode tick, eager, fixed batch 2" in out and "overflowed" not in out
    assert out.count("MoR-3") >= 3 and "transformers generate()" in out and "equal greedy tokens 100.0%" in out
    # --host-work: each model's run split into its decode layers and the rest, both positive
    split = re.findall(r"^  (vanilla|MoR-3) +run +([\d.]+), layers +([-\d.]+), rest +([\d.]+) ", out, re.M)
    assert [name for name, *_ in split] == ["vanilla", "MoR-3"], out
    assert all(float(rest) > 0 for *_, rest in split) and "layers alone" in out and "rest allowed for it" in out


def test_bench_decode_identity_layers_skip_the_layers(parallel):
    """`--host-work`'s runs: the same tokens fed and decoded, but no decode layer runs (no KV
    entry is written), so what they time is the rest of the engine."""
    args = bench_decode.build_parser().parse_args(["--hidden", "64", "--ffn", "128", "--vocab", "256",
                                                   "--effective-layers", "5", "--prompt-len", "4", "--gen-len", "3"])
    model = build(bench_decode.make_config(args, 3))
    prompts = [[1, 2, 3, 4], [5, 6, 7, 8]]
    device = next(model.parameters()).device
    full = bench_decode.run_engine(model, prompts, args, 2, "MoR-3", device)
    rest = bench_decode.run_engine(model, prompts, args, 2, "MoR-3", device, identity_layers=True)
    assert full.tokens == rest.tokens == 2 * args.gen_len
    assert full.peak_kv_bytes > 0 and rest.peak_kv_bytes == 0


def test_bench_decode_refuses_cuda_graphs_alone(capsys):
    assert bench_decode.main(["--cuda-graphs", "--static"]) == 2
    assert capsys.readouterr().err.strip() == "error: --cuda-graphs applies to the compiled static tick: add --static --compile"

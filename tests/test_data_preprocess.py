"""Preprocessing: corpus -> tokenizer -> megatron shards, and the CLI's one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mor_megatron.tools.preprocess_data import main

REPO = Path(__file__).resolve().parents[1]
WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu café 日本 naïve".split()


def make_docs(n: int = 48) -> list[str]:
    """Unique, deterministic documents of varied length (with non-ASCII text)."""
    rng = np.random.default_rng(0)
    docs = []
    for i in range(n):
        words = [WORDS[j] for j in rng.integers(0, len(WORDS), size=int(rng.integers(5, 120)))]
        docs.append(f"document {i}: " + " ".join(words) + ("\n\n    indented line" if i % 3 == 0 else ""))
    return docs


def write_jsonl(path: Path, texts: list[str], key: str = "text") -> Path:
    path.write_text("".join(json.dumps({key: t, "id": i}) + "\n" for i, t in enumerate(texts)), "utf-8")
    return path


def run_cli(*args: str, cache: Path) -> int:
    return main([*args, "--cache-dir", str(cache), "--no-progress"])


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A jsonl corpus preprocessed with a locally trained tokenizer (workers=1)."""
    root = tmp_path_factory.mktemp("corpus")
    docs = make_docs()
    src = write_jsonl(root / "docs.jsonl", docs)
    prefix = root / "out" / "toy"
    rc = run_cli("--input", str(src), "--output-prefix", str(prefix), "--train-tokenizer",
                 "--vocab-size", "320", "--validation-fraction", "0.2", "--seed", "3",
                 cache=root / "cache")
    assert rc == 0
    tok = str(root / "out" / "tokenizer")
    return {"root": root, "docs": docs, "src": src, "prefix": str(prefix), "tok": tok}


def test_shards_hold_every_document_once_joined_by_eos(corpus, capsys):
    from transformers import AutoTokenizer

    from mor_megatron.data.shards import read_documents

    tok = AutoTokenizer.from_pretrained(corpus["tok"])
    eos = tok.eos_token_id
    assert tok.eos_token == "<|endoftext|>"
    split_docs = {s: read_documents(f"{corpus['prefix']}_{s}") for s in ("train", "valid")}
    texts = {}
    for split, docs in split_docs.items():
        assert docs, f"{split} split is empty"
        for d in docs:
            assert d[-1] == eos and (d[:-1] != eos).all()  # EOS ends every document, only there
        texts[split] = [tok.decode(d[:-1].tolist()) for d in docs]
    # held out by document: the splits are disjoint and together are the input, in order
    assert not set(texts["train"]) & set(texts["valid"])
    assert sorted(texts["train"] + texts["valid"]) == sorted(corpus["docs"])
    assert texts["train"] == [d for d in corpus["docs"] if d in set(texts["train"])]
    meta = json.loads(Path(corpus["prefix"] + "_meta.json").read_text())
    assert meta["vocab_size"] == len(tok) and meta["eos_id"] == eos
    assert meta["documents"]["train"] + meta["documents"]["valid"] == len(corpus["docs"])


def test_reader_serves_the_preprocessed_shards(corpus):
    from mor_megatron.data.dataset import PretrainingBatches, ValidationBatches

    train = PretrainingBatches(corpus["prefix"] + "_train", seq_length=8, micro_batch_size=2,
                               global_batch_size=4, seed=1)
    batch = next(train)
    assert batch["tokens"].shape == (2, 8) and int(batch["tokens"].max()) < 320
    val = ValidationBatches(corpus["prefix"] + "_valid", seq_length=8, micro_batch_size=2)
    assert len(val) >= 1 and next(iter(val))["labels"].shape == (2, 8)


def test_output_identical_for_any_worker_count_and_chunking(corpus, tmp_path):
    prefix = tmp_path / "w2"
    rc = run_cli("--input", str(corpus["src"]), "--output-prefix", str(prefix), "--tokenizer",
                 corpus["tok"], "--validation-fraction", "0.2", "--seed", "3", "--workers", "2",
                 "--chunk-size", "5", cache=tmp_path / "cache")
    assert rc == 0
    for name in ("train.bin", "train.idx", "valid.bin", "valid.idx"):
        expected = Path(f"{corpus['prefix']}_{name}").read_bytes()
        assert Path(f"{prefix}_{name}").read_bytes() == expected, name


def test_shards_equal_megatron_builder_over_direct_tokenization(corpus, tmp_path, capsys):
    """Our writer and batched encoder against independent parts: ids from `tokenizers` itself
    (plain `encode_batch`), split by `validation_flags`, empty documents skipped, written by
    megatron-core's own `IndexedDatasetBuilder`: the same bytes, .bin and .idx."""
    from tokenizers import Tokenizer

    from mor_megatron.data.preprocess import validation_flags
    from mor_megatron.data.shards import _indexed_dataset_module

    docs = corpus["docs"][:30]
    docs = docs[:4] + ["", ""] + docs[4:17] + [""] + docs[17:]
    src = write_jsonl(tmp_path / "e.jsonl", docs)
    prefix = tmp_path / "ours"
    rc = run_cli("--input", str(src), "--output-prefix", str(prefix), "--tokenizer", corpus["tok"],
                 "--validation-fraction", "0.2", "--seed", "3", "--workers", "2", "--chunk-size", "7",
                 cache=tmp_path / "cache")
    assert rc == 0
    backend = Tokenizer.from_file(str(Path(corpus["tok"]) / "tokenizer.json"))
    eos = backend.token_to_id("<|endoftext|>")
    ids = [e.ids for e in backend.encode_batch(docs, add_special_tokens=False)]
    mod = _indexed_dataset_module()
    builders = {s: mod.IndexedDatasetBuilder(str(tmp_path / f"ref_{s}.bin"), dtype=np.uint16)
                for s in ("train", "valid")}
    for tokens, held_out in zip(ids, validation_flags(3, 0.2)):
        if tokens:
            split = "valid" if held_out else "train"
            builders[split].add_document(np.array(tokens + [eos]), [len(tokens) + 1])
    for split, builder in builders.items():
        builder.finalize(str(tmp_path / f"ref_{split}.idx"))
        assert builder.sequence_lengths, split  # both splits hold documents: no last-document move
        for ext in ("bin", "idx"):
            ours, ref = Path(f"{prefix}_{split}.{ext}"), tmp_path / f"ref_{split}.{ext}"
            assert ours.read_bytes() == ref.read_bytes(), ext
    assert "(skipped empty: 3)" in capsys.readouterr().out


def test_plain_tokenizer_folder_loads_without_transformers_and_encodes_the_same(corpus, tmp_path):
    import shutil

    from mor_megatron.data.tokenizer import TextTokenizer, _auto_tokenizer

    plain = TextTokenizer.from_pretrained(corpus["tok"])
    assert plain._hf is None and plain.backend is not None  # loaded by `tokenizers` alone
    hf = TextTokenizer.from_hf(_auto_tokenizer(corpus["tok"]), corpus["tok"])
    assert (plain.eos_id, plain.vocab_size) == (hf.eos_id, hf.vocab_size)
    texts = corpus["docs"] + ["", "café <|endoftext|> 日本"]
    assert plain.encode_batch(texts) == hf.hf(texts, add_special_tokens=False)["input_ids"]
    flat, lengths = plain.encode_arrays(texts)
    assert flat.tolist() == [t for x in hf.encode_batch(texts) for t in x] and lengths[-2] == 0
    # a config with keys transformers acts on is loaded by transformers
    other = tmp_path / "tok"
    shutil.copytree(corpus["tok"], other)
    config = json.loads((other / "tokenizer_config.json").read_text())
    (other / "tokenizer_config.json").write_text(json.dumps({**config, "add_prefix_space": True}))
    assert TextTokenizer.from_pretrained(str(other))._hf is not None


def test_split_is_deterministic_by_seed():
    from mor_megatron.data.preprocess import validation_flags

    def take(seed: int, n: int = 5000) -> list[bool]:
        flags = validation_flags(seed, 0.1)
        return [next(flags) for _ in range(n)]

    assert take(1) == take(1) and take(1) != take(2)
    assert 0.08 < np.mean(take(1)) < 0.12


def test_stdlib_corpus_small_cap(tmp_path):
    from mor_megatron.data.corpus import stdlib_documents, stdlib_files, write_stdlib_jsonl
    from mor_megatron.data.shards import read_documents

    assert not any("site-packages" in p for p in stdlib_files())
    first = list(stdlib_documents(max_documents=6))
    assert first == list(stdlib_documents(max_documents=6)) and len(first) == 6
    assert len(list(stdlib_documents(max_bytes=1))) == 1
    assert write_stdlib_jsonl(str(tmp_path / "s.jsonl"), max_documents=3) == 3

    prefix = tmp_path / "std"
    rc = run_cli("--input", "stdlib", "--output-prefix", str(prefix), "--train-tokenizer",
                 "--vocab-size", "400", "--max-documents", "12", "--validation-fraction", "0.1",
                 cache=tmp_path / "cache")
    assert rc == 0
    docs = read_documents(f"{prefix}_train") + read_documents(f"{prefix}_valid")
    assert len(docs) == 12
    assert (tmp_path / "tokenizer" / "tokenizer.json").is_file()


def test_parquet_and_text_inputs(corpus, tmp_path):
    import datasets

    from mor_megatron.data.shards import read_documents

    docs = corpus["docs"][:6]
    datasets.Dataset.from_dict({"body": docs}).to_parquet(str(tmp_path / "d.parquet"))
    for i, d in enumerate(docs):
        (tmp_path / f"t{i}.txt").write_text(d, "utf-8")
    for name, args in (("pq", ["--input", str(tmp_path / "d.parquet"), "--text-key", "body"]),
                       ("txt", ["--input", str(tmp_path / "t*.txt")])):
        rc = run_cli(*args, "--output-prefix", str(tmp_path / name), "--tokenizer", corpus["tok"],
                     "--validation-fraction", "0", cache=tmp_path / "cache")
        assert rc == 0
        assert len(read_documents(str(tmp_path / f"{name}_train"))) == 6  # text: one doc per file
        assert not (tmp_path / f"{name}_valid.bin").exists()


def test_in_process_errors_name_the_problem(corpus, tmp_path, capsys):
    src = write_jsonl(tmp_path / "k.jsonl", ["a", "b"], key="body")
    assert run_cli("--input", str(src), "--output-prefix", str(tmp_path / "o"), "--tokenizer",
                   corpus["tok"], cache=tmp_path / "cache") == 2
    assert "no column 'text'" in capsys.readouterr().err
    blank = write_jsonl(tmp_path / "blank.jsonl", ["", ""])
    assert run_cli("--input", str(blank), "--output-prefix", str(tmp_path / "o"), "--tokenizer",
                   corpus["tok"], cache=tmp_path / "cache") == 2
    err = capsys.readouterr().err
    assert "no documents" in err and not list(tmp_path.glob("o_*"))  # partial files removed
    assert run_cli("--input", str(corpus["src"]), "--output-prefix", str(tmp_path / "o"), "--tokenizer",
                   str(tmp_path / "nope"), cache=tmp_path / "cache") == 2
    assert "cannot load tokenizer" in capsys.readouterr().err


def check_cli_error(tmp_path: Path, *args: str, expect: str) -> str:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_CACHE=str(tmp_path / "hf"))
    proc = subprocess.run(
        [sys.executable, str(REPO / "tools" / "preprocess_data.py"), *args],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120,
    )
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode != 0
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr and expect in lines[0] and "fix:" in lines[0], lines[0]
    return lines[0]


TOKENIZER_ARGS = ("--train-tokenizer", "--vocab-size", "300")


def test_cli_missing_input_path(tmp_path):
    line = check_cli_error(tmp_path, "--input", "missing/docs.jsonl", "--output-prefix", "o",
                           *TOKENIZER_ARGS, expect="input path not found")
    assert "missing/docs.jsonl" in line


def test_cli_empty_input(tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    check_cli_error(tmp_path, "--input", "empty.jsonl", "--output-prefix", "o", *TOKENIZER_ARGS,
                    expect="no documents")


def test_cli_output_dir_not_writable(tmp_path):
    write_jsonl(tmp_path / "d.jsonl", ["x"])
    (tmp_path / "afile").write_text("")
    check_cli_error(tmp_path, "--input", "d.jsonl", "--output-prefix", "afile/sub/o", *TOKENIZER_ARGS,
                    expect="output directory is not writable")


def test_cli_non_utf8_file(tmp_path):
    (tmp_path / "latin.txt").write_bytes("caf\xe9 au lait".encode("latin-1"))
    line = check_cli_error(tmp_path, "--input", "latin.txt", "--output-prefix", "o", *TOKENIZER_ARGS,
                           expect="not UTF-8")
    assert "latin.txt" in line


def test_cli_unknown_input_format(tmp_path):
    (tmp_path / "d.xyz").write_text("hello")
    check_cli_error(tmp_path, "--input", "d.xyz", "--output-prefix", "o", *TOKENIZER_ARGS,
                    expect="unknown input format")
    check_cli_error(tmp_path, "--input", "d.xyz", "--input-format", "yaml", "--output-prefix", "o",
                    *TOKENIZER_ARGS, expect="unknown --input-format")

"""Preprocessing pipeline: documents -> (trained or loaded) tokenizer -> train/valid shards.

Documents are tokenized in fixed-size chunks, in order, by `workers` processes (a bounded window
of chunks in flight, so streaming input is never read ahead unboundedly); the output is therefore
identical for any worker count. Document i goes to validation when the i-th draw of
`numpy.random.default_rng(seed)` is below `validation_fraction` (held out by document,
independent of chunking). If that leaves a split empty while the other has >= 2 documents, the
last document moves over, so a small corpus still gets a validation shard.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import tempfile
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Optional

import numpy as np

from mor_megatron.data.errors import DataError
from mor_megatron.data.sources import InputSpec, iter_texts, resolve_inputs

_FLAG_BLOCK = 4096


@dataclass
class PreprocessConfig:
    """Settings of one preprocessing run (mirrors tools/preprocess_data.py's flags)."""

    inputs: list[str]
    output_prefix: str
    input_format: str = "auto"
    text_key: str = "text"
    tokenizer: Optional[str] = None
    train_tokenizer: bool = False
    vocab_size: Optional[int] = None
    tokenizer_output: Optional[str] = None
    validation_fraction: float = 0.01
    seed: int = 1234
    workers: int = 1
    chunk_size: int = 256
    streaming: bool = False
    max_documents: Optional[int] = None
    max_bytes: Optional[int] = None
    cache_dir: Optional[str] = None
    text_sample_by: str = "document"
    hub_config: Optional[str] = None
    split: str = "train"
    progress: Optional[bool] = None  # None: show when stderr is a terminal


@dataclass
class PreprocessSummary:
    """What a run wrote."""

    documents: dict[str, int]
    tokens: dict[str, int]
    skipped_empty: int
    files: list[str]
    tokenizer: str
    vocab_size: int
    eos_id: int
    token_dtype: str
    notes: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        """Human-readable summary."""
        out = [
            f"documents: train {self.documents['train']:,}  valid {self.documents['valid']:,}"
            f"  (skipped empty: {self.skipped_empty:,})",
            f"tokens:    train {self.tokens['train']:,}  valid {self.tokens['valid']:,}"
            f"  ({self.token_dtype}, EOS id {self.eos_id} after every document)",
            f"tokenizer: {self.tokenizer}  (vocab size {self.vocab_size:,}; "
            "model vocab_size must be >= this)",
            "wrote:",
        ]
        out += [f"  {path}" for path in self.files]
        out += [f"note: {n}" for n in self.notes]
        return out


def check_config(cfg: PreprocessConfig) -> None:
    """Cheap checks of flags (no heavy imports); raises `DataError`."""
    if bool(cfg.tokenizer) == bool(cfg.train_tokenizer):
        raise DataError(
            "pass exactly one of --tokenizer PATH_OR_NAME and --train-tokenizer; fix: choose one"
        )
    if cfg.train_tokenizer and not cfg.vocab_size:
        raise DataError("--train-tokenizer needs --vocab-size N; fix: add e.g. --vocab-size 8192")
    if not 0.0 <= cfg.validation_fraction < 1.0:
        raise DataError(
            f"--validation-fraction {cfg.validation_fraction} is outside [0, 1); fix: use e.g. 0.01"
        )
    if cfg.workers < 1:
        raise DataError(f"--workers {cfg.workers} must be >= 1; fix: pass a positive count")
    if cfg.text_sample_by not in ("document", "paragraph", "line"):
        raise DataError(
            f"--text-sample-by '{cfg.text_sample_by}' is unknown; fix: use document, paragraph or line"
        )


def check_output(prefix: str) -> str:
    """Create the output directory and prove it is writable; return it. Raises `DataError`."""
    if not os.path.basename(prefix):
        raise DataError(
            f"--output-prefix '{prefix}' ends in a directory separator; fix: add a file name "
            f"prefix, e.g. {prefix}corpus"
        )
    out_dir = os.path.dirname(os.path.abspath(prefix))
    try:
        os.makedirs(out_dir, exist_ok=True)
        with tempfile.TemporaryFile(dir=out_dir):
            pass
    except OSError as exc:
        raise DataError(
            f"output directory is not writable: {out_dir} ({exc.strerror or type(exc).__name__}); "
            "fix: choose another --output-prefix or fix its permissions"
        ) from None
    return out_dir


def validation_flags(seed: int, fraction: float) -> Iterator[bool]:
    """Endless per-document held-out flags: the i-th is `rng.random() < fraction`."""
    rng = np.random.default_rng(seed)
    while True:
        yield from (rng.random(_FLAG_BLOCK) < fraction).tolist()


def _chunks(items: Iterable, size: int) -> Iterator[list]:
    chunk = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


_WORKER_TOKENIZER = None


def _init_worker(tokenizer_ref: str) -> None:
    global _WORKER_TOKENIZER
    from mor_megatron.data.tokenizer import TextTokenizer

    _WORKER_TOKENIZER = TextTokenizer.from_pretrained(tokenizer_ref)


def _encode(texts: list[str], tokenizer=None) -> tuple[np.ndarray, np.ndarray]:
    ids = (tokenizer or _WORKER_TOKENIZER).encode_batch(texts)
    lengths = np.fromiter((len(x) for x in ids), dtype=np.int64, count=len(ids))
    flat = np.fromiter((t for x in ids for t in x), dtype=np.int64, count=int(lengths.sum()))
    return flat, lengths


def _encoded_chunks(
    chunks: Iterator[list[tuple[str, bool]]], tokenizer: Any, tokenizer_ref: str, workers: int
) -> Iterator[tuple[list[bool], np.ndarray, np.ndarray]]:
    """(held-out flags, flat ids, lengths) per chunk of (text, flag), in input order.

    `workers` > 1 tokenizes in a process pool with at most 2 * workers chunks in flight.
    """
    if workers == 1:
        for chunk in chunks:
            yield ([f for _, f in chunk], *_encode([t for t, _ in chunk], tokenizer))
        return
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # workers: no Rust thread pools
    # forkserver, not fork: a caller with threads (torch, gloo, a tokenizer's pool) can hold a lock
    # at fork time and leave a forked worker waiting on it for ever (seen in the test suite)
    ctx = multiprocessing.get_context("forkserver" if os.name == "posix" else "spawn")
    with ctx.Pool(workers, initializer=_init_worker, initargs=(tokenizer_ref,)) as pool:
        window: deque = deque()
        for chunk in chunks:
            window.append(([f for _, f in chunk], pool.apply_async(_encode, ([t for t, _ in chunk],))))
            if len(window) >= 2 * workers:
                flags, result = window.popleft()
                yield (flags, *result.get())
        while window:
            flags, result = window.popleft()
            yield (flags, *result.get())


def _progress(cfg: PreprocessConfig, total: Optional[int]):
    from tqdm.auto import tqdm

    disable = None if cfg.progress is None else not cfg.progress
    return tqdm(total=total, unit="doc", desc="tokenizing", disable=disable, dynamic_ncols=True)


def run_preprocess(cfg: PreprocessConfig, spec: Optional[InputSpec] = None) -> PreprocessSummary:
    """Tokenize the input's documents and write `PREFIX_train` / `PREFIX_valid` shards.

    Without `spec`, checks `cfg` and the output directory and resolves `cfg.inputs` first.
    Raises `DataError` for bad input.
    """
    from mor_megatron.data.shards import ShardWriter
    from mor_megatron.data.tokenizer import TextTokenizer

    if spec is None:
        check_config(cfg)
        spec = resolve_inputs(cfg.inputs, cfg.input_format)
        check_output(cfg.output_prefix)

    load_kwargs = dict(streaming=cfg.streaming, cache_dir=cfg.cache_dir,
                       text_sample_by=cfg.text_sample_by, hub_config=cfg.hub_config, split=cfg.split)

    def documents() -> Iterator[tuple[str, bool]]:
        texts = iter_texts(spec, cfg.text_key, cfg.max_documents, cfg.max_bytes, **load_kwargs)
        return zip(texts, validation_flags(cfg.seed, cfg.validation_fraction))

    if next(documents(), None) is None:
        raise DataError("input has no documents; fix: point --input at data with text")

    if cfg.train_tokenizer:
        out_dir = os.path.dirname(os.path.abspath(cfg.output_prefix))
        tok_dir = cfg.tokenizer_output or os.path.join(out_dir, "tokenizer")
        texts = (t for t, held_out in documents() if t and not held_out)
        tokenizer = TextTokenizer.train(texts, int(cfg.vocab_size), tok_dir)
        tokenizer_ref = tok_dir
    else:
        tokenizer = TextTokenizer.from_pretrained(cfg.tokenizer)
        tokenizer_ref = cfg.tokenizer

    total = None if cfg.streaming or spec.kind == "stdlib" else _known_total(spec, cfg, load_kwargs)
    writers = {s: ShardWriter(f"{cfg.output_prefix}_{s}", tokenizer.vocab_size, tokenizer.eos_id)
               for s in ("train", "valid")}
    skipped = 0
    try:
        pending = None
        chunks = _chunks(documents(), cfg.chunk_size)
        with _progress(cfg, total) as bar:
            for flags, flat, lengths in _encoded_chunks(chunks, tokenizer, tokenizer_ref, cfg.workers):
                starts = np.concatenate([[0], np.cumsum(lengths)])
                for j, held_out in enumerate(flags):
                    if lengths[j] == 0:
                        skipped += 1
                        continue
                    if pending is not None:
                        writers["valid" if pending[1] else "train"].add(pending[0])
                    pending = (flat[starts[j]:starts[j + 1]], held_out)
                bar.update(len(flags))
        if pending is not None:
            held_out = pending[1]
            train_docs, valid_docs = writers["train"].documents, writers["valid"].documents
            if cfg.validation_fraction > 0 and valid_docs == 0 and train_docs >= 1:
                held_out = True
            elif train_docs == 0:
                held_out = False
            writers["valid" if held_out else "train"].add(pending[0])
        if writers["train"].documents == 0:
            raise DataError(
                "input has no documents (every text is empty); fix: check --text-key and the input"
            )
        files, notes = writers["train"].close(), []
        if writers["valid"].documents:
            files += writers["valid"].close()
        else:
            writers["valid"].abort()
            notes.append(
                "no validation shard written (needs --validation-fraction > 0 and >= 2 documents)"
            )
    except BaseException:
        for w in writers.values():
            w.abort()
        raise
    summary = PreprocessSummary(
        documents={s: w.documents for s, w in writers.items()},
        tokens={s: w.tokens for s, w in writers.items()},
        skipped_empty=skipped,
        files=files,
        tokenizer=tokenizer_ref,
        vocab_size=tokenizer.vocab_size,
        eos_id=tokenizer.eos_id,
        token_dtype=np.dtype(writers["train"].dtype).name,
        notes=notes,
    )
    files.append(write_meta(cfg, summary))
    return summary


def _known_total(spec: InputSpec, cfg: PreprocessConfig, load_kwargs: dict) -> Optional[int]:
    if spec.kind != "files" or cfg.max_bytes is not None:
        return None
    from mor_megatron.data.sources import load_source

    n = len(load_source(spec, **load_kwargs))
    return n if cfg.max_documents is None else min(n, cfg.max_documents)


def write_meta(cfg: PreprocessConfig, summary: PreprocessSummary) -> str:
    """Write `PREFIX_meta.json` (tokenizer, vocab size, EOS id, counts, seed); return its path."""
    path = f"{cfg.output_prefix}_meta.json"
    meta = {
        "inputs": cfg.inputs,
        "tokenizer": summary.tokenizer,
        "vocab_size": summary.vocab_size,
        "eos_id": summary.eos_id,
        "token_dtype": summary.token_dtype,
        "documents": summary.documents,
        "tokens": summary.tokens,
        "validation_fraction": cfg.validation_fraction,
        "seed": cfg.seed,
    }
    with open(path, "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=2)
    return path

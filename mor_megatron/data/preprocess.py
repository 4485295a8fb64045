"""Preprocessing pipeline: documents -> (trained or loaded) tokenizer -> train/valid shards.

Documents are tokenized in batches (--chunk-size documents or ~1 MB of text), in order, by the Rust
tokenizer's own `encode_batch` on `workers` threads, and stream to the shards as numpy arrays (a
bounded window of batches in flight, so input is never read ahead unboundedly and memory stays
flat in the corpus size); the output is therefore identical for any worker count or batching.
Document i goes to validation when the i-th draw of `numpy.random.default_rng(seed)` is below
`validation_fraction` (held out by document, independent of batching). If that leaves a split
empty while the other has >= 2 documents, the last document moves over, so a small corpus still
gets a validation shard.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Optional

import numpy as np

from mor_megatron.data.errors import DataError
from mor_megatron.data.sources import InputSpec, iter_texts, resolve_inputs
from mor_megatron.paths import replaced_output

_FLAG_BLOCK = 4096
_BATCH_CHARS = 1 << 20  # a tokenizer task: ~1 MB of text (or --chunk-size documents), bounded memory
_IN_FLIGHT = 3  # batches submitted and not yet written


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
    overwrite: bool = False  # replace shards (and a trained tokenizer) a previous run left there


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


def output_files(prefix: str) -> list[str]:
    """Every file a run writes under `prefix` (shards of both splits and the record)."""
    return [f"{prefix}_{split}{ext}" for split in ("train", "valid") for ext in (".bin", ".idx")] + [f"{prefix}_meta.json"]


def tokenizer_dir(cfg: PreprocessConfig) -> str:
    """Where `--train-tokenizer` saves the tokenizer."""
    return cfg.tokenizer_output or os.path.join(os.path.dirname(os.path.abspath(cfg.output_prefix)), "tokenizer")


def check_not_clobbering(cfg: PreprocessConfig) -> None:
    """Refuse, before any work, to write over a previous run's shards or a trained tokenizer
    (shards written with it would silently stop matching it) unless `cfg.overwrite`."""
    if cfg.overwrite:
        return
    existing = [path for path in output_files(cfg.output_prefix) if os.path.exists(path)]
    if existing:
        raise DataError(
            f"--output-prefix {cfg.output_prefix} already has shards ({', '.join(os.path.basename(p) for p in existing)}); "
            "fix: choose another --output-prefix, or pass --overwrite to replace them"
        )
    tok_dir = tokenizer_dir(cfg)
    if cfg.train_tokenizer and os.path.isdir(tok_dir) and os.listdir(tok_dir):
        raise DataError(
            f"tokenizer folder {tok_dir} already holds a tokenizer (shards made with it would no longer match "
            "it); fix: set --tokenizer-output elsewhere, or pass --overwrite to replace it"
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


def _batches(documents: Iterable[tuple[str, bool]], size: int) -> Iterator[tuple[list[str], list[bool]]]:
    """(texts, held-out flags) of up to `size` documents or about `_BATCH_CHARS` characters."""
    texts: list[str] = []
    flags: list[bool] = []
    chars = 0
    for text, flag in documents:
        texts.append(text)
        flags.append(flag)
        chars += len(text)
        if len(texts) == size or chars >= _BATCH_CHARS:
            yield texts, flags
            texts, flags, chars = [], [], 0
    if texts:
        yield texts, flags


def _encoded_batches(
    batches: Iterator[tuple[list[str], list[bool]]], tokenizer: Any, workers: int
) -> Iterator[tuple[list[bool], np.ndarray, np.ndarray]]:
    """(held-out flags, flat ids, lengths) per batch, in input order.

    The Rust tokenizer encodes each batch on its `workers` threads (see `_tokenizer_threads`).
    With workers > 1, two batches are encoded at once so that one batch's tail (its longest
    documents) overlaps the next one's start; at most `_IN_FLIGHT` batches wait (bounded memory).
    """
    with ThreadPoolExecutor(1 if workers == 1 else 2) as pool:
        window: deque = deque()
        for texts, flags in batches:
            window.append((flags, pool.submit(tokenizer.encode_arrays, texts)))
            if len(window) >= _IN_FLIGHT:
                flags, result = window.popleft()
                yield (flags, *result.result())
        while window:
            flags, result = window.popleft()
            yield (flags, *result.result())


@contextmanager
def _tokenizer_threads(workers: int) -> Iterator[None]:
    """The Rust tokenizer's thread count for this run, restored after. RAYON_NUM_THREADS counts
    only where the tokenizers pool has not started yet in this process (a fresh CLI run)."""
    saved = {k: os.environ.get(k) for k in ("RAYON_NUM_THREADS", "TOKENIZERS_PARALLELISM")}
    os.environ["RAYON_NUM_THREADS"] = str(workers)
    os.environ["TOKENIZERS_PARALLELISM"] = "true" if workers > 1 else "false"
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


class _SplitWriter:
    """Routes encoded documents to the train / valid shards, in input order, skipping empty ones.

    The last non-empty document is held back: `finish` may move it to the other split so that a
    small corpus still gets a validation shard.
    """

    def __init__(self, writers: dict[str, Any]) -> None:
        self.writers = writers
        self.skipped = 0
        self._pending: Optional[tuple[np.ndarray, bool]] = None

    def add(self, flags: list[bool], flat: np.ndarray, lengths: np.ndarray) -> None:
        nonempty = lengths > 0
        self.skipped += int(lengths.size - np.count_nonzero(nonempty))
        kept = np.flatnonzero(nonempty)
        if kept.size == 0:
            return
        self._flush_pending()
        last = int(kept[-1])
        start = int(lengths[:last].sum())
        held_out = np.asarray(flags, dtype=bool)
        body = nonempty.copy()
        body[last] = False
        for split, in_split in (("train", body & ~held_out), ("valid", body & held_out)):
            if in_split.any():
                self.writers[split].add_documents(flat[np.repeat(in_split, lengths)], lengths[in_split])
        self._pending = (flat[start:start + int(lengths[last])], bool(held_out[last]))

    def _flush_pending(self) -> None:
        if self._pending is not None:
            tokens, held_out = self._pending
            self.writers["valid" if held_out else "train"].add(tokens)
            self._pending = None

    def finish(self, validation_fraction: float) -> None:
        if self._pending is None:
            return
        tokens, held_out = self._pending
        train_docs, valid_docs = self.writers["train"].documents, self.writers["valid"].documents
        if validation_fraction > 0 and valid_docs == 0 and train_docs >= 1:
            held_out = True
        elif train_docs == 0:
            held_out = False
        self._pending = (tokens, held_out)
        self._flush_pending()


_M_MMAP_THRESHOLD = -3  # glibc malloc.h
_MMAP_THRESHOLD_BYTES = 1 << 20


def return_large_buffers_to_os() -> None:
    """Process-wide, glibc only (elsewhere a no-op): buffers of >= 1 MiB always come from mmap and
    go back to the OS when freed. By default glibc raises that threshold after the first such free,
    so later big short-lived buffers (a long document's encoding, made on several threads) stay in
    per-thread arenas and the peak grows with the number of long documents, not with the longest.
    For a process that only preprocesses (the CLI); torch in the same process would pay syscalls."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_BYTES)
    except (OSError, AttributeError):
        pass


def _progress(cfg: PreprocessConfig, total: Optional[int]):
    from tqdm.auto import tqdm

    disable = None if cfg.progress is None else not cfg.progress
    return tqdm(total=total, unit="doc", desc="tokenizing", disable=disable, dynamic_ncols=True)


def run_preprocess(cfg: PreprocessConfig, spec: Optional[InputSpec] = None) -> PreprocessSummary:
    """Tokenize the input's documents and write `PREFIX_train` / `PREFIX_valid` shards.

    Without `spec`, checks `cfg` and the output directory and resolves `cfg.inputs` first.
    Raises `DataError` for bad input.
    """
    with _tokenizer_threads(cfg.workers):
        return _run(cfg, spec)


def _run(cfg: PreprocessConfig, spec: Optional[InputSpec]) -> PreprocessSummary:
    from mor_megatron.data.tokenizer import TextTokenizer

    if spec is None:
        check_config(cfg)
        spec = resolve_inputs(cfg.inputs, cfg.input_format)
        check_output(cfg.output_prefix)
        check_not_clobbering(cfg)

    load_kwargs = dict(streaming=cfg.streaming, cache_dir=cfg.cache_dir,
                       text_sample_by=cfg.text_sample_by, hub_config=cfg.hub_config, split=cfg.split)

    def documents() -> Iterator[tuple[str, bool]]:
        texts = iter_texts(spec, cfg.text_key, cfg.max_documents, cfg.max_bytes, **load_kwargs)
        return zip(texts, validation_flags(cfg.seed, cfg.validation_fraction))

    if next(documents(), None) is None:
        raise DataError("input has no documents; fix: point --input at data with text")

    if not cfg.train_tokenizer:
        return _write_shards(cfg, documents, spec, load_kwargs, TextTokenizer.from_pretrained(cfg.tokenizer),
                             cfg.tokenizer)
    # trained into a new folder that replaces the old one only once the shards made with it exist
    tok_dir = tokenizer_dir(cfg)
    with replaced_output(tok_dir, "--tokenizer-output", overwrite=cfg.overwrite) as partial:
        texts = (t for t, held_out in documents() if t and not held_out)
        tokenizer = TextTokenizer.train(texts, int(cfg.vocab_size), str(partial))
        return _write_shards(cfg, documents, spec, load_kwargs, tokenizer, tok_dir)


def _write_shards(cfg: PreprocessConfig, documents, spec: InputSpec, load_kwargs: dict, tokenizer,
                  tokenizer_ref: str) -> PreprocessSummary:
    """Encode the documents with `tokenizer` into the train/valid shards and the record; with
    `cfg.overwrite`, a previous run's files this run does not write (a stale validation shard)
    go once the new ones are in place."""
    from mor_megatron.data.shards import ShardWriter

    total = None if cfg.streaming or spec.kind == "stdlib" else _known_total(spec, cfg, load_kwargs)
    writers = {s: ShardWriter(f"{cfg.output_prefix}_{s}", tokenizer.vocab_size, tokenizer.eos_id)
               for s in ("train", "valid")}
    try:
        splits = _SplitWriter(writers)
        batches = _batches(documents(), cfg.chunk_size)
        with _progress(cfg, total) as bar:
            for flags, flat, lengths in _encoded_batches(batches, tokenizer, cfg.workers):
                splits.add(flags, flat, lengths)
                bar.update(len(flags))
        splits.finish(cfg.validation_fraction)
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
        skipped_empty=splits.skipped,
        files=files,
        tokenizer=tokenizer_ref,
        vocab_size=tokenizer.vocab_size,
        eos_id=tokenizer.eos_id,
        token_dtype=np.dtype(writers["train"].dtype).name,
        notes=notes,
    )
    files.append(write_meta(cfg, summary))
    for stale in set(output_files(cfg.output_prefix)) - set(files):
        if os.path.exists(stale):
            os.remove(stale)
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

"""Input documents for preprocessing: local jsonl/json/parquet/csv/text files, a Hugging Face hub
dataset, or the embedded stdlib corpus (`stdlib`), read through the `datasets` library.

`resolve_inputs` checks paths, formats and encodings up front (cheap, before any heavy import);
`iter_texts` then yields each document's text in input order.
"""

from __future__ import annotations

import codecs
import glob
import os
import re
from dataclasses import dataclass, field
from typing import Iterator, Optional

from mor_megatron.data.errors import DataError

STDLIB = "stdlib"
EXTENSIONS = {
    ".jsonl": "json", ".json": "json", ".ndjson": "json",
    ".parquet": "parquet",
    ".csv": "csv",
    ".txt": "text", ".text": "text", ".md": "text",
}
FORMAT_NAMES = {"auto": "auto", "jsonl": "json", "json": "json", "parquet": "parquet",
                "csv": "csv", "text": "text", "txt": "text"}
COMPRESSIONS = (".gz", ".bz2", ".xz", ".zst")
_GLOB_CHARS = re.compile(r"[*?\[]")
_HUB_NAME = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")


@dataclass
class InputSpec:
    """What to read: kind is 'stdlib', 'files' or 'hub'."""

    kind: str
    format: str = ""
    files: list[str] = field(default_factory=list)
    name: str = ""


def _strip_compression(path: str) -> tuple[str, bool]:
    for ext in COMPRESSIONS:
        if path.endswith(ext):
            return path[: -len(ext)], True
    return path, False


def detect_format(path: str) -> str:
    """The `datasets` builder for a file, from its extension; `DataError` when unknown."""
    ext = os.path.splitext(_strip_compression(path)[0])[1].lower()
    if ext not in EXTENSIONS:
        raise DataError(
            f"unknown input format for {path} (extension '{ext or 'none'}'); fix: pass "
            "--input-format jsonl|parquet|csv|text or rename the file"
        )
    return EXTENSIONS[ext]


def _looks_like_path(item: str) -> bool:
    if item.startswith(("/", "./", "../", "~")):
        return True
    stem = _strip_compression(item)[0]
    return os.path.splitext(stem)[1].lower() in EXTENSIONS or not _HUB_NAME.fullmatch(item)


def _expand(item: str) -> list[str]:
    path = os.path.expanduser(item)
    if _GLOB_CHARS.search(path):
        files = sorted(p for p in glob.glob(path, recursive=True) if os.path.isfile(p))
        if not files:
            raise DataError(f"no input files match '{item}'; fix: check the pattern and the directory")
        return files
    if os.path.isdir(path):
        files = sorted(
            os.path.join(d, f) for d, _, names in os.walk(path) for f in names
            if os.path.splitext(_strip_compression(f)[0])[1].lower() in EXTENSIONS
        )
        if not files:
            raise DataError(
                f"input directory {item} holds no .jsonl/.json/.parquet/.csv/.txt files; fix: "
                "point --input at the data files"
            )
        return files
    if os.path.isfile(path):
        return [path]
    raise DataError(
        f"input path not found: {item}; fix: check the path (or pass --input stdlib for the "
        "built-in corpus)"
    )


def check_utf8(path: str, chunk_bytes: int = 1 << 20) -> None:
    """Raise `DataError` naming `path` unless the whole file decodes as UTF-8."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    with open(path, "rb") as f:
        while True:
            chunk = f.read(chunk_bytes)
            try:
                decoder.decode(chunk, final=not chunk)
            except UnicodeDecodeError as exc:
                raise DataError(
                    f"input file is not UTF-8 text: {path} (bad byte at offset {offset + exc.start}); "
                    "fix: re-encode it as UTF-8, e.g. iconv -f latin1 -t utf-8"
                ) from None
            if not chunk:
                return
            offset += len(chunk)


def resolve_inputs(inputs: list[str], input_format: str = "auto") -> InputSpec:
    """Turn --input values into an `InputSpec`, checking paths, format and UTF-8 encoding."""
    fmt = FORMAT_NAMES.get(input_format.lower())
    if fmt is None:
        raise DataError(
            f"unknown --input-format '{input_format}'; fix: use one of {', '.join(FORMAT_NAMES)}"
        )
    if not inputs:
        raise DataError("no --input given; fix: pass files, a glob, a hub dataset name, or 'stdlib'")
    if inputs == [STDLIB] and not os.path.exists(STDLIB):
        return InputSpec(kind="stdlib", format="stdlib")
    if len(inputs) == 1 and not os.path.exists(inputs[0]) and not _looks_like_path(inputs[0]):
        return InputSpec(kind="hub", name=inputs[0])
    files = [f for item in inputs for f in _expand(item)]
    formats = {detect_format(f) for f in files} if fmt == "auto" else {fmt}
    if len(formats) > 1:
        raise DataError(
            f"inputs mix formats ({', '.join(sorted(formats))}); fix: preprocess each format "
            "separately and blend the shards"
        )
    fmt = formats.pop()
    nonempty = [f for f in files if os.path.getsize(f) > 0]
    if not nonempty:
        raise DataError(
            f"input has no documents: all {len(files)} input file(s) are empty; fix: point "
            "--input at files with text"
        )
    if fmt in ("json", "text", "csv"):
        for f in nonempty:
            if not _strip_compression(f)[1]:
                check_utf8(f)
    return InputSpec(kind="files", format=fmt, files=nonempty)


def _quiet_datasets() -> None:
    import datasets

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)  # errors are reported by us, once


def _one_line(exc: BaseException) -> str:
    while type(exc).__name__ == "DatasetGenerationError" and (exc.__cause__ or exc.__context__):
        exc = exc.__cause__ or exc.__context__  # the wrapper's message is generic
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:200]}" if text else type(exc).__name__


def load_source(
    spec: InputSpec,
    streaming: bool = False,
    cache_dir: Optional[str] = None,
    text_sample_by: str = "document",
    hub_config: Optional[str] = None,
    split: str = "train",
):
    """Open a files/hub `InputSpec` with `datasets.load_dataset` (Dataset or IterableDataset)."""
    import datasets

    _quiet_datasets()
    kwargs = {"split": split, "streaming": streaming, "cache_dir": cache_dir}
    try:
        if spec.kind == "hub":
            return datasets.load_dataset(spec.name, hub_config, **kwargs)
        if spec.format == "text":
            kwargs["sample_by"] = text_sample_by
        return datasets.load_dataset(spec.format, data_files=spec.files, **kwargs)
    except DataError:
        raise
    except StopIteration:
        raise DataError("input has no documents; fix: point --input at files with text") from None
    except Exception as exc:
        if spec.kind == "hub":
            raise DataError(
                f"input '{spec.name}' is neither an existing path nor a loadable hub dataset "
                f"({_one_line(exc)}); fix: check the path or name, the network, --hub-config and --split"
            ) from exc
        raise DataError(
            f"could not read {spec.format} input ({_one_line(exc)}); fix: check the files are valid "
            f"{spec.format} or pass the right --input-format"
        ) from exc


def iter_texts(
    spec: InputSpec,
    text_key: str = "text",
    max_documents: Optional[int] = None,
    max_bytes: Optional[int] = None,
    **load_kwargs,
) -> Iterator[str]:
    """Each document's text in input order (None becomes ""); capped by documents/UTF-8 bytes."""
    count, total = 0, 0
    for text in _raw_texts(spec, text_key, **load_kwargs):
        if (max_documents is not None and count >= max_documents) or (
            max_bytes is not None and total >= max_bytes
        ):
            return
        count += 1
        if max_bytes is not None:
            total += len(text.encode("utf-8"))
        yield text


def _raw_texts(spec: InputSpec, text_key: str, **load_kwargs) -> Iterator[str]:
    if spec.kind == "stdlib":
        from mor_megatron.data.corpus import stdlib_documents

        for doc in stdlib_documents():
            yield doc["text"]
        return
    ds = load_source(spec, **load_kwargs)
    columns = ds.column_names
    if columns is not None and text_key not in columns:
        raise DataError(
            f"input has no column '{text_key}' (columns: {', '.join(columns) or 'none'}); fix: "
            "pass --text-key COLUMN"
        )
    try:
        for batch in _column_batches(ds, text_key):
            for value in batch:
                if value is None:
                    value = ""
                if not isinstance(value, str):
                    raise DataError(
                        f"column '{text_key}' holds {type(value).__name__} values, not text; fix: "
                        "pass --text-key naming a text column"
                    )
                yield value
    except DataError:
        raise
    except StopIteration:
        return
    except Exception as exc:
        raise DataError(
            f"could not read input ({_one_line(exc)}); fix: check the input files/dataset are valid"
        ) from exc


def _column_batches(ds, key: str) -> Iterator[list]:
    """The values of column `key`, a batch at a time.

    A cached (non-streaming) dataset is read from its Arrow files with plain reads: iterating the
    dataset itself goes through its memory map, which keeps every page read resident, so the
    reader's peak memory would grow with the corpus.
    """
    files = [f["filename"] for f in getattr(ds, "cache_files", None) or []]
    if files and ds.num_rows == sum(_arrow_rows(f) for f in files):
        import pyarrow as pa

        for name in files:
            with pa.OSFile(name) as f:
                for batch in pa.ipc.open_stream(f):
                    if key not in batch.schema.names:
                        raise DataError(f"input has no column '{key}'; fix: pass --text-key COLUMN")
                    yield batch.column(key).to_pylist()
        return
    for batch in ds.select_columns([key]).iter(batch_size=1000):
        if key not in batch:
            raise DataError(f"input has no column '{key}'; fix: pass --text-key COLUMN")
        yield batch[key]


def _arrow_rows(path: str) -> int:
    """Rows of an Arrow stream file, from its batch headers (through a memory map: no data read)."""
    import pyarrow as pa

    with pa.memory_map(path) as f:
        return sum(batch.num_rows for batch in pa.ipc.open_stream(f))

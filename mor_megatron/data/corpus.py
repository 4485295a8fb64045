"""The embedded default corpus: the Python standard library's own source files.

Every machine that runs this project has it, so a first pretraining run needs no download. Files
are visited in sorted order (deterministic for a given Python build); `site-packages` /
`dist-packages`, `__pycache__`, empty files and files that cannot be read or are not UTF-8 are
skipped.
"""

from __future__ import annotations

import json
import os
import sysconfig
from typing import Iterator, Optional

SKIP_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__"})


def stdlib_root() -> str:
    """The directory holding the standard library's .py files."""
    return sysconfig.get_paths()["stdlib"]


def stdlib_files(root: Optional[str] = None) -> Iterator[str]:
    """Absolute paths of the standard library's *.py files, in sorted (deterministic) order."""
    root = root or stdlib_root()
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS)
        for name in sorted(filenames):
            if name.endswith(".py"):
                yield os.path.join(dirpath, name)


def stdlib_documents(
    max_documents: Optional[int] = None,
    max_bytes: Optional[int] = None,
    root: Optional[str] = None,
) -> Iterator[dict[str, str]]:
    """Yield `{"text": source}` per readable UTF-8 stdlib file.

    Stops after `max_documents` documents, or once `max_bytes` bytes of text have been yielded
    (the document that crosses the cap is included).
    """
    count, total = 0, 0
    for path in stdlib_files(root):
        if (max_documents is not None and count >= max_documents) or (
            max_bytes is not None and total >= max_bytes
        ):
            return
        try:
            with open(path, "rb") as f:
                text = f.read().decode("utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        if not text.strip():
            continue
        count += 1
        total += len(text.encode("utf-8"))
        yield {"text": text}


def write_stdlib_jsonl(
    path: str, max_documents: Optional[int] = None, max_bytes: Optional[int] = None
) -> int:
    """Write the stdlib corpus to `path` as jsonl (one `{"text": ...}` per line); return the count."""
    count = 0
    with open(path, "w", encoding="utf-8") as f:
        for doc in stdlib_documents(max_documents=max_documents, max_bytes=max_bytes):
            f.write(json.dumps(doc, ensure_ascii=False) + "\n")
            count += 1
    return count

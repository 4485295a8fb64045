"""Tokenizers: load one with `transformers.AutoTokenizer`, or train a byte-level BPE locally.

A trained tokenizer is saved as a transformers folder (`tokenizer.json` +
`tokenizer_config.json`, class `PreTrainedTokenizerFast`), so `AutoTokenizer.from_pretrained`
loads it anywhere; such a plain folder is loaded here with `tokenizers` alone (same ids, without
transformers' seconds of import). `<|endoftext|>` is its EOS token; documents are joined with EOS
in the shards.
"""

from __future__ import annotations

import itertools
import json
import os
from typing import Any, Iterable, Optional, Sequence

import numpy as np

from mor_megatron.data.errors import DataError

EOS_TOKEN = "<|endoftext|>"
BYTE_ALPHABET = 256  # a byte-level BPE needs every byte as a token
_HUGE = 10**30  # model_max_length: shards hold whole documents, never truncate or warn


def check_vocab(tokenizer_vocab_size: int, model_vocab_size: int) -> None:
    """Raise `DataError` (a ValueError), one line, unless the model vocab covers every tokenizer id."""
    if model_vocab_size < tokenizer_vocab_size:
        raise DataError(
            f"model vocab_size {model_vocab_size} is smaller than the tokenizer's vocab size "
            f"{tokenizer_vocab_size}; fix: set the model vocab_size to >= {tokenizer_vocab_size} "
            "(e.g. rounded up to a multiple of 128)"
        )


# tokenizer_config.json keys of a plain tokenizers-backed folder (what `save_tokenizer` writes):
# such a folder loads with `tokenizers` alone, since transformers adds nothing to its encoding
_PLAIN_CONFIG_KEYS = frozenset({"backend", "eos_token", "tokenizer_class"})
# files that make transformers change the tokenizer on load (extra or remapped special tokens)
_HF_EXTRA_FILES = ("special_tokens_map.json", "added_tokens.json")


class TextTokenizer:
    """A tokenizer plus what pretraining needs: `eos_id`, `vocab_size`, encode.

    `backend` is the Rust `tokenizers.Tokenizer` (None for a tokenizer without one); `hf` the
    transformers tokenizer, loaded on first use when the folder was loaded without transformers.
    """

    def __init__(
        self, name_or_path: str, eos_id: int, vocab_size: int, backend: Any = None, hf: Any = None
    ) -> None:
        self.name_or_path = name_or_path
        self.eos_id = eos_id
        self.vocab_size = vocab_size
        self.backend = backend
        self._hf = hf

    @classmethod
    def from_hf(cls, hf_tokenizer: Any, name_or_path: str) -> "TextTokenizer":
        """Wrap a transformers tokenizer; raises `DataError` when it has no EOS token."""
        hf_tokenizer.model_max_length = _HUGE
        if hf_tokenizer.eos_token_id is None:
            raise DataError(
                f"tokenizer '{name_or_path}' has no EOS token; fix: use a tokenizer with an "
                f"eos_token, or train one with --train-tokenizer"
            )
        return cls(name_or_path, int(hf_tokenizer.eos_token_id), len(hf_tokenizer),
                   getattr(hf_tokenizer, "backend_tokenizer", None), hf_tokenizer)

    @classmethod
    def from_pretrained(cls, path_or_name: str) -> "TextTokenizer":
        """Load a local folder or a hub name (if reachable): a plain tokenizers-backed folder with
        `tokenizers` alone (transformers' import takes seconds), anything else with
        `AutoTokenizer.from_pretrained`."""
        plain = cls._from_plain_folder(path_or_name)
        return plain if plain is not None else cls.from_hf(_auto_tokenizer(path_or_name), path_or_name)

    @classmethod
    def _from_plain_folder(cls, path: str) -> Optional["TextTokenizer"]:
        config_path, file_path = (os.path.join(path, n) for n in ("tokenizer_config.json", "tokenizer.json"))
        if not (os.path.isfile(config_path) and os.path.isfile(file_path)) or any(
            os.path.exists(os.path.join(path, n)) for n in _HF_EXTRA_FILES
        ):
            return None
        try:
            with open(config_path, encoding="utf-8") as f:
                config = json.load(f)
        except (OSError, ValueError):
            return None  # AutoTokenizer reports it
        eos = config.get("eos_token") if isinstance(config, dict) else None
        eos = eos.get("content") if isinstance(eos, dict) else eos
        if (set(config) - _PLAIN_CONFIG_KEYS or config.get("tokenizer_class") != "PreTrainedTokenizerFast"
                or config.get("backend", "tokenizers") != "tokenizers" or not isinstance(eos, str)):
            return None
        from tokenizers import Tokenizer

        try:
            backend = Tokenizer.from_file(file_path)
        except Exception:  # a file tokenizers cannot parse: AutoTokenizer says why, one line
            return None
        eos_id = backend.token_to_id(eos)
        if eos_id is None:
            return None
        return cls(path, int(eos_id), backend.get_vocab_size(with_added_tokens=True), backend)

    @property
    def hf(self) -> Any:
        """The transformers tokenizer (loaded now if the folder was loaded without transformers)."""
        if self._hf is None:
            self._hf = _auto_tokenizer(self.name_or_path)
            self._hf.model_max_length = _HUGE
        return self._hf

    @classmethod
    def train(
        cls, texts: Iterable[str], vocab_size: int, output_dir: str, min_frequency: int = 2
    ) -> "TextTokenizer":
        """Train a byte-level BPE (EOS `<|endoftext|>`) on `texts`; save it to `output_dir`.

        The result may hold fewer than `vocab_size` tokens when the corpus has too few merges.
        """
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
        from transformers import PreTrainedTokenizerFast

        if vocab_size < BYTE_ALPHABET + 1:
            raise DataError(
                f"--vocab-size {vocab_size} is too small for a byte-level BPE; fix: use "
                f">= {BYTE_ALPHABET + 1} (256 bytes + {EOS_TOKEN})"
            )
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            special_tokens=[EOS_TOKEN],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tok.train_from_iterator(texts, trainer)
        hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS_TOKEN)
        save_tokenizer(hf, output_dir)
        return cls.from_pretrained(output_dir)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids per text, without special tokens (no BOS/EOS added)."""
        if not texts:
            return []
        if self.backend is not None:  # the Rust tokenizer directly: ~2x faster than the HF wrapper
            return [e.ids for e in _rust_encode(self.backend, list(texts))]
        return self.hf(list(texts), add_special_tokens=False)["input_ids"]

    def encode_arrays(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """All texts' ids back to back (int64) and each text's token count (int64)."""
        ids = self.encode_batch(texts)
        lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
        # chain runs in C: no per-token Python bytecode
        flat = np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int64, count=int(lengths.sum()))
        return flat, lengths

    def decode(self, ids: Sequence[int]) -> str:
        """Text for `ids` (special tokens kept)."""
        return self.hf.decode(list(ids))


def _rust_encode(backend: Any, texts: list[str]) -> list:
    """`encode_batch` without special tokens; `encode_batch_fast` (same ids, no character offsets,
    which preprocessing never reads) where this tokenizers version has it."""
    encode = getattr(backend, "encode_batch_fast", backend.encode_batch)
    return encode(texts, add_special_tokens=False)


def _auto_tokenizer(path_or_name: str) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path_or_name)
    except Exception as exc:  # transformers raises OSError/ValueError/HF hub errors
        raise DataError(
            f"cannot load tokenizer '{path_or_name}' ({type(exc).__name__}); fix: pass a "
            "folder holding tokenizer.json/tokenizer_config.json, a reachable hub name, or "
            "use --train-tokenizer --vocab-size N"
        ) from exc


def save_tokenizer(hf_tokenizer: Any, output_dir: str) -> None:
    """`save_pretrained`, recording `tokenizer_class: PreTrainedTokenizerFast` (transformers 4 and 5)."""
    os.makedirs(output_dir, exist_ok=True)
    hf_tokenizer.save_pretrained(output_dir)
    config_path = os.path.join(output_dir, "tokenizer_config.json")
    with open(config_path, encoding="utf-8") as f:
        config = json.load(f)
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config.pop("model_max_length", None)
    with open(config_path, "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)


def load_tokenizer(path_or_name: str) -> TextTokenizer:
    """Shorthand for `TextTokenizer.from_pretrained`."""
    return TextTokenizer.from_pretrained(path_or_name)


def train_tokenizer(
    texts: Iterable[str], vocab_size: int, output_dir: str, min_frequency: Optional[int] = 2
) -> TextTokenizer:
    """Shorthand for `TextTokenizer.train`."""
    return TextTokenizer.train(texts, vocab_size, output_dir, min_frequency=min_frequency or 0)

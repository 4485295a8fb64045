"""Tokenizers: load one with `transformers.AutoTokenizer`, or train a byte-level BPE locally.

A trained tokenizer is saved as a transformers folder (`tokenizer.json` +
`tokenizer_config.json`, class `PreTrainedTokenizerFast`), so `AutoTokenizer.from_pretrained`
loads it anywhere. `<|endoftext|>` is its EOS token; documents are joined with EOS in the shards.
"""

from __future__ import annotations

import json
import os
from typing import Any, Iterable, Optional, Sequence

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


class TextTokenizer:
    """A loaded Hugging Face tokenizer plus what pretraining needs: `eos_id`, `vocab_size`, encode."""

    def __init__(self, hf_tokenizer: Any, name_or_path: str) -> None:
        self.hf = hf_tokenizer
        self.name_or_path = name_or_path
        self.hf.model_max_length = _HUGE
        if self.hf.eos_token_id is None:
            raise DataError(
                f"tokenizer '{name_or_path}' has no EOS token; fix: use a tokenizer with an "
                f"eos_token, or train one with --train-tokenizer"
            )

    @classmethod
    def from_pretrained(cls, path_or_name: str) -> "TextTokenizer":
        """Load with `AutoTokenizer.from_pretrained` (a local folder, or a hub name if reachable)."""
        from transformers import AutoTokenizer

        try:
            hf = AutoTokenizer.from_pretrained(path_or_name)
        except Exception as exc:  # transformers raises OSError/ValueError/HF hub errors
            raise DataError(
                f"cannot load tokenizer '{path_or_name}' ({type(exc).__name__}); fix: pass a "
                "folder holding tokenizer.json/tokenizer_config.json, a reachable hub name, or "
                "use --train-tokenizer --vocab-size N"
            ) from exc
        return cls(hf, path_or_name)

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

    @property
    def eos_id(self) -> int:
        """Id of the end-of-document token."""
        return int(self.hf.eos_token_id)

    @property
    def vocab_size(self) -> int:
        """Number of ids the tokenizer can emit (base vocab plus added tokens)."""
        return len(self.hf)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids per text, without special tokens (no BOS/EOS added)."""
        if not texts:
            return []
        backend = getattr(self.hf, "backend_tokenizer", None)
        if backend is not None:  # the Rust tokenizer directly: ~2x faster than the HF wrapper
            return [e.ids for e in backend.encode_batch(list(texts), add_special_tokens=False)]
        return self.hf(list(texts), add_special_tokens=False)["input_ids"]

    def decode(self, ids: Sequence[int]) -> str:
        """Text for `ids` (special tokens kept)."""
        return self.hf.decode(list(ids))


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

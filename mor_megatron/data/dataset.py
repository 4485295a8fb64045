"""Training-side readers: shuffled, blended micro-batches per data-parallel rank, and validation.

Why not megatron-core's GPTDataset / BlendedMegatronDatasetBuilder: they run on CPU here (the
C++ helpers ship prebuilt), but they need the run's total sample count up front, write .npy index
caches next to the data (built by rank 0 behind a torch.distributed barrier), and want a
MegatronTokenizer object. This reader is a small numpy layer over megatron-core's memory-mapped
`IndexedDataset` instead: every row is a pure function of (seed, global sample index), so epochs
never run out, nothing is cached on disk, and resuming needs only `consumed_samples`.

Rows: each shard's token stream is cut into rows of S + 1 tokens (stride S); `tokens` = row[:-1],
`labels` = row[1:]. Global batch layout (megatron's pretraining sampler): the step starting at
`consumed_samples` covers global samples [c, c + global_batch_size); micro-batch m of DP rank r
holds samples c + m * mbs * dp + r * mbs + [0, mbs).
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator, Optional, Sequence, Union

import numpy as np
import torch

from mor_megatron.data.errors import DataError
from mor_megatron.data.blending import BlendedShuffledIndex
from mor_megatron.data.shards import TokenStream

Blend = Sequence[tuple[float, str]]
_PAIRS = "W1 PREFIX1 W2 PREFIX2 ..."


def parse_blend(spec: Union[str, Sequence[Union[str, float]], Blend]) -> list[tuple[float, str]]:
    """Normalize a data blend to [(weight, prefix), ...].

    Accepts "PREFIX", "W1 P1 W2 P2" (megatron's --data-path style), that as a list, or pairs.
    """
    text = spec if isinstance(spec, str) else None
    if text is not None:
        spec = text.split()
        if len(spec) > 1 and any(Path(text.strip() + suffix).exists() for suffix in (".idx", ".bin")):
            raise DataError(
                f"data path '{text.strip()}' contains whitespace, which the blend syntax '{_PAIRS}' cannot "
                "express; fix: move or link the shards to a path without spaces"
            )
    items = list(spec)
    if items and all(isinstance(x, (tuple, list)) for x in items):
        return [(float(w), str(p)) for w, p in items]
    if len(items) == 1:
        return [(1.0, str(items[0]))]
    spaces = " (a path with spaces cannot be written in it)" if text is not None else ""
    if len(items) % 2:
        raise DataError(f"data blend {items} is not weight/prefix pairs; fix: write '{_PAIRS}'{spaces}")
    try:
        return [(float(items[i]), str(items[i + 1])) for i in range(0, len(items), 2)]
    except ValueError:
        raise DataError(f"data blend {items} has a non-numeric weight; fix: write '{_PAIRS}'{spaces}") from None


def _positive(name: str, value: int) -> None:
    if int(value) < 1:
        raise DataError(f"{name} = {value} must be >= 1; fix: pass a positive {name}")


def _check_rank(dp_rank: int, dp_size: int) -> None:
    if not 0 <= dp_rank < dp_size:
        raise DataError(f"dp_rank {dp_rank} is outside [0, {dp_size}); fix: pass 0 <= dp_rank < dp_size")


def _batch(rows: list[np.ndarray]) -> dict[str, torch.Tensor]:
    data = torch.from_numpy(np.stack(rows))
    tokens, labels = data[:, :-1].contiguous(), data[:, 1:].contiguous()
    b, s = tokens.shape
    return {
        "tokens": tokens,
        "labels": labels,
        # host: batches are built on the host; the step moves each once (`device.to_device`)
        "loss_mask": torch.ones(b, s, dtype=torch.float32),  # host: as above
        "position_ids": torch.arange(s, dtype=torch.int64).expand(b, s).contiguous(),  # host: as above
    }


class PretrainingBatches:
    """Endless, deterministic, resumable micro-batches of one data-parallel rank.

    Yields dicts: `tokens`, `labels`, `position_ids` (int64 [mbs, S]) and `loss_mask` (float32
    ones [mbs, S]). `num_microbatches` micro-batches make one step; after a step's last one,
    `consumed_samples` has grown by `global_batch_size`. Constructing with `consumed_samples=N`
    continues exactly where an uninterrupted run would be after N samples.
    """

    def __init__(
        self,
        blend: Union[Blend, str, Sequence[str]],
        seq_length: int,
        micro_batch_size: int,
        global_batch_size: int,
        dp_rank: int = 0,
        dp_size: int = 1,
        seed: int = 1234,
        consumed_samples: int = 0,
    ) -> None:
        for name, value in (("seq_length", seq_length), ("micro_batch_size", micro_batch_size),
                            ("global_batch_size", global_batch_size), ("dp_size", dp_size)):
            _positive(name, value)
        if global_batch_size % (micro_batch_size * dp_size):
            raise DataError(
                f"global_batch_size {global_batch_size} is not divisible by micro_batch_size "
                f"{micro_batch_size} x dp_size {dp_size} = {micro_batch_size * dp_size}; fix: make "
                "global_batch_size a multiple of micro_batch_size * dp_size"
            )
        _check_rank(dp_rank, dp_size)
        if consumed_samples < 0:
            raise DataError(
                f"consumed_samples {consumed_samples} < 0; fix: pass the checkpoint's consumed_samples"
            )
        self.blend = parse_blend(blend)
        self.seq_length = int(seq_length)
        self.micro_batch_size = int(micro_batch_size)
        self.global_batch_size = int(global_batch_size)
        self.dp_rank, self.dp_size = int(dp_rank), int(dp_size)
        self.seed = int(seed)
        self.num_microbatches = global_batch_size // (micro_batch_size * dp_size)
        self.streams = [TokenStream(prefix, self.seq_length) for _, prefix in self.blend]
        self.index = BlendedShuffledIndex(
            [w for w, _ in self.blend], [s.num_rows for s in self.streams], self.seed
        )
        self.consumed_samples = int(consumed_samples)
        self._microbatch = 0  # position inside the current step

    def sample(self, index: int) -> np.ndarray:
        """Global sample `index` as S + 1 int64 tokens."""
        shard, row = self.index.locate(index)
        return self.streams[shard].row(row)

    def sample_indices(self, consumed_samples: int, microbatch: int, dp_rank: Optional[int] = None) -> np.ndarray:
        """Global sample ids of `microbatch` of this (or another) data-parallel rank in the step
        starting at `consumed_samples`."""
        start = consumed_samples + microbatch * self.micro_batch_size * self.dp_size
        start += (self.dp_rank if dp_rank is None else dp_rank) * self.micro_batch_size
        return np.arange(start, start + self.micro_batch_size, dtype=np.int64)

    def __iter__(self) -> "PretrainingBatches":
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        ids = self.sample_indices(self.consumed_samples, self._microbatch)
        batch = _batch([self.sample(int(i)) for i in ids])
        self._microbatch += 1
        if self._microbatch == self.num_microbatches:
            self._microbatch = 0
            self.consumed_samples += self.global_batch_size
        return batch

    def next_global_batch(self) -> list[dict[str, torch.Tensor]]:
        """This rank's `num_microbatches` micro-batches of the next step."""
        if self._microbatch:
            raise RuntimeError("next_global_batch() called in the middle of a step")
        return [next(self) for _ in range(self.num_microbatches)]


class ValidationBatches:
    """Fixed-order (unshuffled) micro-batches over `_valid` shards, for periodic validation loss.

    Rows of all prefixes in order; micro-batch m of rank r holds rows m * mbs * dp + r * mbs +
    [0, mbs). Every rank gets the same number (`len(self)`), capped by `max_microbatches`; rows
    that do not fill a whole mbs * dp group are left out. Each `iter()` starts from the top.
    """

    def __init__(
        self,
        prefixes: Union[str, Sequence[str]],
        seq_length: int,
        micro_batch_size: int,
        dp_rank: int = 0,
        dp_size: int = 1,
        max_microbatches: Optional[int] = None,
    ) -> None:
        for name, value in (("seq_length", seq_length), ("micro_batch_size", micro_batch_size),
                            ("dp_size", dp_size)):
            _positive(name, value)
        _check_rank(dp_rank, dp_size)
        prefixes = [prefixes] if isinstance(prefixes, str) else list(prefixes)
        self.streams = [TokenStream(p, seq_length) for p in prefixes]
        self.micro_batch_size, self.dp_rank, self.dp_size = micro_batch_size, dp_rank, dp_size
        self._offsets = np.cumsum([0] + [s.num_rows for s in self.streams])
        self.num_rows = int(self._offsets[-1])
        group = micro_batch_size * dp_size
        self.num_microbatches = self.num_rows // group
        if max_microbatches is not None:
            self.num_microbatches = min(self.num_microbatches, int(max_microbatches))
        if self.num_microbatches < 1:
            raise DataError(
                f"validation data {', '.join(prefixes)} has {self.num_rows} rows of "
                f"{seq_length + 1} tokens, fewer than micro_batch_size x dp_size = {group}; fix: "
                "raise --validation-fraction in preprocessing or lower seq_length/micro_batch_size"
            )

    def row(self, r: int) -> np.ndarray:
        """Validation row `r` (over all prefixes in order)."""
        shard = int(np.searchsorted(self._offsets, r, side="right")) - 1
        return self.streams[shard].row(r - int(self._offsets[shard]))

    def __len__(self) -> int:
        return self.num_microbatches

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        group = self.micro_batch_size * self.dp_size
        for m in range(self.num_microbatches):
            start = m * group + self.dp_rank * self.micro_batch_size
            yield _batch([self.row(r) for r in range(start, start + self.micro_batch_size)])

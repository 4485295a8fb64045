"""Index math for pretraining: blend shards by weight, shuffle rows by seed, run endless epochs.

Everything is a pure function of (global sample index, seed), so no index caches are written and
resuming from `consumed_samples` needs no saved state.

Blending: within each block of `BLEND_BLOCK` global samples, the sample -> shard assignment follows
megatron-core's greedy rule (BlendedDataset / helpers.cpp `build_blending_indices`: pick the
shard whose count lags its weight the most); every block repeats that pattern, so the k-th sample of any
shard is found in O(1). Each shard holds at least its weight share to within one sample per block.

Shuffling: shard d's epoch e is `numpy.random.default_rng([seed, d, e]).permutation(num_rows)`;
when a shard runs out of rows its next epoch starts with a fresh permutation.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Sequence

import numpy as np

from mor_megatron.data.errors import DataError

BLEND_BLOCK = 8192


def normalize_weights(weights: Sequence[float]) -> np.ndarray:
    """Weights as float64 summing to 1; raise `DataError` unless all are finite and > 0."""
    w = np.asarray(weights, dtype=np.float64)
    if w.size == 0:
        raise DataError("no data shards given; fix: pass at least one (weight, prefix) pair")
    if not np.all(np.isfinite(w)) or np.any(w <= 0):
        raise DataError(
            f"blend weights must be finite and > 0, got {list(weights)}; fix: use positive weights"
        )
    return w / w.sum()


def blend_pattern(weights: np.ndarray, block: int = BLEND_BLOCK) -> np.ndarray:
    """Shard id per position of one block, by megatron's greedy largest-error rule."""
    pattern = np.empty(block, dtype=np.int64)
    counts = np.zeros(len(weights), dtype=np.float64)
    for i in range(block):
        d = int(np.argmax(weights * (i + 1) - counts))
        counts[d] += 1
        pattern[i] = d
    return pattern


class BlendedShuffledIndex:
    """Map a global sample index to (shard id, row id in that shard)."""

    def __init__(self, weights: Sequence[float], rows_per_shard: Sequence[int], seed: int) -> None:
        self.weights = normalize_weights(weights)
        self.rows = [int(r) for r in rows_per_shard]
        self.seed = int(seed)
        self.block = 1 if len(self.rows) == 1 else BLEND_BLOCK
        self.pattern = blend_pattern(self.weights, self.block)
        onehot = np.eye(len(self.rows), dtype=np.int64)[self.pattern]
        # prefix[j, d]: samples of shard d among the first j positions of a block
        self.prefix = np.vstack([np.zeros((1, len(self.rows)), np.int64), np.cumsum(onehot, axis=0)])
        self.per_block = self.prefix[-1]
        self._perms: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()

    def shard_sample(self, index: int) -> tuple[int, int]:
        """(shard id, k): global sample `index` is the k-th sample drawn from that shard."""
        if index < 0:
            raise IndexError(f"sample index {index} < 0")
        block, j = divmod(int(index), self.block)
        d = int(self.pattern[j])
        return d, block * int(self.per_block[d]) + int(self.prefix[j, d])

    def locate(self, index: int) -> tuple[int, int]:
        """(shard id, row id) of global sample `index`."""
        d, k = self.shard_sample(index)
        epoch, position = divmod(k, self.rows[d])
        return d, int(self._permutation(d, epoch)[position])

    def _permutation(self, shard: int, epoch: int) -> np.ndarray:
        key = (shard, epoch)
        perm = self._perms.get(key)
        if perm is None:
            perm = np.random.default_rng([self.seed, shard, epoch]).permutation(self.rows[shard])
            self._perms[key] = perm
            while len(self._perms) > 2 * len(self.rows):
                self._perms.popitem(last=False)
        else:
            self._perms.move_to_end(key)
        return perm

"""Static KV caches: cached attention against a dense reference, overflow, and the memory report
against docs/DESIGN.md 5 for a forced routing pattern that realises the default capacities."""

from fractions import Fraction

import pytest
import torch
import torch.nn.functional as F

from model_helpers import build, tiny_config
from mor_megatron.inference import (
    CacheOverflowError,
    IncrementalDecoder,
    StaticKVCache,
    expected_recursion_ratio,
    kv_bytes_per_row,
)
from mor_megatron.inference.cache import ranks_within_rows, row_groups


def test_ranks_within_rows():
    rows = torch.tensor([2, 0, 2, 1, 0, 2])
    assert ranks_within_rows(rows).tolist() == [0, 0, 1, 0, 1, 2]


def test_cached_attention_matches_dense_reference():
    torch.manual_seed(0)
    heads, groups, dim = 4, 2, 8
    cache = StaticKVCache(max_batch=3, slots=10, kv_heads=groups, head_dim=dim)
    # row 0 holds positions 0, 2, 5 (a recursion step's active tokens), row 2 holds 0..3
    stored = {0: [0, 2, 5], 2: [0, 1, 2, 3]}
    keys = {row: torch.randn(len(p), groups, dim) for row, p in stored.items()}
    values = {row: torch.randn(len(p), groups, dim) for row, p in stored.items()}
    # written in two calls, rows interleaved
    first = [(0, 0), (2, 0), (2, 1), (0, 1)]
    second = [(2, 2), (0, 2), (2, 3)]
    for chunk in (first, second):
        rows = torch.tensor([r for r, _ in chunk])
        pos = torch.tensor([stored[r][i] for r, i in chunk])
        cache.append(rows, pos, torch.stack([keys[r][i] for r, i in chunk]), torch.stack([values[r][i] for r, i in chunk]))
    assert cache.lengths.tolist() == [3, 0, 4]
    queries = [(0, 5), (2, 2), (0, 3), (2, 3)]
    q = torch.randn(len(queries), heads, dim)
    out = cache.attend(q, torch.tensor([r for r, _ in queries]), torch.tensor([p for _, p in queries]), None)
    for i, (row, pos) in enumerate(queries):
        visible = [j for j, p in enumerate(stored[row]) if p <= pos]
        k = keys[row][visible].repeat_interleave(heads // groups, dim=1).transpose(0, 1)
        v = values[row][visible].repeat_interleave(heads // groups, dim=1).transpose(0, 1)
        ref = F.scaled_dot_product_attention(q[i].unsqueeze(1), k, v).squeeze(1)
        torch.testing.assert_close(out[i], ref, atol=1e-6, rtol=1e-5)
    assert cache.used_bytes == 7 * 2 * groups * dim * 4
    cache.reset(torch.tensor([2]))
    assert cache.used_bytes == 3 * 2 * groups * dim * 4 and cache.entries == int(cache.lengths.sum())


@pytest.mark.parametrize("query_rows", [[0, 1, 2], [1, 2], [0, 2]], ids=["all", "consecutive", "gap"])
def test_one_token_per_row_paths_match_the_dense_reference(query_rows):
    """A plain decode tick (one query per row, rows in order) skips the grouping and, for
    consecutive rows, reads the cache as a view: the same attention either way."""
    torch.manual_seed(1)
    heads, groups, dim = 4, 2, 8
    cache = StaticKVCache(max_batch=3, slots=6, kv_heads=groups, head_dim=dim)
    lengths = [5, 2, 4]
    keys = [torch.randn(n, groups, dim) for n in lengths]
    values = [torch.randn(n, groups, dim) for n in lengths]
    for row, n in enumerate(lengths):
        cache.append(torch.full((n,), row), torch.arange(n), keys[row], values[row])
    rows = torch.tensor(query_rows)
    positions = torch.tensor([lengths[r] - 1 for r in query_rows])
    q = torch.randn(len(query_rows), heads, dim)
    groups_of = row_groups(rows)
    assert groups_of.one_per_row and (groups_of.first_row is not None) == (query_rows != [0, 2])
    out = cache.attend(q, rows, positions, None, groups_of)
    for i, row in enumerate(query_rows):
        k = keys[row].repeat_interleave(heads // groups, dim=1).transpose(0, 1)
        v = values[row].repeat_interleave(heads // groups, dim=1).transpose(0, 1)
        ref = F.scaled_dot_product_attention(q[i].unsqueeze(1), k, v).squeeze(1)
        torch.testing.assert_close(out[i], ref, atol=1e-6, rtol=1e-5)


def test_overflow_is_one_clear_error():
    cache = StaticKVCache(max_batch=1, slots=2, kv_heads=1, head_dim=4)
    cache.append(torch.tensor([0, 0]), torch.tensor([0, 1]), torch.zeros(2, 1, 4), torch.zeros(2, 1, 4))
    with pytest.raises(CacheOverflowError, match="full"):
        cache.append(torch.tensor([0]), torch.tensor([2]), torch.zeros(1, 1, 4), torch.zeros(1, 1, 4))


def capacity_pattern(num_recursions: int):
    """Depth Nr - (p mod Nr): step r (0-based) keeps exactly (Nr - r)/Nr of every Nr positions,
    the default capacities."""
    return lambda rows, positions: num_recursions - positions % num_recursions


@pytest.mark.parametrize("router", ["expert_choice", "token_choice"])
@pytest.mark.parametrize("kv_mode", ["recursion_wise", "share_first"])
@pytest.mark.parametrize("nr", [2, 3, 4])
def test_kv_usage_equals_spec_ratio(parallel, router, kv_mode, nr):
    seq = 12  # divisible by 2, 3 and 4
    config = tiny_config(router=router, kv_mode=kv_mode, num_recursions=nr, effective_layers=2 + nr, seq_length=seq)
    model = build(config)
    decoder = IncrementalDecoder(
        model, max_batch=2, max_seq=seq, kv_slots="capacity", capacity_margin=1.0,
        depth_override=capacity_pattern(nr),
    )
    tokens = torch.randint(0, config.vocab_size, (2, seq), generator=torch.Generator().manual_seed(0))
    decoder.forward(tokens[:, :5])
    for i in range(5, seq):
        decoder.forward(tokens[:, i : i + 1])
    report = decoder.caches.kv_usage()
    spec = Fraction(1, nr) if kv_mode == "share_first" else Fraction(nr + 1, 2 * nr)
    assert Fraction(report.recursion_used_bytes, report.recursion_vanilla_bytes) == spec
    assert expected_recursion_ratio(config) == pytest.approx(float(spec))
    entry, tokens_total = report.entry_bytes, 2 * seq
    assert report.tokens == tokens_total
    assert entry == 2 * config.num_query_groups * config.head_dim * 4
    # two unique layers (first, last) cache every token; the recursion layers per the pattern
    unique = 2 * tokens_total * entry
    assert report.used_bytes == unique + report.recursion_used_bytes
    assert report.vanilla_used_bytes == config.effective_layers * tokens_total * entry
    assert Fraction(report.used_bytes, report.vanilla_used_bytes) == Fraction(2, 2 + nr) + Fraction(nr, 2 + nr) * spec
    # capacity-sized static buffers: the same ratio on the allocation, and the cache is exactly full
    assert Fraction(report.allocated_bytes, report.vanilla_allocated_bytes) == Fraction(2, 2 + nr) + Fraction(nr, 2 + nr) * spec
    assert report.allocated_bytes == report.used_bytes
    assert kv_bytes_per_row(config, seq, "capacity", 1.0) * 2 == report.allocated_bytes
    assert "MiB" in report.summary()


def test_full_slots_allocate_like_vanilla_and_rows_reset(parallel):
    config = tiny_config(seq_length=12)
    model = build(config)
    decoder = IncrementalDecoder(model, max_batch=2, max_seq=12)
    assert decoder.caches.allocated_bytes == kv_bytes_per_row(config, 12) * 2
    assert decoder.caches.kv_usage().allocated_ratio == 1.0
    decoder.forward(torch.zeros(2, 4, dtype=torch.long))
    decoder.reset(torch.tensor([1]))
    assert decoder.caches.kv_usage().tokens == 4
    assert decoder.caches.unit(0).lengths.tolist() == [4, 0]

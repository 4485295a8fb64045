"""Training-side reader: rows, shuffling, blending, exact resume, data-parallel split, errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mor_megatron.data.dataset import PretrainingBatches, ValidationBatches, parse_blend
from mor_megatron.data.errors import DataError
from mor_megatron.data.shards import ShardWriter, read_documents
from mor_megatron.data.tokenizer import check_vocab

S, EOS = 16, 0


def write_shard(prefix: str, num_docs: int, seed: int, max_len: int = 60) -> np.ndarray:
    """A shard of random documents; returns its concatenated token stream (EOS included)."""
    rng = np.random.default_rng(seed)
    writer = ShardWriter(prefix, vocab_size=1000, eos_id=EOS)
    docs = [rng.integers(1, 1000, size=int(rng.integers(1, max_len))) for _ in range(num_docs)]
    for d in docs:
        writer.add(d)
    writer.close()
    return np.concatenate([np.append(d, EOS) for d in docs]).astype(np.int64)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    big, small = str(root / "big"), str(root / "small")
    return {"root": root, "big": big, "big_stream": write_shard(big, 80, 1),
            "small": small, "small_stream": write_shard(small, 6, 2, max_len=40)}


def rows_of(stream: np.ndarray) -> np.ndarray:
    n = (len(stream) - 1) // S
    return np.stack([stream[r * S: r * S + S + 1] for r in range(n)])


def steps(reader: PretrainingBatches, n: int) -> list[list[dict[str, torch.Tensor]]]:
    return [reader.next_global_batch() for _ in range(n)]


def test_shard_documents_end_with_eos(shards):
    docs = read_documents(shards["big"])
    assert len(docs) == 80 and all(d[-1] == EOS and (d[:-1] != EOS).all() for d in docs)
    assert np.array_equal(np.concatenate(docs), shards["big_stream"])


def test_rows_cut_the_stream_and_each_epoch_is_a_permutation(shards):
    rows = rows_of(shards["big_stream"])
    reader = PretrainingBatches([(1.0, shards["big"])], S, 2, 4, seed=5)
    n = len(rows)
    assert reader.streams[0].num_rows == n
    epoch1 = np.stack([reader.sample(i) for i in range(n)])
    epoch2 = np.stack([reader.sample(i) for i in range(n, 2 * n)])
    key = lambda a: sorted(map(tuple, a.tolist()))  # noqa: E731
    assert key(epoch1) == key(rows) == key(epoch2)
    assert not np.array_equal(epoch1, epoch2) and not np.array_equal(epoch1, rows)
    batch = next(iter(reader))
    assert batch["tokens"].shape == batch["labels"].shape == (2, S)
    assert batch["tokens"].dtype == batch["labels"].dtype == torch.int64
    assert torch.equal(batch["tokens"][:, 1:], batch["labels"][:, :-1])
    assert torch.equal(batch["tokens"], torch.from_numpy(epoch1[:2, :-1]))
    assert bool((batch["loss_mask"] == 1).all())
    other = PretrainingBatches([(1.0, shards["big"])], S, 2, 4, seed=6)
    assert not np.array_equal(epoch1, np.stack([other.sample(i) for i in range(n)]))


@pytest.mark.parametrize("dp_rank,dp_size", [(0, 1), (1, 2)])
def test_resume_is_exact_across_epoch_boundaries(shards, dp_rank, dp_size):
    blend = [(0.5, shards["big"]), (0.5, shards["small"])]  # small wraps every ~6 steps
    kw = dict(seq_length=S, micro_batch_size=2, global_batch_size=8, dp_rank=dp_rank, dp_size=dp_size, seed=9)
    full = PretrainingBatches(blend, **kw)
    expected = steps(full, 12)
    assert full.consumed_samples == 12 * 8
    resumed = PretrainingBatches(blend, consumed_samples=7 * 8, **kw)
    got = steps(resumed, 5)
    for a_step, b_step in zip(expected[7:], got):
        for a, b in zip(a_step, b_step):
            assert all(torch.equal(a[k], b[k]) for k in a)


def test_dp_ranks_are_disjoint_and_union_is_the_dp1_batch(shards):
    blend = [(1.0, shards["big"]), (2.0, shards["small"])]
    kw = dict(seq_length=S, micro_batch_size=2, global_batch_size=8, seed=3)
    rows = lambda mbs: sorted(t for mb in mbs for t in map(tuple, mb["tokens"].tolist()))  # noqa: E731
    for dp_size in (2, 4):
        single = PretrainingBatches(blend, **kw)
        ranks = [PretrainingBatches(blend, dp_rank=r, dp_size=dp_size, **kw) for r in range(dp_size)]
        assert ranks[0].num_microbatches == 8 // (2 * dp_size)
        for step in range(3):
            consumed = step * 8
            ids = np.concatenate(
                [r.sample_indices(consumed, m) for r in ranks for m in range(r.num_microbatches)]
            )
            assert sorted(ids.tolist()) == list(range(consumed, consumed + 8))  # disjoint, complete
            union = rows([mb for r in ranks for mb in r.next_global_batch()])
            assert union == rows(single.next_global_batch())


def test_blend_follows_weights_deterministically(shards):
    blend = [(0.25, shards["big"]), (0.75, shards["small"])]
    reader = PretrainingBatches(blend, S, 1, 1, seed=0)
    shard_ids = np.array([reader.index.locate(i)[0] for i in range(20000)])
    share = np.mean(shard_ids == 0)
    assert abs(share - 0.25) < 0.001
    again = PretrainingBatches(blend, S, 1, 1, seed=0)
    assert all(np.array_equal(reader.sample(i), again.sample(i)) for i in range(0, 20000, 997))
    assert parse_blend("0.25 a 0.75 b") == [(0.25, "a"), (0.75, "b")] and parse_blend("a") == [(1.0, "a")]


def test_validation_reader_is_fixed_order_and_split_over_ranks(shards):
    rows = rows_of(shards["big_stream"])
    v = ValidationBatches(shards["big"], S, micro_batch_size=2)
    first = [b["tokens"] for b in v]
    assert len(first) == len(v) == len(rows) // 2
    assert torch.equal(torch.cat(first), torch.from_numpy(rows[: 2 * len(v), :-1]))
    assert all(torch.equal(a, b["tokens"]) for a, b in zip(first, v))  # re-iterable, same order
    ranks = [ValidationBatches(shards["big"], S, 2, dp_rank=r, dp_size=2, max_microbatches=3)
             for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == 3
    mixed = [b["tokens"] for pair in zip(*ranks) for b in pair]
    assert torch.equal(torch.cat(mixed), torch.from_numpy(rows[:12, :-1]))


def one_line(exc: pytest.ExceptionInfo) -> str:
    msg = str(exc.value)
    assert "\n" not in msg and "fix:" in msg
    return msg


def test_error_missing_shard(tmp_path):
    with pytest.raises(DataError) as exc:
        PretrainingBatches([(1.0, str(tmp_path / "nope"))], S, 1, 1)
    assert str(tmp_path / "nope.idx") in one_line(exc)


def test_error_empty_shard(tmp_path):
    ShardWriter(str(tmp_path / "empty"), 1000, EOS).close()
    with pytest.raises(DataError, match="empty") as exc:
        PretrainingBatches(str(tmp_path / "empty"), S, 1, 1)
    one_line(exc)


def test_error_truncated_bin(tmp_path):
    prefix = str(tmp_path / "cut")
    write_shard(prefix, 10, 4)
    with open(prefix + ".bin", "r+b") as f:
        f.truncate(10)
    with pytest.raises(DataError, match="truncated") as exc:
        PretrainingBatches(prefix, S, 1, 1)
    one_line(exc)


def test_error_shard_shorter_than_one_row(tmp_path):
    prefix = str(tmp_path / "tiny")
    writer = ShardWriter(prefix, 1000, EOS)
    writer.add([5, 6, 7])
    writer.close()
    with pytest.raises(DataError, match="fewer than one row") as exc:
        PretrainingBatches(prefix, S, 1, 1)
    one_line(exc)
    with pytest.raises(DataError, match="fewer than micro_batch_size"):
        ValidationBatches(prefix, 2, 2)


def test_error_global_batch_not_divisible(shards):
    with pytest.raises(DataError, match="not divisible") as exc:
        PretrainingBatches(shards["big"], S, micro_batch_size=2, global_batch_size=6, dp_size=2)
    assert "6" in one_line(exc) and "2" in str(exc.value)
    with pytest.raises(DataError, match="weights"):
        PretrainingBatches([(0.0, shards["big"])], S, 1, 1)


def test_check_vocab():
    check_vocab(1000, 1024)
    with pytest.raises(ValueError, match="1000.*1024|1024.*1000") as exc:
        check_vocab(1024, 1000)
    assert "\n" not in str(exc.value) and "fix:" in str(exc.value)


def test_a_shard_path_with_spaces_is_named_as_such(tmp_path):
    """The blend syntax splits on whitespace, so a prefix with a space read as two broken pairs
    ("non-numeric weight"); now the message says what is wrong and how to fix it."""
    prefix = tmp_path / "my corpus" / "train"
    prefix.parent.mkdir()
    (prefix.parent / "train.idx").write_bytes(b"")
    with pytest.raises(DataError, match=r"contains whitespace, which the blend syntax .* cannot express; "
                                        r"fix: move or link the shards to a path without spaces"):
        parse_blend(str(prefix))
    with pytest.raises(DataError, match=r"a path with spaces cannot be written in it"):
        parse_blend(str(tmp_path / "elsewhere with space" / "train"))

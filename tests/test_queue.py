"""The embedding queue (swav_fast.queue) and the queue-length rule against REFERENCE section 3."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from swav_fast.config import Config, trimmed_queue_length
from swav_fast.queue import EmbeddingQueue, redistribute


def batch(value: float, bs: int, dim: int) -> torch.Tensor:
    """A recognisable batch: row j of batch `value` is value + j / 10 everywhere."""
    return (value + torch.arange(bs, dtype=torch.float32) / 10)[:, None].expand(bs, dim).clone()


def test_shift_newest_on_top_oldest_dropped():
    bs, dim, length = 2, 3, 6
    q = EmbeddingQueue(n_assign=2, length=length, dim=dim, batch_size=bs, device="cpu")
    assert q.buffer.shape == (2, length, dim) and q.length == length
    assert torch.equal(q.buffer, torch.zeros(2, length, dim))
    zero = torch.zeros(bs, dim)
    b = {n: batch(n, bs, dim) for n in (1, 2, 3, 4, 5)}
    c = {n: -batch(n, bs, dim) for n in (1, 2, 3, 4, 5)}  # block 1 gets different values
    expected_block0 = {
        1: [b[1], zero, zero],
        2: [b[2], b[1], zero],
        3: [b[3], b[2], b[1]],
        4: [b[4], b[3], b[2]],  # b[1] dropped
        5: [b[5], b[4], b[3]],
    }
    for n in (1, 2, 3, 4, 5):
        q.push([b[n], c[n]])
        torch.testing.assert_close(q.buffer[0], torch.cat(expected_block0[n]), rtol=0, atol=0)
        expected_block1 = [-x if x is not zero else zero for x in expected_block0[n]]
        torch.testing.assert_close(q.buffer[1], torch.cat(expected_block1), rtol=0, atol=0)


def test_push_matches_official_in_place_shift():
    # Official: queue[i, bs:] = queue[i, :-bs].clone(); queue[i, :bs] = embedding of crop i.
    bs, dim, length, n_assign = 3, 4, 12, 2
    q = EmbeddingQueue(n_assign, length, dim, bs, "cpu")
    official = torch.zeros(n_assign, length, dim)
    g = torch.Generator().manual_seed(0)
    for _ in range(7):
        zs = [F.normalize(torch.randn(bs, dim, generator=g), dim=1) for _ in range(n_assign)]
        for i in range(n_assign):
            official[i, bs:] = official[i, :-bs].clone()
            official[i, :bs] = zs[i]
        q.push(zs)
        assert torch.equal(q.buffer, official)


@pytest.mark.parametrize("length, bs", [(6, 2), (8, 8), (12, 3), (20, 4)])
def test_in_use_exactly_when_official_last_row_test_says_so(length, bs):
    # The official loop, before each step's push: use_the_queue |= not all(queue[i, -1] == 0).
    dim, n_assign = 5, 2
    q = EmbeddingQueue(n_assign, length, dim, bs, "cpu")
    use_the_queue = False
    g = torch.Generator().manual_seed(length)
    first = None
    for step in range(2 * length // bs + 2):
        for i in range(n_assign):
            if use_the_queue or not torch.all(q.buffer[i, -1, :] == 0):
                use_the_queue = True
        assert q.in_use == use_the_queue, f"step {step}"
        if use_the_queue and first is None:
            first = step
        q.push([F.normalize(torch.randn(bs, dim, generator=g), dim=1) for _ in range(n_assign)])
    # The queue is full after length / bs pushes.
    assert first == length // bs


def test_state_dict_round_trip(tmp_path):
    bs, dim, length = 2, 3, 8
    g = torch.Generator().manual_seed(1)
    zs = [[torch.randn(bs, dim, generator=g) for _ in range(2)] for _ in range(6)]
    a = EmbeddingQueue(2, length, dim, bs, "cpu")
    for z in zs[:3]:
        a.push(z)
    torch.save(a.state_dict(), tmp_path / "queue.pt")
    b = EmbeddingQueue(2, length, dim, bs, "cpu")
    b.load_state_dict(torch.load(tmp_path / "queue.pt"))
    assert torch.equal(a.buffer, b.buffer)
    assert b.n_pushed == a.n_pushed == 3
    assert not b.in_use
    # Same future: one more push fills both.
    for z in zs[3:]:
        a.push(z)
        b.push(z)
        assert torch.equal(a.buffer, b.buffer)
        assert a.in_use == b.in_use
    assert b.in_use
    # The state is a copy into the existing buffer, not an alias of the saved tensor.
    state = {"buffer": torch.ones(2, length, dim), "n_pushed": 4}
    b.load_state_dict(state)
    state["buffer"].zero_()
    assert torch.equal(b.buffer, torch.ones(2, length, dim)) and b.in_use


@pytest.mark.parametrize("shape", [(2, 6, 3), (1, 8, 3), (2, 8, 4)])
def test_load_state_dict_shape_mismatch(shape):
    q = EmbeddingQueue(2, 8, 3, 2, "cpu")
    with pytest.raises(ValueError, match="shape"):
        q.load_state_dict({"buffer": torch.zeros(shape), "n_pushed": 1})
    assert q.n_pushed == 0


@pytest.mark.parametrize("length, bs", [(5, 2), (0, 4), (3, 4)])
def test_length_must_be_positive_multiple_of_batch(length, bs):
    with pytest.raises(ValueError):
        EmbeddingQueue(2, length, 3, bs, "cpu")


def test_scores_use_current_prototypes():
    q = EmbeddingQueue(2, 4, 3, 2, "cpu")
    q.push([F.normalize(torch.randn(2, 3), dim=1) for _ in range(2)])
    w = torch.randn(5, 3)
    for i in range(2):
        torch.testing.assert_close(q.scores(i, w), q.buffer[i] @ w.t())


@pytest.mark.parametrize("queue_length, batch_size, world, expected", [
    (3840, 64, 4, 3840),
    (1000, 64, 2, 896),
    (3840, 64, 3, 3840 - 3840 % 192),
    (100, 32, 1, 96),
    (384, 64, 1, 384),
    (0, 64, 4, 0),
])
def test_trimmed_queue_length(queue_length, batch_size, world, expected):
    cfg = Config(queue_length=queue_length, batch_size=batch_size)
    got = trimmed_queue_length(cfg, world)
    assert got == expected
    assert got % (batch_size * world) == 0 and got <= queue_length
    if got:
        # Each rank's share is a whole number of its batches, so the per-rank queue can be built.
        EmbeddingQueue(2, got // world, 4, batch_size, "cpu")


def filled(n_ranks: int, n_pushed: int, bs: int, length: int, n_assign: int = 2, dim: int = 3) -> list[torch.Tensor]:
    """Saved per-rank queues after n_pushed pushes; each row is (step pushed, rank, row in batch) in the features."""
    out = []
    for r in range(n_ranks):
        q = EmbeddingQueue(n_assign, length, dim, bs, "cpu")
        for step in range(n_pushed):
            rows = torch.tensor([[step + 1.0, r, j] for j in range(bs)])[:, :dim]
            q.push([rows + 100 * i for i in range(n_assign)])
        out.append(q.buffer.clone())
    return out


def newest_first(buffers: list[torch.Tensor], valid: int) -> torch.Tensor:
    """The reference order: by row (age), then by rank, only the valid rows."""
    return torch.stack([b[:, row] for row in range(valid) for b in buffers], dim=1)


def test_redistribute_same_layout_is_the_saved_queue():
    saved = filled(2, 5, bs=2, length=6)
    for rank in range(2):
        buffer, n_pushed = redistribute(saved, 5, 2, rank, 2, 6, 2)
        assert torch.equal(buffer, saved[rank]) and n_pushed == 3  # full: in use at once


@pytest.mark.parametrize(("old_ranks", "new_ranks", "bs_old", "bs_new", "len_old", "len_new"), [
    (2, 1, 2, 2, 6, 12),  # fewer ranks, same global queue
    (1, 2, 2, 2, 12, 6),  # more ranks
    (4, 3, 2, 4, 8, 8),  # another batch size and a global queue that shrank
    (2, 2, 2, 2, 6, 12),  # a longer queue: not full any more
])
def test_redistribute_keeps_the_newest_rows_in_order(old_ranks, new_ranks, bs_old, bs_new, len_old, len_new):
    n_pushed = 7  # every old queue full
    saved = filled(old_ranks, n_pushed, bs_old, len_old)
    everything = newest_first(saved, len_old)
    got = [redistribute(saved, n_pushed, bs_old, r, new_ranks, len_new, bs_new) for r in range(new_ranks)]
    keep = min(everything.shape[1] // new_ranks, len_new)
    assert len({n for _, n in got}) == 1  # every rank starts using the queue at the same step
    for r, (buffer, n) in enumerate(got):
        assert buffer.shape == (2, len_new, 3)
        torch.testing.assert_close(buffer[:, :keep], everything[:, r::new_ranks][:, :keep], rtol=0, atol=0)
        assert torch.count_nonzero(buffer[:, keep:]) == 0
        q = EmbeddingQueue(2, len_new, 3, bs_new, "cpu")
        q.load_state_dict({"buffer": buffer, "n_pushed": n})
        assert q.in_use == (keep == len_new)
        # the official test ("is the last row non-zero") agrees with in_use at every later step
        for _ in range(len_new // bs_new + 1):
            assert q.in_use == bool(q.buffer[:, -1].abs().sum() > 0)
            if q.in_use:
                assert torch.count_nonzero(q.buffer.abs().sum(-1)) == q.buffer.shape[0] * len_new
                break
            q.push([torch.full((bs_new, 3), 9.0)] * 2)
        assert q.in_use


def test_redistribute_a_partly_filled_queue():
    saved = filled(2, 2, bs=2, length=8)  # 4 of 8 rows per rank written
    buffer, n_pushed = redistribute(saved, 2, 2, 0, 1, 16, 2)
    assert torch.count_nonzero(buffer[0].abs().sum(-1)) == 8 and n_pushed == 4  # the 8 written rows, 4 batches
    torch.testing.assert_close(buffer[:, :8], newest_first(saved, 4), rtol=0, atol=0)
    with pytest.raises(ValueError, match="multiple of the batch"):
        redistribute(saved, 2, 2, 0, 1, 10, 4)

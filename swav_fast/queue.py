"""The embedding queue of the small-batch recipe (REFERENCE section 3)."""

from __future__ import annotations

import torch


class EmbeddingQueue:
    """Per-rank FIFO of past embeddings z, one row block per assignment crop: [n_assign, length, dim].

    The official loop decides "in use" by testing whether the last row is non-zero (a host sync each step).
    Rows are L2-normalised embeddings, never zero once written, so that test is true exactly when at least
    length / batch_size batches have been pushed since the queue was created; that count lives on the host
    and gives the same answer with no sync.
    """

    def __init__(self, n_assign: int, length: int, dim: int, batch_size: int, device: torch.device | str):
        if length <= 0 or length % batch_size:
            raise ValueError(f"queue length per rank {length} must be a positive multiple of the batch {batch_size}")
        self.buffer = torch.zeros(n_assign, length, dim, device=device)
        self.batch_size = batch_size
        self.n_pushed = 0

    @property
    def length(self) -> int:
        return self.buffer.shape[1]

    @property
    def in_use(self) -> bool:
        return self.n_pushed * self.batch_size >= self.length

    @torch.no_grad()
    def scores(self, i: int, prototypes: torch.Tensor) -> torch.Tensor:
        """Scores of queue block i with the current prototypes [K, dim] (recomputed every step)."""
        return block_scores(self.buffer[i], prototypes)

    @torch.no_grad()
    def push(self, embeddings: list[torch.Tensor]) -> None:
        """Shift every block by one batch and write the newest embeddings (one [B, dim] per block) on top."""
        push_(self.buffer, embeddings)
        self.n_pushed += 1

    def state_dict(self) -> dict:
        return {"buffer": self.buffer, "n_pushed": self.n_pushed}

    def load_state_dict(self, state: dict) -> None:
        if state["buffer"].shape != self.buffer.shape:
            raise ValueError(f"saved queue has shape {tuple(state['buffer'].shape)}, this run needs "
                             f"{tuple(self.buffer.shape)} (queue_length, batch size or ranks changed)")
        self.buffer.copy_(state["buffer"])
        self.n_pushed = int(state["n_pushed"])


def redistribute(buffers: list[torch.Tensor], n_pushed: int, saved_batch: int, rank: int, world_size: int,
                 length: int, batch_size: int) -> tuple[torch.Tensor, int]:
    """This rank's queue (buffer, n_pushed) from every rank's saved queue, for a run resumed with another number of
    ranks, batch size or queue length.

    Each saved rank's buffer holds its newest embeddings on top; row j of every rank was pushed at the same step,
    so ordering the valid rows by (row, rank) lists the whole queue newest first. The new ranks take turns along
    that list (rank r gets entries r, r + world, ...), each keeping its newest `length` at most, and every rank
    keeps the same number of rows so that all of them start using the queue at the same step. `n_pushed` becomes
    the number of whole new batches those rows make up: the queue is in use when they fill it, and otherwise once
    enough batches are pushed to fill the rest, by which time the rows beyond `n_pushed * batch_size` have been
    shifted out (no zero or stale row is ever used).
    """
    if length <= 0 or length % batch_size:
        raise ValueError(f"queue length per rank {length} must be a positive multiple of the batch {batch_size}")
    stacked = torch.stack([b.cpu() for b in buffers])  # [old ranks, n_assign, old length, dim]
    n_old, n_assign, old_length, dim = stacked.shape
    valid = min(n_pushed * saved_batch, old_length)
    merged = stacked[:, :, :valid].permute(1, 2, 0, 3).reshape(n_assign, valid * n_old, dim)  # newest first
    keep = min(merged.shape[1] // world_size, length)
    buffer = torch.zeros(n_assign, length, dim, dtype=stacked.dtype)
    buffer[:, :keep] = merged[:, rank::world_size][:, :keep]
    return buffer, length // batch_size if keep == length else keep // batch_size


def block_scores(block: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
    return block @ prototypes.t().to(block.dtype)


def push_(buffer: torch.Tensor, embeddings: list[torch.Tensor]) -> None:
    """The queue update on the raw buffer (tensor work only, so a compiled step can run it)."""
    bs = embeddings[0].shape[0]
    for i, z in enumerate(embeddings):
        buffer[i, bs:] = buffer[i, :-bs].clone()
        buffer[i, :bs] = z.to(buffer.dtype)

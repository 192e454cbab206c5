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


def block_scores(block: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
    return block @ prototypes.t().to(block.dtype)


def push_(buffer: torch.Tensor, embeddings: list[torch.Tensor]) -> None:
    """The queue update on the raw buffer (tensor work only, so a compiled step can run it)."""
    bs = embeddings[0].shape[0]
    for i, z in enumerate(embeddings):
        buffer[i, bs:] = buffer[i, :-bs].clone()
        buffer[i, :bs] = z.to(buffer.dtype)

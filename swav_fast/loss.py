"""The swapped-prediction loss (REFERENCE section 4)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def swapped_prediction_loss(scores: torch.Tensor, codes: list[torch.Tensor], crops_for_assign: list[int],
                            n_crops: int, temperature: float) -> torch.Tensor:
    """scores: [n_crops*B, K] (crop-major), codes[i]: [B, K] for crop crops_for_assign[i].

    loss = mean over assignment crops a of  (1/(n_crops-1)) * sum_{v != a} mean_b( -sum_k q_a log softmax(s_v/T) ).
    """
    bs = scores.shape[0] // n_crops
    # One log_softmax over all crops (fp32) instead of one per (a, v) pair: the same numbers, fewer kernels.
    log_p = F.log_softmax(scores.float() / temperature, dim=1).view(n_crops, bs, -1)
    total = scores.new_zeros((), dtype=torch.float32)
    for a, q in zip(crops_for_assign, codes, strict=True):
        # the crops v != a, by two slices: indexing with a list of them would make an index tensor from Python
        # data, on CUDA a blocking copy from host memory that a CUDA graph cannot capture
        others = torch.cat((log_p[:a], log_p[a + 1:]))
        # sum over v != a of mean over the batch of the cross-entropy
        total = total - (q.unsqueeze(0) * others).sum(dim=2).mean(dim=1).sum() / (n_crops - 1)
    return total / len(crops_for_assign)

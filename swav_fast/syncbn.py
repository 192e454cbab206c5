"""SyncBatchNorm without a host sync: torch's synchronised batch norm minus the step that makes the host wait.

torch.nn.SyncBatchNorm gathers every rank's (mean, invstd, count) and then drops the ranks whose batch was empty
with a boolean mask (`count_all[mask]`, `mean_all[mask]`, `invstd_all[mask]`). A boolean mask gives a shape that
depends on the data, so each BatchNorm layer makes the host wait for the GPU three times (107 layer calls per step
for ResNet-50's trunk run on two crop resolutions plus the head), unless a CUDA graph is being captured, when
torch skips the mask; and the mask is why torch.compile(fullgraph=True) cannot trace torch's SyncBatchNorm.
Here every rank's batch has the same, non-zero size (drop_last), so the mask never drops anything: this forward
is torch's without it (the same kernels, the same gathered statistics, the same saved tensors) and the backward
is torch's own, inherited. An empty batch is refused instead of being masked out.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.modules._functions import SyncBatchNorm as _TorchSyncBatchNormFunction

# torch 2.14 renamed all_gather_into_tensor (now deprecated, with a FutureWarning) to all_gather_single; 2.11 has
# only the old name
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


class _SyncBatchNormFunction(_TorchSyncBatchNormFunction):
    """torch's SyncBatchNorm autograd Function with a forward that has no boolean mask (backward: torch's)."""

    @staticmethod
    def forward(ctx, input, weight, bias, running_mean, running_var, eps, momentum, process_group, world_size):
        if not (input.is_contiguous(memory_format=torch.channels_last)
                or input.is_contiguous(memory_format=torch.channels_last_3d)):
            input = input.contiguous()
        if weight is not None:
            weight = weight.contiguous()
        channels = input.shape[1]
        if input.numel() == 0:
            raise ValueError("SyncBatchNorm got an empty batch; every rank needs at least one sample per step")
        mean, invstd = torch.batch_norm_stats(input, eps)
        count = torch.full((1,), input.numel() // channels, dtype=mean.dtype, device=mean.device)
        local = torch.cat([mean, invstd, count])  # 2C + 1 values
        # Into a flat buffer, then viewed [W, 2C + 1]: torch.compile turns the call into a functional all-gather,
        # which returns the flat concatenation and cannot copy it into a [W, 2C + 1] output (fullgraph fails with
        # NCCL at the first step). Every backend takes this form (gloo too, so the CPU tests run the GPU's path).
        gathered = torch.empty(world_size * local.numel(), dtype=local.dtype, device=local.device)
        _all_gather_single(gathered, local, process_group)
        gathered = gathered.view(world_size, local.numel())
        mean_all, invstd_all, count_all = gathered.split(channels, dim=1)  # [W, C], [W, C], [W, 1]
        counts = count_all.reshape(-1)
        if running_mean is not None and counts.dtype != running_mean.dtype:
            counts = counts.to(running_mean.dtype)
        mean, invstd = torch.batch_norm_gather_stats_with_counts(input, mean_all, invstd_all, running_mean,
                                                                 running_var, momentum, eps, counts)
        ctx.save_for_backward(input, weight, mean, invstd, count_all.to(torch.int32))
        ctx.process_group = process_group
        return torch.batch_norm_elemt(input, weight, bias, mean, invstd, eps)


class SyncBatchNorm(nn.SyncBatchNorm):
    """nn.SyncBatchNorm whose synchronised training forward never waits for the device (module docstring).
    Everything else (evaluation, a single rank, momentum=None) is torch's."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not (self.training and self.momentum is not None and dist.is_available() and dist.is_initialized()):
            return super().forward(input)
        group = self.process_group if self.process_group else dist.group.WORLD
        world_size = dist.get_world_size(group)
        if world_size < 2:
            return super().forward(input)
        self._check_input_dim(input)
        self._check_non_zero_input_channels(input)
        running_mean = running_var = None
        if self.track_running_stats:
            self.num_batches_tracked.add_(1)
            running_mean, running_var = self.running_mean, self.running_var
        return _SyncBatchNormFunction.apply(input, self.weight, self.bias, running_mean, running_var, self.eps,
                                            self.momentum, group, world_size)


def convert_sync_batchnorm(module: nn.Module, process_group: dist.ProcessGroup | None = None) -> nn.Module:
    """torch.nn.SyncBatchNorm.convert_sync_batchnorm, with this module's SyncBatchNorm: every BatchNorm*d layer
    becomes one, sharing its parameters and buffers."""
    module = nn.SyncBatchNorm.convert_sync_batchnorm(module, process_group)
    for m in module.modules():
        if type(m) is nn.SyncBatchNorm:
            m.__class__ = SyncBatchNorm  # a subclass with no state of its own
    return module

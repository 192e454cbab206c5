"""CUDA streams that no other code is handed.

`torch.cuda.Stream()` does not create a stream: it hands out the next of 32 streams per device and priority level,
round robin (c10/cuda/CUDAStream.cpp), and FFCV's loader (four per epoch), torchvision's nvJPEG decoder and
PyTorch's own side streams take theirs from the default level too. Two of them can therefore be the same stream.
Where that matters here:

- the ffcv pipeline's decode stream: torchvision allocates the decoded images on the current stream and has
  nvJPEG write them from a stream of its own, so the decode stream must carry nothing but decodes (memory freed on
  it by other work, still read by queued kernels, would be handed to the decoder: pipelines/ffcv.py decode_rgb);
- GraphStep's warm-up and capture stream: a loader thread waiting on an event on that same stream during the
  capture would join the capture or invalidate it.

`private_stream` takes its streams from priority level 1, which nothing else in PyTorch, torchvision or FFCV asks
for (the default is level 0; "high priority" streams, which NCCL uses only when told to, come from the highest
level, 3 on current GPUs). With at most a few per process (one decode stream per loader, one per GraphStep) they
never wrap around to each other. On a GPU with only two priority levels, level 1 is the highest, which NCCL's
opt-in high-priority streams share.
"""

from __future__ import annotations

import torch

PRIORITY = -1  # lower is higher priority; 0 is the default level


def private_stream(device: torch.device | str | int | None = None) -> torch.cuda.Stream:
    """A stream of `device` from a priority level that no other library takes streams from (see the module)."""
    return torch.cuda.Stream(device, priority=PRIORITY)

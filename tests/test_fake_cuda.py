"""The step on CUDA tensors without a GPU: under FakeTensorMode tensors carry a CUDA device and no kernel runs, so
every op of a step is dispatched as it would be on a GPU. No op of the step may read or make a CPU tensor: on a GPU
that is a copy between host and device (a blocking copy from pageable memory, and an error under CUDA-graph
capture), which a CPU run cannot see because there every tensor is on the host.

Two stand-ins: backward (the autograd engine needs a CUDA driver) adds a constant to every gradient, so the
forward, codes, loss, freeze mask, LARS and queue push are checked but not the backward formulas; and bf16 autocast
is switched on through torch's autocast state (torch.autocast checks the GPU when it is made).
"""

from __future__ import annotations

import contextlib
from collections import Counter

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

from swav_fast.config import Config
from swav_fast.model import SwAVModel
from swav_fast.optim import LARS
from swav_fast.queue import EmbeddingQueue
from swav_fast.step import GraphStep, train_step

CFG = Config(arch="resnet18", hidden_mlp=16, feat_dim=8, nmb_prototypes=6, nmb_crops=[2, 1], size_crops=[32, 16],
             min_scale_crops=[0.5, 0.2], max_scale_crops=[1.0, 0.5], freeze_prototypes_niters=2, queue_length=8,
             batch_size=4, epsilon=0.05)


class HostTensorOps(TorchDispatchMode):
    """Records every op that takes a CPU tensor or makes one (device="cpu"), with the project line that ran it."""

    def __init__(self):
        super().__init__()
        self.found: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        flat = [*args, *kwargs.values()]
        tensors = [t for a in flat for t in (a if isinstance(a, (list, tuple)) else [a]) if isinstance(t, torch.Tensor)]
        makes_cpu = kwargs.get("device") is not None and torch.device(kwargs["device"]).type == "cpu"
        if makes_cpu or any(t.device.type == "cpu" for t in tensors):
            import traceback

            ours = [f"{f.filename.rsplit('/', 2)[-2]}/{f.filename.rsplit('/', 1)[-1]}:{f.lineno}"
                    for f in traceback.extract_stack()[:-1] if "/swav_fast/" in f.filename or "/tests/" in f.filename]
            self.found[f"{func} at {ours[-1] if ours else '?'}"] += 1
        return func(*args, **kwargs)


@contextlib.contextmanager
def cuda_bf16_autocast():
    """swav_fast.step.step_autocast("cuda") (bf16, weight-cast cache off) without torch.autocast's GPU check (it asks
    the driver whether bf16 is supported)."""
    prev, prev_dtype = torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda")
    prev_cache = torch.is_autocast_cache_enabled()
    torch.set_autocast_enabled("cuda", True)
    torch.set_autocast_dtype("cuda", torch.bfloat16)
    torch.set_autocast_cache_enabled(False)
    torch.autocast_increment_nesting()
    try:
        yield
    finally:
        if torch.autocast_decrement_nesting() == 0:
            torch.clear_autocast_cache()
        torch.set_autocast_enabled("cuda", prev)
        torch.set_autocast_dtype("cuda", prev_dtype)
        torch.set_autocast_cache_enabled(prev_cache)


@pytest.fixture
def fake_cuda(monkeypatch):
    """(model, optimiser, queue, crops) as fake CUDA tensors, channels_last, with the stand-in backward."""
    with FakeTensorMode(), torch.device("cuda"):
        model = SwAVModel(CFG.arch, CFG.hidden_mlp, CFG.feat_dim, CFG.nmb_prototypes)
        for p in model.parameters():  # model.to(memory_format=...) cannot swap fake parameters; the same by hand
            if p.dim() == 4:
                p.data = p.data.contiguous(memory_format=torch.channels_last)
        optimizer = LARS(model.parameters(), lr=0.5, momentum=0.9, weight_decay=1e-6, trust_coefficient=0.001)
        queue = EmbeddingQueue(2, 8, CFG.feat_dim, 4, "cuda")
        crops = [torch.randn(4, 3, s, s).contiguous(memory_format=torch.channels_last) for s in (32, 32, 16)]
        params = list(model.parameters())

        def stand_in_backward(loss, *args, **kwargs):
            assert loss.requires_grad and loss.device.type == "cuda"
            for p in params:
                p.grad.add_(1.0)

        monkeypatch.setattr(torch.Tensor, "backward", stand_in_backward)
        yield model, optimizer, queue, crops


def test_the_detector_sees_a_tensor_made_from_python_data(fake_cuda):
    # the loss once indexed the crops v != a with a Python list: an index tensor made on the host every step
    *_, crops = fake_cuda
    ops = HostTensorOps()
    with ops:
        crops[0][[0, 2]]
    assert any("lift_fresh" in k for k in ops.found) and any("_to_copy" in k for k in ops.found), ops.found
    ops = HostTensorOps()
    with ops:
        crops[0][0:2]
    assert not ops.found


@pytest.mark.parametrize("sinkhorn_impl", ["reference", "triton"])
@pytest.mark.parametrize("runner", ["eager", "graph"])
def test_the_step_on_cuda_tensors_touches_no_host_tensor(fake_cuda, runner, sinkhorn_impl):
    model, optimizer, queue, crops = fake_cuda
    cfg = Config(**{**CFG.__dict__, "sinkhorn_impl": sinkhorn_impl})
    core = GraphStep(capture=False) if runner == "graph" else None  # graph: the flags as device tensors
    conv_dtypes = []
    model.conv1.register_forward_hook(lambda m, i, out: conv_dtypes.append(out.dtype))
    # steps 0-1: prototypes frozen, queue filling; 2-3: queue in use, prototypes free
    for it in range(4):
        ops = HostTensorOps()
        with ops:
            loss = train_step(model, optimizer, crops, 0.1, it, cfg, queue, autocast=cuda_bf16_autocast(), core=core)
        assert not ops.found, f"step {it}: {dict(ops.found)}"
        assert loss.device.type == "cuda" and loss.dtype == torch.float32 and loss.shape == ()
    assert queue.in_use and queue.buffer.device.type == "cuda"
    assert conv_dtypes == [torch.bfloat16] * 8  # two resolution groups a step: autocast was on
    assert all(p.device.type == "cuda" for p in model.parameters())
    assert model.conv1.weight.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("resample", ["matmul", "roi_align"])
def test_gpu_augment_on_cuda_images_mixes_no_devices(resample):
    # the FFCV pipeline's crops and colour ops on nvJPEG's output: an op mixing a CPU constant with the CUDA
    # images fails on a GPU ("Expected all tensors to be on the same device") and on fake CUDA tensors alike
    from pipelines.gpu_augment import GPUMultiCrop, augment_generator
    from pipelines.spec import MultiCropSpec

    spec = MultiCropSpec.from_config(Config())  # 2 x 224 + 6 x 96, every augmentation on
    augment = GPUMultiCrop(spec, resample=resample)
    sizes = torch.tensor([[300, 400], [375, 500], [200, 260], [500, 333]])
    params = augment.sample_params(sizes, augment_generator(0, 0, 0, 0, "cpu"))  # a CUDA generator needs a GPU
    assert params.jitter.any() and params.gray.any() and params.blur.any() and params.flip.any()
    with FakeTensorMode(allow_non_fake_inputs=True):
        images = [torch.empty(3, h, w, dtype=torch.uint8, device="cuda") for h, w in sizes.tolist()]
        crops = augment.apply(images, params.to("cuda"))
    assert [c.shape for c in crops] == [(4, 3, 224, 224)] * 2 + [(4, 3, 96, 96)] * 6
    assert all(c.device.type == "cuda" and c.dtype == torch.float32 for c in crops)
    assert all(c.is_contiguous(memory_format=torch.channels_last) for c in crops)

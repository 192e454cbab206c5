"""The reference pipeline honours the Loader / MultiCropBatch contract (ARCHITECTURE.md)."""

from __future__ import annotations

import shutil
from types import SimpleNamespace

import pytest
import torch

import pipelines
from pipelines.reference import DataError, ReferenceLoader, sample_seed, scan_image_folder
from pipelines.spec import CropGroup, MultiCropSpec

SPEC = MultiCropSpec(groups=(CropGroup(32, 2, 0.3, 1.0), CropGroup(16, 3, 0.1, 0.3)))


def make_loader(root, **kw) -> ReferenceLoader:
    args = dict(spec=SPEC, data_path=str(root), batch_size=8, device=torch.device("cpu"), workers=0, seed=5)
    args.update(kw)
    return ReferenceLoader(**args)


def test_contract_shapes_layout_range(digits_dir):
    loader = make_loader(digits_dir)
    assert len(loader) == 100 // 8
    batch = next(iter(loader))
    assert len(batch.crops) == SPEC.n_crops
    assert [c.shape[-1] for c in batch.crops] == [32, 32, 16, 16, 16]  # large crops first
    mean = torch.tensor(SPEC.mean).view(1, 3, 1, 1)
    std = torch.tensor(SPEC.std).view(1, 3, 1, 1)
    for c in batch.crops:
        assert c.shape[:2] == (8, 3) and c.dtype == torch.float32 and c.device.type == "cpu"
        assert c.is_contiguous(memory_format=torch.channels_last)
        # normalised pixels of [0, 1] images lie between (0 - mean)/std and (1 - mean)/std per channel
        assert (c >= (0 - mean) / std - 1e-5).all() and (c <= (1 - mean) / std + 1e-5).all()
        # and the crops are not constant: augmentation produced real image content
        assert c.std() > 0.1
    assert batch.index.shape == (8,) and batch.skipped == []


def test_views_are_a_function_of_seed_epoch_index(digits_dir):
    a = next(iter(make_loader(digits_dir)))
    b = next(iter(make_loader(digits_dir, workers=2)))  # worker count must not matter
    assert torch.equal(a.index, b.index)
    for x, y in zip(a.crops, b.crops, strict=True):
        assert torch.equal(x, y)
    other = make_loader(digits_dir)
    other.set_epoch(1)
    c = next(iter(other))
    assert not torch.equal(a.index, c.index)  # new order
    d = next(iter(make_loader(digits_dir, seed=6)))
    assert not torch.equal(a.crops[0], d.crops[0])


def test_global_rng_untouched(digits_dir):
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    next(iter(make_loader(digits_dir)))
    assert torch.equal(torch.rand(3), expected)


def test_two_rank_shards_are_disjoint(digits_dir):
    shards = []
    for rank in range(2):
        loader = make_loader(digits_dir, rank=rank, world_size=2, batch_size=10)
        loader.set_epoch(3)
        assert len(loader) == 5
        shards.append(torch.cat([b.index for b in loader]).tolist())
    assert not set(shards[0]) & set(shards[1])
    assert len(set(shards[0]) | set(shards[1])) == 100


def test_sample_seed_mixes_all_inputs():
    seeds = {sample_seed(s, e, i) for s in range(3) for e in range(3) for i in range(50)}
    assert len(seeds) == 3 * 3 * 50
    assert all(0 <= s < 2**63 for s in seeds)


def test_corrupt_jpeg_is_skipped_named_and_counted(digits_dir, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(digits_dir, root)
    victim = sorted((root / "3").iterdir())[0]
    victim.write_bytes(victim.read_bytes()[:40])  # truncated JPEG
    loader = make_loader(root, batch_size=100)
    with pytest.warns(UserWarning, match=victim.name):
        batch = next(iter(loader))
    assert len(batch.skipped) == 1 and str(victim) in batch.skipped[0]
    assert batch.batch_size == 100  # the batch stays full: the image was replaced
    assert len(loader.skipped) == 1
    assert victim.stat().st_size == 40  # nothing is deleted or rewritten


@pytest.mark.parametrize("case", ["missing", "file", "no_classes", "no_images", "empty_string"])
def test_bad_data_directory_errors_name_the_path(tmp_path, case):
    path = tmp_path / "data"
    if case == "file":
        path.write_text("x")
    elif case == "no_classes":
        path.mkdir()
    elif case == "no_images":
        (path / "cls").mkdir(parents=True)
        (path / "cls" / "notes.txt").write_text("x")
    if case == "empty_string":
        path = ""
    with pytest.raises(DataError, match="data_path" if case == "empty_string" else str(path)):
        scan_image_folder(path)


def test_dataset_smaller_than_a_batch(digits_dir):
    with pytest.raises(DataError, match="fewer than one global batch"):
        make_loader(digits_dir, batch_size=64, world_size=2)


def test_build_by_name(digits_dir):
    cfg = SimpleNamespace(pipeline="reference", data_path=str(digits_dir), batch_size=4, seed=0, workers=0,
                          max_steps_per_epoch=3)
    loader = pipelines.build(SPEC, cfg, torch.device("cpu"))
    assert len(loader) == 3 and sum(1 for _ in loader) == 3
    with pytest.raises(ValueError, match="--pipeline"):
        pipelines.build(SPEC, SimpleNamespace(**{**vars(cfg), "pipeline": "nope"}), torch.device("cpu"))


def test_batches_are_pinned_by_the_dataloader_and_stacked_channels_last(digits_dir, monkeypatch):
    """On CUDA the DataLoader pins each batch in its pinning thread, which pins only tensors, standard containers
    and objects with a pin_memory() method; a MultiCropBatch must be one of those, or its crops stay pageable and
    the copy to the GPU blocks. Pinning needs a GPU, so Tensor.pin_memory is replaced by a marker here. The crops
    come out of the workers' collate already channels_last, so the copy keeps that layout."""
    from torch.utils.data._utils.pin_memory import pin_memory

    from pipelines.reference import collate

    pinned = []

    def fake_pin(self, device=None):
        out = self.clone(memory_format=torch.preserve_format)
        pinned.append(out)
        return out

    monkeypatch.setattr(torch.Tensor, "pin_memory", fake_pin)
    loader = make_loader(digits_dir)
    items = [loader.dataset[i] for i in range(3)]
    batch = collate(items)
    for i, c in enumerate(batch.crops):
        assert c.is_contiguous(memory_format=torch.channels_last) and not c.is_contiguous()
        assert torch.equal(c, torch.stack([it[0][i] for it in items]))
    out = pin_memory(batch)  # what the DataLoader's pinning thread calls
    assert type(out).__name__ == "MultiCropBatch" and out is not batch
    assert len(pinned) == len(batch.crops) and all(a is b for a, b in zip(out.crops, pinned, strict=True))
    assert all(torch.equal(a, b) and a.stride() == b.stride() for a, b in zip(out.crops, batch.crops, strict=True))
    assert torch.equal(out.index, batch.index) and out.skipped == batch.skipped

"""pipelines/gpu_augment.py against its contract and against the PIL reference chain (REFERENCE section 6).

Real photographs (scikit-image and scikit-learn sample photos, written as JPEGs of several sizes and aspect
ratios, decoded by torchvision.io.decode_jpeg as the FFCV pipeline does). Three kinds of checks:
- contract: shapes, order, dtype, layout, device, value range, reproducibility;
- statistics against the reference chain (pipelines.reference.crop_transforms, run with its random choices
  recorded): two-sample KS tests on sampled parameters and per-crop pixel statistics, binomial tests on rates;
- op by op against torchvision / PIL on the same pixels, with parameters replayed through `GPUMultiCrop.apply`.
Thresholds: KS at alpha = 1e-4 (D_crit = 2.225 * sqrt((n + m) / (n m))), rates and means at 4 sigma, the
jitter order by a chi-square homogeneity test over the 24 orders at alpha = 1e-4. The seeds are fixed, so a pass
is reproducible; over 8 other seeds the largest statistic reached 0.81 of its threshold.
"""

from __future__ import annotations

import math
from dataclasses import fields
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from conftest import source_photos
from PIL import Image, ImageFilter
from torchvision import transforms
from torchvision.io import decode_jpeg

import pipelines.reference as reference
from pipelines.gpu_augment import (
    BRIGHTNESS,
    CONTRAST,
    HUE,
    LUMA,
    SATURATION,
    AugmentParams,
    GPUMultiCrop,
    augment_generator,
    augment_seed,
)
from pipelines.spec import CropGroup, MultiCropSpec

KS_C = math.sqrt(-0.5 * math.log(1e-4 / 2))  # 2.225: two-sample KS critical value factor for alpha = 1e-4
CHI2_23 = 57.07  # chi-square quantile, 23 degrees of freedom, 1 - 1e-4
SPEC = MultiCropSpec(groups=(CropGroup(48, 2, 0.14, 1.0), CropGroup(24, 3, 0.05, 0.14)))
# (height, width) of the test photos: landscape, portrait, square, wide, and a strip where the fallback happens
SIZES = [(375, 500), (500, 375), (333, 500), (400, 400), (300, 451), (427, 640), (240, 320), (120, 480)]


# ------------------------------------------------------------------------------------------------- helpers
def ks_stat(a, b) -> float:
    """Two-sample Kolmogorov-Smirnov statistic sup |F_a - F_b|."""
    a, b = np.sort(np.asarray(a, np.float64)), np.sort(np.asarray(b, np.float64))
    grid = np.concatenate([a, b])
    return float(np.abs(np.searchsorted(a, grid, "right") / len(a) - np.searchsorted(b, grid, "right") / len(b)).max())


def ks_crit(n: int, m: int) -> float:
    return KS_C * math.sqrt((n + m) / (n * m))


def assert_same_distribution(a, b, what: str):
    d, crit = ks_stat(a, b), ks_crit(len(a), len(b))
    assert d < crit, f"{what}: KS D = {d:.4f} >= {crit:.4f} (n = {len(a)}, {len(b)})"


def assert_same_rate(a, b, what: str):
    """Two-sample binomial test at 4 sigma on boolean samples."""
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    pooled = (a.sum() + b.sum()) / (len(a) + len(b))
    sigma = math.sqrt(max(pooled * (1 - pooled), 1e-12) * (1 / len(a) + 1 / len(b)))
    assert abs(a.mean() - b.mean()) < 4 * sigma, f"{what}: rate {a.mean():.4f} vs reference {b.mean():.4f}"


def assert_rate(x, p: float, what: str):
    x = np.asarray(x, bool)
    sigma = math.sqrt(p * (1 - p) / len(x))
    assert abs(x.mean() - p) <= 4 * sigma, f"{what}: rate {x.mean():.4f}, expected {p} +- {4 * sigma:.4f}"


def unnormalise(x: torch.Tensor, spec: MultiCropSpec) -> torch.Tensor:
    return x * torch.tensor(spec.std).view(1, 3, 1, 1) + torch.tensor(spec.mean).view(1, 3, 1, 1)


def with_(spec: MultiCropSpec, **kw) -> MultiCropSpec:
    return MultiCropSpec(**{**spec.__dict__, **kw})


def gen(step: int = 0, seed: int = 0) -> torch.Generator:
    return augment_generator(seed, 0, 0, step, "cpu")


def plain(params: AugmentParams) -> AugmentParams:
    """Parameters with the same boxes and draws but every optional augmentation off."""
    p = params.clone()
    for m in (p.flip, p.jitter, p.gray, p.blur):
        m.zero_()
    return p


# ----------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def photo_dir(tmp_path_factory) -> Path:
    """JPEGs of real photos resized (aspect ratio changed where needed) to SIZES."""
    root = tmp_path_factory.mktemp("photos")
    src = source_photos()
    for i, (h, w) in enumerate(SIZES):
        Image.fromarray(src[i % len(src)]).convert("RGB").resize((w, h), Image.BICUBIC).save(
            root / f"{i}.jpg", quality=92)
    return root


@pytest.fixture(scope="module")
def photos(photo_dir) -> list[torch.Tensor]:
    """uint8 [3, H, W] tensors, decoded from JPEG bytes as the FFCV pipeline does."""
    data = [torch.frombuffer(bytearray((photo_dir / f"{i}.jpg").read_bytes()), dtype=torch.uint8)
            for i in range(len(SIZES))]
    return decode_jpeg(data, device="cpu")


@pytest.fixture(scope="module")
def small_photos(photos) -> list[torch.Tensor]:
    """The same photos at 40 % size: the many-crop statistics tests run on them (the crop rule is scale-free)."""
    return [TF.resize(p, [round(p.shape[1] * 0.4), round(p.shape[2] * 0.4)], antialias=True) for p in photos]


# ------------------------------------------------------------------------------------------------ contract
def test_contract_shapes_order_layout_range(photos):
    spec = MultiCropSpec(groups=(CropGroup(224, 2, 0.14, 1.0), CropGroup(96, 3, 0.05, 0.14)))
    crops, params = GPUMultiCrop(spec)(photos, gen(), return_params=True)
    b = len(photos)
    assert len(crops) == spec.n_crops
    assert [c.shape[-1] for c in crops] == [224, 224, 96, 96, 96]  # large crops first
    lo = (0 - torch.tensor(spec.mean)) / torch.tensor(spec.std)
    hi = (1 - torch.tensor(spec.mean)) / torch.tensor(spec.std)
    for c in crops:
        assert c.shape[:2] == (b, 3) and c.shape[2] == c.shape[3]
        assert c.dtype == torch.float32 and c.device == photos[0].device
        assert c.is_contiguous(memory_format=torch.channels_last)
        # normalised [0, 1] pixels, per channel (std[0] = 0.228)
        assert (c >= lo.view(1, 3, 1, 1) - 1e-5).all() and (c <= hi.view(1, 3, 1, 1) + 1e-5).all()
        assert c.std() > 0.1  # real content, not constant
    assert params.boxes.shape == (spec.n_crops, b, 4) and params.boxes.dtype == torch.int64
    for name in ("flip", "jitter", "gray", "blur", "blur_sigma"):
        assert getattr(params, name).shape == (spec.n_crops, b)
    assert params.jitter_factors.shape == params.jitter_order.shape == (spec.n_crops, b, 4)
    sizes = torch.tensor([p.shape[1:] for p in photos])
    top, left, h, w = params.boxes.unbind(-1)
    assert (top >= 0).all() and (left >= 0).all() and (h >= 1).all() and (w >= 1).all()
    assert (top + h <= sizes[:, 0]).all() and (left + w <= sizes[:, 1]).all()
    # `apply` replays the same parameters to the same views
    for x, y in zip(crops, GPUMultiCrop(spec).apply(photos, params), strict=True):
        assert torch.equal(x, y)


def test_reproducible_per_seed_epoch_rank_step(small_photos):
    aug = GPUMultiCrop(SPEC)
    a, b = aug(small_photos, gen(3)), aug(small_photos, gen(3))
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    for other in (gen(4), gen(3, seed=1), augment_generator(0, 1, 0, 3, "cpu"), augment_generator(0, 0, 1, 3, "cpu")):
        c = aug(small_photos, other)
        assert all(not torch.equal(x, y) for x, y in zip(a, c, strict=True))
    seeds = {augment_seed(s, e, r, t) for s in range(2) for e in range(3) for r in range(4) for t in range(50)}
    assert len(seeds) == 2 * 3 * 4 * 50 and all(0 <= s < 2**63 for s in seeds)


def test_input_validation(small_photos):
    aug = GPUMultiCrop(SPEC)
    with pytest.raises(ValueError, match="dtype"):
        aug([small_photos[0], small_photos[1].float()], gen())
    with pytest.raises(ValueError, match=r"\[3, H, W\]"):
        aug([small_photos[0][:2]], gen())
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="generator"):
            aug(small_photos, augment_generator(0, 0, 0, 0, "cuda"))
    with pytest.raises(ValueError, match="resample"):
        GPUMultiCrop(SPEC, resample="nearest")
    # a grayscale JPEG decodes to [1, H, W]: it is used as RGB with 3 equal channels, as PIL's convert("RGB")
    gray = small_photos[0][:1]
    crops = aug([gray], gen())
    x = unnormalise(crops[0], SPEC)
    assert crops[0].shape == (1, 3, 48, 48) and torch.allclose(x[:, 0], x[:, 1], atol=1e-5)


# ------------------------------------------------------------------------------- crop boxes vs torchvision
def test_crop_boxes_follow_torchvision_rule(small_photos):
    """KS on area fraction, log aspect ratio and relative position of 2000+ boxes per group vs
    RandomResizedCrop.get_params on the same image sizes (including a 48 x 192 strip that needs the fallback)."""
    reps = 36
    images = small_photos * reps  # 288 images x (2 + 3) crops
    params = GPUMultiCrop(SPEC).sample_params(torch.tensor([p.shape[1:] for p in images]), gen(7))
    torch.manual_seed(0)
    first = 0
    for g in SPEC.groups:
        ours, ref = [], []
        for k in range(first, first + g.count):
            for b, img in enumerate(images):
                hh, ww = img.shape[1:]
                ours.append((*params.boxes[k, b].tolist(), hh, ww))
                i, j, h, w = transforms.RandomResizedCrop.get_params(img, (g.min_scale, g.max_scale), SPEC.ratio)
                ref.append((i, j, h, w, hh, ww))
        first += g.count
        ours, ref = np.array(ours, np.float64), np.array(ref, np.float64)
        assert len(ours) >= 576
        for name, f in [("area fraction", lambda a: a[:, 2] * a[:, 3] / (a[:, 4] * a[:, 5])),
                        ("log aspect ratio", lambda a: np.log(a[:, 3] / a[:, 2])),
                        ("relative top", lambda a: (a[:, 0] + 0.5) / (a[:, 4] - a[:, 2] + 1)),
                        ("relative left", lambda a: (a[:, 1] + 0.5) / (a[:, 5] - a[:, 3] + 1))]:
            assert_same_distribution(f(ours), f(ref), f"{g.size}px crops, {name}")


def test_crop_fallback_is_torchvision_central_crop():
    """No attempt fits a 10 x 400 image at scale >= 0.9: torchvision's central crop with the ratio clamped."""
    spec = MultiCropSpec(groups=(CropGroup(16, 4, 0.9, 1.0),))
    params = GPUMultiCrop(spec).sample_params(torch.tensor([[10, 400], [400, 10], [300, 300]]), gen())
    assert (params.boxes[:, 0] == torch.tensor([0, 193, 10, 13])).all()  # w = round(10 * 4/3), j = (400 - 13) // 2
    assert (params.boxes[:, 1] == torch.tensor([193, 0, 13, 10])).all()  # h = round(10 / (3/4))
    assert (params.boxes[:, 2, 2:] >= 260).all()  # a square image fits at the first attempts: a random box


# ------------------------------------------------------------------------------ statistics vs reference
N_REF = 1200  # reference calls: 1200 x 48 px crops and 1200 x 24 px crops (~4 s of PIL)
STAT_SPEC = MultiCropSpec(groups=(CropGroup(48, 1, 0.14, 1.0), CropGroup(24, 1, 0.05, 0.14)))


def _run_reference(pil_images: list[Image.Image], monkeypatch) -> tuple[list[dict], list[torch.Tensor]]:
    """Run the reference chain N_REF times per crop, recording every random choice it makes."""
    rec: dict = {}
    rrc_params = transforms.RandomResizedCrop.get_params
    jitter_params = transforms.ColorJitter.get_params
    hflip, to_gray, blur = TF.hflip, TF.rgb_to_grayscale, ImageFilter.GaussianBlur

    def record_rrc(img, scale, ratio):
        rec["box"] = rrc_params(img, scale, ratio)
        return rec["box"]

    def record_jitter(*a):
        out = jitter_params(*a)
        rec["order"], rec["factors"] = out[0].tolist(), out[1:]
        return out

    def record_blur(radius):
        rec["sigma"] = radius
        return blur(radius=radius)

    monkeypatch.setattr(transforms.RandomResizedCrop, "get_params", staticmethod(record_rrc))
    monkeypatch.setattr(transforms.ColorJitter, "get_params", staticmethod(record_jitter))
    monkeypatch.setattr(TF, "hflip", lambda img: rec.__setitem__("flip", True) or hflip(img))
    monkeypatch.setattr(TF, "rgb_to_grayscale", lambda img, **kw: rec.__setitem__("gray", True) or to_gray(img, **kw))
    monkeypatch.setattr(ImageFilter, "GaussianBlur", record_blur)
    chains = reference.crop_transforms(STAT_SPEC)
    records, outputs = [], [[] for _ in chains]
    torch.manual_seed(1234)
    for n in range(N_REF):
        img = pil_images[n % len(pil_images)]
        for k, t in enumerate(chains):
            rec.clear()
            outputs[k].append(t(img))
            records.append({"crop": k, "size": (img.height, img.width), **rec})
    return records, [torch.stack(o) for o in outputs]


def _crop_stats(x: torch.Tensor) -> dict[str, np.ndarray]:
    """Per-crop statistics of [N, 3, S, S] pixels in [0, 1], quantised to 8 bits like the reference's output."""
    x = torch.round(x * 255) / 255
    gray = (x * torch.tensor(LUMA).view(1, 3, 1, 1)).sum(1)
    return {
        "mean R": x[:, 0].mean((1, 2)), "mean G": x[:, 1].mean((1, 2)), "mean B": x[:, 2].mean((1, 2)),
        "std R": x[:, 0].std((1, 2)), "std G": x[:, 1].std((1, 2)), "std B": x[:, 2].std((1, 2)),
        "luminance": gray.mean((1, 2)),
        "colourfulness": (x - gray[:, None]).abs().mean((1, 2, 3)),
        # high-frequency energy: mean squared difference of horizontal and vertical neighbours
        "hf energy": ((x[..., 1:, :] - x[..., :-1, :]) ** 2).mean((1, 2, 3))
        + ((x[..., :, 1:] - x[..., :, :-1]) ** 2).mean((1, 2, 3)),
        "is gray": ((x - x[:, :1]).abs().amax((1, 2, 3)) < 1.5 / 255),
    }


@pytest.fixture(scope="module")
def paired_runs(small_photos):
    """(reference records, reference crops, our params, our crops) for the same multiset of images."""
    # the reference sees PIL copies of exactly the pixels our pipeline gets
    pil = [TF.to_pil_image(p) for p in small_photos]
    with pytest.MonkeyPatch.context() as mp:
        records, ref_crops = _run_reference(pil, mp)
    aug = GPUMultiCrop(STAT_SPEC)
    images = [small_photos[n % len(small_photos)] for n in range(N_REF)]
    crops, params = [[], []], []
    for step, start in enumerate(range(0, N_REF, 200)):
        c, p = aug(images[start:start + 200], gen(step), return_params=True)
        params.append(p)
        for k in range(2):
            crops[k].append(unnormalise(c[k], STAT_SPEC))
    params = AugmentParams(**{f.name: torch.cat([getattr(p, f.name) for p in params], 1)
                              for f in fields(AugmentParams)})
    ref_crops = [unnormalise(c, STAT_SPEC) for c in ref_crops]
    return records, ref_crops, params, [torch.cat(c) for c in crops]


def test_sampled_parameters_match_reference(paired_runs):
    records, _, params, _ = paired_runs
    for k, g in enumerate(STAT_SPEC.groups):
        ref = [r for r in records if r["crop"] == k]
        rb = np.array([(*r["box"], *r["size"]) for r in ref], np.float64)
        sizes = np.array([r["size"] for r in ref], np.float64)  # same image order in both runs
        ob = np.concatenate([params.boxes[k].numpy(), sizes], 1).astype(np.float64)
        area = lambda a: a[:, 2] * a[:, 3] / (a[:, 4] * a[:, 5])
        assert_same_distribution(area(ob), area(rb), f"{g.size}px area fraction")
        assert_same_distribution(np.log(ob[:, 3] / ob[:, 2]), np.log(rb[:, 3] / rb[:, 2]), f"{g.size}px log aspect")
        flips = [r.get("flip", False) for r in ref]
        jit = [r for r in ref if "order" in r]
        grays = [r.get("gray", False) for r in ref]
        sigmas = [r["sigma"] for r in ref if "sigma" in r]
        for name, ours, theirs, p in [("flip", params.flip[k], flips, STAT_SPEC.flip_prob),
                                      ("jitter", params.jitter[k], [r.get("order") is not None for r in ref],
                                       STAT_SPEC.jitter_prob),
                                      ("grayscale", params.gray[k], grays, STAT_SPEC.grayscale_prob),
                                      ("blur", params.blur[k], [r.get("sigma") is not None for r in ref],
                                       STAT_SPEC.blur_prob)]:
            assert_rate(ours.numpy(), p, f"{g.size}px {name} rate")
            assert_same_rate(ours.numpy(), theirs, f"{g.size}px {name}")
        used = params.jitter[k]
        for i, name in enumerate(["brightness", "contrast", "saturation", "hue"]):
            assert_same_distribution(params.jitter_factors[k][used, i].numpy(), [r["factors"][i] for r in jit],
                                     f"{g.size}px {name} factor")
        # the 24 orders as codes; chi-square test that ours and the reference's have the same distribution
        code = lambda o: ((o[:, 0] * 4 + o[:, 1]) * 4 + o[:, 2]) * 4 + o[:, 3]
        counts = np.stack([np.bincount(code(o), minlength=256) for o in
                           (params.jitter_order[k][used].numpy(), np.array([r["order"] for r in jit]))])
        counts = counts[:, counts.sum(0) > 0]
        assert counts.shape == (2, 24) and counts.min() > 0, f"{g.size}px jitter orders seen: {counts}"
        expected = counts.sum(1, keepdims=True) * counts.sum(0, keepdims=True) / counts.sum()
        chi2 = ((counts - expected) ** 2 / expected).sum()
        assert chi2 < CHI2_23, f"{g.size}px jitter order: chi-square {chi2:.1f} >= {CHI2_23}"
        assert_same_distribution(params.blur_sigma[k][params.blur[k]].numpy(), sigmas, f"{g.size}px blur sigma")


def test_output_pixels_match_reference(paired_runs):
    """Per-crop pixel statistics of the outputs, ours vs the reference chain, on the same images."""
    _, ref_crops, _, crops = paired_runs
    for k, g in enumerate(STAT_SPEC.groups):
        ours, ref = _crop_stats(crops[k]), _crop_stats(ref_crops[k])
        for name in ours:
            a, b = ours[name].numpy(), ref[name].numpy()
            if name == "is gray":  # grayscale rate measured on the pixels
                assert_same_rate(a, b, f"{g.size}px gray outputs")
                continue
            # means of per-crop statistics within 4 standard errors, and the whole distribution by KS
            se = math.sqrt(a.var() / len(a) + b.var() / len(b))
            assert abs(a.mean() - b.mean()) < 4 * se, f"{g.size}px {name}: {a.mean():.4f} vs {b.mean():.4f}"
            assert_same_distribution(a, b, f"{g.size}px {name}")


# ------------------------------------------------------------------------------------ op-by-op checks
def test_resample_matches_torchvision_antialias_and_pil(photos):
    spec = MultiCropSpec(groups=(CropGroup(96, 2, 0.14, 1.0), CropGroup(40, 2, 0.05, 0.14)))
    aug = GPUMultiCrop(spec)
    _, params = aug(photos, gen(), return_params=True)
    params = plain(params)
    params.boxes[3, 0] = torch.tensor([5, 7, 21, 30])  # an upscaling box (21 x 30 px -> 40 x 40)
    crops = [unnormalise(c, spec) for c in aug.apply(photos, params)]
    errs_float, errs_u8, errs_pil, max_pil = [], [], [], []
    for k, size in enumerate(spec.crop_sizes):
        for b, img in enumerate(photos):
            top, left, h, w = params.boxes[k, b].tolist()
            ours = crops[k][b]
            ref = TF.resized_crop(img.float() / 255, top, left, h, w, [size, size], antialias=True)
            errs_float.append((ours - ref).abs().max().item())
            ref8 = TF.resized_crop(img, top, left, h, w, [size, size], antialias=True).float() / 255
            errs_u8.append((ours - ref8).abs().mean().item())
            pil = TF.to_tensor(TF.resized_crop(TF.to_pil_image(img), top, left, h, w, [size, size]))
            errs_pil.append((ours - pil).abs().mean().item())
            max_pil.append((ours - pil).abs().max().item())
    # the same filter as torchvision's float path; 8-bit rounding (<= 0.5 level, ~0.25 on average) vs the others
    assert max(errs_float) < 1e-5, max(errs_float)
    assert np.mean(errs_u8) < 0.35 / 255 and max(errs_u8) < 0.5 / 255, (np.mean(errs_u8) * 255, max(errs_u8) * 255)
    assert np.mean(errs_pil) < 0.4 / 255 and max(max_pil) < 1.5 / 255, (np.mean(errs_pil) * 255, max(max_pil) * 255)


def test_roi_align_resample_is_close(photos):
    """The optional roi_align path: box-filter antialias, within 2/255 on average of the exact filter (measured
    ~1/255 on these photos; it differs by up to ~30 levels at a few sharp edges)."""
    spec = MultiCropSpec(groups=(CropGroup(96, 2, 0.14, 1.0), CropGroup(40, 2, 0.05, 0.14)))
    _, params = GPUMultiCrop(spec)(photos, gen(), return_params=True)
    params.flip[:, ::2] = True
    params.jitter.zero_()
    params.gray.zero_()
    params.blur.zero_()
    exact = GPUMultiCrop(spec).apply(photos, params)
    approx = GPUMultiCrop(spec, resample="roi_align").apply(photos, params)
    for x, y in zip(exact, approx, strict=True):
        err = (unnormalise(x, spec) - unnormalise(y, spec)).abs()
        assert err.mean() < 2 / 255, err.mean() * 255
        assert y.is_contiguous(memory_format=torch.channels_last)


def test_flip_equals_torch_flip(small_photos):
    """Flip forced on vs off with the same seed (so the same boxes and colour draws): mirror images, through the
    whole chain (jitter, grayscale and the symmetric blur commute with the flip)."""
    on = GPUMultiCrop(with_(SPEC, flip_prob=1.0))(small_photos, gen(2))
    off = GPUMultiCrop(with_(SPEC, flip_prob=0.0))(small_photos, gen(2))
    for x, y in zip(on, off, strict=True):
        assert torch.allclose(x, torch.flip(y, dims=[-1]), atol=1e-5)
        assert not torch.allclose(x, y, atol=1e-2)


def test_grayscale_forced_gives_luma(small_photos):
    base = with_(SPEC, jitter_prob=0.0, blur_prob=0.0)
    on = GPUMultiCrop(with_(base, grayscale_prob=1.0))(small_photos, gen(1))
    off = GPUMultiCrop(with_(base, grayscale_prob=0.0))(small_photos, gen(1))
    for x, y in zip(on, off, strict=True):
        x, y = unnormalise(x, SPEC), unnormalise(y, SPEC)
        assert torch.allclose(x[:, 0], x[:, 1], atol=1e-5) and torch.allclose(x[:, 0], x[:, 2], atol=1e-5)
        luma = (y * torch.tensor(LUMA).view(1, 3, 1, 1)).sum(1)
        assert torch.allclose(x[:, 0], luma, atol=1e-5)
        assert (y[:, 0] - y[:, 2]).abs().mean() > 0.02  # the photos are coloured


@pytest.mark.parametrize("op, fn, atol", [
    (BRIGHTNESS, TF.adjust_brightness, 1e-5),
    # torchvision's tensor ops use 0.2989 for red where PIL (and we) use 0.299: <= 0.8 * 1e-4 apart
    (CONTRAST, TF.adjust_contrast, 1e-4),
    (SATURATION, TF.adjust_saturation, 1e-4),
    (HUE, TF.adjust_hue, 1e-4),
])
def test_single_jitter_op_matches_torchvision(small_photos, op, fn, atol):
    strengths = [0.0] * 4
    strengths[op] = SPEC.jitter[op]
    base = with_(SPEC, jitter=tuple(strengths), grayscale_prob=0.0, blur_prob=0.0)
    on, params = GPUMultiCrop(with_(base, jitter_prob=1.0))(small_photos, gen(5), return_params=True)
    off = GPUMultiCrop(with_(base, jitter_prob=0.0))(small_photos, gen(5))
    changes = []
    for k, (x, y) in enumerate(zip(on, off, strict=True)):
        x, y = unnormalise(x, SPEC), unnormalise(y, SPEC)
        for b in range(len(small_photos)):
            f = params.jitter_factors[k, b, op].item()
            expected = fn(y[b], f)
            assert (x[b] - expected).abs().max() < atol, (op, f, (x[b] - expected).abs().max())
            if abs(f - (op != HUE)) > (0.05 if op == HUE else 0.2):  # a factor far from the identity
                changes.append((x[b] - y[b]).abs().mean().item())
    assert len(changes) >= 10 and np.mean(changes) > 5e-3  # it did something


def test_jitter_random_order_matches_torchvision_composition(small_photos):
    """All four ops in each sample's own recorded order, vs torchvision's functional ops in that order."""
    base = with_(SPEC, grayscale_prob=0.0, blur_prob=0.0)
    on, params = GPUMultiCrop(with_(base, jitter_prob=1.0))(small_photos * 3, gen(6), return_params=True)
    off = GPUMultiCrop(with_(base, jitter_prob=0.0))(small_photos * 3, gen(6))
    fns = {BRIGHTNESS: TF.adjust_brightness, CONTRAST: TF.adjust_contrast, SATURATION: TF.adjust_saturation,
           HUE: TF.adjust_hue}
    orders = set()
    for k, (x, y) in enumerate(zip(on, off, strict=True)):
        x, y = unnormalise(x, SPEC), unnormalise(y, SPEC)
        for b in range(x.shape[0]):
            expected = y[b]
            order = params.jitter_order[k, b].tolist()
            orders.add(tuple(order))
            for op in order:
                expected = fns[op](expected, params.jitter_factors[k, b, op].item())
            assert (x[b] - expected).abs().max() < 5e-4, (order, (x[b] - expected).abs().max())
    assert len(orders) >= 12  # per-sample orders, not one fixed order (120 crops, 24 orders)


def test_blur(small_photos, photos):
    """Forced on vs off with the same seed: (1) less high-frequency energy, more so for larger sigma; (2) equal
    to torchvision's true Gaussian (17 taps) away from the border; (3) close to PIL's GaussianBlur(radius=sigma)."""
    spec = MultiCropSpec(groups=(CropGroup(64, 2, 0.14, 1.0), CropGroup(32, 2, 0.05, 0.14)), jitter_prob=0.0,
                         grayscale_prob=0.0)
    on, params = GPUMultiCrop(with_(spec, blur_prob=1.0))(photos, gen(8), return_params=True)
    off = GPUMultiCrop(with_(spec, blur_prob=0.0))(photos, gen(8))
    pil_err = []
    for k, (x, y) in enumerate(zip(on, off, strict=True)):
        x, y = unnormalise(x, spec), unnormalise(y, spec)
        hf = lambda t: ((t[..., 1:] - t[..., :-1]) ** 2).mean((1, 2, 3))
        ratio = hf(x) / hf(y)
        sigma = params.blur_sigma[k]
        assert (ratio[sigma > 0.7] < 0.7).all() and (ratio < 1.0 + 1e-6).all(), (sigma, ratio)
        for b in range(len(photos)):
            s = sigma[b].item()
            tv = TF.gaussian_blur(y[b], [17, 17], [s, s])  # reflect padding: compare the interior only
            assert (x[b] - tv)[:, 8:-8, 8:-8].abs().max() < 1e-5
            pil = TF.to_tensor(TF.to_pil_image(torch.round(y[b] * 255).byte()).filter(ImageFilter.GaussianBlur(s)))
            pil_err.append((x[b] - pil).abs().mean().item())
    # PIL's three box blurs of the same variance: ~0.45/255 mean abs; a 30 % wrong sigma gives ~1.7/255
    assert np.mean(pil_err) < 0.8 / 255, np.mean(pil_err) * 255


def smooth_images(sizes: list[tuple[int, int]], seed: int = 0) -> list[torch.Tensor]:
    """Photo-like uint8 [3, H, W] images (bicubic upsampling of 12 x 16 random colours), torch only."""
    g = torch.Generator().manual_seed(seed)
    return [(torch.nn.functional.interpolate(torch.rand(1, 3, 12, 16, generator=g), size=hw, mode="bicubic")
             .clamp(0, 1)[0] * 255).round().byte() for hw in sizes]


@pytest.fixture
def photos_or_synthetic(request) -> list[torch.Tensor]:
    """The real photos where scikit-image/-learn are installed; else smooth synthetic images of the same sizes
    (this CUDA-vs-CPU comparison does not need real photographs, so a GPU machine without them still runs it)."""
    try:
        return request.getfixturevalue("photos")
    except pytest.skip.Exception:
        return smooth_images(SIZES)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_contract_and_cpu_ops(photos_or_synthetic):
    photos = photos_or_synthetic
    spec = MultiCropSpec(groups=(CropGroup(96, 2, 0.14, 1.0), CropGroup(48, 2, 0.05, 0.14)))
    dev = [p.cuda() for p in photos]
    crops, params = GPUMultiCrop(spec)(dev, augment_generator(0, 0, 0, 0, "cuda"), return_params=True)
    assert all(c.is_cuda and c.is_contiguous(memory_format=torch.channels_last) for c in crops)
    cpu = GPUMultiCrop(spec).apply(photos, params.to("cpu"))
    for x, y in zip(crops, cpu, strict=True):
        assert (x.cpu() - y).abs().max() < 2e-2  # same parameters, same views (TF32 matmuls allowed)


# ------------------------------------------------------------------------ decode_rgb (the ffcv path's decode)
def _jpeg_bytes(n: int, hw: tuple[int, int] = (375, 500), seed: int = 0) -> list[torch.Tensor]:
    """Baseline JPEGs of smooth_images, with PIL only (no scikit-image needed)."""
    import io

    out = []
    for x in smooth_images([hw] * n, seed):
        buf = io.BytesIO()
        Image.fromarray(x.permute(1, 2, 0).numpy()).save(buf, "JPEG", quality=90)
        out.append(torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8))
    return out


def test_decode_rgb_on_cpu_decodes_the_batch_and_returns_a_bad_files_error_in_its_place():
    from pipelines.ffcv import decode_rgb

    good = _jpeg_bytes(3, (30, 40))
    assert all(torch.equal(a, decode_jpeg(b)) for a, b in zip(decode_rgb(good, "cpu"), good, strict=True))
    bad = torch.frombuffer(bytearray(b"\xff\xd8 not a jpeg"), dtype=torch.uint8)
    images = decode_rgb([good[0], bad, good[2]], "cpu")
    assert isinstance(images[1], RuntimeError)
    assert torch.equal(images[0], decode_jpeg(good[0])) and torch.equal(images[2], decode_jpeg(good[2]))


def test_decode_rgb_on_cuda_decodes_on_its_stream_and_hands_the_images_to_the_callers(monkeypatch):
    """The stream wiring, with stand-ins for CUDA streams and torchvision's decode (no GPU here): the decode runs
    with the decode stream current (torchvision allocates its outputs on the current stream and writes them from
    its own), then the caller's stream waits for the decode stream and every image is marked as used by the
    caller's stream. The real thing: test_cuda_decode_rgb_leaves_memory_queued_kernels_still_read_alone."""
    import torchvision.io

    from pipelines.ffcv import decode_rgb

    events, current = [], ["caller"]

    class FakeStream:
        def __init__(self, name):
            self.name = name

        def wait_stream(self, other):
            events.append(f"{self.name} waits for {other.name}")

    class FakeImage:
        def __init__(self, k):
            self.k = k

        def record_stream(self, stream):
            events.append(f"image {self.k} used by {stream.name}")

    class StreamContext:
        def __init__(self, stream):
            self.stream = stream

        def __enter__(self):
            current.append(self.stream.name)

        def __exit__(self, *exc):
            current.pop()

    caller, decode_stream = FakeStream("caller"), FakeStream("decode")

    def fake_decode(data, mode, device):
        events.append(f"decode of {len(data) if isinstance(data, list) else 1} on {current[-1]}")
        if isinstance(data, list) and len(data) > 1:
            raise RuntimeError("one bad file fails the batch")
        return FakeImage(data.item() if not isinstance(data, list) else data[0].item())

    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: caller)
    monkeypatch.setattr(torch.cuda, "stream", StreamContext)
    monkeypatch.setattr(torchvision.io, "decode_jpeg", fake_decode)
    images = decode_rgb([torch.tensor([0], dtype=torch.uint8), torch.tensor([1], dtype=torch.uint8)], "cuda",
                        decode_stream)
    assert [im.k for im in images] == [0, 1]
    assert events == ["decode of 2 on decode", "decode of 1 on decode", "decode of 1 on decode",
                      "caller waits for decode", "image 0 used by caller", "image 1 used by caller"]
    with pytest.raises(ValueError, match="stream"):
        decode_rgb([torch.tensor([0], dtype=torch.uint8)], "cuda")


def test_profile_pipelines_device_side_replaces_an_undecodable_jpeg(tmp_path):
    """tools/profile_pipeline.py's decode+augment row on a folder with a broken JPEG (ImageNet has a few that the
    GPU decoder refuses): replaced as the loader replaces them, not a crash."""
    from tools.profile_pipeline import time_device_side

    (tmp_path / "c").mkdir()
    for k, data in enumerate(_jpeg_bytes(3, (40, 50))):
        (tmp_path / "c" / f"{k}.jpg").write_bytes(data.numpy().tobytes())
    (tmp_path / "c" / "3.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    spec = MultiCropSpec(groups=(CropGroup(24, 2, 0.14, 1.0), CropGroup(12, 2, 0.05, 0.14)))
    row = time_device_side(str(tmp_path), spec, torch.device("cpu"), 4, 1, 0, "matmul")
    assert row["samples_per_s"] > 0


def test_profile_pipelines_device_side_decodes_what_a_beton_would_hold(tmp_path, monkeypatch):
    """The decode+augment row times the bytes tools/write_ffcv.py would store: a 1200x900 JPEG as its 512 px
    re-encoding (the padded resampling grows with the batch's largest image), a PNG re-encoded as a JPEG; a file
    that is no image at all is left out."""
    import pipelines.ffcv
    from tools.profile_pipeline import time_device_side

    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "0.jpg").write_bytes(_jpeg_bytes(1, (900, 1200))[0].numpy().tobytes())
    (tmp_path / "c" / "1.jpg").write_bytes(_jpeg_bytes(1, (300, 200))[0].numpy().tobytes())
    Image.fromarray(np.full((40, 60, 3), 90, np.uint8)).save(tmp_path / "c" / "2.png")
    (tmp_path / "c" / "3.txt").write_text("not an image")
    shapes = []
    decode = pipelines.ffcv.decode_rgb

    def spy(data, device, stream=None):
        out = decode(data, device, stream)
        shapes.extend(tuple(im.shape) for im in out)
        return out

    monkeypatch.setattr(pipelines.ffcv, "decode_rgb", spy)
    spec = MultiCropSpec(groups=(CropGroup(24, 1, 0.14, 1.0),))
    time_device_side(str(tmp_path), spec, torch.device("cpu"), 3, 1, 0, "matmul")
    assert shapes == [(3, 384, 512), (3, 300, 200), (3, 40, 60)]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_decode_rgb_leaves_memory_queued_kernels_still_read_alone():
    """Tensors the size of the decoded images are freed while kernels that read them are still queued behind a
    sleep; the decode must not be handed their memory (torchvision's nvJPEG writes from its own stream, which
    would overwrite them before those kernels run: pytorch/vision#9606). And the images are the CPU decode's."""
    from pipelines.ffcv import decode_rgb

    data = _jpeg_bytes(16)
    expected = [decode_jpeg(d) for d in data]
    from swav_fast.streams import private_stream

    stream, bad = private_stream(), 0
    decode_rgb(data, "cuda", stream)  # nvJPEG's set-up, outside the timed part
    for _ in range(20):
        doomed = [torch.full((3, 375, 500), 7, dtype=torch.uint8, device="cuda") for _ in data]
        torch.cuda._sleep(20_000_000)  # tens of ms of queued work ahead of the reads
        sums = torch.stack([t.sum(dtype=torch.int64) for t in doomed])
        del doomed  # freed on the caller's stream with the reads still queued
        images = decode_rgb(data, "cuda", stream)
        bad += int((sums.cpu() != 7 * 3 * 375 * 500).sum())
        # nvJPEG and libjpeg-turbo differ by rounding (IDCT, chroma upsampling), not by pictures
        assert max((a.cpu().float() - b.float()).abs().mean().item() for a, b in zip(images, expected, strict=True)) < 2
    assert bad == 0, f"{bad} sums read memory the decoder had overwritten"

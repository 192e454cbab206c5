"""SwAV multi-crop augmentation (REFERENCE section 6) as batched tensor ops on any device.

Input: one batch of decoded images, a list of uint8 tensors [3, H_i, W_i] of any sizes on one device (what
`torchvision.io.decode_jpeg(list_of_bytes, device=...)` returns). Output: the `crops` of a MultiCropBatch, one
float32 tensor [B, 3, size, size] per crop in MultiCropSpec order (large crops first), normalised with
spec.mean/spec.std, channels_last, on the input's device. Per crop and per sample, independently: RandomResizedCrop
(bilinear, antialiased) -> horizontal flip -> with p jitter_prob ColorJitter (four ops in a random order per sample)
-> grayscale with p grayscale_prob -> Gaussian blur with p blur_prob -> Normalize.

How it is batched: the images are padded into one float buffer of the batch's largest height and width; every crop
of one size is cropped, resized and flipped by two batched matrix products with per-crop separable resampling
matrices (rows, then columns; the flip reverses the column matrix, so it costs nothing); the colour ops work on all
crops of one size at once with per-sample factors; the blur is one grouped (depthwise) separable convolution with a
per-sample kernel. There is no host sync (no `.item()`, no data-dependent shapes) and every random draw comes from
the `torch.Generator` passed in (on the images' device), see `augment_seed` / `augment_generator`. The sampled
parameters are returned on request (`AugmentParams`) and `apply` replays given parameters, which is how the tests
check each augmentation.

Deviations from the PIL/torchvision reference chain (pipelines/reference.py); the distribution of views is the same,
individual views are not bit-identical:
- RNG stream: the draws come from one generator per (seed, epoch, rank, step) on the target device (Philox on CUDA),
  not from torch's global CPU generator re-seeded per sample, so the same seed gives different views than the
  reference pipeline, and different views on CPU and CUDA. Every quantity is drawn with the reference's distribution
  (crop: torchvision's 10-attempt rule with its central-crop fallback, evaluated for all 10 attempts at once and the
  first valid attempt taken; jitter factors, order, probabilities, blur sigma).
- Resampling: the default `resample="matmul"` builds PIL's antialiased bilinear filter exactly (triangle of
  half-width max(1, scale) over the crop's pixels only, PIL's centre convention, weights renormalised at the crop
  border), i.e. what `resized_crop(..., antialias=True)` computes on a float tensor (equal within 1e-5); it differs
  from the reference only by PIL's 8-bit rounding (PIL resizes 8-bit images in two passes with a rounded uint8
  intermediate and output): mean abs difference from PIL ~0.3/255, max < 1.5/255. Its cost is dense: it multiplies
  by the whole padded image (most weights are zero), so it grows with H_max * W_max * size per crop.
  `resample="roi_align"` (torchvision.ops.roi_align, aligned, adaptive sampling_ratio = ceil(box / size) per box) is
  sparse and cheaper for large images but approximates the filter: each output pixel is the mean of ceil(box/size)^2
  bilinear samples over its bin (a box filter of one bin width convolved with a 2-pixel triangle, narrower than
  PIL's triangle of two bins: a little sharper, a little more aliasing), and bilinear taps at the box border may
  read one pixel outside the crop (the padding is edge-replicated so they never read zeros). Measured: ~1/255 mean
  abs difference from the exact filter on photos, up to ~30/255 at a few sharp edges.
- Colour jitter in float: the reference works on uint8 PIL images, rounding after every op; contrast blends with the
  float mean of the grayscale image (PIL: the mean rounded to an integer); hue is shifted in float HSV (PIL: 8-bit
  hue, shift rounded to 1/255 of a turn). Luma weights are PIL's 0.299, 0.587, 0.114 (torchvision's tensor ops use
  0.2989 for red). Not a deviation: the order of the four ops is random per sample, as in the reference (each
  position applies every sample's own op, the others with an identity factor; hue is evaluated once, between the
  blends before and after it). Clamped to [0, 1] after each op, as torchvision does for float images.
- Gaussian blur: a true sampled Gaussian, sigma in output pixels (PIL's GaussianBlur "radius" is the standard
  deviation; PIL approximates it with three extended box blurs of the same variance). Kernel: 2 * ceil(4 *
  sigma_max) + 1 taps (17 for sigma_max = 2; weight beyond 4 sigma is < 1e-4), renormalised, edges replicated like
  PIL's box blur. The kernel does not scale with the crop size: the reference applies the same radius range in
  output pixels to the 224 px and the 96 px crops; the paper's 23 x 23 (= 5.5 sigma at sigma 2) adds only zeros. For
  sigma below ~0.4 a sampled Gaussian is almost the identity, whereas PIL's box approximation keeps the variance
  sigma^2 (it mixes in ~2 % of the neighbours at sigma 0.2). Measured against PIL's GaussianBlur(radius=sigma) on
  the same 8-bit crop: mean abs difference ~0.45/255, a few levels at sharp edges.
- Everything stays float32 from decode to output (the reference rounds to uint8 after the resize, each jitter op,
  grayscale and blur); no bf16 path. On CUDA the blur (a depthwise convolution) runs in TF32 if torch hands it to
  cuDNN (torch.backends.cudnn.allow_tf32, on by default; for float32 depthwise convolutions torch often uses its
  own exact kernel instead), and the resampling products run in TF32 if the caller enables TF32 matmuls: relative
  error ~1e-3, below one 8-bit level.
- Padding: images of different sizes are padded to the largest height and width of the batch; the padded pixels get
  zero weight and never reach an output (cost only: mixed portrait/landscape batches do more work).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torchvision.ops import roi_align

from pipelines.reference import sample_seed
from pipelines.spec import MultiCropSpec
from swav_fast.config import RESAMPLERS

# ITU-R 601-2 luma, as PIL's convert("L") (used by RandomGrayscale, and by ImageEnhance Contrast and Color).
LUMA = (0.299, 0.587, 0.114)
# Ops of ColorJitter, numbered as torchvision's `fn_idx`.
BRIGHTNESS, CONTRAST, SATURATION, HUE = range(4)
# Columns of the per-crop uniform draws (one torch.rand call per crop group).
_AREA, _LOGR, _TOP, _LEFT, _FLIP, _JIT, _FAC, _ORD, _GRAY, _BLUR, _SIGMA = (
    slice(0, 10), slice(10, 20), 20, 21, 22, 23, slice(24, 28), slice(28, 32), 32, 33, 34)
_N_DRAWS = 35
_ATTEMPTS = 10  # torchvision RandomResizedCrop tries 10 random boxes before the central-crop fallback


def augment_seed(seed: int, epoch: int, rank: int, step: int) -> int:
    """A well-mixed 63-bit seed for one step's augmentation, distinct for every (seed, epoch, rank, step)."""
    return sample_seed(sample_seed(seed, epoch, rank), step, 0x5A17)


def augment_generator(seed: int, epoch: int, rank: int, step: int, device: torch.device | str) -> torch.Generator:
    """A generator on `device` seeded with `augment_seed(seed, epoch, rank, step)`."""
    return torch.Generator(device=device).manual_seed(augment_seed(seed, epoch, rank, step))


@dataclass
class AugmentParams:
    """The random choices behind one batch of views; every tensor is [n_crops, B, ...] on the images' device.

    boxes: int64 (top, left, height, width) of the crop in source pixels; flip, jitter, gray, blur: bool masks
    (jitter = the ColorJitter was applied); jitter_factors: (brightness, contrast, saturation, hue) factors, drawn
    for every crop, used where jitter; jitter_order: op index (BRIGHTNESS, CONTRAST, SATURATION, HUE) applied at
    each of the 4 positions; blur_sigma: drawn for every crop, used where blur.
    """

    boxes: torch.Tensor
    flip: torch.Tensor
    jitter: torch.Tensor
    jitter_factors: torch.Tensor
    jitter_order: torch.Tensor
    gray: torch.Tensor
    blur: torch.Tensor
    blur_sigma: torch.Tensor

    def select(self, crops: slice) -> AugmentParams:
        return AugmentParams(**{f.name: getattr(self, f.name)[crops] for f in fields(self)})

    def clone(self) -> AugmentParams:
        return AugmentParams(**{f.name: getattr(self, f.name).clone() for f in fields(self)})

    def to(self, device: torch.device | str) -> AugmentParams:
        return AugmentParams(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})


class GPUMultiCrop:
    """Callable: (list of uint8 [3, H_i, W_i] images, generator) -> list of n_crops normalised crops.

    Also accepted: [1, H, W] images (used as 3 equal channels, like PIL's convert("RGB")), a [B, 3, H, W] tensor,
    and float images in [0, 1]. `return_params=True` also returns the AugmentParams that were drawn.

    `resample`: "matmul" (exact antialiased bilinear, default) or "roi_align" (approximate, cheaper for big
    images); `blur_truncate`: the blur kernel covers +-ceil(blur_truncate * sigma_max) pixels.
    """

    def __init__(self, spec: MultiCropSpec, resample: str = "matmul", blur_truncate: float = 4.0):
        if resample not in RESAMPLERS:
            raise ValueError(f"resample must be one of {', '.join(RESAMPLERS)}, not {resample!r}")
        b, c, s, h = spec.jitter
        if min(spec.jitter) < 0 or h > 0.5:
            raise ValueError(f"jitter strengths must be >= 0 and hue <= 0.5, got {spec.jitter}")
        self.spec, self.resample = spec, resample
        self.blur_radius = math.ceil(blur_truncate * spec.blur_sigma[1])
        # uniform ranges of the four jitter factors (torchvision ColorJitter); strength 0 gives the identity
        self.factor_lo = (max(0.0, 1 - b), max(0.0, 1 - c), max(0.0, 1 - s), -h)
        self.factor_hi = (1 + b, 1 + c, 1 + s, h)
        self._consts: dict[torch.device, tuple[torch.Tensor, ...]] = {}

    # ----------------------------------------------------------------------------------------------- public
    def __call__(self, images: list[torch.Tensor] | torch.Tensor, generator: torch.Generator,
                 return_params: bool = False) -> list[torch.Tensor] | tuple[list[torch.Tensor], AugmentParams]:
        batch, sizes, scale = self._pad(images)
        params = self.sample_params(sizes, generator)
        crops = self._apply_padded(batch, params, scale)
        return (crops, params) if return_params else crops

    def sample_params(self, sizes: torch.Tensor, generator: torch.Generator) -> AugmentParams:
        """Draw every random choice for images of `sizes` ([B, 2] (height, width), on the generator's device)."""
        device = sizes.device
        if torch.device(generator.device).type != device.type:
            raise ValueError(f"the generator is on {generator.device} but the images are on {device}: create it "
                             "with augment_generator(..., device=images' device)")
        spec, n_img = self.spec, sizes.shape[0]
        *_, lo, hi = self._constants(device)
        per_group = []
        for g in spec.groups:
            u = torch.rand(n_img, g.count, _N_DRAWS, generator=generator, device=device)
            boxes = _sample_boxes(sizes, u, g.min_scale, g.max_scale, spec.ratio)
            per_group.append(dict(
                boxes=boxes, flip=u[..., _FLIP] < spec.flip_prob, jitter=u[..., _JIT] < spec.jitter_prob,
                jitter_factors=lo + (hi - lo) * u[..., _FAC],
                # argsort of iid uniforms: a uniformly random permutation, as torch.randperm(4)
                jitter_order=torch.argsort(u[..., _ORD], dim=-1),
                gray=u[..., _GRAY] < spec.grayscale_prob, blur=u[..., _BLUR] < spec.blur_prob,
                blur_sigma=spec.blur_sigma[0] + (spec.blur_sigma[1] - spec.blur_sigma[0]) * u[..., _SIGMA]))
        # [B, count, ...] per group -> [n_crops, B, ...]
        return AugmentParams(**{k: torch.cat([p[k].transpose(0, 1) for p in per_group]) for k in per_group[0]})

    def apply(self, images: list[torch.Tensor] | torch.Tensor, params: AugmentParams) -> list[torch.Tensor]:
        """The views of `images` for given parameters (replay, or hand-set parameters in tests)."""
        batch, _, scale = self._pad(images)
        return self._apply_padded(batch, params, scale)

    # ---------------------------------------------------------------------------------------------- internals
    def _pad(self, images: list[torch.Tensor] | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
        """Float batch in [0, 255] (uint8 input) or [0, 1] (float input), padded to the largest H and W, laid out
        [B, H, 3, W] for "matmul" and [B, 3, H, W] for "roi_align"; the sizes [B, 2] (height, width); the factor
        that maps the batch to [0, 1]."""
        if isinstance(images, torch.Tensor) and images.dim() == 4:
            images = list(images.unbind(0))
        if len(images) == 0:
            raise ValueError("empty batch of images")
        device, dtype = images[0].device, images[0].dtype
        for im in images:
            if im.dim() != 3 or im.shape[0] not in (1, 3):
                raise ValueError(f"each image must be [3, H, W] (or [1, H, W]), got shape {tuple(im.shape)}")
            if im.device != device or im.dtype != dtype:
                raise ValueError("all images must share one device and dtype, got "
                                 f"{device}/{dtype} and {im.device}/{im.dtype}")
        if dtype != torch.uint8 and not dtype.is_floating_point:
            raise ValueError(f"images must be uint8 (or float in [0, 1]), got {dtype}")
        hs = [im.shape[1] for im in images]
        ws = [im.shape[2] for im in images]
        h_max, w_max, n = max(hs), max(ws), len(images)
        sizes = torch.tensor([hs, ws], dtype=torch.int64).T.to(device, non_blocking=True)
        if self.resample == "matmul":
            batch = torch.zeros(n, h_max, 3, w_max, device=device)  # zeros: padding gets weight 0, 0 * 0 = 0
            for b, im in enumerate(images):
                batch[b, :hs[b], :, :ws[b]] = im.permute(1, 0, 2)  # a [1, H, W] image broadcasts to 3 channels
        else:
            batch = torch.empty(n, 3, h_max, w_max, device=device)
            for b, im in enumerate(images):
                h, w = hs[b], ws[b]
                batch[b, :, :h, :w] = im
                # replicate the last column and row into the padding: roi_align's bilinear taps at the image
                # border may read one pixel past it
                batch[b, :, :h, w:] = batch[b, :, :h, w - 1:w]
                batch[b, :, h:, :] = batch[b, :, h - 1:h, :]
        return batch, sizes, (1 / 255 if dtype == torch.uint8 else 1.0)

    def _constants(self, device: torch.device) -> tuple[torch.Tensor, ...]:
        if device not in self._consts:
            mean = torch.tensor(self.spec.mean, device=device).view(3, 1, 1)
            std = torch.tensor(self.spec.std, device=device).view(3, 1, 1)
            luma = torch.tensor(LUMA, device=device).view(1, 3, 1, 1)
            taps = torch.arange(-self.blur_radius, self.blur_radius + 1, device=device, dtype=torch.float32)
            lo = torch.tensor(self.factor_lo, device=device)
            hi = torch.tensor(self.factor_hi, device=device)
            self._consts[device] = (1 / std, -mean / std, luma, taps, lo, hi)
        return self._consts[device]

    def _apply_padded(self, batch: torch.Tensor, params: AugmentParams, scale: float) -> list[torch.Tensor]:
        inv_std, bias, luma, taps, _, _ = self._constants(batch.device)
        out, first = [], 0
        n_img = batch.shape[0]
        for g in self.spec.groups:
            # [count, B, ...] -> [B * count, ...], image-major (row b * count + k is crop k of image b)
            p = params.select(slice(first, first + g.count))
            p = AugmentParams(**{f.name: getattr(p, f.name).transpose(0, 1).flatten(0, 1) for f in fields(p)})
            if self.resample == "matmul":
                x = _resize_matmul(batch, p.boxes, p.flip, g.size, g.count, scale)
            else:
                x = _resize_roi_align(batch, p.boxes, p.flip, g.size, g.count, scale)
            if self.spec.jitter_prob > 0:
                x = color_jitter(x, p.jitter, p.jitter_factors, p.jitter_order, luma, self.factor_hi[HUE] > 0)
            if self.spec.grayscale_prob > 0:
                x = torch.where(p.gray.view(-1, 1, 1, 1), _gray(x, luma).expand_as(x), x)
            if self.spec.blur_prob > 0:
                x = gaussian_blur(x, p.blur, p.blur_sigma, taps)
            x = x.view(n_img, g.count, 3, g.size, g.size)
            for k in range(g.count):
                y = torch.empty(n_img, 3, g.size, g.size, device=x.device, memory_format=torch.channels_last)
                torch.addcmul(bias, x[:, k], inv_std, out=y)  # (x - mean) / std in one pass
                out.append(y)
            first += g.count
        return out


def _sample_boxes(sizes: torch.Tensor, u: torch.Tensor, min_scale: float, max_scale: float,
                  ratio: tuple[float, float]) -> torch.Tensor:
    """torchvision RandomResizedCrop.get_params for every (image, crop) at once: [B, count, 4] (top, left, h, w)."""
    h_img = sizes[:, 0, None].double()  # [B, 1]
    w_img = sizes[:, 1, None].double()
    area = (h_img * w_img)[..., None] * (min_scale + (max_scale - min_scale) * u[..., _AREA].double())
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(log_lo + (log_hi - log_lo) * u[..., _LOGR].double())
    w = torch.round(torch.sqrt(area * aspect))  # round half to even, like Python's round
    h = torch.round(torch.sqrt(area / aspect))
    ok = (w > 0) & (w <= w_img[..., None]) & (h > 0) & (h <= h_img[..., None])
    first = torch.argmax(ok.to(torch.uint8), dim=-1, keepdim=True)  # first valid attempt (0 when none is)
    w = torch.gather(w, -1, first).squeeze(-1)
    h = torch.gather(h, -1, first).squeeze(-1)
    found = ok.any(-1)
    # fallback: central crop of the whole image, its aspect ratio clamped to `ratio`
    in_ratio = w_img / h_img
    w_fb = torch.where(in_ratio < ratio[0], w_img, torch.where(in_ratio > ratio[1], torch.round(h_img * ratio[1]),
                                                               w_img))
    h_fb = torch.where(in_ratio < ratio[0], torch.round(w_img / ratio[0]), h_img)
    w = torch.where(found, w, w_fb)
    h = torch.where(found, h, h_fb)
    # position uniform over the valid integers, like torch.randint(0, H - h + 1)
    top = torch.floor(u[..., _TOP].double() * (h_img - h + 1)).clamp(max=h_img - h)
    left = torch.floor(u[..., _LEFT].double() * (w_img - w + 1)).clamp(max=w_img - w)
    top = torch.where(found, top, torch.div(h_img - h, 2, rounding_mode="floor"))
    left = torch.where(found, left, torch.div(w_img - w, 2, rounding_mode="floor"))
    return torch.stack([top, left, h, w], dim=-1).long()


def resample_weights(start: torch.Tensor, length: torch.Tensor, out_size: int, in_size: int) -> torch.Tensor:
    """PIL's antialiased bilinear resampling as matrices: [N, out_size, in_size] mapping source pixels
    start..start+length-1 (per row of `start`/`length`) to out_size outputs."""
    start, length = start.float(), length.float()
    scale = length / out_size  # > 1 when downscaling
    support = scale.clamp(min=1.0)  # triangle half-width in source pixels
    centre = (torch.arange(out_size, device=start.device) + 0.5) * scale[:, None]  # [N, out], crop coordinates
    pos = torch.arange(in_size, device=start.device) - start[:, None]  # [N, in], crop coordinate of each pixel
    t = (pos[:, None, :] + 0.5 - centre[:, :, None]) / support[:, None, None]
    w = (1 - t.abs()).clamp(min=0) * ((pos >= 0) & (pos < length[:, None]))[:, None, :]
    return w / w.sum(-1, keepdim=True)  # the nearest crop pixel always has weight >= 0.5, so the sum is > 0


def _resize_matmul(batch: torch.Tensor, boxes: torch.Tensor, flip: torch.Tensor, size: int, count: int,
                   scale: float) -> torch.Tensor:
    """Crops of [B, H, 3, W] `batch` given [B * count, 4] boxes -> [B * count, 3, size, size] in [0, 1]."""
    n_img, h_max, _, w_max = batch.shape
    rows = resample_weights(boxes[:, 0], boxes[:, 2], size, h_max) * scale  # [N, size, H]
    cols = resample_weights(boxes[:, 1], boxes[:, 3], size, w_max)  # [N, size, W]
    cols = torch.where(flip[:, None, None], cols.flip(1), cols)  # the flip is free: output columns reversed
    # rows: [B, count * size, H] @ [B, H, 3 * W] -> [B, count * size, 3 * W]
    t = torch.bmm(rows.view(n_img, count * size, h_max), batch.view(n_img, h_max, 3 * w_max))
    t = t.view(n_img * count, size, 3, w_max).transpose(1, 2).reshape(n_img * count, 3 * size, w_max)
    # columns: [N, 3 * size, W] @ [N, W, size] -> [N, 3, size, size]
    return torch.bmm(t, cols.transpose(1, 2)).view(n_img * count, 3, size, size)


def _resize_roi_align(batch: torch.Tensor, boxes: torch.Tensor, flip: torch.Tensor, size: int, count: int,
                      scale: float) -> torch.Tensor:
    """Crops of [B, 3, H, W] `batch` with roi_align (adaptive sampling ratio) -> [B * count, 3, size, size]."""
    n_img = batch.shape[0]
    b_idx = torch.arange(n_img, device=batch.device).repeat_interleave(count)
    top, left, h, w = boxes.to(batch.dtype).unbind(1)
    rois = torch.stack([b_idx.to(batch.dtype), left, top, left + w, top + h], dim=1)
    x = roi_align(batch, rois, output_size=size, spatial_scale=1.0, sampling_ratio=-1, aligned=True)
    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    return x * scale if scale != 1.0 else x


def _gray(x: torch.Tensor, luma: torch.Tensor) -> torch.Tensor:
    return (x * luma).sum(1, keepdim=True)


def adjust_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate the HSV hue of [N, 3, H, W] images in [0, 1] by `shift` [N] turns (value and saturation kept)."""
    r, g, b = x.unbind(1)
    mx, mn = x.amax(1), x.amin(1)
    chroma = mx - mn
    safe = torch.where(chroma > 0, chroma, torch.ones_like(chroma))
    # hue in sixths of a turn: which channel is the max picks the sector
    hue6 = torch.where(mx == r, (g - b) / safe, torch.where(mx == g, (b - r) / safe + 2, (r - g) / safe + 4))
    hue6 = torch.remainder(hue6 + 6 * shift.view(-1, 1, 1), 6.0)
    offsets = torch.arange(5.0, 0.0, -2.0, device=x.device).view(1, 3, 1, 1)  # R, G, B: 5, 3, 1 sixths
    k = torch.remainder(offsets + hue6[:, None], 6.0)
    return mx[:, None] - chroma[:, None] * torch.minimum(k, 4 - k).clamp(0, 1)


def color_jitter(x: torch.Tensor, apply: torch.Tensor, factors: torch.Tensor, order: torch.Tensor,
                 luma: torch.Tensor, with_hue: bool = True) -> torch.Tensor:
    """torchvision ColorJitter on [N, 3, H, W] floats in [0, 1] with per-sample factors [N, 4] (brightness,
    contrast, saturation, hue), per-sample op order [N, 4] and mask `apply` [N] (others are returned unchanged).

    Brightness, contrast and saturation are all `clamp(f * x + (1 - f) * target)` with target black, the mean of
    the grayscale image, the grayscale image. At each position every sample runs "its" blend (identity factor 1
    where the op there is hue, or where the position is on the other side of its hue op), so the blends before the
    hue op, the hue op (once for all samples) and the blends after it reproduce each sample's own order."""
    n = x.shape[0]
    hue_pos = torch.argmax((order == HUE).to(torch.uint8), dim=1)  # position of the hue op per sample

    def blend(x: torch.Tensor, pos: int, active: torch.Tensor) -> torch.Tensor:
        op = order[:, pos]
        active = active & apply & (op != HUE)
        f = torch.gather(factors, 1, op.clamp(max=SATURATION)[:, None]).squeeze(1)
        f = torch.where(active, f, torch.ones_like(f)).view(n, 1, 1, 1)
        gray = _gray(x, luma)
        target = torch.where((op == SATURATION).view(n, 1, 1, 1), gray,
                             torch.where((op == CONTRAST).view(n, 1, 1, 1), gray.mean((2, 3), keepdim=True),
                                         torch.zeros_like(gray[:, :, :1, :1])))
        return (f * x + (1 - f) * target).clamp(0, 1)

    y = x
    if with_hue:
        for pos in range(3):  # blends before the hue op
            y = blend(y, pos, hue_pos > pos)
        y = adjust_hue(y, torch.where(apply, factors[:, HUE], torch.zeros_like(factors[:, HUE])))
        for pos in range(1, 4):  # blends after it
            y = blend(y, pos, hue_pos < pos)
    else:  # no hue op: the blends in their order, hue positions act as identity
        for pos in range(4):
            y = blend(y, pos, torch.ones_like(apply))
    return torch.where(apply.view(n, 1, 1, 1), y, x)  # exact pass-through where the jitter was not drawn


def gaussian_blur(x: torch.Tensor, apply: torch.Tensor, sigma: torch.Tensor, taps: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian blur of [N, 3, H, W] with per-sample sigma [N] where `apply` [N] (identity elsewhere),
    kernel over `taps` (-R..R), edges replicated. One depthwise convolution per direction for the whole batch."""
    n, c, hgt, wid = x.shape
    radius = (taps.numel() - 1) // 2
    k = torch.exp(-0.5 * (taps / sigma[:, None]) ** 2)
    k = k / k.sum(1, keepdim=True)
    delta = (taps == 0).to(k.dtype).expand_as(k)
    k = torch.where(apply[:, None], k, delta).repeat_interleave(c, 0)  # [N * 3, 2R + 1]
    y = x.reshape(1, n * c, hgt, wid)
    y = F.conv2d(F.pad(y, (radius, radius, 0, 0), mode="replicate"), k.view(n * c, 1, 1, -1), groups=n * c)
    y = F.conv2d(F.pad(y, (0, 0, radius, radius), mode="replicate"), k.view(n * c, 1, -1, 1), groups=n * c)
    return y.view(n, c, hgt, wid)

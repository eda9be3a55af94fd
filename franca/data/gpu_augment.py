"""Batched tensor multi-crop augmentation (spec 3.1) for the GPU; it runs on CPU tensors too (issue 16, item 3).

The same augmentation as the PIL path (:class:`franca.data.augmentations.DataAugmentationDINO`), with the same
parameter distributions, on a batch of ``(3, H, W)`` uint8 tensors at once:

* RandomResizedCrop: torchvision's sampler (10 attempts of area ~ U(scale) x H W and log aspect ~ U(log 3/4,
  log 4/3), rounded; the first attempt that fits wins; else the centre crop clamped to the ratio range), vectorised.
  The crop is resized with bicubic antialiased interpolation (PIL's filter) to uint8 levels, as PIL stores it;
* horizontal flip p = 0.5;
* ColorJitter(0.4, 0.4, 0.2, 0.1) with p = 0.8: brightness, contrast, saturation ~ U(1 -+ x), hue ~ U(-0.1, 0.1),
  applied in a uniformly random order per crop (torchvision's ``randperm(4)``);
* RandomGrayscale p = 0.2 (ITU-R 601 luma to all three channels);
* Gaussian blur (kernel 9, reflect padding, sigma ~ U(0.1, 2)) with the per-crop probabilities of the ``blur_probs``
  flag (Q5: effective 0 / 0.9 / 0.5 for global 1 / global 2 / locals);
* RandomSolarize(128) with p = 0.2 on global crop 2 (a pixel of uint8 level >= 128 becomes 255 - level);
* ToTensor scaling to [0, 1] and ImageNet Normalize.

Parameters are drawn on the CPU from an explicit ``torch.Generator`` (:func:`sample_params`) and then applied on
the images' device (:func:`apply_params`), so one seed gives the same crops on CPU and GPU. The random *streams*
differ from the PIL path's (which draws crop by crop from torch's global RNG); the *distributions* are the same
(tests/data/test_gpu_augment.py). Pixels agree with the PIL path within uint8 rounding for the point operations;
the colour operations keep float precision between steps where PIL rounds to uint8 after each.

:func:`decode_images` decodes encoded images in a batch: JPEG with ``torchvision.io.decode_jpeg`` on the device
(nvJPEG where CUDA exists), anything else with ``decode_image`` on the CPU.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F

from franca.data.augmentations import _CFG_KEYS, blur_apply_probs, set_crop_settings
from franca.data.transforms import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

__all__ = [
    "CropParams",
    "TensorAugmentationDINO",
    "apply_params",
    "decode_images",
    "sample_crop_boxes",
    "sample_params",
]

RATIO = (3.0 / 4.0, 4.0 / 3.0)
JITTER = {"brightness": 0.4, "contrast": 0.4, "saturation": 0.2, "hue": 0.1}  # ColorJitter(0.4, 0.4, 0.2, 0.1)
P_FLIP, P_JITTER, P_GRAY, P_SOLARIZE = 0.5, 0.8, 0.2, 0.2
BLUR_KERNEL, BLUR_SIGMA = 9, (0.1, 2.0)
SOLARIZE_LEVEL = 128
ATTEMPTS = 10  # torchvision RandomResizedCrop.get_params
GRAY_WEIGHTS = (0.2989, 0.587, 0.114)  # torchvision rgb_to_grayscale


@dataclass
class CropParams:
    """Parameters of N crops, one row each (CPU tensors). ``order[n]`` is the permutation of (brightness, contrast,
    saturation, hue) used when ``jitter[n]``; ``source[n]`` indexes the image the crop is cut from."""

    source: torch.Tensor  # (N,) long
    top: torch.Tensor  # (N,) long
    left: torch.Tensor
    height: torch.Tensor
    width: torch.Tensor
    flip: torch.Tensor  # (N,) bool
    jitter: torch.Tensor  # (N,) bool
    order: torch.Tensor  # (N, 4) long
    brightness: torch.Tensor  # (N,) float
    contrast: torch.Tensor
    saturation: torch.Tensor
    hue: torch.Tensor
    gray: torch.Tensor  # (N,) bool
    blur: torch.Tensor  # (N,) bool
    sigma: torch.Tensor  # (N,) float
    solarize: torch.Tensor  # (N,) bool

    def __len__(self) -> int:
        return len(self.source)

    @staticmethod
    def cat(parts: Sequence[CropParams]) -> CropParams:
        return CropParams(**{f.name: torch.cat([getattr(p, f.name) for p in parts]) for f in fields(CropParams)})


def _uniform(n: int, lo: float, hi: float, gen: torch.Generator | None, *shape: int) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, *shape, generator=gen, dtype=torch.float64)


def _bernoulli(n: int, p: float, gen: torch.Generator | None) -> torch.Tensor:
    return torch.rand(n, generator=gen, dtype=torch.float64) < p


def sample_crop_boxes(
    heights: torch.Tensor,
    widths: torch.Tensor,
    scale: Sequence[float],
    ratio: Sequence[float] = RATIO,
    gen: torch.Generator | None = None,
) -> tuple[torch.Tensor, ...]:
    """(top, left, height, width) of one crop per source size, distributed as RandomResizedCrop.get_params."""
    H, W = heights.to(torch.float64), widths.to(torch.float64)
    n = len(H)
    area = (H * W)[:, None]
    target = area * _uniform(n, scale[0], scale[1], gen, ATTEMPTS)
    aspect = torch.exp(_uniform(n, math.log(ratio[0]), math.log(ratio[1]), gen, ATTEMPTS))
    w = torch.round(torch.sqrt(target * aspect))  # round half to even, as Python's round()
    h = torch.round(torch.sqrt(target / aspect))
    fits = (w > 0) & (w <= W[:, None]) & (h > 0) & (h <= H[:, None])
    first = fits.to(torch.int8).argmax(dim=1)  # index of the first fitting attempt (0 when none fits)
    hit = fits.any(dim=1)
    rows = torch.arange(n)
    w_hit, h_hit = w[rows, first], h[rows, first]
    # fallback: the whole image, clamped to the ratio range, centred
    in_ratio = W / H
    w_fb = torch.where(in_ratio > ratio[1], torch.round(H * ratio[1]), W)
    h_fb = torch.where(in_ratio < ratio[0], torch.round(W / ratio[0]), H)
    w_fb = torch.where(in_ratio < ratio[0], W, w_fb)
    h_fb = torch.where(in_ratio > ratio[1], H, h_fb)
    h_out, w_out = torch.where(hit, h_hit, h_fb), torch.where(hit, w_hit, w_fb)
    # offsets ~ randint(0, H - h + 1): uniform on the integers
    u = torch.rand(n, 2, generator=gen, dtype=torch.float64)
    top = torch.where(hit, torch.floor(u[:, 0] * (H - h_out + 1)), torch.div(H - h_out, 2, rounding_mode="floor"))
    left = torch.where(hit, torch.floor(u[:, 1] * (W - w_out + 1)), torch.div(W - w_out, 2, rounding_mode="floor"))
    return tuple(t.long() for t in (top, left, h_out, w_out))


def sample_params(
    heights: torch.Tensor,
    widths: torch.Tensor,
    scale: Sequence[float],
    p_blur: float,
    p_solarize: float,
    gen: torch.Generator | None = None,
    source: torch.Tensor | None = None,
) -> CropParams:
    """Parameters of one crop per (height, width) of its source image (one crop kind: global 1, global 2, local)."""
    n = len(heights)
    top, left, h, w = sample_crop_boxes(heights, widths, scale, RATIO, gen)
    b, c, s, hue = JITTER["brightness"], JITTER["contrast"], JITTER["saturation"], JITTER["hue"]
    return CropParams(
        source=torch.arange(n) if source is None else source,
        top=top,
        left=left,
        height=h,
        width=w,
        flip=_bernoulli(n, P_FLIP, gen),
        jitter=_bernoulli(n, P_JITTER, gen),
        order=torch.argsort(torch.rand(n, 4, generator=gen), dim=1),  # a uniform permutation per row
        brightness=_uniform(n, 1 - b, 1 + b, gen).float(),
        contrast=_uniform(n, 1 - c, 1 + c, gen).float(),
        saturation=_uniform(n, 1 - s, 1 + s, gen).float(),
        hue=_uniform(n, -hue, hue, gen).float(),
        gray=_bernoulli(n, P_GRAY, gen),
        blur=_bernoulli(n, p_blur, gen),
        sigma=_uniform(n, *BLUR_SIGMA, gen).float(),
        solarize=_bernoulli(n, p_solarize, gen),
    )


# ---- operations on float (N, 3, h, w) batches in [0, 1]; factors are (N,) tensors on the same device ----


def _col(x: torch.Tensor) -> torch.Tensor:
    return x.view(-1, 1, 1, 1)


def grayscale(x: torch.Tensor) -> torch.Tensor:
    """(N, 1, h, w) luma."""
    r, g, b = x.unbind(dim=1)
    return (GRAY_WEIGHTS[0] * r + GRAY_WEIGHTS[1] * g + GRAY_WEIGHTS[2] * b).unsqueeze(1)


def _blend(x: torch.Tensor, other: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    f = _col(factor)
    return (f * x + (1 - f) * other).clamp_(0, 1)


def adjust_brightness(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    return _blend(x, torch.zeros_like(x), f)


def adjust_contrast(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    return _blend(x, grayscale(x).mean(dim=(-3, -2, -1), keepdim=True), f)


def adjust_saturation(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    return _blend(x, grayscale(x), f)


def adjust_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate the hue by ``shift`` turns (HSV round trip, as torchvision's tensor adjust_hue)."""
    r, g, b = x.unbind(dim=1)
    maxc, _ = x.max(dim=1)
    minc, _ = x.min(dim=1)
    delta = maxc - minc
    safe = torch.where(delta > 0, delta, torch.ones_like(delta))
    sat = delta / torch.where(maxc > 0, maxc, torch.ones_like(maxc))
    rc, gc, bc = (maxc - r) / safe, (maxc - g) / safe, (maxc - b) / safe
    h = torch.where(maxc == r, bc - gc, torch.where(maxc == g, 2.0 + rc - bc, 4.0 + gc - rc))
    h = torch.where(delta > 0, h / 6.0, torch.zeros_like(h))
    h = torch.remainder(h + shift.view(-1, 1, 1), 1.0)
    i = torch.floor(h * 6.0)
    fr = h * 6.0 - i
    i = i.long() % 6
    v = maxc
    p, q, t = v * (1 - sat), v * (1 - sat * fr), v * (1 - sat * (1 - fr))
    table = torch.stack([torch.stack(c, 0) for c in ((v, q, p, p, t, v), (t, v, v, q, p, p), (p, p, t, v, v, q))])
    # table: (3 channels, 6 sectors, N, h, w) -> pick the sector of every pixel
    idx = i.unsqueeze(0).unsqueeze(0).expand(3, 1, *i.shape)
    return torch.gather(table, 1, idx).squeeze(1).permute(1, 0, 2, 3).clamp_(0, 1)


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, kernel_size: int = BLUR_KERNEL) -> torch.Tensor:
    """Separable Gaussian blur with a sigma per image, reflect padding (torchvision's kernel and border)."""
    n, c, hh, ww = x.shape
    half = (kernel_size - 1) / 2
    pos = torch.linspace(-half, half, kernel_size, device=x.device, dtype=x.dtype)
    kernel = torch.exp(-0.5 * (pos[None, :] / sigma.to(x)[:, None]) ** 2)
    kernel = (kernel / kernel.sum(dim=1, keepdim=True)).repeat_interleave(c, dim=0)  # (N*C, k)
    pad = kernel_size // 2
    y = F.pad(x.reshape(1, n * c, hh, ww), (pad, pad, pad, pad), mode="reflect")
    y = F.conv2d(y, kernel[:, None, None, :], groups=n * c)
    y = F.conv2d(y, kernel[:, None, :, None], groups=n * c)
    return y.reshape(n, c, hh, ww)


def solarize(x: torch.Tensor) -> torch.Tensor:
    """Invert the pixels whose uint8 level (rounded) is >= 128, as RandomSolarize(128) on a uint8 image."""
    return torch.where(x * 255 >= SOLARIZE_LEVEL - 0.5, 1 - x, x)


_JITTER_OPS = (
    ("brightness", adjust_brightness),
    ("contrast", adjust_contrast),
    ("saturation", adjust_saturation),
    ("hue", adjust_hue),
)


def _subset(x: torch.Tensor, mask: torch.Tensor, fn, *args: torch.Tensor) -> torch.Tensor:
    """``x`` with ``fn`` applied to the rows where ``mask`` (a CPU bool tensor) holds; args are per-row tensors."""
    idx = torch.nonzero(mask).flatten()
    if len(idx) == 0:
        return x
    dev_idx = idx.to(x.device)
    x[dev_idx] = fn(x[dev_idx], *(a[idx].to(x.device) for a in args))
    return x


def resized_crops(images: Sequence[torch.Tensor], p: CropParams, size: int) -> torch.Tensor:
    """(N, 3, size, size) float in [0, 1] at uint8 levels: bicubic antialiased resize of every crop box.

    On the CPU the resize runs on uint8 (torch's PIL-compatible fixed-point kernel: within 1-2 levels of PIL, and
    about 3x faster than float); CUDA has no uint8 bicubic, so it runs in float there and is rounded to uint8 levels.
    """
    out = []
    for n in range(len(p)):
        t, l_, h, w = (int(v[n]) for v in (p.top, p.left, p.height, p.width))
        box = images[int(p.source[n])][:, t : t + h, l_ : l_ + w].unsqueeze(0)
        if box.device.type != "cpu":
            box = box.float()
        y = F.interpolate(box, size=(size, size), mode="bicubic", antialias=True, align_corners=False)
        out.append(y if y.dtype == torch.uint8 else y.round_().clamp_(0, 255))
    return torch.cat(out).float().div_(255)


def apply_params(images: Sequence[torch.Tensor], p: CropParams, size: int) -> torch.Tensor:
    """The augmented crops (N, 3, size, size), float in [0, 1] (before Normalize), on the images' device."""
    x = resized_crops(images, p, size)
    flip = p.flip.to(x.device)[:, None, None, None]
    x = torch.where(flip, x.flip(-1), x)
    for pos in range(4):  # ColorJitter: the ops in each row's own order
        for op, (name, fn) in enumerate(_JITTER_OPS):
            x = _subset(x, p.jitter & (p.order[:, pos] == op), fn, getattr(p, name))
    x = _subset(x, p.gray, lambda v: grayscale(v).expand(-1, 3, -1, -1).contiguous())
    x = _subset(x, p.blur, gaussian_blur, p.sigma)
    return _subset(x, p.solarize, solarize)


def decode_images(blobs: Sequence[bytes], device: torch.device | str = "cpu") -> list[torch.Tensor]:
    """(3, H, W) uint8 RGB tensors on ``device``: JPEGs in one batched ``decode_jpeg`` call there, others on CPU."""
    from torchvision.io import ImageReadMode, decode_image, decode_jpeg

    device = torch.device(device)
    data = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in blobs]
    is_jpeg = [len(b) > 2 and b[:2] == b"\xff\xd8" for b in blobs]
    out: list[torch.Tensor | None] = [None] * len(blobs)
    jpeg_idx = [i for i, j in enumerate(is_jpeg) if j]
    if jpeg_idx:
        decoded = decode_jpeg([data[i] for i in jpeg_idx], mode=ImageReadMode.RGB, device=device)
        for i, img in zip(jpeg_idx, decoded, strict=True):
            out[i] = img
    for i, j in enumerate(is_jpeg):
        if not j:
            out[i] = decode_image(data[i], mode=ImageReadMode.RGB).to(device)
    return out


class TensorAugmentationDINO:
    """Batched multi-crop: ``images`` (list of (3, H, W) uint8 tensors on one device) -> ``{"global_crops":
    (2B, 3, S, S), "local_crops": (LB, 3, s, s)}``, normalised, stacked crop-major like ``stack_crops``."""

    def __init__(
        self,
        global_crops_scale: Sequence[float],
        local_crops_scale: Sequence[float],
        local_crops_number: int,
        global_crops_size: int = 224,
        local_crops_size: int = 96,
        blur_probs: str = "effective",
        mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
        std: Sequence[float] = IMAGENET_DEFAULT_STD,
    ) -> None:
        set_crop_settings(self, global_crops_scale, local_crops_scale, local_crops_number, global_crops_size,
                          local_crops_size)  # fmt: skip
        self.p_blur = blur_apply_probs(blur_probs)  # (global 1, global 2, locals)
        self.mean, self.std = torch.tensor(mean), torch.tensor(std)

    @classmethod
    def from_config(cls, crops_cfg: Mapping, **overrides) -> TensorAugmentationDINO:
        missing = [k for k in _CFG_KEYS if k not in crops_cfg]
        if missing:
            raise KeyError(f"crops config is missing key(s) {', '.join('crops.' + k for k in missing)}")
        kwargs = {k: crops_cfg[k] for k in _CFG_KEYS}
        kwargs["blur_probs"] = crops_cfg.get("blur_probs", "effective")
        kwargs.update(overrides)
        return cls(**kwargs)

    def sample(self, heights: torch.Tensor, widths: torch.Tensor, gen: torch.Generator | None = None):
        """(global params (2B rows: g1 of every image, then g2), local params (LB rows, crop-major))."""
        b = len(heights)
        src = torch.arange(b)
        g1 = sample_params(heights, widths, self.global_crops_scale, self.p_blur[0], 0.0, gen, src)
        g2 = sample_params(heights, widths, self.global_crops_scale, self.p_blur[1], P_SOLARIZE, gen, src)
        rep = self.local_crops_number
        loc = sample_params(
            heights.repeat(rep), widths.repeat(rep), self.local_crops_scale, self.p_blur[2], 0.0, gen, src.repeat(rep)
        )
        return CropParams.cat([g1, g2]), loc

    def _normalize(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean.to(x.device).view(1, 3, 1, 1)) / self.std.to(x.device).view(1, 3, 1, 1)

    def __call__(self, images: Sequence[torch.Tensor], gen: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        heights = torch.tensor([int(im.shape[-2]) for im in images])
        widths = torch.tensor([int(im.shape[-1]) for im in images])
        glob, loc = self.sample(heights, widths, gen)
        out = {"global_crops": self._normalize(apply_params(images, glob, self.global_crops_size))}
        if self.local_crops_number:
            out["local_crops"] = self._normalize(apply_params(images, loc, self.local_crops_size))
        else:
            out["local_crops"] = torch.empty(0, 3, 0, 0, device=out["global_crops"].device)
        return out

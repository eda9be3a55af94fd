"""The batched tensor augmentation (franca.data.gpu_augment) against the PIL path (franca.data.augmentations).

Distributions: the real PIL pipeline runs on many images while spies on ``torchvision.transforms.functional`` record
the parameters it applies (crop box, flip, jitter factors and order, grayscale, blur sigma, solarize); the tensor
path's sampler draws the same number of crops for the same source sizes. Continuous parameters are compared with
two-sample Kolmogorov-Smirnov tests, decisions with two-sample tests on 2 x k contingency tables. Every test runs at
a family-wise level ALPHA (Bonferroni over the tests of one run), so the thresholds follow from the sample sizes.
A power check shows that the same test at the same sample size rejects a sampler with slightly different scales.

Pixels: the point operations (flip, grayscale, solarize) and the blur applied to the same uint8 crop agree with
the PIL operations within uint8 rounding; the whole batched pipeline equals the same parameters applied crop by
crop with torchvision's tensor functions.
"""

from __future__ import annotations

import math
from collections import defaultdict

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import stats
from torchvision.transforms import functional as TF

from franca.data import gpu_augment as G
from franca.data.augmentations import DataAugmentationDINO

ALPHA = 1e-3  # family-wise false-alarm rate of one distribution test run
N_IMAGES = 1500
N_LOCAL = 2
SIZES = [(48, 64), (64, 48), (40, 40), (30, 90)]  # (H, W): landscape, portrait, square, beyond the ratio range
SCALES = {"global": (0.32, 1.0), "local": (0.05, 0.32)}
JITTER_OPS = ("adjust_brightness", "adjust_contrast", "adjust_saturation", "adjust_hue")


def _pil_params(monkeypatch) -> dict[str, dict[str, list]]:
    """Run DataAugmentationDINO on N_IMAGES images and return per crop kind the parameters it applied."""
    log: list[tuple[str, tuple]] = []

    def spy(name):
        real = getattr(TF, name)

        def wrapper(img, *args, **kwargs):
            log.append((name, (img.size if isinstance(img, Image.Image) else None, *args)))
            return real(img, *args, **kwargs)

        monkeypatch.setattr(TF, name, wrapper)

    for name in ("resized_crop", "hflip", *JITTER_OPS, "rgb_to_grayscale", "gaussian_blur", "solarize"):
        spy(name)
    aug = DataAugmentationDINO(SCALES["global"], SCALES["local"], N_LOCAL, global_crops_size=12, local_crops_size=10)
    torch.manual_seed(0)
    images = [Image.new("RGB", (w, h), (90, 140, 200)) for h, w in SIZES]
    for n in range(N_IMAGES):
        aug(images[n % len(SIZES)])
    out: dict[str, dict[str, list]] = defaultdict(lambda: defaultdict(list))
    crop_index, rec = -1, None
    for name, args in log:
        if name == "resized_crop":
            crop_index += 1
            k = crop_index % (2 + N_LOCAL)
            rec = out[("g1", "g2")[k] if k < 2 else "local"]
            (w_img, h_img), top, left, h, w = args[:5]
            rec["H"].append(h_img), rec["W"].append(w_img)
            rec["top"].append(top), rec["left"].append(left), rec["h"].append(h), rec["w"].append(w)
            for key in ("flip", "jitter", "gray", "blur", "solarize"):
                rec[key].append(False)
            rec["order"].append([])
        elif name == "hflip":
            rec["flip"][-1] = True
        elif name in JITTER_OPS:
            rec["jitter"][-1] = True
            rec["order"][-1].append(JITTER_OPS.index(name))
            rec[name.removeprefix("adjust_")].append(float(args[1]))
        elif name == "rgb_to_grayscale":
            rec["gray"][-1] = True
        elif name == "gaussian_blur":
            rec["blur"][-1] = True
            rec["sigma"].append(float(args[2][0]))
        elif name == "solarize":
            rec["solarize"][-1] = True
    return out


def _tensor_params() -> dict[str, dict[str, list]]:
    aug = G.TensorAugmentationDINO(SCALES["global"], SCALES["local"], N_LOCAL)
    heights = torch.tensor([SIZES[n % len(SIZES)][0] for n in range(N_IMAGES)])
    widths = torch.tensor([SIZES[n % len(SIZES)][1] for n in range(N_IMAGES)])
    glob, loc = aug.sample(heights, widths, torch.Generator().manual_seed(1))
    out = {}
    for kind, p, rows in (("g1", glob, slice(0, N_IMAGES)), ("g2", glob, slice(N_IMAGES, None)), ("local", loc, None)):
        rows = rows or slice(None)
        src = p.source[rows]
        rec = {"H": heights[src].tolist(), "W": widths[src].tolist()}
        for key, attr in (("top", "top"), ("left", "left"), ("h", "height"), ("w", "width")):
            rec[key] = getattr(p, attr)[rows].tolist()
        for key in ("flip", "jitter", "gray", "blur", "solarize"):
            rec[key] = getattr(p, key)[rows].tolist()
        applied = p.jitter[rows]
        rec["order"] = [o if j else [] for o, j in zip(p.order[rows].tolist(), applied.tolist(), strict=True)]
        for key in ("brightness", "contrast", "saturation", "hue"):
            rec[key] = getattr(p, key)[rows][applied].tolist()
        rec["sigma"] = p.sigma[rows][p.blur[rows]].tolist()
        out[kind] = rec
    return out


def _derived(rec: dict) -> dict[str, np.ndarray]:
    """Continuous summaries of the crop boxes: area fraction, log aspect, offsets as fractions of their range."""
    H, W, h, w = (np.asarray(rec[k], dtype=float) for k in ("H", "W", "h", "w"))
    top, left = np.asarray(rec["top"], float), np.asarray(rec["left"], float)
    return {
        "scale": h * w / (H * W),
        "log_ratio": np.log(w / h),
        "top_frac": (top + 0.5) / (H - h + 1),
        "left_frac": (left + 0.5) / (W - w + 1),
    }


def _contingency(a: list, b: list, categories: list) -> float:
    """p-value of the chi-square test of homogeneity of two categorical samples (categories absent in both dropped)."""
    table = np.array([[sum(x == c for x in a) for c in categories], [sum(x == c for x in b) for c in categories]])
    table = table[:, table.sum(axis=0) > 0]
    if table.shape[1] < 2:
        return 1.0  # one category in both samples: identical (e.g. blur never applied)
    return float(stats.chi2_contingency(table).pvalue)


def _compare(pil: dict, ten: dict) -> dict[str, float]:
    """p-value of every comparison, keyed 'kind/parameter'."""
    pvalues = {}
    for kind in ("g1", "g2", "local"):
        a, b = pil[kind], ten[kind]
        assert len(a["h"]) == len(b["h"]), kind
        for key, x in _derived(a).items():
            pvalues[f"{kind}/{key}"] = float(stats.ks_2samp(x, _derived(b)[key]).pvalue)
        for key in ("brightness", "contrast", "saturation", "hue", "sigma"):
            if a[key] or b[key]:
                pvalues[f"{kind}/{key}"] = float(stats.ks_2samp(a[key], b[key]).pvalue)
        for key in ("flip", "jitter", "gray", "blur", "solarize"):
            pvalues[f"{kind}/{key}"] = _contingency(a[key], b[key], [False, True])
        perms = sorted({tuple(o) for o in a["order"] + b["order"] if o})
        orders_a = [tuple(o) for o in a["order"] if o]
        orders_b = [tuple(o) for o in b["order"] if o]
        pvalues[f"{kind}/order"] = _contingency(orders_a, orders_b, perms)
    return pvalues


@pytest.fixture(scope="module")
def params(request):
    mp = pytest.MonkeyPatch()
    try:
        pil = _pil_params(mp)
    finally:
        mp.undo()
    return pil, _tensor_params()


def test_parameter_distributions_match_pil_path(params):
    pil, ten = params
    pvalues = _compare(pil, ten)
    level = ALPHA / len(pvalues)  # Bonferroni
    failed = {k: v for k, v in pvalues.items() if v < level}
    assert not failed, f"distributions differ at family-wise level {ALPHA} (per test {level:.1e}): {failed}"
    # the probabilities themselves: the PIL path's rates are those of the spec (exact binomial tests)
    expected = {"flip": 0.5, "jitter": 0.8, "gray": 0.2}
    for kind, p_blur, p_sol in (("g1", 0.0, 0.0), ("g2", 0.9, 0.2), ("local", 0.5, 0.0)):
        for key, p in {**expected, "blur": p_blur, "solarize": p_sol}.items():
            k, n = sum(ten[kind][key]), len(ten[kind][key])
            if p in (0.0, 1.0):
                assert k == round(p * n), (kind, key, k, n)
            else:
                assert stats.binomtest(k, n, p).pvalue >= level, (kind, key, k / n, p)
        # every one of the 24 orders occurs
        assert len({tuple(o) for o in ten[kind]["order"] if o}) == 24


def test_distribution_test_has_power(params):
    """At the same sample size and level, the KS test rejects a sampler whose scale range is 5% narrower."""
    pil, _ = params
    n = len(pil["g2"]["h"])
    heights = torch.tensor(pil["g2"]["H"])
    widths = torch.tensor(pil["g2"]["W"])
    lo, hi = SCALES["global"]
    narrow = G.sample_crop_boxes(heights, widths, (lo + 0.05 * (hi - lo), hi), gen=torch.Generator().manual_seed(2))
    scale = (narrow[2] * narrow[3]).double() / (heights * widths).double()
    pvalue = stats.ks_2samp(_derived(pil["g2"])["scale"], scale.numpy()).pvalue
    assert pvalue < ALPHA / 60, (n, pvalue)


def _uint8_image(h: int, w: int, seed: int) -> torch.Tensor:
    """A smooth colour image with edges (what crops of photos look like), (3, h, w) uint8."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(1, 3, 6, 8, generator=g)
    img = torch.nn.functional.interpolate(low, size=(h, w), mode="bilinear", align_corners=False)[0]
    img[:, h // 3 : h // 2, w // 4 :] = torch.rand(3, 1, 1, generator=g)
    return (img * 255).round().to(torch.uint8)


def _one_crop(t, l_, h, w, **kw) -> G.CropParams:
    one = lambda v, dt=None: torch.tensor([v], dtype=dt)  # noqa: E731
    base = dict(
        source=one(0), top=one(t), left=one(l_), height=one(h), width=one(w), flip=one(False), jitter=one(False),
        order=torch.arange(4)[None], brightness=one(1.0), contrast=one(1.0), saturation=one(1.0), hue=one(0.0),
        gray=one(False), blur=one(False), sigma=one(1.0), solarize=one(False),
    )  # fmt: skip
    base.update({k: one(v) for k, v in kw.items()})
    return G.CropParams(**base)


def _pil_to_float(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(img)).permute(2, 0, 1).float() / 255


def test_point_ops_match_pil_within_uint8_rounding():
    img = _uint8_image(60, 80, 0)
    pil = Image.fromarray(img.permute(1, 2, 0).numpy())
    # a 32 x 32 box resized to 32: both resizes are the identity, so both paths see the same uint8 crop
    pil_crop = TF.resized_crop(pil, 5, 7, 32, 32, [32, 32], TF.InterpolationMode.BICUBIC, antialias=True)
    base = _pil_to_float(pil_crop)[None]
    assert torch.equal(G.apply_params([img], _one_crop(5, 7, 32, 32), 32), base)

    def ours(**kw):
        return G.apply_params([img], _one_crop(5, 7, 32, 32, **kw), 32)

    lsb = 1 / 255
    cases = {
        "flip": (ours(flip=True), TF.hflip(pil_crop), 0),
        "solarize": (ours(solarize=True), TF.solarize(pil_crop, 128), 0),
        # PIL's L = (19595 R + 38470 G + 7471 B + 2^15) >> 16 against 0.2989 / 0.587 / 0.114: < 1 level apart
        "grayscale": (ours(gray=True), TF.rgb_to_grayscale(pil_crop, 3), lsb),
        # torchvision blurs a PIL image as a uint8 tensor and rounds once: half a level, plus float error
        "blur": (ours(blur=True, sigma=1.3), TF.gaussian_blur(pil_crop, 9, [1.3, 1.3]), lsb / 2),
        # ImageEnhance.Brightness: one blend with black, rounded to uint8
        "brightness": (ours(jitter=True, brightness=1.3), TF.adjust_brightness(pil_crop, 1.3), lsb),
    }
    for name, (x, theirs, tol) in cases.items():
        diff = (x[0] - _pil_to_float(theirs)).abs().max().item()
        assert diff <= tol + 1e-6, (name, diff * 255)


@pytest.mark.parametrize(("box", "size"), [((10, 20, 250, 300), 224), ((5, 5, 60, 70), 98), ((5, 7, 20, 15), 40)])
def test_resize_matches_pil_bicubic(box, size):
    """Down- and up-scaling a box of a noisy image: torch's uint8 antialiased bicubic (PIL's a = -0.5 kernel in fixed
    point) against PIL's: both round to uint8, so a pixel may land one level apart (two at an up-scaled border)."""
    img = _uint8_image(300, 400, 0)
    noise = torch.randn(img.shape, generator=torch.Generator().manual_seed(0)) * 20
    img = (img.float() + noise).clamp(0, 255).round().to(torch.uint8)
    pil = Image.fromarray(img.permute(1, 2, 0).numpy())
    pil_crop = TF.resized_crop(pil, *box, [size, size], TF.InterpolationMode.BICUBIC, antialias=True)
    diff = (G.apply_params([img], _one_crop(*box), size)[0] - _pil_to_float(pil_crop)).abs() * 255
    assert diff.max().item() <= 2 + 1e-3 and diff.mean().item() < 0.05, (diff.max().item(), diff.mean().item())


def _reference_crop(img: torch.Tensor, p: G.CropParams, n: int, size: int) -> torch.Tensor:
    """Crop ``n`` of ``p`` with torchvision's per-image tensor functions, in the PIL path's order (uint8 resize)."""
    t, l_, h, w = (int(v[n]) for v in (p.top, p.left, p.height, p.width))
    box = img[None, :, t : t + h, l_ : l_ + w]  # the resize itself is checked against PIL above
    x = torch.nn.functional.interpolate(box, size=(size, size), mode="bicubic", antialias=True)[0].float() / 255
    if p.flip[n]:
        x = TF.hflip(x)
    if p.jitter[n]:
        for op in p.order[n].tolist():
            name = JITTER_OPS[op]
            x = getattr(TF, name)(x, float(getattr(p, name.removeprefix("adjust_"))[n]))
    if p.gray[n]:
        x = TF.rgb_to_grayscale(x, 3)
    if p.blur[n]:
        x = TF.gaussian_blur(x, 9, [float(p.sigma[n])] * 2)
    if p.solarize[n]:
        x = torch.where(x * 255 >= 127.5, 1 - x, x)
    return x


def test_batched_pipeline_equals_per_crop_reference():
    images = [_uint8_image(48 + 8 * i, 64 - 4 * i, i) for i in range(6)]
    heights = torch.tensor([im.shape[1] for im in images]).repeat(8)
    widths = torch.tensor([im.shape[2] for im in images]).repeat(8)
    p = G.sample_params(heights, widths, (0.05, 1.0), 0.5, 0.5, torch.Generator().manual_seed(3),
                        source=torch.arange(6).repeat(8))  # fmt: skip
    out = G.apply_params(images, p, 24)
    for n in range(len(p)):
        ref = _reference_crop(images[int(p.source[n])], p, n, 24)
        assert torch.allclose(out[n], ref, atol=1e-5), (n, (out[n] - ref).abs().max().item())
    assert p.jitter.any() and p.blur.any() and p.solarize.any() and p.gray.any() and p.flip.any()


def test_augmentation_output_layout_and_normalisation():
    aug = G.TensorAugmentationDINO((0.32, 1.0), (0.05, 0.32), 3, global_crops_size=28, local_crops_size=14)
    images = [_uint8_image(40, 50, i) for i in range(4)]
    out = aug(images, torch.Generator().manual_seed(0))
    assert out["global_crops"].shape == (8, 3, 28, 28) and out["local_crops"].shape == (12, 3, 14, 14)
    lo = (0 - torch.tensor(G.IMAGENET_DEFAULT_MEAN)) / torch.tensor(G.IMAGENET_DEFAULT_STD)
    hi = (1 - torch.tensor(G.IMAGENET_DEFAULT_MEAN)) / torch.tensor(G.IMAGENET_DEFAULT_STD)
    for key in ("global_crops", "local_crops"):
        per_channel = out[key].transpose(0, 1).reshape(3, -1)
        assert (per_channel.min(1).values >= lo - 1e-5).all() and (per_channel.max(1).values <= hi + 1e-5).all()
    again = aug(images, torch.Generator().manual_seed(0))
    assert torch.equal(out["global_crops"], again["global_crops"])
    assert math.isfinite(out["local_crops"].sum().item())


def test_decode_images_matches_pil(tmp_path):
    import io

    img = _uint8_image(33, 47, 1)
    arr = img.permute(1, 2, 0).numpy()
    png, jpg = io.BytesIO(), io.BytesIO()
    Image.fromarray(arr).save(png, format="PNG")
    Image.fromarray(arr).save(jpg, format="JPEG", quality=95)
    decoded = G.decode_images([png.getvalue(), jpg.getvalue()], "cpu")
    assert torch.equal(decoded[0], img)
    pil_jpeg = torch.from_numpy(np.array(Image.open(io.BytesIO(jpg.getvalue())).convert("RGB"))).permute(2, 0, 1)
    assert decoded[1].shape == (3, 33, 47)
    # libjpeg-turbo in both, possibly different IDCT/upsampling settings: within a few levels
    assert (decoded[1].int() - pil_jpeg.int()).abs().max().item() <= 4


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_path_equals_cpu_path():
    import io

    aug = G.TensorAugmentationDINO((0.32, 1.0), (0.05, 0.32), 2, global_crops_size=56, local_crops_size=28)
    blobs = []
    for i in range(4):
        buf = io.BytesIO()
        Image.fromarray(_uint8_image(64, 80, i).permute(1, 2, 0).numpy()).save(buf, format="JPEG", quality=95)
        blobs.append(buf.getvalue())
    cpu_imgs = G.decode_images(blobs, "cpu")
    gpu_imgs = G.decode_images(blobs, "cuda")
    assert all(g.is_cuda for g in gpu_imgs)
    assert all((g.cpu().int() - c.int()).abs().float().mean() < 2 for g, c in zip(gpu_imgs, cpu_imgs, strict=True))
    # compare the augmentation on the same (CPU-decoded) pixels; the same generator seed gives the same parameters.
    # CUDA resizes in float (CPU: uint8 fixed point), so a pixel may differ by a level or two, which the colour ops
    # carry and solarize can turn into a full inversion of the rare pixels next to its threshold
    ref = aug(cpu_imgs, torch.Generator().manual_seed(0))
    out = aug([im.cuda() for im in cpu_imgs], torch.Generator().manual_seed(0))
    for key in ref:
        diff = (out[key].cpu() - ref[key]).abs() * 0.225 * 255  # in uint8 levels
        assert diff.mean() < 1.0 and torch.quantile(diff.flatten(), 0.99) < 4, key

"""Procedural "shapes" dataset for the ``tiny`` preset (spec 10 "Data for small scale", issue 4 item 1).

Each image: a textured background (1/f noise mixing two random colours), 1..``max_objects`` objects drawn one over
the other, each of a class ``c`` = (shape ``c % 6``, hue ``c / C``, stripe orientation ``45 deg * (c // 6)``), and
a per-pixel mask (class id + 1 on object pixels, 0 on background; 255 is never used here). The label is the class
of the dominant object: the one with most visible pixels after occlusion (ties: the primary object wins). ``style``
(``STYLES``) sets what else varies from image to image.

Position bias knob ``position_bias = b`` in [0, 1]:
  * with probability ``b`` the first object (the large "primary") is centred near its class anchor (anchors on a
    circle of radius ``0.25 S`` around the centre, angle ``2 pi c / C``), otherwise uniformly;
  * the background gets an additive vertical luminance ramp of amplitude ``b * gradient_strength``.
Both make absolute position linearly decodable from patch tokens, which is what RASA removes.

Planted duplicates (``exact_fraction``, ``near_fraction``, ``eval_copy_fraction`` of the train slots): exact and
near copies of earlier train images and near copies of val / test images replace the images of those slots, with
the ground truth in each copy's ``.json`` and the manifest (franca/data/planted.py), so that dedup has something to
find and can be scored.

Determinism: chunk ``j`` of split ``s`` draws from ``default_rng([seed, s, j])`` (chunks of 64 images, so the
bytes do not depend on ``shard_size``), PNGs are written with fixed settings and tars by ``AtomicTarWriter``.
"""

from __future__ import annotations

import colorsys
import hashlib
import io
import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image

from franca.data.manifest import image_record, make_manifest, write_parquet_atomic
from franca.data.phash import colour_layout, phash_image, phash_to_hex
from franca.data.planted import KINDS, near_copy, plan_duplicates
from franca.data.shards import ShardWriter

logger = logging.getLogger(__name__)

__all__ = ["SHAPES", "SPLITS", "class_names", "class_colours", "pink_noise", "render_batch", "generate"]

SHAPES = ("disk", "square", "diamond", "triangle", "cross", "ellipse")
# ``style``: "shapes" (class = shape + hue + stripe angle 0 / 45 deg; raw pixels give the class away: k-NN on the
# pixels 0.87 with 8 classes) or "invariant" (class = shape + stripe angle 0 / 90 deg, both kept by flips, crops
# and colour jitter; each object gets a random colour and the primary a wider scale range, so the pixels do not) or
# "nuisance" (the class of "shapes", hue included, under the nuisances that the augmentations teach invariance to:
# an achromatic background of random luminance and contrast, object brightness x 0.35-1, the primary's wider scale
# range, and position-bias anchors drawn independently of the class; the tiny preset's style, docs/tiny-evidence.md)
STYLES = ("shapes", "invariant", "nuisance")
PRIMARY_RADIUS = {"shapes": (0.16, 0.24), "invariant": (0.12, 0.28), "nuisance": (0.12, 0.28)}  # of the image side
SPLITS = ("train", "val", "test")
_CHUNK = 64  # images per RNG chunk (fixes the bytes independently of shard_size)
_PNG = {"format": "PNG", "compress_level": 1, "optimize": False}
# planted duplicates (franca/data/planted.py), as fractions of n_train; config: data.datasets.<synth>.duplicates
EXACT_FRACTION = 0.01
NEAR_FRACTION = 0.02
EVAL_COPY_FRACTION = 0.01


def class_colours(n_classes: int) -> np.ndarray:
    """(C, 3) float RGB in [0, 1]: evenly spaced hues, saturation 0.85, value 0.95."""
    return np.array([colorsys.hsv_to_rgb(c / n_classes, 0.85, 0.95) for c in range(n_classes)])


def random_colours(rng: np.random.Generator, n: int) -> np.ndarray:
    """(n, 3) float RGB: uniform hue, saturation 0.4-1, value 0.6-1 (independent of the class)."""
    hsv = np.stack([rng.random(n), rng.uniform(0.4, 1.0, n), rng.uniform(0.6, 1.0, n)], axis=1)
    return np.array([colorsys.hsv_to_rgb(*v) for v in hsv])


def class_names(n_classes: int) -> list[str]:
    """``<shape>_h<hue index>`` per class, e.g. ``disk_h0``."""
    return [f"{SHAPES[c % len(SHAPES)]}_h{c}" for c in range(n_classes)]


def pink_noise(rng: np.random.Generator, n: int, size: int, exponent: float = 1.5) -> np.ndarray:
    """(n, size, size) noise with amplitude spectrum ``1 / f^exponent``, each image scaled to [0, 1]."""
    white = rng.standard_normal((n, size, size))
    f = np.sqrt(np.fft.fftfreq(size)[:, None] ** 2 + np.fft.rfftfreq(size)[None, :] ** 2)  # (S, S//2+1)
    f[0, 0] = 1.0
    field = np.fft.irfft2(np.fft.rfft2(white) / f**exponent, s=(size, size))  # (n, S, S)
    lo, hi = field.min(axis=(1, 2), keepdims=True), field.max(axis=(1, 2), keepdims=True)
    return (field - lo) / np.maximum(hi - lo, 1e-12)


def shape_masks(shape: np.ndarray, dx: np.ndarray, dy: np.ndarray, r: np.ndarray) -> np.ndarray:
    """(B, H, W) bool: pixels inside shape ``SHAPES[shape[b]]`` of radius ``r[b]``.

    Args:
        shape: (B,) int shape ids; dx, dy: (B, H, W) offsets from the centres; r: (B,) radii (pixels).
    """
    out = np.zeros(dx.shape, dtype=bool)
    for s in np.unique(shape % len(SHAPES)).tolist():
        idx = np.flatnonzero(shape % len(SHAPES) == s)
        x, y, rr = dx[idx], dy[idx], r[idx, None, None]
        ax, ay = np.abs(x), np.abs(y)
        if s == 0:  # disk
            inside = x**2 + y**2 <= rr**2
        elif s == 1:  # square, half side 0.8 r
            inside = np.maximum(ax, ay) <= 0.8 * rr
        elif s == 2:  # diamond
            inside = ax + ay <= rr
        elif s == 3:  # upward triangle: apex at dy = -r, base at dy = r / 2
            inside = (y >= -rr) & (y <= 0.5 * rr) & (ax <= 0.58 * (y + rr))
        elif s == 4:  # cross, arm half width 0.3 r
            inside = ((ax <= 0.3 * rr) & (ay <= rr)) | ((ay <= 0.3 * rr) & (ax <= rr))
        else:  # horizontal ellipse, semi-axes r and r / 2
            inside = (x / rr) ** 2 + (y / (0.5 * rr)) ** 2 <= 1.0
        out[idx] = inside
    return out


def _draw_objects(rng, n, n_classes, size, max_objects, position_bias, style) -> list[dict[str, np.ndarray]]:
    """Per draw slot k: arrays of length n (class, shape, cx, cy, r, active). Slot 0 is the primary object."""
    n_obj = rng.integers(1, max_objects + 1, size=n)
    anchors = 0.5 * size + 0.25 * size * np.stack(
        [np.cos(2 * np.pi * np.arange(n_classes) / n_classes), np.sin(2 * np.pi * np.arange(n_classes) / n_classes)]
    )  # (2, C)
    slots = []
    for k in range(max_objects):
        cls = rng.integers(0, n_classes, size=n)
        lo, hi = PRIMARY_RADIUS[style] if k == 0 else (0.07, 0.13)
        r = size * rng.uniform(lo, hi, size=n)
        cx, cy = rng.uniform(r, size - r), rng.uniform(r, size - r)
        if k == 0:
            biased = rng.random(n) < position_bias
            # "nuisance": the anchor is drawn independently of the class (position stays decodable, not the class)
            cls_anchor = rng.integers(0, n_classes, size=n) if style == "nuisance" else cls
            jitter = rng.normal(0.0, 0.05 * size, size=(2, n))
            cx = np.where(biased, np.clip(anchors[0, cls_anchor] + jitter[0], r, size - r), cx)
            cy = np.where(biased, np.clip(anchors[1, cls_anchor] + jitter[1], r, size - r), cy)
        slots.append({"cls": cls, "shape": cls % len(SHAPES), "cx": cx, "cy": cy, "r": r, "active": k < n_obj})
    return slots


def render_batch(
    rng: np.random.Generator,
    n: int,
    *,
    n_classes: int,
    size: int,
    max_objects: int = 3,
    position_bias: float = 0.5,
    gradient_strength: float = 0.35,
    style: str = "shapes",
) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[list[dict[str, Any]]]]:
    """Render ``n`` images.

    Returns:
        images (n, S, S, 3) uint8, masks (n, S, S) uint8, labels (n,) int64, and per image the drawn objects
        (draw order; the last one is on top) with class, shape, centre and radius in pixels.
    """
    colours = class_colours(n_classes)  # (C, 3)
    noise = pink_noise(rng, n, size)[..., None]  # (n, S, S, 1)
    if style == "nuisance":  # achromatic: two grey levels (0.1-0.9 lets colour-shifted copies clip past dedup)
        c0, c1 = np.repeat(rng.uniform(0.2, 0.8, size=(2, n, 1, 1, 1)), 3, axis=-1)
    else:
        c0, c1 = rng.uniform(0.1, 0.7, size=(n, 1, 1, 3)), rng.uniform(0.1, 0.7, size=(n, 1, 1, 3))
    image = (c0 * (1 - noise) + c1 * noise).astype(np.float32)  # (n, S, S, 3)
    ramp = (np.arange(size) + 0.5) / size - 0.5  # (S,), top -> bottom
    image = image + np.float32(position_bias * gradient_strength) * ramp[None, :, None, None].astype(np.float32)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) + 0.5  # pixel centres
    mask = np.zeros((n, size, size), dtype=np.uint8)
    owner = np.full((n, size, size), -1, dtype=np.int8)  # draw slot visible at each pixel
    slots = _draw_objects(rng, n, n_classes, size, max_objects, position_bias, style)
    period = 4.0 if style != "invariant" else max(4.0, size / 8)  # stripes: 8 px at 64 px (4 px survive no blur)
    draw_order = list(range(1, max_objects)) + [0]  # secondaries first, the primary on top
    for k in draw_order:
        s = slots[k]
        dx, dy = xx[None] - s["cx"][:, None, None], yy[None] - s["cy"][:, None, None]
        inside = shape_masks(s["shape"], dx, dy, s["r"]) & s["active"][:, None, None]
        b, y, x = np.nonzero(inside)  # object pixels only: P = len(b)
        theta = (np.pi / 2 if style == "invariant" else np.pi / 4) * (s["cls"][b] // len(SHAPES))
        phase = (x + 0.5 - s["cx"][b]) * np.cos(theta) + (y + 0.5 - s["cy"][b]) * np.sin(theta)
        stripes = 0.5 + 0.5 * np.sin(2 * np.pi * phase / period)  # (P,)
        if style != "invariant":  # "nuisance" varies the object brightness more widely
            lo = 0.35 if style == "nuisance" else 0.9
            shade = rng.uniform(lo, 1.0, size=n)[b] * (0.8 + 0.2 * stripes)  # (P,)
            colour = colours[s["cls"][b]]  # (P, 3): the class colour
        else:
            shade = 0.45 + 0.55 * stripes  # (P,): high-contrast stripes
            colour = random_colours(rng, n)[b]  # (P, 3): one random colour per object
        image[b, y, x] = (colour * shade[:, None]).astype(np.float32)
        mask[b, y, x] = (s["cls"][b] + 1).astype(np.uint8)
        owner[inside] = k
    visible = np.stack([(owner == k).sum(axis=(1, 2)) for k in range(max_objects)], axis=1)  # (n, K)
    dominant = np.argmax(visible, axis=1)  # first maximal slot wins ties
    labels = np.stack([s["cls"] for s in slots], axis=1)[np.arange(n), dominant]
    objects = [
        [
            {
                "class": int(slots[k]["cls"][i]),
                "shape": SHAPES[int(slots[k]["shape"][i])],
                "cx": float(slots[k]["cx"][i]),
                "cy": float(slots[k]["cy"][i]),
                "r": float(slots[k]["r"][i]),
                "visible_pixels": int(visible[i, k]),
            }
            for k in draw_order
            if slots[k]["active"][i]
        ]
        for i in range(n)
    ]
    images = np.clip(np.round(image * 255.0), 0, 255).astype(np.uint8)
    return images, mask, labels.astype(np.int64), objects


def _record(png: bytes, image: np.ndarray) -> dict[str, Any]:
    """Manifest columns of a generated PNG, from the pixels (the same values ``image_record`` gives on the bytes)."""
    pil = Image.fromarray(image)
    record = {"bytes": len(png), "sha256": hashlib.sha256(png).hexdigest(), "phash": phash_to_hex(phash_image(pil))}
    record.update(layout=colour_layout(pil), width=image.shape[1], height=image.shape[0], format="png")
    return record


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, **_PNG)
    return buf.getvalue()


def _key(split: str, index: int) -> str:
    return f"{split}_{index:07d}"


class _Renderer:
    """Chunk ``j`` of split ``s`` from ``default_rng([seed, s, j])``; keeps the ``wanted`` (split, index) samples.

    Copy sources are kept as their chunk goes by (train sources precede their copies) or rendered on demand (eval
    sources, whose splits come after train), so memory grows with the number of sources, not of images.
    """

    def __init__(self, seed: int, wanted: set[tuple[str, int]], **render_kwargs: Any):
        self.seed, self.wanted, self.kwargs, self.kept = seed, wanted, render_kwargs, {}

    def chunk(self, split_id: int, chunk: int) -> tuple:
        out = render_batch(np.random.default_rng([self.seed, split_id, chunk]), _CHUNK, **self.kwargs)
        for j in range(_CHUNK):
            if (SPLITS[split_id], chunk * _CHUNK + j) in self.wanted:
                self.kept[(SPLITS[split_id], chunk * _CHUNK + j)] = (out[0][j], out[1][j], int(out[2][j]), out[3][j])
        return out

    def sample(self, split: str, index: int) -> tuple[np.ndarray, np.ndarray, int, list[dict[str, Any]]]:
        """(image, mask, label, objects) of a wanted image."""
        if (split, index) not in self.kept:
            self.chunk(SPLITS.index(split), index // _CHUNK)
        return self.kept[(split, index)]


def _planted_sample(renderer: _Renderer, slot: int, entry: dict[str, Any], seed: int):
    """(image bytes, format, mask, label, objects, duplicate record) of planted train slot ``slot`` (planted.py)."""
    image, mask, label, objects = renderer.sample(entry["split"], entry["index"])
    duplicate = {"kind": entry["kind"], "of": _key(entry["split"], entry["index"]), "transform": entry["transform"]}
    if entry["kind"] == "exact_copy":
        return _png(image), "png", mask, label, objects, duplicate
    data, mask, duplicate["params"] = near_copy(image, mask, entry["transform"], seed, slot)
    return data, "jpg", mask, label, objects, duplicate


def generate(
    out_dir: str | Path,
    *,
    seed: int,
    n_train: int,
    n_val: int,
    n_test: int,
    image_size: int = 64,
    n_classes: int = 8,
    shard_size: int = 1000,
    position_bias: float = 0.5,
    max_objects: int = 3,
    gradient_strength: float = 0.35,
    exact_fraction: float = EXACT_FRACTION,
    near_fraction: float = NEAR_FRACTION,
    eval_copy_fraction: float = EVAL_COPY_FRACTION,
    style: str = "shapes",
) -> dict[str, Any]:
    """Write ``<out>/shards/{train,val,test}-%06d.tar`` and ``<out>/manifest.parquet``; returns a summary.

    Per sample: ``<key>.png`` (RGB; ``.jpg`` for planted near copies), ``<key>.cls`` (label), ``<key>.seg.png``
    (class id + 1, 0 background) and ``<key>.json`` (objects, class name, generator settings; planted copies add
    ``duplicate = {kind, of, transform, params}`` and keep their source's label and objects, in the source's pixel
    frame). Keys are ``<split>_%07d``. The manifest adds ``duplicate_kind`` and ``duplicate_of`` columns.
    """
    if not 0.0 <= position_bias <= 1.0:
        raise ValueError(f"position_bias must be in [0, 1], got {position_bias}")
    if style not in STYLES:
        raise ValueError(f"synthetic style must be one of {STYLES}, got {style!r}")
    if image_size < 16 or n_classes < 1 or max_objects < 1 or min(n_train, n_val, n_test) < 0:
        raise ValueError(
            f"bad generator sizes: image_size={image_size} n_classes={n_classes} max_objects={max_objects}"
        )
    start, out_dir = time.perf_counter(), Path(out_dir)
    fractions = {"exact_fraction": exact_fraction, "near_fraction": near_fraction}
    fractions["eval_copy_fraction"] = eval_copy_fraction
    plan = plan_duplicates(seed, n_train, {"val": n_val, "test": n_test}, **fractions)
    names, rows, shards = class_names(n_classes), [], {}
    settings = {"seed": seed, "image_size": image_size, "n_classes": n_classes, "position_bias": position_bias}
    settings.update({"max_objects": max_objects, "gradient_strength": gradient_strength, "duplicates": fractions})
    if style != "shapes":  # the "shapes" records stay byte-identical to before the knob
        settings["style"] = style
    wanted = {(e["split"], e["index"]) for e in plan.values()}
    renderer = _Renderer(seed, wanted, n_classes=n_classes, size=image_size, max_objects=max_objects,
                         position_bias=position_bias, gradient_strength=gradient_strength, style=style)  # fmt: skip
    for split_id, (split, count) in enumerate(zip(SPLITS, (n_train, n_val, n_test), strict=True)):
        with ShardWriter(out_dir / "shards", split, shard_size) as writer:
            for chunk in range(-(-count // _CHUNK)):
                images, masks, labels, objects = renderer.chunk(split_id, chunk)
                for j in range(min(_CHUNK, count - chunk * _CHUNK)):
                    index, duplicate = chunk * _CHUNK + j, None
                    data, fmt, mask, label, objs = _png(images[j]), "png", masks[j], int(labels[j]), objects[j]
                    if split == "train" and index in plan:
                        data, fmt, mask, label, objs, duplicate = _planted_sample(renderer, index, plan[index], seed)
                    key = _key(split, index)
                    meta = {"source": "synthetic", "license": "CC0-1.0", "split": split, "label": label}
                    meta.update({"class_name": names[label], "objects": objs, "generator": settings})
                    if duplicate is not None:
                        meta["duplicate"] = duplicate
                    path = writer.write(key, {
                        fmt: data, "cls": str(label).encode(), "seg.png": _png(mask),
                        "json": json.dumps(meta, sort_keys=True).encode(),
                    })  # fmt: skip
                    record = _record(data, images[j]) if fmt == "png" and duplicate is None else image_record(data)[0]
                    rows.append({**record, "key": key, "split": split, "shard": f"shards/{path.name}", "status": "ok"})
                    rows[-1].update({"label": label, "class_name": names[label], "source": "synthetic"})
                    rows[-1].update({"license": "CC0-1.0", **_truth_columns(duplicate)})
        shards[split] = len(writer.shards)
    write_parquet_atomic(_with_truth(make_manifest(rows), rows), out_dir / "manifest.parquet")
    elapsed = time.perf_counter() - start
    planted = {kind: sum(e["kind"] == kind for e in plan.values()) for kind in KINDS}
    summary = {
        "out_dir": str(out_dir),
        "manifest": str(out_dir / "manifest.parquet"),
        "counts": dict(zip(SPLITS, (n_train, n_val, n_test), strict=True)),
        "shards": shards,
        "classes": names,
        "settings": settings,
        "planted": planted,
        "elapsed_s": elapsed,
        "images_per_s": len(rows) / max(elapsed, 1e-9),
    }
    logger.info("synthetic: %d images in %.1f s (%.0f img/s), planted %s", len(rows), elapsed,
                summary["images_per_s"], planted)  # fmt: skip
    return summary


def _truth_columns(duplicate: dict[str, Any] | None) -> dict[str, str | None]:
    return {"duplicate_kind": duplicate and duplicate["kind"], "duplicate_of": duplicate and duplicate["of"]}


def _with_truth(frame: pd.DataFrame, rows: list[dict[str, Any]]) -> pd.DataFrame:
    """The manifest plus the ground truth of the planted copies (null for generated originals)."""
    for column in ("duplicate_kind", "duplicate_of"):
        frame[column] = pd.array([r[column] for r in rows], dtype="string")
    return frame

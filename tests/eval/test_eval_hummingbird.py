"""Hummingbird (spec 7.4) against a numpy-loop reference, the rare-class sampler, and a known answer."""

import numpy as np
import pytest
import torch
from eval_synth import stripe_scene

from franca.eval.hummingbird import (
    build_memory,
    hummingbird_eval,
    hummingbird_predict,
    patch_label_histograms,
    sample_memory_indices,
)


def _bilinear_axis(n_in, n_out):
    """PyTorch's align_corners=False source indices and weights along one axis."""
    out = []
    for o in range(n_out):
        src = max((o + 0.5) * n_in / n_out - 0.5, 0.0)
        i0 = int(np.floor(src))
        i1 = min(i0 + 1, n_in - 1)
        out.append((i0, i1, src - i0))
    return out


def _reference(train_tok, train_seg, val_tok, val_seg, num_classes, k, beta):
    """Pure loops: patch histograms, exhaustive cosine search, softmax, bilinear upsampling, argmax, mIoU."""
    n, h, w, d = train_tok.shape
    ph, pw = train_seg.shape[1] // h, train_seg.shape[2] // w
    feats, labels = [], []
    for i in range(n):
        for r in range(h):
            for c in range(w):
                hist = np.zeros(num_classes)
                for y in range(r * ph, (r + 1) * ph):
                    for x in range(c * pw, (c + 1) * pw):
                        v = train_seg[i, y, x]
                        hist[0 if v == 255 else v] += 1.0 / (ph * pw)
                f = train_tok[i, r, c]
                feats.append(f / np.linalg.norm(f))
                labels.append(hist)
    feats, labels = np.array(feats), np.array(labels)
    m, vh, vw, _ = val_tok.shape
    height, width = val_seg.shape[1:]
    ys, xs = _bilinear_axis(vh, height), _bilinear_axis(vw, width)
    inter = np.zeros((num_classes, num_classes))  # gt x pred counts
    label_hats = np.zeros((m, vh, vw, num_classes))
    for i in range(m):
        for r in range(vh):
            for c in range(vw):
                q = val_tok[i, r, c] / np.linalg.norm(val_tok[i, r, c])
                sims = np.array([q @ f for f in feats])
                top = np.argsort(-sims, kind="stable")[:k]
                wts = np.exp((sims[top] - sims[top].max()) / beta)
                wts /= wts.sum()
                label_hats[i, r, c] = sum(wj * labels[j] for j, wj in zip(top, wts, strict=True))
        for y, (y0, y1, ly) in enumerate(ys):
            for x, (x0, x1, lx) in enumerate(xs):
                lh = label_hats[i]
                v = (1 - ly) * ((1 - lx) * lh[y0, x0] + lx * lh[y0, x1]) + ly * (
                    (1 - lx) * lh[y1, x0] + lx * lh[y1, x1]
                )
                if val_seg[i, y, x] != 255:
                    inter[val_seg[i, y, x], int(np.argmax(v))] += 1
    tp = np.diag(inter)
    union = inter.sum(0) + inter.sum(1) - tp
    return label_hats, float(np.mean(tp[union > 0] / union[union > 0]))


def test_matches_a_numpy_loop_reference():
    rng = np.random.default_rng(0)
    train_tok = rng.normal(size=(3, 2, 2, 5)).astype(np.float32)
    val_tok = rng.normal(size=(2, 2, 2, 5)).astype(np.float32)
    train_seg = rng.integers(0, 3, size=(3, 8, 8)).astype(np.uint8)
    train_seg[0, :2, :2] = 255
    val_seg = rng.integers(0, 3, size=(2, 6, 6)).astype(np.uint8)
    val_seg[1, 0] = 255
    ref_hats, ref_miou = _reference(train_tok, train_seg, val_tok, val_seg, 3, k=5, beta=0.5)

    hists = patch_label_histograms(torch.from_numpy(train_seg), (2, 2), 3)
    mem_f, mem_l = build_memory(torch.from_numpy(train_tok), hists)
    hats = hummingbird_predict(mem_f, mem_l, torch.from_numpy(val_tok), k=5, beta=0.5)
    np.testing.assert_allclose(hats.numpy(), ref_hats, atol=1e-5)
    res = hummingbird_eval(
        torch.from_numpy(train_tok),
        torch.from_numpy(train_seg),
        torch.from_numpy(val_tok),
        torch.from_numpy(val_seg),
        3,
        k=5,
        beta=0.5,
    )
    assert res["metrics"]["miou"] == pytest.approx(ref_miou)
    assert res["details"]["memory_size"] == 12


def test_void_pixels_without_background_mapping_carry_no_mass():
    seg = torch.tensor([[[255, 255], [1, 1]]], dtype=torch.uint8)  # one 2x2 patch
    faithful = patch_label_histograms(seg, (1, 1), 2)
    clean = patch_label_histograms(seg, (1, 1), 2, void_as_background=False)
    torch.testing.assert_close(faithful[0, 0, 0], torch.tensor([0.5, 0.5]))
    torch.testing.assert_close(clean[0, 0, 0], torch.tensor([0.0, 0.5]))


def test_sampler_scores_and_prefers_rare_classes():
    hists = torch.zeros(1, 2, 2, 3)
    hists[0, :, :, 0] = 1.0  # every patch has class 0 ...
    hists[0, 0, 0, 2] = 0.5  # ... one also has class 2
    hists[0, 1, 1] = 0.0  # and one is empty (void only)
    # reference: class frequencies (patches containing it) 0: 3, 2: 1 -> scores 3, 3, 3 (+1 for the class-2 patch)
    g = torch.Generator().manual_seed(5)
    u = torch.rand(1, 4, generator=torch.Generator().manual_seed(5))
    expected_scores = torch.tensor([[4.0, 3.0, 3.0, 0.0]]) * u
    expected_scores[0, 3] = 1e6
    idx = sample_memory_indices(hists, 2, g)
    assert set(idx[0].tolist()) == set(expected_scores.topk(2, largest=False).indices[0].tolist())
    # over many draws, a patch of a rare class is sampled far more often than the others (score 1 u vs 15 u)
    hists = torch.zeros(1, 4, 4, 3)
    hists[..., 0] = 1.0
    hists[0, 0, 0] = torch.tensor([0.0, 1.0, 0.0])
    counts = torch.zeros(16)
    g = torch.Generator().manual_seed(0)
    for _ in range(300):
        counts[sample_memory_indices(hists, 1, g)[0]] += 1
    assert 0.5 < counts[0] / 300 < 0.75  # P(u0 < 15 min(u1..u15)) = 0.62 vs 1/16 for a uniform pick


def test_fixed_memory_size_and_known_answer():
    train_tok, train_seg = stripe_scene(20, seed=0)
    val_tok, val_seg = stripe_scene(10, seed=1)
    res = hummingbird_eval(train_tok, train_seg, val_tok, val_seg, 3, memory_size=20 * 6)
    assert res["details"]["memory_size"] == 120  # 6 of the 16 patches per image
    assert res["metrics"]["miou"] == 1.0 and res["metrics"]["pixel_acc"] == 1.0
    with pytest.raises(ValueError, match="smaller than"):
        hummingbird_eval(train_tok, train_seg, val_tok, val_seg, 3, memory_size=5)

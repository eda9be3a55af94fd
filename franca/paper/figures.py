"""The paper's figures (issue 2 item 8, issue 5 item 4), drawn with matplotlib's Agg backend into PNG bytes.

* training curves per experiment: total loss and each term over iterations, one thin line per seed;
* PCA maps of patch features (the paper's qualitative figure): the first 3 principal components of the patch tokens
  of a few images, min-max scaled per component, shown as RGB;
* position decodability per RASA round (spec 5): R^2 from x, x_pos and x_no_pos, and cos(x_no_pos, x);
* CyclicMask per-cell masking frequency with and without the roll (spec 3.3: with the roll every cell is masked
  with probability E[n]/HW);
* the dedup summary: removals per reason.

Each function returns PNG bytes (or ``None`` when it has nothing to draw); ``build`` writes them atomically.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")  # headless; must precede pyplot
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

_RASA_STYLE = {
    "r2_x": ("R^2 from x", "C0"),
    "r2_pos": ("R^2 from x_pos", "C1"),
    "r2_no_pos": ("R^2 from x_no_pos", "C2"),
}


def _png(fig: plt.Figure, **spacing: float) -> bytes:
    # fixed spacing rather than a layout engine: tight/constrained layout draw the figure several times
    fig.subplots_adjust(
        **{"left": 0.08, "right": 0.95, "bottom": 0.12, "top": 0.86, "hspace": 0.5, "wspace": 0.3, **spacing}
    )
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, metadata={"Software": None})
    plt.close(fig)
    return buf.getvalue()


def training_curves(frame: pd.DataFrame, exp: str) -> bytes | None:
    """Loss terms of one experiment over global iterations; seeds as thin lines, phase starts as dotted lines, the
    uniform-target value of a clustering term (column ``uniform``) as a dashed line."""
    sub = frame[frame["exp"] == exp]
    if sub.empty:
        return None
    terms = sorted(sub["term"].unique(), key=lambda t: (t != "total_loss", t))
    ncols = min(3, len(terms))
    nrows = -(-len(terms) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 3.0 * nrows), squeeze=False)
    for ax, term in zip(axes.flat, terms, strict=False):
        for i, (seed, by_seed) in enumerate(sub[sub["term"] == term].groupby("seed")):
            for k, (_, group) in enumerate(by_seed.groupby("phase", sort=False)):  # phases are not joined
                group = group.sort_values("iteration")
                label = f"seed {seed}" if k == 0 else None
                ax.plot(group["iteration"], group["value"], lw=0.8, color=f"C{i}", label=label)
        uniform = sub.loc[sub["term"] == term, "uniform"] if "uniform" in sub else pd.Series(dtype=float)
        if uniform.notna().any():  # a clustering term: its uniform-target value (sum_l log K_l, weighted)
            ax.axhline(float(uniform.mean()), ls="--", color="k", lw=0.8, label="uniform targets")
        starts = sub.groupby("phase")["iteration"].min().sort_values()
        for phase, start in list(starts.items())[1:]:
            ax.axvline(start, ls=":", color="gray", lw=0.8)
            ax.text(start, 1.0, f" {phase}", transform=ax.get_xaxis_transform(), fontsize=7, va="top")
        ax.set_title(term, fontsize=9)
        ax.set_xlabel("iteration", fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(terms) :]:
        ax.axis("off")
    for ax in list(axes.flat)[: len(terms)]:
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.suptitle(f"Training losses: {exp}", fontsize=10)
    return _png(fig)


def pca_rgb(tokens: np.ndarray) -> np.ndarray:
    """(n, h, w, D) patch tokens -> (n, h, w, 3) in [0, 1]: first 3 PCA components fitted jointly on all patches."""
    n, h, w, d = tokens.shape
    flat = tokens.reshape(-1, d).astype(np.float64)  # (n*h*w, D)
    flat = flat - flat.mean(axis=0, keepdims=True)
    _, _, vt = np.linalg.svd(flat, full_matrices=False)
    comps = vt[:3]
    if comps.shape[0] < 3:  # D < 3: pad with zero components
        comps = np.vstack([comps, np.zeros((3 - comps.shape[0], d))])
    proj = flat @ comps.T  # (n*h*w, 3)
    lo, hi = proj.min(axis=0), proj.max(axis=0)
    rgb = (proj - lo) / np.where(hi - lo > 0, hi - lo, 1.0)
    return rgb.reshape(n, h, w, 3)


def pca_maps(entries: Sequence[tuple[str, np.ndarray, np.ndarray]], max_images: int = 4) -> bytes | None:
    """``entries``: (label, images (n,H,W,3) uint8, patch tokens (n,h,w,D)); one image row, then one row each."""
    if not entries:
        return None
    n = min(max_images, *(len(e[1]) for e in entries))
    rows = 1 + len(entries)
    fig, axes = plt.subplots(rows, n, figsize=(1.7 * n, 1.7 * rows), squeeze=False)
    for j in range(n):
        axes[0, j].imshow(entries[0][1][j])
    axes[0, 0].set_ylabel("image", fontsize=8)
    for i, (label, _, tokens) in enumerate(entries, start=1):
        rgb = pca_rgb(np.asarray(tokens[:n], dtype=np.float64))
        for j in range(n):
            axes[i, j].imshow(rgb[j], interpolation="nearest")
        axes[i, 0].set_ylabel(label, fontsize=7)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle("PCA of patch features (first 3 components as RGB)", fontsize=9)
    return _png(fig, left=0.12, right=0.98, bottom=0.02, top=1.0 - 0.45 / fig.get_figheight(), hspace=0.08, wspace=0.05)


def rasa_rounds(frame: pd.DataFrame) -> bytes | None:
    """One panel per (experiment, checkpoint): R^2 per round (mean over seeds, band = min..max), cos on a twin axis."""
    if frame.empty:
        return None
    panels = list(frame.groupby(["exp", "ckpt"], sort=False))
    ncols = min(3, len(panels))
    nrows = -(-len(panels) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 3.1 * nrows), squeeze=False)
    for ax, ((exp, ckpt), sub) in zip(axes.flat, panels, strict=False):
        stats = sub.groupby("round")[[*_RASA_STYLE, "cos_no_pos_x"]].agg(["mean", "min", "max"])
        rounds = stats.index.to_numpy()
        for field, (label, color) in _RASA_STYLE.items():
            ax.plot(rounds, stats[(field, "mean")], marker="o", ms=3, color=color, label=label)
            ax.fill_between(rounds, stats[(field, "min")], stats[(field, "max")], color=color, alpha=0.15)
        twin = ax.twinx()
        twin.plot(rounds, stats[("cos_no_pos_x", "mean")], ls="--", color="C3", label="cos(x_no_pos, x)")
        twin.set_ylim(0, 1.05)
        twin.tick_params(labelsize=7)
        ax.set_title(f"{exp} / {ckpt}", fontsize=9)
        ax.set_ylim(min(0.0, float(stats.xs("min", axis=1, level=1).min().min())) - 0.02, 1.02)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("RASA round", fontsize=8)
        ax.set_ylabel("position R^2", fontsize=8)
        ax.tick_params(labelsize=7)
        if ax is axes.flat[0]:
            handles = ax.get_legend_handles_labels()[0] + twin.get_legend_handles_labels()[0]
            ax.legend(handles=handles, fontsize=6, loc="center right")
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    fig.suptitle("Position decodability per RASA round", fontsize=10)
    return _png(fig, top=0.9)


def masking_frequency_maps(
    grid: tuple[int, int], mask_ratio: tuple[float, float], draws: int, seed: int = 0
) -> tuple[bytes, dict[str, float]]:
    """Per-cell masking frequency of inverse block masking without / with the roll, and the DINOv2 baseline.

    Requests ``n`` are spread evenly over ``mask_ratio * H * W``. Returns the PNG and, per panel, the coefficient
    of variation (std / mean over cells) of the frequency map: 0 means every cell is masked equally often.
    """
    from franca.data.masking import MaskingGenerator, masking_frequency

    hw = grid[0] * grid[1]
    requests = np.linspace(mask_ratio[0] * hw, mask_ratio[1] * hw, num=16).round().astype(int).tolist()
    panels = {
        "inverse block, no roll": MaskingGenerator(grid, use_block_masking=True, use_inverse_block=True, roll=False),
        "CyclicMask (inverse block + roll)": MaskingGenerator(
            grid, use_block_masking=True, use_inverse_block=True, roll=True
        ),
        "DINOv2 random blocks": MaskingGenerator(grid, use_block_masking=False, use_inverse_block=False, roll=False),
    }
    maps = {name: masking_frequency(gen, requests, draws, seed) for name, gen in panels.items()}
    vmax = max(float(m.max()) for m in maps.values())
    fig, axes = plt.subplots(1, len(maps), figsize=(3.6 * len(maps), 3.4))
    cvs = {}
    for ax, (name, freq) in zip(axes, maps.items(), strict=True):
        cvs[name] = float(freq.std() / freq.mean()) if freq.mean() > 0 else float("nan")
        im = ax.imshow(freq, vmin=0.0, vmax=vmax, cmap="viridis")
        ax.set_title(f"{name}\nCV over cells = {cvs[name]:.3f}", fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.colorbar(im, cax=fig.add_axes((0.92, 0.12, 0.015, 0.66)), label="masking frequency")
    fig.suptitle(f"Per-cell masking frequency, {grid[0]}x{grid[1]} grid, {draws} draws", fontsize=9)
    return _png(fig, left=0.02, right=0.9, bottom=0.05, top=0.8, wspace=0.1), cvs


def dedup_summary(by_reason: Mapping[str, int], kept: int | None = None) -> bytes | None:
    """Bar chart of removals per reason (data/dedup/report.json)."""
    if not by_reason:
        return None
    names = list(by_reason)
    counts = [int(by_reason[k]) for k in names]
    fig, ax = plt.subplots(figsize=(1.2 + 1.1 * len(names), 3.0))
    bars = ax.bar(range(len(names)), counts, color="C0")
    ax.bar_label(bars, fontsize=8)
    ax.set_xticks(range(len(names)), names, rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("images removed", fontsize=8)
    ax.set_title("Deduplication" + (f" ({kept} kept)" if kept is not None else ""), fontsize=9)
    return _png(fig, left=0.16, bottom=0.3, top=0.9)

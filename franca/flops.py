"""Analytic FLOPs and parameter counts of Franca's training step (spec 1.1, 2.1, 2.3, 2.6, 3.2).

Convention: a matmul of (m, k) @ (k, n) costs 2*m*n*k FLOPs; this covers every Linear, the patch-embedding Conv2d
(a matmul over patches) and both attention products q k^T and (softmax) v. Element-wise work (norms, activations,
softmax, losses) is not counted, as in ``torch.utils.flop_counter.FlopCounterMode``, except the Sinkhorn-Knopp
normalisation, which touches every (row, prototype) logit several times and is reported as its own term.

One step (spec 2.6), per GPU with B images:

* teacher forward (no grad): backbone on the 2B global crops; DINO head on their 2B CLS tokens; iBOT head on the
  masked patch tokens (``upperbound`` rows when ``ibot.sk_padding_rows`` pads them, quirk Q3; else M rows);
  Sinkhorn-Knopp per level on both;
* student forward: backbone on the 2B (masked) global crops and the L*B local crops (one pass per resolution);
  DINO head on the (L+2)B CLS tokens; iBOT head on the M masked patch tokens; KoLeo's x x^T per global crop;
* student backward = 2x the student forward (grad of input and of weight per matmul), except the patch embedding,
  whose input (the image) needs no gradient (1x), and KoLeo's nearest-neighbour search (no gradient).

M is the expected number of masked patches of the collate function (spec 3.2): int(2B p) images draw a ratio from
stratified bins of [r_min, r_max] and mask int(N r) patches. With ``model.drop_path_mode: batch_subset`` the
student's residual branches run on floor(b (1 - p)) of the b images of each crop tensor (DINOv2's form, Q10).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

__all__ = [
    "ARCH_DIMS",
    "HeadShape",
    "StepFlops",
    "ViTShape",
    "backbone_forward_flops",
    "backbone_params",
    "expected_masked_patches",
    "head_forward_flops",
    "head_params",
    "heads_from_config",
    "mask_upperbound",
    "model_params",
    "step_shape_key",
    "training_step_flops",
]

# (embed_dim, depth, num_heads) of the named architectures (franca.models.vision_transformer)
ARCH_DIMS = {
    "vit_tiny": (192, 12, 3),
    "vit_small": (384, 12, 6),
    "vit_base": (768, 12, 12),
    "vit_large": (1024, 24, 16),
    "vit_giant2": (1536, 40, 24),
}
N_GLOBAL_CROPS = 2
SINKHORN_OPS_PER_ITER = 4  # per (row, prototype): a row sum, a division, a column sum, a division


def _get(cfg: Mapping, dotted: str, default=None, required: bool = False):
    node = cfg
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node or node[part] is None:
            if required:
                raise KeyError(f"config key '{dotted}' is missing (needed by franca.flops)")
            return default
        node = node[part]
    return node


@dataclass(frozen=True)
class ViTShape:
    """Sizes of the backbone that determine its cost (spec 1.1)."""

    embed_dim: int
    depth: int
    num_heads: int
    patch_size: int
    ffn_layer: str = "swiglu"
    mlp_ratio: float = 4.0
    in_chans: int = 3
    layerscale: bool = True

    @property
    def ffn_hidden(self) -> int:
        """SwiGLU: ((int(4D * 2/3) + 7) // 8) * 8 (2048 / 2736 / 4096 for B / L / g); MLP: 4D."""
        hidden = int(self.embed_dim * self.mlp_ratio)
        if self.ffn_layer in ("swiglu", "swiglufused"):
            return ((int(hidden * 2 / 3) + 7) // 8) * 8
        if self.ffn_layer == "mlp":
            return hidden
        raise ValueError(f"model.ffn_layer must be swiglu, swiglufused or mlp, got {self.ffn_layer!r}")

    @classmethod
    def from_config(cls, model_cfg: Mapping) -> ViTShape:
        arch = _get(model_cfg, "arch", required=True)
        if arch == "vit_custom":
            dims = tuple(int(_get(model_cfg, k, required=True)) for k in ("embed_dim", "depth", "num_heads"))
        elif arch in ARCH_DIMS:
            dims = ARCH_DIMS[arch]
        else:
            raise ValueError(f"model.arch must be one of {sorted(ARCH_DIMS) + ['vit_custom']}, got {arch!r}")
        return cls(
            *dims,
            patch_size=int(_get(model_cfg, "patch_size", 14)),
            ffn_layer=str(_get(model_cfg, "ffn_layer", "mlp")),
            layerscale=bool(_get(model_cfg, "layerscale", 1e-5)),
        )


def _block_flops(shape: ViTShape, tokens: int) -> int:
    d, t, h = shape.embed_dim, tokens, shape.ffn_hidden
    qkv = 2 * t * d * 3 * d
    attn = 2 * (2 * t * t * d)  # q k^T and attn v, summed over heads: 2 T^2 d_h per head each
    proj = 2 * t * d * d
    ffn = 2 * t * d * 2 * h + 2 * t * h * d if shape.ffn_layer != "mlp" else 2 * (2 * t * d * h)
    return qkv + attn + proj + ffn


def backbone_forward_flops(shape: ViTShape, img_size: int, batch: int = 1, blocks_fraction: float = 1.0) -> int:
    """Forward FLOPs of ``batch`` images of img_size x img_size; ``blocks_fraction`` scales the blocks only."""
    if img_size % shape.patch_size != 0:
        raise ValueError(f"crop size {img_size} is not a multiple of the patch size {shape.patch_size}")
    n_patches = (img_size // shape.patch_size) ** 2
    patch_embed = 2 * n_patches * shape.in_chans * shape.patch_size**2 * shape.embed_dim
    blocks = shape.depth * _block_flops(shape, 1 + n_patches)
    return round(batch * (patch_embed + blocks_fraction * blocks))


def patch_embed_flops(shape: ViTShape, img_size: int, batch: int = 1) -> int:
    return batch * 2 * (img_size // shape.patch_size) ** 2 * shape.in_chans * shape.patch_size**2 * shape.embed_dim


def backbone_params(shape: ViTShape, img_size: int) -> int:
    """Parameters of DinoVisionTransformer built for ``img_size`` (pos_embed has 1 + (img/P)^2 rows)."""
    d, h = shape.embed_dim, shape.ffn_hidden
    patch = shape.in_chans * shape.patch_size**2 * d + d
    tokens = 3 * d + (img_size // shape.patch_size) ** 2 * d  # cls + mask token + pos_embed (1 + N rows)
    ffn = d * 2 * h + 2 * h + h * d + d if shape.ffn_layer != "mlp" else d * h + h + h * d + d
    block = 4 * d + (3 * d * d + 3 * d) + (d * d + d) + ffn + (2 * d if shape.layerscale else 0)
    return patch + tokens + shape.depth * block + 2 * d


@dataclass(frozen=True)
class HeadShape:
    """A DINO / iBOT head: one level (DINOHead) or the Matryoshka levels of MRLDINOHead (spec 2.1)."""

    in_dim: int
    level_dims: tuple[int, ...]  # input dim of each level's MLP
    out_dims: tuple[int, ...]  # K_i
    hidden_dim: int
    bottleneck_dim: int
    nlayers: int
    projection: str  # "projection" | "slice_projection" | "slice" | "none"

    def mlp_dims(self, level: int) -> list[int]:
        return [self.level_dims[level]] + [self.hidden_dim] * (self.nlayers - 1) + [self.bottleneck_dim]


def _head_shape(section: Mapping, embed_dim: int, mrl: bool, fallback: Mapping) -> HeadShape:
    k = int(_get(section, "head_n_prototypes", required=True))
    common = {
        "in_dim": embed_dim,
        "hidden_dim": int(_get(section, "head_hidden_dim", 2048)),
        "bottleneck_dim": int(_get(section, "head_bottleneck_dim", 256)),
        "nlayers": int(_get(section, "head_nlayers", 3)),
    }
    if not mrl:
        return HeadShape(level_dims=(embed_dim,), out_dims=(k,), projection="none", **common)
    n_levels = int(_get(section, "n_levels", _get(fallback, "n_levels", 5)))
    mode = str(_get(section, "mrl_mode", _get(fallback, "mrl_mode", "projection")))
    dims = tuple(embed_dim // 2**i for i in range(n_levels - 1, -1, -1))  # D/16 ... D
    return HeadShape(level_dims=dims, out_dims=tuple(int(k * d / dims[-1]) for d in dims), projection=mode, **common)


def heads_from_config(cfg: Mapping, embed_dim: int) -> tuple[HeadShape, HeadShape]:
    """(dino head, ibot head); the iBOT head is the DINO head itself when ``ibot.separate_head`` is false."""
    dino, ibot = _get(cfg, "dino", {}), _get(cfg, "ibot", {})
    dino_mrl = bool(_get(dino, "MRL", True))
    dino_head = _head_shape(dino, embed_dim, dino_mrl, {})
    if not bool(_get(ibot, "separate_head", True)):
        return dino_head, dino_head
    return dino_head, _head_shape(ibot, embed_dim, bool(_get(ibot, "MRL", dino_mrl)), dino)


def head_forward_flops(head: HeadShape, rows: float) -> float:
    """Forward FLOPs of the head on ``rows`` input vectors (all levels)."""
    per_row = 0
    for level, k in enumerate(head.out_dims):
        d = head.level_dims[level]
        if head.projection == "projection":
            per_row += 2 * head.in_dim * d
        elif head.projection == "slice_projection":
            per_row += 2 * d * d
        dims = head.mlp_dims(level)
        per_row += sum(2 * a * b for a, b in zip(dims[:-1], dims[1:], strict=True))
        per_row += 2 * head.bottleneck_dim * k  # weight-normalised prototype layer, no bias
    return rows * per_row


def head_params(head: HeadShape) -> int:
    total = 0
    for level, k in enumerate(head.out_dims):
        d = head.level_dims[level]
        if head.projection == "projection":
            total += head.in_dim * d + d
        elif head.projection == "slice_projection":
            total += d * d + d
        dims = head.mlp_dims(level)
        total += sum(a * b + b for a, b in zip(dims[:-1], dims[1:], strict=True))
        total += head.bottleneck_dim * k + k  # weight_v (K, bottleneck) and weight_g (K, 1)
    return total


def _expected_floor(n: int, lo: float, hi: float) -> float:
    """E[int(n r)] for r ~ U(lo, hi): the integral of floor(n r) over [lo, hi] divided by its length."""
    if hi <= lo:
        return float(math.floor(n * lo))
    a, b = n * lo, n * hi
    total, j = 0.0, math.floor(a)
    while j < b:
        total += j * (min(b, j + 1) - max(a, j))
        j += 1
    return total / (b - a)


def _mask_bins(n_images: int, prob: float, ratio_min_max: Sequence[float]) -> list[tuple[float, float]]:
    n_masked_images = int(n_images * prob)
    lo, hi = float(ratio_min_max[0]), float(ratio_min_max[1])
    edges = [lo + (hi - lo) * i / max(n_masked_images, 1) for i in range(n_masked_images + 1)]
    return list(zip(edges[:-1], edges[1:], strict=True))


def expected_masked_patches(n_images: int, n_patches: int, prob: float, ratio_min_max: Sequence[float]) -> float:
    """Expected M of the collate function for ``n_images`` global crops of ``n_patches`` patches each."""
    return sum(_expected_floor(n_patches, a, b) for a, b in _mask_bins(n_images, prob, ratio_min_max))


def mask_upperbound(n_images: int, n_patches: int, prob: float, ratio_min_max: Sequence[float]) -> int:
    """``upperbound`` of the collate function: sum_i int(N * bin_max_i)."""
    return sum(int(n_patches * b) for _, b in _mask_bins(n_images, prob, ratio_min_max))


def sinkhorn_flops(head: HeadShape, rows: float, iterations: int) -> float:
    """exp, the iterations, and the final rescale, per (row, prototype) of every level."""
    return rows * sum(head.out_dims) * (2 + SINKHORN_OPS_PER_ITER * iterations)


@dataclass(frozen=True)
class StepFlops:
    """FLOPs of one training step on one GPU (``per_gpu``) and in total (``world_size`` GPUs)."""

    student_backbone_fwd: float
    student_backbone_bwd: float
    student_heads_fwd: float
    student_heads_bwd: float
    teacher_backbone_fwd: float
    teacher_heads_fwd: float
    koleo: float
    sinkhorn: float
    world_size: int
    n_masked: float
    ibot_teacher_rows: float

    @property
    def matmul_per_gpu(self) -> float:
        """What FlopCounterMode measures: every term except Sinkhorn-Knopp."""
        return self.per_gpu - self.sinkhorn

    @property
    def per_gpu(self) -> float:
        terms = asdict(self)
        return sum(v for k, v in terms.items() if k not in ("world_size", "n_masked", "ibot_teacher_rows"))

    @property
    def total(self) -> float:
        return self.per_gpu * self.world_size


def training_step_flops(
    cfg: Mapping,
    batch_per_gpu: int | None = None,
    world_size: int | None = None,
    n_masked: float | None = None,
    upperbound: int | None = None,
) -> StepFlops:
    """FLOPs of one step of the stage config ``cfg`` (model, dino, ibot, crops, train sections; spec 2.6).

    ``n_masked`` / ``upperbound`` default to their expectation / value for the per-GPU batch (spec 3.2).
    """
    shape = ViTShape.from_config(_get(cfg, "model", required=True))
    b = int(batch_per_gpu if batch_per_gpu is not None else _get(cfg, "train.batch_size_per_gpu", required=True))
    w = int(world_size if world_size is not None else _get(cfg, "train.world_size", 1))
    g_size = int(_get(cfg, "crops.global_crops_size", required=True))
    l_size = int(_get(cfg, "crops.local_crops_size", 96))
    n_local = int(_get(cfg, "crops.local_crops_number", 8))
    n_patches = (g_size // shape.patch_size) ** 2
    ibot = _get(cfg, "ibot", {})
    prob = float(_get(ibot, "mask_sample_probability", 0.5))
    ratios = _get(ibot, "mask_ratio_min_max", [0.1, 0.65])
    n_glob = N_GLOBAL_CROPS * b
    m = expected_masked_patches(n_glob, n_patches, prob, ratios) if n_masked is None else float(n_masked)
    ub = mask_upperbound(n_glob, n_patches, prob, ratios) if upperbound is None else int(upperbound)
    teacher_ibot_rows = ub if bool(_get(ibot, "sk_padding_rows", True)) else m

    # student residual branches on a subset of each crop tensor with batch-subset stochastic depth (Q10)
    def kept(batch: int) -> float:
        rate = float(_get(cfg, "model.drop_path_rate", 0.0))
        if _get(cfg, "model.drop_path_mode", "per_sample") != "batch_subset" or rate <= 0 or batch == 0:
            return 1.0
        return max(int(batch * (1 - rate)), 1) / batch

    student_fwd = backbone_forward_flops(shape, g_size, n_glob, kept(n_glob))
    student_pe = patch_embed_flops(shape, g_size, n_glob)
    if n_local > 0:
        student_fwd += backbone_forward_flops(shape, l_size, n_local * b, kept(n_local * b))
        student_pe += patch_embed_flops(shape, l_size, n_local * b)
    dino_head, ibot_head = heads_from_config(cfg, shape.embed_dim)
    student_heads = head_forward_flops(dino_head, (n_local + N_GLOBAL_CROPS) * b) + head_forward_flops(ibot_head, m)
    sk_iters = int(_get(cfg, "train.sk_iterations", 3))
    koleo_w = float(_get(cfg, "dino.koleo_loss_weight", 0.1))
    return StepFlops(
        student_backbone_fwd=student_fwd,
        student_backbone_bwd=2 * (student_fwd - student_pe) + student_pe,
        student_heads_fwd=student_heads,
        student_heads_bwd=2 * student_heads,
        teacher_backbone_fwd=backbone_forward_flops(shape, g_size, n_glob),
        teacher_heads_fwd=head_forward_flops(dino_head, n_glob) + head_forward_flops(ibot_head, teacher_ibot_rows),
        koleo=N_GLOBAL_CROPS * 2 * b * b * shape.embed_dim if koleo_w > 0 else 0,
        sinkhorn=sinkhorn_flops(dino_head, n_glob, sk_iters) + sinkhorn_flops(ibot_head, teacher_ibot_rows, sk_iters),
        world_size=w,
        n_masked=m,
        ibot_teacher_rows=teacher_ibot_rows,
    )


def model_params(cfg: Mapping) -> dict[str, int]:
    """Parameters of one copy (student or teacher): backbone, dino_head, ibot_head (0 when shared), total."""
    shape = ViTShape.from_config(_get(cfg, "model", required=True))
    img = int(_get(cfg, "model.img_size", _get(cfg, "crops.global_crops_size", 224)))
    dino_head, ibot_head = heads_from_config(cfg, shape.embed_dim)
    out = {"backbone": backbone_params(shape, img), "dino_head": head_params(dino_head)}
    out["ibot_head"] = 0 if ibot_head is dino_head else head_params(ibot_head)
    out["total"] = sum(out.values())
    return out


def step_shape_key(cfg: Mapping) -> dict:
    """What fixes a step's cost per image (backbone sizes and crops): the key measured MFU results are matched on
    (``benchmarks/bench_mfu.py`` writes it, ``franca plan`` looks it up)."""
    s = ViTShape.from_config(_get(cfg, "model", required=True))
    return {
        "embed_dim": s.embed_dim,
        "depth": s.depth,
        "num_heads": s.num_heads,
        "patch_size": s.patch_size,
        "ffn_layer": s.ffn_layer,
        "global_crops_size": int(_get(cfg, "crops.global_crops_size", required=True)),
        "local_crops_size": int(_get(cfg, "crops.local_crops_size", 96)),
        "local_crops_number": int(_get(cfg, "crops.local_crops_number", 8)),
    }

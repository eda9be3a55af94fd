"""Franca's self-distillation meta-architecture, split into small pure steps (spec 2.1-2.6).

``SSLMetaArch`` holds ``student`` and ``teacher`` ModuleDicts (``backbone``, ``dino_head``, ``ibot_head``; the iBOT
head is the DINO head when ``ibot.separate_head`` is false). One training step is

    targets = model.teacher_targets(batch, teacher_temp)   # no grad: teacher forward + Sinkhorn-Knopp per level
    out = model.student_outputs(batch)                      # student forward on masked globals + locals, heads
    losses = model.compute_losses(out, targets, batch)      # dict of tensors; losses["loss"] is optimised
    losses["loss"].backward(); ...optimiser step...; model.update_teacher(momentum)

Precision, devices, clipping and process groups live in the training loop. The only collective used here is the
Sinkhorn-Knopp sum ``all_reduce`` injected at construction (None: one process).

DDP: the student backbone is only ever called through ``module(x_list, masks=..., is_training=True)``, i.e. its
``forward`` (DINOv2's convention), so the loop may wrap ``student["backbone"]`` (and the heads) in
DistributedDataParallel; ``update_teacher`` and ``param_groups`` unwrap ``.module``. This keeps one forward call per
module per step, which DDP's gradient hooks expect, without an injected ``backbone_forward``.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable, Mapping

import torch
from torch import nn

from franca.layers.dino_head import DINOHead
from franca.layers.mrl_dino_head import MRLDINOHead
from franca.loss.koleo_loss import KoLeoLoss
from franca.loss.mrl_dino_loss import MRLDINOLoss, dino_loss_terms
from franca.loss.mrl_ibot_patch_loss import MRLiBOTPatchLoss
from franca.loss.sinkhorn_knopp import SinkhornKnopp
from franca.models.vision_transformer import build_backbone

__all__ = ["SSLMetaArch", "build_head", "unwrap_module"]

logger = logging.getLogger(__name__)

N_GLOBAL_CROPS = 2  # the crop swap pairs global crop 1 with 2 (spec 2.3)


def unwrap_module(module: nn.Module) -> nn.Module:
    """The module inside DDP / FSDP wrappers (anything exposing ``.module``)."""
    while isinstance(getattr(module, "module", None), nn.Module):
        module = module.module
    return module


def _section(cfg: Mapping, name: str) -> Mapping:
    if name not in cfg or cfg[name] is None:
        raise KeyError(f"config has no '{name}' section")
    return cfg[name]


def build_head(section: Mapping, embed_dim: int, mrl: bool, fallback: Mapping | None = None) -> nn.Module:
    """DINO / iBOT head from a ``dino`` or ``ibot`` section: MRLDINOHead when ``mrl`` else DINOHead (K = top level).

    MRL keys (``n_levels``, ``mrl_mode``; Q2 flags ``mrl_normalize_bottleneck`` false and ``mrl_bottleneck_act``
    true) are read from ``section``, then ``fallback`` (the dino section), then the faithful default.
    """
    fallback = fallback or {}

    def get(key, default):
        return section.get(key, fallback.get(key, default))

    args = {
        "in_dim": embed_dim,
        "out_dim": int(section["head_n_prototypes"]),
        "hidden_dim": int(section.get("head_hidden_dim", 2048)),
        "bottleneck_dim": int(section.get("head_bottleneck_dim", 256)),
        "nlayers": int(section.get("head_nlayers", 3)),
        "init_std": get("head_init_std", 0.02),  # 0.02 as coded; "fan_in" for tiny widths (tiny preset)
    }
    if not mrl:
        return DINOHead(**args)
    return MRLDINOHead(
        **args,
        n_levels=int(get("n_levels", 5)),
        mode=str(get("mrl_mode", "projection")),
        normalize_bottleneck=bool(get("mrl_normalize_bottleneck", False)),
        act_after_bottleneck=bool(get("mrl_bottleneck_act", True)),
    )


class SSLMetaArch(nn.Module):
    """Student / teacher pair with DINO + iBOT + KoLeo losses over Matryoshka levels (spec 2.3)."""

    def __init__(
        self,
        cfg: Mapping,
        all_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
        world_size: int = 1,
        all_reduce_max: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        super().__init__()
        self.cfg = cfg
        model_cfg, dino, ibot = _section(cfg, "model"), _section(cfg, "dino"), _section(cfg, "ibot")
        teacher_cfg, crops = cfg.get("teacher") or {}, _section(cfg, "crops")
        centering = (cfg.get("train") or {}).get("centering", "sinkhorn_knopp")
        if centering != "sinkhorn_knopp":  # Q6: the softmax-centering path is broken with MRL heads
            raise ValueError(f"train.centering must be 'sinkhorn_knopp', got {centering!r}")
        self.n_local_crops = int(crops.get("local_crops_number", 8))
        self.dino_loss_weight = float(dino.get("loss_weight", 1.0))
        self.koleo_loss_weight = float(dino.get("koleo_loss_weight", 0.1))
        self.ibot_loss_weight = float(ibot.get("loss_weight", 1.0))
        self.ibot_separate_head = bool(ibot.get("separate_head", True))
        dino_mrl = bool(dino.get("MRL", True))
        ibot_mrl = bool(ibot.get("MRL", dino_mrl))

        backbone = build_backbone(model_cfg)
        embed_dim = backbone.embed_dim
        student = {"backbone": backbone, "dino_head": build_head(dino, embed_dim, dino_mrl)}
        if self.ibot_separate_head:
            student["ibot_head"] = build_head(ibot, embed_dim, ibot_mrl, fallback=dino)
        self.student = nn.ModuleDict(student)
        teacher = {k: copy.deepcopy(v) for k, v in student.items() if k != "backbone"}
        teacher["backbone"] = build_backbone(model_cfg, drop_path_rate=0.0)  # the teacher has no drop path
        self.teacher = nn.ModuleDict({k: teacher[k] for k in student})
        self.teacher.load_state_dict(self.student.state_dict())  # exact copy
        self.teacher.requires_grad_(False)
        self.teacher.eval()

        student_temp = float(teacher_cfg.get("student_temp", 0.1))
        self.sinkhorn = SinkhornKnopp(3, all_reduce=all_reduce, world_size=world_size, all_reduce_max=all_reduce_max)
        self.dino_loss = MRLDINOLoss(student_temp)
        self.ibot_patch_loss = MRLiBOTPatchLoss(student_temp, sk_padding_rows=bool(ibot.get("sk_padding_rows", True)))
        self.koleo_loss = KoLeoLoss()
        logger.info(
            "SSLMetaArch: D=%d, dino MRL=%s, ibot MRL=%s, separate ibot head=%s, %d local crops",
            embed_dim,
            dino_mrl,
            ibot_mrl,
            self.ibot_separate_head,
            self.n_local_crops,
        )

    def _ibot_head(self, part: nn.ModuleDict) -> nn.Module:
        return part["ibot_head"] if self.ibot_separate_head else part["dino_head"]

    def train(self, mode: bool = True) -> SSLMetaArch:
        super().train(mode)
        self.teacher.eval()  # the teacher is always in eval mode
        return self

    def _global_crops(self, batch: Mapping) -> torch.Tensor:
        x = batch["collated_global_crops"]  # (2B, 3, H, W), crop-major
        if x.shape[0] % N_GLOBAL_CROPS != 0:
            raise ValueError(f"batch 'collated_global_crops' has {x.shape[0]} images, not a multiple of 2")
        return x

    @torch.no_grad()
    def teacher_targets(self, batch: Mapping, teacher_temp: float) -> dict:
        """Sinkhorn-Knopp targets per level: "dino" (2B, K_l) in swapped crop order, "ibot" (M, K_l)."""
        x = self._global_crops(batch)
        out = self.teacher["backbone"](x, is_training=True)
        cls = out["x_norm_clstoken"]  # (2B, D)
        crop1, crop2 = cls.chunk(N_GLOBAL_CROPS)
        cls_swapped = torch.cat((crop2, crop1))  # row r is the target of student row r
        dino = [self.sinkhorn.dino_targets(z, teacher_temp) for z in self.teacher["dino_head"](cls_swapped)]
        patches = out["x_norm_patchtokens"].flatten(0, 1)  # (2B N, D)
        masked = patches.index_select(0, batch["mask_indices_list"])  # (M, D)
        n_masked_total = self.sinkhorn.global_count(batch["n_masked_patches"].sum())  # once per step (Q4)
        ibot = self.ibot_patch_loss.teacher_targets(
            self._ibot_head(self.teacher),
            masked,
            int(batch["upperbound"]),
            teacher_temp,
            self.sinkhorn,
            n_masked_total,
        )
        return {"dino": dino, "ibot": ibot, "n_masked_total": n_masked_total}

    def student_outputs(self, batch: Mapping) -> dict:
        """Student backbone on [masked globals, locals] (one call), DINO head on [local CLS; global CLS], iBOT head
        on the masked patch tokens. Returns "cls_global" (2B, D) and per-level "dino_global", "dino_local", "ibot"."""
        x_g = self._global_crops(batch)
        x_l = batch.get("collated_local_crops")
        has_local = self.n_local_crops > 0 and x_l is not None and x_l.shape[0] > 0
        crops, masks = [x_g], [batch["collated_masks"]]  # only the student's global crops are masked
        if has_local:
            crops, masks = crops + [x_l], masks + [None]
        outs = self.student["backbone"](crops, masks=masks, is_training=True)
        cls_g = outs[0]["x_norm_clstoken"]  # (2B, D)
        n_local_rows = outs[1]["x_norm_clstoken"].shape[0] if has_local else 0
        head_in = torch.cat((outs[1]["x_norm_clstoken"], cls_g)) if has_local else cls_g  # one batched head call
        levels = self.student["dino_head"](head_in)
        patches = outs[0]["x_norm_patchtokens"].flatten(0, 1).index_select(0, batch["mask_indices_list"])  # (M, D)
        return {
            "cls_global": cls_g,
            "dino_local": [z[:n_local_rows] for z in levels] if has_local else None,
            "dino_global": [z[n_local_rows:] for z in levels],
            "ibot": list(self._ibot_head(self.student)(patches)),
        }

    def compute_losses(self, student_out: Mapping, targets: Mapping, batch: Mapping) -> dict[str, torch.Tensor]:
        """All loss terms of spec 2.3; "loss" = w_dino (L_local + L_global) + L_koleo + w_ibot L_ibot.

        Also "dino_level{i}" / "ibot_level{i}" (i = 0 is the smallest level) and the logged variants of Q8:
        "koleo_loss_logged" = L_koleo / 2, "ibot_loss_logged" = L_ibot / 2, "total_loss_logged" = their sum with the
        two DINO terms (the official log's total_loss, which differs from the optimised loss).
        """
        n_local = self.n_local_crops if student_out["dino_local"] is not None else 0
        dino = self.dino_loss(
            student_out["dino_global"], student_out["dino_local"], targets["dino"], n_local, N_GLOBAL_CROPS
        )
        n_images = batch["collated_masks"].shape[0]  # 2B: unmasked images count in the denominator
        ibot = self.ibot_patch_loss(student_out["ibot"], targets["ibot"], batch["masks_weight"], n_images)
        cls_g = student_out["cls_global"]
        if self.koleo_loss_weight > 0:
            koleo = self.koleo_loss_weight * sum(self.koleo_loss(c) for c in cls_g.chunk(N_GLOBAL_CROPS))
        else:
            koleo = cls_g.new_zeros(())
        loss = self.dino_loss_weight * (dino["local"] + dino["global"]) + koleo + self.ibot_loss_weight * ibot["loss"]
        losses = {
            "loss": loss,
            "dino_local_crops_loss": dino["local"],
            "dino_global_crops_loss": dino["global"],
            "koleo_loss": koleo,
            "ibot_loss": ibot["loss"],
            "koleo_loss_logged": koleo.detach() / 2,
            "ibot_loss_logged": ibot["loss"].detach() / 2,
        }
        losses["total_loss_logged"] = (
            dino["local"].detach() + dino["global"].detach() + losses["koleo_loss_logged"] + losses["ibot_loss_logged"]
        )
        losses.update(self._uniform_values(batch, n_local))
        for i, (lo, gl) in enumerate(zip(dino["local_levels"], dino["global_levels"], strict=True)):
            losses[f"dino_level{i}"] = (lo + gl).detach()
        for i, level in enumerate(ibot["levels"]):
            losses[f"ibot_level{i}"] = level.detach()
        return losses

    def _uniform_values(self, batch: Mapping, n_local: int) -> dict[str, torch.Tensor]:
        """What each clustering term would be if every target were uniform (sum over levels of log K_l): the DINO
        terms with their crop-pair weights, iBOT times the share of global crops that carry a mask (issue 13)."""
        log_k = {name: sum(math.log(k) for k in unwrap_module(self.student[name]).out_dims) for name in self.student
                 if name.endswith("_head")}  # fmt: skip
        n_terms = dino_loss_terms(N_GLOBAL_CROPS, n_local)
        masks = batch["collated_masks"]  # (2B, N) bool
        masked_share = masks.flatten(1).any(dim=1).float().mean()
        ibot_k = log_k["ibot_head"] if self.ibot_separate_head else log_k["dino_head"]
        return {
            "dino_local_crops_uniform": masked_share.new_tensor(
                N_GLOBAL_CROPS * n_local / n_terms * log_k["dino_head"]
            ),
            "dino_global_crops_uniform": masked_share.new_tensor(N_GLOBAL_CROPS / n_terms * log_k["dino_head"]),
            "ibot_uniform": masked_share * ibot_k,
        }

    def forward(self, batch: Mapping, teacher_temp: float) -> dict[str, torch.Tensor]:
        """teacher_targets -> student_outputs -> compute_losses (no backward, no optimiser step)."""
        targets = self.teacher_targets(batch, teacher_temp)
        return self.compute_losses(self.student_outputs(batch), targets, batch)

    def _paired_parameters(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        student_params, teacher_params = [], []
        for key, module in self.student.items():
            s = dict(unwrap_module(module).named_parameters())
            t = dict(unwrap_module(self.teacher[key]).named_parameters())
            if s.keys() != t.keys():
                raise RuntimeError(f"student and teacher '{key}' parameters differ: {sorted(s.keys() ^ t.keys())}")
            student_params += [s[n] for n in s]
            teacher_params += [t[n] for n in s]
        return student_params, teacher_params

    @torch.no_grad()
    def update_teacher(self, momentum: float) -> None:
        """EMA over parameters (not buffers): t = m t + (1 - m) s (spec 2.5)."""
        student_params, teacher_params = self._paired_parameters()
        torch._foreach_mul_(teacher_params, momentum)
        torch._foreach_add_(teacher_params, [p.detach() for p in student_params], alpha=1.0 - momentum)

    def param_groups(self, patch_embed_lr_mult: float | None = None, layerwise_decay: float | None = None) -> list:
        """One optimiser group per student parameter (spec 2.5): keys params, wd_multiplier, lr_multiplier,
        is_last_layer, name. No weight decay for names ending in ".bias" or containing "norm" or "gamma"; the
        patch embedding's lr is scaled by ``patch_embed_lr_mult`` (optim.patch_embed_lr_mult, 0.2); layer-wise lr
        decay (optim.layerwise_decay, 1.0 = off) scales backbone layer l of L by decay^(L + 1 - l)."""
        optim = self.cfg.get("optim") or {}
        if patch_embed_lr_mult is None:
            patch_embed_lr_mult = optim.get("patch_embed_lr_mult", 0.2)
        if layerwise_decay is None:
            layerwise_decay = optim.get("layerwise_decay", 1.0)
        pe_mult, decay = float(patch_embed_lr_mult), float(layerwise_decay)
        groups = []
        for key, module in self.student.items():
            module = unwrap_module(module)
            for name, param in module.named_parameters():
                if not param.requires_grad:
                    continue
                lr_mult = 1.0
                if key == "backbone":
                    lr_mult = decay ** (module.n_blocks + 1 - _backbone_layer_id(name, module.n_blocks))
                    if "patch_embed" in name:
                        lr_mult *= pe_mult
                no_wd = name.endswith(".bias") or "norm" in name or "gamma" in name
                groups.append(
                    {
                        "params": [param],
                        "wd_multiplier": 0.0 if no_wd else 1.0,
                        "lr_multiplier": lr_mult,
                        "is_last_layer": "last_layer" in name,
                        "name": f"{key}.{name}",
                    }
                )
        return groups


def _backbone_layer_id(name: str, n_blocks: int) -> int:
    """0 for the embeddings, i + 1 for block i, n_blocks + 1 for the final norm (DINOv2's layer-wise decay ids)."""
    if name.startswith(("pos_embed", "patch_embed", "mask_token", "cls_token")):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return n_blocks + 1

"""RASA head: the stack of position directions removed from patch tokens (spec section 5).

Each trained round contributes a (2, D) matrix U_j (the weight of the round's Linear(D -> 2, bias=False) position
regressor).  ``decompose_pos_2D`` of the official code turns U_j into an orthonormal pair by Gram-Schmidt
(normalise u_r; u_c <- u_c - <u_c, u_r> u_r; normalise u_c) and removes the projection of x onto their span.
The head applies the projections in the order they were trained:

    x_debiased = (I - P_R) ... (I - P_2)(I - P_1) x

Layout versus the official ``RASAHead``: there, the first R - 1 matrices live in ``pre_pos_layers`` and the last
trained one is ``pos_pred``; ``forward(x, use_pos_pred=True)`` applies all of them.  Here all R matrices live in one
buffer ``projections`` (R, 2, D) and ``use_pos_pred`` (default True, faithful) says whether the last one is
applied.  :meth:`to_official_state_dict` / :meth:`from_official_state_dict` convert between the two layouts, so the
released hub heads (``pre_pos_layers.{i}.weight`` + ``pos_pred.weight``) load directly.

``nn.Module.apply(fn)`` is PyTorch's recursive initialiser, so the removal is exposed as ``forward`` (``head(x)``,
usable as the ``rasa_head`` callable of ``forward_features``) and as :meth:`decompose`, never as ``apply``.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)

__all__ = ["RASAHead", "orthonormal_basis", "decompose_pos"]

RASA_FORMAT = "franca-rasa-v1"


def orthonormal_basis(weight: torch.Tensor) -> torch.Tensor:
    """Sequential Gram-Schmidt of the rows of ``weight`` (k, D) -> (k, D) orthonormal rows (k = 2 in the paper).

    Row 0 is normalised; each later row has the earlier ones subtracted, then is normalised (F.normalize, eps
    1e-12, as torch.norm division would give for a non-degenerate pair).  k = 1 gives the official 1-D variant.
    """
    basis: list[torch.Tensor] = []
    for row in weight.float():
        for b in basis:
            row = row - torch.dot(row, b) * b
        basis.append(F.normalize(row, dim=0, eps=1e-12))
    return torch.stack(basis)


def decompose_pos(x: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Split x (..., D) into (x_pos, x - x_pos), x_pos its orthogonal projection onto span(rows of weight)."""
    basis = orthonormal_basis(weight).to(x.dtype)  # (k, D)
    x_pos = (x @ basis.T) @ basis  # (..., D)
    return x_pos, x - x_pos


class RASAHead(nn.Module):
    """Removal of Absolute Spatial Attributes: sequential projection removal, never folded into the backbone."""

    def __init__(self, embed_dim: int, projections: torch.Tensor | None = None, use_pos_pred: bool = True):
        super().__init__()
        self.embed_dim = int(embed_dim)
        self.use_pos_pred = bool(use_pos_pred)
        if projections is None:
            projections = torch.zeros(0, 2, self.embed_dim)
        self._check(projections)
        self.register_buffer("projections", projections.detach().float().clone())  # (R, k, D)

    def _check(self, projections: torch.Tensor) -> None:
        if projections.ndim != 3 or projections.shape[-1] != self.embed_dim:
            raise ValueError(f"RASA projections must be (R, k, {self.embed_dim}), got {tuple(projections.shape)}")

    @property
    def n_projections(self) -> int:
        return int(self.projections.shape[0])

    def add_projection(self, weight: torch.Tensor) -> None:
        """Append one trained (k, D) regressor weight as the next projection."""
        weight = weight.detach().float().to(self.projections.device).unsqueeze(0)
        self._check(weight)
        self.projections = torch.cat([self.projections, weight], dim=0)

    def active_projections(self, use_pos_pred: bool | None = None) -> torch.Tensor:
        """The projections applied at inference: all, or all but the last when use_pos_pred is False."""
        use = self.use_pos_pred if use_pos_pred is None else use_pos_pred
        return self.projections if use else self.projections[:-1]

    def removed_basis(self, use_pos_pred: bool | None = None, tol: float = 1e-6) -> torch.Tensor:
        """(r, D) orthonormal basis of the span of every active projection's rows (r <= 2R)."""
        rows = self.active_projections(use_pos_pred).reshape(-1, self.embed_dim).double()
        if rows.shape[0] == 0:
            return torch.zeros(0, self.embed_dim)
        _, sing, vh = torch.linalg.svd(F.normalize(rows, dim=1), full_matrices=False)
        return vh[sing > tol * sing.max()].float()

    def decompose(self, x: torch.Tensor, use_pos_pred: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(x_pos, x_no_pos) for x (..., D): x_no_pos after every active projection, x_pos = x - x_no_pos.

        x_pos is the total removed component (the official ``return_pos_info`` returns only the last one).
        The maths runs in float32 and the outputs take the input dtype.
        """
        if x.shape[-1] != self.embed_dim:
            raise ValueError(f"RASA head expects features with D = {self.embed_dim}, got {tuple(x.shape)}")
        x32 = x.float()
        out = x32
        for weight in self.active_projections(use_pos_pred):
            _, out = decompose_pos(out, weight)
        return (x32 - out).to(x.dtype), out.to(x.dtype)

    def forward(self, x: torch.Tensor, use_pos_pred: bool | None = None) -> torch.Tensor:
        """x (..., D) -> debiased x (..., D)."""
        return self.decompose(x, use_pos_pred)[1]

    def extra_repr(self) -> str:
        return f"embed_dim={self.embed_dim}, n_projections={self.n_projections}, use_pos_pred={self.use_pos_pred}"

    # --- state dict: the buffer takes the stored number of projections -------------------------------------------
    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # noqa: ANN001 (torch hook signature)
        key = prefix + "projections"
        if key in state_dict:
            self._check(state_dict[key])
            self.projections = torch.empty_like(state_dict[key], dtype=torch.float32, device=self.projections.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def to_official_state_dict(self) -> dict[str, torch.Tensor]:
        """Official layout: ``pre_pos_layers.{i}.weight`` for the first R - 1 matrices, ``pos_pred.weight`` last."""
        if self.n_projections == 0:
            raise ValueError("an empty RASA head has no pos_pred to export")
        out = {f"pre_pos_layers.{i}.weight": w.clone() for i, w in enumerate(self.projections[:-1])}
        out["pos_pred.weight"] = self.projections[-1].clone()
        return out

    @classmethod
    def from_official_state_dict(cls, state_dict: dict[str, torch.Tensor], use_pos_pred: bool = True) -> RASAHead:
        """Build from an official RASAHead state dict (optionally prefixed, e.g. ``head.``)."""
        pre: dict[int, torch.Tensor] = {}
        pos_pred = None
        for key, value in state_dict.items():
            parts = key.split(".")
            if key.endswith("pos_pred.weight") and "pre_pos_layers" not in parts:
                pos_pred = value
            elif "pre_pos_layers" in parts and key.endswith(".weight"):
                pre[int(parts[parts.index("pre_pos_layers") + 1])] = value
        if pos_pred is None:
            raise KeyError(f"no 'pos_pred.weight' in the RASA state dict (keys: {sorted(state_dict)[:12]})")
        stack = torch.stack([pre[i] for i in sorted(pre)] + [pos_pred]).float()
        return cls(stack.shape[-1], stack, use_pos_pred=use_pos_pred)

    # --- files ----------------------------------------------------------------------------------------------------
    def save(self, path: str | Path, **meta) -> None:
        """torch.save a dict loadable with weights_only=True: format, embed_dim, use_pos_pred, projections, meta."""
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        torch.save(
            {
                "format": RASA_FORMAT,
                "embed_dim": self.embed_dim,
                "use_pos_pred": self.use_pos_pred,
                "projections": self.projections.cpu(),
                "meta": meta,
            },
            path,
        )

    @classmethod
    def load(cls, path: str | Path, use_pos_pred: bool | None = None) -> RASAHead:
        """Load a file written by :meth:`save`, or an official RASA head state dict."""
        obj = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(obj, dict):
            raise ValueError(f"{path}: not a RASA head file (got {type(obj).__name__})")
        if obj.get("format") == RASA_FORMAT:
            use = obj["use_pos_pred"] if use_pos_pred is None else use_pos_pred
            return cls(obj["embed_dim"], obj["projections"], use_pos_pred=use)
        if any(k.endswith("pos_pred.weight") for k in obj):
            return cls.from_official_state_dict(obj, use_pos_pred=True if use_pos_pred is None else use_pos_pred)
        raise ValueError(f"{path}: neither a {RASA_FORMAT} file nor an official RASA head (keys: {list(obj)[:8]})")

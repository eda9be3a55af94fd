"""Franca's losses: Matryoshka DINO and iBOT cross-entropies, KoLeo, and Sinkhorn-Knopp targets."""

from franca.loss.koleo_loss import KoLeoLoss
from franca.loss.mrl_dino_loss import MRLDINOLoss, dino_loss_terms
from franca.loss.mrl_ibot_patch_loss import MRLiBOTPatchLoss
from franca.loss.sinkhorn_knopp import SinkhornKnopp

__all__ = ["KoLeoLoss", "MRLDINOLoss", "MRLiBOTPatchLoss", "SinkhornKnopp", "dino_loss_terms"]

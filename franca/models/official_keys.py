"""Map state dicts saved by the official Franca / DINOv2 code to this package's backbone (spec 1.1).

Official naming, and what changes here:

| official key | ours |
|---|---|
| ``module.`` / ``teacher.`` / ``student.`` / ``backbone.`` prefixes (checkpoint and FSDP wrappers) | stripped |
| ``blocks.<chunk>.<i>.<rest>`` (``block_chunks`` > 1; chunk c holds Identity padding, then its blocks at their
  global index i) | ``blocks.<i>.<rest>`` |
| ``blocks.<i>.{norm1,attn.qkv,attn.proj,ls1.gamma,norm2,mlp.w12,mlp.w3,mlp.fc1,mlp.fc2,ls2.gamma}`` | same |
| ``cls_token``, ``pos_embed``, ``mask_token``, ``patch_embed.proj.*``, ``norm.*`` | same |
| ``register_tokens`` | rejected (Franca has none; this backbone has no registers) |
| ``dino_head.*``, ``ibot_head.*``, ``rasa_head.*`` | split off (heads keep their official names:
  ``mlp.{0,2,4}``, ``last_layer.weight_{g,v}``, ``matryoshka_projections.i``, ``mlps.i.{0,2,4}``,
  ``last_layers.i.weight_{g,v}``) |
| ``*.parametrizations.weight.original0`` / ``original1`` (torch's new weight_norm) | ``*.weight_g`` / ``*.weight_v`` |

A full training checkpoint ``{"teacher": {...}, ...}`` or ``{"model": {...}}`` is accepted too (the teacher wins).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping

import torch
from torch import nn

__all__ = ["convert_official_state_dict", "load_official_backbone", "split_official_state_dict"]

logger = logging.getLogger(__name__)

_PREFIXES = ("module.", "teacher.", "student.", "_orig_mod.")
_HEADS = ("dino_head.", "ibot_head.", "rasa_head.")
_CHUNKED_BLOCK = re.compile(r"^blocks\.(\d+)\.(\d+)\.(.+)$")
_PARAMETRIZED = {"parametrizations.weight.original0": "weight_g", "parametrizations.weight.original1": "weight_v"}


def _unwrap(state: Mapping) -> Mapping:
    for key in ("teacher", "model", "state_dict"):
        if key in state and isinstance(state[key], Mapping):
            return state[key]
    return state


def _strip(key: str) -> str:
    changed = True
    while changed:
        changed = False
        for prefix in _PREFIXES:
            if key.startswith(prefix):
                key, changed = key[len(prefix) :], True
    return key


def _rename_weight_norm(key: str) -> str:
    for old, new in _PARAMETRIZED.items():
        if key.endswith(old):
            return key[: -len(old)] + new
    return key


def split_official_state_dict(state: Mapping) -> dict[str, dict[str, torch.Tensor]]:
    """{"backbone": ..., "dino_head": ..., "ibot_head": ..., "rasa_head": ...} with official prefixes removed."""
    parts: dict[str, dict[str, torch.Tensor]] = {"backbone": {}}
    for key, value in _unwrap(state).items():
        key = _rename_weight_norm(_strip(key))
        head = next((h for h in _HEADS if key.startswith(h)), None)
        if head is not None:
            parts.setdefault(head[:-1], {})[key[len(head) :]] = value
            continue
        if key.startswith("backbone."):
            key = key[len("backbone.") :]
        parts["backbone"][key] = value
    return parts


def convert_official_state_dict(state: Mapping) -> dict[str, torch.Tensor]:
    """Backbone state dict in our naming from an official (possibly block-chunked, prefixed) one."""
    out: dict[str, torch.Tensor] = {}
    for key, value in split_official_state_dict(state)["backbone"].items():
        if key.startswith("register_tokens"):
            raise ValueError("official state dict has 'register_tokens'; registers are not supported")
        match = _CHUNKED_BLOCK.match(key)
        if match is not None:
            key = f"blocks.{match.group(2)}.{match.group(3)}"  # the chunk index is dropped
        if key in out:
            raise ValueError(f"official state dict maps two entries to {key!r}")
        out[key] = value
    return out


def load_official_backbone(model: nn.Module, state: Mapping, strict: bool = True):
    """Load an official state dict (or checkpoint dict) into a ``DinoVisionTransformer``; returns load_state_dict's
    result. Errors name the offending keys."""
    converted = convert_official_state_dict(state)
    result = model.load_state_dict(converted, strict=strict)
    logger.info("loaded %d official backbone tensors", len(converted))
    return result

"""The metrics JSON of one benchmark (docs/interfaces.md): light, so that writing it imports no benchmark module."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path

__all__ = ["write_eval_json"]


def _finite(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def write_eval_json(
    path: str | Path, benchmark: str, checkpoint: str | Path, rasa: bool, result: Mapping, caps: Mapping | None = None
) -> dict:
    """Write ``{"benchmark", "checkpoint", "rasa", "metrics", "details", "caps"}`` (NaN -> null) and return it.

    ``caps``: the evaluation-set caps that applied to the features (``{"applied": {"dataset:split (use)": {"used",
    "available"}}, "seed"}``, see ``franca.data.sampling``), so that the page can say when a number is on a sample.
    """
    payload = {
        "benchmark": benchmark,
        "checkpoint": str(checkpoint),
        "rasa": bool(rasa),
        "metrics": {k: float(v) for k, v in result["metrics"].items()},
        "details": result.get("details", {}),
        "caps": dict(caps or {"applied": {}}),
    }
    payload = _finite(payload)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(payload, indent=2, sort_keys=True))
    return payload

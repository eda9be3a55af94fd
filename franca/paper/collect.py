"""Read the result files the ``paper`` rule hands the stage into tidy pandas frames (issue 2 item 8, issue 11).

The stage reads exactly the files it is given (``PaperInputs``), never a directory listing. Their layout is the one
of ``docs/interfaces.md`` ("Workflow layout"):

* ``results/eval/{exp}/s{seed}/{ckpt}/{bench}[_rasa].json``: eval JSON ``{benchmark, checkpoint, rasa, metrics,
  details}``;
* ``results/rasa/{exp}/s{seed}/{ckpt}/report.json``: per-round rows ``r2_x, r2_pos, r2_no_pos, cos_no_pos_x``;
* ``results/pretrain/{exp}/s{seed}/stage{i}/metrics.jsonl`` and ``results/highres/{exp}/s{seed}/metrics.jsonl``;
* ``results/features/{exp}/s{seed}/{ckpt}/pca.pt``: ``{pca_images, pca_patch_tokens}`` of the PCA-maps figure;
* ``provenance.json`` beside every artifact.

Every frame carries the path of the file each number came from, so that the tables can link each cell to its
sources (``SourceIndex``). Paths are POSIX strings relative to the project root (the working directory).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

log = logging.getLogger(__name__)

CHECKPOINTS = ("pretrain", "highres")
RASA_FIELDS = ("r2_x", "r2_pos", "r2_no_pos", "cos_no_pos_x")
# names franca.rasa.report writes for the same quantities
_RASA_ALIASES = {"r2_pos": "r2_x_pos", "r2_no_pos": "r2_x_no_pos", "cos_no_pos_x": "cos_x_no_pos_x"}


class PaperInputError(ValueError):
    """A results file the paper stage reads is malformed; the message names the file."""


@dataclass(frozen=True)
class ExperimentSpec:
    """One entry of ``config.yaml: experiments`` (name -> {seeds, highres, rasa})."""

    name: str
    seeds: tuple[int, ...]
    highres: bool = False
    rasa: bool = False

    @property
    def checkpoints(self) -> tuple[str, ...]:
        return CHECKPOINTS if self.highres else CHECKPOINTS[:1]


def parse_experiments(experiments: Mapping) -> list[ExperimentSpec]:
    """``{name: {seeds, highres, rasa}}`` (a dict or an OmegaConf node) -> specs, in config order."""
    specs = []
    for name, entry in experiments.items():
        if "seeds" not in entry:
            raise PaperInputError(f"experiments.{name}: missing key 'seeds'")
        seeds = tuple(int(s) for s in entry["seeds"])
        specs.append(
            ExperimentSpec(str(name), seeds, bool(entry.get("highres", False)), bool(entry.get("rasa", False)))
        )
    return specs


# ----------------------------------------------------------------------------------------------- io helpers
def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to a temporary file beside ``path`` and rename it over ``path`` (never a partial file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; the paper is meant to be read by others
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def read_json(path: Path, what: str) -> object:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise PaperInputError(f"{path}: malformed {what}: {err}") from err


# ----------------------------------------------------------------------------------------------- provenance
@dataclass
class SourceIndex:
    """Hashes every file the paper reads (once) and finds the ``provenance.json`` that describes it."""

    root: Path
    records: dict[str, dict] = field(default_factory=dict)
    _cache: dict[Path, dict] = field(default_factory=dict, repr=False)

    def rel(self, path: Path) -> str:
        path = Path(path).resolve()
        try:
            return path.relative_to(self.root.resolve()).as_posix()
        except ValueError:
            return path.as_posix()

    def add(self, path: Path) -> str:
        """Register ``path``; returns its key (relative path). Records sha256, MLflow run id, git commit."""
        key = self.rel(path)
        if key in self.records:
            return key
        sha = sha256_file(path)
        record = {
            "path": key,
            "sha256": sha,
            "provenance": None,
            "mlflow_run_id": None,
            "git_commit": None,
            "dirty": None,
            "stage": None,
        }
        found = self._find_provenance(Path(path), key)
        if found is not None:
            prov_path, prov = found
            code = prov.get("code") or {}
            record.update(
                provenance=self.rel(prov_path),
                mlflow_run_id=prov.get("mlflow_run_id"),
                git_commit=code.get("git_commit"),
                dirty=code.get("dirty"),
                stage=prov.get("stage"),
            )
            listed = _listed_hash(prov.get("outputs") or {}, key)
            if listed is not None and listed != sha:
                log.warning("%s: sha256 differs from the one recorded in %s", key, record["provenance"])
                record["note"] = f"sha256 differs from {record['provenance']}"
        self.records[key] = record
        return key

    def provenance_of(self, path: Path) -> dict | None:
        """The provenance record that describes ``path`` (see ``_find_provenance``), or ``None``."""
        found = self._find_provenance(Path(path), self.rel(path))
        return found[1] if found else None

    def _load(self, prov_path: Path) -> dict:
        if prov_path not in self._cache:
            prov = read_json(prov_path, "provenance.json")
            if not isinstance(prov, dict):
                raise PaperInputError(f"{prov_path}: malformed provenance.json: expected an object")
            self._cache[prov_path] = prov
        return self._cache[prov_path]

    def _find_provenance(self, path: Path, key: str) -> tuple[Path, dict] | None:
        """A per-file record (``{stem}.provenance.json``), else the nearest ``provenance.json`` listing ``path`` as
        an output (its directory, then the parents up to the root), else the one in its own directory."""
        for cand in (path.parent / f"{path.stem}.provenance.json", path.parent / f"{path.stem}_provenance.json"):
            if cand.is_file():
                return cand, self._load(cand)
        path, fallback = path.resolve(), None
        for directory in path.parents:
            cand = directory / "provenance.json"
            if cand.is_file() and cand != path:
                prov = self._load(cand)
                if _listed_hash(prov.get("outputs") or {}, key) is not None:
                    return cand, prov
                if directory == path.parent:
                    fallback = (cand, prov)
            if directory == self.root.resolve():
                break
        return fallback


def _listed_hash(outputs: Mapping, key: str) -> str | None:
    """sha256 recorded for ``key`` in a provenance ``outputs`` map ({path: sha256 or {sha256, size, mtime_ns}})."""
    for out_path, entry in outputs.items():
        out = str(out_path).replace("\\", "/")
        if out == key or out.endswith("/" + key) or key.endswith("/" + out):
            sha = entry.get("sha256") if isinstance(entry, Mapping) else entry
            return sha if isinstance(sha, str) else None
    return None


# ----------------------------------------------------------------------------------------------- evaluations
# ----------------------------------------------------------------------------------------------- input lists
@dataclass
class PaperInputs:
    """The files the ``paper`` rule hands the stage (``paper_inputs`` in ``workflow/rules/common.smk``), nothing else.

    Paths follow the workflow layout: ``.../eval/{exp}/s{seed}/{ckpt}/{bench}[_rasa].json``,
    ``.../rasa/{exp}/s{seed}/{ckpt}/report.json``, ``.../features/{exp}/s{seed}/{ckpt}/pca.pt``,
    ``.../pretrain/{exp}/s{seed}/stage{i}/metrics.jsonl``, ``.../highres/{exp}/s{seed}/metrics.jsonl``. A listed
    file is an expected result: if it is absent, its cells read "missing"; a result that is not listed was not
    configured and is left out.
    """

    evals: list[Path] = field(default_factory=list)
    metrics: list[Path] = field(default_factory=list)
    rasa: list[Path] = field(default_factory=list)
    pca: list[Path] = field(default_factory=list)
    dedup: list[Path] = field(default_factory=list)  # one report per deduplicated training dataset
    manifests: list[Path] = field(default_factory=list)

    def __post_init__(self) -> None:
        if isinstance(self.dedup, str | Path):
            self.dedup = [self.dedup]
        for name in ("evals", "metrics", "rasa", "pca", "dedup", "manifests"):
            setattr(self, name, [Path(p) for p in getattr(self, name) or []])


_RUN_PATH = re.compile(r"(?:^|/)(?P<exp>[^/]+)/s(?P<seed>\d+)/(?P<ckpt>[^/]+)/(?P<file>[^/]+)$")


def run_of(path: Path, what: str) -> tuple[str, int, str]:
    """(experiment, seed, checkpoint) of a result file from its path ``.../{exp}/s{seed}/{ckpt}/{file}``."""
    match = _RUN_PATH.search(Path(path).as_posix())
    if match is None:
        raise PaperInputError(f"{path}: not a {what} path of the workflow layout (.../{{exp}}/s{{seed}}/{{ckpt}}/file)")
    return match["exp"], int(match["seed"]), match["ckpt"]


# ----------------------------------------------------------------------------------------------- evaluations
def load_eval_json(path: Path) -> dict:
    """One eval JSON, validated: ``metrics`` must map names to finite-or-NaN numbers."""
    data = read_json(path, "eval JSON")
    if not isinstance(data, dict):
        raise PaperInputError(f"{path}: malformed eval JSON: expected an object, got {type(data).__name__}")
    metrics = data.get("metrics")
    if not isinstance(metrics, dict):
        raise PaperInputError(f"{path}: malformed eval JSON: key 'metrics' missing or not an object")
    for name, value in metrics.items():
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise PaperInputError(f"{path}: malformed eval JSON: metrics.{name} is not a number ({value!r})")
    if not isinstance(data.get("details", {}), dict):
        raise PaperInputError(f"{path}: malformed eval JSON: key 'details' is not an object")
    return data


def collect_evals(paths: Iterable[Path], sources: SourceIndex) -> pd.DataFrame:
    """Every listed eval JSON as tidy rows.

    Columns: exp, seed, ckpt, benchmark, rasa, metric, value, source. One row per metric; ``details`` of each file
    are kept in ``frame.attrs["details"][source]`` (overclustering needs the number of classes), and
    ``frame.attrs["caps"][source]`` the evaluation-set caps that applied to it, and
    ``frame.attrs["expected"]`` holds the (exp, seed, ckpt, benchmark, rasa) of every listed file, present or not.
    """
    rows, details, caps, expected = [], {}, {}, set()
    for path in map(Path, paths):
        exp, seed, ckpt = run_of(path, "eval JSON")
        stem_rasa = path.stem.endswith("_rasa")
        bench, rasa = path.stem.removesuffix("_rasa"), stem_rasa
        expected.add((exp, seed, ckpt, bench, rasa))
        if not path.is_file():
            log.warning("paper: expected eval result %s is missing", path)
            continue
        data = load_eval_json(path)
        if str(data.get("benchmark") or bench) != bench or bool(data.get("rasa", rasa)) != rasa:
            raise PaperInputError(f"{path}: benchmark/rasa inside the file disagree with its name")
        key = sources.add(path)
        details[key] = data.get("details", {})
        caps[key] = data.get("caps") or {}
        for metric, value in data["metrics"].items():
            rows.append((exp, seed, ckpt, bench, rasa, str(metric), float(value), key))
    frame = pd.DataFrame(rows, columns=["exp", "seed", "ckpt", "benchmark", "rasa", "metric", "value", "source"])
    frame.attrs["details"] = details
    frame.attrs["caps"] = caps
    frame.attrs["expected"] = expected
    return frame


# ----------------------------------------------------------------------------------------------- RASA reports
def _rasa_rounds(data: object, path: Path) -> list[dict]:
    rounds = data.get("rounds") if isinstance(data, dict) else data
    if not isinstance(rounds, list):
        raise PaperInputError(f"{path}: malformed RASA report: expected a list of rounds (or {{'rounds': [...]}})")
    for i, row in enumerate(rounds):
        if not isinstance(row, dict):
            raise PaperInputError(f"{path}: malformed RASA report: round {i} is not an object")
    return rounds


def collect_rasa(paths: Iterable[Path], sources: SourceIndex) -> pd.DataFrame:
    """Per-round RASA rows. Columns: exp, seed, ckpt, round, r2_x, r2_pos, r2_no_pos, cos_no_pos_x, source.

    ``frame.attrs["expected"]``: the (exp, seed, ckpt) of every listed report, present or not.
    """
    rows, expected = [], set()
    for path in map(Path, paths):
        exp, seed, ckpt = run_of(path, "RASA report")
        expected.add((exp, seed, ckpt))
        if not path.is_file():
            log.warning("paper: expected RASA report %s is missing", path)
            continue
        rounds = _rasa_rounds(read_json(path, "RASA report"), path)
        key = sources.add(path)
        for i, row in enumerate(rounds):
            values = []
            for name in RASA_FIELDS:
                value = row.get(name, row.get(_RASA_ALIASES.get(name, name), math.nan))
                if isinstance(value, bool) or not isinstance(value, int | float):
                    raise PaperInputError(f"{path}: malformed RASA report: round {i} {name}={value!r}")
                values.append(float(value))
            rows.append((exp, seed, ckpt, int(row.get("round", i)), *values, key))
    frame = pd.DataFrame(rows, columns=["exp", "seed", "ckpt", "round", *RASA_FIELDS, "source"])
    frame.attrs["expected"] = expected
    return frame


# ----------------------------------------------------------------------------------------------- training logs
_STAGE = re.compile(r"^stage(\d+)$")
_ITER_KEYS = ("iteration", "iter", "step")


def _read_jsonl(path: Path) -> list[dict]:
    rows = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise PaperInputError(f"{path}:{lineno}: malformed metrics.jsonl line: {err}") from err
        if isinstance(row, dict):
            rows.append(row)
    return rows


def training_phase(path: Path) -> tuple[str, int, str, int]:
    """(exp, seed, phase, order) of ``pretrain/{exp}/s{seed}/stage{i}/metrics.jsonl`` or
    ``highres/{exp}/s{seed}/metrics.jsonl``; ``order`` sorts the phases in training order (stages, then highres)."""
    path = Path(path)
    if (m := _STAGE.match(path.parent.name)) is not None:
        exp, seed, phase = run_of(path, "metrics.jsonl")
        return exp, seed, phase, int(m.group(1))
    seed_dir = path.parent
    if len(path.parts) >= 4 and path.parts[-4] == "highres" and re.fullmatch(r"s\d+", seed_dir.name):
        return seed_dir.parent.name, int(seed_dir.name[1:]), "highres", 1 << 30
    raise PaperInputError(f"{path}: not a pretrain stage{{i}}/ or highres/ metrics.jsonl of the workflow layout")


def collect_training(paths: Iterable[Path], sources: SourceIndex) -> pd.DataFrame:
    """Loss terms over iterations. Columns: exp, seed, phase, iteration (global), term, value, source, uniform.

    A term is every numeric key whose name contains ``loss``; ``uniform`` is the value the training log gives for it
    with all targets uniform (``<term>`` with ``_loss`` -> ``_uniform``; NaN when not logged). When a phase
    restarts its iteration counter, its iterations are offset so that the x axis stays monotone across phases.
    """
    runs: dict[tuple[str, int], list[tuple[int, str, Path]]] = {}
    for path in map(Path, paths):
        exp, seed, phase, order = training_phase(path)
        if not path.is_file():
            log.warning("paper: expected training log %s is missing", path)
            continue
        runs.setdefault((exp, seed), []).append((order, phase, path))
    rows = []
    for (exp, seed), phases in runs.items():
        offset = 0
        for _, phase, path in sorted(phases):
            records = _read_jsonl(path)
            key = sources.add(path)
            iters = [_iteration(r, i) for i, r in enumerate(records)]
            if iters and min(iters) < offset:  # counter restarted in this phase
                iters = [it + offset for it in iters]
            for it, rec in zip(iters, records, strict=True):
                for term, value in rec.items():
                    if "loss" in term and isinstance(value, int | float) and not isinstance(value, bool):
                        uniform = rec.get(term.replace("_loss", "_uniform"))  # the term's uniform-target value
                        uniform = float(uniform) if isinstance(uniform, int | float) and uniform else float("nan")
                        rows.append((exp, seed, phase, it, term, float(value), key, uniform))
            offset = max(iters, default=offset)
    columns = ["exp", "seed", "phase", "iteration", "term", "value", "source", "uniform"]
    return pd.DataFrame(rows, columns=columns)


def _iteration(record: dict, index: int) -> int:
    for name in _ITER_KEYS:
        if isinstance(record.get(name), int | float):
            return int(record[name])
    return index


# ----------------------------------------------------------------------------------------------- other inputs
def masking_setup(sources: SourceIndex, metrics: Iterable[Path]) -> tuple[tuple[int, int], tuple[float, float]]:
    """Patch grid and mask ratio range of the run, from the resolved config in the provenance of a pretrain
    ``metrics.jsonl`` (franca's first); else the paper's."""
    logs = [Path(p) for p in metrics if Path(p).is_file() and _STAGE.match(Path(p).parent.name)]
    for path in sorted(logs, key=lambda p: run_of(p, "metrics.jsonl")[0] != "franca"):
        prov = sources.provenance_of(path)
        cfg = (prov or {}).get("config")
        try:
            side = int(cfg["crops"]["global_crops_size"]) // int(cfg["model"]["patch_size"])
            lo, hi = (float(x) for x in cfg["ibot"]["mask_ratio_min_max"])
            return (side, side), (lo, hi)
        except (KeyError, TypeError, ValueError):
            continue  # not a pretrain config; try the next
    return (16, 16), (0.1, 0.5)  # 224 px / patch 14; DINOv2's mask_ratio_min_max


def load_pca_entries(
    paths: Iterable[Path], sources: SourceIndex, notes: list[str]
) -> tuple[list[tuple[str, np.ndarray, np.ndarray]], list[str]]:
    """(label, images (n,H,W,3) uint8, patch tokens (n,h,w,D)) from each model's ``pca.pt`` (the features stage's
    ``{pca_images, pca_patch_tokens}``), first seed of each experiment x checkpoint."""
    import torch  # only this reader needs it

    entries, used, seen = [], [], set()
    for path in map(Path, paths):
        exp, seed, ckpt = run_of(path, "pca.pt")
        if (exp, ckpt) in seen:
            continue
        if not path.is_file():
            notes.append(f"PCA maps: expected {sources.rel(path)} is missing")
            continue
        seen.add((exp, ckpt))
        try:
            data = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 - any unreadable file is reported with its path
            raise PaperInputError(f"{path}: cannot load the PCA images: {err}") from err
        if not isinstance(data, dict) or not {"pca_images", "pca_patch_tokens"} <= set(data):
            raise PaperInputError(f"{path}: expected a dict with 'pca_images' and 'pca_patch_tokens'")
        images, tokens = (_as_numpy(data[k], torch) for k in ("pca_images", "pca_patch_tokens"))
        if images.ndim != 4 or images.shape[-1] != 3 or tokens.ndim != 4 or len(images) != len(tokens):
            raise PaperInputError(
                f"{path}: pca_images must be (n,H,W,3) and pca_patch_tokens (n,h,w,D), got "
                f"{images.shape} and {tokens.shape}"
            )
        entries.append((f"{exp} s{seed}\n{ckpt}", images, tokens))
        used.append(sources.add(path))
    return entries, used


def _as_numpy(value: object, torch_module) -> np.ndarray:
    """A tensor (any dtype, bf16 included) or array as NumPy; uint8 stays uint8, floats become float32."""
    if isinstance(value, torch_module.Tensor):
        value = value.detach().cpu()
        return value.numpy() if value.dtype == torch_module.uint8 else value.float().numpy()
    array = np.asarray(value)
    return array if array.dtype == np.uint8 else array.astype(np.float32)

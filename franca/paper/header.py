"""The page header (issue 15): preset, what it can show, datasets (origin, license, images after dedup), commit, date.

Datasets come from the manifests and the dedup report the ``paper`` rule hands the stage; the preset statement
below is the only text written by hand. Each statement says what a run of that preset can and cannot show.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from franca.paper.collect import PaperInputError, read_json

# preset name (or its prefix) -> what a run of it can show; the first match wins
SCOPE = (
    (
        "tiny",
        "A smoke test: generated 64 px images, a ~0.2 M-parameter ViT and CPU minutes. It can show that every stage "
        "runs end to end, that every number traces back to its files, run and commit, and that pretraining learns: "
        "each variant's k-NN against its own random-init backbone and against raw pixels (the table against random "
        "init and raw pixels; the generated nuisances, grey backgrounds of random luminance, object brightness and "
        "scale, position anchors blind to the class, hold raw pixels back, and the augmentations teach the models to "
        "ignore them), and the DINO and iBOT terms below their uniform-target values (dashed on the training curves; "
        "teacher temperature 0.02 and KoLeo 1.0). It cannot show the paper's claims at scale: the class is an object "
        "colour that 100 iterations can learn; an ablation difference within the seed spread (named in its row's "
        "note) means nothing; RASA leaves more than half of the position R^2 (a fresh probe after RASA should keep "
        "at most 20%). docs/tiny-evidence.md has the measurements.",
    ),
    (
        "small",
        "One GPU: ViT-S/14 on an ImageNet-style folder. It can show the direction of the ablations (MRL heads, "
        "CyclicMask, RASA) at reduced scale; its absolute numbers are not comparable to the published ones.",
    ),
    (
        "paper_",
        "The paper's recipe at the published scale: its numbers are comparable to the published reference below.",
    ),
)


def scope_of(preset: str) -> str:
    return next((text for prefix, text in SCOPE if preset.startswith(prefix)), f"Custom preset '{preset}'.")


@dataclass
class DatasetInfo:
    """One dataset of the run: where its images came from, their licenses and counts (ok rows per split)."""

    name: str
    origins: list[str]
    licenses: list[str]
    splits: dict[str, int]
    kept_after_dedup: int | None = None  # the training split after dedup (only the dedup train dataset)
    sources: list[str] = field(default_factory=list)


def _manifest_summary(path: Path) -> tuple[list[str], list[str], dict[str, int]]:
    from franca.data.datacard import source_origin
    from franca.data.manifest import read_manifest

    try:
        frame = read_manifest(path, columns=["status", "split", "source", "license"])
    except (OSError, ValueError, KeyError) as err:
        raise PaperInputError(f"{path}: cannot read the manifest columns status/split/source/license: {err}") from err
    ok = frame[frame["status"] == "ok"]
    origins = ok["source"].map(source_origin).value_counts().index.tolist()
    licenses = ok["license"].fillna("unknown").value_counts().index.tolist()
    splits = {str(k): int(v) for k, v in ok.groupby(ok["split"].fillna("")).size().items()}
    return origins, licenses, splits


def datasets(manifests: Sequence[Path], kept: Mapping[str, int], keys: Mapping[Path, list[str]]) -> list[DatasetInfo]:
    """One entry per manifest (``data/{name}/manifest``, a file or a partitioned directory); ``kept``: training
    images kept by dedup per dataset (``kept_after_dedup``); ``keys``: the source keys of each manifest's files
    (for provenance links)."""
    out = []
    for path in map(Path, manifests):
        origins, licenses, splits = _manifest_summary(path)
        info = DatasetInfo(path.parent.name, origins, licenses, splits, sources=list(keys.get(path, [])))
        info.kept_after_dedup = kept.get(info.name)
        out.append(info)
    return out


def dedup_dataset(report: Mapping, path: Path) -> str:
    """The training dataset a dedup report is about: its ``train_manifest``'s folder, else the report's folder
    (``data/dedup/{dataset}/report.json``)."""
    if report.get("train_manifest"):
        return Path(str(report["train_manifest"])).parent.name
    return Path(path).parent.name


def kept_after_dedup(paths: Sequence[Path]) -> dict[str, int]:
    """Training images kept per dataset, from the dedup reports that exist."""
    kept = {}
    for path in map(Path, paths):
        if not path.is_file():
            continue
        report = read_json(path, "dedup report")
        if not isinstance(report, dict):
            raise PaperInputError(f"{path}: malformed dedup report: expected an object")
        if isinstance(report.get("kept"), int):
            kept[dedup_dataset(report, path)] = int(report["kept"])
    return kept

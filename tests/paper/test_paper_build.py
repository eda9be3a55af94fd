"""build_paper on a fake results tree with known numbers: aggregation, table formats, HTML, figures, errors."""

from __future__ import annotations

import hashlib
import json
import math
import re
import shutil
from html import escape
from pathlib import Path

import pandas as pd
import pytest
from fake_results import EXPERIMENTS, metric_value, write_fake_tree

from franca.paper.build import build_paper, tex_escape
from franca.paper.collect import PaperInputError, SourceIndex, collect_evals, parse_experiments
from franca.paper.tables import EvalLookup, reference_table

REFERENCE = Path(__file__).resolve().parents[2] / "config" / "reference" / "paper_readme.yaml"


def _mean_std(values: list[float]) -> tuple[float, float]:
    """Independent reference: mean and sample std (ddof = 1) by hand."""
    mean = sum(values) / len(values)
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


@pytest.fixture(scope="module")
def paper(fake_tree):
    out = fake_tree.parent / "paper_out"
    summary = build_paper(
        fake_tree, out, experiments=EXPERIMENTS, preset="tiny", reference_yaml=REFERENCE, mask_draws=400
    )
    return out, summary, json.loads((out / "numbers.json").read_text())


def _row(df: pd.DataFrame, **labels) -> pd.Series:
    mask = pd.Series(True, index=df.index)
    for key, value in labels.items():
        mask &= df[key].astype(str) == str(value)
    assert mask.sum() == 1, labels
    return df[mask].iloc[0]


def test_main_table_mean_std_over_seeds(paper):
    out, _, _ = paper
    df = pd.read_csv(out / "main.csv")
    row = _row(df, experiment="franca", checkpoint="pretrain")
    for key, bench, metric in [
        ("knn_top1", "knn", "top1_k20"),
        ("knn_top5", "knn", "top5_k20"),
        ("linear_top1", "linear", "top1"),
        ("linear_top1_holdout", "linear", "top1_holdout_selected"),
        ("logreg_top1", "logreg", "top1"),
        ("hummingbird_miou", "hummingbird", "miou"),
        ("linseg_miou", "linseg", "miou"),
        ("overcluster_miou_kc", "overcluster", "miou_k10"),
        ("overcluster_miou_kmax", "overcluster", "miou_k100"),
    ]:
        mean, std = _mean_std([100 * metric_value("franca", s, "pretrain", bench, metric) for s in (0, 1)])
        assert row[key] == pytest.approx(mean) and row[f"{key}_std"] == pytest.approx(std), key
        assert row[f"{key}_n"] == 2
    r2_mean, _ = _mean_std([metric_value("franca", s, "pretrain", "position_probe", "r2") for s in (0, 1)])
    assert row["position_r2"] == pytest.approx(r2_mean)  # R^2 is not scaled to percent
    assert row["knn_top1"] == pytest.approx(51.0)  # (50 + 52) / 2, by hand
    assert row["knn_top1_std"] == pytest.approx(math.sqrt(2.0))
    single = _row(df, experiment="mrl_only", checkpoint="pretrain")
    assert single["knn_top1_n"] == 1 and math.isnan(single["knn_top1_std"])
    missing = _row(df, experiment="dinov2", checkpoint="highres")
    assert missing["linseg_miou_n"] == 1 and "linseg missing for seed(s) 1" in missing["note"]
    no_hr = _row(df, experiment="mrl_only", checkpoint="highres")
    assert math.isnan(no_hr["knn_top1"]) and "highres: false" in no_hr["note"]


def test_ablation_deltas_vs_baseline(paper):
    out, _, _ = paper
    df = pd.read_csv(out / "ablation.csv")
    franca = _row(df, checkpoint="pretrain", variant="Franca", RASA="no")
    assert franca["hummingbird_miou_delta"] == pytest.approx(10.0)  # EXP_OFFSET 0.10 in percent
    franca_rasa = _row(df, checkpoint="pretrain", variant="Franca", RASA="yes")
    assert franca_rasa["hummingbird_miou_delta"] == pytest.approx(13.0)  # + 0.03 for the RASA files
    base_r2 = _mean_std([metric_value("dinov2", s, "pretrain", "position_probe", "r2") for s in (0, 1)])[0]
    rasa_r2 = _mean_std([metric_value("franca", s, "pretrain", "position_probe", "r2", True) for s in (0, 1)])[0]
    assert franca_rasa["position_r2_delta"] == pytest.approx(rasa_r2 - base_r2)
    baseline = _row(df, checkpoint="pretrain", variant="DINOv2 baseline", RASA="no")
    assert baseline["hummingbird_miou_delta"] == 0.0 and "baseline of Δ" in baseline["note"]
    assert "rasa: false" in _row(df, checkpoint="pretrain", variant="+CyclicMask", RASA="yes")["note"]
    assert "highres: false" in _row(df, checkpoint="highres", variant="+MRL", RASA="no")["note"]


def test_rasa_table_per_round(paper):
    out, _, _ = paper
    df = pd.read_csv(out / "rasa.csv", dtype={"round": str})
    row = _row(df, experiment="franca", checkpoint="pretrain", round=0)
    mean, std = _mean_std([0.5, 0.51])
    assert row["r2_no_pos"] == pytest.approx(mean) and row["r2_no_pos_std"] == pytest.approx(std)
    assert row["cos_no_pos_x"] == pytest.approx(0.99)
    assert "rasa: false" in _row(df, experiment="cyclic_only", checkpoint="pretrain")["note"]


def test_reference_table_lists_presets_for_tiny(paper):
    out, _, _ = paper
    df = pd.read_csv(out / "reference.csv")
    assert set(df["preset"]) == {
        "paper_vitb14_in21k",
        "paper_vitl14_in21k",
        "paper_vitl14_laion",
        "paper_vitg14_in21k",
        "paper_vitg14_laion",
    }
    assert "paper presets only" in (out / "reference.md").read_text()


def test_reference_table_for_paper_preset(fake_tree):
    import yaml

    specs = parse_experiments(EXPERIMENTS)
    lookup = EvalLookup(collect_evals(fake_tree, specs, SourceIndex(fake_tree.parent)))
    table = reference_table("paper_vitb14_in21k", yaml.safe_load(REFERENCE.read_text()), "ref.yaml", specs, lookup)
    knn = dict(zip([k for k, _ in table.columns], table.rows[0][1], strict=True))
    ours = _mean_std([100 * metric_value("franca", s, "highres", "knn", "top1_k20") for s in (0, 1)])[0]
    assert "highres" in table.columns[0][1]  # ViT-B/14 is published at 518 px: the high-res checkpoint
    assert knn["ours"].mean == pytest.approx(ours)
    assert (knn["published_v1"].mean, knn["published_later"].mean) == (80.9, 77.4)
    assert knn["delta_later"].mean == pytest.approx(ours - 77.4)


def test_reference_dense_rows_compare_on_the_published_dataset(fake_tree):
    """Linear segmentation is published on ADE20K: a run whose dense evaluations use VOC leaves our cell empty."""
    import yaml

    specs = parse_experiments(EXPERIMENTS)
    lookup = EvalLookup(collect_evals(fake_tree, specs, SourceIndex(fake_tree.parent)))
    ref = yaml.safe_load(REFERENCE.read_text())
    rows = {}
    for dataset in ("voc", "ade20k"):
        table = reference_table("paper_vitb14_in21k", ref, "ref.yaml", specs, lookup, dense_dataset=dataset)
        rows[dataset] = {labels[0]: (cells, note) for labels, cells, note in table.rows}
    hb, linseg = "Hummingbird mIoU", "linear-seg mIoU"
    assert hb in rows["voc"], sorted(rows["voc"])
    (voc_hb, _), (voc_ls, voc_note) = rows["voc"][hb], rows["voc"][linseg]
    assert voc_hb[0].mean is not None and voc_ls[0].mean is None and voc_ls[3].mean is None
    assert "published on ade20k" in voc_note and voc_ls[2].mean == 39.1  # the reference itself stays visible
    (ade_hb, ade_note), (ade_ls, _) = rows["ade20k"][hb], rows["ade20k"][linseg]
    assert ade_hb[0].mean is None and "published on voc" in ade_note
    assert ade_ls[0].mean is not None and ade_ls[3].mean == pytest.approx(ade_ls[0].mean - 39.1)


def _md_rows(text: str) -> list[list[str]]:
    lines = [line for line in text.splitlines() if line.startswith("| ")]
    return [[c.strip() for c in line.strip("|").split(" | ")] for line in lines[1:]]


def test_table_formats_consistent(paper):
    out, summary, numbers = paper
    for name, entry in numbers["tables"].items():
        assert sorted(Path(p).name for p in summary["tables"][name]) == sorted(entry["files"])
        csv = pd.read_csv(out / f"{name}.csv")
        md = _md_rows((out / f"{name}.md").read_text())
        tex = [line for line in (out / f"{name}.tex").read_text().splitlines() if line.endswith(r"\\")][1:]
        assert len(md) == len(csv) == len(tex), name
        for cell in entry["cells"]:
            i, j = (int(x) for x in re.fullmatch(rf"{name}-r(\d+)-c(\d+)", cell["anchor"]).groups())
            n_index = len(cell["row"])
            assert md[i][n_index + j] == cell["text"], cell["anchor"]
            assert tex[i].split(" & ")[n_index + j].removesuffix(r" \\") == tex_escape(cell["text"])
            if cell["mean"] is not None:
                assert float(csv.iloc[i][cell["column"]]) == pytest.approx(cell["mean"])
                shown = re.match(r"[+-]?\d+\.(\d+)", cell["text"])  # the displayed mean, rounded
                assert abs(float(shown.group(0)) - cell["mean"]) <= 0.5 * 10 ** -len(shown.group(1)) + 1e-9
    assert "51.0 ± 1.4 (n=2)" in (out / "main.md").read_text()
    assert r"51.0 $\pm$ 1.4 (n=2)" in (out / "main.tex").read_text()


def test_html_every_number_linked_and_offline(paper):
    out, _, numbers = paper
    page = (out / "index.html").read_text()
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", page, re.I)
    assert "http://" not in page and "https://" not in page
    n_linked = 0
    for entry in numbers["tables"].values():
        for cell in entry["cells"]:
            if not cell["text"]:
                continue
            link = f'<a class="num" href="#{cell["anchor"]}">{escape(cell["text"])}</a>'
            assert link in page, cell["anchor"]
            box = re.search(rf'<div class="prov" id="{cell["anchor"]}">(.*?)</div>', page, re.S)
            assert box is not None, cell["anchor"]
            for src in cell["sources"]:
                rec = numbers["sources"][src]
                assert src in box.group(1) and rec["sha256"] in box.group(1)
                if rec["mlflow_run_id"]:
                    assert rec["mlflow_run_id"] in box.group(1) and rec["git_commit"] in box.group(1)
            n_linked += 1
    assert n_linked > 100
    assert "run-franca-0-pretrain" in page and "commitrun-franca-0-pretrain" in page


def test_numbers_json_sources(paper, fake_tree):
    _, summary, numbers = paper
    root = fake_tree.parent
    for path, rec in numbers["sources"].items():
        assert hashlib.sha256((root / path).read_bytes()).hexdigest() == rec["sha256"]
    rec = numbers["sources"]["results/eval/franca/s0/pretrain/knn.json"]
    assert rec["mlflow_run_id"] == "run-franca-0-pretrain"
    assert rec["provenance"] == "results/eval/franca/s0/pretrain/provenance.json"
    assert "note" not in rec  # its recorded sha256 matches
    cell = next(
        c
        for c in numbers["tables"]["main"]["cells"]
        if c["row"] == {"experiment": "franca", "checkpoint": "pretrain"} and c["column"] == "knn_top1"
    )
    assert cell["sources"] == ["results/eval/franca/s0/pretrain/knn.json", "results/eval/franca/s1/pretrain/knn.json"]
    assert set(summary["inputs"]) == set(numbers["sources"])


def test_figures_written(paper):
    out, summary, numbers = paper
    names = {Path(p).name for p in summary["figures"]}
    expected = {
        "training_curves_franca.png",
        "training_curves_dinov2.png",
        "pca_maps.png",
        "rasa_rounds.png",
        "masking_frequency.png",
        "dedup_summary.png",
    }
    assert expected <= names
    for path in summary["figures"]:
        assert Path(path).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = (out / "index.html").read_text()
    assert page.count("data:image/png;base64,") == len(summary["figures"])
    assert numbers["figures"]["figures/rasa_rounds.png"]
    assert not list(out.rglob("*.tmp"))


def test_cyclic_roll_flattens_masking_frequency(paper):
    cv = paper[1]["masking_cv"]
    # spec 3.3: with the roll every cell is masked equally often; without it the borders are masked more
    assert cv["CyclicMask (inverse block + roll)"] < 0.5 * cv["inverse block, no roll"], cv


def test_malformed_eval_json_names_file(tmp_path):
    results = write_fake_tree(tmp_path)
    bad = results / "eval" / "franca" / "s0" / "pretrain" / "knn.json"
    bad.write_text('{"benchmark": "knn", "metrics": {"top1_k20": 0.5,')
    with pytest.raises(PaperInputError, match=re.escape(str(bad))):
        build_paper(results, tmp_path / "paper", experiments=EXPERIMENTS, preset="tiny", reference_yaml=None)
    bad.write_text(json.dumps({"benchmark": "knn", "metrics": {"top1_k20": "high"}}))
    with pytest.raises(PaperInputError, match=re.escape(str(bad)) + ".*metrics.top1_k20"):
        build_paper(results, tmp_path / "paper", experiments=EXPERIMENTS, preset="tiny", reference_yaml=None)


def test_missing_optional_inputs_give_notes(tmp_path):
    results = write_fake_tree(tmp_path)
    for sub in ("rasa", "features", "highres"):
        shutil.rmtree(results / sub)
    for exp in ("franca", "dinov2"):
        for seed in (0, 1):
            shutil.rmtree(results / "eval" / exp / f"s{seed}" / "highres")
    shutil.rmtree(tmp_path / "data")
    stale = tmp_path / "paper" / "figures" / "training_curves_removed_experiment.png"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"old")
    summary = build_paper(
        results, tmp_path / "paper", experiments=EXPERIMENTS, preset="tiny", reference_yaml=None, mask_draws=50
    )
    df = pd.read_csv(tmp_path / "paper" / "main.csv")
    row = _row(df, experiment="franca", checkpoint="highres")
    assert math.isnan(row["knn_top1"]) and "knn missing for seed(s) 0, 1" in row["note"]
    assert any("features cache" in n for n in summary["notes"])
    assert any("dedup" in n for n in summary["notes"])
    rasa = pd.read_csv(tmp_path / "paper" / "rasa.csv")
    assert "RASA report missing" in _row(rasa, experiment="franca", checkpoint="pretrain")["note"]
    assert (tmp_path / "paper" / "index.html").is_file()
    assert not stale.exists()  # figures an earlier run made and this one does not are removed
    assert {Path(p).name for p in summary["figures"]} == {f"training_curves_{e}.png" for e in EXPERIMENTS} | {
        "masking_frequency.png"
    }

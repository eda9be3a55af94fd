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
from fake_results import EXPERIMENTS, INIT_KNN, PIXELS_KNN, fake_inputs, metric_value, write_fake_tree

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
        fake_inputs(fake_tree.parent),
        out,
        experiments=EXPERIMENTS,
        preset="tiny",
        reference_yaml=REFERENCE,
        root=fake_tree.parent,
        mask_draws=400,
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
    assert not ((df["experiment"] == "mrl_only") & (df["checkpoint"] == "highres")).any()  # not configured
    assert "No highres rows for mrl_only, cyclic_only: highres: false" in (out / "main.md").read_text()


def test_baselines_table_reads_each_run_against_its_random_init_and_raw_pixels(paper):
    """Δ is the per-seed gain over the same seed's random init (mean ± std), judged against the trained spread."""
    out, _, _ = paper
    df = pd.read_csv(out / "baselines.csv")
    assert list(df["experiment"]) == list(EXPERIMENTS)
    franca = _row(df, experiment="franca")
    trained = [100 * metric_value("franca", s, "pretrain", "knn", "top1_k20") for s in (0, 1)]
    gains = [t - 100 * (INIT_KNN + 0.01 * s) for s, t in enumerate(trained)]
    mean, std = _mean_std(trained)
    assert (franca["knn_top1"], franca["knn_top1_std"], franca["knn_top1_n"]) == pytest.approx((mean, std, 2))
    assert franca["knn_init_top1"] == pytest.approx(100 * (INIT_KNN + 0.005))
    assert (franca["gain"], franca["gain_std"]) == pytest.approx(_mean_std(gains))
    assert franca["knn_pixels_top1"] == pytest.approx(100 * PIXELS_KNN)
    assert franca["note"] == f"Δ exceeds the seed spread of the trained k-NN ({std:.1f})"
    assert _row(df, experiment="mrl_only")["note"] == "one seed: no spread to compare Δ with"
    assert 'id="table-baselines"' in (out / "index.html").read_text()


def test_highres_table_is_the_paired_change_from_pretrain(paper):
    """Δ = highres - pretrain of the same experiment (CKPT_OFFSET 0.02 in the fake results), ± the std of the
    per-seed differences; experiments without a high-res fine-tune get no row."""
    out, _, _ = paper
    df = pd.read_csv(out / "highres.csv")
    assert list(df["experiment"]) == [e for e, spec in EXPERIMENTS.items() if spec["highres"]]
    for exp in ("franca", "dinov2"):
        row = _row(df, experiment=exp)
        diffs = [100 * (metric_value(exp, s, "highres", "hummingbird", "miou")
                        - metric_value(exp, s, "pretrain", "hummingbird", "miou")) for s in (0, 1)]  # fmt: skip
        assert (row["hummingbird_miou_delta"], row["hummingbird_miou_delta_std"]) == pytest.approx(
            _mean_std(diffs), abs=1e-9
        )
        assert row["knn_top1_delta"] == pytest.approx(2.0) and row["position_r2_delta"] == pytest.approx(0.02)
        within = str(row["note"]).partition("within the seed spread: ")[2]  # a +2.0 change, paired spread 0:
        assert "Hummingbird" not in within and "k-NN" not in within  # (a missing linseg file leaves one pair)
    assert 'id="table-highres"' in (out / "index.html").read_text()


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
    assert not ((df["variant"] == "+CyclicMask") & (df["RASA"] == "yes")).any()  # rasa: false, left out
    assert not ((df["variant"] == "+MRL") & (df["checkpoint"] == "highres")).any()
    md = (out / "ablation.md").read_text()
    assert "No RASA rows for +CyclicMask: rasa: false" in md and "No highres rows for +MRL, +CyclicMask" in md


def test_rasa_table_per_round(paper):
    out, _, _ = paper
    df = pd.read_csv(out / "rasa.csv", dtype={"round": str})
    row = _row(df, experiment="franca", checkpoint="pretrain", round=0)
    mean, std = _mean_std([0.5, 0.51])
    assert row["r2_no_pos"] == pytest.approx(mean) and row["r2_no_pos_std"] == pytest.approx(std)
    assert row["cos_no_pos_x"] == pytest.approx(0.99)
    assert (
        "cyclic_only" not in set(df["experiment"]) and "No RASA rows for cyclic_only" in (out / "rasa.md").read_text()
    )


def test_reference_table_shows_published_numbers_for_tiny(paper):
    """Issue 13 item 5: a run of a preset the paper did not publish shows every published number, not names only."""
    import yaml

    out, _, numbers = paper
    df = pd.read_csv(out / "reference.csv")
    published = yaml.safe_load(REFERENCE.read_text())["presets"]
    assert list(df["preset"]) == list(published)
    for name, entry in published.items():
        row = _row(df, preset=name)
        for key in ("knn_v1", "linear_v1", "knn_later", "linear_later", "hummingbird_voc", "linseg_ade20k"):
            assert row[key] == entry[key], (name, key)
    assert _row(df, preset="paper_vitb14_in21k")["knn_v1"] == 80.9  # by hand from the README
    assert "not comparable" in (out / "reference.md").read_text()
    cells = [c for c in numbers["tables"]["reference"]["cells"] if c["text"]]
    assert len(cells) == 30 and all(c["sources"] == [REFERENCE.resolve().as_posix()] for c in cells)


def test_reference_table_for_paper_preset(fake_tree):
    import yaml

    specs = parse_experiments(EXPERIMENTS)
    lookup = EvalLookup(collect_evals(fake_inputs(fake_tree.parent).evals, SourceIndex(fake_tree.parent)))
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
    lookup = EvalLookup(collect_evals(fake_inputs(fake_tree.parent).evals, SourceIndex(fake_tree.parent)))
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
    boxes = dict(re.findall(r'<div class="prov" id="(p\d+)">(.*?)</div>', page, re.S))
    n_linked = 0
    for entry in numbers["tables"].values():
        for cell in entry["cells"]:
            if not cell["text"]:
                continue
            link = re.search(
                rf'<a class="num" id="{cell["anchor"]}" href="#(p\d+)"[^>]*>{re.escape(escape(cell["text"]))}</a>', page
            )
            assert link is not None, cell["anchor"]
            box = boxes[link.group(1)]
            for src in cell["sources"]:
                rec = numbers["sources"][src]
                assert escape(src) in box and rec["sha256"] in box
                if rec["mlflow_run_id"]:
                    assert rec["mlflow_run_id"] in box and rec["git_commit"] in box
            n_linked += 1
    assert n_linked > 100
    assert "run-franca-0-pretrain" in page and "commitrun-franca-0-pretrain" in page


def test_provenance_shared_between_numbers_of_one_chain(paper):
    """Issue 15: one provenance box per distinct list of source files, and the page's size is its figures'."""
    out, summary, numbers = paper
    page = (out / "index.html").read_text()
    chains = {tuple(c["sources"]) for e in numbers["tables"].values() for c in e["cells"] if c["text"]}
    assert (
        page.count('<div class="prov"')
        == len(chains)
        < sum(1 for e in numbers["tables"].values() for c in e["cells"] if c["text"])
    )
    figures = sum(len(m) for m in re.findall(r"data:image/png;base64,[A-Za-z0-9+/=]+", page))
    assert figures > 0.6 * len(page.encode()), (figures, len(page.encode()))


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
    write_fake_tree(tmp_path)
    bad = tmp_path / "results" / "eval" / "franca" / "s0" / "pretrain" / "knn.json"
    bad.write_text('{"benchmark": "knn", "metrics": {"top1_k20": 0.5,')
    kwargs = {"experiments": EXPERIMENTS, "preset": "tiny", "reference_yaml": None, "root": tmp_path}
    with pytest.raises(PaperInputError, match=re.escape(str(bad))):
        build_paper(fake_inputs(tmp_path), tmp_path / "paper", **kwargs)
    bad.write_text(json.dumps({"benchmark": "knn", "metrics": {"top1_k20": "high"}}))
    with pytest.raises(PaperInputError, match=re.escape(str(bad)) + ".*metrics.top1_k20"):
        build_paper(fake_inputs(tmp_path), tmp_path / "paper", **kwargs)


def test_missing_only_for_expected_results(tmp_path):
    """Listed files that are absent read "missing"; results the rule did not list are left out without a word."""
    results = write_fake_tree(tmp_path)
    for exp in ("franca", "dinov2"):
        for seed in (0, 1):
            shutil.rmtree(results / "eval" / exp / f"s{seed}" / "highres")
    shutil.rmtree(results / "rasa" / "franca")
    stale = tmp_path / "paper" / "figures" / "training_curves_removed_experiment.png"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"old")
    inputs = fake_inputs(tmp_path)
    inputs.pca, inputs.dedup = [], []  # not configured
    summary = build_paper(
        inputs,
        tmp_path / "paper",
        experiments=EXPERIMENTS,
        preset="tiny",
        reference_yaml=None,
        root=tmp_path,
        mask_draws=50,
    )
    df = pd.read_csv(tmp_path / "paper" / "main.csv")
    row = _row(df, experiment="franca", checkpoint="highres")
    assert math.isnan(row["knn_top1"]) and "knn missing for seed(s) 0, 1" in row["note"]
    assert "missing" not in str(_row(df, experiment="franca", checkpoint="pretrain")["note"])
    rasa = pd.read_csv(tmp_path / "paper" / "rasa.csv")
    assert "RASA report missing" in _row(rasa, experiment="franca", checkpoint="pretrain")["note"]
    assert any("PCA maps: no pca.pt was given" in n for n in summary["notes"])
    assert any("no dedup report was given" in n for n in summary["notes"])
    assert not stale.exists()  # figures an earlier run made and this one does not are removed
    names = {Path(p).name for p in summary["figures"]}
    assert "pca_maps.png" not in names and "dedup_summary.png" not in names and "rasa_rounds.png" in names


def test_columns_not_configured_are_left_out(tmp_path):
    """A folder dataset with the dense benchmarks switched off: no dense column, no "missing", a footnote."""
    write_fake_tree(tmp_path)
    inputs = fake_inputs(tmp_path, benchmarks=("knn", "linear", "logreg"))
    build_paper(
        inputs,
        tmp_path / "paper",
        experiments=EXPERIMENTS,
        preset="tiny",
        reference_yaml=None,
        root=tmp_path,
        mask_draws=50,
    )
    main = pd.read_csv(tmp_path / "paper" / "main.csv")
    assert "hummingbird_miou" not in main.columns and "knn_top1" in main.columns
    assert main["note"].isna().all()  # nothing expected is missing
    page = (tmp_path / "paper" / "index.html").read_text()
    assert "missing" not in page.split('<h2 id="provenance">')[0]
    assert "Not configured in this run, so left out of the main table: hummingbird, linseg, overcluster" in page
    assert len(pd.read_csv(tmp_path / "paper" / "ablation.csv")) == 0


def test_reads_only_the_files_it_is_given(tmp_path):
    """Issue 11: results that lie in the tree but are not in the rule's inputs are never read."""
    results = write_fake_tree(tmp_path)
    experiments = {"franca": EXPERIMENTS["franca"]}
    bad = results / "eval" / "dinov2" / "s0" / "pretrain" / "knn.json"
    bad.write_text("not json")  # would raise if read
    (results / "eval" / "franca" / "s0" / "pretrain" / "extra.json").write_text("not json")
    summary = build_paper(
        fake_inputs(tmp_path, experiments),
        tmp_path / "paper",
        experiments=experiments,
        preset="tiny",
        reference_yaml=None,
        root=tmp_path,
        mask_draws=50,
    )
    read = set(summary["inputs"])
    assert read and all("/dinov2/" not in p and not p.endswith("extra.json") for p in read)
    assert set(pd.read_csv(tmp_path / "paper" / "main.csv")["experiment"]) == {"franca"}


def test_pca_maps_come_from_pca_pt(paper):
    """Issue 13: the features stage writes the PCA images to pca.pt; the page shows them."""
    out, summary, numbers = paper
    assert (out / "figures" / "pca_maps.png").is_file()
    assert all(p.endswith("/pca.pt") for p in numbers["figures"]["figures/pca_maps.png"])
    assert len(numbers["figures"]["figures/pca_maps.png"]) == 6  # first seed of each experiment x checkpoint


def test_rasa_rounds_behind_a_disclosure_under_their_figure(paper):
    out, _, _ = paper
    page = (out / "index.html").read_text()
    fig = page.index('<figure id="fig-rasa_rounds.png">')
    details = page.index("<details><summary>Per-round RASA numbers</summary>", fig)
    assert page.index('id="table-rasa"') > details > fig
    assert page.index('id="table-rasa"') < page.index("</details>", details)


def test_header_names_datasets_commit_and_scope(paper):
    out, _, _ = paper
    head = (out / "index.html").read_text().split('id="table-main"')[0]
    for text in (
        "What this run can show.",
        "A smoke test",
        "synth",
        "synthetic",
        "CC0-1.0",
        "train 2,000",
        "1,920 train",
        "commit",
        "built",
    ):
        assert text in head, text


def test_cli_reads_the_files_on_its_command_line(tmp_path, monkeypatch):
    """`franca paper --evals ... --pca ...` as the rule runs it, from the project root, with no results walk."""
    from franca.cli import main

    write_fake_tree(tmp_path)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("FRANCA_TRACKING", "off")
    inputs = fake_inputs(Path("."))
    argv = ["paper", "--out", "results/paper", "--preset", "tiny", "--experiments", json.dumps(EXPERIMENTS)]
    for flag in ("evals", "metrics", "rasa", "pca", "manifests"):
        argv += [f"--{flag}", *map(str, getattr(inputs, flag))]
    assert main([*argv, "--dedup", *map(str, inputs.dedup)]) == 0
    prov = json.loads((tmp_path / "results/paper/provenance.json").read_text())
    listed = {p.as_posix() for p in [*inputs.evals, *inputs.metrics, *inputs.rasa, *inputs.pca]}
    assert "results/features/franca/s0/pretrain/pca.pt" in prov["inputs"]
    assert {p for p in prov["inputs"] if p.startswith("results/")} <= listed
    assert (tmp_path / "results/paper/figures/pca_maps.png").is_file()


def test_one_dedup_report_per_training_dataset(tmp_path):
    """data/dedup/{dataset}/report.json per deduplicated dataset: each gets its kept count and its figure."""
    write_fake_tree(tmp_path)
    inputs = fake_inputs(tmp_path, {"franca": EXPERIMENTS["franca"]})
    second = tmp_path / "data" / "dedup" / "other" / "report.json"
    second.parent.mkdir(parents=True)
    second.write_text(json.dumps({"kept": 77, "removed": {"exact_duplicate": 3}}))  # no train_manifest: its folder
    # the second dataset's manifest is gather's partitioned directory: one parquet per work unit
    frame, parts = pd.read_parquet(tmp_path / "data/synth/manifest.parquet"), tmp_path / "data/other/manifest"
    parts.mkdir(parents=True)
    frame.iloc[:1000].to_parquet(parts / "u000000.parquet")
    frame.iloc[1000:].to_parquet(parts / "u000001.parquet")
    inputs.dedup.append(second)
    inputs.manifests.append(parts)
    summary = build_paper(
        inputs,
        tmp_path / "paper",
        experiments={"franca": EXPERIMENTS["franca"]},
        preset="tiny",
        reference_yaml=None,
        root=tmp_path,
        mask_draws=50,
    )
    names = {Path(p).name for p in summary["figures"]}
    assert {"dedup_summary_synth.png", "dedup_summary_other.png"} <= names
    head = (tmp_path / "paper" / "index.html").read_text().split('id="table-main"')[0]
    assert "1,920 train" in head and "77 train" in head
    assert head.count("train 2,000") == 2  # both datasets listed, the partitioned one from both of its parts
    assert {"data/other/manifest/u000000.parquet", "data/other/manifest/u000001.parquet"} <= set(summary["inputs"])


def test_page_says_when_a_cap_applied(tmp_path):
    """Eval JSONs that carry applied caps (eval.max_*_images) give the main and ablation tables a footnote naming each
    capped set with used / available counts; uncapped runs get none."""
    results = write_fake_tree(tmp_path)
    kwargs = {"experiments": EXPERIMENTS, "preset": "tiny", "reference_yaml": None, "root": tmp_path, "mask_draws": 50}
    build_paper(fake_inputs(tmp_path), tmp_path / "plain", **kwargs)
    assert "capped" not in (tmp_path / "plain" / "index.html").read_text()
    caps = {"applied": {"synth:train": {"used": 400, "available": 1200}}, "seed": 7}
    for path in results.glob("eval/*/s*/*/knn.json"):
        data = json.loads(path.read_text())
        path.write_text(json.dumps({**data, "caps": caps}))
    build_paper(fake_inputs(tmp_path), tmp_path / "capped", **kwargs)
    note = "class-stratified sample, seed 7): synth:train 400 of 1,200 images."
    for table in ("main", "ablation"):
        assert note in (tmp_path / "capped" / f"{table}.md").read_text()
    assert escape(note) in (tmp_path / "capped" / "index.html").read_text()
    assert note not in (tmp_path / "capped" / "rasa.md").read_text()


def test_ablation_delta_spread_is_the_std_of_per_seed_differences(paper):
    """Franca and the baseline share seeds 0 and 1: Δ's spread is the std of (franca_s - dinov2_s); a single-seed
    variant has no paired spread and is judged against the baseline's own seed std."""
    out, _, _ = paper
    md = (out / "ablation.md").read_text()
    diffs = [
        100 * (metric_value("franca", s, "pretrain", "hummingbird", "miou") - metric_value("dinov2", s, "pretrain",
                                                                                          "hummingbird", "miou"))
        for s in (0, 1)
    ]  # fmt: skip
    assert _mean_std(diffs)[1] == pytest.approx(0.0, abs=1e-9)  # the fake offsets are seed-independent
    assert "+10.0 ± 0.0" in md
    df = pd.read_csv(out / "ablation.csv")
    mrl = _row(df, checkpoint="pretrain", variant="+MRL", RASA="no")
    assert mrl["hummingbird_miou_delta"] == pytest.approx(3.0)  # 0.04 + 0.00 vs the baseline mean 0.01
    base_std = _mean_std([100 * metric_value("dinov2", s, "pretrain", "hummingbird", "miou") for s in (0, 1)])[1]
    assert base_std == pytest.approx(1.414, abs=1e-3) and "within the seed spread" not in str(mrl["note"])

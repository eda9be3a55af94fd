"""Config composition: presets carry the published recipe, stage slices isolate what each stage depends on."""

import re

import pytest

from franca import config as fc

PAPER = ["paper_vitb14_in21k", "paper_vitl14_in21k", "paper_vitl14_laion", "paper_vitg14_in21k", "paper_vitg14_laion"]


@pytest.mark.parametrize("preset", ["tiny", "small", *PAPER])
@pytest.mark.parametrize("experiment", ["franca", "dinov2", "mrl_only", "cyclic_only", "franca_slice"])
def test_every_preset_and_experiment_composes_and_validates(preset, experiment):
    cfg = fc.compose(preset, experiment)
    fc.validate(cfg)
    assert cfg["preset_name"] == preset and cfg["experiment_name"] == experiment


def test_paper_recipe_follows_training_md():
    """Spec 1.2 / Q7: 625k iterations, 100k warmup, lr 1e-3 (B) / 3.5e-4 (L, g) after the sqrt scaling rule."""
    for preset, lr, batch in [
        ("paper_vitb14_in21k", 1e-3, 2048),
        ("paper_vitl14_in21k", 3.5e-4, 3072),
        ("paper_vitg14_laion", 3.5e-4, 3072),
    ]:
        sc = fc.stage_config(fc.compose(preset, "franca"), "pretrain")
        global_batch = sc["train"]["batch_size_per_gpu"] * sc["train"]["world_size"]
        assert global_batch == batch
        assert sc["optim"]["base_lr"] * (global_batch / 1024) ** 0.5 == pytest.approx(lr, rel=0.02)
        assert (sc["optim"]["iterations"], sc["optim"]["warmup_iters"]) == (625000, 100000)
        assert sc["dino"]["head_n_prototypes"] == 131072 and sc["dino"]["head_bottleneck_dim"] == 384
        assert sc["teacher"]["momentum_teacher"] == 0.994 and sc["optim"]["weight_decay_end"] == 0.2
    hr = fc.stage_config(fc.compose("paper_vitb14_in21k", "franca"), "highres")
    assert hr["crops"]["global_crops_size"] == 518 and hr["model"]["img_size"] == 518
    assert (hr["optim"]["iterations"], hr["optim"]["warmup_iters"]) == (20000, 10000)


def test_dinov2_baseline_differs_only_in_heads_and_masking():
    franca = fc.stage_config(fc.compose("tiny", "franca"), "pretrain")
    dinov2 = fc.stage_config(fc.compose("tiny", "dinov2"), "pretrain")
    diff = {k for k in franca if franca[k] != dinov2[k]}
    assert diff == {"dino", "ibot", "masking", "experiment_name"}


def test_stage_slices_are_independent():
    """Editing an eval key changes the eval slice only; editing the recipe changes pretrain, not eval."""
    base = fc.compose("tiny", "franca")
    edited_eval = fc.compose("tiny", "franca", overrides=("eval.knn.temperature=0.1",))
    edited_optim = fc.compose("tiny", "franca", overrides=("optim.base_lr=0.02",))
    for stage in ("pretrain", "rasa", "features", "eval:linear"):
        assert fc.stage_config(base, stage) == fc.stage_config(edited_eval, stage)
    assert fc.stage_config(base, "eval:knn") != fc.stage_config(edited_eval, "eval:knn")
    assert fc.stage_config(base, "pretrain") != fc.stage_config(edited_optim, "pretrain")
    assert fc.stage_config(base, "eval:knn") == fc.stage_config(edited_optim, "eval:knn")
    # orchestration keys never enter a slice
    edited_run = fc.compose("tiny", "franca", overrides=("run.checkpoint_period=7",))
    assert all(fc.stage_config(base, s) == fc.stage_config(edited_run, s) for s in ("pretrain", "highres", "features"))


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("optim.iterations=-3", "optim.iterations"),
        ("crops.local_crops_size=18", "crops.local_crops_size"),
        ("model.ffn_layer=gelu", "model.ffn_layer"),
        ("optim.iterationz=3", "optim.iterationz"),
        ("preset=nonexistent", "preset"),
    ],
)
def test_bad_values_are_rejected_with_the_key_named(override, message):
    with pytest.raises(fc.ConfigError, match=message.replace(".", r"\.")):
        fc.validate(fc.compose("tiny", "franca", overrides=(override,)))


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("+optim.warmup_iter=3", "config key optim.warmup_iter: unknown key (set by an override"),
        ("+eval.knn.kk=3", "config key eval.knn.kk: unknown key"),
        ("+pretrain.stages.0.optim.lr=3", "pretrain.stages.0.optim.lr: unknown key"),
        ("+run.chekpoint_period=3", "run.chekpoint_period: unknown key"),
        ("+data.dedup.hamming=3", "data.dedup.hamming: unknown key"),
    ],
)
def test_unknown_keys_are_rejected_naming_the_key(override, message):
    """A typo used to run silently with the default (issue 12)."""
    with pytest.raises(fc.ConfigError, match=re.escape(message)):
        fc.validate(fc.compose("tiny", "franca", overrides=(override,)))


def test_unknown_key_in_a_config_file_names_the_file(tmp_path, monkeypatch):
    import shutil

    shutil.copytree(fc.config_dir(), tmp_path / "config")
    train = tmp_path / "config" / "train" / "tiny.yaml"
    train.write_text(re.sub(r"(?m)^optim:\n", "optim:\n  warmup_iter: 5\n", train.read_text(), count=1))
    monkeypatch.setenv("FRANCA_CONFIG_DIR", str(tmp_path / "config"))
    with pytest.raises(fc.ConfigError, match=r"optim\.warmup_iter: unknown key \(set in config/train/tiny\.yaml"):
        fc.validate(fc.compose("tiny", "franca"))


@pytest.mark.parametrize(
    ("preset", "override", "message"),
    [
        ("tiny", "+data.datasets.synth.max_byte=1", "data.datasets.synth.max_byte: unknown key"),
        ("tiny", "data.datasets.synth.source=ftp", "data.datasets.synth.source: 'ftp' is not one of"),
        ("tiny", "~data.datasets.synth.n_train", "data.datasets.synth: 'n_train' is a required property"),
        ("tiny", "data.datasets.synth.shard_size=0", "data.datasets.synth.shard_size: 0 is less than"),
        ("tiny", "data.datasets.synth.style=cubes", "data.datasets.synth.style: 'cubes' is not one of"),
        ("small", "~data.datasets.in_train.root", "data.datasets.in_train: 'root' is a required property"),
        ("small", "+data.datasets.in_train.url_list=x", "data.datasets.in_train.url_list: unknown key"),
        ("small", "+data.datasets.voc.ignore_index=300", "data.datasets.voc.ignore_index: 300 is greater than"),
        ("paper_vitl14_laion", "+data.datasets.laion.max_byte=9", "data.datasets.laion.max_byte: unknown key"),
        ("paper_vitl14_laion", "data.datasets.laion.reencode=sometimes", "data.datasets.laion.reencode"),
        ("paper_vitl14_laion", "+data.datasets.laion.allow_private_addresses=yes", "allow_private_addresses"),
    ],
)
def test_bad_dataset_entries_are_rejected(preset, override, message):
    with pytest.raises(fc.ConfigError, match=re.escape(message)):
        fc.validate(fc.compose(preset, "franca", overrides=(override,)))


def test_urls_dataset_keys_are_the_fetch_options():
    """Every fetch_urls option is a documented `source: urls` key, and nothing else (issue 12), besides the work-unit
    keys (issue 17); key_offset is the unit job's, not a dataset key."""
    import inspect

    import yaml

    from franca.data.fetch import fetch_urls
    from franca.data.units import UNIT_KEYS

    schema = yaml.safe_load((fc.config_dir().parent / "workflow/schemas/method.schema.yaml").read_text())
    urls = next(
        b["then"] for b in schema["$defs"]["dataset"]["allOf"] if b["if"]["properties"]["source"]["const"] == "urls"
    )
    options = set(inspect.signature(fetch_urls).parameters) - {
        "url_table_path",
        "out_dir",
        "on_shard_done",
        "key_offset",
    }
    assert set(urls["properties"]) == options | {"source", "url_list", "license", *UNIT_KEYS}


def test_small_dag_reads_in_val_for_classification(tmp_path):
    """`snakemake -n` with the small preset and local roots: in_val is fetched and sharded, and every features job
    (hence every eval job) takes its shards beside in_train's and voc's."""
    import json
    import os

    import repo_copy

    repo = repo_copy.copy_repo(tmp_path / "repo")
    roots = {"in_train": tmp_path / "in" / "train", "in_val": tmp_path / "in" / "val", "voc": tmp_path / "VOC2012"}
    config = {
        "preset": "small",
        "experiments": {"franca": {"seeds": [0], "highres": False, "rasa": True}},
        "overrides": [f"data.datasets.{name}.root={root}" for name, root in roots.items()],
        "dvc": {"commit_on_success": False, "push_on_success": False},
    }
    (tmp_path / "small.json").write_text(json.dumps(config))
    env = {**os.environ, "PATH": f"{repo_copy.BIN}:{os.environ['PATH']}", "FRANCA_TRACKING": "off"}
    cmd = ["snakemake", "-n", "-p", "--cores", "1", "--configfile", str(tmp_path / "small.json"),
           "--replace-workflow-config"]  # fmt: skip
    stdout = repo_copy.run(cmd, repo, env, 600).stdout
    jobs = repo_copy.dry_run_blocks(stdout)
    # eval.baselines is off at paper scale (raw-pixel features of a full train split do not fit in memory)
    assert "franca features " in stdout and "--baselines" not in stdout
    fetched = {job["wildcards"] for job in jobs if job["rule"] == "fetch"}  # one work unit per local tree
    assert fetched == {f"dataset={name}, unit=u000000" for name in ("in_train", "in_val", "voc")}
    assert {job["output"] for job in jobs if job["rule"] == "gather"} == {
        f"data/{name}/shards, data/{name}/manifest" for name in ("in_train", "in_val", "voc")
    }
    features = [job for job in jobs if job["rule"] == "features"]
    assert features and all(
        [p for p in job["input"].split(", ") if p.endswith("/shards")]
        == ["data/in_train/shards", "data/in_val/shards", "data/voc/shards"]
        for job in features
    )
    outputs = {path for job in features for path in job["output"].split(", ")}
    evals = [job for job in jobs if job["rule"] == "evaluate"]
    assert evals and all(any(p in outputs for p in job["input"].split(", ")) for job in evals)


def test_seeds_share_one_composition_but_resolve_their_own_seed():
    """compose() reuses one Hydra composition per experiment and sets the seed before resolving: equal to a
    composition with `seed=<n>` as an override, interpolations of `${seed}` included."""
    extra = ("+probe.seed_copy=${seed}",)
    for seed in (0, 3):
        got = fc.compose("tiny", "dinov2", seed, extra)
        ref = fc.compose("tiny", "dinov2", 99, (*extra, f"seed={seed}"))  # an explicit seed override wins
        assert got == ref and got["probe"]["seed_copy"] == seed


def test_compose_cache_is_keyed_by_every_config_file(tmp_path, monkeypatch):
    """The workflow's on-disk composition cache returns the same config as a fresh composition, and any edit of a
    config file (here one eval value) is a new key."""
    import shutil

    cdir = tmp_path / "config"
    shutil.copytree(fc.config_dir(), cdir)
    monkeypatch.setenv("FRANCA_CONFIG_DIR", str(cdir))
    fc._inputs_digest.cache_clear()
    cache = tmp_path / "cache"
    fresh = fc.compose("tiny", "franca", 1)
    assert fc.compose_validated("tiny", "franca", 1, (), cache) == fresh
    assert fc.compose_validated("tiny", "franca", 1, (), cache) == fresh  # read back from the cache
    assert len(list(cache.glob("*.json"))) == 1
    text = (cdir / "eval" / "tiny.yaml").read_text()
    (cdir / "eval" / "tiny.yaml").write_text(text.replace("temperature: 0.07", "temperature: 0.1"))
    fc._inputs_digest.cache_clear()  # one digest per process: the workflow composes once per invocation
    fc._compose_cached.cache_clear()
    edited = fc.compose_validated("tiny", "franca", 1, (), cache)
    assert edited["eval"]["knn"]["temperature"] == 0.1 and len(list(cache.glob("*.json"))) == 2
    fc._inputs_digest.cache_clear()

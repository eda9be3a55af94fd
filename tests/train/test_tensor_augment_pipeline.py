"""DataPipeline with ``crops.augment_device: tensor`` (franca.data.gpu_augment on the batch): the batch dict of the
PIL path (keys, shapes, dtypes), deterministic per seed, resumable from the checkpointed generators, with and
without DataLoader workers; ``pil`` stays the default."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from franca.config import compose, stage_config
from franca.data.shards import list_shards
from franca.data.synthetic import generate
from franca.train.checkpoint import capture_rng_state, restore_rng_state
from franca.train.loop import DataPipeline


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("shards")
    generate(tmp, seed=0, n_train=48, n_val=0, n_test=0, image_size=48, n_classes=4, shard_size=16)
    cfg = stage_config(compose("tiny", "franca"), "pretrain")
    cfg["train"]["batch_size_per_gpu"] = 4
    return cfg, [str(p) for p in list_shards(Path(tmp) / "shards", "train")]


def _pipeline(cfg, shards, mode, start=0, workers=0):
    cfg = copy.deepcopy(cfg)
    cfg["crops"]["augment_device"] = mode
    cfg.setdefault("run", {})["num_workers"] = workers
    cfg["run"]["device"] = "cpu"
    return DataPipeline(cfg, shards, None, seed=0, rank=0, world_size=1, start_sample=start)


def _equal(a: dict, b: dict) -> bool:
    return all(torch.equal(a[k], b[k]) if torch.is_tensor(a[k]) else a[k] == b[k] for k in a)


def test_tensor_batch_has_the_pil_batch_layout(setup):
    cfg, shards = setup
    assert _pipeline(cfg, shards, "pil").augment.__class__.__name__ == "DataAugmentationDINO"  # the default path
    tensor = _pipeline(cfg, shards, "tensor")
    assert tensor.augment.__class__.__name__ == "TensorAugmentationDINO" and "augment" in tensor.generators
    pil, ten = _pipeline(cfg, shards, "pil").next_batch(), tensor.next_batch()
    assert set(pil) == set(ten)
    for key, value in pil.items():
        if torch.is_tensor(value):
            assert ten[key].shape == value.shape and ten[key].dtype == value.dtype, key
    c = cfg["crops"]
    assert ten["collated_global_crops"].shape == (8, 3, c["global_crops_size"], c["global_crops_size"])
    assert ten["collated_local_crops"].shape == (4 * c["local_crops_number"], 3, c["local_crops_size"],
                                                 c["local_crops_size"])  # fmt: skip
    # normalised pixels of the same images: channel means within the spread of the PIL path's
    for key in ("collated_global_crops", "collated_local_crops"):
        assert (ten[key].mean() - pil[key].mean()).abs() < 3 * pil[key].std()


def test_tensor_path_is_deterministic_and_resumable(setup):
    cfg, shards = setup
    a, b = _pipeline(cfg, shards, "tensor"), _pipeline(cfg, shards, "tensor")
    first = a.next_batch()
    assert _equal(first, b.next_batch())
    state, position = capture_rng_state(a.generators), a.position
    second = a.next_batch()
    assert not torch.equal(first["collated_global_crops"], second["collated_global_crops"])
    resumed = _pipeline(cfg, shards, "tensor", start=position)
    restore_rng_state(state, resumed.generators)
    assert _equal(second, resumed.next_batch())


def test_tensor_path_with_workers(setup):
    cfg, shards = setup
    data = _pipeline(cfg, shards, "tensor", workers=1)
    assert data.augment.__class__.__name__ == "TensorAugmentationDINO"
    try:
        batch = data.next_batch()
    finally:
        data.close()
    plain = _pipeline(cfg, shards, "tensor").next_batch()
    assert batch["collated_global_crops"].shape == plain["collated_global_crops"].shape
    assert torch.isfinite(batch["collated_local_crops"]).all()


def test_unknown_augment_device_is_named(setup):
    cfg, shards = setup
    with pytest.raises(ValueError, match="crops.augment_device must be pil|tensor"):
        _pipeline(cfg, shards, "gpu")

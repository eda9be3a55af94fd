"""Checkpoint I/O: round trip, rotation, atomicity, refusal of foreign files (never executed), RNG states."""

from __future__ import annotations

import os
import pickle
import random

import numpy as np
import pytest
import torch

from franca.train import checkpoint as ck


class _Payload:
    """Unpickling this runs ``os.system`` (a malicious checkpoint)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _Custom:
    def __init__(self):
        self.weights = torch.ones(2)


CFG = {"model": {"embed_dim": 8}, "optim": {"iterations": 10}, "run": {"checkpoint_period": 5}}


def _state():
    torch.manual_seed(0)
    net = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    net(torch.randn(4, 3)).sum().backward()
    opt.step()
    return {"student": net.state_dict(), "optimizer": opt.state_dict(), "rng": [ck.capture_rng_state()]}


def test_round_trip_and_rotation(tmp_path):
    state = _state()
    for it in (5, 10, 15):
        ck.save_rolling(tmp_path, state, CFG, iteration=it, keep=2)
    files = sorted(p.name for p in tmp_path.iterdir())
    fp = ck.config_fingerprint(CFG)
    assert files == [f"ckpt-{fp}-000000010.pt", f"ckpt-{fp}-000000015.pt"]  # last 2 kept, no temp files left
    got = ck.latest_rolling(tmp_path, CFG)
    assert got["iteration"] == 15 and got["format"] == "franca-ckpt-v1" and got["config"] == CFG
    for k, v in state["student"].items():
        assert torch.equal(got["student"][k], v)
    exp_avg = state["optimizer"]["state"][0]["exp_avg"]
    assert torch.equal(got["optimizer"]["state"][0]["exp_avg"], exp_avg)


def test_fingerprint_ignores_orchestration_keys_only(tmp_path):
    ck.save_rolling(tmp_path, _state(), CFG, iteration=5)
    orchestration = {**CFG, "run": {"checkpoint_period": 99, "progress": False}}
    assert ck.latest_rolling(tmp_path, orchestration)["iteration"] == 5
    other_method = {**CFG, "optim": {"iterations": 11}}
    assert ck.config_fingerprint(other_method) != ck.config_fingerprint(CFG)
    assert ck.latest_rolling(tmp_path, other_method) is None
    # a run of another config rotating its own checkpoints leaves ours alone
    for it in (1, 2, 3):
        ck.save_rolling(tmp_path, _state(), other_method, iteration=it, keep=1)
    assert ck.latest_rolling(tmp_path, CFG)["iteration"] == 5


def test_atomic_write_keeps_old_file_on_failure(tmp_path, monkeypatch):
    path = tmp_path / "final.pt"
    ck.atomic_torch_save({"format": ck.FORMAT_TAG, "v": 1}, path)

    def broken_save(obj, fh):
        fh.write(b"partial bytes")
        raise OSError("disk full")

    monkeypatch.setattr(ck.torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        ck.atomic_torch_save({"format": ck.FORMAT_TAG, "v": 2}, path)
    monkeypatch.undo()
    assert ck.load_checkpoint(path)["v"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["final.pt"]


def test_corrupt_newest_falls_back_to_previous(tmp_path):
    ck.save_rolling(tmp_path, _state(), CFG, iteration=5)
    newest = ck.save_rolling(tmp_path, _state(), CFG, iteration=10)
    newest.write_bytes(newest.read_bytes()[:100])  # truncated by a failing disk
    assert ck.latest_rolling(tmp_path, CFG)["iteration"] == 5


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("how", ["pickle", "torch_save"])
def test_os_system_payload_is_refused_and_not_executed(tmp_path, how):
    marker = tmp_path / "pwned"
    bad = tmp_path / "evil.pt"
    payload = {"format": ck.FORMAT_TAG, "student": _Payload(marker)}
    if how == "pickle":
        bad.write_bytes(pickle.dumps(payload))
    else:
        torch.save(payload, bad)
    with pytest.raises(ck.CheckpointFormatError, match="evil.pt"):
        ck.load_checkpoint(bad)
    assert not marker.exists()
    # sanity: the payload is live, so the test would notice an unsafe loader
    pickle.loads(pickle.dumps(_Payload(tmp_path / "control")))
    assert (tmp_path / "control").exists()


def test_custom_class_random_bytes_and_untagged_files_are_refused(tmp_path):
    custom = tmp_path / "custom.pt"
    torch.save({"format": ck.FORMAT_TAG, "obj": _Custom()}, custom)
    with pytest.raises(ck.CheckpointFormatError, match="custom.pt"):
        ck.load_checkpoint(custom)
    noise = tmp_path / "noise.pt"
    noise.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(ck.CheckpointFormatError, match="noise.pt"):
        ck.load_checkpoint(noise)
    untagged = tmp_path / "dinov2.pth"
    torch.save({"teacher": {"w": torch.zeros(1)}}, untagged)
    with pytest.raises(ck.CheckpointFormatError, match="format tag"):
        ck.load_checkpoint(untagged)
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        ck.load_checkpoint(tmp_path / "missing.pt")


def test_rng_states_round_trip_through_weights_only(tmp_path):
    extra = {
        "collate": random.Random(3),
        "mask_np": np.random.default_rng(4),
        "legacy": np.random.RandomState(5),
        "torch_gen": torch.Generator().manual_seed(6),
    }
    random.seed(1)
    np.random.seed(1)
    torch.manual_seed(1)
    path = tmp_path / "rng.pt"
    ck.atomic_torch_save({"format": ck.FORMAT_TAG, "rng": ck.capture_rng_state(extra)}, path)

    def draw():
        return [
            random.random(),
            float(np.random.rand()),
            float(torch.rand(())),
            extra["collate"].random(),
            float(extra["mask_np"].random()),
            float(extra["legacy"].rand()),
            float(torch.rand((), generator=extra["torch_gen"])),
        ]

    first = draw()
    ck.restore_rng_state(ck.load_checkpoint(path)["rng"], extra)
    assert draw() == first
    with pytest.raises(ck.CheckpointFormatError, match="other"):
        ck.restore_rng_state(ck.load_checkpoint(path)["rng"], {"other": random.Random(0)})

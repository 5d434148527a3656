"""The checkpoint files themselves: atomic writes, the size/checksum record, detection of
damaged files, fallback to the one before, failed writes, RNG states through weights_only."""

import errno
import random

import numpy as np
import pytest
import torch

from dcgan.checkpoint import files as checkpoint


def tiny_state(value: float) -> dict:
    return {"format_version": checkpoint.FORMAT_VERSION, "w": torch.full((256,), value), "step": int(value)}


def test_save_writes_a_record_and_keeps_the_newest(tmp_path):
    for step in (10, 20, 30):
        saved = checkpoint.save(tiny_state(step), tmp_path, step, keep=2)
        assert saved.path.stat().st_size == saved.bytes
        assert checkpoint.verify(saved.path) is None
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "step_00000020.pt", "step_00000020.pt.json", "step_00000030.pt", "step_00000030.pt.json",
    ]  # fmt: skip
    assert checkpoint.load(saved.path)["step"] == 30


@pytest.mark.parametrize(
    "damage, reason",
    [
        ("truncate", "truncated"),
        ("flip", "SHA-256 differs"),
        ("no_record", "no size/checksum record"),
        ("bad_record", "unreadable record"),
    ],
)
def test_damaged_newest_is_rejected_with_a_reason_and_the_one_before_chosen(tmp_path, damage, reason):
    older = checkpoint.save(tiny_state(1), tmp_path, 1, keep=5).path
    newest = checkpoint.save(tiny_state(2), tmp_path, 2, keep=5).path
    data = bytearray(newest.read_bytes())
    if damage == "truncate":
        newest.write_bytes(data[: len(data) // 3])
    elif damage == "flip":
        data[len(data) // 2] ^= 0xFF
        newest.write_bytes(data)
    elif damage == "no_record":
        checkpoint.record_path(newest).unlink()
    else:
        checkpoint.record_path(newest).write_text("{not json")

    assert reason in checkpoint.verify(newest)
    chosen, rejected = checkpoint.latest_valid(tmp_path)
    assert chosen == older and [p for p, _ in rejected] == [newest]
    aside = checkpoint.set_aside(newest)
    assert aside.name == "step_00000002.pt.corrupt" and aside.exists()
    assert checkpoint.list_checkpoints(tmp_path) == [older]


def test_a_failing_write_leaves_the_previous_checkpoint_and_no_temp_file(tmp_path, monkeypatch):
    good = checkpoint.save(tiny_state(1), tmp_path, 1, keep=1).path
    real_save = torch.save

    def disk_full_halfway(obj, f):
        f.write(b"x" * 1000)  # some bytes reach the temp file first
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full_halfway)
    with pytest.raises(OSError, match="No space left"):
        checkpoint.save(tiny_state(2), tmp_path, 2, keep=1)
    monkeypatch.setattr(torch, "save", real_save)

    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000001.pt", "step_00000001.pt.json"]
    assert checkpoint.latest_valid(tmp_path) == (good, [])


def test_temp_files_of_a_killed_write_are_removed(tmp_path):
    checkpoint.save(tiny_state(1), tmp_path, 1, keep=1)
    (tmp_path / ".step_00000002.pt.abc123.tmp").write_bytes(b"half")
    (tmp_path / ".step_00000002.pt.json.def456.tmp").write_text("{")
    assert len(checkpoint.remove_temp_files(tmp_path)) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000001.pt", "step_00000001.pt.json"]


def test_rng_states_survive_a_weights_only_round_trip(tmp_path):
    checkpoint.seed_rng(123)
    np.random.standard_normal()  # leaves a cached Gaussian in numpy's state
    state = checkpoint.capture_rng_state(torch.device("cpu"))
    expected = (random.random(), np.random.standard_normal(3).tolist(), torch.rand(3))

    path = checkpoint.save({"rng": [state]}, tmp_path, 1, keep=1).path
    checkpoint.seed_rng(999)  # anything else
    checkpoint.restore_rng_state(checkpoint.load(path)["rng"][0], torch.device("cpu"))
    got = (random.random(), np.random.standard_normal(3).tolist(), torch.rand(3))
    assert got[:2] == expected[:2] and torch.equal(got[2], expected[2])


@pytest.mark.parametrize("written_on, resumed_on", [("cuda", "cpu"), ("cpu", "cuda")])
def test_rng_states_restore_across_device_types(written_on, resumed_on):
    """A GPU's CUDA state is skipped on the CPU; a CPU's missing one leaves CUDA as seeded
    (no GPU is touched either way: the CPU state holds none to set)."""
    checkpoint.seed_rng(123)
    state = checkpoint.capture_rng_state(torch.device("cpu"))
    if written_on == "cuda":
        state["cuda"] = torch.zeros(16, dtype=torch.uint8)  # what a GPU run's capture adds
    expected = (random.random(), np.random.standard_normal(3).tolist(), torch.rand(3))
    checkpoint.seed_rng(999)
    checkpoint.restore_rng_state(state, torch.device(resumed_on))
    got = (random.random(), np.random.standard_normal(3).tolist(), torch.rand(3))
    assert got[:2] == expected[:2] and torch.equal(got[2], expected[2])


def test_the_device_a_checkpoint_was_trained_on():
    cpu, gpu = {"cuda": None}, {"cuda": torch.zeros(16, dtype=torch.uint8)}
    assert checkpoint.trained_on({"device": "cuda", "rng": [cpu]}) == "cuda"
    # Older checkpoints have no "device": a CUDA RNG state says a GPU wrote it.
    assert checkpoint.trained_on({"rng": [gpu, gpu]}) == "cuda"
    assert checkpoint.trained_on({"rng": [cpu]}) == "cpu"

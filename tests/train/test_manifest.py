"""Checkpoint manifests on a real accelerate checkpoint of the tiny VAE: damaged copies are named, intact ones pass."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from sdnb.data.files import copy_tree_atomic
from sdnb.train import manifest
from sdnb.train.manifest import MANIFEST, verify_manifest, write_manifest
from tests.train.harness import train


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """step-000005 of 5 steps of the tiny AE (model.safetensors, optimizer.bin, random states, scheduler, state)."""
    run_dir, threads = tmp_path_factory.mktemp("run"), torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train(run_dir, max_steps=5)
    finally:
        torch.set_num_threads(threads)
    return run_dir / "checkpoints" / "step-000005"


@pytest.fixture
def copy(checkpoint: Path, tmp_path: Path) -> Path:
    """A fresh copy of the checkpoint, without a manifest (as written before manifests existed)."""
    copy = Path(shutil.copytree(checkpoint, tmp_path / "step-000005"))
    (copy / MANIFEST).unlink()
    return copy


def test_the_trainer_writes_a_manifest_that_verifies_here_and_in_a_mirrored_copy(checkpoint: Path,
                                                                                  tmp_path: Path) -> None:
    files = json.loads((checkpoint / MANIFEST).read_text())["files"]  # save_checkpoint: state, manifest, marker
    assert set(files) == {"model.safetensors", "optimizer.bin", "random_states_0.pkl", "custom_checkpoint_0.pkl",
                          "sdnb_state.json"}
    assert all(f["size"] == (checkpoint / name).stat().st_size and len(f["sha256"]) == 64 for name, f in files.items())
    assert verify_manifest(checkpoint) == []
    copy_tree_atomic(checkpoint, tmp_path / "drive" / checkpoint.name)  # the Mirror's copy (marker last)
    assert verify_manifest(tmp_path / "drive" / checkpoint.name) == []


def test_a_truncated_empty_missing_or_changed_file_is_named(copy: Path) -> None:
    write_manifest(copy)
    sizes = {p.name: p.stat().st_size for p in copy.iterdir()}
    model = (copy / "model.safetensors").read_bytes()
    (copy / "model.safetensors").write_bytes(b"")
    (copy / "optimizer.bin").unlink()
    state = bytearray((copy / "random_states_0.pkl").read_bytes())
    state[len(state) // 2] ^= 0xFF
    (copy / "random_states_0.pkl").write_bytes(bytes(state))
    with open(copy / "custom_checkpoint_0.pkl", "r+b") as f:
        f.truncate(sizes["custom_checkpoint_0.pkl"] - 10)
    assert verify_manifest(copy) == [
        (f"custom_checkpoint_0.pkl: {sizes['custom_checkpoint_0.pkl'] - 10} bytes, "
         f"expected {sizes['custom_checkpoint_0.pkl']}"),
        f"model.safetensors: 0 bytes, expected {len(model)}",
        "optimizer.bin: missing",
        "random_states_0.pkl: contents differ from the manifest"]
    (copy / MANIFEST).write_text('{"files": {"model.safet')  # torn
    assert verify_manifest(copy)[0].startswith(f"{MANIFEST}: unreadable (JSONDecodeError: ")


def test_big_files_get_a_partial_hash_that_catches_their_ends_only(copy: Path, monkeypatch) -> None:
    monkeypatch.setattr(manifest, "FULL_HASH_MAX", 100_000)  # model.safetensors (~190 kB) counts as big
    monkeypatch.setattr(manifest, "EDGE", 4096)
    write_manifest(copy)
    entry = json.loads((copy / MANIFEST).read_text())["files"]["model.safetensors"]
    assert set(entry) == {"size", "partial-sha256"}
    data = bytearray((copy / "model.safetensors").read_bytes())
    data[len(data) // 2] ^= 0xFF  # the middle: not read, not caught (the documented limit)
    (copy / "model.safetensors").write_bytes(bytes(data))
    assert verify_manifest(copy) == []
    data[-1] ^= 0xFF  # the tail, e.g. a zero-filled end of a half-synced file
    (copy / "model.safetensors").write_bytes(bytes(data))
    assert verify_manifest(copy) == [("model.safetensors: contents differ from the manifest (in its first or "
                                      "last 4096 bytes)")]


def test_without_a_manifest_each_file_type_is_checked(copy: Path) -> None:
    assert verify_manifest(copy) == []
    model = (copy / "model.safetensors").read_bytes()
    (copy / "model.safetensors").write_bytes(model[:-100])
    (copy / "optimizer.bin").write_bytes(b"")
    state = (copy / "custom_checkpoint_0.pkl").read_bytes()
    (copy / "custom_checkpoint_0.pkl").write_bytes(state[:-50])
    (copy / "random_states_0.pkl").unlink()
    assert verify_manifest(copy) == [
        "custom_checkpoint_0.pkl: truncated (its zip end record is missing)",
        ("model.safetensors: not a readable safetensors file (Error while deserializing header: incomplete "
         "metadata, file not fully covered)"),
        "optimizer.bin: 0 bytes",
        "random_states_0.pkl: missing"]
    assert verify_manifest(copy / "nothing") == [f"{copy / 'nothing'}: not a folder"]

"""Mirroring a run to a folder standing in for Google Drive: background copies, a failing target, resume from it."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest
import torch
from tests.train.harness import logged, max_abs_diff, step_fn, train

from sdnb.data import files
from sdnb.train import sync
from sdnb.train.checkpoint import MARKER, is_complete, list_checkpoints
from sdnb.train.logs import read_log

ENOTCONN = OSError(107, "Transport endpoint is not connected")


@pytest.fixture(scope="module")
def straight(tmp_path_factory: pytest.TempPathFactory):
    """The reference: 20 steps without interruption, no mirror."""
    run_dir, threads = tmp_path_factory.mktemp("straight"), torch.get_num_threads()
    torch.set_num_threads(1)  # as the one_thread fixture (module fixtures come first): the same rounding
    try:
        return run_dir, train(run_dir)[1]
    finally:
        torch.set_num_threads(threads)


def wait_for(condition, seconds: float = 30.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_a_target_failing_mid_run_never_stops_training_nor_damages_the_last_good_copy(
        tmp_path: Path, straight, monkeypatch: pytest.MonkeyPatch) -> None:
    drive, run_dir, broken, calls = tmp_path / "drive", tmp_path / "run", [], []
    real_copy = files._copy_file

    def flaky_copy(src: Path, dst: Path) -> None:
        if broken:
            raise ENOTCONN
        real_copy(src, dst)

    def step_then_disconnect(models, batch):
        calls.append(1)
        if len(calls) == 8:  # Drive goes away once the step-5 checkpoint is mirrored
            wait_for(lambda: is_complete(drive / "checkpoints/step-000005"))
            broken.append(True)
        return step_fn(models, batch)

    monkeypatch.setattr(files, "_copy_file", flaky_copy)
    with pytest.warns(RuntimeWarning, match="Transport endpoint is not connected"):
        result, _ = train(run_dir, fn=step_then_disconnect, sync_dir=str(drive))
    assert result.step == 20 and (run_dir / "final/ae/model.safetensors").exists()
    assert "Transport endpoint is not connected" in (run_dir / "sync_errors.log").read_text()
    assert read_log(run_dir / "log.csv")[-1]["sync_errors"] >= 1
    assert [p.name for p in list_checkpoints(drive)] == ["step-000005"]
    assert sorted(p.name for p in (drive / "checkpoints").iterdir()) == ["step-000005"]  # no half copies left

    # the last good copy on "Drive" loads: a new machine resumes from it and ends where the straight run ends
    monkeypatch.setattr(files, "_copy_file", real_copy)
    resumed, model = train(tmp_path / "elsewhere", resume=str(drive / "checkpoints/step-000005"))
    assert resumed.step == 20 and max_abs_diff(straight[1], model) == 0.0


def test_resume_latest_from_sync_dir_after_the_runtime_lost_run_dir(tmp_path: Path, straight) -> None:
    drive, run_dir = tmp_path / "drive", tmp_path / "run"
    train(run_dir, max_steps=10, sync_dir=str(drive))  # fit waits for its copies before returning
    assert [p.name for p in list_checkpoints(drive)] == ["step-000005", "step-000010"]
    assert (drive / "final/ae/model.safetensors").exists() and (drive / "log.csv").exists()
    shutil.rmtree(run_dir)  # a Colab runtime reset
    result, model = train(run_dir, sync_dir=str(drive), resume="latest")
    assert result.step == 20 and max_abs_diff(straight[1], model) == 0.0
    assert logged(run_dir) == logged(straight[0])  # log.csv came back from Drive and goes on
    assert [p.name for p in list_checkpoints(drive)] == ["step-000015", "step-000020"]  # keep 2
    with pytest.raises(FileExistsError, match="already holds a run"):
        train(tmp_path / "new", sync_dir=str(drive))  # a fresh run would mix with the mirrored one


def fake_checkpoint(root: Path, step: int, payload: bytes) -> Path:
    folder = root / "checkpoints" / f"step-{step:06d}"
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(payload)
    (folder / MARKER).write_text(f"id-{step}\n")
    return folder


def test_mirror_retries_until_the_target_recovers_and_keeps_the_old_copy_meanwhile(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run_dir, drive = tmp_path / "run", tmp_path / "drive"
    old = fake_checkpoint(drive, 5, b"old")
    fake_checkpoint(run_dir, 10, b"new" * 1000)
    failures = [ENOTCONN, OSError(28, "No space left on device"), OSError(30, "Read-only file system")]
    real_copy = files._copy_file

    def copy(src: Path, dst: Path) -> None:
        if failures:
            raise failures.pop(0)
        real_copy(src, dst)

    monkeypatch.setattr(files, "_copy_file", copy)
    with pytest.warns(RuntimeWarning):
        mirror = sync.Mirror(run_dir, drive, keep=1, retry_seconds=0.05)
        mirror.request("checkpoints")
        wait_for(lambda: len(mirror.errors) >= 2)
        assert (old / "model.safetensors").read_bytes() == b"old" and is_complete(old)  # untouched meanwhile
        wait_for(lambda: is_complete(drive / "checkpoints/step-000010"))
        assert mirror.close(timeout=10) == []
    assert len(mirror.errors) == 3 and not old.exists()  # keep=1: pruned once the new copy was complete
    assert (drive / "checkpoints/step-000010/model.safetensors").read_bytes() == b"new" * 1000
    assert len((run_dir / "sync_errors.log").read_text().splitlines()) == 3

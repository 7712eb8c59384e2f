"""The data-loss cases of issue 11 on the tiny harness: each ends with the earlier run intact and a message saying what
happened. Unreadable folders, a second writer, a damaged newest checkpoint, full disks."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections import namedtuple
from pathlib import Path

import pytest
import torch

from sdnb.data import disk
from sdnb.data.disk import NotEnoughSpace, folder_size
from sdnb.train import read_log
from sdnb.train.checkpoint import list_checkpoints, read_state
from sdnb.train.lock import LOCK_NAME, LockLost, RunLockError
from sdnb.train.resume import ResumeError
from sdnb.train.resume_check import ConfigChangeError
from tests.train.harness import logged, max_abs_diff, step_fn, train
from tests.train.test_lock import FORK, child

Usage = namedtuple("Usage", "total used free")


@pytest.fixture(scope="module")
def straight(tmp_path_factory: pytest.TempPathFactory):
    """The reference: 20 steps without interruption."""
    run_dir, threads = tmp_path_factory.mktemp("straight"), torch.get_num_threads()
    torch.set_num_threads(1)  # as the one_thread fixture (module fixtures come first): the same rounding
    try:
        return run_dir, train(run_dir)[1]
    finally:
        torch.set_num_threads(threads)


def snapshot(*roots: Path) -> dict[str, str]:
    """Every file under the roots (lock files aside) with its sha256: what "nothing lost" compares."""
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for root in roots for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != LOCK_NAME}


def test_resume_latest_starts_fresh_only_where_no_earlier_run_is_and_errors_while_looking_are_errors(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    run, drive = tmp_path / "run", tmp_path / "drive"
    train(run, max_steps=10, sync_dir=str(drive))
    before = snapshot(run, drive)
    real_iterdir, real_is_file = Path.iterdir, Path.is_file

    def drive_hiccup(self):  # Google Drive's FUSE mount, for a moment
        if self == drive / "checkpoints":
            raise OSError(107, "Transport endpoint is not connected")
        return real_iterdir(self)

    monkeypatch.setattr(Path, "iterdir", drive_hiccup)
    with pytest.raises(ResumeError) as err:
        train(run, sync_dir=str(drive), resume="latest")
    assert str(err.value).startswith(f"cannot look into sync_dir {drive} (OSError: [Errno 107] Transport endpoint is "
                                     "not connected): it may hold an earlier run, so neither a fresh start nor a "
                                     "resume is safe; nothing was changed.")
    monkeypatch.setattr(Path, "iterdir", real_iterdir)

    def unreadable(self):  # run_dir's checkpoint folders cannot be read (root reads any folder: simulated)
        if self.parent.parent == run / "checkpoints":
            raise PermissionError(13, "Permission denied", str(self))
        return real_is_file(self)

    monkeypatch.setattr(Path, "is_file", unreadable)
    with pytest.raises(ResumeError) as err:
        train(run, resume="latest")  # without the Drive copies: nothing left to resume
    assert str(err.value) == (
        f"resume='latest': run_dir={str(run)!r} holds an earlier run (log.csv, final, step-000005, step-000010) but no "
        f"checkpoint that can be resumed:\n  {run}/checkpoints/step-000010: unreadable (PermissionError: [Errno 13] "
        f"Permission denied: '{run}/checkpoints/step-000010/sdnb_complete')\n  {run}/checkpoints/step-000005: "
        f"unreadable (PermissionError: [Errno 13] Permission denied: '{run}/checkpoints/step-000005/sdnb_complete')"
        "\nNothing was changed. Restore a checkpoint, or start over in a new run_dir (resume='')")
    monkeypatch.setattr(Path, "is_file", real_is_file)
    assert snapshot(run, drive) == before  # log.csv, checkpoints and the Drive copies as they were

    train(tmp_path / "off", max_steps=4, checkpoint_every=0)  # a log, final weights, no checkpoint
    with pytest.raises(ResumeError, match=r"holds an earlier run \(log.csv, final\) but no checkpoint that can be "
                                          r"resumed: \(no checkpoint folder: were checkpoints off\?\)"):
        train(tmp_path / "off", resume="latest")
    assert len(logged(tmp_path / "off")) == 2
    capsys.readouterr()
    result, _ = train(tmp_path / "new", max_steps=2, resume="latest")
    assert result.step == 2 and "resume='latest': no earlier run in run_dir=" in capsys.readouterr().out


def test_a_second_writer_is_refused_naming_the_holder_and_a_stale_lock_is_taken_over(
        tmp_path: Path, capsys) -> None:
    run, drive = tmp_path / "run", tmp_path / "drive"
    train(run, max_steps=5, sync_dir=str(drive))
    before, go = snapshot(run, drive), FORK.Event()
    go.set()
    holder, receive = child(run, go, 120)  # another notebook training into the same run_dir
    assert receive.poll(30) and receive.recv() == ("won", holder.pid)
    with pytest.raises(RunLockError, match=f"^run_dir {run} is in use by pid {holder.pid} on host "):
        train(run, sync_dir=str(drive), resume="latest")
    os.kill(holder.pid, 9)  # it dies without releasing: its lock is stale now
    holder.join(30)
    (drive / LOCK_NAME).write_text(json.dumps({"host": "colab-vm-2", "pid": 4242, "token": "t", "started": time.time(),
                                               "heartbeat": time.time()}))  # another runtime on the same Drive
    with pytest.raises(RunLockError, match=f"^sync_dir {drive} is in use by pid 4242 on host colab-vm-2 since "):
        train(run, sync_dir=str(drive), resume="latest")
    assert snapshot(run, drive) == before
    (drive / LOCK_NAME).unlink()
    result, _ = train(run, max_steps=10, sync_dir=str(drive), resume="latest")
    assert result.step == 10 and f"taking over the lock of pid {holder.pid}" in capsys.readouterr().out
    assert not (run / LOCK_NAME).exists() and not (drive / LOCK_NAME).exists()  # released

    def taken_over(models, batch):  # at step 13 another process takes run_dir's lock
        if len(calls) == 2:
            (run / LOCK_NAME).write_text(json.dumps({"host": "colab-vm-3", "pid": 7, "token": "x",
                                                     "started": time.time(), "heartbeat": time.time()}))
        calls.append(1)
        return step_fn(models, batch)

    calls = []
    with pytest.raises(LockLost, match="this process lost its lock \\(taken over by pid 7 on host colab-vm-3"), \
            pytest.warns(RuntimeWarning, match="not removing .* it now belongs to pid 7 on host colab-vm-3"):
        train(run, fn=taken_over, max_steps=20, sync_dir=str(drive), resume="latest")
    assert [p.name for p in list_checkpoints(run)] == ["step-000005", "step-000010"]  # nothing written over
    assert json.loads((run / LOCK_NAME).read_text())["token"] == "x"  # the other's lock left alone


def test_resume_falls_back_past_a_damaged_checkpoint_and_ends_as_a_straight_run(tmp_path: Path, straight,
                                                                                capsys) -> None:
    run = tmp_path / "run"
    train(run, max_steps=15, keep_checkpoints=3)
    model = run / "checkpoints/step-000015/model.safetensors"
    size = model.stat().st_size
    with open(model, "r+b") as f:
        f.truncate(size // 2)  # a half-written copy
    capsys.readouterr()
    result, weights = train(run, resume="latest", keep_checkpoints=3)
    out = capsys.readouterr().out
    assert (f"resume='latest': skipped checkpoint {run}/checkpoints/step-000015: model.safetensors: {size // 2} "
            f"bytes, expected {size}") in out
    assert f"resuming from {run}/checkpoints/step-000010 (step 10); changed for this stage: max_steps 15 -> 20" in out
    assert result.step == 20 and max_abs_diff(straight[1], weights) == 0.0 and logged(run) == logged(straight[0])
    aside = list((run / "checkpoints").glob("abandoned-step-000015-*"))
    assert len(aside) == 1 and (aside[0] / "model.safetensors").stat().st_size == size // 2  # kept, not deleted
    assert "skipped checkpoint" in (run / "history.log").read_text()


def quota(monkeypatch: pytest.MonkeyPatch, limits: dict[Path, int]) -> None:
    """shutil.disk_usage as if each folder in `limits` were a disk of that many bytes (free = limit - its files)."""
    real = shutil.disk_usage

    def usage(path):
        for root, limit in limits.items():
            if Path(path) == root or root in Path(path).parents:
                return Usage(limit, folder_size(root), max(0, limit - folder_size(root)))
        return real(path)

    monkeypatch.setattr(disk.shutil, "disk_usage", usage)


def test_a_full_run_dir_stops_cleanly_prunes_early_to_fit_and_resumes_to_the_same_weights(
        tmp_path: Path, straight, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    run = tmp_path / "run"
    train(run, max_steps=5)
    first = logged(run)
    one = folder_size(run / "checkpoints/step-000005")
    quota(monkeypatch, {run: folder_size(run) + one // 2})  # the disk is nearly full
    (run / "checkpoints/.tmp-step-000010").mkdir()  # left by a process killed while saving, filling it up
    (run / "checkpoints/.tmp-step-000010/optimizer.bin").write_bytes(b"\0" * one)
    before = snapshot(run / "checkpoints")
    with pytest.raises(NotEnoughSpace) as err:
        train(run, resume="latest")
    assert str(err.value) == (f"not enough space in {run}: need 0.001 GB, have 0.000 GB (for checkpoint step-000010); "
                              "free space there, lower keep_checkpoints, or choose another folder")
    assert not (run / "checkpoints/.tmp-step-000010").exists()  # the partial temporary went first
    assert snapshot(run / "checkpoints") == {k: v for k, v in before.items() if "/step-000005/" in k}
    assert logged(run)[:len(first)] == first  # the earlier rows intact (this run logged up to step 10)

    quota(monkeypatch, {run: folder_size(run) + int(1.6 * one)})  # room for two checkpoints, not three
    result, weights = train(run, resume="latest")
    out = capsys.readouterr().out
    for old, kept in (("05", "10"), ("10", "15")):
        assert f"not enough space in {run} for checkpoint step-0000{int(kept) + 5:02d}: deleted the oldest checkpoint " \
               f"step-0000{old} early (keeping step-0000{kept})" in out
    assert result.step == 20 and max_abs_diff(straight[1], weights) == 0.0
    after = [r for r in logged(run) if r[0] > 6]  # (5: the first stage's last row; 6: the mean of step 6 alone)
    assert after == [r for r in logged(straight[0]) if r[0] > 6] and len(after) == 7
    assert [p.name for p in list_checkpoints(run)] == ["step-000015", "step-000020"]


def test_a_save_failing_part_way_removes_its_partial_folder_and_says_why(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    from accelerate import Accelerator

    real = Accelerator.save_state

    def full_disk(self, output_dir, **kw):  # torch's zip writer when the disk fills up during the write
        real(self, output_dir, **kw)
        if "step-000010" in output_dir:
            raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 513408 vs 513296")

    monkeypatch.setattr(Accelerator, "save_state", full_disk)
    with pytest.raises(NotEnoughSpace, match=f"^not enough space in {tmp_path}/checkpoints: writing step-000010 "
                                             r"failed \(\[enforce fail .* unexpected pos 513408 vs 513296\); have .* GB "
                                             "free. The partial checkpoint was removed and the earlier ones are intact"):
        train(tmp_path, max_steps=20)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-000005"]
    assert read_state(tmp_path / "checkpoints/step-000005")["step"] == 5


def test_a_full_drive_keeps_its_last_copy_and_says_when_it_falls_behind(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    run, drive = tmp_path / "run", tmp_path / "drive"
    drive.mkdir()
    quota(monkeypatch, {drive: 1_000_000})  # room for one checkpoint copy and the log
    with pytest.warns(RuntimeWarning) as caught:
        result, _ = train(run, sync_dir=str(drive), keep_checkpoints=1)
    messages = [str(w.message) for w in caught]
    assert result.step == 20 and (run / "final/ae/model.safetensors").exists()  # training went on
    assert [p.name for p in list_checkpoints(drive)] == ["step-000005"]  # the last good copy, intact
    assert any(m.startswith(f"sync of checkpoints to {drive} failed: NotEnoughSpace: not enough space in {drive}: "
                            "need 0.001 GB, have 0.000 GB (for the copy of step-000010)") for m in messages)
    assert any(m.startswith(f"sync_dir {drive} has fallen behind by 2 checkpoints: its newest is step-000005, not "
                            "copied: step-000010, step-000015 (sync of checkpoints to ") for m in messages)
    assert "not enough space in" in (run / "sync_errors.log").read_text()


def test_02_on_the_embedded_default_keeps_the_first_stages_config_until_a_resume_is_accepted(tiny_assets, tmp_path,
                                                                                             capsys) -> None:
    """The config cell, then finetune: a recipe change is refused and leaves config.json as it was; a second stage
    with a new budget and lr is accepted, recorded in history.log, and only then written to config.json."""
    from sdnb.vae import VAEConfig, finetune, prepare_data

    def config(**kw) -> VAEConfig:
        return VAEConfig(**{**dict(run_dir=str(tmp_path), image_dir=str(tiny_assets.fundus_train),
                                   val_image_dir=str(tiny_assets.fundus_val), model_id=str(tiny_assets.sd),
                                   patch_size=32, patches_per_epoch=16, n_val_patches=4, batch_size=2, max_steps=4,
                                   checkpoint_every=2, checkpoint_minutes=0, log_every=1, validate_every=0,
                                   device="cpu", mixed_precision="no", lr=1e-3), **kw})

    first = config()
    first.save()
    data = prepare_data(first)
    finetune(first, data.train_images, data.val_patches)
    saved = (tmp_path / "config.json").read_text()
    recipe = config(recipe="ft-mse", lr=1e-3, batch_size=2, resume="latest")
    assert recipe.save() == tmp_path / "config.pending.json"
    with pytest.raises(ConfigChangeError) as err:
        finetune(recipe, data.train_images, data.val_patches)
    assert f"  recipe: 'sdnb' in {tmp_path}/checkpoints/step-000004, now 'ft-mse'\n" in str(err.value)
    assert f"  trainable: 'all' in {tmp_path}/checkpoints/step-000004, now 'decoder'\n" in str(err.value)
    assert (tmp_path / "config.json").read_text() == saved and len(logged_rows(tmp_path)) == 4
    second = config(max_steps=6, lr=5e-4, resume="latest")
    second.save()
    result = finetune(second, data.train_images, data.val_patches)
    assert result.step == 6 and json.loads((tmp_path / "config.json").read_text())["lr"] == 5e-4
    assert not (tmp_path / "config.pending.json").exists()
    assert "changed for this stage: lr 0.001 -> 0.0005, max_steps 4 -> 6" in (tmp_path / "history.log").read_text()


def logged_rows(run_dir: Path) -> list[dict]:
    return [r for r in read_log(run_dir / "log.csv") if "loss" in r]

"""Checkpoints are complete or ignored: a process killed while writing one leaves the previous one in charge."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tests.train.harness import HERE, logged, max_abs_diff, train

from sdnb.train.logs import read_log
from sdnb.train.checkpoint import MARKER, find_latest, is_complete, list_checkpoints, prune, read_state
from sdnb.train.resume import ResumeError


def test_sigkill_while_writing_a_checkpoint_leaves_the_previous_one_and_resume_picks_it(tmp_path: Path) -> None:
    run_dir = tmp_path / "killed"
    args = dict(run_dir=str(run_dir), sample_posterior=True)  # 20 steps, a checkpoint every 5
    env = {**os.environ, "SDNB_TEST_PAUSE_IN_CHECKPOINT": "10", "OMP_NUM_THREADS": "1"}  # as one_thread: same rounding
    child = subprocess.Popen([sys.executable, str(HERE / "harness.py"), json.dumps(args)], env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    partial = run_dir / "checkpoints" / ".tmp-step-000010"
    deadline = time.monotonic() + 120
    while not (partial / "sdnb_state.json").exists():  # the hook sleeps here, before the marker and the rename
        assert child.poll() is None and time.monotonic() < deadline, child.stderr.read().decode()[-2000:]
        time.sleep(0.05)
    child.send_signal(signal.SIGKILL)
    child.wait(30)
    assert (partial / "model.safetensors").exists() and not (partial / MARKER).exists()
    assert [p.name for p in list_checkpoints(run_dir)] == ["step-000005"]
    assert find_latest(run_dir).name == "step-000005"

    straight, model_a = train(tmp_path / "straight")
    resumed, model_b = train(run_dir, resume="latest")
    assert resumed.step == 20 and max_abs_diff(model_a, model_b) == 0.0
    assert logged(tmp_path / "straight") == logged(run_dir)
    assert not partial.exists() and [p.name for p in list_checkpoints(run_dir)] == ["step-000015", "step-000020"]
    assert read_state(run_dir / "checkpoints/step-000020")["reason"] == "final"


def test_incomplete_folders_are_ignored_and_pruning_keeps_the_newest(tmp_path: Path) -> None:
    root = tmp_path / "checkpoints"
    for step, complete in [(5, True), (10, True), (15, True), (20, False)]:
        folder = root / f"step-{step:06d}"
        folder.mkdir(parents=True)
        (folder / "model.safetensors").write_bytes(b"x")
        if complete:
            (folder / MARKER).write_text("id\n")
    (root / "notes").mkdir()
    assert find_latest(tmp_path).name == "step-000015" and not is_complete(root / "step-000020")
    prune(tmp_path, keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-000010", "step-000015"]


def test_resume_from_an_older_checkpoint_sets_newer_ones_aside(tmp_path: Path) -> None:
    """resume=<path> of an older checkpoint starts a new timeline; a second stage may change the lr."""
    train(tmp_path, max_steps=10, keep_checkpoints=3)
    older = tmp_path / "checkpoints" / "step-000005"
    result, _ = train(tmp_path, max_steps=15, resume=str(older), lr=1e-3, keep_checkpoints=3)
    assert result.step == 15
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-000005", "step-000010", "step-000015"]
    assert read_state(tmp_path / "checkpoints/step-000010")["settings"]["lr"] == 1e-3  # the new timeline's
    assert len(list(tmp_path.glob("checkpoints/abandoned-step-000010-*"))) == 1
    assert [r["lr"] for r in read_log(tmp_path / "log.csv") if "lr" in r] == [2e-3] * 2 + [1e-3] * 6  # rows at 2, 4 | 6 ... 14, 15
    with pytest.raises(ResumeError, match="checkpoints' cannot be resumed: not a checkpoint folder"):
        train(tmp_path, resume=str(tmp_path / "checkpoints"))

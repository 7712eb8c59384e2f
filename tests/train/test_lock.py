"""One writer per run folder: racing processes, a killed holder, a reset runtime's stale lock, a lost lock."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import socket
import time
from pathlib import Path

import pytest

from sdnb.data.folders import FolderError
from sdnb.train.lock import LOCK_NAME, LockLost, RunLock, RunLockError, read_lock

HOST = socket.gethostname()
FORK = multiprocessing.get_context("fork")  # children share this process's imports: no second torch import


def _hold(folder: str, go, hold: float, out) -> None:
    """Child: wait for `go`, take the lock for `hold` seconds; send ("won", pid) or ("refused", message)."""
    go.wait()
    try:
        with RunLock(folder, heartbeat_s=0.2):
            out.send(("won", os.getpid()))
            time.sleep(hold)
    except RunLockError as err:
        out.send(("refused", str(err)))
    out.close()


def child(folder: Path, go, hold: float):
    """A forked process that takes the lock of `folder` once `go` is set; returns (process, receiving end)."""
    receive, send = FORK.Pipe(duplex=False)
    proc = FORK.Process(target=_hold, args=(str(folder), go, hold, send), daemon=True)
    proc.start()
    return proc, receive


def wait_for(condition, seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def write_lock(folder: Path, **info) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / LOCK_NAME).write_text(json.dumps({"token": "theirs", "started": time.time() - 3600, **info}))


def test_two_processes_racing_for_one_lock_exactly_one_wins_and_the_other_names_it(tmp_path: Path) -> None:
    go = FORK.Event()  # both children wait on it, then acquire at once; three races side by side
    races = [(tmp_path / f"race{i}" / "run", [child(tmp_path / f"race{i}" / "run", go, 1.0) for _ in range(2)])
             for i in range(3)]
    go.set()
    for folder, procs in races:
        outs = [receive.recv() if receive.poll(30) else ("timeout", "") for _, receive in procs]
        for proc, _ in procs:
            proc.join(30)
        assert sorted(kind for kind, _ in outs) == ["refused", "won"], outs
        winner = next(pid for kind, pid in outs if kind == "won")
        refusal = next(message for kind, message in outs if kind == "refused")
        assert f"run_dir {folder} is in use by pid {winner} on host {HOST} since " in refusal
        assert f"stop it (kill {winner})" in refusal
        assert not (folder / LOCK_NAME).exists()  # the winner released it


def test_the_lock_of_a_killed_process_is_taken_over_with_a_message(tmp_path: Path, capsys) -> None:
    folder, go = tmp_path / "run", FORK.Event()
    go.set()
    holder, receive = child(folder, go, 120)
    assert receive.poll(30) and receive.recv() == ("won", holder.pid)
    with pytest.raises(RunLockError, match=f"in use by pid {holder.pid} on host"):
        RunLock(folder).acquire()
    os.kill(holder.pid, signal.SIGKILL)  # no chance to release: the lock file stays
    wait_for(lambda: Path(f"/proc/{holder.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z")
    assert read_lock(folder)["pid"] == holder.pid  # killed, not yet reaped (a zombie): gone all the same
    with RunLock(folder) as lock:
        assert read_lock(folder)["token"] == lock.token and read_lock(folder)["pid"] == os.getpid()
    out = capsys.readouterr().out
    assert f"run_dir {folder}: taking over the lock of pid {holder.pid} on host {HOST}" in out
    assert f"pid {holder.pid} no longer runs on this host" in out
    holder.join(30)


def test_a_reset_runtimes_lock_is_refused_while_its_heartbeat_is_fresh_and_taken_over_once_stale(
        tmp_path: Path, capsys) -> None:
    drive = tmp_path / "sync"
    write_lock(drive, host="colab-vm-old", pid=4242, heartbeat=time.time() - 20)
    with pytest.raises(RunLockError) as err:
        RunLock(drive, "sync_dir").acquire()
    message = str(err.value)
    assert message.startswith(f"sync_dir {drive} is in use by pid 4242 on host colab-vm-old since ")
    assert "(heartbeat 20 s ago)" in message and "heartbeat is 180 s old (in 160 s)" in message
    assert str(drive / LOCK_NAME) in message

    write_lock(drive, host="colab-vm-old", pid=4242, heartbeat=time.time() - 1000)
    with RunLock(drive, "sync_dir") as lock:
        assert read_lock(drive)["token"] == lock.token
    out = capsys.readouterr().out
    assert "taking over the lock of pid 4242 on host colab-vm-old" in out
    assert "no heartbeat for 1000 s (> 180 s) from host colab-vm-old: its runtime is gone" in out
    assert not (drive / LOCK_NAME).exists() and not list(drive.glob(".sdnb_lock*"))  # no leftovers


def test_heartbeat_refreshes_and_a_taken_over_lock_is_detected_and_left_alone(tmp_path: Path) -> None:
    lock = RunLock(tmp_path / "a" / "b" / "run", heartbeat_s=0.05).acquire()  # parents created for run_dir
    first = read_lock(lock.folder)
    time.sleep(0.3)
    assert read_lock(lock.folder)["heartbeat"] > first["heartbeat"] and lock.held
    lock.check()  # still ours: no error
    write_lock(lock.folder, host="other-vm", pid=7, heartbeat=time.time())  # it took over meanwhile
    with pytest.warns(RuntimeWarning, match="lock lost \\(taken over by pid 7 on host other-vm"):
        wait_for(lambda: lock.lost)  # the heartbeat thread finds the other token and stops writing
    with pytest.raises(LockLost, match="this process lost its lock \\(taken over by pid 7 on host other-vm"):
        lock.check()
    with pytest.warns(RuntimeWarning, match="not removing .* it now belongs to pid 7 on host other-vm"):
        assert lock.release() is False
    assert read_lock(lock.folder)["token"] == "theirs"


def test_one_process_twice_and_a_lock_this_process_left_behind(tmp_path: Path, capsys) -> None:
    with RunLock(tmp_path) as lock:
        with pytest.raises(RunLockError, match="in use by this process .* release the other RunLock"):
            RunLock(tmp_path).acquire()
        assert lock.held
    write_lock(tmp_path, host=HOST, pid=os.getpid(), heartbeat=time.time())  # an earlier cell's, never released
    with RunLock(tmp_path):
        pass
    assert "it was left by this process (never released)" in capsys.readouterr().out
    with pytest.raises(ValueError), RunLock(tmp_path):  # released even though the body raised
        raise ValueError
    assert not (tmp_path / LOCK_NAME).exists()


def test_a_file_system_ignoring_o_excl_cannot_make_a_second_holder(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Google Drive's FUSE may open an existing file despite O_EXCL: a non-empty lock file is never ours."""
    write_lock(tmp_path, host="other-vm", pid=9, heartbeat=time.time())
    monkeypatch.setattr(os, "O_EXCL", 0)
    with pytest.raises(RunLockError, match="in use by pid 9 on host other-vm"):
        RunLock(tmp_path).acquire()
    assert read_lock(tmp_path)["token"] == "theirs"


def test_a_folder_that_is_a_file_or_whose_parent_vanished_is_refused(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(FolderError, match="run_dir='.*/file' is a file, not a folder: choose another run_dir"):
        RunLock(tmp_path / "file").acquire()
    with pytest.raises(FolderError, match="its parent folder .*/gone does not exist"):
        RunLock(tmp_path / "gone" / "sync", "sync_dir").acquire()
    assert not (tmp_path / "gone").exists()

"""One writer per run folder: `with RunLock(run_dir): train()` refuses a second notebook, process or runtime.

The lock is a small JSON file, `folder/sdnb_lock.json`: host, pid, start time, a random token and a
heartbeat time that a daemon thread refreshes every `heartbeat_s` (30 s) while the lock is held.
A second holder is refused at once with a message naming the first. A lock is *stale*, and taken over
with a printed message, when its holder is gone:
- on this host: its pid no longer runs (or now belongs to another process: the start time differs);
- on another host (a reset Colab runtime comes back with a new host name, and the old one can neither
  release the lock nor refresh it): its heartbeat is older than `stale_after_s`.
Default stale_after_s = 180 s = 3 x 30 s, so a holder may miss two heartbeats and be late on a third (a
slow Drive write, a busy machine), plus 90 s for Google Drive to show one machine's write on another
(its sync is not immediate; this margin is a judgement, not a measurement). A new runtime takes about
that long to reinstall and load anyway, so a takeover after a reset rarely waits.

Creation is `os.open(O_CREAT | O_EXCL)`, atomic on local disks. Google Drive's FUSE mount may not honour
O_EXCL between machines, so the content goes in by write-then-rename, is read back after `settle_s`, and
the heartbeat thread re-checks the token at every beat: a holder that finds another token stops
refreshing, `check()` then raises LockLost, and `release()` leaves the other's file alone.
"""

from __future__ import annotations

import atexit
import json
import os
import secrets
import socket
import threading
import time
import warnings
from pathlib import Path
from typing import Any

from sdnb.data.folders import prepare_folder

LOCK_NAME = "sdnb_lock.json"
_HELD: set[str] = set()  # tokens of the locks this process holds now


class RunLockError(RuntimeError):
    """The folder is in use by a live process."""


class LockLost(RuntimeError):
    """Another process took over a lock this process held (its heartbeat stalled for too long)."""


def read_lock(folder: str | Path, tries: int = 10) -> dict[str, Any] | None:
    """The lock's content, None if there is no lock, {} if it stays empty or unreadable (being written)."""
    path = Path(folder) / LOCK_NAME
    for _ in range(tries):
        try:
            return json.loads(path.read_text())
        except FileNotFoundError:
            return None
        except (ValueError, OSError):
            time.sleep(0.05)  # created (O_EXCL) but not written yet, or replaced meanwhile
    return {}


def _proc_start(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux /proc; None elsewhere or if it is gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(pid: int, start: str | None) -> bool:
    """Whether `pid` runs on this host and is still the process that took the lock (not a reused pid)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    try:
        if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
            return False  # killed, not yet reaped by its parent
    except (OSError, IndexError):
        pass
    now = _proc_start(pid)
    return start is None or now is None or now == start


def _when(t: float) -> str:
    same_day = time.strftime("%Y-%m-%d", time.localtime(t)) == time.strftime("%Y-%m-%d")
    return time.strftime("%H:%M:%S" if same_day else "%Y-%m-%d %H:%M:%S", time.localtime(t))


class RunLock:
    """Exclusive use of a folder by one process: `acquire()`/`release()` or a `with` block."""

    def __init__(self, folder: str | Path, what: str = "run_dir", *, parents: bool | None = None,
                 heartbeat_s: float = 30.0, stale_after_s: float | None = None, settle_s: float = 0.2):
        self.folder, self.what, self.parents = Path(folder), what, parents
        self.path = self.folder / LOCK_NAME
        self.heartbeat_s = heartbeat_s
        self.stale_after_s = 3 * heartbeat_s + 90 if stale_after_s is None else stale_after_s
        self.settle_s = settle_s
        self.token = secrets.token_hex(16)
        self.lost: str = ""  # why the lock was lost, once another process took it over
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def held(self) -> bool:
        """True while this object holds the lock (and has not found it taken over)."""
        return self.token in _HELD and not self.lost

    # ---------------------------------------------------------------- acquire and release
    def acquire(self) -> RunLock:
        """Take the lock, taking over a stale one; raise RunLockError naming the holder if it is in use."""
        if self.held:
            return self
        prepare_folder(self.folder, self.what, self.parents)
        for _ in range(5):  # a stale lock broken by someone else meanwhile: try again
            if self._create():
                self._confirm()
                return self
            info = read_lock(self.folder)
            if info is None:
                continue
            reason = self._stale_reason(info)
            if reason is None:
                raise RunLockError(self._in_use_message(info))
            print(f"{self.what} {self.folder}: taking over the lock of {self._holder(info)}: {reason}", flush=True)
            self._break(info.get("token"))
        raise RunLockError(f"{self.what} {self.folder}: could not take {self.path} after 5 tries (another "
                           "process keeps creating it): run again")

    def _create(self) -> bool:
        """Create the lock file if there is none; True when this process wrote it."""
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        try:
            empty = os.fstat(fd).st_size == 0  # a FUSE that ignores O_EXCL opens someone's lock: not ours
        finally:
            os.close(fd)
        if not empty:
            return False
        now, self._pid = time.time(), os.getpid()
        self._info = {"what": self.what, "folder": str(self.folder), "host": socket.gethostname(),
                      "pid": os.getpid(), "pid_start": _proc_start(os.getpid()), "started": now,
                      "heartbeat": now, "heartbeat_s": self.heartbeat_s, "stale_after_s": self.stale_after_s,
                      "token": self.token}
        self._write()
        return True

    def _confirm(self) -> None:
        """Read the lock back after `settle_s`; start the heartbeat if it is still ours."""
        time.sleep(self.settle_s)
        info = read_lock(self.folder)
        if not info or info.get("token") != self.token:
            raise RunLockError(self._in_use_message(info or {}))
        _HELD.add(self.token)
        self.lost = ""
        self._stop.clear()
        self._thread = threading.Thread(target=self._beat, name=f"sdnb-lock-{self.what}", daemon=True)
        self._thread.start()
        atexit.register(self.release)

    def release(self) -> bool:
        """Stop the heartbeat and remove the lock if it is still ours; True when it was removed."""
        if getattr(self, "_pid", os.getpid()) != os.getpid():
            return False  # a forked child exiting: the lock is its parent's
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(5)
        atexit.unregister(self.release)
        was_held = self.token in _HELD
        _HELD.discard(self.token)
        info = read_lock(self.folder)
        if not was_held or not info or info.get("token") != self.token:
            if was_held and info:
                warnings.warn(f"{self.what} {self.folder}: not removing {self.path}: it now belongs to "
                              f"{self._holder(info)}", RuntimeWarning, stacklevel=2)
            return False
        self.path.unlink(missing_ok=True)
        return True

    def check(self) -> None:
        """Raise LockLost if another process has taken the lock over (call before writing a checkpoint)."""
        if not self.lost and self.token in _HELD:
            info = read_lock(self.folder)
            if info is not None and info != {} and info.get("token") != self.token:
                self.lost = f"taken over by {self._holder(info)}"
        if self.lost:
            raise LockLost(f"{self.what} {self.folder}: this process lost its lock ({self.lost}; its heartbeat "
                           f"was late by more than {self.stale_after_s:.0f} s?): stop this run, the other "
                           "process now writes there")

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()

    # ---------------------------------------------------------------- heartbeat
    def _write(self) -> None:
        tmp = self.folder / f".{LOCK_NAME}.{self.token[:8]}.tmp"
        tmp.write_text(json.dumps(self._info, indent=1))
        os.replace(tmp, self.path)

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                info = read_lock(self.folder)
                if info == {}:  # unreadable right now: do not write over what may be another's lock
                    continue
                if info is None or info.get("token") != self.token:
                    self.lost = f"taken over by {self._holder(info)}" if info else "its lock file was removed"
                    warnings.warn(f"{self.what} {self.folder}: lock lost ({self.lost})", RuntimeWarning)
                    return
                self._info["heartbeat"] = time.time()
                self._write()
            except OSError:  # Drive disconnected: try again at the next beat (others see the heartbeat age)
                pass

    # ---------------------------------------------------------------- stale locks
    def _stale_reason(self, info: dict[str, Any]) -> str | None:
        """Why a lock found in the folder can be taken over, or None while its holder may be alive."""
        age = self._age(info)
        if info.get("host") == socket.gethostname() and "pid" in info:
            pid = int(info["pid"])
            if pid == os.getpid():
                return None if info.get("token") in _HELD else "it was left by this process (never released)"
            if not _alive(pid, info.get("pid_start")):
                return f"pid {pid} no longer runs on this host"
            return None
        if age > self.stale_after_s:
            what = "an unreadable lock file" if not info else f"host {info.get('host', '?')}"
            return f"no heartbeat for {age:.0f} s (> {self.stale_after_s:.0f} s) from {what}: its runtime is gone"
        return None

    def _age(self, info: dict[str, Any]) -> float:
        """Seconds since the holder's last heartbeat (the file's age when it is unreadable)."""
        try:
            beat = float(info["heartbeat"]) if info else self.path.stat().st_mtime
        except (KeyError, TypeError, ValueError, OSError):
            beat = 0.0
        return max(0.0, time.time() - beat)  # clocks of two hosts may disagree by a little

    def _break(self, token: str | None) -> None:
        """Remove a stale lock, unless someone replaced it meanwhile (then put theirs back)."""
        moved = self.folder / f".{LOCK_NAME}.stale-{self.token[:8]}"
        try:
            os.rename(self.path, moved)
        except FileNotFoundError:
            return  # another process broke it first
        try:
            taken = json.loads(moved.read_text()).get("token")
        except (OSError, ValueError):
            taken = token
        if taken != token and not self.path.exists():
            os.rename(moved, self.path)  # a fresh lock, not the stale one we judged
        else:
            moved.unlink(missing_ok=True)

    def _holder(self, info: dict[str, Any]) -> str:
        if not info:
            return "an unknown process (its lock file is empty or unreadable)"
        who = "this process" if info.get("host") == socket.gethostname() and info.get("pid") == os.getpid() \
            else f"pid {info.get('pid', '?')} on host {info.get('host', '?')}"
        return f"{who} since {_when(float(info.get('started', 0)))}"

    def _in_use_message(self, info: dict[str, Any]) -> str:
        age = self._age(info)
        head = f"{self.what} {self.folder} is in use by {self._holder(info)} (heartbeat {age:.0f} s ago): "
        if info.get("host") == socket.gethostname() and info.get("pid") == os.getpid():
            return head + (f"release the other RunLock of {self.folder} first (or restart the kernel)")
        if info.get("host") == socket.gethostname():
            return head + (f"wait for it to finish or stop it (kill {info.get('pid')}), or choose another "
                           f"{self.what}")
        left = max(0.0, self.stale_after_s - age)
        return head + (f"wait for it to finish or stop it, or choose another {self.what}. If that runtime is gone "
                       f"(reset), its lock is taken over once its heartbeat is {self.stale_after_s:.0f} s old "
                       f"(in {left:.0f} s): run again then, or delete {self.path}")

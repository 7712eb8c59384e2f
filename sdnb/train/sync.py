"""Mirror a run to a second folder (Google Drive on Colab) in a background thread.

Training writes to the local `run_dir`; `Mirror` copies each complete checkpoint, `log.csv` and the
final weights to `sync_dir` without stalling the loop. Every copy goes to a temporary name and is
renamed when complete (checkpoint markers are copied last), so the last good copy is never damaged.
A failing target (Drive's "Transport endpoint is not connected", a full or read-only disk) is reported
as a warning and a line in `run_dir/sync_errors.log`, and retried later; training goes on, and a warning says when
sync_dir has fallen behind by more than one checkpoint. Before each copy the mirror makes room at sync_dir as
run_dir does before a save (`sdnb.train.space`); sync_dir is never created where a Drive is not mounted
(`sdnb.data.folders.check_sync_dir`), and nothing more is written once another process has taken its lock.
"""

from __future__ import annotations

import shutil
import threading
import time
import warnings
from pathlib import Path

from sdnb.data.disk import folder_size
from sdnb.data.files import copy_file_atomic, copy_tree_atomic
from sdnb.data.folders import check_sync_dir
from sdnb.train.checkpoint import checkpoint_name, list_checkpoints, marker_id, prune, step_of
from sdnb.train.lock import LockLost, RunLock
from sdnb.train.resume import HISTORY
from sdnb.train.space import MARGIN, make_room


class Mirror:
    """Background copier from run_dir to sync_dir. `request()` marks what changed; `close()` waits (bounded)."""

    ITEMS = ("checkpoints", "log", "final")

    def __init__(self, run_dir: str | Path, sync_dir: str | Path, keep: int = 2, retry_seconds: float = 30.0,
                 lock: RunLock | None = None):
        """`lock`: this run's lock of sync_dir, checked before each copy."""
        self.run_dir, self.sync_dir = Path(run_dir), Path(sync_dir)
        self.keep, self.retry_seconds, self.run_lock = keep, retry_seconds, lock
        self.saved: list[int] = []  # steps of the checkpoints the run saved while mirroring
        self.mirrored = max((step_of(p) for p in list_checkpoints(self.sync_dir)), default=-1)
        self._behind_told = 1
        self.lost = False  # another process took sync_dir's lock: nothing more is copied
        self.failing = False  # the last copy of checkpoints failed
        self.lock = threading.Lock()  # held while choosing local checkpoints to copy, and while pruning them
        self.errors: list[str] = []
        self._busy: set[Path] = set()
        self._dirty: set[str] = set()
        self._next_try = 0.0
        self._stop = False
        self._cv = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="sdnb-mirror", daemon=True)
        self._thread.start()

    def request(self, *items: str) -> None:
        """Ask for `items` ("checkpoints", "log", "final") to be mirrored soon."""
        with self._cv:
            if not self._stop:
                self._dirty.update(items)
                self._cv.notify_all()

    def checkpoint_saved(self, step: int) -> None:
        """The run saved the checkpoint of `step`: mirror it soon."""
        self.saved.append(step)
        if self.failing:
            self._tell_if_behind()
        self.request("checkpoints", "log")

    def busy(self) -> set[Path]:
        """Local checkpoints being copied right now (call with `lock` held; do not delete these)."""
        return set(self._busy)

    def close(self, timeout: float = 600.0) -> list[str]:
        """Make a last attempt at pending copies and wait up to `timeout` s; returns what is still not mirrored."""
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        self._thread.join(timeout)
        pending = sorted(self._dirty)
        if self._thread.is_alive():
            warnings.warn(f"sync to {self.sync_dir}: still copying after {timeout:.0f} s; the copy goes on in "
                          f"the background while this process lives", RuntimeWarning, stacklevel=2)
            pending = sorted(set(pending) | {"(in progress)"})
        elif pending:
            warnings.warn(f"sync to {self.sync_dir}: not mirrored: {', '.join(pending)} (see "
                          f"{self.run_dir / 'sync_errors.log'}); the local copies in {self.run_dir} are complete",
                          RuntimeWarning, stacklevel=2)
        return pending

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._stop and not (self._dirty and time.monotonic() >= self._next_try):
                    wait = max(0.0, self._next_try - time.monotonic()) if self._dirty else None
                    self._cv.wait(wait)
                items, stopping = [i for i in self.ITEMS if i in self._dirty], self._stop
                self._dirty.clear()
            failed = [item for item in items if not self._sync(item)]
            with self._cv:
                self._dirty.update(failed)
                if failed:
                    self._next_try = time.monotonic() + self.retry_seconds
                if stopping:
                    return

    def _sync(self, item: str) -> bool:
        if self.lost:
            return True
        try:
            if self.run_lock is not None:
                self.run_lock.check()  # LockLost: another process writes there now
            check_sync_dir(self.sync_dir)  # never a "mirror" on the local disk of an unmounted Drive
            getattr(self, f"_sync_{item}")()
            if item == "checkpoints":
                self.failing, self._behind_told = False, 1
            return True
        except LockLost as err:  # never write over the other process's copies: stop mirroring
            self._report(item, err, retry=False)
            self.lost = True
            return True
        except Exception as err:  # never let the thread die: report and retry later
            self._report(item, err)
            if item == "checkpoints":
                self.failing = True
                self._tell_if_behind()
            return False
        finally:
            self._busy = set()

    def _sync_log(self) -> None:
        for name in ("log.csv", "config.json", HISTORY):
            if (self.run_dir / name).exists():
                copy_file_atomic(self.run_dir / name, self.sync_dir / name)

    def _sync_final(self) -> None:
        if (self.run_dir / "final").is_dir():
            need = int(MARGIN * folder_size(self.run_dir / "final"))
            make_room(self.sync_dir, need, "the final weights", protect=list_checkpoints(self.sync_dir)[-1:])
            copy_tree_atomic(self.run_dir / "final", self.sync_dir / "final")

    def _sync_checkpoints(self) -> None:
        remote_root = self.sync_dir / "checkpoints"
        remote_root.mkdir(exist_ok=True)
        for stale in list(remote_root.glob(".tmp-*")) + list(remote_root.glob(".old-*")):
            shutil.rmtree(stale, ignore_errors=True)
        with self.lock:
            todo = [p for p in list_checkpoints(self.run_dir)[-self.keep:]
                    if marker_id(remote_root / p.name) != marker_id(p)]
            self._busy = set(todo)
        for path in todo:
            make_room(self.sync_dir, int(MARGIN * folder_size(path)), f"the copy of {path.name}")
            copy_tree_atomic(path, remote_root / path.name)
            self.mirrored = max(self.mirrored, step_of(path))
        prune(self.sync_dir, self.keep)  # keeps the newest copy that verifies

    def _tell_if_behind(self) -> None:
        """Warn when more than one checkpoint saved in run_dir is missing at sync_dir (once per new one missing)."""
        missing = [s for s in self.saved if s > self.mirrored]
        if len(missing) > self._behind_told:
            self._behind_told = len(missing)
            newest = checkpoint_name(self.mirrored) if self.mirrored >= 0 else "none"
            warnings.warn(f"sync_dir {self.sync_dir} has fallen behind by {len(missing)} checkpoints: its newest is "
                          f"{newest}, not copied: {', '.join(map(checkpoint_name, missing))} ({self.errors[-1]}). "
                          f"Training goes on; the newest checkpoints in {self.run_dir} are complete", RuntimeWarning,
                          stacklevel=2)

    def _report(self, item: str, err: Exception, retry: bool = True) -> None:
        message = f"sync of {item} to {self.sync_dir} failed: {type(err).__name__}: {err}; " + \
            (f"retrying in {self.retry_seconds:.0f} s (training goes on)" if retry else "mirroring stopped")
        self.errors.append(message)
        warnings.warn(message, RuntimeWarning, stacklevel=2)
        try:
            with open(self.run_dir / "sync_errors.log", "a") as f:
                f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {message}\n")
        except OSError:
            pass

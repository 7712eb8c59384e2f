"""Mirror a run to a second folder (Google Drive on Colab) in a background thread.

Training writes to the local `run_dir`; `Mirror` copies each complete checkpoint, `log.csv` and the
final weights to `sync_dir` without stalling the loop. Every copy goes to a temporary name and is
renamed when complete (checkpoint markers are copied last), so the last good copy is never damaged.
A failing target (Drive's "Transport endpoint is not connected", a full or read-only disk) is reported
as a warning and a line in `run_dir/sync_errors.log`, and retried later; training goes on.
"""

from __future__ import annotations

import shutil
import threading
import time
import warnings
from pathlib import Path

from accelerate import Accelerator

from sdnb.data.files import copy_file_atomic, copy_tree_atomic
from sdnb.train.checkpoint import checkpoint_name, find_latest, has_run, is_complete, list_checkpoints, \
    marker_id, set_aside_newer, step_of


def fetch_checkpoint(path: str | Path, run_dir: str | Path) -> Path:
    """Copy a (mirrored) checkpoint into run_dir/checkpoints unless it is there already; returns the local path."""
    path = Path(path)
    local = Path(run_dir) / "checkpoints" / checkpoint_name(step_of(path))
    if path.resolve() == local.resolve() or (is_complete(local) and marker_id(local) == marker_id(path)):
        return local
    local.parent.mkdir(parents=True, exist_ok=True)
    copy_tree_atomic(path, local)
    return local


class Mirror:
    """Background copier from run_dir to sync_dir. `request()` marks what changed; `close()` waits (bounded)."""

    ITEMS = ("checkpoints", "log", "final")

    def __init__(self, run_dir: str | Path, sync_dir: str | Path, keep: int = 2, retry_seconds: float = 30.0):
        self.run_dir, self.sync_dir = Path(run_dir), Path(sync_dir)
        self.keep, self.retry_seconds = keep, retry_seconds
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
        try:
            self.sync_dir.mkdir(parents=True, exist_ok=True)
            getattr(self, f"_sync_{item}")()
            return True
        except Exception as err:  # never let the thread die: report and retry later
            self._report(item, err)
            return False
        finally:
            self._busy = set()

    def _sync_log(self) -> None:
        for name in ("log.csv", "config.json"):
            if (self.run_dir / name).exists():
                copy_file_atomic(self.run_dir / name, self.sync_dir / name)

    def _sync_final(self) -> None:
        if (self.run_dir / "final").is_dir():
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
            copy_tree_atomic(path, remote_root / path.name)
        for old in list_checkpoints(self.sync_dir)[:-self.keep]:
            shutil.rmtree(old, ignore_errors=True)

    def _report(self, item: str, err: Exception) -> None:
        message = f"sync of {item} to {self.sync_dir} failed: {type(err).__name__}: {err}; " \
                  f"retrying in {self.retry_seconds:.0f} s (training goes on)"
        self.errors.append(message)
        warnings.warn(message, RuntimeWarning, stacklevel=2)
        try:
            with open(self.run_dir / "sync_errors.log", "a") as f:
                f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {message}\n")
        except OSError:
            pass



def resolve_resume(accelerator: Accelerator, resume: str, run_dir: str | Path, sync_dir: str = "") -> Path | None:
    """The local checkpoint a run continues from, or None for a fresh run (call on every process).

    resume="" refuses a run_dir or sync_dir that already holds a run; "latest" takes the newest complete
    checkpoint in either folder (copied back from sync_dir after a Colab reset, with its log.csv); a path
    names one. Checkpoints newer than the chosen one are renamed `abandoned-...` (a new timeline starts).
    """
    run_dir = Path(run_dir)
    if not resume:
        found = has_run(run_dir) + (has_run(sync_dir) if sync_dir else [])
        if found:
            raise FileExistsError(f"run_dir={str(run_dir)!r} (or its sync_dir) already holds a run ({found[0]}): "
                                  "set resume='latest' to continue it, or choose a new run_dir")
        return None
    path = find_latest(run_dir, sync_dir) if resume == "latest" else Path(resume)
    if path is None:
        print(f"resume='latest': no complete checkpoint in {run_dir}{' or ' + sync_dir if sync_dir else ''}; "
              "starting a fresh run", flush=True)
        return None
    if not is_complete(path):
        raise FileNotFoundError(f"resume={resume!r} is not a complete checkpoint folder (step-NNNNNN with a "
                                "completion marker); resume='latest' picks the newest complete one")
    step = step_of(path)
    if accelerator.is_main_process:
        fetch_checkpoint(path, run_dir)  # after a Colab reset only the Drive copy is left
        if sync_dir and not (run_dir / "log.csv").exists() and (Path(sync_dir) / "log.csv").exists():
            copy_file_atomic(Path(sync_dir) / "log.csv", run_dir / "log.csv")
        for root in [run_dir] + ([Path(sync_dir)] if sync_dir else []):
            try:
                set_aside_newer(root, step)
            except OSError as err:
                print(f"could not set aside checkpoints newer than step {step} in {root}: {err}", flush=True)
    accelerator.wait_for_everyone()
    print(f"resuming from {path} (step {step})", flush=True)
    return run_dir / "checkpoints" / checkpoint_name(step)

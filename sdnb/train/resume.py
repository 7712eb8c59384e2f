"""Where a run starts (main process only): a fresh run only in folders that hold no earlier run, else the newest
checkpoint that verifies, trained with settings this run may continue.

- resume="": refused when run_dir or sync_dir already holds a run (log.csv, final/, checkpoint folders).
- resume="latest": the newest checkpoint of run_dir or sync_dir whose files match its manifest
  (`sdnb.train.manifest`); damaged ones are skipped, each named with its problem. A fresh run starts only when
  neither folder holds an earlier run at all; a folder that cannot be listed, or an earlier run without a checkpoint
  to continue, is an error, never "nothing found" (that would truncate log.csv and overwrite the Drive copies).
- resume=<folder>: that checkpoint, refused with its problems when it does not verify.
The checkpoint's saved config is compared with this run's (`sdnb.train.resume_check`) before anything is changed:
refused fields are named with both values; allowed changes are printed and recorded in run_dir/history.log.
Only then is the checkpoint copied back from sync_dir, newer checkpoints set aside (`abandoned-step-...`, kept) and
run_dir/config.json written (a config cell writes config.pending.json while config.json holds an earlier run's).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from sdnb.data.files import copy_file_atomic, copy_tree_atomic
from sdnb.train.checkpoint import checkpoint_folders, checkpoint_name, checkpoint_problems, has_run, marker_id, \
    read_state, set_aside, set_aside_newer, step_of
from sdnb.train.config import PENDING
from sdnb.train.lock import RunLock
from sdnb.train.resume_check import ConfigChanges, compare_configs

HISTORY = "history.log"


class ResumeError(RuntimeError):
    """The run cannot start or continue as asked; nothing in run_dir or sync_dir was changed."""


def record(run_dir: str | Path, message: str) -> None:
    """Print a line and append it, with the time, to run_dir/history.log (starts, resumes, skipped checkpoints)."""
    print(message, flush=True)
    with open(Path(run_dir) / HISTORY, "a") as f:
        f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {message}\n")


def _roots(run_dir: Path, sync_dir: str) -> list[tuple[str, Path]]:
    return [("run_dir", run_dir)] + ([("sync_dir", Path(sync_dir))] if sync_dir else [])


def _look(what: str, root: Path, look: Any) -> list[Path]:
    """`look(root)`, with an error that names the folder and says why guessing "nothing there" would be wrong."""
    try:
        return look(root)
    except OSError as err:
        raise ResumeError(f"cannot look into {what} {root} ({type(err).__name__}: {err}): it may hold an earlier run, "
                          "so neither a fresh start nor a resume is safe; nothing was changed. Fix access to it (on "
                          "Google Drive: drive.mount(..., force_remount=True)) and run again") from err


def earlier_run(run_dir: Path, sync_dir: str) -> list[Path]:
    """Everything in run_dir or sync_dir that shows an earlier run (log.csv, final/, checkpoint folders)."""
    return [p for what, root in _roots(run_dir, sync_dir) for p in _look(what, root, has_run)]


def newest_verified(run_dir: Path, sync_dir: str) -> tuple[Path | None, list[str]]:
    """The newest checkpoint that verifies in run_dir or sync_dir (run_dir's at equal steps), and a line for each
    newer one skipped: "<folder>: <problem>; <problem>"."""
    found = [p for what, root in _roots(run_dir, sync_dir) for p in _look(what, root, checkpoint_folders)]
    skipped = []
    for path in sorted(found, key=step_of, reverse=True):  # a stable sort: run_dir's copy first at equal steps
        problems = checkpoint_problems(path)
        if not problems:
            return path, skipped
        skipped.append(f"{path}: {'; '.join(problems)}")
    return None, skipped


def choose_checkpoint(resume: str, run_dir: Path, sync_dir: str) -> tuple[Path | None, list[str]]:
    """The checkpoint a run continues from (None: a fresh run) and the checkpoints skipped on the way."""
    where = f"run_dir={str(run_dir)!r}" + (f" and sync_dir={sync_dir!r}" if sync_dir else "")
    if not resume:
        found = earlier_run(run_dir, sync_dir)
        if found:
            raise FileExistsError(f"run_dir={str(run_dir)!r} (or its sync_dir) already holds a run ({found[0]}): set "
                                  "resume='latest' to continue it, or choose a new run_dir")
        return None, []
    if resume != "latest":
        problems = checkpoint_problems(resume)
        if problems:
            raise ResumeError(f"resume={resume!r} cannot be resumed: {'; '.join(problems)}. resume='latest' picks the "
                              "newest checkpoint that verifies")
        return Path(resume), []
    path, skipped = newest_verified(run_dir, sync_dir)
    if path is None:
        found = earlier_run(run_dir, sync_dir)
        if found:
            damaged = "".join(f"\n  {line}" for line in skipped) or " (no checkpoint folder: were checkpoints off?)"
            raise ResumeError(f"resume='latest': {where} {'hold' if sync_dir else 'holds'} an earlier run "
                              f"({', '.join(p.name for p in found[:4])}) but no checkpoint that can be resumed:"
                              f"{damaged}\nNothing was changed. Restore a checkpoint, or start over in a new run_dir "
                              "(resume='')")
        print(f"resume='latest': no earlier run in {where}: starting a fresh run", flush=True)
    return path, skipped


def check_config(path: Path, config: dict[str, Any]) -> ConfigChanges:
    """Compare this run's config with the checkpoint's; raise ConfigChangeError naming each refused field."""
    changes = compare_configs(read_state(path).get("config", {}), config)
    changes.raise_if_refused(str(path))
    return changes


def adopt(path: Path, run_dir: Path, sync_dir: str) -> Path:
    """Make `path` run_dir's newest checkpoint: copy it back from sync_dir (a damaged local copy of the same step is
    set aside, not deleted), bring back log.csv, set newer checkpoints aside in both folders. Returns the local copy."""
    local = run_dir / "checkpoints" / checkpoint_name(step_of(path))
    if path.resolve() != local.resolve() and not (marker_id(local) == marker_id(path) and
                                                  not checkpoint_problems(local)):
        if local.exists():
            print(f"set aside {set_aside(local, 'damaged')}: the copy in sync_dir verifies", flush=True)
        local.parent.mkdir(parents=True, exist_ok=True)
        copy_tree_atomic(path, local)  # after a Colab reset only the Drive copy is left
    if sync_dir and not (run_dir / "log.csv").exists() and (Path(sync_dir) / "log.csv").exists():
        copy_file_atomic(Path(sync_dir) / "log.csv", run_dir / "log.csv")
    for what, root in _roots(run_dir, sync_dir):
        for moved in _look(what, root, lambda r: set_aside_newer(r, step_of(path))):
            print(f"set aside {moved} (newer than the checkpoint resumed)", flush=True)
    return local


def save_config(run_dir: Path, config: dict[str, Any]) -> None:
    """Write the accepted config as run_dir/config.json (a stage's config only) and drop config.pending.json."""
    if "stage" not in config:
        return
    tmp = run_dir / ".config.json.tmp"
    tmp.write_text(json.dumps(config, indent=2))
    os.replace(tmp, run_dir / "config.json")
    (run_dir / PENDING).unlink(missing_ok=True)


def start(resume: str, run_dir: Path, sync_dir: str, config: dict[str, Any]) -> Path | None:
    """Choose, check and adopt the checkpoint a run starts from (None: fresh); record it. Main process only."""
    path, skipped = choose_checkpoint(resume, run_dir, sync_dir)
    changes = check_config(path, config) if path is not None else None
    for line in skipped:
        record(run_dir, f"resume='latest': skipped checkpoint {line}")
    save_config(run_dir, config)
    if path is None:
        record(run_dir, "started a fresh run")
        return None
    local = adopt(path, run_dir, sync_dir)
    record(run_dir, f"resuming from {path} (step {step_of(path)}); {changes.summary()}")
    return local


def lock_run(run_dir: Path, sync_dir: str) -> list[RunLock]:
    """Take this run's locks of run_dir and sync_dir (host, pid, start time; a stale one is taken over with a
    message); raise RunLockError naming the holder when another live process has either."""
    locks: list[RunLock] = []
    try:
        for what, root in _roots(run_dir, sync_dir):
            locks.append(RunLock(root, what).acquire())
    except BaseException:
        for lock in locks:
            lock.release()
        raise
    return locks

"""Walking a folder of images without ever stopping or hanging: every entry left out gets a reason.

A scan meets what users' folders hold: a symbolic link looping back to a parent, a dangling link, a FIFO or a
device named ``*.png`` (opening a FIFO blocks until someone writes to it), a subfolder that cannot be read. Entries
are examined with ``stat`` only (never opened), folders are entered once each (by their real path), and each entry
left out is returned with its reason, for ``skipped.csv``.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path


def not_a_file(path: Path) -> str:
    """Why an image-named entry cannot be read as a file ('' when it can): a dangling link, a link loop, a FIFO..."""
    try:
        mode = path.stat().st_mode  # follows symbolic links
    except FileNotFoundError:
        try:
            return f"dangling symbolic link (to {os.readlink(path)}, which does not exist)"
        except OSError:
            return "vanished while scanning"
    except OSError as e:
        return "symbolic link loop" if e.errno == errno.ELOOP else f"unreadable ({type(e).__name__}: {e.strerror})"
    if stat.S_ISREG(mode):
        return ""
    kind = "FIFO" if stat.S_ISFIFO(mode) else "socket" if stat.S_ISSOCK(mode) else "device or special file"
    return f"not a regular file (a {kind}): not opened"


def walk_files(folder: Path, extensions: tuple[str, ...], ignored_dirs: set[str] | frozenset = frozenset()
               ) -> tuple[list[Path], list[tuple[str, str]]]:
    """Files under ``folder`` whose names end with ``extensions`` (depth first, sorted; symbolic links followed once),
    without hidden files or ``ignored_dirs``; and (relative path, reason) for each entry left out: unreadable folders, link loops,
    dangling links, FIFOs and devices. One bad entry never stops the walk, and nothing is opened that could block."""
    found, skipped, seen, stack = [], [], set(), [folder]
    while stack:
        here = stack.pop()
        rel = here.relative_to(folder).as_posix() + "/"
        real = os.path.realpath(here)
        if real in seen:
            skipped.append((rel, f"symbolic link loop (or a second link): leads to {real}, already scanned"))
            continue
        seen.add(real)
        try:
            with os.scandir(here) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as e:
            skipped.append((rel, f"unreadable folder ({type(e).__name__}: {e.strerror or e}): its images are left out"))
            continue
        subdirs = []
        for entry in entries:
            if entry.name.startswith(".") or entry.name in ignored_dirs:
                continue
            try:
                is_dir = entry.is_dir()  # follows links; False for a dangling or looping one
            except OSError:
                is_dir = False
            if is_dir:
                subdirs.append(Path(entry.path))
            elif entry.name.lower().endswith(extensions):
                reason = not_a_file(Path(entry.path))
                if reason:
                    skipped.append((Path(entry.path).relative_to(folder).as_posix(), reason))
                else:
                    found.append(Path(entry.path))
        stack.extend(reversed(subdirs))
    return found, skipped

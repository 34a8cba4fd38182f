"""Content-addressed entries on disk, shared by concurrent processes: the mechanics of kdlab's stores.

The teacher store (kdlab.teachers) and the teacher-output cache (kdlab.teacher_cache) both keep
things that are expensive to make under a directory named by a hash of everything that determines
them (`content_key`). Both need the same guarantees, which live here once:
- one process builds an entry while the others wait on its file lock, and the log says what
  they are waiting for (`build_once`);
- a file is written under a temporary name and renamed (`save_atomic`), so a process killed
  mid-write leaves nothing that a later run would take for a finished entry;
- a build that fails leaves no entry behind, so nothing half-made is ever served.

This module imports nothing from kdlab, so any module may use it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

log = logging.getLogger(__name__)


def content_key(spec: dict[str, Any]) -> str:
    """A short hash of `spec` (plain data): equal specs give equal keys, in any key order."""
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def save_atomic(write: Callable[[Path], None], path: Path) -> None:
    """Write through a temporary file and rename it, so `path` is whole or absent."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def build_once(entry: Path, marker: str, build: Callable[[Path], None], what: str) -> bool:
    """Make sure `entry/marker` exists, calling `build(entry)` if it does not; True if this call built it.

    `build` must write `marker` last (with `save_atomic`): its presence is what marks the entry
    complete. Processes asking for the same entry wait on a file lock while one builds; `what`
    says in the log what they wait for. Leftovers of a killed build are removed before building,
    and a build that raises leaves no entry directory behind.
    """
    entry.mkdir(parents=True, exist_ok=True)
    lock = FileLock(f"{entry}.lock")
    try:
        lock.acquire(timeout=0)
    except Timeout:
        log.info("Waiting for another process that is %s (lock: %s)", what, lock.lock_file)
        lock.acquire()
    try:
        if (entry / marker).exists():
            return False
        for leftover in entry.glob(".*.tmp"):  # from a process killed while writing
            leftover.unlink()
        try:
            build(entry)
        except BaseException:
            shutil.rmtree(entry, ignore_errors=True)  # incomplete (no marker), and we hold its lock
            raise
        return True
    finally:
        lock.release()

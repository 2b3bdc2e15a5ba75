"""One writer per run folder: `RUN_DIR/.lock`, held for a writing command's whole life.

The lock is an OS lock (`fcntl.flock`) on an open file, so it goes away with the process
that holds it, however that process ends (kill -9 included): there is never a stale lock to
remove by hand. The holder writes who it is into the file (pid, host, command line, start
time), which is what a refused second writer is told. Reading a run folder (`status`,
`report`, `verify`) takes no lock.

A process takes the lock once; nested takes in the same process (`run` -> `run_round`) and
the processes a stage starts (workers, launchers: they never call the API) run under it.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

LOCK = ".lock"

_held: dict[str, list] = {}  # resolved run folder -> [open file, depth], this process's locks


class RunLocked(RuntimeError):
    """Another process is writing the run folder."""


def holder(run_dir: str | os.PathLike) -> dict | None:
    """Who holds the lock of `run_dir` (as the holder wrote it), or None when nobody does."""
    path = Path(run_dir) / LOCK
    if not path.is_file():
        return None
    with open(path, "rb") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _read_holder(path)
        fcntl.flock(f, fcntl.LOCK_UN)
    return None


def _read_holder(path: Path) -> dict:
    # The holder writes its details right after it takes the lock: a reader that comes in
    # between sees an empty file for a moment.
    for _ in range(20):
        with contextlib.suppress(OSError, ValueError):
            info = json.loads(path.read_text(encoding="utf-8"))
            if isinstance(info, dict):
                return info
        time.sleep(0.05)
    return {}


def describe(info: dict) -> str:
    started = info.get("started")
    when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(started)) if isinstance(started, (int, float)) else "?"
    return (f"pid {info.get('pid', '?')} on {info.get('host', '?')}, started {when}: "
            f"{info.get('command', '?')}")


@contextlib.contextmanager
def run_lock(run_dir: str | os.PathLike) -> Iterator[None]:
    """Hold `run_dir`'s lock for the block, or raise RunLocked at once naming the holder."""
    run_dir = Path(run_dir)
    created = not run_dir.exists()
    run_dir.mkdir(parents=True, exist_ok=True)
    key = str(run_dir.resolve())
    if key in _held:
        _held[key][1] += 1
        try:
            yield
        finally:
            _held[key][1] -= 1
        return
    path = run_dir / LOCK
    f = _take(path)
    try:
        f.truncate(0)
        f.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                            "command": " ".join(sys.argv), "started": time.time()}).encode() + b"\n")
        f.flush()
        _held[key] = [f, 1]
        yield
    finally:
        _held.pop(key, None)
        with contextlib.suppress(OSError):
            if created and [p.name for p in run_dir.iterdir()] == [LOCK]:
                path.unlink()  # a command refused before any work leaves no run folder behind
                run_dir.rmdir()
            else:
                f.truncate(0)
        f.close()


def _take(path: Path):
    """The open, exclusively locked lock file at `path`; RunLocked if another process holds it."""
    while True:
        f = open(path, "a+b")  # noqa: SIM115 - held open for the block: the lock lives with the file
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.close()
            raise RunLocked(f"{path.parent} is being written by another posttrain ({describe(_read_holder(path))}). "
                            f"One run folder has one writer: wait for it to finish or stop it (its lock, {path}, "
                            f"goes with the process), or use another --run-dir.") from None
        try:
            same = os.fstat(f.fileno()).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return f
        f.close()  # the file was removed by a holder that just finished: lock the one now there

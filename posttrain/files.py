"""Atomic writes, JSONL, and content hashes.

Everything posttrain writes goes through these helpers: a file or folder appears under
its final name only once it is complete, so a run killed at any moment leaves either the
old state or the new one, never half of each.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import stat
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def current_umask() -> int:
    """The process's umask, read without changing it where the OS allows (Linux)."""
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    mask = os.umask(0o022)  # elsewhere: set and restore (not thread-safe, hence the fallback only)
    os.umask(mask)
    return mask


def _permissions_of_new(kind: str) -> int:
    """Mode a plain open() / mkdir() would give a new file / folder: 0666 / 0777 minus the umask.
    tempfile creates 0600 / 0700, which would keep a run's outputs from the rest of a team."""
    return (0o666 if kind == "file" else 0o777) & ~current_umask()


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` through a temporary file in the same folder and a rename.
    The file ends with the permissions the umask gives new files."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, _permissions_of_new("file"))
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def write_jsonl(path: str | os.PathLike, rows: Iterable[dict]) -> int:
    """Write rows as JSON lines, atomically. Returns the number of rows written."""
    lines = [json.dumps(row, ensure_ascii=False) for row in rows]
    atomic_write_text(path, "".join(line + "\n" for line in lines))
    return len(lines)


def read_json(path: str | os.PathLike) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def iter_jsonl(path: str | os.PathLike) -> Iterator[dict]:
    """Rows of a JSONL file we wrote ourselves (user data goes through posttrain.data)."""
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield json.loads(line)


def _apply_umask(folder: Path) -> None:
    """Give `folder` and everything under it the modes a plain mkdir() / open() would
    (executable files stay executable)."""
    dir_mode, file_mode = _permissions_of_new("dir"), _permissions_of_new("file")
    os.chmod(folder, dir_mode)
    for root, dirs, names in os.walk(folder):
        for d in dirs:
            if not os.path.islink(os.path.join(root, d)):
                os.chmod(os.path.join(root, d), dir_mode)
        for n in names:
            p = os.path.join(root, n)
            if os.path.islink(p):
                continue
            executable = os.stat(p).st_mode & stat.S_IXUSR
            os.chmod(p, dir_mode if executable else file_mode)


@contextlib.contextmanager
def atomic_dir(final: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder beside `final`; rename it to `final` when the block succeeds.

    An existing `final` is replaced only after the new content is complete. A failed block
    removes the temporary folder and leaves `final` untouched. The folder and everything in
    it end with the permissions the umask gives new files and folders: safetensors writes
    its weights 0600, which would keep a checkpoint from the rest of a team.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    try:
        yield tmp
        _apply_umask(tmp)
        if final.exists():
            old = final.with_name(f".{final.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        _fsync_dir(final.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def link_tree(src: str | os.PathLike, final: str | os.PathLike) -> None:
    """`final` as a copy of the folder `src` made of hard links (no bytes copied; a plain copy
    where links are impossible, e.g. across file systems), written atomically."""

    def link(a, b):
        try:
            os.link(a, b)
        except OSError:
            shutil.copy2(a, b)

    with atomic_dir(final) as tmp:
        shutil.copytree(src, tmp, copy_function=link, dirs_exist_ok=True)


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def cache_root() -> Path:
    """posttrain's per-machine cache folder: $POSTTRAIN_CACHE, else ~/.cache/posttrain (or
    $XDG_CACHE_HOME/posttrain). The hash cache, the embedded world and the CPU's measured
    matmul peak (posttrain.throughput) live there."""
    root = os.environ.get("POSTTRAIN_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "posttrain"
    )
    return Path(root)


def _hash_cache_path() -> Path:
    return cache_root() / "hashes.json"


def content_files(path: str | os.PathLike) -> list[Path]:
    """The files whose bytes make up `path`'s content: `path` itself, or every file under the
    folder, sorted, but for temporary and hidden ones (any part of the name starting with '.')."""
    path = Path(path)
    if path.is_file():
        return [path]
    return sorted(q for q in path.rglob("*") if q.is_file()
                  and not any(part.startswith(".") for part in q.relative_to(path).parts))


def hash_path(path: str | os.PathLike) -> str:
    """Content hash of a file or a folder (every file under it, by relative name and bytes).

    Hashes of large files are remembered by (size, mtime) in a small cache, so re-checking
    a multi-GB checkpoint that did not change costs a stat, not a read.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"cannot hash {path}: it does not exist")
    cache_file = _hash_cache_path()
    try:
        cache = read_json(cache_file)
    except (FileNotFoundError, json.JSONDecodeError):
        cache = {}
    changed = False

    def file_hash(p: Path) -> str:
        nonlocal changed
        st = p.stat()
        key = str(p.resolve())
        stamp = [st.st_size, st.st_mtime_ns]
        hit = cache.get(key)
        if hit and hit[0] == stamp:
            return hit[1]
        digest = sha256_file(p)
        if st.st_size >= (1 << 20):
            cache[key] = [stamp, digest]
            changed = True
        return digest

    if path.is_file():
        digest = file_hash(path)
    else:
        h = hashlib.sha256()
        for p in content_files(path):
            h.update(p.relative_to(path).as_posix().encode() + b"\0" + file_hash(p).encode() + b"\n")
        digest = h.hexdigest()
    if changed:
        with contextlib.suppress(OSError):
            atomic_write_json(cache_file, cache)
    return digest


def hash_json(obj: Any) -> str:
    """Stable hash of a JSON-able value (keys sorted)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()

"""The sandbox, parent side: limits, the interpreter, and one long-lived slot per worker.

A `Slot` starts, once, a root process inside fresh network/mount/IPC/UTS namespaces and a
chroot holding only read-only `/usr`, the interpreter's prefix and `/dev/null` (the mount
script below, run by `unshare` as root). Each sample is then one message on the slot's
control socket, carrying the sample's pipes as file descriptors; the slot forks the
sample's own namespaces and processes (`inside.py`) and nothing else is started. The parent
reads only the report pipe, which no process that runs program code holds.
"""

from __future__ import annotations

import functools
import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from posttrain.reward import _plain
from posttrain.reward.base import RewardInfraError


@dataclass(frozen=True)
class Limits:
    wall_s: float = 10.0          # one sample: its processes, the program, all its tests
    test_s: float = 3.0           # one test (one stdin case), and loading the program
    cpu_s: int = 10               # RLIMIT_CPU, one process
    memory_mb: int = 1024         # RLIMIT_AS
    max_procs: int = 32           # RLIMIT_NPROC (per uid: each slot has its own two uids)
    file_mb: int = 16             # RLIMIT_FSIZE, one file
    work_mb: int = 64             # size of each of the /work and /judge tmpfs
    max_output_bytes: int = 64 * 1024   # program output kept for audit; one stdin case's stdout
    max_report_bytes: int = 4 << 20


@dataclass(frozen=True)
class Interpreter:
    executable: str          # real path of the python binary
    mounts: tuple[str, ...]  # folders (outside /usr) that must be visible in the chroot


def find_interpreter(python: str | None = None) -> Interpreter:
    """The interpreter for sandboxed programs (default: the one running posttrain) and the
    folders it needs. It runs with `-I -S`: no site-packages, so only the stdlib is there."""
    exe = os.path.realpath(python or sys.executable)
    if python is None:
        prefixes = {os.path.realpath(sys.base_prefix), os.path.realpath(sys.base_exec_prefix)}
    else:
        out = subprocess.run([exe, "-I", "-S", "-c", "import sys; print(sys.base_prefix); print(sys.base_exec_prefix)"],
                             capture_output=True, text=True, timeout=30, check=True)
        prefixes = {os.path.realpath(p) for p in out.stdout.split()}
    prefixes.add(os.path.dirname(os.path.dirname(exe)))
    mounts = tuple(sorted(p for p in prefixes if not (p == "/usr" or p.startswith("/usr/"))))
    return Interpreter(exe, mounts)


# Runs inside the slot's new namespaces as root: builds the chroot, then execs the slot's root
# process in it. Per sample, that process mounts fresh /work and /judge (see inside.py).
_NAMESPACE_SCRIPT = r'''
set -eu
R="$1"; shift
mount -t tmpfs -o size=8m,mode=755 sandbox-root "$R"
mkdir -p "$R/usr" "$R/work" "$R/judge" "$R/dev" "$R/tmp"
mount --rbind /usr "$R/usr"
mount -o remount,bind,ro "$R/usr"
for d in bin sbin lib lib32 lib64 libx32; do
  if [ -L "/$d" ]; then ln -s "$(readlink "/$d")" "$R/$d"
  elif [ -d "/$d" ]; then mkdir -p "$R/$d"; mount --rbind "/$d" "$R/$d"; mount -o remount,bind,ro "$R/$d"
  fi
done
while [ "$1" != "--" ]; do
  mkdir -p "$R$1"; mount --rbind "$1" "$R$1"; mount -o remount,bind,ro "$R$1"; shift
done
shift
touch "$R/dev/null"; mount --bind /dev/null "$R/dev/null"
exec chroot "$R" "$@"
'''

_SANDBOX_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8", "PYTHONIOENCODING": "utf-8",
                "PYTHONDONTWRITEBYTECODE": "1", "HOME": "/work"}


@functools.lru_cache(maxsize=1)
def _inside_source() -> str:
    return (Path(__file__).parent / "inside.py").read_text(encoding="utf-8")


@functools.lru_cache(maxsize=1)
def _codec_source() -> str:
    return Path(_plain.__file__).read_text(encoding="utf-8")


@dataclass
class Raw:
    """What came out of one sample's sandbox: the report lines and the program's output."""
    report: list[dict]
    output: str
    timed_out: bool    # the sample's wall-clock limit ran out


# A real sample, run by every slot as it starts: the program binds x, the judge checks it.
_PROBE_JUDGE = {"setup": "", "tests": ["assert x + 1 == 42"], "names": ["x"], "modules": [], "compare_function": "_"}


class Slot:
    """One worker's sandbox: its root process, and the two uids its samples run as."""

    def __init__(self, interp: Interpreter, limits: Limits, prog_uid: int, judge_uid: int):
        self.interp, self.limits, self.uids = interp, limits, (prog_uid, judge_uid)
        self.proc: subprocess.Popen | None = None
        self.ctrl: socket.socket | None = None
        self._tmp: tempfile.TemporaryDirectory | None = None

    def start(self) -> None:
        """Start the slot's root process and probe it with a real sample; RewardInfraError
        when it cannot start or the probe fails."""
        self.close()
        if os.geteuid() != 0:
            raise RewardInfraError("CodeTestReward: the sandbox needs root (namespaces, chroot, a uid per process)")
        for tool in ("unshare", "mount", "chroot"):
            if shutil.which(tool) is None:
                raise RewardInfraError(f"CodeTestReward: the sandbox needs the util-linux tool {tool!r}")
        self._tmp = tempfile.TemporaryDirectory(prefix="posttrain-code-")
        root = os.path.join(self._tmp.name, "root")
        os.mkdir(root)
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        errors = open(os.path.join(self._tmp.name, "stderr"), "w+b")
        argv = ["unshare", "--net", "--mount", "--ipc", "--uts", "--pid", "--kill-child", "--propagation", "private",
                "sh", "-c", _NAMESPACE_SCRIPT, "sandbox", root, *self.interp.mounts, "--",
                self.interp.executable, "-I", "-S", "-B", "-c", _inside_source(), str(theirs.fileno()), _codec_source()]
        try:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=errors, stderr=errors,
                                         pass_fds=(theirs.fileno(),), cwd=self._tmp.name, env=_SANDBOX_ENV,
                                         start_new_session=True)
        except OSError as e:
            raise RewardInfraError(f"CodeTestReward: cannot start the sandbox: {e}") from e
        finally:
            theirs.close()
        self.ctrl = ours
        ready = select.select([ours], [], [], 30.0)[0]
        if not ready or ours.recv(16) != b"ready":
            errors.seek(0)
            why = errors.read()[-2000:].decode("utf-8", "replace").strip()
            errors.close()
            self.close()
            raise RewardInfraError(f"CodeTestReward: the sandbox did not start: {why or 'no answer'}")
        errors.close()
        try:
            raw = self._run("calls", [{"program": "x = 41\n"}, _PROBE_JUDGE])
        except _SlotBroken as e:
            raw = Raw([], str(e), False)
        if not any(e.get("t") == 0 and e.get("ok") is True for e in raw.report):
            self.close()
            raise RewardInfraError(f"CodeTestReward: the sandbox probe failed: {raw.report} {raw.output[-500:]}")

    def close(self) -> None:
        if self.ctrl is not None:
            self.ctrl.close()
            self.ctrl = None
        if self.proc is not None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait()
            self.proc = None
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def run(self, mode: str, jobs: list[dict]) -> Raw:
        """One sample in fresh namespaces: `mode` "calls" (jobs: the program's, the judge's) or
        "stdio" (jobs: the init's: program and inputs). Retries once on a fresh slot when the
        slot itself fails; RewardInfraError when that fails too."""
        for attempt in (0, 1):
            if self.ctrl is None:
                self.start()
            try:
                return self._run(mode, jobs)
            except _SlotBroken as e:
                self.close()
                if attempt:
                    raise RewardInfraError(f"CodeTestReward: the sandbox failed twice: {e}") from e
        raise AssertionError("unreachable")

    def _run(self, mode: str, jobs: list[dict]) -> Raw:
        lim = self.limits
        rep_r, rep_w = os.pipe()
        out_r, out_w = os.pipe()
        job_pipes = [os.pipe() for _ in jobs]
        theirs = [rep_w, out_w, *(r for r, _ in job_pipes)]
        msg = json.dumps({"mode": mode, "uids": list(self.uids), "limits": asdict(lim)}).encode()
        try:
            socket.send_fds(self.ctrl, [msg], theirs)
        except OSError as e:
            for fd in [rep_r, out_r, *theirs, *(w for _, w in job_pipes)]:
                os.close(fd)
            raise _SlotBroken(f"control socket: {e}") from e
        for fd in theirs:
            os.close(fd)
        writers = [threading.Thread(target=_feed, args=(w, json.dumps(job).encode("utf-8")), daemon=True)
                   for (_, w), job in zip(job_pipes, jobs)]
        for t in writers:
            t.start()
        start = time.monotonic()
        try:
            report, output, finished = _drain({rep_r: lim.max_report_bytes, out_r: lim.max_output_bytes},
                                              start + lim.wall_s + 5.0, report_fd=rep_r)
        finally:
            os.close(rep_r)
            os.close(out_r)
        if not finished:  # the slot's supervisor kills a sample at wall_s; past that, the slot is broken
            raise _SlotBroken("a sample outlived its wall-clock limit")
        if self.proc is not None and self.proc.poll() is not None:
            raise _SlotBroken(f"the slot's root process exited ({self.proc.returncode})")
        timed_out = time.monotonic() - start >= lim.wall_s
        return Raw(_report_lines(report), output.decode("utf-8", "replace"), timed_out)


class _SlotBroken(Exception):
    pass


def _feed(fd: int, payload: bytes) -> None:
    try:
        view = memoryview(payload)
        while view:
            view = view[os.write(fd, view):]
    except OSError:
        pass  # the reader died before reading its job: it reports nothing, so every test fails
    finally:
        os.close(fd)


def _drain(caps: dict[int, int], deadline: float, report_fd: int) -> tuple[bytes, bytes, bool]:
    """Read each fd until EOF (beyond its cap, bytes are read and dropped so no writer blocks);
    False when the deadline came first."""
    bufs = {fd: bytearray() for fd in caps}
    open_fds = set(caps)
    while open_fds:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        for fd in select.select(list(open_fds), [], [], left)[0]:
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                open_fds.discard(fd)
                continue
            room = caps[fd] - len(bufs[fd])
            if room > 0:
                bufs[fd] += chunk[:room]
    output = next(bytes(b) for fd, b in bufs.items() if fd != report_fd)
    return bytes(bufs[report_fd]), output, not open_fds


def _report_lines(report: bytes) -> list[dict]:
    entries = []
    for line in report.split(b"\n"):
        try:
            entry = json.loads(line)
        except (ValueError, RecursionError):
            continue
        if isinstance(entry, dict):
            entries.append(entry)
    return entries

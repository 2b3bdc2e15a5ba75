"""Execution-checked reward for code: run the prompt's unit tests against the response's code.

Score = (tests passed) / (tests), in [0, 1]; `None` (abstain) when the prompt has no tests.
A crash, a hang, a fork bomb, a flood of output or a hostile program fails only its own
sample: every sample runs in its own sandboxed process with hard limits, and nothing it
does can raise an exception in the caller.

Where the tests come from (shared with `posttrain.reward.math`)
----------------------------------------------------------------
The reward protocol passes only (prompt messages, response). The reference data lives in
the prompt rows (`posttrain.data.Prompt.meta`: `tests` for code, `answer` for math), so a
checking reward offers two doors, and both end in the same `score_with_meta`:

* `score_with_meta(prompts, responses, metas)`: `metas[i]` is prompt i's meta dict. The
  `sample` stage calls this when the reward has it (`hasattr(reward, "score_with_meta")`),
  because it already holds the `Prompt` rows. No file lookup, no ambiguity.
* `score(prompts, responses)`: the plain protocol. The reward must have been built with
  `prompts_file=` (a JSONL of prompt rows: `prompt` as text or messages, plus `tests` /
  `answer`); each scored prompt is matched to its row by `prompt_key` (a hash of the
  non-system messages, so a capability system prompt added during sampling does not break
  the match). A prompt not in the file gets `None` (abstain). Without `prompts_file`,
  `score` raises: silently abstaining on everything would look like a working reward.

`tests` is a list of test snippets (usually `assert` statements; each item is one test)
or one source string, split into one test per top-level `assert`, every other top-level
statement (imports, helpers) being shared setup that runs before the tests.

What the code is
----------------
The last ```python (or ```py / ```python3) fenced block of the response; else the last
fenced block of any language; else the whole response. The last block because models
usually show a sketch first and the final program last.

Isolation: what is enforced, and by whom
----------------------------------------
`isolation="auto"` (the default) picks the first mode that works on this machine, checked
by running a real probe in `setup()`; it refuses to run without OS isolation unless you
ask for `isolation="process"`. `self.isolation` says which mode is in use.

* `"namespace"` (running as root; what this project's machines use) -- OS-enforced:
  - network: a fresh network namespace (`unshare --net`) with only a loopback that is down;
    every connect fails, including to ports listening on the host's 127.0.0.1;
  - files: a fresh mount namespace and `chroot` into a tmpfs root that holds only
    read-only bind mounts of `/usr` (+ the lib/bin links) and the interpreter's prefix,
    `/dev/null`, and the working folder `/work` (its own size-capped tmpfs, gone when the
    run ends). No `/etc`, `/home`, `/root`, `/tmp`, `/proc` of the host are visible;
  - identity: the program runs as an unprivileged uid (one per worker slot, from
    `uid_base`), with no capabilities and `no_new_privs`, so it can neither undo the
    chroot nor raise its limits;
  - processes: a fresh PID namespace; when the harness (its init) exits or the wall clock
    runs out, the kernel kills every process in it, including ones that called `setsid`;
  - limits (setrlimit, applied before the untrusted code runs, irreversible for a
    non-root uid): CPU seconds, address space, number of processes (per uid, which is
    why each slot gets its own uid), file size, open files, no core dumps.
* `"userns"` (not root, unprivileged user namespaces allowed): the same, with the user
  namespace's root mapped to the caller's uid; capabilities are dropped before the
  program starts. RLIMIT_NPROC then counts all of the caller's processes, so keep
  `max_procs` above what the caller itself runs. (Not exercised on root-only CI.)
* `"process"` (explicit opt-in only): a plain child process with the same rlimits, a
  throwaway temp dir and a stripped environment; network, files outside the folder,
  subprocesses and `os.fork` are blocked only by a Python audit hook, which a determined
  program can bypass (e.g. via a C extension). As root, RLIMIT_NPROC does not bind.

In every mode the wall-clock limit kills the process group and output is read up to
`max_output_bytes` (the rest is discarded, so printing forever costs nothing but time).

How a result is reported, and its limit
---------------------------------------
The harness (trusted code that runs first in the child) reports each test on a separate
pipe, tagged with a random nonce; the program's stdout is never parsed, so printing
"all tests passed" or exiting with status 0 earns nothing, and a program that exits
early simply leaves its tests unreported (failed). The program and the tests share one
interpreter (the tests must call the program's functions), so the nonce is in that
interpreter's memory; an audit hook blocks the usual ways to reach it (frame objects,
`gc` object walks, `ctypes`, `sys.settrace`). That is a strong obstacle, not a proof. A
program that returns an object whose `__eq__` always answers True passes `assert f(x) == y`
tests: write tests that check types when that matters.
"""

from __future__ import annotations

import ast
import hashlib
import json
import logging
import os
import queue
import re
import secrets
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)

Message = dict[str, Any]

ISOLATION_MODES = ("auto", "namespace", "userns", "process")

# ---------------------------------------------------------------------------------------
# References: prompt rows with tests / answers, looked up by prompt


def prompt_key(messages: Sequence[Message]) -> str:
    """A stable key for a prompt conversation, ignoring system messages (the sample stage
    may add a capability system prompt that the prompt file does not have)."""
    kept = [(str(m.get("role")), str(m.get("content"))) for m in messages if m.get("role") != "system"]
    return hashlib.sha256(json.dumps(kept, ensure_ascii=False).encode("utf-8")).hexdigest()


class ReferenceIndex:
    """Prompt rows of a JSONL file, keyed by `prompt_key`, keeping the fields a reward needs.

    A row needs `prompt` (text, or a list of {"role", "content"} messages); every other
    field is kept as meta. Two rows with the same prompt but different references are an
    error (which one would be right?); identical duplicates are fine.
    """

    def __init__(self, path: str | os.PathLike, fields: Sequence[str]):
        self.path = str(path)
        self.fields = tuple(fields)
        self._metas: dict[str, dict] = {}
        self._rows: dict[str, int] = {}
        with open(self.path, encoding="utf-8") as f:
            for row_no, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{self.path}: row {row_no}: not valid JSON: {e}") from e
                if not isinstance(row, dict):
                    raise ValueError(f"{self.path}: row {row_no}: expected a JSON object")
                messages = _row_messages(row, self.path, row_no)
                key = prompt_key(messages)
                meta = {k: row[k] for k in self.fields if k in row}
                if key in self._metas and self._metas[key] != meta:
                    raise ValueError(
                        f"{self.path}: row {row_no}: field 'prompt': same prompt as row {self._rows[key]} "
                        f"but different {'/'.join(self.fields)}")
                self._metas[key] = meta
                self._rows[key] = row_no

    def __len__(self) -> int:
        return len(self._metas)

    def meta_for(self, messages: Sequence[Message]) -> dict:
        """The row's fields for this prompt, or {} when the prompt is not in the file."""
        return self._metas.get(prompt_key(messages), {})


def _row_messages(row: dict, path: str, row_no: int) -> list[Message]:
    prompt = row.get("prompt")
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    if isinstance(prompt, list) and prompt and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in prompt):
        return prompt
    raise ValueError(f"{path}: row {row_no}: field 'prompt': expected text or a list of "
                     "{'role', 'content'} messages")


# ---------------------------------------------------------------------------------------
# Extracting the program and the tests

_FENCE = re.compile(r"```[ \t]*([A-Za-z0-9_+.-]*)[^\n]*\n(.*?)```", re.DOTALL)
_PYTHON_TAGS = {"python", "py", "python3", "py3"}


def extract_code(response: str) -> str:
    """The program in a response: the last ```python block, else the last fenced block,
    else the whole response (a model may answer with bare code)."""
    blocks = [(m.group(1).lower(), m.group(2)) for m in _FENCE.finditer(response)]
    python_blocks = [body for tag, body in blocks if tag in _PYTHON_TAGS]
    if python_blocks:
        return python_blocks[-1]
    if blocks:
        return blocks[-1][1]
    return response


@dataclass(frozen=True)
class Suite:
    setup: str          # shared statements run after the program, before the tests
    tests: list[str]    # one snippet per test


def parse_tests(tests: Any, where: str = "tests") -> Suite:
    """A suite from a prompt's `tests`: a list of snippets (one test each), or one source
    string whose top-level `assert`s are the tests and whose other statements are setup."""
    if isinstance(tests, list):
        if not tests or not all(isinstance(t, str) and t.strip() for t in tests):
            raise ValueError(f"{where}: expected a non-empty list of test source strings")
        for i, t in enumerate(tests):
            try:
                ast.parse(t)
            except SyntaxError as e:
                raise ValueError(f"{where}[{i}]: not valid Python: {e}") from e
        return Suite(setup="", tests=list(tests))
    if isinstance(tests, str):
        try:
            tree = ast.parse(tests)
        except SyntaxError as e:
            raise ValueError(f"{where}: not valid Python: {e}") from e
        setup = [ast.unparse(n) for n in tree.body if not isinstance(n, ast.Assert)]
        asserts = [ast.unparse(n) for n in tree.body if isinstance(n, ast.Assert)]
        if not asserts:
            raise ValueError(f"{where}: the test source has no top-level assert statement")
        return Suite(setup="\n".join(setup), tests=asserts)
    raise ValueError(f"{where}: expected a list of test strings or one test source string, "
                     f"got {type(tests).__name__}")


# ---------------------------------------------------------------------------------------
# The sandbox

@dataclass(frozen=True)
class Limits:
    wall_s: float = 10.0          # whole run: start, program, all tests
    test_s: float = 3.0           # one test (and loading the program): SIGALRM in the harness
    cpu_s: int = 10               # RLIMIT_CPU, summed over the run
    memory_mb: int = 1024         # RLIMIT_AS
    max_procs: int = 32           # RLIMIT_NPROC (per uid)
    file_mb: int = 16             # RLIMIT_FSIZE, one file
    work_mb: int = 64             # size of the /work tmpfs (namespace modes)
    max_output_bytes: int = 64 * 1024
    max_report_bytes: int = 1 << 20


@dataclass
class RunResult:
    passed: list[bool]            # one per test
    loaded: bool                  # the program itself ran without raising
    timed_out: bool
    returncode: int | None
    output: str                   # the program's stdout+stderr, truncated
    errors: list[str] = field(default_factory=list)  # per test: "" or the exception's type and message

    @property
    def fraction(self) -> float:
        return sum(self.passed) / len(self.passed) if self.passed else 0.0


# The trusted part of the child. It reads its job from stdin, locks itself down, runs the
# program, then each test, and reports each result as `nonce index 0|1 error` on its own fd.
# Only stdlib; no names at module level so that the program cannot find the nonce there.
_HARNESS = r'''
def _harness():
    import sys, os, json, resource, signal
    job = json.loads(sys.stdin.buffer.read().decode("utf-8"))
    os.close(0)
    os.open(os.devnull, os.O_RDONLY)   # fd 0 again, so input() sees EOF, not a bad fd
    nonce, fd, lim = job["nonce"], job["fd"], job["limits"]
    _write, _str, _type = os.write, str, type
    def report(index, ok, err=""):
        line = "%s %s %d %s\n" % (nonce, index, 1 if ok else 0, err[:300].replace("\n", " "))
        _write(fd, line.encode("utf-8", "replace"))
    for name, value in (("RLIMIT_CPU", lim["cpu_s"]), ("RLIMIT_AS", lim["memory_mb"] << 20),
                        ("RLIMIT_NPROC", lim["max_procs"]), ("RLIMIT_FSIZE", lim["file_mb"] << 20),
                        ("RLIMIT_NOFILE", 256), ("RLIMIT_CORE", 0)):
        resource.setrlimit(getattr(resource, name), (value, value))
    os.chdir(job["cwd"])
    strict = job["audit_strict"]
    home = os.path.realpath(job["cwd"])
    readable = tuple(os.path.realpath(p) for p in job["readable"])
    frame_attrs = {"tb_frame", "gi_frame", "cr_frame", "ag_frame", "f_back", "f_locals", "f_globals"}
    def _inside(path, roots):
        try:
            p = os.path.realpath(os.fsdecode(path))
        except (TypeError, ValueError):
            return False
        return any(p == r or p.startswith(r.rstrip("/") + "/") for r in roots)
    def hook(event, args):
        # What keeps the nonce private (every mode).
        if event == "sys._getframe":
            raise ValueError("frame access is disabled in the sandbox")  # stdlib falls back on ValueError
        if event == "object.__getattr__" and len(args) > 1 and args[1] in frame_attrs:
            raise RuntimeError("frame access is disabled in the sandbox")
        if event in ("sys._current_frames", "gc.get_objects", "gc.get_referrers", "gc.get_referents",
                     "sys.setprofile", "sys.settrace", "sys.addaudithook") or event.startswith("ctypes."):
            raise RuntimeError(event + " is disabled in the sandbox")
        if not strict:
            return
        # Process mode only: what the OS does not enforce there.
        if event.startswith("socket.") and event not in ("socket.gethostname",):
            raise PermissionError("network is disabled in the sandbox")
        if event in ("subprocess.Popen", "os.system", "os.exec", "os.posix_spawn", "os.spawn",
                     "os.fork", "os.forkpty", "pty.spawn", "os.kill", "os.killpg"):
            raise PermissionError(event + " is disabled in the sandbox")
        if event == "open" and args and isinstance(args[0], (str, bytes)):
            mode = args[1] if len(args) > 1 and isinstance(args[1], str) else "r"
            writing = any(c in mode for c in "wax+")
            if not (_inside(args[0], (home,)) or (not writing and _inside(args[0], readable))):
                raise PermissionError("no access outside the working folder: %s" % (args[0],))
    if hasattr(sys, "settrace"):
        del sys.settrace, sys.setprofile
    sys.addaudithook(hook)
    class _Timeout(BaseException):
        pass
    def on_alarm(signum, frame):
        raise _Timeout("time limit")
    signal.signal(signal.SIGALRM, on_alarm)
    def run(source, name, scope):
        signal.setitimer(signal.ITIMER_REAL, lim["test_s"])
        try:
            exec(compile(source, name, "exec"), scope)
            return True, ""
        except BaseException as e:   # the sample's failure, recorded as such
            return False, _type(e).__name__ + ": " + _str(e)
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
    scope = {"__name__": "solution", "__builtins__": __builtins__}
    ok, err = run(job["code"], "solution.py", scope)
    if ok and job["setup"]:
        ok, err = run(job["setup"], "test_setup.py", scope)
    report("load", ok, err)
    if ok:
        for i, test in enumerate(job["tests"]):
            ok_i, err_i = run(test, "test_%d.py" % i, scope)
            report(i, ok_i, err_i)
    report("done", True)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
_harness()
'''

# Runs inside the new namespaces as (namespace) root: builds the chroot, then drops to the
# sandbox uid with no capabilities and execs the interpreter.
_NAMESPACE_SCRIPT = r'''
set -eu
R="$1"; WORK_MB="$2"; UIDG="$3"; shift 3
mount -t tmpfs -o size=8m,mode=755 sandbox-root "$R"
mkdir -p "$R/usr" "$R/work" "$R/dev" "$R/tmp"
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
mount -t tmpfs -o "size=${WORK_MB}m,mode=700" sandbox-work "$R/work"
if [ "$UIDG" = "keep" ]; then
  exec chroot "$R" setpriv --no-new-privs --inh-caps=-all --bounding-set=-all -- "$@"
fi
chown "$UIDG" "$R/work"
exec chroot "$R" setpriv --reuid="${UIDG%:*}" --regid="${UIDG#*:}" --clear-groups --no-new-privs \
  --inh-caps=-all --bounding-set=-all -- "$@"
'''

_SANDBOX_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8", "PYTHONIOENCODING": "utf-8",
                "PYTHONDONTWRITEBYTECODE": "1", "HOME": "/work"}


@dataclass(frozen=True)
class Interpreter:
    executable: str       # real path of the python binary
    mounts: tuple[str, ...]  # folders (outside /usr) that must be visible in the chroot
    readable: tuple[str, ...]  # folders the process-mode audit hook lets the program read


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
    return Interpreter(exe, mounts, tuple(sorted(prefixes)))


def _drain(proc: subprocess.Popen, report_fd: int, deadline: float, limits: Limits) -> tuple[bytes, bytes, bool]:
    """Read the child's output (capped) and its report pipe until both close or time runs out.
    Beyond the caps, bytes are read and dropped so the child never blocks on a full pipe."""
    out, rep = bytearray(), bytearray()
    fds = {proc.stdout.fileno(): out, report_fd: rep}
    caps = {proc.stdout.fileno(): limits.max_output_bytes, report_fd: limits.max_report_bytes}
    while fds:
        left = deadline - time.monotonic()
        if left <= 0:
            return bytes(out), bytes(rep), True
        ready, _, _ = select.select(list(fds), [], [], left)
        for fd in ready:
            chunk = os.read(fd, 65536)
            if not chunk:
                del fds[fd]
                continue
            buf = fds[fd]
            room = caps[fd] - len(buf)
            if room > 0:
                buf += chunk[:room]
    return bytes(out), bytes(rep), False


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass  # already gone


def build_command(mode: str, interp: Interpreter, root_dir: str, limits: Limits, uid: int | None) -> list[str]:
    """argv that starts the harness under `mode` ("namespace", "userns" or "process")."""
    python = [interp.executable, "-I", "-S", "-B", "-c", _HARNESS]
    if mode == "process":
        return python
    ns = ["unshare", "--net", "--mount", "--pid", "--ipc", "--uts", "--kill-child", "--propagation", "private"]
    if mode == "userns":
        ns[1:1] = ["--user", "--map-root-user"]
        uidg = "keep"
    else:
        uidg = f"{uid}:{uid}"
    return [*ns, "sh", "-c", _NAMESPACE_SCRIPT, "sandbox", root_dir, str(limits.work_mb), uidg,
            *interp.mounts, "--", *python]


def run_tests(code: str, suite: Suite, *, mode: str, interp: Interpreter, limits: Limits,
              uid: int | None = None) -> RunResult:
    """Run `code`, then `suite`, in a sandboxed child (see the module docstring); never raises
    for anything the program does."""
    n = len(suite.tests)
    nonce = secrets.token_hex(16)
    report_r, report_w = os.pipe()
    with tempfile.TemporaryDirectory(prefix="posttrain-code-") as tmp:
        if mode == "process":
            cwd, inner_cwd = os.path.join(tmp, "work"), os.path.join(tmp, "work")
            os.mkdir(cwd)
        else:
            os.mkdir(os.path.join(tmp, "root"))
            cwd, inner_cwd = tmp, "/work"
        job = {"nonce": nonce, "fd": report_w, "code": code, "setup": suite.setup, "tests": suite.tests,
               "cwd": inner_cwd, "audit_strict": mode == "process", "readable": list(interp.readable),
               "limits": {"cpu_s": limits.cpu_s, "memory_mb": limits.memory_mb, "max_procs": limits.max_procs,
                          "file_mb": limits.file_mb, "test_s": limits.test_s}}
        argv = build_command(mode, interp, os.path.join(tmp, "root"), limits, uid)
        deadline = time.monotonic() + limits.wall_s
        try:
            proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    pass_fds=(report_w,), cwd=cwd, env=_SANDBOX_ENV, start_new_session=True)
        finally:
            os.close(report_w)
        try:
            # Written from a thread: a child that never reads stdin must not block us.
            payload = json.dumps(job).encode("utf-8")
            writer = threading.Thread(target=_feed, args=(proc.stdin, payload), daemon=True)
            writer.start()
            output, report, timed_out = _drain(proc, report_r, deadline, limits)
            if timed_out:
                _kill_group(proc)
            try:
                returncode = proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                timed_out = True
                _kill_group(proc)
                returncode = proc.wait()
        finally:
            # Also reaps anything left in the group (process mode has no PID namespace).
            _kill_group(proc)
            os.close(report_r)
            proc.stdout.close()
    loaded, passed, errors = parse_report(report, nonce, n)
    return RunResult(passed=passed, loaded=loaded, timed_out=timed_out, returncode=returncode,
                     output=output.decode("utf-8", "replace"), errors=errors)


def _feed(stream, payload: bytes) -> None:
    try:
        stream.write(payload)
        stream.close()
    except (BrokenPipeError, ValueError, OSError):
        pass  # the child died before reading its job: it reports nothing, so every test fails


def parse_report(report: bytes, nonce: str, n: int) -> tuple[bool, list[bool], list[str]]:
    """(program loaded, passed per test, error per test) from the report pipe's lines. Lines
    without the nonce, or for a test index twice, are ignored (the first one counts)."""
    loaded = False
    passed, errors, seen = [False] * n, ["not run"] * n, set()
    for line in report.decode("utf-8", "replace").splitlines():
        parts = line.split(" ", 3)
        if len(parts) < 3 or not secrets.compare_digest(parts[0], nonce):
            continue
        index, ok = parts[1], parts[2] == "1"
        if index in seen:
            continue
        seen.add(index)
        err = parts[3] if len(parts) > 3 else ""
        if index == "load":
            loaded = ok
            if not ok:
                errors = [f"program failed: {err}"] * n
        elif index.isdigit() and int(index) < n:
            passed[int(index)] = ok
            errors[int(index)] = "" if ok else err
    return loaded, passed, errors


def probe_isolation(mode: str, interp: Interpreter, limits: Limits, uid: int) -> str | None:
    """None when `mode` works here (a real run passes a trivial test), else why not."""
    if mode != "process":
        if shutil.which("unshare") is None or shutil.which("setpriv") is None:
            return "needs the util-linux tools unshare and setpriv"
        if mode == "namespace" and os.geteuid() != 0:
            return "needs root"
    probe = run_tests("x = 41\n", Suite("", ["assert x + 1 == 42"]), mode=mode, interp=interp,
                      limits=Limits(wall_s=max(limits.wall_s, 20.0), test_s=10.0), uid=uid)
    if probe.passed == [True]:
        return None
    return f"probe run failed (exit {probe.returncode}): {probe.output.strip()[-500:]}"


class CodeTestReward:
    """Fraction of the prompt's unit tests that the response's code passes (see module doc).

    Args (all JSON-able, for recipes):
        prompts_file: JSONL of prompt rows with `tests`, for `score()` (see module doc).
        isolation: "auto" (namespace, else userns; error if neither), "namespace", "userns",
            or "process" (weaker: only rlimits + an audit hook; explicit opt-in).
        timeout_s: wall-clock limit for one sample (program + all its tests).
        test_timeout_s: limit for loading the program and for each test.
        cpu_s, memory_mb, max_procs, file_mb, work_mb, max_output_bytes: see `Limits`.
        max_workers: samples run at once.
        python: interpreter for the programs (default: the current one; stdlib only).
        uid_base: first of `max_workers` uids the programs run as (namespace mode).
    """

    name = "code_tests"

    def __init__(self, prompts_file: str | None = None, isolation: str = "auto", timeout_s: float = 10.0,
                 test_timeout_s: float = 3.0, cpu_s: int = 10, memory_mb: int = 1024, max_procs: int = 32,
                 file_mb: int = 16, work_mb: int = 64, max_output_bytes: int = 65536, max_workers: int = 2,
                 python: str | None = None, uid_base: int = 1_990_000_000):
        if isolation not in ISOLATION_MODES:
            raise ValueError(f"CodeTestReward: isolation must be one of {ISOLATION_MODES}, got {isolation!r}")
        if max_workers < 1:
            raise ValueError(f"CodeTestReward: max_workers must be >= 1, got {max_workers}")
        if not 0 < test_timeout_s <= timeout_s:
            raise ValueError("CodeTestReward: need 0 < test_timeout_s <= timeout_s")
        self.requested_isolation = isolation
        self.limits = Limits(wall_s=timeout_s, test_s=test_timeout_s, cpu_s=cpu_s, memory_mb=memory_mb,
                             max_procs=max_procs, file_mb=file_mb, work_mb=work_mb,
                             max_output_bytes=max_output_bytes)
        self.max_workers = max_workers
        self.python = python
        self.uid_base = uid_base
        self.references = ReferenceIndex(prompts_file, ["tests"]) if prompts_file else None
        if self.references is not None:  # bad tests fail here, naming the row, not mid-sampling
            for key, meta in self.references._metas.items():
                if meta.get("tests") not in (None, [], ""):
                    parse_tests(meta["tests"], where=f"{prompts_file}: row {self.references._rows[key]}: field 'tests'")
        self.isolation: str | None = None   # the mode in use, set by setup()
        self.interpreter: Interpreter | None = None
        self._slots: queue.Queue[int] | None = None

    def setup(self) -> None:
        """Pick and probe the isolation mode; raises when the requested one does not work."""
        if self.isolation is not None:
            return
        interp = find_interpreter(self.python)
        candidates = ["namespace", "userns"] if self.requested_isolation == "auto" else [self.requested_isolation]
        reasons = []
        for mode in candidates:
            why = probe_isolation(mode, interp, self.limits, self.uid_base)
            if why is None:
                self.isolation, self.interpreter = mode, interp
                break
            reasons.append(f"{mode}: {why}")
        else:
            raise RuntimeError("CodeTestReward: no working sandbox (" + "; ".join(reasons) + "). "
                               "isolation='process' runs programs without OS isolation (audit hook only).")
        self._slots = queue.Queue()
        for i in range(self.max_workers):
            self._slots.put(self.uid_base + i)
        if self.isolation == "process":
            log.warning("CodeTestReward runs programs WITHOUT OS isolation (isolation='process')")
        log.info("CodeTestReward: isolation=%s interpreter=%s", self.isolation, interp.executable)

    def teardown(self) -> None:
        pass  # nothing outlives a run: every sandbox is torn down when its sample finishes

    def score(self, prompts: list[list[Message]], responses: list[str]) -> list[float | None]:
        if self.references is None:
            raise ValueError("CodeTestReward.score needs prompts_file= (prompt rows with `tests`); "
                             "or call score_with_meta(prompts, responses, metas)")
        return self.score_with_meta(prompts, responses, [self.references.meta_for(p) for p in prompts])

    def score_with_meta(self, prompts: list[list[Message]], responses: list[str],
                        metas: list[dict]) -> list[float | None]:
        if not len(prompts) == len(responses) == len(metas):
            raise ValueError(f"CodeTestReward: {len(prompts)} prompts, {len(responses)} responses, {len(metas)} metas")
        suites: list[Suite | None] = []
        for i, meta in enumerate(metas):
            tests = (meta or {}).get("tests")
            suites.append(None if tests in (None, [], "") else parse_tests(tests, where=f"sample {i}: field 'tests'"))
        return [None if r is None else r.fraction for r in self.run_batch(responses, suites)]

    def run_batch(self, responses: list[str], suites: list[Suite | None]) -> list[RunResult | None]:
        """Run each response against its suite (None: skipped), `max_workers` at a time."""
        self.setup()
        assert self._slots is not None and self.interpreter is not None

        def one(i: int) -> RunResult | None:
            if suites[i] is None:
                return None
            uid = self._slots.get()
            try:
                return run_tests(extract_code(responses[i]), suites[i], mode=self.isolation,
                                 interp=self.interpreter, limits=self.limits, uid=uid)
            finally:
                self._slots.put(uid)

        with ThreadPoolExecutor(max_workers=self.max_workers, thread_name_prefix="code-reward") as pool:
            return list(pool.map(one, range(len(responses))))


__all__ = ["CodeTestReward", "Limits", "ReferenceIndex", "RunResult", "Suite", "extract_code",
           "find_interpreter", "parse_tests", "prompt_key", "run_tests"]

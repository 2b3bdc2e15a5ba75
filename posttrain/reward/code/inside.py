"""What runs inside the sandbox: the slot's root process, each sample's processes, the judge.

Standard library only, no imports from posttrain: `sandbox.py` runs this file's source, after
`_plain.py`'s (the codec), as `python -I -S -B -c SOURCE CTRL_FD` inside a chroot, in a
network/mount/IPC/UTS namespace of its own (one per worker slot). See docs/design.md, "The
code reward's verdict", for why each process exists and what each one may touch.

    slot root (uid 0, trusted)   waits for samples on the control socket; forks one supervisor each
    supervisor (uid 0, trusted)  new mount, PID, IPC and network namespaces; fresh /work and
                                 /judge tmpfs; forks the init; kills it at the wall-clock limit
    init (uid 0, PID 1, trusted) calls form: forks the program server and the judge, waits for the
                                 judge; stdin form: runs each case as a script and reports its
                                 exit status and stdout. When it exits the kernel kills the rest.
    program server (program uid) loads the program; answers the judge's requests with plain
                                 values, exceptions, timeouts or handles. Wholly the program's.
    judge (judge uid)            runs the tests; program names are proxies to the server; the
                                 only writer (with init) of the report pipe the parent reads.

Nothing a test expects ever enters a process that runs program code: tests go to the judge,
expected outputs stay in the parent.
"""

import builtins
import ctypes
import json
import operator
import os
import reprlib
import resource
import select
import signal
import socket
import sys
import time
import traceback

CLONE_NEWNS, CLONE_NEWIPC, CLONE_NEWNET, CLONE_NEWPID = 0x00020000, 0x08000000, 0x40000000, 0x20000000
MS_NOSUID, MS_NODEV = 2, 4
PR_CAPBSET_DROP, PR_SET_NO_NEW_PRIVS = 24, 38
MAX_LINE = 32 << 20        # the largest answer the judge reads from the program
GRACE_S = 0.5              # how long the judge waits past a time limit for the program's own answer

_libc = ctypes.CDLL(None, use_errno=True)
encode_plain = decode_plain = NotPlainError = None  # the codec (posttrain/reward/_plain.py), set by main()


def _sys(ret, what):
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, what + ": " + os.strerror(err))


class _Timeout(BaseException):
    """A time limit; not an Exception, so a test's `except Exception` does not swallow it."""


class Refused(BaseException):
    """The judge refuses to use a program object as data (compare, hash, truth value)."""


class ProgramGone(BaseException):
    """The program's process exited, stopped answering, or broke the protocol."""


def _on_alarm(signum, frame):
    raise _Timeout("time limit")


def keep_fds(keep):
    """Close every fd but `keep` (and 0-2)."""
    top = 65536
    start = 0
    for fd in sorted(set(keep) | {0, 1, 2}) + [top]:
        if start < fd:  # os.closerange(n, n) closes every fd on Python 3.11 (close_range(n, n - 1))
            os.closerange(start, fd)
        start = fd + 1


def std_streams(err_fd, stdin_fd=None, out_fd=None):
    """fd 0 from `stdin_fd` (else /dev/null), fd 1 to `out_fd` (else `err_fd`), fd 2 to `err_fd`,
    and fresh sys streams on them (every fd given is above 2: 0-2 are always open here)."""
    if stdin_fd is None:
        stdin_fd = os.open(os.devnull, os.O_RDONLY)
    out_fd = err_fd if out_fd is None else out_fd
    os.dup2(stdin_fd, 0)
    os.dup2(out_fd, 1)
    os.dup2(err_fd, 2)
    for fd in {stdin_fd, out_fd, err_fd} - {0, 1, 2}:
        os.close(fd)
    sys.stdin = open(0, "r", encoding="utf-8", errors="replace", closefd=False)
    sys.stdout = open(1, "w", encoding="utf-8", errors="replace", closefd=False)
    sys.stderr = open(2, "w", encoding="utf-8", errors="replace", closefd=False)


def become(uid, cwd, lim):
    """Drop to `uid` for good: limits first (as root), no capabilities, no new privileges."""
    for name, value in (("RLIMIT_CPU", lim["cpu_s"]), ("RLIMIT_AS", lim["memory_mb"] << 20),
                        ("RLIMIT_NPROC", lim["max_procs"]), ("RLIMIT_FSIZE", lim["file_mb"] << 20),
                        ("RLIMIT_NOFILE", 256), ("RLIMIT_CORE", 0)):
        resource.setrlimit(getattr(resource, name), (value, value))
    for cap in range(64):
        if _libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
            break  # past the last capability this kernel knows
    os.setgroups([])
    os.setresgid(uid, uid, uid)
    os.setresuid(uid, uid, uid)   # from uid 0 to another: the kernel clears every capability
    _sys(_libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "no_new_privs")
    os.chdir(cwd)


def read_all(fd):
    chunks = []
    while True:
        chunk = os.read(fd, 1 << 16)
        if not chunk:
            break
        chunks.append(chunk)
    os.close(fd)
    return json.loads(b"".join(chunks).decode("utf-8"))


def write_all(fd, data):
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def send(fd, entry):
    write_all(fd, (json.dumps(entry) + "\n").encode("utf-8", "replace"))


# ------------------------------------------------------------------------------ slot root

def main():
    global encode_plain, decode_plain, NotPlainError
    codec = {"__name__": "plain"}
    exec(sys.argv[2], codec)
    encode_plain, decode_plain, NotPlainError = codec["encode"], codec["decode"], codec["NotPlain"]
    ctrl = socket.socket(fileno=int(sys.argv[1]))
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # supervisors are reaped by the kernel
    ctrl.send(b"ready")
    while True:
        try:
            msg, fds, _, _ = socket.recv_fds(ctrl, 1 << 16, 8)
        except OSError:
            os._exit(1)
        if not msg:
            os._exit(0)  # the parent closed the socket
        if os.fork() == 0:
            ctrl.close()
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            _run_and_exit(supervise, json.loads(msg.decode("utf-8")), fds)
        for fd in fds:
            os.close(fd)


def _run_and_exit(fn, *args):
    """A forked trusted process: run `fn`, print what went wrong (to the slot's error log), exit."""
    code = 1
    try:
        fn(*args)
        code = 0
    except BaseException:
        traceback.print_exc()
        sys.stderr.flush()
    finally:
        os._exit(code)


def supervise(req, fds):
    """One sample: fresh namespaces and folders, the init, and the wall-clock limit."""
    prog_uid, judge_uid = req["uids"]
    _sys(_libc.unshare(CLONE_NEWNS | CLONE_NEWPID | CLONE_NEWIPC | CLONE_NEWNET), "unshare")
    for path, uid in (("/work", prog_uid), ("/judge", judge_uid)):
        opts = "size=%dm,mode=700,uid=%d,gid=%d" % (req["limits"]["work_mb"], uid, uid)
        _sys(_libc.mount(b"sandbox-work", path.encode(), b"tmpfs", MS_NOSUID | MS_NODEV, opts.encode()), "mount")
    pid = os.fork()
    if pid == 0:
        _run_and_exit(init, req, fds)
    for fd in fds:
        os.close(fd)
    pidfd = os.pidfd_open(pid)
    ready, _, _ = select.select([pidfd], [], [], req["limits"]["wall_s"])
    if not ready:
        os.kill(pid, signal.SIGKILL)  # PID 1 of the sample's namespace: everything in it dies
    os.waitpid(pid, 0)


def init(req, fds):
    lim, (prog_uid, judge_uid) = req["limits"], req["uids"]
    if req["mode"] == "calls":
        rep_w, out_w, job_p, job_j = fds
        req_r, req_w = os.pipe()
        ans_r, ans_w = os.pipe()
        if os.fork() == 0:
            keep_fds([out_w, job_p, req_r, ans_w])
            std_streams(out_w)
            become(prog_uid, "/work", lim)
            program_server(job_p, req_r, ans_w, lim)
            os._exit(0)
        judge = os.fork()
        if judge == 0:
            keep_fds([out_w, job_j, req_w, ans_r, rep_w])
            std_streams(out_w)
            become(judge_uid, "/judge", lim)
            run_judge(job_j, req_w, ans_r, rep_w, lim)
            os._exit(0)
        for fd in (rep_w, out_w, job_p, job_j, req_r, req_w, ans_r, ans_w):
            os.close(fd)
        while True:
            pid, _ = os.wait()
            if pid == judge:
                return  # init exits: the kernel kills the program server and all it started
    rep_w, out_w, job_p = fds
    run_cases(read_all(job_p), rep_w, out_w, prog_uid, lim)


# ------------------------------------------------------------------------------ stdin/stdout form

def run_cases(job, rep_w, out_w, prog_uid, lim):
    """Each input runs the program as a script (`__name__ == "__main__"`) in a fresh process;
    init (root, another uid) captures its stdout (capped) and its exit status from the kernel."""
    for k, text in enumerate(job["inputs"]):
        stdin = os.memfd_create("stdin")
        write_all(stdin, text.encode("utf-8"))
        os.lseek(stdin, 0, os.SEEK_SET)
        out_r, case_w = os.pipe()
        pid = os.fork()
        if pid == 0:
            keep_fds([stdin, case_w, out_w])
            std_streams(out_w, stdin_fd=stdin, out_fd=case_w)
            become(prog_uid, "/work", lim)
            run_script(job["program"])
        os.close(case_w)
        os.close(stdin)
        pidfd = os.pidfd_open(pid)
        deadline = time.monotonic() + lim["test_s"]
        out, flood, timeout = bytearray(), False, False
        watch = [out_r, pidfd]
        while True:
            left = deadline - time.monotonic()
            ready = select.select(watch, [], [], left)[0] if left > 0 else []
            if not ready:
                timeout = True
                break
            if pidfd in ready:
                break
            chunk = os.read(out_r, 1 << 16)
            if not chunk:
                watch = [pidfd]  # it closed its stdout; wait for its exit
                continue
            out += chunk
            if len(out) > lim["max_output_bytes"]:
                flood = True
                break
        os.kill(-1, signal.SIGKILL)  # as PID 1: every process of this case (it may have forked)
        _, status = os.waitpid(pid, 0)
        while not flood:  # what it wrote before it exited; every writer is dead, so EOF comes
            chunk = os.read(out_r, 1 << 16)
            if not chunk:
                break
            out += chunk
            flood = len(out) > lim["max_output_bytes"]
        os.close(out_r)
        os.close(pidfd)
        _reap()
        send(rep_w, {"case": k, "exit": os.waitstatus_to_exitcode(status), "timeout": timeout, "flood": flood,
                     "out": bytes(out[:lim["max_output_bytes"]]).decode("utf-8", "replace")})


def _reap():
    while True:
        try:
            if os.waitpid(-1, os.WNOHANG)[0] == 0:
                return
        except ChildProcessError:
            return


def run_script(program):
    """Run the program as `python solution.py` would, then exit with its status."""
    scope = {"__name__": "__main__", "__builtins__": builtins, "__file__": "solution.py"}
    sys.argv = ["solution.py"]
    code = 0
    try:
        exec(compile(program, "solution.py", "exec"), scope)
    except SystemExit as e:
        if e.code is None:
            code = 0
        elif type(e.code) is int:
            code = e.code
        else:
            print(e.code, file=sys.stderr)
            code = 1
    except BaseException:
        traceback.print_exc()
        code = 1
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except BaseException:
            code = code or 1  # stdout could not be written: as python would, a failure
    os._exit(code & 0xFF)


# ------------------------------------------------------------------------------ program server

def _exception_name(e):
    """The nearest builtin exception class of `e` (a metaclass cannot fake the name)."""
    type_name = type.__dict__["__name__"].__get__
    for c in type(e).__mro__:
        name = type_name(c)
        if getattr(builtins, name, None) is c:
            return name
    return "BaseException"


def program_server(job_fd, req_r, ans_w, lim):
    """The program's side: load it, then answer requests. Everything here is the program's to
    change once it has loaded; nothing it answers is more than a claim about values."""
    encode, decode, NotPlain = encode_plain, decode_plain, NotPlainError
    program = read_all(job_fd)["program"]
    signal.signal(signal.SIGALRM, _on_alarm)
    scope = {"__name__": "solution", "__builtins__": builtins}
    handles, counter = {}, [0]

    def outcome(value):
        try:
            return {"v": encode(value)}
        except (NotPlain, ValueError, RecursionError, MemoryError):
            counter[0] += 1
            handles[counter[0]] = value
            return {"h": counter[0], "type": type.__dict__["__name__"].__get__(type(value))}

    def raised(e):
        try:
            args = encode(e.args)
        except (NotPlain, ValueError, RecursionError, MemoryError):
            args = None
        return {"raise": _exception_name(e), "args": args}

    def arg(data):
        return decode(data, deref=lambda h: handles[h])

    ops = {
        "call": lambda r, o: o(*arg(r["args"]), **arg(r["kwargs"])),
        "getattr": lambda r, o: getattr(o, r["name"]),
        "setattr": lambda r, o: setattr(o, r["name"], arg(r["value"])),
        "getitem": lambda r, o: o[arg(r["key"])],
        "setitem": lambda r, o: o.__setitem__(arg(r["key"]), arg(r["value"])),
        "delitem": lambda r, o: o.__delitem__(arg(r["key"])),
        "len": lambda r, o: len(o),
        "iter": lambda r, o: iter(o),
        "next": lambda r, o: next(o),
        "contains": lambda r, o: arg(r["value"]) in o,
        "str": lambda r, o: str(o),
        "repr": lambda r, o: repr(o),
    }
    signal.setitimer(signal.ITIMER_REAL, lim["test_s"])
    try:
        exec(compile(program, "solution.py", "exec"), scope)
        loaded = {"load": True}
    except _Timeout:
        loaded = {"load": False, "kind": "timeout", "error": "time limit while loading"}
    except BaseException as e:
        loaded = {"load": False, "kind": "syntax_error" if isinstance(e, SyntaxError) else "error",
                  "error": (type(e).__name__ + ": " + str(e))[:300]}
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
    send(ans_w, {"seq": 0, **loaded})
    if not loaded["load"]:
        os._exit(0)
    requests = os.fdopen(req_r, "rb")
    for line in requests:
        req = json.loads(line)
        signal.setitimer(signal.ITIMER_REAL, lim["test_s"])
        try:
            if req["op"] == "names":
                answer = {"found": {n: outcome(scope[n]) for n in req["names"] if n in scope}}
            else:
                answer = outcome(ops[req["op"]](req, handles[req["h"]]))
        except _Timeout:
            answer = {"timeout": True}
        except BaseException as e:
            answer = raised(e)
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
        answer["seq"] = req["seq"]
        send(ans_w, answer)
    os._exit(0)


# ------------------------------------------------------------------------------ the judge

class Remote:
    """The judge's end of the program server: one request at a time, each answered in time or
    the program counts as gone. Reads are bounded in size and time; the program cannot block it."""

    def __init__(self, req_w, ans_r, lim):
        self.req_w, self.ans_r, self.lim = req_w, ans_r, lim
        self.buf, self.seq, self.gone, self.behind = b"", 0, None, 0

    def _line(self, deadline):
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.ans_r], [], [], left)[0]:
                return None
            chunk = os.read(self.ans_r, 1 << 20)
            if not chunk:
                raise self._fail("the program's process exited")
            self.buf += chunk
            if len(self.buf) > MAX_LINE:
                raise self._fail("the program sent an answer over %d MB" % (MAX_LINE >> 20))
        line, self.buf = self.buf.split(b"\n", 1)
        try:
            msg = json.loads(line)
        except (ValueError, RecursionError, MemoryError):
            raise self._fail("the program broke the protocol") from None
        if type(msg) is not dict or type(msg.get("seq")) is not int:
            raise self._fail("the program broke the protocol")
        return msg

    def _fail(self, why):
        self.gone = why
        return ProgramGone(why)

    def answer(self, seq, wait_s):
        """The answer to request `seq`; earlier answers (late ones) are skipped."""
        deadline = time.monotonic() + wait_s
        while True:
            msg = self._line(deadline)
            if msg is None:
                raise self._fail("the program stopped answering (time limit)")
            if msg["seq"] == seq:
                return msg
            if msg["seq"] > seq:
                raise self._fail("the program broke the protocol")

    def request(self, op, raw=False, **fields):
        if self.gone:
            raise ProgramGone(self.gone)
        if self.behind:  # the last call ran out of the test's time: the program owes its own answer
            behind, self.behind = self.behind, 0
            self.answer(behind, GRACE_S)
        self.seq += 1
        seq = self.seq
        try:
            write_all(self.req_w, (json.dumps({"seq": seq, "op": op, **fields}) + "\n").encode("utf-8"))
        except OSError:
            raise self._fail("the program's process exited") from None
        try:
            msg = self.answer(seq, self.lim["test_s"] + GRACE_S)
        except _Timeout:
            self.behind = seq
            raise
        return msg if raw else self.value(msg)

    def value(self, msg):
        if "v" in msg:
            try:
                return decode_plain(msg["v"])
            except (ValueError, TypeError, RecursionError, MemoryError):
                raise self._fail("the program sent a value that is not plain data") from None
        if type(msg.get("h")) is int:
            return Proxy(self, msg["h"], str(msg.get("type"))[:80])
        if "raise" in msg:
            cls = getattr(builtins, str(msg["raise"]), None)
            if not (isinstance(cls, type) and issubclass(cls, BaseException)) or cls in (
                    _Timeout, Refused, ProgramGone, SystemExit, KeyboardInterrupt, GeneratorExit):
                cls = RuntimeError
            try:
                args = decode_plain(msg["args"]) if msg.get("args") is not None else ()
                exc = cls(*args) if type(args) is tuple else cls()
            except (ValueError, TypeError, RecursionError, MemoryError):
                exc = cls()
            raise exc
        if msg.get("timeout"):
            raise _Timeout("time limit (in the program)")
        raise self._fail("the program broke the protocol")


def _ref(value):
    if type(value) is Proxy:
        return object.__getattribute__(value, "_h")
    raise Refused("only plain data and the program's own objects can be passed to the program, not %s"
                  % type(value).__name__)


class Proxy:
    """A program object the judge holds by handle: it may be called, indexed, iterated, sized
    and read, each a request to the program; it is never compared, hashed or tested for truth
    (only plain values are compared, in the judge)."""

    __slots__ = ("_r", "_h", "_type")

    def __init__(self, remote, handle, type_name):
        object.__setattr__(self, "_r", remote)
        object.__setattr__(self, "_h", handle)
        object.__setattr__(self, "_type", type_name)

    def _do(self, op, **fields):
        return object.__getattribute__(self, "_r").request(op, h=object.__getattribute__(self, "_h"), **fields)

    def __call__(self, *args, **kwargs):
        return self._do("call", args=encode_plain(list(args), ref=_ref), kwargs=encode_plain(kwargs, ref=_ref))

    def __getattr__(self, name):
        if name.startswith("__") and name.endswith("__"):
            raise AttributeError(name)
        return self._do("getattr", name=name)

    def __setattr__(self, name, value):
        self._do("setattr", name=name, value=encode_plain(value, ref=_ref))

    def __getitem__(self, key):
        return self._do("getitem", key=encode_plain(key, ref=_ref))

    def __setitem__(self, key, value):
        self._do("setitem", key=encode_plain(key, ref=_ref), value=encode_plain(value, ref=_ref))

    def __delitem__(self, key):
        self._do("delitem", key=encode_plain(key, ref=_ref))

    def __len__(self):
        return self._do("len")

    def __iter__(self):
        return self._do("iter")

    def __next__(self):
        return self._do("next")

    def __contains__(self, value):
        return self._do("contains", value=encode_plain(value, ref=_ref))

    def __str__(self):
        return self._do("str")

    def __repr__(self):
        return self._do("repr")

    def _refuse(self, *args):
        raise Refused("the program returned a %s, which is not plain data: it is not compared, hashed or "
                      "tested for truth" % object.__getattribute__(self, "_type"))

    __eq__ = __ne__ = __lt__ = __le__ = __gt__ = __ge__ = __bool__ = __hash__ = _refuse


def short(value):
    if type(value) is Proxy:
        return "a program object (%s)" % object.__getattribute__(value, "_type")
    r = reprlib.Repr()
    r.maxstring = r.maxother = 80
    return r.repr(value)


_COMPARE = {"Eq": operator.eq, "NotEq": operator.ne, "Lt": operator.lt, "LtE": operator.le, "Gt": operator.gt,
            "GtE": operator.ge, "In": lambda a, b: a in b, "NotIn": lambda a, b: a not in b,
            "Is": operator.is_, "IsNot": operator.is_not}


def assert_compare(left, op, right):
    """`assert left <op> right`, rewritten by the parent so a failure says what the program gave."""
    if not _COMPARE[op](left, right):
        raise AssertionError("got " + short(left))


def run_judge(job_fd, req_w, ans_r, rep_w, lim):
    try:
        judge(job_fd, req_w, ans_r, rep_w, lim)
    except BaseException as e:  # never the program's doing, but still only this sample's failure
        send(rep_w, {"load": False, "kind": "crash", "error": ("the judge failed: %s: %s" % (type(e).__name__, e))[:300]})
    os._exit(0)


def judge(job_fd, req_w, ans_r, rep_w, lim):
    job = read_all(job_fd)
    remote = Remote(req_w, ans_r, lim)
    signal.signal(signal.SIGALRM, _on_alarm)

    def fail_all(kind, error):
        send(rep_w, {"load": False, "kind": kind, "error": error[:300]})
        os._exit(0)

    try:
        loaded = remote.answer(0, lim["test_s"] + GRACE_S)
    except ProgramGone as e:
        fail_all("timeout" if "time limit" in str(e) else "crash", "the program did not load: %s" % e)
    if loaded.get("load") is not True:
        fail_all(str(loaded.get("kind"))[:20], str(loaded.get("error")))
    scope = {"__name__": "__main__", "__builtins__": builtins, job["compare_function"]: assert_compare}
    try:
        found = remote.request("names", raw=True, names=job["names"]).get("found")
    except BaseException:
        found = None
    if type(found) is not dict:
        fail_all("crash", "the program did not answer which names it defines")
    for name, msg in found.items():
        if name in job["names"] and type(msg) is dict:
            try:
                scope[name] = remote.value(msg)
            except BaseException:
                pass  # a name that cannot be read is missing: the test that uses it fails
    for name in job["modules"]:
        try:
            scope[name] = __import__(name)
        except ImportError:
            pass  # as missing as it would be to the program
    send(rep_w, {"load": True})
    setup_error = None
    if job["setup"]:
        setup_error = run_one(job["setup"], "test_setup.py", scope, lim)
    for i, source in enumerate(job["tests"]):
        if setup_error is not None:
            verdict = dict(setup_error, error="test setup failed: " + setup_error["error"])
        else:
            verdict = run_one(source, "test_%d.py" % i, scope, lim)
        send(rep_w, {"t": i, "ok": verdict is None, **(verdict or {})})
    os._exit(0)


def run_one(source, name, scope, lim):
    """None when the test passes, else {"kind", "error"}."""
    signal.setitimer(signal.ITIMER_REAL, lim["test_s"])
    try:
        exec(compile(source, name, "exec"), scope)
        return None
    except _Timeout as e:
        return {"kind": "timeout", "error": "time limit" + ("" if str(e) == "time limit" else ": " + str(e))}
    except ProgramGone as e:
        return {"kind": "crash", "error": str(e)[:300]}
    except Refused as e:
        return {"kind": "failed", "error": str(e)[:300]}
    except AssertionError as e:
        return {"kind": "failed", "error": ("AssertionError: " + str(e)).rstrip(": ")[:300]}
    except BaseException as e:
        return {"kind": "error", "error": (type(e).__name__ + ": " + str(e))[:300]}
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)


if __name__ == "__main__":
    main()

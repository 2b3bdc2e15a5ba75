"""The launcher a training stage runs under: `python -m posttrain.rounds.agent torchrun|accelerate ARGS...`.

It runs torch's elastic launcher (`torch.distributed.run`, or `accelerate launch`, which
calls it) in this process, so that a failed rank arrives as the launcher's own
`ChildFailedError` object, with each failed process's global rank, local rank, pid, exit code
(a negative one is the signal that killed it) and the error file the rank wrote
(TORCHELASTIC_ERROR_FILE: the stage worker records its exception there). Printed, torch's
report is a table whose exception line reads `ChildFailedError:` with nothing after it; here
it becomes one line, e.g.

    rank 1 (node 0, host gpu-07, local rank 1, pid 4242) was killed by signal 9 (SIGKILL)

written to stderr and, when POSTTRAIN_FAILURE_FILE names a file, as JSON there (the
orchestrator reads it: `read_failure`). Each node's agent sees only its own node's ranks; on a
shared run folder every node writes its own file (`failure_file(out_dir, node)`), and the
root cause is the failure seen first (`root_cause`).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

FAILURE_ENV = "POSTTRAIN_FAILURE_FILE"
NODE_ENV = "POSTTRAIN_NODE_RANK"


def failure_file(out_dir: str | os.PathLike, node_rank: int) -> Path:
    """Where node `node_rank`'s agent writes the failure of a stage's launch."""
    return Path(out_dir) / f".failure.node{node_rank}.json"


def _signal_name(code: int) -> str:
    try:
        return signal.Signals(code).name
    except ValueError:
        return "unknown signal"


def _first_line(text: str, limit: int = 400) -> str:
    lines = [ln.strip() for ln in str(text).strip().splitlines() if ln.strip()]
    line = lines[0] if lines else ""
    return line if len(line) <= limit else line[:limit] + " ..."


def describe(rank: int, *, node: int, host: str, local_rank: int | None, pid: int | None, exitcode: int,
             error: str | None) -> str:
    """One failed process as one line: who (global rank, node, host, local rank, pid) and what."""
    who = f"rank {rank} (node {node}, host {host}" + (f", local rank {local_rank}" if local_rank is not None else "") \
        + (f", pid {pid}" if pid else "") + ")"
    if exitcode < 0:
        sig = -exitcode
        hint = ", often the out-of-memory killer: see dmesg" if sig == signal.SIGKILL else ""
        return f"{who} was killed by signal {sig} ({_signal_name(sig)}{hint})"
    return f"{who} exited with code {exitcode}" + (f": {error}" if error else "")


def _error_text(failure) -> str | None:
    """The rank's own exception, from the error file it wrote (None when it wrote none)."""
    message = failure.message
    if isinstance(message, dict):
        message = message.get("message")
    if not message or str(message).startswith("To enable traceback") or str(message).startswith("Signal "):
        return None
    return _first_line(message)


def report_child_failure(err, node: int) -> dict:
    """A ChildFailedError as JSON: every failed process of this node, the first one first."""
    host = socket.gethostname()
    # The agent stops a failed rank's siblings with SIGTERM: they are the consequence, not the cause.
    items = sorted(err.failures.items(), key=lambda kv: (kv[1].exitcode == -signal.SIGTERM, kv[1].timestamp, kv[0]))
    failures = [{"rank": rank, "node": node, "host": host, "local_rank": f.local_rank, "pid": f.pid,
                 "exitcode": f.exitcode, "timestamp": f.timestamp, "error": _error_text(f)}
                for rank, f in items]
    return _report(failures, node, host)


def _report(failures: list[dict], node: int, host: str) -> dict:
    first = failures[0]
    line = describe(first["rank"], node=node, host=host, local_rank=first["local_rank"], pid=first["pid"],
                    exitcode=first["exitcode"], error=first["error"])
    rest = failures[1:]
    if rest and all(f["exitcode"] == -signal.SIGTERM for f in rest):
        line += f"; the launcher then stopped the other {len(rest)} rank(s) of node {node}"
    elif rest:
        line += f" ({len(rest)} more rank(s) of node {node} failed too)"
    return {"node": node, "host": host, "time": time.time(), "failures": failures, "message": line}


def read_failure(path: str | os.PathLike) -> dict | None:
    from posttrain.files import read_json

    try:
        return read_json(path)
    except (OSError, ValueError):
        return None


def root_cause(reports: list[dict]) -> dict | None:
    """Of several nodes' reports, the one whose first failure is the cause: not a rank its
    launcher stopped (SIGTERM), then the earliest, and within the same second a rank killed by a
    signal (the ranks on other nodes then fail talking to it)."""
    reports = [r for r in reports if r and r.get("failures")]
    if not reports:
        return None

    def key(r):
        first = r["failures"][0]
        return first["exitcode"] == -signal.SIGTERM, int(first["timestamp"]), first["exitcode"] >= 0, r["node"]

    return min(reports, key=key)


def _node_rank(args: list[str]) -> int:
    from posttrain.launch import _option

    value = os.environ.get(NODE_ENV) or _option(args, "--node_rank", "--machine_rank") or "0"
    try:
        return int(value)
    except ValueError:
        return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in ("torchrun", "accelerate"):
        print("usage: python -m posttrain.rounds.agent torchrun|accelerate ARGS...", file=sys.stderr)
        return 2
    tool, args = argv[0], argv[1:]
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    node = _node_rank(args)
    try:
        if tool == "torchrun":
            from torch.distributed.run import main as torchrun

            torchrun(args)
        else:
            from accelerate.commands.launch import launch_command, launch_command_parser

            launch_command(launch_command_parser().parse_args(args))
    except ChildFailedError as err:
        report = report_child_failure(err, node)
    except subprocess.CalledProcessError as err:  # accelerate's one-process launcher
        host = socket.gethostname()
        report = _report([{"rank": 0, "node": node, "host": host, "local_rank": 0, "pid": None,
                           "exitcode": err.returncode, "timestamp": int(time.time()), "error": None}], node, host)
    else:
        return 0
    path = os.environ.get(FAILURE_ENV)
    if path:
        from posttrain.files import atomic_write_json

        atomic_write_json(path, report)
    print(f"posttrain: {report['message']}", file=sys.stderr, flush=True)
    return 1


if __name__ == "__main__":
    sys.exit(main())

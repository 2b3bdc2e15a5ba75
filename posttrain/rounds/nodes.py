"""Several nodes, one run folder: what a training stage checks when its world spans machines.

Node 0 runs the round and writes everything (records, models, the worker's result); the
other nodes' ranks read the same inputs and the same spec from the run folder. That only
works when the run folder is one folder that every node mounts at the same path (NFS,
Lustre, a cloud filesystem): a node with its own local copy (or none) would train on other
data, or fail on a missing file, somewhere deep in a stage.

So the stage worker checks it first (`check_shared_run_folder`): global rank 0 writes a
marker with a fresh token into the stage's folder and publishes the token through the
launcher's store (the TCP store torchrun's agent runs, which every rank reaches at
MASTER_ADDR:MASTER_PORT); the first rank of every other node waits (a timeout) for that
marker to appear in its own view of the folder and answers through the store. A node that
does not see it fails in one line naming itself, and so does rank 0, instead of the world
hanging in its first collective. (A node whose rank dies before it answers holds rank 0 in
that wait until the timeout; the dead rank's own node names it: posttrain.rounds.agent.)
"""

from __future__ import annotations

import os
import socket
import time
import uuid
from pathlib import Path

TIMEOUT_ENV = "POSTTRAIN_SHARED_FOLDER_TIMEOUT"
DEFAULT_TIMEOUT = 120.0
"""Seconds a node waits for node 0's marker (NFS attribute caches can hide a new file for a while)."""
_KEY = "posttrain/run_folder"


class SharedFolderError(RuntimeError):
    """A node cannot see the run folder that node 0 writes."""


def _agent_store(timeout: float):
    """A client of the store the launcher's agent runs (None when there is none)."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() != "true":
        return None
    from datetime import timedelta

    from torch.distributed import TCPStore

    return TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                    timeout=timedelta(seconds=timeout), wait_for_workers=False)


def _timeout() -> float:
    return float(os.environ.get(TIMEOUT_ENV) or DEFAULT_TIMEOUT)


def _advice(run_folder: Path) -> str:
    return (f"The run folder ({run_folder}) must be one folder that every node mounts at the same path "
            "(NFS, Lustre, ...): node 0 writes it, the other nodes read their inputs and spec from it. "
            "See the README's 'Several nodes'.")


def _sees(path: Path, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        try:
            os.listdir(path.parent)  # a directory read refreshes an NFS client's view of it
        except OSError:
            pass
        if path.is_file():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.5)


def check_shared_run_folder(out_dir: str | os.PathLike, run_dir: str | os.PathLike, nodes: int,
                            timeout: float | None = None) -> None:
    """Raise SharedFolderError on any rank when a node other than 0 cannot see what node 0
    writes into `out_dir` (see the module's docstring). One process: nothing to check."""
    if nodes <= 1:
        return
    timeout = _timeout() if timeout is None else timeout
    store = _agent_store(timeout)
    if store is None:
        return  # a launcher without an agent store: the spec it read is all the evidence there is
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    node = int(os.environ.get("GROUP_RANK", "0"))
    key = f"{_KEY}/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"
    host = socket.gethostname()
    out = Path(out_dir)
    if rank == 0:
        from posttrain.files import atomic_write_json

        token = uuid.uuid4().hex
        marker = out / f".node0-{token}"
        atomic_write_json(marker, {"host": host, "time": time.time()})
        store.set(f"{key}/token", token)
        try:
            # `get` waits for each node's answer up to the store's timeout, plus its own wait
            answers = {k: store.get(f"{key}/node{k}").decode() for k in range(1, nodes)}
        finally:
            marker.unlink(missing_ok=True)
        blind = {k: a.partition(":")[2] for k, a in answers.items() if a != "ok"}
        if blind:
            who = ", ".join(f"node {k} (host {h})" for k, h in sorted(blind.items()))
            raise SharedFolderError(f"{who} cannot see the run folder node 0 writes: the marker node 0 wrote "
                                    f"into {out} did not appear there within {timeout:.0f} s. {_advice(Path(run_dir))}")
    elif local == 0:
        token = store.get(f"{key}/token").decode()
        seen = _sees(out / f".node0-{token}", timeout)
        store.set(f"{key}/node{node}", "ok" if seen else f"missing:{host}")
        if not seen:
            raise SharedFolderError(f"node {node} (host {host}) cannot see the run folder node 0 "
                                    f"({os.environ.get('MASTER_ADDR')}) writes: the marker node 0 wrote into {out} "
                                    f"did not appear there within {timeout:.0f} s. {_advice(Path(run_dir))}")


# ------------------------------------------------------------------------------- failures


def collect_failures(out_dir: str | os.PathLike, nodes: int, since: float, wait: float = 10.0) -> list[dict]:
    """The failure reports the nodes' agents wrote for a launch that started at `since`
    (posttrain.rounds.agent), waiting up to `wait` seconds for the other nodes' (their ranks
    fail a moment after the first one)."""
    from posttrain.rounds.agent import failure_file, read_failure

    deadline = time.monotonic() + wait
    while True:
        reports = [read_failure(p) for k in range(nodes) for p in [failure_file(out_dir, k)]
                   if p.is_file() and p.stat().st_mtime >= since - 1]
        reports = [r for r in reports if r]
        if len(reports) >= nodes or time.monotonic() >= deadline:
            return reports
        time.sleep(0.5)

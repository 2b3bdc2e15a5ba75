"""One writer per run folder (issue 25): a second writing command is refused at once, naming
the holder; reading commands work while it runs; the lock goes with the holder, kill -9 too."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest
from run_folders import record_round, write_recipe

from posttrain.cli import main
from posttrain.runlock import LOCK, RunLocked, holder, run_lock

HOLD = """
import sys, time
from posttrain.runlock import run_lock
sys.argv = ["posttrain", "run", "--rounds", "1", "--run-dir", sys.argv[1]]
with run_lock(sys.argv[-1]):
    print("held", flush=True)
    time.sleep(120)
"""


@pytest.fixture
def held(tmp_path):
    """A run folder whose lock another process holds (as a running `posttrain run` would)."""
    run = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(run)], stdout=subprocess.PIPE, text=True, env=env)
    assert proc.stdout.readline().strip() == "held"
    yield run, proc
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def test_a_second_writer_is_refused_naming_the_holder_and_kill_9_frees_it(held, tmp_path, capsys):
    run, proc = held
    info = holder(run)
    assert info["pid"] == proc.pid and info["host"] == socket.gethostname()
    assert info["command"] == f"posttrain run --rounds 1 --run-dir {run}"
    assert abs(info["started"] - time.time()) < 60

    started = time.monotonic()
    code = main(["run-round", "1", "--recipe", "demo", "--run-dir", str(run)])
    err = capsys.readouterr().err
    assert time.monotonic() - started < 10  # at once, not after waiting
    assert code == 1 and "Traceback" not in err
    assert err.startswith(f"posttrain run-round: {run} is being written by another posttrain (pid {proc.pid} on "
                          f"{socket.gethostname()}, started ")
    assert f"UTC: posttrain run --rounds 1 --run-dir {run})" in err
    assert len(err.strip().splitlines()) == 1
    assert sorted(p.name for p in run.iterdir()) == [LOCK]  # nothing else was written

    assert main(["status", str(run)]) == 0  # reading needs no lock
    assert main(["verify", str(run)]) == 0
    capsys.readouterr()

    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert holder(run) is None
    with run_lock(run):
        assert holder(run)["pid"] == os.getpid()
    assert holder(run) is None


def test_every_writing_command_takes_it(held, tmp_path, tiny_model_dir):
    run, proc = held
    from posttrain import api

    recipe = write_recipe(tmp_path, tiny_model_dir)
    record_round(run, 1, tiny_model_dir)  # made under the holder's nose: what a refused writer would touch
    shutil.copy(recipe, run / "recipe.yaml")
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*")}
    for call in (lambda: api.run(recipe, run, rounds="1-2", force=True),
                 lambda: api.run_round(2, recipe, run),
                 lambda: api.evaluate(run, 1, force=True),
                 lambda: api.annotate_import(run, 1, tmp_path / "labels.jsonl"),
                 lambda: api.demo(run_dir=run, rounds="1")):
        with pytest.raises(RunLocked, match=f"pid {proc.pid}"):
            call()
    assert {p: p.stat().st_mtime_ns for p in run.rglob("*")} == before


def test_the_holder_may_take_it_again(tmp_path):
    with run_lock(tmp_path), run_lock(tmp_path):  # run -> run_round in one process
        assert holder(tmp_path)["pid"] == os.getpid()
    assert holder(tmp_path) is None

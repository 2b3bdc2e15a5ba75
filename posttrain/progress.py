"""One progress bar for the long part of a stage, whichever process does the work.

A training stage runs in a worker process whose output goes to the run's log, not to the
terminal. The worker reports progress as marker lines on its stdout instead (`report`), and
the orchestrator, which reads that output, turns them into one tqdm bar (`Bar`) and keeps
them out of the log. In-process work (sampling, evaluation, the world build) uses `bar()`.
`POSTTRAIN_PROGRESS=0` turns every bar off (tests do).
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from pathlib import Path

MARKER = "\x1eposttrain-progress "
"""Starts a progress line; the record separator never appears in ordinary output."""
LINES_ENV = "POSTTRAIN_PROGRESS_LINES"
"""Set to 1 by the orchestrator in a worker's environment: report progress as marker lines."""


def enabled() -> bool:
    return os.environ.get("POSTTRAIN_PROGRESS", "1") != "0"


def bar(total: int | None, desc: str, unit: str = "it", **kwargs):
    """A tqdm bar on stderr when it is a terminal; elsewhere (a log file, CI) a `Lines`
    progress that writes a line every 10% instead of redrawing with carriage returns.
    POSTTRAIN_PROGRESS=0 turns both off."""
    from tqdm.auto import tqdm

    if enabled() and not _is_terminal(sys.stderr):
        return Lines(total, desc, unit)
    return tqdm(total=total, desc=desc, unit=unit, disable=not enabled(), leave=False,
                dynamic_ncols=True, **kwargs)


def _is_terminal(stream) -> bool:
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


class Lines:
    """Progress as plain lines: `desc: 30% (3/10 shards)` each time another tenth is done,
    and one closing line (with the count only, when the total is unknown). The part of tqdm's
    interface posttrain uses: `n`, `update`, `refresh`, `close`, a context manager."""

    STEP = 10
    """Percent between two lines."""

    def __init__(self, total: int | None, desc: str, unit: str = "it", stream=None):
        self.total, self.desc, self.unit = total, desc, unit
        self.n = 0
        self._stream = stream
        self._shown = 0  # the last percentage written
        self._closed = False

    def _write(self, text: str) -> None:
        stream = self._stream or sys.stderr
        stream.write(f"{self.desc}: {text}\n")
        stream.flush()

    def update(self, k: int = 1) -> None:
        self.n += k
        self.refresh()

    def refresh(self) -> None:
        if not self.total or self._closed:
            return
        percent = min(100, self.n * 100 // self.total) // self.STEP * self.STEP
        if percent > self._shown:
            self._shown = percent
            self._write(f"{percent}% ({self.n}/{self.total} {self.unit})")

    def close(self) -> None:
        if self._closed:
            return
        self.refresh()
        self._closed = True
        if not self.total:
            self._write(f"{self.n} {self.unit}")

    def __enter__(self) -> "Lines":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def report(done: int, total: int | None, desc: str, unit: str = "step") -> None:
    """Report progress from a worker (a no-op outside one)."""
    if os.environ.get(LINES_ENV) != "1":
        return
    event = {"done": int(done), "total": None if total is None else int(total), "desc": desc, "unit": unit}
    sys.stdout.write(MARKER + json.dumps(event) + "\n")
    sys.stdout.flush()


def parse(line: bytes) -> dict | None:
    """The event of a marker line, or None for an ordinary line."""
    if not line.startswith(MARKER.encode()):
        return None
    try:
        return json.loads(line[len(MARKER):])
    except ValueError:
        return None


class Bar:
    """The orchestrator's side: one bar per stage, re-labelled when the worker's `desc`
    changes (e.g. from one variant to the next)."""

    def __init__(self, prefix: str):
        self.prefix = prefix
        self._bar = None
        self._desc = None

    def update(self, event: dict) -> None:
        if self._bar is None or event["desc"] != self._desc:
            self.close()
            self._desc = event["desc"]
            self._bar = bar(event["total"], f"{self.prefix} {event['desc']}", unit=event["unit"])
        self._bar.n = event["done"]
        self._bar.refresh()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def trainer_callback():
    """A TrainerCallback that reports the optimizer steps of a training run (rank 0 only),
    labelled with the variant's folder name."""
    from transformers import TrainerCallback

    class _Progress(TrainerCallback):
        def __init__(self):
            self._last = 0.0

        def _emit(self, args, state, force=False):
            now = time.monotonic()
            if state.is_world_process_zero and (force or now - self._last > 0.5):
                self._last = now
                folder = Path(args.output_dir)
                name = folder.parent.name if folder.name in ("checkpoints", "work") else folder.name
                report(state.global_step, state.max_steps, f"train {name}")

        def on_train_begin(self, args, state, control, **kwargs):
            self._emit(args, state, force=True)

        def on_step_end(self, args, state, control, **kwargs):
            self._emit(args, state, force=state.global_step == state.max_steps)

    return _Progress()


@contextlib.contextmanager
def library_bars_off():
    """No transformers/datasets progress bars inside the block (a stage run in the
    orchestrator's process loads models too); they come back after it as they were."""
    if os.environ.get("POSTTRAIN_VERBOSE") == "1":
        yield
        return
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


def quiet_libraries() -> None:
    """In a worker: no library progress bars (the orchestrator draws the stage's one bar) and
    no warnings posttrain expects. Everything else still reaches the run's log."""
    import warnings

    if os.environ.get("POSTTRAIN_VERBOSE") == "1":
        return
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    # TRL's trainers ask the model `is_gradient_checkpointing`, which newer transformers
    # renamed; the call is inside TRL, so the warning cannot be avoided from here.
    warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning)

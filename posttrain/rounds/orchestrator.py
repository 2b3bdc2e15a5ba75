"""The round orchestrator: runs the registered stages (posttrain.stage.REGISTRY) in order:
rm -> sample -> sft -> dpo -> average -> eval.

Each stage's inputs are resolved by the stage itself (`StageDef.resolve`) from the recipe and
the outputs that earlier stages and rounds recorded (never a guessed path). A stage is
skipped when its record matches its inputs, resumed when it has no record, and refused when
its inputs changed (unless forced). Most stages run in their own process
(`posttrain.rounds.worker`); stages that use the reward (`sample`, `eval`) run here and start
their generation in a child process, so a reward object passed from Python works.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

from posttrain import progress
from posttrain.files import atomic_write_json, atomic_write_text, read_json
from posttrain.recipe import LoadedRecipe, Recipe, load_recipe
from posttrain.records import (
    InputHasher,
    OutputsDamaged,
    Record,
    as_record,
    check_record,
    discard_stage,
    output_path,
    plan_stage,
    read_record,
    round_dir,
    stage_dir,
    write_record,
)
from posttrain.stage import (
    WAITING_FILE,
    MetricsMissing,
    RoundError,
    StageDef,
    StageWaiting,
    format_headline,
    hashed_inputs,
    headline,
    round_model_stage,
    steps,
)
from posttrain.runlock import run_lock
from posttrain.stage import get as get_stage

log = logging.getLogger("posttrain")


class _TerminalFilter(logging.Filter):
    """What the terminal shows of the run's log: posttrain's own one-line messages at INFO and
    above (DEBUG goes to the file only), everything with --verbose."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, FILE_ONLY, False):
            return verbose()
        return verbose() or record.levelno >= logging.INFO


class _TerminalFormatter(logging.Formatter):
    """The terminal's lines: a record's message without its traceback (the log file has it),
    unless --verbose."""

    def format(self, record: logging.LogRecord) -> str:
        if (record.exc_info or record.stack_info) and not verbose():
            record = logging.makeLogRecord({**record.__dict__, "exc_info": None, "exc_text": None,
                                            "stack_info": None})
            record.msg = f"{record.msg} (traceback in posttrain.log)"
        return super().format(record)


FILE_ONLY = "posttrain_file_only"
"""A log record with this attribute set goes to posttrain.log only (a traceback the terminal
names instead of printing)."""


def verbose() -> bool:
    """`--verbose` (POSTTRAIN_VERBOSE=1): show the workers' full output on the terminal too."""
    return os.environ.get("POSTTRAIN_VERBOSE") == "1"


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever `sys.stderr` is when a line is logged, not to the stream it was when
    logging was set up (a redirected or replaced stderr gets the lines; a closed one is never kept)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


def setup_logging(run_dir: Path, name: str = "posttrain.log") -> None:
    """Log everything to RUN_DIR/posttrain.log (appending across runs); the terminal gets one
    line per stage start and end (and everything with --verbose). Another node than 0 logs to
    its own file (`name`): two machines never append to one file."""
    run_dir.mkdir(parents=True, exist_ok=True)
    logfile = str((run_dir / name).resolve())
    if any(getattr(h, "baseFilename", None) == logfile for h in log.handlers):
        return
    for h in [h for h in log.handlers if isinstance(h, logging.FileHandler)]:
        log.removeHandler(h)  # a previous run folder's log in the same process
        h.close()
    fh = logging.FileHandler(logfile)
    fh.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
    log.addHandler(fh)
    if not any(getattr(h, "_posttrain_terminal", False) for h in log.handlers):
        sh = _StderrHandler()
        sh.setFormatter(_TerminalFormatter("%(asctime)s %(message)s", "%H:%M:%S"))
        sh.addFilter(_TerminalFilter())
        sh._posttrain_terminal = True
        log.addHandler(sh)
    log.setLevel(logging.DEBUG)
    log.propagate = False


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env[progress.LINES_ENV] = "1"
    if not verbose():
        # Library progress bars would only fill the log with carriage returns.
        env.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    return env


def stream_worker(cmd: list[str], env: dict[str, str], logfile: Path, label: str,
                  peers_failed: Callable[[], bool] | None = None) -> tuple[int, collections.deque]:
    """Run a stage's process: its output lines go to `logfile` (and to the terminal with
    --verbose), its progress reports drive one bar labelled `label`. Returns the exit code and
    the last 60 output lines. `peers_failed` (several nodes): polled every second; once it is
    true the process is stopped (SIGTERM), since this node's ranks may be waiting for a dead
    node's ranks in a collective or the process group's set-up (gloo and NCCL wait 30 minutes)."""
    tail: collections.deque[bytes] = collections.deque(maxlen=60)
    bar = progress.Bar(label)
    show = verbose()
    try:
        with open(logfile, "ab") as logf:
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
            assert proc.stdout is not None
            if peers_failed is not None:
                threading.Thread(target=_stop_when, args=(proc, peers_failed), daemon=True).start()
            for line in iter(proc.stdout.readline, b""):
                event = progress.parse(line)
                if event is not None:
                    bar.update(event)
                    continue
                logf.write(line)
                logf.flush()
                tail.append(line)
                if show:
                    sys.stdout.buffer.write(line)
                    sys.stdout.flush()
            code = proc.wait()
    finally:
        bar.close()
    return code, tail


def _failed_since(files: list[Path], since: float) -> bool:
    """Whether another node's agent wrote a failure report during this launch."""
    for f in files:
        try:
            if f.stat().st_mtime >= since - 1.0:
                return True
        except OSError:
            continue
    return False


def _stop_when(proc: subprocess.Popen, peers_failed: Callable[[], bool]) -> None:
    while proc.poll() is None:
        if peers_failed():
            log.info("another node's ranks failed: stopping this node's")
            proc.terminate()
            return
        time.sleep(1.0)


class Round:
    """One round of one run: resolves inputs, plans and runs each stage, writes records."""

    def __init__(self, n: int, recipe: LoadedRecipe, run_dir: Path, *, reward=None, force: bool = False,
                 redo: tuple[str, ...] = (), annotator=None):
        self.n = n
        self.annotator_override = annotator
        self.redo = frozenset(redo)
        self.redone = False  # once a stage is redone, later ones whose inputs changed rerun
        self.loaded = recipe
        self.recipe: Recipe = recipe.for_round(n)
        self.run_dir = run_dir
        self.reward_override = reward
        self.force = force
        self.hasher = InputHasher(run_dir)
        self.records: dict[str, dict] = {}
        self.verified: set[tuple[int, str, str]] = set()  # (round, stage, output) checked against its record
        for m in range(1, n):
            for stage in steps():
                rec = read_record(run_dir, m, stage)
                if rec:
                    self.hasher.learn(rec)

    # ------------------------------------------------------------------ what stages may ask (stage.Resolver)

    def path(self, value: str) -> str:
        return self.loaded.resolve_path(value)

    def record(self, stage: str, n: int | None = None) -> Record | None:
        """Stage `stage`'s record in round `n` (default: this round), or None if unfinished."""
        if n is None or n == self.n:
            return as_record(self.records.get(stage) or read_record(self.run_dir, self.n, stage))
        return as_record(read_record(self.run_dir, n, stage))

    def output(self, stage: str, name: str, n: int | None = None) -> Any:
        """An output of a finished stage as an absolute path (a list for list outputs)."""
        rec = self.record(stage, n)
        if rec is None:
            raise RoundError(f"round {n or self.n} has no finished {stage} stage, needed by round {self.n}")
        out = output_path(self.run_dir, rec, name)
        self.check_outputs(rec, [name])
        return [str(p) for p in out] if isinstance(out, list) else str(out)

    def preference_files(self, *, only_latest: bool) -> list[str]:
        """The preference batches available in this round (all, or the latest round's): the
        recipe's fixed batches and those stages made in earlier rounds (the annotate step's
        labelled batches; `StageDef.preference_batches`, from their records)."""
        batches = [(b.round, self.path(b.path)) for b in self.recipe.data.preference_batches if b.round <= self.n]
        for step in steps():
            made = get_stage(step).preference_batches
            if made is not None:
                batches += made(self)
        if only_latest and batches:
            latest = max(r for r, _ in batches)
            batches = [b for b in batches if b[0] == latest]
        return [path for _, path in batches]

    def previous_model(self) -> str | None:
        """The previous round's model (None in round 1): its `StageDef.round_model` output."""
        if self.n == 1:
            return None
        defn = round_model_stage()
        return self.output(defn.name, defn.round_model, self.n - 1)

    def initial_policy(self) -> str:
        return self.path(self.recipe.models.initial_policy or self.recipe.models.base)

    # ------------------------------------------------------------------ running

    def stage_seed(self) -> int:
        return self.recipe.seed + 1000 * self.n

    def _spec(self, defn: StageDef, inputs) -> dict:
        out_dir = stage_dir(self.run_dir, self.n, defn.name)
        return {
            "stage": defn.name,
            "round": self.n,
            "run_dir": str(self.run_dir.resolve()),
            "out_dir": str(out_dir.resolve()),
            "inputs": dataclasses.asdict(inputs),
            "seed": self.stage_seed(),
            "recipe": self.recipe.model_dump(mode="json"),
            "result": str((out_dir / ".result.json").resolve()),
        }

    def _reward_identity(self) -> Any:
        if self.reward_override is not None:
            from posttrain.reward import reward_fingerprint

            obj = self.reward_override
            return {"object": f"{type(obj).__module__}:{type(obj).__qualname__}",
                    "fingerprint": reward_fingerprint(obj)}
        spec = self.recipe.reward
        return spec if isinstance(spec, str) else spec.model_dump()

    def build_reward(self, reward_model: str | None):
        """The reward for sampling and evaluation: a Python object, an import path, or the RM.

        Inside an import-path spec's kwargs, the string "@rm" stands for this round's trained
        reward model, e.g. a checker with the RM as tie-break:
        `{target: posttrain.reward:WeightedReward, kwargs: {components: [[{target: ...}, 1.0], ["@rm", 0.01]]}}`.
        """
        from posttrain.reward import RMReward, load_reward

        def rm():
            return RMReward(reward_model, device=self.recipe.run.device,
                            trust_remote_code=self.recipe.models.trust_remote_code)

        if self.reward_override is not None:
            return load_reward(self.reward_override)
        spec = self.recipe.reward
        if spec == "rm":
            return rm()
        return load_reward({"target": spec.target, "kwargs": fill_rm_placeholders(spec.kwargs, rm)})

    def check_outputs(self, record: Record | dict, names: list[str] | None = None) -> None:
        """Verify before trust: a recorded output is used only while its files are what the
        record says (posttrain.records.check_record); else OutputsDamaged names the file and
        the command that makes it again."""
        record = as_record(record)
        names = list(record.outputs) if names is None else names
        keys = {(record.round or self.n, record.stage, name) for name in names}
        if keys <= self.verified:
            return
        damage = check_record(self.run_dir, record, names)
        if damage:
            raise OutputsDamaged(self.run_dir, damage, str(self.loaded.path))
        self.verified |= keys

    def stage_inputs(self, defn: StageDef) -> tuple[Any, dict]:
        """A stage's typed inputs, and everything hashed into its record's `input_hash`: the
        inputs (files by content), its config section, seed, chat format, the recipe settings
        it declares (`StageDef.settings`), its reward and launcher."""
        config = defn.config_of(self.recipe)
        inputs = defn.resolve(self)
        hashed = {
            "inputs": hashed_inputs(inputs, self.hasher.hash_paths),
            "config": config.model_dump(mode="json"),
            "seed": self.stage_seed(),
            "chat": self.recipe.chat.model_dump(mode="json"),
            "extra": defn.settings(self.recipe),
        }
        if defn.uses_reward:
            hashed["reward"] = self._reward_identity()
        if defn.uses_annotator and self.annotator_override is not None:
            from posttrain.reward import reward_fingerprint

            obj = self.annotator_override  # a recipe's annotator is part of the config already
            hashed["annotator"] = {"object": f"{type(obj).__module__}:{type(obj).__qualname__}",
                                   "fingerprint": reward_fingerprint(obj)}
        launch = self.launch_plan(defn)
        if launch.launcher is not None:  # how many processes, and how, is an input of a training stage
            hashed["launch"] = launch.identity(self.hasher.hash_paths)
        return inputs, hashed

    def run_stage(self, stage: str) -> dict:
        defn = get_stage(stage)
        config = defn.config_of(self.recipe)
        inputs, hashed = self.stage_inputs(defn)
        launch = self.launch_plan(defn)
        if stage in self.redo:
            if discard_stage(self.run_dir, self.n, stage):
                log.info("round %d %s: redo: its record and folder were removed", self.n, stage)
            self.redone = True
        plan = plan_stage(self.run_dir, self.n, stage, hashed, force=self.force or self.redone)
        if plan.action == "skip" and self.force and check_record(self.run_dir, plan.record):
            # --force makes a stage whose recorded outputs are missing or changed again, from scratch
            discard_stage(self.run_dir, self.n, stage)
            log.info("round %d %s: its recorded outputs are damaged: running it again", self.n, stage)
            self.redone = True
            plan = plan_stage(self.run_dir, self.n, stage, hashed, force=True)
        if plan.action == "skip":
            self.check_outputs(plan.record)
            log.info("round %d %s: finished earlier, skipped", self.n, stage)
            self.hasher.learn(plan.record)
            self._remove_work(stage)  # left behind when a run stopped right after the record
            return plan.record
        out_dir = stage_dir(self.run_dir, self.n, stage)
        out_dir.mkdir(parents=True, exist_ok=True)
        attempts = Attempts(out_dir)
        resumed = any(p.name not in (".result.json", ".spec.json", Attempts.FILE) for p in out_dir.iterdir())
        log.info("round %d %s: %s", self.n, stage,
                 f"resuming (work in {out_dir})" if resumed else "starting")
        started = attempts.begin()
        launched = launch.spec()
        try:
            if defn.uses_reward or defn.uses_annotator:
                result = self._run_in_process(defn, inputs, config)
            else:
                spec = self._spec(defn, inputs)
                spec["launch"] = launched
                result = self._run_in_worker(stage, spec, launch.command)
        except StageWaiting as waiting:  # not a failure: the round waits (for people labelling)
            attempts.end("waiting")
            log.info("%s", waiting)
            raise
        except Exception as err:
            attempts.end(f"failed: {first_line(err)}")
            raise self._logged_failure(stage, err) from err
        try:
            self.verify_outputs(defn, result["outputs"])
        except ValueError as err:
            attempts.end(f"failed: {first_line(err)}")
            raise RoundError(f"round {self.n} {stage}: its output is incomplete, so no record was written: "
                             f"{err}. Run again with --redo {stage} to start it from scratch.") from None
        unwritten = defn.metrics.missing(result["metrics"])
        if unwritten:  # what status and the report read must be there: a bug in the stage, not the input
            attempts.end("failed: metrics missing")
            raise MetricsMissing(f"round {self.n} {stage}: its metrics lack {', '.join(unwritten)}, which "
                                 f"{defn.metrics.__name__} says it always writes, so no record was written")
        record = write_record(self.run_dir, self.n, stage, plan=plan, outputs=result["outputs"],
                              metrics=result["metrics"], started=started,
                              earlier_seconds=attempts.earlier_seconds(), launch=launched)
        attempts.end("done")
        self.hasher.learn(record)
        self._remove_work(stage)
        log.info("round %d %s: done in %s%s", self.n, stage, _duration(record["timing"]["seconds"]),
                 _summary(stage, result["metrics"]))
        return record

    def _logged_failure(self, stage: str, err: Exception) -> Exception:
        """A stage that failed in this process: its full traceback goes to the run's log (not
        to the terminal), and the error to raise names the log. A user error (bad data, a
        reward that raised) keeps its type and message, with the log's path as a note; any
        other exception becomes a RoundError saying the same."""
        from posttrain.errors import USER_ERRORS

        logfile = (self.run_dir / "posttrain.log").resolve()
        log.error("round %d stage %r failed:", self.n, stage, exc_info=err, extra={FILE_ONLY: True})
        if isinstance(err, USER_ERRORS):
            err.add_note(f"The full traceback is in {logfile}.")
            return err
        return RoundError(explain_failure(f"round {self.n} stage {stage!r} failed: {first_line(err)}", logfile))

    def verify_outputs(self, defn: StageDef, outputs: dict) -> None:
        """Each output the stage declares a model folder (StageDef.model_outputs) is complete."""
        from posttrain.modeling import verify_model_folder

        for name in defn.model_outputs:
            rels = outputs.get(name)
            if rels is None:
                raise ValueError(f"the stage reported no {name!r} output")
            for rel in rels if isinstance(rels, list) else [rels]:
                verify_model_folder(self.run_dir / rel)

    def _remove_work(self, stage: str) -> None:
        """A finished stage's checkpoints go once its record exists (run.keep_checkpoints keeps them)."""
        from posttrain.training import remove_work

        if not self.recipe.run.keep_checkpoints:
            freed = remove_work(stage_dir(self.run_dir, self.n, stage))
            if freed:
                log.debug("round %d %s: removed its work folder (%.2f GB)", self.n, stage, freed / 1e9)

    def _run_in_process(self, defn: StageDef, inputs, config) -> dict:
        """A stage that gets the reward or the annotator runs here, so objects passed from
        Python work; it starts its own child processes for generation. It gets this round's
        typed recipe and inputs as they are (the worker's spec is for another process)."""
        from posttrain.rounds.worker import make_context
        from posttrain.stage import module

        ctx = make_context(defn, self.n, self.run_dir.resolve(), stage_dir(self.run_dir, self.n, defn.name).resolve(),
                           self.recipe, inputs, self.stage_seed())
        if defn.uses_reward:
            ctx.reward = self.build_reward(inputs.reward_model)
        if defn.uses_annotator:
            from posttrain.annotate.base import load_annotator

            ctx.annotator = load_annotator(self.annotator_override if self.annotator_override is not None
                                           else config.annotator)
        ctx.out_dir.mkdir(parents=True, exist_ok=True)
        with progress.library_bars_off():
            result = module(defn.name).run(ctx)
        return {"outputs": result.outputs, "metrics": result.metrics}

    def launch_plan(self, defn: StageDef):
        """How a stage is started: the recipe's launcher for training stages (posttrain.launch),
        plain Python for everything else."""
        from posttrain.launch import plan_launch

        launcher = self.recipe.run.launcher if defn.launcher else None
        return plan_launch(launcher, base_dir=self.loaded.path.parent)

    def _run_in_worker(self, stage: str, spec: dict, command: list[str]) -> dict:
        """Run a stage in its worker process. Its output goes to the run's log (and to the
        terminal with --verbose); its progress reports drive one bar on the terminal. A failed
        rank is named by the launcher's agent (posttrain.rounds.agent), on any node."""
        from posttrain.rounds.agent import FAILURE_ENV, NODE_ENV, failure_file, root_cause
        from posttrain.rounds.nodes import collect_failures

        out_dir = Path(spec["out_dir"])
        spec_path = out_dir / ".spec.json"
        nodes = int(spec["launch"].get("nodes", 1))
        for k in range(nodes):
            failure_file(out_dir, k).unlink(missing_ok=True)
        atomic_write_json(spec_path, spec)
        result_path = Path(spec["result"])
        result_path.unlink(missing_ok=True)
        cmd = [*command, "-m", "posttrain.rounds.worker", str(spec_path)]
        log.debug("round %d %s: %s", self.n, stage, " ".join(cmd))
        logfile = self.run_dir / "posttrain.log"
        started = time.time()
        env = {**_child_env(), FAILURE_ENV: str(failure_file(out_dir, 0)), NODE_ENV: "0"}
        others = [failure_file(out_dir, k) for k in range(1, nodes)]
        code, tail = stream_worker(cmd, env, logfile, f"round {self.n} {stage}",
                                   (lambda: _failed_since(others, started)) if others else None)
        if code != 0 or not result_path.exists():
            report = root_cause(collect_failures(out_dir, nodes, started, wait=10.0 if nodes > 1 else 0.0))
            cause = report["message"] if report else worker_error(tail)
            raise RoundError(explain_failure(
                f"round {self.n} stage {stage!r} failed (exit code {code})" + (f": {cause}" if cause else ""),
                logfile))
        result = read_json(result_path)
        result_path.unlink()
        return result

    def run(self, evaluate: bool | None = None) -> dict[str, dict]:
        """Every registered stage the round's recipe enables, in order. `evaluate` overrides
        whether the evaluation (`StageDef.evaluation`: `eval`) runs (default: `eval.enabled`)."""
        if self.n > 1:  # what this round builds on is checked before any work
            for stage in steps():
                rec = read_record(self.run_dir, self.n - 1, stage)
                if rec is not None and get_stage(stage).required:
                    self.check_outputs(rec)
        for stage in steps():
            defn = get_stage(stage)
            enabled = defn.enabled(self.recipe)
            if defn.evaluation and evaluate is not None:
                enabled = evaluate
            if enabled:
                self.records[stage] = self.run_stage(stage)
        return self.records


def fill_rm_placeholders(value, make_rm):
    """`value` with every "@rm" string replaced by `make_rm()` (the round's reward model)."""
    if value == "@rm":
        return make_rm()
    if isinstance(value, list):
        return [fill_rm_placeholders(v, make_rm) for v in value]
    if isinstance(value, dict):
        return {k: fill_rm_placeholders(v, make_rm) for k, v in value.items()}
    return value


def _summary(step: str, metrics: dict) -> str:
    shown = format_headline(headline(step, metrics))
    return f" · {shown}" if shown else ""


def _duration(seconds: float) -> str:
    seconds = round(seconds)
    return f"{seconds // 60} min {seconds % 60:02d} s" if seconds >= 60 else f"{seconds} s"


def first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0]}" if text else type(err).__name__


_ERROR_LINE = re.compile(rb"^([A-Za-z_][\w.]*(Error|Errors|Exception|Exit|Interrupt)\b.*)$")


def worker_error(tail) -> str | None:
    """The exception line of a worker's traceback (the last one, as Python prints it last),
    so the terminal names the cause without the whole traceback."""
    for line in reversed(tail):
        m = _ERROR_LINE.match(line.strip())
        if m:
            text = m.group(1).decode("utf-8", "replace")
            name, sep, rest = text.partition(":")
            text = name.rsplit(".", 1)[-1] + sep + rest  # posttrain.data.DataErrors -> DataErrors
            return text if len(text) <= 600 else text[:600] + " ..."
    return None


def explain_failure(message: str, logfile: Path) -> str:
    """A failure message that says whose fault it is and what to do next."""
    from posttrain.world.build import world_error_hint

    hint = world_error_hint(message)
    if hint:
        return f"{message}\n{hint}\nThe full output is in {logfile}."
    return (f"{message}\nThe full output is in {logfile}. Fix the cause and run the same command "
            f"again: finished stages are skipped and this one resumes.")


class Attempts:
    """The attempts at one stage, kept beside its work (`.attempts.json`), so a stage that was
    killed and resumed reports its whole time, and `status` can tell failed from partial.

    A killed attempt cannot note when it ended; its end is taken as the newest change to any
    file in the stage folder, which is when it last did work.
    """

    FILE = ".attempts.json"

    def __init__(self, out_dir: Path):
        self.path = out_dir / self.FILE
        self.out_dir = out_dir
        self.items: list[dict] = read_json(self.path) if self.path.is_file() else []

    def begin(self) -> float:
        last = self.items[-1] if self.items else None
        if last is not None and last.get("ended") is None:
            last["ended"] = max([last["started"], *(p.stat().st_mtime for p in self.out_dir.rglob("*")
                                                    if p.is_file() and p.name != self.FILE)])
            last["outcome"] = "interrupted"
        started = time.time()
        self.items.append({"started": started, "ended": None, "outcome": None})
        atomic_write_json(self.path, self.items)
        return started

    def end(self, outcome: str) -> None:
        self.items[-1].update(ended=time.time(), outcome=outcome)
        atomic_write_json(self.path, self.items)

    def earlier_seconds(self) -> float:
        return sum(a["ended"] - a["started"] for a in self.items[:-1] if a.get("ended"))

    @classmethod
    def last_outcome(cls, out_dir: Path) -> str | None:
        path = out_dir / cls.FILE
        items = read_json(path) if path.is_file() else []
        return items[-1].get("outcome") if items else None


def check_previous_round(run_dir: Path, n: int, loaded: LoadedRecipe | None = None) -> None:
    if n == 1:
        return
    previous = loaded.for_round(n - 1) if loaded is not None else None
    missing = [s for s in steps() if get_stage(s).required and read_record(run_dir, n - 1, s) is None
               and (previous is None or get_stage(s).enabled(previous))]
    waiting = [s for s in missing if (stage_dir(run_dir, n - 1, s) / WAITING_FILE).is_file()]
    if waiting and waiting == missing:
        summary = read_json(stage_dir(run_dir, n - 1, waiting[0]) / WAITING_FILE).get("summary", "")
        raise StageWaiting(f"round {n - 1} {waiting[0]}: waiting: {summary}. Round {n} starts once it is "
                           f"done: run round {n - 1} again to pick it up.")
    if missing:
        recipe = f" --recipe {loaded.path}" if loaded is not None else ""
        raise RoundError(f"round {n} needs round {n - 1} finished, but round {n - 1} has no record for: "
                         f"{', '.join(missing)}. Run `posttrain run-round {n - 1}{recipe} --run-dir {run_dir}` "
                         f"first.")


def _snapshot_recipe(loaded: LoadedRecipe, run_dir: Path) -> None:
    snap = run_dir / "recipe.yaml"
    text = loaded.path.read_text(encoding="utf-8")
    if not snap.exists() or snap.read_text(encoding="utf-8") != text:
        atomic_write_text(snap, text)


NODE_WAIT_ENV = "POSTTRAIN_NODE_WAIT"
"""Seconds a node other than 0 waits for node 0 to start the round in the run folder (default 600)."""


def node_rank(loaded: LoadedRecipe, n: int) -> int:
    """This machine's node among those round `n`'s training stages span (`run.launcher`'s
    --node_rank / --machine_rank, posttrain.launch); 0 with one node or no launcher."""
    from posttrain.launch import plan_launch

    launcher = loaded.for_round(n).run.launcher
    return plan_launch(launcher, base_dir=loaded.path.parent).node_rank if launcher else 0


def _wait_for_node0(loaded: LoadedRecipe, run_dir: Path, node: int, master: str | None) -> None:
    """Node 0 writes the recipe it runs into the run folder when a round starts; wait until it
    is there and is this node's recipe too, or say why not."""
    wait = float(os.environ.get(NODE_WAIT_ENV) or 600)
    snap = run_dir / "recipe.yaml"
    text = loaded.path.read_text(encoding="utf-8")
    deadline = time.monotonic() + wait
    while True:
        try:
            os.listdir(run_dir)  # refresh an NFS client's view
        except OSError:
            pass
        seen = snap.read_text(encoding="utf-8") if snap.is_file() else None
        if seen == text:
            return
        if time.monotonic() >= deadline:
            break
        time.sleep(1.0)
    if seen is None:
        raise RoundError(f"node {node}: after {wait:.0f} s the run folder {run_dir} still has no recipe.yaml from "
                         f"node 0 ({master}). Start node 0 with the same command; the run folder must be one folder "
                         "every node mounts at the same path (NFS, Lustre, ...).")
    raise RoundError(f"node {node}: {loaded.path} is not the recipe node 0 runs ({snap} differs after {wait:.0f} s): "
                     "every node runs the same recipe (one file on the shared filesystem, or identical copies)")


def _node0_stopped(run_dir: Path, stages: list[tuple[int, str]], since: float) -> str | None:
    """How node 0's latest attempt at one of `stages` (round, stage) ended, when it ended after
    `since` other than done (failed, or waiting for labels)."""
    for m, stage in stages:
        path = stage_dir(run_dir, m, stage) / Attempts.FILE
        items = read_json(path) if path.is_file() else []
        last = items[-1] if items else None
        if last and last.get("ended") and last["ended"] >= since and last.get("outcome") != "done":
            return f"round {m} {stage}: {last.get('outcome')}"
    return None


def follow_round(n: int, recipe: str | os.PathLike | LoadedRecipe, run_dir: str | os.PathLike, *,
                 stages: tuple[str, ...] | None = None, poll: float = 1.0) -> dict[str, dict]:
    """Round `n` on a node other than 0 of a multi-node launcher: this node starts its ranks of
    every training stage (those `run.launcher` starts), as node 0 reaches it, and nothing else.

    Node 0 (`run_round` there) runs the round: it writes the records, the stages' specs and
    every output, and runs sample, average and eval alone. Here, for each training stage in
    order (or only `stages`), the node waits until node 0 has finished the stages before it
    and has written the stage's spec, then runs this node's share of the launcher with it
    (torchrun/accelerate meet node 0's at the master address); a stage node 0 recorded
    earlier is skipped. Nothing here writes a record or takes the run lock. Returns the records
    node 0 wrote for the stages taken part in.
    """
    from posttrain.launch import plan_launch
    from posttrain.rounds.agent import FAILURE_ENV, NODE_ENV, failure_file, root_cause
    from posttrain.rounds.nodes import collect_failures

    loaded = recipe if isinstance(recipe, LoadedRecipe) else load_recipe(recipe)
    run_dir = Path(run_dir)
    check_round_numbers([n], loaded)
    current = loaded.for_round(n)
    plan = plan_launch(current.run.launcher, base_dir=loaded.path.parent)
    node = plan.node_rank
    if node == 0:
        raise RoundError("follow_round runs on nodes other than 0; node 0 runs run_round")
    _wait_for_node0(loaded, run_dir, node, plan.master)
    logname = f"posttrain.node{node}.log"
    setup_logging(run_dir, logname)
    logfile = run_dir / logname
    log.info("round %d: node %d of %d (%s): this node's ranks of each training stage; node 0 at %s runs the "
             "round", n, node, plan.nodes, plan.summary(), plan.master)
    begun = time.time()
    order = steps()
    wanted = [s for s in order if get_stage(s).launcher and get_stage(s).enabled(current)
              and (stages is None or s in stages)]
    previous = [] if n == 1 else [(n - 1, s) for s in order if get_stage(s).required
                                  and get_stage(s).enabled(loaded.for_round(n - 1))]
    for stage in wanted:
        # Started only once node 0 has recorded everything before it (the previous round too),
        # so a spec left by a killed attempt is used only when node 0 is about to rewrite it.
        before = [(n, s) for s in order[:order.index(stage)] if get_stage(s).enabled(current)] + previous
        out_dir = stage_dir(run_dir, n, stage)
        spec_path = out_dir / ".spec.json"
        launched = waiting = False
        while read_record(run_dir, n, stage) is None:
            stopped = _node0_stopped(run_dir, [*before, (n, stage)], begun)
            if stopped:
                raise RoundError(f"node {node}: node 0 stopped at {stopped}; fix the cause and run the "
                                 "same command on every node again")
            if not launched and spec_path.is_file() and all(read_record(run_dir, m, s) is not None
                                                            for m, s in before):
                ff = failure_file(out_dir, node)
                ff.unlink(missing_ok=True)
                cmd = [*plan.command, "-m", "posttrain.rounds.worker", str(spec_path)]
                log.info("round %d %s: node %d starts its ranks", n, stage, node)
                log.debug("round %d %s: %s", n, stage, " ".join(cmd))
                started = time.time()
                env = {**_child_env(), FAILURE_ENV: str(ff), NODE_ENV: str(node)}
                others = [failure_file(out_dir, k) for k in range(plan.nodes) if k != node]
                code, tail = stream_worker(cmd, env, logfile, f"round {n} {stage} (node {node})",
                                           lambda: _failed_since(others, started))
                if code != 0:
                    report = root_cause(collect_failures(out_dir, plan.nodes, started))
                    cause = report["message"] if report else worker_error(tail)
                    raise RoundError(explain_failure(f"round {n} stage {stage!r} failed on node {node} (exit code "
                                                     f"{code})" + (f": {cause}" if cause else ""), logfile))
                launched = True  # its ranks are done; node 0 verifies the outputs and writes the record
                continue
            if not waiting:
                log.debug("round %d %s: waiting for node 0", n, stage)
                waiting = True
            time.sleep(poll)
        if not launched:
            log.info("round %d %s: finished earlier on node 0, skipped", n, stage)
    return {s: read_record(run_dir, n, s) for s in wanted}


def run_round(n: int, recipe: str | os.PathLike | LoadedRecipe, run_dir: str | os.PathLike, *,
              reward=None, force: bool = False, evaluate: bool | None = None,
              redo: str | tuple[str, ...] | list[str] = (), annotator=None) -> dict[str, dict]:
    """Run round `n` of `recipe` in `run_dir`. Returns the stage records (and `eval`).

    `reward` may be a reward object (posttrain.reward.Reward) or an import-path spec; it
    replaces the recipe's reward for sampling and evaluation. `annotator` likewise replaces
    the recipe's `annotate.annotator` (posttrain.annotate.base.Annotator).
    When a stage waits (the annotate step, for labels), posttrain.stage.StageWaiting is
    raised (not a failure: run the same call again once they are in).
    `redo`: stages (e.g. "dpo") to run again from scratch even though they finished: the
    record and the stage's folder are removed first; later stages whose inputs then change
    rerun too (without it they would refuse, as under a changed recipe).
    """
    redo = (redo,) if isinstance(redo, str) else tuple(redo)
    unknown = sorted(set(redo) - set(steps()))
    if unknown:
        raise RoundError(f"--redo {', '.join(unknown)}: not a stage (stages: {', '.join(steps())})")
    loaded = recipe if isinstance(recipe, LoadedRecipe) else load_recipe(recipe)
    run_dir = Path(run_dir)
    check_round_numbers([n], loaded)
    # Before anything is written to the run folder: reward targets that import and are rewards,
    # a launcher that plans (data files are checked as each stage reads them: later rounds'
    # batches may not exist yet).
    loaded.check(files=False, reward_given=reward is not None)
    if node_rank(loaded, n) > 0:  # another node of a multi-node launcher: node 0 runs the round
        return follow_round(n, loaded, run_dir)
    with run_lock(run_dir):  # one writer per run folder, from the first check to the last record
        check_previous_round(run_dir, n, loaded)  # round order, under the lock
        setup_logging(run_dir)
        _snapshot_recipe(loaded, run_dir)
        log.info("round %d of %s in %s", n, loaded.path.name, run_dir)
        rnd = Round(n, loaded, run_dir, reward=reward, force=force, redo=redo, annotator=annotator)
        return rnd.run(evaluate)


def parse_rounds(spec: str) -> list[int]:
    """`3` -> [3]; `1-6` -> [1..6]; `1,3-4` -> [1, 3, 4]. Anything else is a RoundError
    saying what is wrong (a number is checked against MAX_ROUNDS before a range expands)."""
    from posttrain.schema import MAX_ROUNDS

    usage = "expected round numbers like '3', '1-6' or '1,3-4'"
    out: list[int] = []
    for part in str(spec).split(","):
        part = part.strip()
        m = re.fullmatch(r"(\d+)(?:\s*-\s*(\d+))?", part)
        if not m:
            raise RoundError(f"rounds {spec!r}: {part!r} is not a round or a range of rounds; {usage}")
        lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
        if hi < lo:
            raise RoundError(f"rounds {spec!r}: {part} ends before it starts (rounds run in order: {hi}-{lo}?)")
        if lo < 1:
            raise RoundError(f"rounds {spec!r}: rounds start at 1")
        if hi > MAX_ROUNDS:
            raise RoundError(f"rounds {spec!r}: round {hi} is past the most a recipe may have ({MAX_ROUNDS})")
        out.extend(range(lo, hi + 1))
    return out


def check_round_numbers(rounds: list[int], loaded: LoadedRecipe) -> None:
    """Refuse, before any work, a round the recipe does not have."""
    for n in rounds:
        if isinstance(n, bool) or not isinstance(n, int):
            raise RoundError(f"round {n!r}: a round is a whole number")
        if n < 1:
            raise RoundError(f"round {n}: rounds start at 1")
    past = [n for n in rounds if n > loaded.base.rounds]
    if past:
        raise RoundError(f"round {past[0]}: {loaded.path} has {loaded.base.rounds} rounds (`rounds:` in the recipe); "
                         "nothing was run")


def run_rounds(rounds: list[int], recipe, run_dir, **kwargs) -> dict[int, dict[str, dict]]:
    loaded = recipe if isinstance(recipe, LoadedRecipe) else load_recipe(recipe)
    check_round_numbers(rounds, loaded)  # every one, before round 1 trains anything
    if rounds and node_rank(loaded, rounds[0]) > 0:  # node 0 holds the lock and writes
        return {n: run_round(n, loaded, run_dir, **kwargs) for n in rounds}
    with run_lock(run_dir):  # held between the rounds too
        return {n: run_round(n, loaded, run_dir, **kwargs) for n in rounds}


def round_finished(run_dir: Path, n: int) -> bool:
    return read_record(run_dir, n, round_model_stage().name) is not None


def list_rounds(run_dir: Path) -> list[int]:
    return sorted(int(p.name[6:]) for p in Path(run_dir).glob("round_*") if p.name[6:].isdigit())


__all__ = ["run_round", "run_rounds", "follow_round", "parse_rounds", "RoundError", "Round", "round_dir", "list_rounds"]

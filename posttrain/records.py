"""The run folder and its stage records.

`RUN_DIR/round_NN/<stage>/record.json` is written last and atomically, so its presence means
the stage finished. It holds the hash of every input; the orchestrator compares them to
decide: record present and inputs unchanged -> skip; record absent -> run (continuing from
complete work in the stage folder); record present but inputs changed -> refuse unless
forced.
"""

from __future__ import annotations

import dataclasses
import platform
import re
import shutil
import sys
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from posttrain.files import atomic_write_json, content_files, hash_json, hash_path, read_json, sha256_file

RECORD = "record.json"


class InputsChanged(RuntimeError):
    """A finished stage's inputs differ from its record; rerunning would overwrite its outputs."""


def round_dir(run_dir: str | Path, n: int) -> Path:
    return Path(run_dir) / f"round_{n:02d}"


def stage_dir(run_dir: str | Path, n: int, stage: str) -> Path:
    return round_dir(run_dir, n) / stage


def read_record(run_dir: str | Path, n: int, stage: str) -> dict | None:
    """A stage's record as its JSON (None while unfinished); `load_record` for the typed one."""
    path = stage_dir(run_dir, n, stage) / RECORD
    return read_json(path) if path.exists() else None


@dataclass
class Timing:
    started: float | None = None
    finished: float | None = None
    seconds: float = 0.0
    """Wall time, earlier interrupted attempts included."""
    earlier_attempts_seconds: float = 0.0


@dataclass(eq=False)
class Record:
    """A finished stage's record, typed. On disk it is `record.json`, written as `to_json()`:
    the JSON is what it always was (for a record posttrain wrote, `from_json(d).to_json() ==
    d`, key order included), and `from_json` reads any record posttrain ever wrote (a field an
    older one lacks takes its default; a key this class does not name is kept in `extra`).
    `metrics` is the stage's dict as written; `typed_metrics()` reads it through the stage's
    `Metrics` class."""

    stage: str = "?"
    round: int = 0
    input_hash: str | None = None
    inputs: dict = field(default_factory=dict)
    """Everything hashed into `input_hash` (`Round.stage_inputs`), paths with their hashes."""
    outputs: dict[str, dict] = field(default_factory=dict)
    """name -> {"path": relative path or list of them, "sha256", "files": {path: [size, mtime_ns, sha256]}}."""
    metrics: dict = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)
    timing: Timing = field(default_factory=Timing)
    command: str = ""
    launch: dict | None = None
    """How a training stage was started (launcher, world_size, parallelism); absent for others."""
    extra: dict = field(default_factory=dict)
    """Keys of the JSON this class does not name (kept as they are)."""

    _KEYS = ("stage", "round", "input_hash", "inputs", "outputs", "metrics", "versions", "timing", "command", "launch")

    @classmethod
    def from_json(cls, data: dict) -> Record:
        d = dict(data)
        timing = d.pop("timing", None)
        known = {k: d.pop(k) for k in cls._KEYS if k in d and k != "timing"}
        fields = {k: v for k, v in (timing or {}).items() if k in Timing.__dataclass_fields__}
        return cls(**known, timing=Timing(**fields), extra=d)

    def to_json(self) -> dict:
        out = {"stage": self.stage, "round": self.round, "input_hash": self.input_hash, "inputs": self.inputs,
               "outputs": self.outputs, "metrics": self.metrics, "versions": self.versions,
               "timing": dataclasses.asdict(self.timing), "command": self.command}
        if self.launch is not None:
            out["launch"] = self.launch
        return {**out, **self.extra}

    def typed_metrics(self):
        """`metrics` as the stage's `StageDef.metrics` (posttrain.stage.Metrics)."""
        from posttrain.stage import typed_metrics

        return typed_metrics(self.stage, self.metrics)


def load_record(run_dir: str | Path, n: int, stage: str) -> Record | None:
    """A stage's typed record (None while unfinished)."""
    data = read_record(run_dir, n, stage)
    return None if data is None else Record.from_json(data)


def as_record(value: Record | dict | None) -> Record | None:
    """A Record from a record or its JSON (None stays None)."""
    return value if value is None or isinstance(value, Record) else Record.from_json(value)


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for pkg in ("posttrain", "torch", "transformers", "trl", "peft", "accelerate", "datasets", "vllm"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            continue
    return out


class InputHasher:
    """Hashes a stage's inputs. Outputs of earlier stages are not re-read: their hash comes
    from the record that produced them."""

    def __init__(self, run_dir: str | Path):
        self.run_dir = Path(run_dir)
        self.known: dict[str, str] = {}

    def learn(self, record: dict) -> None:
        for name, out in record.get("outputs", {}).items():
            for rel, digest in zip(_as_list(out["path"]), _as_list(out["sha256"])):
                self.known[str((self.run_dir / rel).resolve())] = digest

    def hash_paths(self, value: Any) -> Any:
        """Replace every path in `value` (a path, or lists/dicts of them) by its content hash."""
        if value is None:
            return None
        if isinstance(value, (list, tuple)):
            return [self.hash_paths(v) for v in value]
        if isinstance(value, dict):
            return {k: self.hash_paths(v) for k, v in value.items()}
        p = Path(value)
        if p.exists():
            key = str(p.resolve())
            if key not in self.known:
                self.known[key] = hash_path(p)
            return {"path": str(value), "sha256": self.known[key]}
        if not p.is_absolute() and re.fullmatch(r"[\w.-]+/[\w.-]+", str(value)):
            return {"hub_id": str(value)}  # the name is all that can be pinned without a download
        raise FileNotFoundError(f"input {value} does not exist")


def _as_list(x):
    return x if isinstance(x, list) else [x]


@dataclass
class Plan:
    action: str  # "skip" | "run"
    record: dict | None
    input_hash: str
    inputs: dict


def content_only(value: Any) -> Any:
    """`value` without the paths of hashed files: a run folder or cache that moved, with the
    same bytes in it, is the same input."""
    if isinstance(value, list):
        return [content_only(v) for v in value]
    if isinstance(value, dict):
        return {k: content_only(v) for k, v in value.items() if not (k == "path" and "sha256" in value)}
    return value


def plan_stage(run_dir: str | Path, n: int, stage: str, hashed_inputs: dict, *, force: bool = False) -> Plan:
    """Decide what to do with a stage, given its hashed inputs (see the module docstring)."""
    digest = hash_json(content_only(hashed_inputs))
    record = read_record(run_dir, n, stage)
    if record is None:
        return Plan("run", None, digest, hashed_inputs)
    if record.get("input_hash") == digest:
        return Plan("skip", record, digest, hashed_inputs)
    if force:
        return Plan("run", record, digest, hashed_inputs)
    before = content_only(record.get("inputs", {}))
    now = content_only(hashed_inputs)
    changed = sorted(k for k in set(now) | set(before) if now.get(k) != before.get(k))
    raise InputsChanged(
        f"round {n} stage {stage!r} already finished with other inputs (changed: {', '.join(changed)}). "
        f"Rerunning it would replace its outputs and invalidate later stages. "
        f"Use --force to rerun it, or a new run folder."
    )


def discard_stage(run_dir: str | Path, n: int, stage: str) -> bool:
    """Forget a stage so that it runs again from scratch (`--redo`): its record goes first,
    so a crash in between never leaves a record whose outputs are gone, then its folder
    (outputs and partial work alike: a stage resumes from what it finds there). True when
    there was something to discard."""
    folder = stage_dir(run_dir, n, stage)
    record = folder / RECORD
    existed = folder.exists()
    if record.exists():
        record.unlink()
    if existed:
        shutil.rmtree(folder)
    return existed


def write_record(run_dir: str | Path, n: int, stage: str, *, plan: Plan, outputs: dict[str, Any],
                 metrics: dict, started: float, earlier_seconds: float = 0.0, launch: dict | None = None) -> dict:
    """Hash the outputs and write the record last, atomically. `earlier_seconds`: the time
    of earlier, interrupted attempts at the stage, counted in its `seconds`. `launch`: how a
    training stage was started (launcher, world_size, parallelism; see posttrain.launch)."""
    run_dir = Path(run_dir)
    hashed_outputs = {}
    for name, rel in outputs.items():
        rels = _as_list(rel)
        digests = [hash_path(run_dir / r) for r in rels]
        hashed_outputs[name] = {"path": rel, "sha256": digests if isinstance(rel, list) else digests[0],
                                "files": file_stamps(run_dir, rels)}
    finished = time.time()
    record = Record(stage=stage, round=n, input_hash=plan.input_hash, inputs=plan.inputs, outputs=hashed_outputs,
                    metrics=metrics, versions=versions(),
                    timing=Timing(started=started, finished=finished,
                                  seconds=round(finished - started + earlier_seconds, 2),
                                  earlier_attempts_seconds=round(earlier_seconds, 2)),
                    command=" ".join(sys.argv), launch=launch).to_json()
    atomic_write_json(stage_dir(run_dir, n, stage) / RECORD, record)
    return record


def output_path(run_dir: str | Path, record: dict | Record, name: str) -> Path | list[Path]:
    """An output of a finished stage, as an absolute path (a list for list outputs)."""
    record = as_record(record)
    out = record.outputs.get(name)
    if out is None:
        raise KeyError(f"round {record.round} stage {record.stage!r} recorded no output {name!r}")
    rel = out["path"]
    if isinstance(rel, list):
        return [Path(run_dir) / r for r in rel]
    return Path(run_dir) / rel


# ----------------------------------------------------------------------------- verify before trust


def file_stamps(run_dir: Path, rels: list[str]) -> dict[str, list]:
    """{file relative to the run folder: [size, mtime_ns, sha256]} for every content file of
    the outputs `rels`: what `check_record` compares a finished stage's files against."""
    stamps = {}
    for rel in rels:
        for p in content_files(run_dir / rel):
            st = p.stat()
            stamps[p.relative_to(run_dir).as_posix()] = [st.st_size, st.st_mtime_ns, hash_path(p)]
    return stamps


@dataclass(frozen=True)
class Damage:
    """A recorded output whose file is not what its record says."""

    round: int
    stage: str
    path: str
    """The file (or output), relative to the run folder."""
    what: str


def check_record(run_dir: str | Path, record: dict | Record, names: list[str] | None = None, *,
                 full: bool = False) -> list[Damage]:
    """The outputs of `record` (or only those in `names`) that differ from it. Each recorded
    file is stat'ed: a missing file or another size is damage at once; another mtime (or
    `full`) has its content hashed against the record. An output folder with a file the
    record does not list is damaged too. Records written before per-file stamps existed are
    checked by their output's hash (cached by size and mtime in posttrain.files.hash_path)."""
    run_dir = Path(run_dir)
    if isinstance(record, Record):
        record = record.to_json()
    n, stage = record.get("round", 0), record.get("stage", "?")
    found: list[Damage] = []
    for name, out in (record.get("outputs") or {}).items():
        if names is not None and name not in names:
            continue
        rels = _as_list(out.get("path"))
        stamps = out.get("files")
        if stamps is None:  # an older record: the output's own hash
            for rel, digest in zip(rels, _as_list(out.get("sha256")) if "sha256" in out else [None] * len(rels)):
                if not (run_dir / rel).exists():
                    found.append(Damage(n, stage, rel, "is missing"))
                elif digest is not None and hash_path(run_dir / rel) != digest:
                    found.append(Damage(n, stage, rel, "differs from its record (its content changed)"))
            continue
        for rel, (size, mtime_ns, digest) in stamps.items():
            p = run_dir / rel
            try:
                st = p.stat()
            except FileNotFoundError:
                found.append(Damage(n, stage, rel, "is missing"))
                continue
            if not p.is_file():
                found.append(Damage(n, stage, rel, "is not a file"))
            elif st.st_size != size:
                found.append(Damage(n, stage, rel, f"has {st.st_size} bytes, its record {size}"))
            elif full and sha256_file(p) != digest:  # not through the cache: it trusts size and mtime
                found.append(Damage(n, stage, rel, "differs from its record (its content changed)"))
            elif not full and st.st_mtime_ns != mtime_ns and hash_path(p) != digest:
                found.append(Damage(n, stage, rel, "differs from its record (its content changed)"))
        for rel in rels:
            if not (run_dir / rel).exists():
                if not any(s == rel or s.startswith(rel + "/") for s in stamps):  # else named above
                    found.append(Damage(n, stage, rel, "is missing"))
                continue
            extra = [p.relative_to(run_dir).as_posix() for p in content_files(run_dir / rel)]
            found += [Damage(n, stage, e, "is not in its record (a file was added)") for e in extra
                      if e not in stamps]
    return list(dict.fromkeys(found))


def fix_command(run_dir: str | Path, n: int, stage: str, recipe: str | None = None) -> str:
    """The command that makes stage `stage` of round `n` again."""
    if stage == "eval":
        return f"posttrain eval {run_dir} --round {n} --force"
    return f"posttrain run-round {n} --recipe {recipe or 'RECIPE'} --run-dir {run_dir} --redo {stage}"


def damage_line(run_dir: str | Path, d: Damage, recipe: str | None = None) -> str:
    return (f"{Path(run_dir) / d.path}: {d.what}; recorded by round {d.round} {d.stage}. "
            f"Make it again with `{fix_command(run_dir, d.round, d.stage, recipe)}`")


class OutputsDamaged(RuntimeError):
    """A finished stage's recorded outputs are missing or changed: nothing may use them."""

    def __init__(self, run_dir: str | Path, damage: list[Damage], recipe: str | None = None):
        self.damage = damage
        d = damage[0]
        more = f" (and {len(damage) - 1} more; `posttrain verify {run_dir}` lists them)" if len(damage) > 1 else ""
        later = "" if d.stage == "eval" else " (later stages that used it then run again)"
        super().__init__(f"{Path(run_dir) / d.path}: {d.what}{more}; it was recorded by round {d.round} "
                         f"{d.stage}, so nothing uses it. Make it again with "
                         f"`{fix_command(run_dir, d.round, d.stage, recipe)}`{later}.")


def verify_run(run_dir: str | Path, *, full: bool = False) -> tuple[int, int, list[str]]:
    """Every record of a run folder against its files: (records, files checked, one line per problem)."""
    run_dir = Path(run_dir)
    records = files = 0
    problems: list[str] = []
    rounds = sorted(int(p.name[6:]) for p in run_dir.glob("round_*") if p.name[6:].isdigit())
    for n in rounds:
        for path in sorted(round_dir(run_dir, n).glob(f"*/{RECORD}")):
            try:
                record = read_json(path)
                if not isinstance(record, dict) or not isinstance(record.get("outputs", {}), dict):
                    raise ValueError("not a record")
            except (ValueError, UnicodeDecodeError) as err:
                problems.append(f"{path}: unreadable record ({err}); remove it and run round {n} again")
                continue
            records += 1
            files += sum(len(o.get("files") or _as_list(o.get("path"))) for o in record.get("outputs", {}).values())
            recipe = recipe_in(record.get("command", ""))
            problems += [damage_line(run_dir, d, recipe) for d in check_record(run_dir, record, full=full)]
    return records, files, problems


def recipe_in(command: str) -> str | None:
    """The --recipe of the command that wrote a record, if it named one."""
    m = re.search(r"--recipe[= ](\S+)", command)
    return m.group(1) if m else None
def require_run_folder(run_dir: str | Path, *, recipe: bool = True) -> Path:
    """`run_dir` as a Path, or a RoundError saying it is missing or (with `recipe`: it has no
    recipe snapshot) not a run folder: a command that reads a run says so, rather than
    talk about a recipe or an unrun round."""
    from posttrain.stage import RoundError

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RoundError(f"{run_dir}: no such run folder" + ("" if not run_dir.exists() else " (not a folder)"))
    if recipe and not (run_dir / "recipe.yaml").is_file():
        raise RoundError(f"{run_dir}: not a run folder (no recipe.yaml: posttrain writes one when a round starts)")
    return run_dir

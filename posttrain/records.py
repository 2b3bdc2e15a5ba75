"""The run folder and its stage records.

`RUN_DIR/round_NN/<stage>/record.json` is written last and atomically, so its presence means
the stage finished. It holds the hash of every input; the orchestrator compares them to
decide: record present and inputs unchanged -> skip; record absent -> run (continuing from
complete work in the stage folder); record present but inputs changed -> refuse unless
forced.
"""

from __future__ import annotations

import platform
import re
import shutil
import sys
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from posttrain.files import atomic_write_json, hash_json, hash_path, read_json

RECORD = "record.json"


class InputsChanged(RuntimeError):
    """A finished stage's inputs differ from its record; rerunning would overwrite its outputs."""


def round_dir(run_dir: str | Path, n: int) -> Path:
    return Path(run_dir) / f"round_{n:02d}"


def stage_dir(run_dir: str | Path, n: int, stage: str) -> Path:
    return round_dir(run_dir, n) / stage


def read_record(run_dir: str | Path, n: int, stage: str) -> dict | None:
    path = stage_dir(run_dir, n, stage) / RECORD
    return read_json(path) if path.exists() else None


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
        hashed_outputs[name] = {"path": rel, "sha256": digests if isinstance(rel, list) else digests[0]}
    record = {
        "stage": stage,
        "round": n,
        "input_hash": plan.input_hash,
        "inputs": plan.inputs,
        "outputs": hashed_outputs,
        "metrics": metrics,
        "versions": versions(),
        "timing": {"started": started, "finished": time.time(),
                   "seconds": round(time.time() - started + earlier_seconds, 2),
                   "earlier_attempts_seconds": round(earlier_seconds, 2)},
        "command": " ".join(sys.argv),
    }
    if launch is not None:
        record["launch"] = launch
    atomic_write_json(stage_dir(run_dir, n, stage) / RECORD, record)
    return record


def output_path(run_dir: str | Path, record: dict, name: str) -> Path | list[Path]:
    """An output of a finished stage, as an absolute path (a list for list outputs)."""
    out = record["outputs"].get(name)
    if out is None:
        raise KeyError(f"round {record['round']} stage {record['stage']!r} recorded no output {name!r}")
    rel = out["path"]
    if isinstance(rel, list):
        return [Path(run_dir) / r for r in rel]
    return Path(run_dir) / rel


def require_run_folder(run_dir: str | Path, *, recipe: bool = True) -> Path:
    """`run_dir` as a Path, or a RoundError saying it is missing or (with `recipe`: it has no
    recipe snapshot) not a run folder: a command that reads a run says so, rather than
    talk about a recipe or an unrun round."""
    from posttrain.rounds.orchestrator import RoundError

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RoundError(f"{run_dir}: no such run folder" + ("" if not run_dir.exists() else " (not a folder)"))
    if recipe and not (run_dir / "recipe.yaml").is_file():
        raise RoundError(f"{run_dir}: not a run folder (no recipe.yaml: posttrain writes one when a round starts)")
    return run_dir

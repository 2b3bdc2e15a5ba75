"""The Python API behind every CLI command (`posttrain X` == `posttrain.api.X(...)`)."""

from __future__ import annotations

import os
from pathlib import Path

from posttrain.recipe import RecipeError, dump_recipe, load_recipe
from posttrain.records import STEPS, InputsChanged, read_record, stage_dir
from posttrain.rounds.orchestrator import (
    RoundError,
    list_rounds,
    parse_rounds,
    run_round,
    run_rounds,
)
from posttrain.stage import STAGES

def _user_errors() -> tuple[type[BaseException], ...]:
    errors: list[type[BaseException]] = [RecipeError, RoundError, InputsChanged, FileNotFoundError]
    try:
        from posttrain.data import DataError, DataErrors

        errors += [DataError, DataErrors]
    except ImportError:
        pass
    try:
        from posttrain.average import AverageError

        errors.append(AverageError)
    except ImportError:
        pass
    return tuple(errors)


USER_ERRORS = _user_errors()


def run(recipe, run_dir, *, rounds: str | list[int] | None = None, **kwargs):
    """Run several rounds (default: 1 to the recipe's `rounds`)."""
    loaded = load_recipe(recipe) if not hasattr(recipe, "for_round") else recipe
    if rounds is None:
        numbers = list(range(1, loaded.base.rounds + 1))
    elif isinstance(rounds, str):
        numbers = parse_rounds(rounds)
    else:
        numbers = list(rounds)
    return run_rounds(numbers, loaded, run_dir, **kwargs)


def validate(recipe, round: int = 1, *, files: bool = True) -> str:
    """The resolved recipe for `round` as YAML (raises RecipeError naming the key path).
    Every round is checked: reward and checker targets import and are rewards (nothing is
    called), and (unless `files=False`, for a template whose data you have not written yet)
    every data file exists."""
    loaded = load_recipe(recipe)
    resolved = loaded.for_round(round)
    loaded.check(files=files)
    header = f"# {loaded.path} resolved for round {round}: valid\n"
    return header + dump_recipe(resolved)


def validate_data(path, kind: str, *, tokenizer=None, max_prompt_tokens: int | None = None,
                  show_all: bool = False) -> tuple[bool, str]:
    from posttrain import data

    tok = None
    if tokenizer:
        from posttrain.modeling import load_tokenizer

        tok = load_tokenizer(tokenizer)
    report = data.validate_file(path, kind, tokenizer=tok, max_prompt_tokens=max_prompt_tokens)
    return (not report.problems), data.format_report(report, max_problems=None if show_all else 50)


def _cell(run_dir: Path, n: int, step: str) -> str:
    rec = read_record(run_dir, n, step)
    if rec is None:
        folder = stage_dir(run_dir, n, step)
        return "partial" if folder.exists() and any(folder.iterdir()) else "-"
    m = rec.get("metrics", {})
    secs = rec.get("timing", {}).get("seconds", 0)
    key = {
        "rm": ("heldout_accuracy", "acc"),
        "sample": ("score_best_mean", "best"),
        "sft": ("train_loss", "loss"),
        "dpo": ("reward_accuracy", "acc"),
        "eval": ("task_score", "task"),
    }.get(step)
    shown = ""
    if step == "rm":
        m = {"heldout_accuracy": (m.get("heldout") or {}).get("accuracy")}
    if key and isinstance(m.get(key[0]), (int, float)):
        shown = f" {key[1]}={m[key[0]]:.3f}"
    launch = rec.get("launch") or {}
    procs = f" [{launch['world_size']}x {launch.get('parallelism')}]" if launch.get("launcher") else ""
    return f"done {secs:.0f}s{procs}{shown}"


def status_table(run_dir) -> str:
    """Rounds x stages: state, one key metric, time."""
    run_dir = Path(run_dir)
    rounds = list_rounds(run_dir)
    if not rounds:
        return f"{run_dir}: no rounds yet"
    rows = [["round", *STEPS]]
    for n in rounds:
        rows.append([str(n), *(_cell(run_dir, n, s) for s in STEPS)])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def evaluate(run_dir, round: int, *, force: bool = False) -> dict:
    """Evaluate round `round`'s final model (the recipe is the run folder's snapshot)."""
    from posttrain.eval import evaluate_round
    from posttrain.rounds.orchestrator import Round

    run_dir = Path(run_dir)
    loaded = load_recipe(run_dir / "recipe.yaml")
    if read_record(run_dir, round, "average") is None:
        raise RoundError(f"round {round} has not finished in {run_dir}: nothing to evaluate")
    rnd = Round(round, loaded, run_dir)
    for stage in STAGES:
        rnd.records[stage] = read_record(run_dir, round, stage)
    return evaluate_round(rnd, force=force)


def format_metrics(metrics: dict) -> str:
    lines = []
    for k, v in metrics.items():
        if isinstance(v, float):
            lines.append(f"{k}: {v:.4f}")
        elif isinstance(v, (int, str)):
            lines.append(f"{k}: {v}")
    return "\n".join(lines)


def report(run_dir) -> Path:
    from posttrain.report import write_report

    return write_report(Path(run_dir))


def average(out, inputs, weights=None) -> Path:
    from posttrain.average import average_checkpoints

    return average_checkpoints([Path(p) for p in inputs], Path(out), weights)


def demo(run_dir="runs/demo", rounds: str | None = None, recipe: str = "demo") -> int:
    """Build the embedded world, run the loop on it, write the report, print the scores."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from posttrain.world.build import ensure_world

    world = ensure_world()
    run_dir = Path(run_dir)
    run(recipe, run_dir, rounds=rounds)
    path = report(run_dir)
    print(status_table(run_dir))
    print()
    scores = []
    initial = None
    for n in list_rounds(run_dir):
        rec = read_record(run_dir, n, "eval")
        if rec and isinstance(rec["metrics"].get("task_score"), float):
            scores.append(f"round {n}: {rec['metrics']['task_score']:.3f}")
            initial = initial if initial is not None else rec["metrics"].get("initial_task_score")
    if initial is not None:
        print(f"initial policy task score: {initial:.3f} (world {world.root.name})")
    print("task score after " + "; ".join(scores) if scores else "no evaluation recorded")
    print(f"report: {path}")
    return 0


__all__ = ["run_round", "run", "validate", "validate_data", "status_table", "evaluate", "report",
           "average", "demo", "USER_ERRORS"]

"""The Python API behind every CLI command (`posttrain X` == `posttrain.api.X(...)`)."""

from __future__ import annotations

import os
import re
from pathlib import Path

from posttrain.recipe import dump_recipe, load_recipe
from posttrain.records import check_record, load_record, stage_dir, verify_run
from posttrain.rounds.orchestrator import (
    RoundError,
    list_rounds,
    parse_rounds,
    run_round,
    run_rounds,
)
from posttrain.runlock import run_lock
from posttrain.errors import USER_ERRORS  # noqa: F401  (the CLI reads it here)
from posttrain.stage import WAITING_FILE, format_headline, get, headline, steps


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
    every data file exists. Warnings (comment lines, not errors) follow the header, e.g. the
    instructions an instruction-following reward abstains on here."""
    loaded = load_recipe(recipe)
    resolved = loaded.for_round(round)
    loaded.check(files=files)
    header = f"# {loaded.path} resolved for round {round}: valid\n"
    if files:  # what a reward says about the prompt files (the instructions that abstain here)
        header += "".join(f"# warning: {line}\n" for line in loaded.warnings())
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
    rec = load_record(run_dir, n, step)
    if rec is None:
        from posttrain.rounds.orchestrator import Attempts

        folder = stage_dir(run_dir, n, step)
        outcome = Attempts.last_outcome(folder) if folder.is_dir() else None
        if (folder / WAITING_FILE).is_file():
            from posttrain.files import read_json

            return f"waiting {read_json(folder / WAITING_FILE).get('summary', '')}".rstrip()
        if outcome and outcome.startswith("failed"):
            return "failed (see posttrain.log)"
        return "partial" if folder.exists() and any(folder.iterdir()) else "-"
    if check_record(run_dir, rec):
        return "damaged (see posttrain verify)"
    secs = rec.timing.seconds
    shown = format_headline(headline(step, rec.metrics))
    launch = rec.launch or {}
    nodes = f" on {launch['nodes']} nodes" if launch.get("nodes", 1) > 1 else ""
    procs = f" [{launch['world_size']}x {launch.get('parallelism')}{nodes}]" if launch.get("launcher") else ""
    return f"done {secs:.0f}s{procs}" + (f" {shown}" if shown else "")


STATUS_NOTES = ("tok/s (rm, sft, dpo): real tokens (no padding) trained per second of the training loop, every "
                "process together", "mfu: achieved FLOP/s (6 x trainable parameters per token) as a share of the "
                "peak (a GPU's bf16 datasheet figure; a CPU's fp32 matmul, measured)",
                "times include resumed attempts",
                "[2x ddp]: a training stage started by run.launcher: processes x parallelism (and nodes, when several)")


def status_legend() -> str:
    """What the cells of `posttrain status` mean: each stage's `StageDef.legend`, in order."""
    import textwrap

    def part(name: str, text: str) -> str:  # "rm acc: ...", or "curate: ..." for a text without a label
        return f"{name} {text}" if text.split(" ", 1)[0].endswith(":") else f"{name}: {text}"

    parts = [part(name, get(name).legend) for name in steps() if get(name).legend] + list(STATUS_NOTES)
    return textwrap.fill(" · ".join(parts), width=100, break_on_hyphens=False)


def status_table(run_dir, legend: bool = True) -> str:
    """Rounds x stages: state, headline metrics (posttrain.stage.headline), time."""
    run_dir = Path(run_dir)
    rounds = list_rounds(run_dir)
    if not rounds:
        return f"{run_dir}: no rounds yet"
    # A step the recipe turns on (`status_column="when_run"`: curate, annotate) has a column only
    # in runs where it ran: other runs' tables stay as they were.
    shown = tuple(s for s in steps() if get(s).status_column == "always"
                  or any(stage_dir(run_dir, n, s).is_dir() for n in rounds))
    rows = [["round", *shown]]
    for n in rounds:
        rows.append([str(n), *(_cell(run_dir, n, s) for s in shown)])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    if legend:
        lines += ["", status_legend()]
    return "\n".join(lines)


def annotate_export(run_dir, round: int, out) -> int:
    """Write round `round`'s annotation requests as JSONL (posttrain.annotate.jsonl); returns how many."""
    from posttrain.stages.annotate import export_requests

    return export_requests(run_dir, round, out)


def annotate_import(run_dir, round: int, labels) -> dict:
    """Check a JSONL file of labels against round `round`'s requests and add them; the next
    run picks them up (posttrain.annotate.jsonl). Returns counts."""
    from posttrain.records import require_run_folder
    from posttrain.stages.annotate import import_labels

    run_dir = require_run_folder(run_dir, recipe=False)  # before the lock, which would make the folder
    recipe = trains = None
    if (run_dir / "recipe.yaml").is_file():  # the lengths of the round that trains on the batch bound the edits
        loaded = load_recipe(run_dir / "recipe.yaml")
        trains = min(round + 1, loaded.base.rounds)
        recipe = loaded.for_round(trains)
    with run_lock(run_dir):
        return import_labels(run_dir, round, labels, recipe, trains=trains,
                             trust_remote_code=bool(recipe and recipe.models.trust_remote_code))


def annotate_history(run_dir, round: int) -> str:
    """Every label of each of round `round`'s comparisons, who gave it and when (labels are
    appended, never replaced: the latest counts)."""
    from posttrain.stages.annotate import format_history

    return format_history(run_dir, round)


def evaluate(run_dir, round: int, *, force: bool = False) -> dict:
    """Evaluate round `round`'s final model (the recipe is the run folder's snapshot) with the
    registry's evaluation stage (`StageDef.evaluation`)."""
    from posttrain.records import require_run_folder
    from posttrain.rounds.orchestrator import Round, round_finished, setup_logging

    run_dir = require_run_folder(run_dir)
    loaded = load_recipe(run_dir / "recipe.yaml")
    if not round_finished(run_dir, round):
        raise RoundError(f"round {round} has not finished in {run_dir}: nothing to evaluate")
    with run_lock(run_dir):
        setup_logging(run_dir)  # a failure's traceback goes to the run's log
        return Round(round, loaded, run_dir, force=force).run_stage(evaluation_stage())


def evaluation_stage() -> str:
    """The registry's evaluation stage (`StageDef.evaluation`: `eval`)."""
    return next(s for s in steps() if get(s).evaluation)


def verify(run_dir, *, full: bool = False) -> tuple[int, int, list[str]]:
    """Check every record of a run folder against its files (size and mtime, the content
    where they differ; every file's content with `full`): (records, files, one line per
    problem naming the file and the command that makes it again). Takes no lock."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"{run_dir}: no such run folder")
    return verify_run(run_dir, full=full)


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
    from posttrain.averaging import average_checkpoints

    return average_checkpoints([Path(p) for p in inputs], Path(out), weights)


def world(seed: int = 0, rebuild: bool = False) -> str:
    """Build (or rebuild) the embedded world; a summary of it."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from posttrain.world.build import ensure_world, rebuild_world

    w = rebuild_world(seed=seed) if rebuild else ensure_world(seed=seed)
    info = w.info()
    base = info["base_model"]
    return (f"world (seed {seed}, version {info['version']}): {w.root}\n"
            f"base model task score: {base['sampled']['score']:.3f} sampled, {base['greedy']['score']:.3f} greedy\n"
            f"preference rows per batch: "
            + ", ".join(f"{k} {v['rows']}" for k, v in info["sizes"]["preferences"].items()))


def _recipe_for_world_seed(recipe: str, seed: int, run_dir: Path):
    """The recipe with every `world:` path pointing at world `seed`, written into the run
    folder so the run can be inspected and resumed from it."""
    loaded = load_recipe(recipe)
    if seed == 0:
        return loaded
    text = re.sub(r"(?<![\w.@])world:", f"world@{seed}:", loaded.path.read_text(encoding="utf-8"))
    path = run_dir / f"{loaded.path.stem}-world{seed}.yaml"
    run_dir.mkdir(parents=True, exist_ok=True)
    from posttrain.files import atomic_write_text

    atomic_write_text(path, text)
    return load_recipe(path)


def demo_run_dir(recipe: str, world_seed: int = 0) -> Path:
    """runs/<recipe name or file stem>, with -world<S> for a world seed other than 0."""
    return Path("runs") / (Path(recipe).stem + (f"-world{world_seed}" if world_seed else ""))


def demo(run_dir=None, rounds: str | None = None, recipe: str = "demo", world_seed: int = 0) -> int:
    """Build the embedded world, run the loop on it, write the report, print the scores.
    `run_dir` defaults to runs/<recipe name>, with -world<S> for a world seed other than 0,
    so two loops or two worlds never share a folder."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from posttrain.rounds.orchestrator import check_round_numbers
    from posttrain.stages.annotate import next_batch_accuracy
    from posttrain.world.build import ensure_world

    if rounds is not None:  # a bad --rounds is refused before the world is built
        check_round_numbers(parse_rounds(rounds), load_recipe(recipe))
    run_dir = Path(run_dir) if run_dir is not None else demo_run_dir(recipe, world_seed)
    with run_lock(run_dir):  # before the world is built: a second demo in the folder is refused at once
        w = ensure_world(seed=world_seed)
        run(_recipe_for_world_seed(recipe, world_seed, run_dir), run_dir, rounds=rounds)
        path = report(run_dir)
    print(status_table(run_dir))
    print()
    scores = []
    initial = None
    for n in list_rounds(run_dir):
        rec = load_record(run_dir, n, evaluation_stage())
        m = rec.typed_metrics() if rec else None
        if m is not None and isinstance(m.task_score, float):
            scores.append((n, m.task_score))
            initial = initial if initial is not None else m.initial_task_score
    if initial is not None:
        print(f"initial policy task score: {initial:.3f} (world {w.root.name})")
    if scores:
        print("task score after " + "; ".join(f"round {n}: {v:.3f}" for n, v in scores))
        if initial is not None and initial < 1:
            print(f"round {scores[-1][0]} closes {(scores[-1][1] - initial) / (1 - initial):.0%} of the gap "
                  f"from the initial policy to a perfect score")
    else:
        print("no evaluation recorded")
    accuracy = [(n, next_batch_accuracy(load_record(run_dir, n, "annotate"))) for n in list_rounds(run_dir)]
    accuracy = [(n, a) for n, a in accuracy if a is not None]
    if accuracy:
        print("reward model's accuracy on the next batch (the latest models' pairs, never trained on): "
              + "; ".join(f"round {n}: {a:.3f}" for n, a in accuracy))
    print(f"report: {path}")
    return 0


__all__ = ["run_round", "run", "validate", "validate_data", "status_table", "evaluate", "report",
           "average", "demo", "world", "verify", "USER_ERRORS"]

"""Per-round annotation vs fixed base-model batches, in the RM-ranked loop on the embedded world.

    .venv/bin/python bench/annotation_ablation.py                 # 3 seeds x 2 loops x 6 rounds
    .venv/bin/python bench/annotation_ablation.py --seeds 0 --rounds 3
    .venv/bin/python bench/annotation_ablation.py --jobs 2           # two loops at a time, 1 thread each
    .venv/bin/python bench/annotation_ablation.py --smoke            # about a minute: 1 seed, 1 tiny round (CI)

Both loops are the demo recipe (recipes/demo.yaml): samples ranked by the round's reward
model alone (`reward: rm`), two DPO variants averaged, the same settings and seeds. They
differ only in where the preference batches come from:

- per-round: the base model's batch in round 1, then each round's `annotate` step labels
  pairs of responses from that round's model and the previous one (the demo as shipped);
- fixed: the world's six batches, all annotated once on the base model's responses (what
  the recipe could do before the annotate step existed).

For each loop and seed: the held-out task score after each round (eval, 128 prompts x 4
samples) and the share of the gap from the initial policy to a perfect score closed by the
last round. The last line is the headline: the mean gap closed, per-round over fixed.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import yaml

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("POSTTRAIN_PROGRESS", "0")
REPO = Path(__file__).resolve().parent.parent


def recipes(seed: int, rounds: int, smoke_dir: Path | None = None) -> dict[str, dict]:
    """The two loops' recipes; at smoke size (bench/_smoke.py) when `smoke_dir` is given."""
    demo = yaml.safe_load((REPO / "recipes" / "demo.yaml").read_text())
    demo.update(seed=seed, rounds=rounds)
    if smoke_dir is not None:
        from _smoke import shrink_demo

        from posttrain.world.build import ensure_world

        shrink_demo(demo, ensure_world().train_prompts, smoke_dir)
    demo["overrides"] = {str(rounds): {"annotate": {"enabled": False}}}
    demo["eval"]["variants"] = False  # the averaged model's score is what is compared; saves time
    fixed = yaml.safe_load(yaml.safe_dump(demo))
    fixed.pop("annotate")
    fixed.pop("overrides")
    fixed["data"]["preference_batches"] = [{"path": f"world:preferences/round_{n:02d}.jsonl", "round": n}
                                           for n in range(1, rounds + 1)]
    return {"per-round": demo, "fixed": fixed}


def run_loop(recipe: dict, folder: Path, rounds: int, threads: int | None = None) -> list[float]:
    """Task scores: the initial policy's, then each round's model's."""
    from posttrain.records import read_record

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    env = {**os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
    done = subprocess.run([sys.executable, "-m", "posttrain.cli", "run", "--recipe", str(path), "--run-dir",
                           str(folder / "run"), "--rounds", f"1-{rounds}"], capture_output=True, text=True, env=env)
    if done.returncode != 0:
        sys.exit(f"{folder}: the loop failed:\n{done.stderr[-3000:]}")
    evals = [read_record(folder / "run", n, "eval")["metrics"] for n in range(1, rounds + 1)]
    return [evals[0]["initial_task_score"]] + [e["task_score"] for e in evals]


def gap_closed(scores: list[float]) -> float:
    return (scores[-1] - scores[0]) / (1.0 - scores[0])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", default=None, help="recipe seeds, comma-separated (default 0,1,2; smoke 0)")
    p.add_argument("--rounds", type=int, default=None, help="default 6, smoke 1")
    p.add_argument("--smoke", action="store_true",
                   help="what CI runs: 1 seed, 1 round on 8 prompts, one epoch, K=2 (bench/_smoke.py); both loops "
                        "then train on the same batch, so the ratio is 1.00x: it checks the script, not the claim")
    p.add_argument("--out", type=Path, default=None, help="keep the runs here (default: a temp folder)")
    p.add_argument("--jobs", type=int, default=1,
                   help="loops run at once, each with cores/jobs torch threads (default 1: one at a time, "
                        "default threads); on one machine the scores do not depend on it")
    args = p.parse_args()
    args.rounds = args.rounds or (1 if args.smoke else 6)
    seeds = [int(s) for s in (args.seeds or ("0" if args.smoke else "0,1,2")).split(",")]
    root = args.out or Path(tempfile.mkdtemp(prefix="annotation_ablation."))
    loops = [(seed, name, recipe) for seed in seeds
             for name, recipe in recipes(seed, args.rounds, root / "smoke" if args.smoke else None).items()]
    threads = max(1, (os.cpu_count() or 1) // args.jobs) if args.jobs > 1 else None
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        futures = [pool.submit(run_loop, recipe, root / f"seed{seed}" / name, args.rounds, threads)
                   for seed, name, recipe in loops]
        closed: dict[str, list[float]] = {"per-round": [], "fixed": []}
        for (seed, name, _), future in zip(loops, futures):
            scores = future.result()
            closed[name].append(gap_closed(scores))
            dips = [n for n in range(1, len(scores)) if not scores[n] > scores[n - 1]]
            print(f"seed {seed} {name:9s}: task " + " -> ".join(f"{s:.3f}" for s in scores)
                  + f"  (gap closed {closed[name][-1]:.0%}; "
                  + (f"not above the round before in round {', '.join(map(str, dips))})" if dips else "rises every round)"),
                  flush=True)
    ratios = [a / b for a, b in zip(closed["per-round"], closed["fixed"]) if b > 0]
    mean_a, mean_b = statistics.fmean(closed["per-round"]), statistics.fmean(closed["fixed"])
    print(f"gap closed by round {args.rounds}: per-round {mean_a:.0%}, fixed {mean_b:.0%} (runs in {root})")
    spread = f"min {min(ratios):.2f}x, max {max(ratios):.2f}x, " if len(ratios) > 1 else ""
    print(f"annotation: {mean_a / mean_b:.2f}x gap closed, per-round vs fixed batches "
          f"({spread}{len(seeds)} seed{'s' if len(seeds) > 1 else ''})")


if __name__ == "__main__":
    main()

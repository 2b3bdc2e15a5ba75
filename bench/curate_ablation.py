"""Curation ablation on the embedded world: the demo with the `curate` stage on vs off.

    .venv/bin/python bench/curate_ablation.py                      # 6 rounds x 2 settings x 2 seeds: 4 demos' time
    .venv/bin/python bench/curate_ablation.py --smoke              # about a minute: a small world, 1 tiny round (CI)

The world is the demo's with its opt-in data noise on (posttrain.world.build.WorldConfig):
`sft_noisy_share` of the seed SFT rows pad the right answer with an apology, exclamation
marks or emojis (which the task's checker gives no credit), and `sft_duplicate_share` extra
rows repeat a seed row with its numbers shuffled. The default world has neither, so the
README's demo numbers do not move.

Both settings run the demo recipe on that world (paths rewritten to it), with the same
seeds; "on" adds a `curate` section: the paper's rule-based cleaning (the rules shipped in
recipes/general.yaml) and semantic dedup over the policy's mean-pooled states. The held-out
task score (the checker, `eval` stage) is printed per round and setting; the curate stage's
counts (kept, dropped by reason) per round.

The last line is the headline: the final round's held-out task score, curation on vs off
(ratio, with its spread over seeds).
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import yaml

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("POSTTRAIN_PROGRESS", "0")

REPO = Path(__file__).resolve().parent.parent


def world_recipe(world) -> dict:
    """demo.yaml with every `world:` path pointing into `world` (a non-default world's folder)."""
    recipe = yaml.safe_load((REPO / "recipes" / "demo.yaml").read_text())

    def fix(value):
        if isinstance(value, str) and value.startswith("world:"):
            name = value.split(":", 1)[1]
            return str(getattr(world, name)) if name in ("base_model", "sft_seed") else str(world.root / name)
        if isinstance(value, list):
            return [fix(v) for v in value]
        if isinstance(value, dict):
            return {k: fix(v) for k, v in value.items()}
        return value

    return fix(recipe)


def curate_section(threshold: float) -> dict:
    general = yaml.safe_load((REPO / "recipes" / "general.yaml").read_text())["curate"]
    return {"enabled": True, "rules": general["rules"],
            "dedup": {"enabled": True, "threshold": threshold, "embed_with": "policy", "max_length": 64}}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=None, help="default 6, smoke 1")
    p.add_argument("--seeds", type=int, default=None, help="recipe seeds per setting (default 2, smoke 1)")
    p.add_argument("--smoke", action="store_true",
                   help="what CI runs: a small world (40 pre-training steps), 1 round on 8 prompts, one epoch, K=2 "
                        "(bench/_smoke.py): it checks the script, not the claim")
    p.add_argument("--noisy-share", type=float, default=0.5, help="world setting sft_noisy_share")
    p.add_argument("--duplicate-share", type=float, default=0.5, help="world setting sft_duplicate_share")
    p.add_argument("--n-sft-seed", type=int, default=128, help="world setting n_sft_seed (the demo world: 64)")
    p.add_argument("--threshold", type=float, default=0.995, help="dedup cosine threshold")
    p.add_argument("--out", type=Path, default=None,
                   help="run folders (default runs/curate_ablation; smoke: a temporary folder)")
    args = p.parse_args(argv)
    args.rounds = args.rounds or (1 if args.smoke else 6)
    args.seeds = args.seeds or (1 if args.smoke else 2)
    args.out = args.out or (Path(tempfile.mkdtemp(prefix="curate_ablation.")) if args.smoke
                            else REPO / "runs" / "curate_ablation")

    from posttrain.records import read_record
    from posttrain.rounds.orchestrator import run_rounds
    from posttrain.world.build import WorldConfig, ensure_world

    small = dict(n_train_prompts=32, n_heldout_prompts=16, n_pref_prompts_per_round=32, n_heldout_pref_prompts=16,
                 rounds=2, n_transcripts=512, pretrain_steps=40) if args.smoke else {}
    config = WorldConfig(sft_noisy_share=args.noisy_share, sft_duplicate_share=args.duplicate_share,
                         n_sft_seed=args.n_sft_seed, **small)
    world = ensure_world(config=config)
    print(f"world: {world.root} (sft_noisy_share {args.noisy_share}, sft_duplicate_share {args.duplicate_share}, "
          f"n_sft_seed {args.n_sft_seed})", flush=True)
    base = world_recipe(world)
    if args.smoke:
        from _smoke import shrink_demo

        shrink_demo(base, world.train_prompts, args.out / "smoke")
    base["rounds"] = max(args.rounds, 1)
    base["overrides"] = {}
    scores: dict[str, dict[int, list[float]]] = {"off": {}, "on": {}}
    for seed in range(args.seeds):
        for setting in ("off", "on"):
            recipe = copy.deepcopy(base)
            recipe.update(name=f"curate-ablation-{setting}", seed=seed)
            if setting == "on":
                recipe["curate"] = curate_section(args.threshold)
            run_dir = args.out / f"{setting}-seed{seed}"
            run_dir.mkdir(parents=True, exist_ok=True)
            path = run_dir.parent / f"{setting}-seed{seed}.yaml"
            path.write_text(f"# bench/curate_ablation.py: curation {setting}, seed {seed}\n" + yaml.safe_dump(recipe))
            start = time.perf_counter()
            run_rounds(list(range(1, args.rounds + 1)), path, run_dir)
            for n in range(1, args.rounds + 1):
                ev = read_record(run_dir, n, "eval")
                score = ev["metrics"]["task_score"]
                scores[setting].setdefault(n, []).append(score)
                cur = read_record(run_dir, n, "curate") if setting == "on" else None
                shown = ""
                if cur is not None:
                    m = cur["metrics"]
                    shown = f"; curate kept {m['kept']} of {m['rows']}, dropped {m['dropped_by_reason']}"
                print(f"seed {seed} curation {setting} round {n}: held-out task score {score:.3f}{shown}", flush=True)
            print(f"seed {seed} curation {setting}: {time.perf_counter() - start:.0f} s", flush=True)

    print("held-out task score per round (mean over seeds): " + "; ".join(
        f"round {n}: off {statistics.fmean(scores['off'][n]):.3f}, on {statistics.fmean(scores['on'][n]):.3f}"
        for n in range(1, args.rounds + 1)))
    last = args.rounds
    ratios = [on / off if off else float("inf") for on, off in zip(scores["on"][last], scores["off"][last])]
    print(f"curate_ablation: {statistics.median(ratios):.2f}x held-out task score after round {last}, curation on "
          f"vs off (min {min(ratios):.2f}x, max {max(ratios):.2f}x, {len(ratios)} seeds)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

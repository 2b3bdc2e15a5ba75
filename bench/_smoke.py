"""The demo recipe at smoke size, for the bench scripts that run whole loops (`--smoke`).

Not a bench script itself (tests/test_bench_smoke.py runs every bench/*.py but this one):
imported by bench/annotation_ablation.py and bench/curate_ablation.py, which run as scripts,
so this folder is on their sys.path.
"""

from __future__ import annotations

from pathlib import Path

SMOKE_PROMPTS = 8


def shrink_demo(recipe: dict, train_prompts: Path, folder: Path) -> dict:
    """`recipe` (the demo's, any world) with every stage still running, on the first
    SMOKE_PROMPTS training prompts (written to `folder`), one epoch, K=2 and a short eval of
    the round's model alone.
    Changes `recipe` in place and returns it."""
    from posttrain.files import iter_jsonl, write_jsonl

    folder.mkdir(parents=True, exist_ok=True)
    subset = folder / f"train-{SMOKE_PROMPTS}.jsonl"
    write_jsonl(subset, [row for _, row in zip(range(SMOKE_PROMPTS), iter_jsonl(train_prompts))])
    recipe["data"]["prompts"] = [{"path": str(subset)}]
    if "annotate" in recipe:
        recipe["annotate"].update(prompts=[str(subset)], comparisons=SMOKE_PROMPTS)
    # One epoch on a small world's batch can leave the RM below its guard; the smoke run checks the
    # script's path, not the RM's quality.
    recipe["rm"].update(epochs=1, min_heldout_accuracy=0.0)
    recipe["sample"].update(k=2, shard_size=SMOKE_PROMPTS)
    recipe["sft"].update(epochs=1)
    recipe["dpo"].update(epochs=1)
    recipe["eval"].update(max_prompts=SMOKE_PROMPTS, samples_per_prompt=1, variants=False)
    return recipe

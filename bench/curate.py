"""Semantic dedup at scale: the cluster-local greedy (report 4.2.3) vs an all-pairs greedy.

    .venv/bin/python bench/curate.py                  # 100,000 rows, 3 runs; a sample of 50,000 for the baseline
    .venv/bin/python bench/curate.py --rows 20000 --sample 4000 --runs 2   # quicker
    .venv/bin/python bench/curate.py --smoke          # seconds: 2,000 rows, 1 run (what CI runs)

The rows are dialogs of the embedded world's task ("Sort these numbers: 7 2 9 4" and an
answer: right, or with the noise the world's annotators make), embedded once with the world's
base model (mean-pooled hidden states: what `curate.dedup` uses when the recipe names no
embedding model). Priority = quality x difficulty, with quality the task's checker score and
difficulty the list length, as the stage would order rows by judge scores.

1. Dedup of all rows with `posttrain.curate.dedup.semantic_dedup` (FAISS spherical k-means into
   ceil(rows / rows_per_cluster) clusters, exact range search inside each): rows/s per run.
2. On a random sample, side by side and alternating: the same cluster-local greedy vs the
   all-pairs greedy (one cluster: every row compared with every kept row). The ratio of
   their speeds, and how many duplicates each found (the all-pairs greedy is exact; what the
   cluster-local one misses are pairs that k-means put in different clusters).

The last line is the headline: the speed ratio on the sample, with its spread.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")


def dialogs(n: int, seed: int) -> tuple[list[str], list[float]]:
    """n task dialogs (text) and their priority (checker score x list length / 6)."""
    from posttrain.curate.filters import dialog_text
    from posttrain.world import task
    from posttrain.world.build import WorldConfig, noisy_answer

    rng = random.Random(seed)
    config = WorldConfig()
    texts, prio = [], []
    for _ in range(n):
        item = task.random_item(rng)
        answer = " ".join(map(str, noisy_answer(list(item.numbers), rng, config)))
        texts.append(dialog_text(item.messages() + [{"role": "assistant", "content": answer}]))
        prio.append(task.score(item.prompt, answer) * len(item.numbers) / task.MAX_LEN)
    return texts, prio


def spread(xs, fmt="{:.0f}"):
    return f"{fmt.format(statistics.mean(xs))} (min {fmt.format(min(xs))}, max {fmt.format(max(xs))})"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=100_000)
    p.add_argument("--sample", type=int, default=50_000, help="rows compared against the all-pairs baseline")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--threshold", type=float, default=0.99,
                   help="cosine threshold (the tiny model's states of one task are close: median 0.84)")
    p.add_argument("--rows-per-cluster", type=int, default=1000)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--smoke", action="store_true",
                   help="seconds (what CI runs): 2,000 rows, a sample of 1,000, 250 rows per cluster, 1 run")
    args = p.parse_args(argv)
    if args.smoke:
        args.rows, args.sample, args.rows_per_cluster, args.runs = 2000, 1000, 250, 1

    import faiss
    import numpy as np
    import torch

    from posttrain.curate.dedup import semantic_dedup
    from posttrain.curate.models import embed_dialogs
    from posttrain.world.build import ensure_world

    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    world = ensure_world()
    texts, prio = dialogs(args.rows, seed=0)
    start = time.perf_counter()
    emb = embed_dialogs(world.base_model, texts, batch_size=512, max_length=64, device="cpu")
    embed_s = time.perf_counter() - start
    print(f"embedded {len(texts)} dialogs with the world's base model (dim {emb.shape[1]}) in {embed_s:.1f} s: "
          f"{len(texts) / embed_s:.0f} rows/s", flush=True)

    full_rate, kept = [], None
    for run in range(args.runs):
        start = time.perf_counter()
        res = semantic_dedup(emb, prio, args.threshold, args.rows_per_cluster, seed=run)
        s = time.perf_counter() - start
        full_rate.append(len(texts) / s)
        kept = sum(res.keep)
        print(f"run {run}: dedup of {len(texts)} rows in {s:.1f} s ({full_rate[-1]:.0f} rows/s), "
              f"{res.n_clusters} clusters, kept {kept}, duplicates {len(texts) - kept}", flush=True)
    print(f"dedup of {len(texts)} rows: {spread(full_rate)} rows/s over {args.runs} runs", flush=True)

    rng = np.random.default_rng(1)
    pick = rng.choice(len(texts), size=min(args.sample, len(texts)), replace=False)
    sub, sub_prio = emb[pick], [prio[i] for i in pick]
    ratios, found = [], {}
    for run in range(args.runs):
        secs = {}
        for mode in (("local", "all") if run % 2 == 0 else ("all", "local")):  # alternate the order
            per_cluster = args.rows_per_cluster if mode == "local" else len(sub)
            start = time.perf_counter()
            res = semantic_dedup(sub, sub_prio, args.threshold, per_cluster, seed=run)
            secs[mode] = time.perf_counter() - start
            found[mode] = {i for i, k in enumerate(res.keep) if not k}
        ratios.append(secs["all"] / secs["local"])
        print(f"sample run {run}: cluster-local {len(sub) / secs['local']:.0f} rows/s, "
              f"{len(found['local'])} duplicates; all-pairs {len(sub) / secs['all']:.0f} rows/s, "
              f"{len(found['all'])} duplicates; ratio {ratios[-1]:.2f}x", flush=True)
    both = len(found["local"] & found["all"])
    print(f"duplicates on the {len(sub)}-row sample (last run): all-pairs {len(found['all'])}, cluster-local "
          f"{len(found['local'])} ({both} of them also all-pairs'; recall of the exact set "
          f"{both / max(1, len(found['all'])):.3f})")
    print(f"curate_dedup: {statistics.median(ratios):.2f}x rows/s, cluster-local greedy vs all-pairs greedy on "
          f"{len(sub)} rows (min {min(ratios):.2f}x, max {max(ratios):.2f}x, {args.runs} runs); "
          f"{len(texts)} rows dedup at {statistics.median(full_rate):.0f} rows/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

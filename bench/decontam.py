"""Decontamination speed: training rows checked against eval prompts by 8-gram overlap.

    .venv/bin/python bench/decontam.py            # 1,000,000 rows of ~100 words vs 10,000 prompts, 3 runs
    .venv/bin/python bench/decontam.py --smoke    # 20,000 rows vs 1,000 prompts, 2 runs

Synthetic text over a 5,000-word vocabulary (Zipf-like draws, mixed case and punctuation):
eval prompts of 20-60 words, training rows of 80-120 words; 1% of the rows carry a stretch
of 8-12 consecutive words copied from an eval prompt. Both methods tokenize the same way
(`posttrain.decontam.words`) and must flag the same rows (checked every run).

- indexed: `posttrain.decontam.NgramIndex.check` (the index's keys `isdisjoint` the row's
  n-gram zip: the loop over a row's n-grams runs in C and stops at the first hit);
- baseline: the plain way, a Python set of the row's n-gram tuples intersected with the
  index's set.

Runs alternate between the two. The last line is the headline: the rows/s ratio with its spread.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time


def synthetic(n_rows: int, n_prompts: int, seed: int) -> tuple[list[str], list[str], int]:
    """(eval prompts, training rows, rows made to overlap)."""
    rng = random.Random(seed)
    vocab = [f"w{i}" for i in range(5000)]
    weights = [1 / (i + 1) for i in range(len(vocab))]
    punct = [" ", " ", " ", " ", ", ", ". ", "? "]

    def text(n_words: int) -> list[str]:
        ws = rng.choices(vocab, weights, k=n_words)
        return [w.upper() if rng.random() < 0.05 else w for w in ws]

    def join(ws: list[str]) -> str:
        return "".join(w + rng.choice(punct) for w in ws)

    prompts = [text(rng.randint(20, 60)) for _ in range(n_prompts)]
    rows, planted = [], 0
    for _ in range(n_rows):
        ws = text(rng.randint(80, 120))
        if rng.random() < 0.01:
            src = rng.choice(prompts)
            k = rng.randint(8, 12)
            start = rng.randint(0, len(src) - k)
            at = rng.randint(0, len(ws) - 1)
            ws[at:at] = src[start:start + k]
            planted += 1
        rows.append(join(ws))
    return [join(p) for p in prompts], rows, planted


def baseline_flags(rows: list[str], prompts: list[str], n: int) -> list[bool]:
    from posttrain.decontam import words

    index: set[tuple[str, ...]] = set()
    for p in prompts:
        ws = words(p)
        index.update(tuple(ws[k:k + n]) for k in range(len(ws) - n + 1))
    out = []
    for r in rows:
        ws = words(r)
        grams = {tuple(ws[k:k + n]) for k in range(len(ws) - n + 1)}
        out.append(bool(grams & index))
    return out


def indexed_flags(rows: list[str], prompts: list[str], n: int) -> list[bool]:
    from posttrain.decontam import NgramIndex

    index = NgramIndex(n)
    index.add("eval", prompts)
    return [index.check(r) is not None for r in rows]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--prompts", type=int, default=10_000)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--n", type=int, default=8)
    p.add_argument("--smoke", action="store_true", help="20,000 rows vs 1,000 prompts, 2 runs")
    args = p.parse_args(argv)
    if args.smoke:
        args.rows, args.prompts, args.runs = 20_000, 1_000, 2

    t = time.perf_counter()
    prompts, rows, planted = synthetic(args.rows, args.prompts, seed=0)
    print(f"data: {len(rows)} rows, {len(prompts)} eval prompts, {planted} rows with a copied stretch "
          f"({time.perf_counter() - t:.1f}s to make)", flush=True)

    speeds: dict[str, list[float]] = {"indexed": [], "baseline": []}
    flagged = None
    for run in range(args.runs):
        for name, fn in (("indexed", indexed_flags), ("baseline", baseline_flags)):
            t = time.perf_counter()
            flags = fn(rows, prompts, args.n)
            dt = time.perf_counter() - t
            speeds[name].append(len(rows) / dt)
            if flagged is None:
                flagged = flags
            elif flags != flagged:
                print(f"decontam: {name} flags different rows from the first method", file=sys.stderr)
                return 1
            print(f"run {run + 1} {name}: {len(rows) / dt:,.0f} rows/s ({dt:.1f}s, index included), "
                  f"{sum(flags)} rows flagged", flush=True)
    if sum(flagged) < planted:
        print(f"decontam: {sum(flagged)} rows flagged but {planted} were planted", file=sys.stderr)
        return 1
    ratios = [a / b for a, b in zip(speeds["indexed"], speeds["baseline"])]
    print(f"indexed: {statistics.mean(speeds['indexed']):,.0f} rows/s; baseline: "
          f"{statistics.mean(speeds['baseline']):,.0f} rows/s")
    print(f"decontam: {statistics.mean(ratios):.2f}x rows/s, indexed vs per-row n-gram set "
          f"(min {min(ratios):.2f}x, max {max(ratios):.2f}x, {args.runs} runs, {len(rows)} rows vs "
          f"{len(prompts)} prompts, {statistics.mean(speeds['indexed']):,.0f} rows/s indexed)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

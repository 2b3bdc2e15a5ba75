"""The math reward's speed on ordinary answers, new vs the reader it replaced, and its time on hostile ones.

    .venv/bin/python bench/reward_math.py               # 5 runs of 4000 responses
    .venv/bin/python bench/reward_math.py --runs 3 --n 1000

Ordinary answers: worked solutions of 200-1500 characters ending the ways models end them
("The answer is 42 apples.", `\\boxed{42}`, "#### 42", a bare last number), scored by
`MathAnswerReward.score_with_meta` and by the reader before issue 24 (commit aa777f7,
loaded from git), alternating, same responses. Hostile answers: the new reader alone on
1 MB responses, and both readers on unclosed `\\boxed{` at sizes the old one survives, to
show its quadratic growth. The last line is the headline: samples/s on ordinary answers,
new over old.
"""

from __future__ import annotations

import argparse
import importlib.util
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BASELINE_COMMIT = "aa777f7"  # the math reward before issue 24


def load_baseline():
    source = subprocess.run(["git", "-C", str(REPO), "show", f"{BASELINE_COMMIT}:posttrain/reward/math.py"],
                            check=True, capture_output=True, text=True).stdout
    path = Path(tempfile.mkdtemp()) / "math_baseline.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("math_baseline", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.MathAnswerReward()


def ordinary(n: int, seed: int = 0) -> tuple[list[str], list[dict]]:
    rng = random.Random(seed)
    words = "we add the two amounts then subtract what was given away and divide by the number of friends".split()
    responses, metas = [], []
    for _ in range(n):
        answer = rng.choice([rng.randint(2, 999), rng.randint(1000, 99999)])
        steps = " ".join(f"{' '.join(rng.choices(words, k=rng.randint(6, 20)))} {rng.randint(2, 99)} + "
                         f"{rng.randint(2, 99)} = {rng.randint(4, 198)}." for _ in range(rng.randint(3, 20)))
        ending = rng.choice([f"The answer is {answer} apples.", f"So the total is $\\boxed{{{answer}}}$.",
                             f"\n#### {answer}", f"In all, {answer}", f"The answer is {answer + 1}."])
        responses.append(f"{steps}\n{ending}")
        metas.append({"answer": str(answer)})
    return responses, metas


def rate(reward, responses, metas) -> float:
    prompts = [[]] * len(responses)
    start = time.perf_counter()
    reward.score_with_meta(prompts, responses, metas)
    return len(responses) / (time.perf_counter() - start)


def seconds(reward, response: str) -> float:
    start = time.perf_counter()
    reward.score_with_meta([[]], [response], [{"answer": "5"}])
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--n", type=int, default=4000)
    parser.add_argument("--smoke", action="store_true", help="1 run of 200 responses, small hostile inputs (CI)")
    args = parser.parse_args()
    if args.smoke:
        args.runs, args.n = 1, 200
    scale = 100 if args.smoke else 1
    sys.path.insert(0, str(REPO))
    from posttrain.reward.math import MathAnswerReward

    new, old = MathAnswerReward(), load_baseline()
    hostile = {
        "1 MB of numbers": "1 " * (500_000 // scale),
        "1 MB of spaces after 'answer'": "answer" + " " * (1_000_000 // scale),
        "200k unclosed \\boxed{": "\\boxed{" * (200_000 // scale) + " so 5",
        "100k nested \\boxed{": "\\boxed{" * (100_000 // scale) + "5" + "}" * (100_000 // scale),
        "100k different boxes": "".join(f"\\boxed{{{i}}}" for i in range(100_000 // scale)),
        "5000-digit answer": "#### " + "9" * 5000,
    }
    for name, response in hostile.items():
        print(f"new, {name} ({len(response):,} chars): {seconds(new, response):.3f} s")
    for k in ((250,) if args.smoke else (2_500, 5_000, 10_000)):
        response = "\\boxed{" * k
        print(f"{k:,} unclosed \\boxed{{: old {seconds(old, response):.2f} s, new {seconds(new, response):.4f} s")

    responses, metas = ordinary(args.n)
    ratios = []
    for run in range(args.runs):
        old_rate, new_rate = rate(old, responses, metas), rate(new, responses, metas)
        ratios.append(new_rate / old_rate)
        print(f"run {run + 1}: new {new_rate:,.0f} samples/s, old {old_rate:,.0f} samples/s")
    print(f"reward_math: {statistics.median(ratios):.2f}x samples/s, new vs old on ordinary answers "
          f"(min {min(ratios):.2f}x, max {max(ratios):.2f}x, {args.runs} runs)")


if __name__ == "__main__":
    main()

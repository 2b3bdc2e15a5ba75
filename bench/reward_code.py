"""Cost of the code reward's sandbox: samples/s through CodeTestReward (OS-isolated: network,
mount and PID namespaces, chroot, unprivileged uid, rlimits) vs a bare baseline that runs
each sample's program + tests in a plain `python -I -c` subprocess with only a timeout (no
isolation, one pass/fail per sample instead of a fraction). Both use the same worker count.

    python bench/reward_code.py [--quick]

The last line is the headline: the sandbox's throughput as a multiple of the baseline's.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

from posttrain.reward.code import CodeTestReward, extract_code, find_interpreter

TESTS = ["assert fib(0) == 0", "assert fib(1) == 1", "assert fib(10) == 55", "assert fib(20) == 6765"]
RIGHT = "```python\ndef fib(n):\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a\n```"
WRONG = "```python\ndef fib(n):\n    return -1\n```"


def bare(responses: list[str], workers: int, python: str) -> list[float]:
    def one(response: str) -> float:
        source = extract_code(response) + "\n" + "\n".join(TESTS) + "\n"
        try:
            done = subprocess.run([python, "-I", "-S", "-c", source], capture_output=True, timeout=10)
        except subprocess.TimeoutExpired:
            return 0.0
        return 1.0 if done.returncode == 0 else 0.0
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(one, responses))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="smoke run: few samples, 2 repetitions")
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    n, reps = (8, 2) if args.quick else (40, 5)
    responses = [RIGHT if i % 2 else WRONG for i in range(n)]
    prompts = [[{"role": "user", "content": "fib"}]] * n
    reward = CodeTestReward(max_workers=args.workers)
    reward.setup()
    python = find_interpreter().executable
    ratios = []
    for rep in range(reps):
        t0 = time.perf_counter()
        scores = reward.score_with_meta(prompts, responses, [{"tests": TESTS}] * n)
        t_sandbox = time.perf_counter() - t0
        t0 = time.perf_counter()
        base = bare(responses, args.workers, python)
        t_bare = time.perf_counter() - t0
        assert scores == base, (scores, base)  # all-or-nothing cases: both must agree
        ratios.append((n / t_sandbox) / (n / t_bare))
        print(f"rep {rep}: sandbox {n / t_sandbox:.1f} samples/s ({reward.isolation}), bare {n / t_bare:.1f} samples/s")
    print(f"reward_code: {statistics.median(ratios):.2f}x samples/s, {reward.isolation} sandbox vs bare subprocess "
          f"(min {min(ratios):.2f}x, max {max(ratios):.2f}x, {reps} runs, {n} samples, {args.workers} workers)")


if __name__ == "__main__":
    sys.exit(main())

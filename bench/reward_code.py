"""Cost of the code reward: samples/s through CodeTestReward (OS-isolated sandbox; the verdict
decided outside the program's process) vs a bare baseline that runs each sample's program +
tests in a plain `python -I -c` subprocess with only a timeout (no isolation, the verdict from
the program's own exit status, one pass/fail per sample). Both use the same worker count.

Three suites, each written in one of the reward's test forms (see posttrain/reward/code.py):
  compare  `assert fib(10) == 55`                 1 sandboxed process per sample
  judged   `assert abs(fib(10) - 55) < 0.5`       2 (the program's, then the judge's)
  opaque   `assert [fib(n) for n in ...] == [...]` 1 + 1 per test (each test runs alone)

    python bench/reward_code.py [--quick]

The last line is the headline: the sandbox's throughput as a multiple of the baseline's, on
the compare suite (the form the shipped recipe uses), with the other forms beside it.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

from posttrain.reward.code import CodeTestReward, Suite, extract_code, find_interpreter, plan_suite

SUITES = {
    "compare": ["assert fib(0) == 0", "assert fib(1) == 1", "assert fib(10) == 55", "assert fib(20) == 6765"],
    "judged": ["assert abs(fib(0) - 0) < 0.5", "assert abs(fib(1) - 1) < 0.5", "assert abs(fib(10) - 55) < 0.5",
               "assert abs(fib(20) - 6765) < 0.5"],
    "opaque": ["assert [fib(n) for n in range(2)] == [0, 1]", "assert [fib(n) for n in (10, 20)] == [55, 6765]"],
}
RIGHT = "```python\ndef fib(n):\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a\n```"
WRONG = "```python\ndef fib(n):\n    return -1\n```"


def bare(responses: list[str], tests: list[str], workers: int, python: str) -> list[float]:
    def one(response: str) -> float:
        source = extract_code(response) + "\n" + "\n".join(tests) + "\n"
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
    ratios: dict[str, list[float]] = {form: [] for form in SUITES}
    for form, tests in SUITES.items():
        assert {p.kind for p in plan_suite(Suite("", tests))} == {form}
    for rep in range(reps):
        for form, tests in SUITES.items():  # interleaved, so machine load hits every form alike
            t0 = time.perf_counter()
            scores = reward.score_with_meta(prompts, responses, [{"tests": tests}] * n)
            t_sandbox = time.perf_counter() - t0
            t0 = time.perf_counter()
            base = bare(responses, tests, args.workers, python)
            t_bare = time.perf_counter() - t0
            assert scores == base, (form, scores, base)  # all-or-nothing cases: both must agree
            ratios[form].append(t_bare / t_sandbox)
            print(f"rep {rep} {form:8s}: sandbox {n / t_sandbox:5.1f} samples/s ({reward.isolation}), "
                  f"bare {n / t_bare:5.1f} samples/s, {t_sandbox / n - t_bare / n:+.3f} s/sample")

    def spread(form: str) -> str:
        r = ratios[form]
        return f"{statistics.median(r):.2f}x (min {min(r):.2f}x, max {max(r):.2f}x)"
    print(f"reward_code: {spread('compare')} samples/s, {reward.isolation} sandbox vs bare subprocess, "
          f"compare-form tests; judged {spread('judged')}, opaque {spread('opaque')}; "
          f"{reps} runs, {n} samples, {args.workers} workers")


if __name__ == "__main__":
    sys.exit(main())

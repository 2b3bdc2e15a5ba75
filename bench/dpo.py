"""DPO with cached reference log-probs vs a live reference model, side by side.

    .venv/bin/python bench/dpo.py            # ~30M-parameter Llama, a few minutes on 2 CPU cores
    .venv/bin/python bench/dpo.py --smoke    # seconds: tiny model, 1 run (what CI runs)

1. Per-step time: the same DPO training steps with reference log-probs read from the
   on-disk cache (posttrain.stages.dpo.RefLogpCache) vs computed by a live reference model every
   step (forward, backward and AdamW update). Both trainers live in one process and their
   steps are interleaved on the same batches, so a busy machine slows both alike; a rep's
   ratio is the median of adjacent live/cached step-time ratios (first steps are warm-up).
2. End to end: a two-variant `dpo` stage (posttrain.stages.dpo.run) whose variants share one
   reference cache (computed once, by the first variant) vs the same stage with live
   references. Includes model loading, the reference pass and saving.

The last line is the headline (per-step ratio, then the end-to-end one).
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("POSTTRAIN_PROGRESS", "0")


def build_model(out: Path, *, hidden: int, layers: int, inter: int):
    from posttrain.modeling import save_checkpoint
    from posttrain.world.tiny import build_tokenizer, make_tiny_model

    tok = build_tokenizer()
    model = make_tiny_model(tok, seed=0, hidden_size=hidden, num_layers=layers, num_heads=hidden // 64,
                            num_kv_heads=max(1, hidden // 128), intermediate_size=inter)
    n_params = sum(p.numel() for p in model.parameters())
    save_checkpoint(model, tok, out)
    return tok, n_params


def synthetic_pairs(n: int, seed: int = 0):
    from posttrain.stages.dpo import Pair

    rng = random.Random(seed)
    words = "sort reverse add count the numbers please answer briefly quick brown fox lazy dog".split()

    def text(lo, hi):
        return " ".join(rng.choice(words + [str(rng.randint(0, 99))]) for _ in range(rng.randint(lo, hi)))

    return [Pair([{"role": "user", "content": text(8, 16)}], text(10, 24), text(10, 24), "preferences", f"syn:{i}")
            for i in range(n)]


def make_trainer(cached: bool, *, cfg, model_dir, tok, rows, root: Path, cache_key: str):
    """A ready MaskedDPOTrainer (reference pass done when cached) and its optimizer."""
    from datasets import Dataset
    from trl import DPOConfig

    from posttrain.stages import dpo
    from posttrain.modeling import load_causal_lm

    args = DPOConfig(output_dir=str(root / ("cached" if cached else "live")), use_cpu=True, bf16=False,
                     report_to="none", per_device_train_batch_size=cfg.batch_size, learning_rate=cfg.learning_rate,
                     beta=cfg.beta, loss_type=["sigmoid", "sft"], loss_weights=[1.0, cfg.nll_coef],
                     precompute_ref_log_probs=cached, max_length=None, gradient_checkpointing=False,
                     disable_tqdm=True)
    trainer = dpo.masked_dpo_trainer_class()(
        model=load_causal_lm(model_dir), ref_model=None if cached else load_causal_lm(model_dir).eval(),
        args=args, train_dataset=Dataset.from_list([{k: v for k, v in r.items() if k != "source"} for r in rows]),
        processing_class=tok, data_collator=dpo.PairCollator(tok.pad_token_id),
        ref_cache=dpo.RefLogpCache(root / "ref_cache", cache_key) if cached else None)
    trainer.create_optimizer()
    trainer.current_gradient_accumulation_steps = 1  # set by Trainer's own loop, which we drive by hand
    return trainer


def one_step(trainer, batch) -> float:
    """Seconds for one optimizer step: forward(s), backward, AdamW update."""
    t = time.perf_counter()
    trainer.training_step(trainer.model, batch)
    trainer.optimizer.step()
    trainer.optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - t


def per_step_rep(*, cfg, model_dir, tok, rows, root: Path, cache_key: str, steps: int):
    """Cached and live steps interleaved (c, l, l, c, c, l, ...) on the same batches, so both see
    the same machine load; returns (cached medians, live median, median of adjacent ratios)."""
    cached = make_trainer(True, cfg=cfg, model_dir=model_dir, tok=tok, rows=rows, root=root, cache_key=cache_key)
    live = make_trainer(False, cfg=cfg, model_dir=model_dir, tok=tok, rows=rows, root=root, cache_key=cache_key)
    batches_c = list(cached.get_train_dataloader())
    batches_l = list(live.get_train_dataloader())
    one_step(cached, batches_c[0])  # warm-up, not counted
    one_step(live, batches_l[0])
    tc, tl, ratios = [], [], []
    for i in range(steps):
        bc, bl = batches_c[(i + 1) % len(batches_c)], batches_l[(i + 1) % len(batches_l)]
        if i % 2 == 0:
            c, li = one_step(cached, bc), one_step(live, bl)
        else:
            li, c = one_step(live, bl), one_step(cached, bc)
        tc.append(c)
        tl.append(li)
        ratios.append(li / c)
    return statistics.median(tc), statistics.median(tl), statistics.median(ratios)


def stage_run(cached: bool, *, cfg, model_dir, root: Path, pref_file: Path) -> float:
    from posttrain.stages import dpo
    from posttrain.stage import StageContext

    run_dir = Path(tempfile.mkdtemp(dir=root, prefix="stage-"))
    ctx = StageContext(stage="dpo", round=1, run_dir=run_dir, out_dir=run_dir / "round_01" / "dpo",
                       config=cfg.model_copy(update={"precompute_ref": cached}),
                       inputs={"sft_model": str(model_dir), "preference_files": [str(pref_file)], "samples": None})
    t = time.perf_counter()
    res = dpo.run(ctx)
    elapsed = time.perf_counter() - t
    if cached:
        assert res.metrics["ref_cache"]["computed"] == res.metrics["pairs"], res.metrics["ref_cache"]
        assert res.metrics["ref_cache"]["hits"] == res.metrics["pairs"], res.metrics["ref_cache"]
    return elapsed


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="seconds (what CI runs): tiny model, 2 steps, 1 run")
    p.add_argument("--reps", type=int, default=None, help="alternating cached/live runs (default 3, smoke 1)")
    p.add_argument("--steps", type=int, default=None, help="interleaved steps of each kind per rep (default 6)")
    p.add_argument("--pairs", type=int, default=None, help="synthetic pairs (default 32, smoke 8)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default 2, smoke 1)")
    a = p.parse_args(argv)

    import torch

    from posttrain import files

    from posttrain.stages import dpo
    from posttrain.training import Variant

    smoke = a.smoke
    threads = a.threads or (1 if smoke else 2)
    torch.set_num_threads(threads)
    reps = a.reps or (1 if smoke else 3)
    hidden, layers, inter = (128, 2, 256) if smoke else (512, 10, 1408)
    steps = a.steps or (2 if smoke else 6)
    n_pairs = a.pairs or (8 if smoke else 32)

    root = Path(tempfile.mkdtemp(prefix="bench-dpo-"))
    os.environ.setdefault("POSTTRAIN_CACHE", str(root / "posttrain-cache"))
    model_dir = root / "sft_model"
    tok, n_params = build_model(model_dir, hidden=hidden, layers=layers, inter=inter)
    print(f"model: Llama, {n_params / 1e6:.1f}M parameters, hidden {hidden}, {layers} layers; "
          f"torch threads {threads}; device cpu", flush=True)

    cfg = dpo.DPOStageConfig(batch_size=4, learning_rate=1e-5, max_length=256, save_steps=10_000,
                             logging_steps=10_000, epochs=1)
    pairs = synthetic_pairs(n_pairs)
    rows, _ = dpo.encode_pairs(tok, pairs, cfg)
    lengths = [len(r["prompt_ids"]) + max(len(r["chosen_ids"]), len(r["rejected_ids"])) for r in rows]
    print(f"pairs: {len(rows)}, tokens per sequence {min(lengths)}-{max(lengths)}, batch {cfg.batch_size} pairs, "
          f"{steps} interleaved steps of each per rep", flush=True)
    key = dpo.ref_cache_key(files.hash_path(model_dir), "torch.float32", True, [])

    cached_t, live_t, ratios = [], [], []
    for r in range(reps):
        c, li, ratio = per_step_rep(cfg=cfg, model_dir=model_dir, tok=tok, rows=rows, root=root, cache_key=key,
                                    steps=steps)
        cached_t.append(c)
        live_t.append(li)
        ratios.append(ratio)
        print(f"  rep {r + 1}: cached {c * 1000:.0f} ms/step, live {li * 1000:.0f} ms/step, "
              f"median adjacent ratio {ratio:.2f}x", flush=True)

    # End to end: two variants, preference rows written as a file the stage reads.
    import json

    pref_file = root / "prefs.jsonl"
    pref_file.write_text("".join(json.dumps({"id": f"p{i}", "prompt": pr.prompt,
                                             "chosen": [{"role": "assistant", "content": pr.chosen}],
                                             "rejected": [{"role": "assistant", "content": pr.rejected}],
                                             "strength": "better"}) + "\n" for i, pr in enumerate(pairs)))
    e2e_cfg = cfg.model_copy(update={"variants": [Variant(), Variant(seed=1, learning_rate=2e-5)],
                                     "epochs": 1.0})
    e2e_reps = 1
    e2e_cached, e2e_live = [], []
    for r in range(e2e_reps):
        e2e_cached.append(stage_run(True, cfg=e2e_cfg, model_dir=model_dir, root=root, pref_file=pref_file))
        e2e_live.append(stage_run(False, cfg=e2e_cfg, model_dir=model_dir, root=root, pref_file=pref_file))
        print(f"  two-variant stage, rep {r + 1}: shared cache {e2e_cached[-1]:.1f} s, "
              f"live references {e2e_live[-1]:.1f} s, ratio {e2e_live[-1] / e2e_cached[-1]:.2f}x", flush=True)

    import shutil

    shutil.rmtree(root, ignore_errors=True)
    med = statistics.median(ratios)
    e2e = statistics.median(lv / c for lv, c in zip(e2e_live, e2e_cached))
    print(f"per step: cached {statistics.median(cached_t) * 1000:.0f} ms, live {statistics.median(live_t) * 1000:.0f} "
          f"ms (medians over {reps} runs)")
    print(f"dpo_ref_cache: {med:.2f}x per step, cached vs live reference (min {min(ratios):.2f}x, "
          f"max {max(ratios):.2f}x, {reps} runs, {n_params / 1e6:.0f}M params); two-variant stage end to end "
          f"{e2e:.2f}x ({e2e_reps} runs)")


if __name__ == "__main__":
    sys.exit(main())

"""DPO training: chosen and rejected packed after one shared prompt vs TRL's DPOTrainer on separate rows.

    .venv/bin/python bench/dpo_packing.py            # small local Llama, multi-turn ChatML, ~2-3 min on 2 cores
    .venv/bin/python bench/dpo_packing.py --smoke    # seconds: what CI runs
    .venv/bin/python bench/dpo_packing.py --size 30m --pairs 64 --reps 5   # a bigger model

Three trainers train the same saved model (same seed) on the same multi-turn ChatML pairs
(a system prompt and earlier turns; prompt ~300 tokens, chosen and rejected ~100 tokens each by
default) with the same settings: beta 0.1, the NLL term on chosen (weight 0.2), reference
log-probs precomputed, batch 4 pairs, AdamW, one epoch, no checkpoints:

- packed: posttrain.stages.dpo's trainer with `PackedPairCollator`, the `dpo` stage's default
  (one row `prompt | chosen | rejected` under a block attention mask);
- TRL: plain `trl.DPOTrainer` on the conversational rows (it tokenizes them itself; two rows
  per pair, the prompt computed twice), the baseline;
- ours, separate rows: posttrain.stages.dpo's trainer with `PairCollator` (isolates what packing
  buys from the rest of our trainer).

Per repetition it reports pairs/s of the training loop alone (a callback times
on_train_begin..on_train_end: no model loading, tokenization or reference pass) and the mean
training loss (equal within noise: at the start policy == reference, so the DPO term is log 2
and the rest is the NLL of chosen). On a CPU the headline ratio is pairs per CPU-second of this
process, since the wall clock of a shared CPU measures other jobs' load (the wall ratio is printed
too); on a GPU it is wall-clock. The reference pass (trainer construction, which precomputes the
reference log-probs) is timed and printed as well.

The last line is the headline: packed vs TRL pairs/s.
"""

from __future__ import annotations

import argparse
import contextlib
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
# Idle OpenMP threads sleep instead of spinning, so CPU time counts work, not waiting.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

SIZES = {  # hidden, layers, heads, kv heads, intermediate
    "tiny": (128, 2, 2, 1, 256),
    "small": (256, 4, 4, 2, 704),
    "30m": (512, 8, 8, 4, 1408),
}
WORDS = ("sort reverse add count the numbers please answer briefly quick brown fox lazy dog list "
         "explain why because first second then finally result value error check").split()


def build_model(root: Path, size: str):
    """A random Llama with the tiny ChatML tokenizer, saved as a checkpoint; (folder, tokenizer, parameters)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from posttrain.modeling import save_checkpoint
    from posttrain.world.tiny import build_chatml_tokenizer

    tok = build_chatml_tokenizer()
    hidden, layers, heads, kv, inter = SIZES[size]
    config = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv, intermediate_size=inter,
                         max_position_embeddings=2048, tie_word_embeddings=True,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    save_checkpoint(model, tok, root / "model")
    return root / "model", tok, sum(p.numel() for p in model.parameters())


def _n_tokens(tok, messages, generation_prompt: bool) -> int:
    return len(tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=generation_prompt,
                                       return_dict=True)["input_ids"])


def multi_turn_pairs(tok, n: int, prompt_tokens: int, response_tokens: int, seed: int = 0):
    """n pairs: system + user/assistant/user turns grown to ~prompt_tokens, responses to ~response_tokens."""
    from posttrain.stages.dpo import Pair

    rng = random.Random(seed)

    def grow(messages, target, generation_prompt):
        while _n_tokens(tok, messages, generation_prompt) < target:
            m = rng.choice([m for m in messages if m["role"] != "system"] or messages)
            m["content"] += " " + " ".join(rng.choice(WORDS) for _ in range(4))
        return messages

    def response():
        msg = [{"role": "assistant", "content": rng.choice(WORDS)}]
        base = _n_tokens(tok, [{"role": "user", "content": "x"}], True)
        while _n_tokens(tok, [{"role": "user", "content": "x"}] + msg, False) - base < response_tokens:
            msg[0]["content"] += " " + " ".join(rng.choice(WORDS) for _ in range(4))
        return msg[0]["content"]

    pairs = []
    for i in range(n):
        prompt = [{"role": "system", "content": "answer briefly"}, {"role": "user", "content": rng.choice(WORDS)},
                  {"role": "assistant", "content": rng.choice(WORDS)}, {"role": "user", "content": rng.choice(WORDS)}]
        pairs.append(Pair(grow(prompt, prompt_tokens, True), response(), response(), "preferences", f"bench:{i}"))
    return pairs


def make_clock():
    """A TrainerCallback timing the training loop alone (wall and process CPU seconds)."""
    import torch
    from transformers import TrainerCallback

    class Clock(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self._wall, self._cpu = time.perf_counter(), time.process_time()

        def on_train_end(self, args, state, control, **kwargs):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.wall, self.cpu = time.perf_counter() - self._wall, time.process_time() - self._cpu

    return Clock()


def dpo_args(out: Path, a, seed: int):
    import torch
    from trl import DPOConfig

    return DPOConfig(output_dir=str(out), use_cpu=not torch.cuda.is_available(), bf16=torch.cuda.is_available(),
                     report_to="none", per_device_train_batch_size=a.batch, learning_rate=a.lr, num_train_epochs=1,
                     beta=0.1, loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.2], precompute_ref_log_probs=True,
                     max_length=None, gradient_checkpointing=False, save_strategy="no", logging_steps=10_000,
                     disable_tqdm=True, seed=seed, data_seed=seed, dataloader_num_workers=0)


def train_one(path: str, *, model_dir: Path, tok, pairs, rows, a, seed: int, work: Path) -> dict:
    """Train one epoch along `path` ("packed", "trl" or "separate"); pairs/s of the loop, loss, reference time."""
    import torch
    from datasets import Dataset
    from transformers import set_seed
    from trl import DPOTrainer

    from posttrain.stages import dpo
    from posttrain.modeling import load_causal_lm

    set_seed(seed)
    model = load_causal_lm(model_dir, device="cuda" if torch.cuda.is_available() else "cpu")
    args = dpo_args(work / f"{path}_{seed}", a, seed)
    clock = make_clock()
    t0, c0 = time.perf_counter(), time.process_time()
    if path == "trl":
        data = Dataset.from_list([{"prompt": p.prompt, "chosen": [{"role": "assistant", "content": p.chosen}],
                                   "rejected": [{"role": "assistant", "content": p.rejected}]} for p in pairs])
        trainer = DPOTrainer(model=model, args=args, train_dataset=data, processing_class=tok, callbacks=[clock])
    else:
        cache = dpo.RefLogpCache(work / f"cache_{path}_{seed}", f"bench-{path}-{seed}")
        collator = (dpo.PackedPairCollator if path == "packed" else dpo.PairCollator)(tok.pad_token_id)
        trainer = dpo.masked_dpo_trainer_class()(
            model=model, args=args, processing_class=tok, data_collator=collator, ref_cache=cache,
            train_dataset=Dataset.from_list([{k: v for k, v in r.items() if k != "source"} for r in rows]),
            callbacks=[clock])
    ref_wall, ref_cpu = time.perf_counter() - t0, time.process_time() - c0  # includes the reference pass
    result = trainer.train()
    del trainer, model
    n = len(rows)
    return {"pairs_per_s": n / clock.wall, "pairs_per_cpu_s": n / clock.cpu, "wall": clock.wall, "cpu": clock.cpu,
            "loss": result.training_loss, "steps": result.global_step, "ref_wall": ref_wall, "ref_cpu": ref_cpu}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="seconds (what CI runs): tiny model, 8 short pairs, 1 run")
    ap.add_argument("--size", choices=sorted(SIZES), default="small")
    ap.add_argument("--prompt-tokens", type=int, default=300)
    ap.add_argument("--response-tokens", type=int, default=100)
    ap.add_argument("--pairs", type=int, default=16)
    ap.add_argument("--batch", type=int, default=4, help="pairs per step (every path)")
    ap.add_argument("--lr", type=float, default=1e-5)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--no-separate", action="store_true", help="skip our trainer on separate rows")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave as is)")
    a = ap.parse_args(argv)
    if a.smoke:
        a.size, a.prompt_tokens, a.response_tokens, a.pairs, a.reps = "tiny", 60, 20, 8, 1

    import torch

    from posttrain.stages import dpo

    if a.threads:
        torch.set_num_threads(a.threads)
    on_gpu = torch.cuda.is_available()
    paths = ["packed", "trl"] + ([] if a.no_separate else ["separate"])
    with tempfile.TemporaryDirectory(prefix="dpo_packing_") as tmp:
        root = Path(tmp)
        model_dir, tok, n_params = build_model(root, a.size)
        pairs = multi_turn_pairs(tok, a.pairs, a.prompt_tokens, a.response_tokens)
        rows, counts = dpo.encode_pairs(tok, pairs, dpo.DPOStageConfig(max_length=4096))
        if len(rows) != len(pairs):
            raise SystemExit(f"dpo_packing: {len(pairs) - len(rows)} pairs did not encode ({dict(counts)})")
        P = statistics.mean(len(r["prompt_ids"]) for r in rows)
        R = statistics.mean((len(r["chosen_ids"]) + len(r["rejected_ids"])) / 2 for r in rows)
        device = "cuda" if on_gpu else f"cpu ({torch.get_num_threads()} threads)"
        print(f"model {a.size}: {n_params / 1e6:.1f}M parameters on {device}; {len(rows)} multi-turn ChatML pairs, "
              f"prompt {P:.0f} + 2 x {R:.0f} response tokens (mean); batch {a.batch}, 1 epoch; tokens per pair: "
              f"packed {P + 2 * R + 1:.0f}, separate rows {2 * (P + R):.0f}", flush=True)
        res = {p: [] for p in paths}
        ratios, wall_ratios = [], []
        for rep in range(a.reps):
            order = paths if rep % 2 == 0 else list(reversed(paths))  # a load drift favours neither
            with open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet), contextlib.redirect_stderr(quiet):
                out = {p: train_one(p, model_dir=model_dir, tok=tok, pairs=pairs, rows=rows, a=a, seed=rep,
                                    work=root) for p in order}  # the trainers' own prints and bars stay out
            for p in paths:
                res[p].append(out[p])
            key = "pairs_per_s" if on_gpu else "pairs_per_cpu_s"
            ratios.append(out["packed"][key] / out["trl"][key])
            wall_ratios.append(out["packed"]["pairs_per_s"] / out["trl"]["pairs_per_s"])
            print(f"rep {rep}: " + "; ".join(
                f"{p} {out[p]['pairs_per_s']:.2f} pairs/s ({out[p]['wall']:.1f} s wall, {out[p]['cpu']:.1f} s CPU, "
                f"loss {out[p]['loss']:.4f}, trainer start with reference pass {out[p]['ref_wall']:.1f} s)"
                for p in paths) + f"; packed/TRL {ratios[-1]:.2f}x ({'wall' if on_gpu else 'CPU time'}), "
                f"wall {wall_ratios[-1]:.2f}x", flush=True)

    def spread(xs, fmt="{:.4f}"):
        return f"{fmt.format(statistics.mean(xs))} (min {fmt.format(min(xs))}, max {fmt.format(max(xs))})"

    print("mean training loss: " + ", ".join(f"{p} {spread([r['loss'] for r in res[p]])}" for p in paths))
    if "separate" in res:
        key = "pairs_per_s" if on_gpu else "pairs_per_cpu_s"
        sep = [pk[key] / s[key] for pk, s in zip(res["packed"], res["separate"])]
        print(f"packed vs our trainer on separate rows: {statistics.median(sep):.2f}x "
              f"(min {min(sep):.2f}x, max {max(sep):.2f}x)")
    ref = [t["ref_cpu" if not on_gpu else "ref_wall"] / pk["ref_cpu" if not on_gpu else "ref_wall"]
           for pk, t in zip(res["packed"], res["trl"])]
    print(f"trainer start with the reference pass: packed vs TRL {statistics.median(ref):.2f}x "
          f"(min {min(ref):.2f}x, max {max(ref):.2f}x)")
    print(f"wall-clock ratio: median {statistics.median(wall_ratios):.2f}x (min {min(wall_ratios):.2f}x, "
          f"max {max(wall_ratios):.2f}x)")
    unit = "pairs/s" if on_gpu else "pairs per CPU-second"
    print(f"dpo_packing: {statistics.median(ratios):.2f}x {unit}, packed vs TRL DPOTrainer separate rows "
          f"(min {min(ratios):.2f}x, max {max(ratios):.2f}x, {len(ratios)} runs)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Reward-model training: one packed row per ranking vs TRL RewardTrainer on expanded pairs.

Both paths train the same freshly initialised model (same seed, same head) on the same 3-way
rankings for the same number of epochs and the same number of optimizer steps (B rankings per
packed step, 3B pairs per TRL step), through posttrain.stages.rm.train_packed / train_pairs, i.e. the
code the `rm` stage runs. Per repetition it reports rankings/s of the training loop (a
callback times on_train_begin..on_train_end: no model loading, data preparation or trainer
start-up) and held-out pairwise accuracy of each. On a GPU the headline ratio is wall-clock; on
a CPU it is rankings per CPU-second of this process, because the wall clock of a CPU shared with
other jobs measures their load more than ours (the wall-clock ratio is printed too).

The data is synthetic: every response holds random content tokens plus a few "good" and "bad"
marker tokens; its quality is #good - #bad and the ranking orders responses by quality. A model
has to count markers to rank well, so held-out accuracy says whether the model learned.

    .venv/bin/python bench/rm_packing.py            # CPU-sized default (a few minutes)
    .venv/bin/python bench/rm_packing.py --smoke    # seconds: what CI runs
    .venv/bin/python bench/rm_packing.py --size 30m --prompt-len 200 --response-len 100 \\
        --train 512 --heldout 256 --epochs 2 --reps 3   # the GPU-sized comparison

The last line is the headline: the rankings/s ratio, packed over pairs.
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
os.environ.setdefault("POSTTRAIN_PROGRESS", "0")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
# Idle OpenMP threads sleep instead of spinning, so CPU time counts work, not waiting.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

SIZES = {  # hidden, layers, heads, intermediate
    "tiny": (128, 2, 2, 256),
    "small": (256, 4, 4, 704),
    "30m": (512, 8, 8, 1408),
}


def make_rankings(n: int, prompt_len: int, response_len: int, vocab: list[int], good: int, bad: int,
                  eot: int, bos: int, rng: random.Random):
    """n 3-way rankings as EncodedRanking (best first), qualities distinct within a ranking."""
    from posttrain.stages.rm import EncodedRanking

    def response(quality_parts):
        g, b = quality_parts
        body = [rng.choice(vocab) for _ in range(response_len - 1 - g - b)] + [good] * g + [bad] * b
        rng.shuffle(body)
        return body + [eot]

    out = []
    for _ in range(n):
        while True:
            parts = [(rng.randint(0, 4), rng.randint(0, 3)) for _ in range(3)]
            q = [g - b for g, b in parts]
            if len(set(q)) == 3:
                break
        order = sorted(range(3), key=lambda k: -q[k])
        prompt = [bos] + [rng.choice(vocab) for _ in range(prompt_len - 1)]
        out.append(EncodedRanking(prompt_ids=prompt, response_ids=[response(parts[k]) for k in order],
                                  pairs=[(0, 1), (0, 2), (1, 2)], strengths=["better"] * 3,
                                  source=f"synthetic:{len(out)}"))
    return out


def build_base(tokenizer, size: str, root: Path) -> Path:
    from posttrain.modeling import save_checkpoint
    from posttrain.world.tiny import make_tiny_model

    hidden, layers, heads, inter = SIZES[size]
    model = make_tiny_model(tokenizer, seed=0, hidden_size=hidden, num_layers=layers, num_heads=heads,
                            num_kv_heads=heads, intermediate_size=inter, max_position_embeddings=2048)
    n = sum(p.numel() for p in model.parameters())
    save_checkpoint(model, tokenizer, root / "base")
    return root / "base", n


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


def train_one(path: str, base: Path, tokenizer, train, heldout, args, seed: int, work: Path) -> dict:
    import torch
    from transformers import set_seed

    from posttrain.stages import rm
    from posttrain.training import Variant

    cfg = rm.RMConfig(packing=path == "packed", learning_rate=args.lr, epochs=args.epochs,
                      batch_size=args.batch if path == "packed" else 3 * args.batch,
                      logging_steps=10_000, save_steps=10_000, eval_batch_size=8)
    shuffled = [rm.shuffle_responses(it, random.Random(seed * 7919 + i)) for i, it in enumerate(train)]
    set_seed(seed)
    model = rm.load_reward_model(base)
    model.config.pad_token_id = tokenizer.pad_token_id
    fn = rm.train_packed if path == "packed" else rm.train_pairs
    clock = make_clock()
    trainer, result = fn(model, tokenizer, shuffled, cfg, Variant(), work_dir=work / f"{path}_{seed}", seed=seed,
                         callbacks=[clock])
    runtime = clock.wall
    acc = rm.evaluate_rankings(trainer.model, heldout, tokenizer.pad_token_id, cfg)
    del trainer, model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return {"rankings_per_s": len(train) * args.epochs / runtime, "seconds": runtime,
            "rankings_per_cpu_s": len(train) * args.epochs / clock.cpu, "cpu_seconds": clock.cpu,
            "steps": result.global_step,
            "loss": result.training_loss, "accuracy": acc["accuracy"], "full_order": acc["full_order_accuracy"]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="seconds (what CI runs): tiny model, 8 rankings, 1 run")
    ap.add_argument("--size", choices=sorted(SIZES), default="small")
    ap.add_argument("--prompt-len", type=int, default=60)
    ap.add_argument("--response-len", type=int, default=30)
    ap.add_argument("--train", type=int, default=24, help="training rankings")
    ap.add_argument("--heldout", type=int, default=48, help="held-out rankings")
    ap.add_argument("--epochs", type=float, default=2)
    ap.add_argument("--batch", type=int, default=4, help="rankings per packed step (TRL gets 3x pairs)")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave as is)")
    args = ap.parse_args(argv)
    if args.smoke:
        args.size, args.prompt_len, args.response_len, args.train, args.heldout = "tiny", 20, 10, 8, 8
        args.epochs, args.reps = 1, 1

    import torch

    from posttrain.world.tiny import EOT, build_tokenizer

    if args.threads:
        torch.set_num_threads(args.threads)
    tokenizer = build_tokenizer()
    special = set(tokenizer.all_special_ids)
    vocab = [i for i in range(len(tokenizer)) if i not in special]
    good, bad = vocab[0], vocab[1]
    vocab = vocab[2:]
    rng = random.Random(1234)
    mk = dict(prompt_len=args.prompt_len, response_len=args.response_len, vocab=vocab, good=good, bad=bad,
              eot=tokenizer.convert_tokens_to_ids(EOT), bos=tokenizer.bos_token_id, rng=rng)
    train, heldout = make_rankings(args.train, **mk), make_rankings(args.heldout, **mk)
    packed_tokens = args.prompt_len + 3 * args.response_len
    pair_tokens = 3 * 2 * (args.prompt_len + args.response_len)
    with tempfile.TemporaryDirectory(prefix="rm_packing_") as tmp:
        base, n_params = build_base(tokenizer, args.size, Path(tmp))
        device = "cuda" if torch.cuda.is_available() else f"cpu ({torch.get_num_threads()} threads)"
        print(f"model {args.size}: {n_params / 1e6:.1f}M parameters on {device}; {args.train} train / "
              f"{args.heldout} held-out 3-way rankings, prompt {args.prompt_len} + 3 x {args.response_len} "
              f"response tokens; {args.epochs:g} epochs; tokens per ranking: packed {packed_tokens}, "
              f"pairs {pair_tokens} ({pair_tokens / packed_tokens:.2f}x)", flush=True)
        on_gpu = torch.cuda.is_available()
        ratios, wall_ratios, res = [], [], {"packed": [], "pairs": []}
        for rep in range(args.reps):
            seed = rep
            # Alternate which path runs first, so a drift in machine load does not favour one.
            order = ["packed", "pairs"] if rep % 2 == 0 else ["pairs", "packed"]
            out = {p: train_one(p, base, tokenizer, train, heldout, args, seed, Path(tmp)) for p in order}
            for p in out:
                res[p].append(out[p])
            key = "rankings_per_s" if on_gpu else "rankings_per_cpu_s"
            ratios.append(out["packed"][key] / out["pairs"][key])
            wall_ratios.append(out["packed"]["rankings_per_s"] / out["pairs"]["rankings_per_s"])
            print(f"rep {rep}: " + "; ".join(
                f"{p} {out[p]['rankings_per_s']:.2f} rankings/s ({out[p]['seconds']:.1f} s wall, "
                f"{out[p]['cpu_seconds']:.1f} s CPU, {out[p]['steps']} steps, "
                f"loss {out[p]['loss']:.3f}, held-out acc {out[p]['accuracy']:.3f}, full order "
                f"{out[p]['full_order']:.3f})" for p in ("packed", "pairs"))
                + f"; ratio {ratios[-1]:.2f}x ({'wall' if on_gpu else 'CPU time'}), wall {wall_ratios[-1]:.2f}x",
                flush=True)

    def spread(xs):
        return f"{statistics.mean(xs):.3f} (min {min(xs):.3f}, max {max(xs):.3f})"

    acc_p = [r["accuracy"] for r in res["packed"]]
    acc_t = [r["accuracy"] for r in res["pairs"]]
    diff = [a - b for a, b in zip(acc_p, acc_t)]
    print(f"held-out pairwise accuracy: packed {spread(acc_p)}, pairs {spread(acc_t)}, "
          f"packed - pairs {spread(diff)}")
    print(f"wall-clock ratio: median {statistics.median(wall_ratios):.2f}x (min {min(wall_ratios):.2f}x, "
          f"max {max(wall_ratios):.2f}x)")
    unit = "rankings/s" if on_gpu else "rankings per CPU-second"
    print(f"rm_packing: {statistics.median(ratios):.2f}x {unit}, packed vs TRL pairs "
          f"(min {min(ratios):.2f}x, max {max(ratios):.2f}x, {len(ratios)} runs)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

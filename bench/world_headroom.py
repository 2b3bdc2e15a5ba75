"""Is there headroom in the embedded world for the post-training loop to exploit?

    .venv/bin/python bench/world_headroom.py [--rounds 3] [--k 8]
    .venv/bin/python bench/world_headroom.py --smoke     # seconds: 1 round, 16 prompts (what CI runs)

Uses the default world (built if needed). Per round: sample K responses per training prompt
from the current policy, score them with the task scorer (an oracle reward model), and
compare the mean sample with the best of K (the headroom rejection sampling exploits).
Then fine-tune (plain torch loop, answer tokens only) on the best-of-K responses, and as the
baseline on one random sample per prompt, and evaluate both on the held-out prompts. The
best-of-K model becomes the next round's policy. The last line is the headline:
held-out score after the last round over the base model's.
"""

from __future__ import annotations

import argparse
import copy
import os
import random
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def sft(model, tokenizer, pairs, *, steps: int, lr: float, batch_size: int, seed: int):
    import torch

    from posttrain.world.build import encode_transcripts

    ids, labels = encode_transcripts(tokenizer, pairs)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, ids.shape[0], (batch_size,), generator=gen)
        loss = model(input_ids=ids[idx], labels=labels[idx]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    model.eval()
    return model


def main() -> None:
    import torch

    from posttrain.modeling import load_causal_lm, load_tokenizer
    from posttrain.world import task
    from posttrain.engines import generate_messages
    from posttrain.world.build import ensure_world, evaluate_model, read_prompts

    ap = argparse.ArgumentParser()
    ap.add_argument("--smoke", action="store_true", help="seconds (what CI runs): 1 round, 16 prompts, K=4")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--prompts", type=int, default=256)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--threads", type=int, default=1,
                    help="1 is much faster than 2 on a loaded machine")
    args = ap.parse_args()
    if args.smoke:
        args.rounds, args.prompts, args.k, args.steps = 1, 16, 4, 5
    torch.set_num_threads(args.threads)

    t0 = time.perf_counter()
    world = ensure_world()
    print(f"world {world.root} ready in {time.perf_counter() - t0:.1f}s", flush=True)
    tokenizer = load_tokenizer(world.base_model)
    policy = load_causal_lm(world.base_model, dtype="float32", device="cpu")
    train = read_prompts(world.train_prompts)
    heldout = read_prompts(world.heldout_prompts)
    rng = random.Random(0)

    def held_score(model, seed):
        s = evaluate_model(model, tokenizer, heldout, n=4, temperature=args.temperature, seed=seed)
        g = evaluate_model(model, tokenizer, heldout, greedy=True, seed=seed)
        return s["score"], g["score"]

    base_s, base_g = held_score(policy, 0)
    print(f"base: held-out sampled {base_s:.3f}  greedy {base_g:.3f}", flush=True)
    ratios = []
    for r in range(1, args.rounds + 1):
        t1 = time.perf_counter()
        prompts = rng.sample(train, args.prompts)
        gens = generate_messages(policy, tokenizer, prompts, n=args.k, temperature=args.temperature,
                                  seed=r)
        scores = [[task.score(task.last_user_content(p), g["text"]) for g in gs]
                  for p, gs in zip(prompts, gens)]
        mean = sum(sum(s) for s in scores) / sum(len(s) for s in scores)
        best = [max(range(len(s)), key=s.__getitem__) for s in scores]
        best_mean = sum(s[b] for s, b in zip(scores, best)) / len(scores)
        top_pairs = [(p, gs[b]["text"]) for p, gs, b in zip(prompts, gens, best)]
        rand_pairs = [(p, gs[rng.randrange(len(gs))]["text"]) for p, gs in zip(prompts, gens)]
        t_sample = time.perf_counter() - t1

        t1 = time.perf_counter()
        tuned = sft(copy.deepcopy(policy), tokenizer, top_pairs, steps=args.steps, lr=args.lr,
                    batch_size=32, seed=r)
        t_sft = time.perf_counter() - t1
        control = sft(copy.deepcopy(policy), tokenizer, rand_pairs, steps=args.steps, lr=args.lr,
                      batch_size=32, seed=r)
        tuned_s, tuned_g = held_score(tuned, r)
        ctrl_s, ctrl_g = held_score(control, r)
        print(f"round {r}: train samples mean {mean:.3f}  best-of-{args.k} {best_mean:.3f} | "
              f"held-out after SFT on best-of-K: sampled {tuned_s:.3f} greedy {tuned_g:.3f} | "
              f"on random samples: sampled {ctrl_s:.3f} greedy {ctrl_g:.3f} "
              f"(sample {t_sample:.0f}s, sft {t_sft:.0f}s)", flush=True)
        ratios.append(tuned_s / max(ctrl_s, 1e-9))
        policy = tuned
    final_s, _ = held_score(policy, 99)
    gap_closed = (final_s - base_s) / max(1e-9, 1 - base_s)
    print(f"gap to perfect closed after {args.rounds} round(s): {gap_closed:.0%}")
    print(f"world_headroom: {final_s / base_s:.2f}x held-out sampled task score, SFT on best-of-{args.k} "
          f"after {args.rounds} round(s) vs base ({base_s:.3f} -> {final_s:.3f}; per round vs SFT on "
          f"random samples min {min(ratios):.2f}x, max {max(ratios):.2f}x)")


if __name__ == "__main__":
    sys.exit(main())

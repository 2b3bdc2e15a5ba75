"""DPO ablation on the embedded world: the NLL term and formatting-token masking, on and off.

    .venv/bin/python bench/dpo_ablation.py            # 4 settings x 3 seeds, a few minutes
    .venv/bin/python bench/dpo_ablation.py --smoke    # seconds: 16 pairs, 8 prompts (what CI runs)

Start (SFT model and reference): the world's base model. Data: the world's round-1
preference batch (significantly_better/better, edited answers as chosen). For each setting
and seed, one `dpo` stage run (posttrain.stages.dpo.run), then:

- chosen log-prob change: mean over training pairs of log pi(chosen response incl. its
  <|eot_id|>) after DPO minus before, and the same for the <|eot_id|> token alone;
- held-out task score: K samples per held-out prompt at temperature 1, scored by the task;
- never-stop rate (no end-of-turn within the token budget) and empty-stop rate (the turn
  ends with no text).

The last line is the headline: the paper's setting (NLL + masking) vs plain DPO.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("POSTTRAIN_PROGRESS", "0")

SETTINGS = [  # name, nll_coef, mask_formatting
    ("nll+mask (paper)", 0.2, True),
    ("nll, no mask", 0.2, False),
    ("no nll, mask", 0.0, True),
    ("plain dpo", 0.0, False),
]


def chosen_logps(model_dir: Path, rows: list[dict]) -> tuple[float, float]:
    """Mean over pairs of log pi(chosen response, end-of-turn included) and of log pi(end-of-turn)."""
    import torch

    from posttrain.modeling import load_causal_lm

    model = load_causal_lm(model_dir, dtype="float32", device="cpu").eval()
    full, eot = [], []
    with torch.no_grad():
        for r in rows:
            ids = r["prompt_ids"] + r["chosen_ids"]
            logits = model(input_ids=torch.tensor([ids])).logits[0, :-1].float()
            lp = torch.log_softmax(logits, -1).gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
            resp = lp[len(r["prompt_ids"]) - 1:]  # (len(chosen_ids),)
            mask = torch.tensor(r["chosen_loss_mask"], dtype=lp.dtype)
            full.append(float((resp * mask).sum()))
            eot.append(float(resp[-1]))  # encode_example ends the response with its end-of-turn token
    return statistics.fmean(full), statistics.fmean(eot)


def evaluate(model_dir: Path, prompts, *, n: int, max_new_tokens: int, seed: int) -> dict:
    from posttrain.modeling import load_causal_lm, load_tokenizer
    from posttrain.engines import generate_messages
    from posttrain.world import build

    model = load_causal_lm(model_dir, dtype="float32", device="cpu")
    tok = load_tokenizer(model_dir)
    gens = generate_messages(model, tok, prompts, n=n, temperature=1.0, max_new_tokens=max_new_tokens, seed=seed)
    res = build.summarize_scores(prompts, gens)
    flat = [g for gs in gens for g in gs]
    res["never_stop"] = sum(not g["finished"] for g in flat) / len(flat)
    res["empty_stop"] = sum(g["finished"] and not g["text"].strip() for g in flat) / len(flat)
    return res


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true",
                   help="seconds (what CI runs): one seed, the batch's first 16 pairs, 8 prompts x 2 samples")
    p.add_argument("--seeds", type=int, default=None, help="seeds per setting (default 3, smoke 1)")
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--epochs", type=float, default=None, help="default 2, smoke 1")
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--samples", type=int, default=None, help="samples per held-out prompt (default 4, smoke 2)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default 2, smoke 1)")
    a = p.parse_args(argv)

    import torch

    from posttrain.stages import dpo
    from posttrain.modeling import load_tokenizer
    from posttrain.stage import StageContext
    from posttrain.world import build

    torch.set_num_threads(a.threads or (1 if a.smoke else 2))
    seeds = a.seeds or (1 if a.smoke else 3)
    a.epochs = a.epochs or (1.0 if a.smoke else 2.0)
    a.samples = a.samples or (2 if a.smoke else 4)
    world = build.ensure_world()
    base = world.base_model
    prompts = build.read_prompts(world.heldout_prompts)[: 8 if a.smoke else None]
    tok = load_tokenizer(base)
    root = Path(tempfile.mkdtemp(prefix="dpo-ablation-"))
    prefs = world.preferences(1)
    if a.smoke:
        from posttrain.files import iter_jsonl, write_jsonl

        prefs = root / prefs.name
        write_jsonl(prefs, list(iter_jsonl(world.preferences(1)))[:16])
    print(f"world: {world.root}; SFT start/reference: base_model; data: {prefs.name}; "
          f"held-out prompts: {len(prompts)} x {a.samples} samples; lr {a.lr}, epochs {a.epochs}, beta {a.beta}, "
          f"{seeds} seed(s)", flush=True)

    before = evaluate(base, prompts, n=a.samples, max_new_tokens=24, seed=0)
    plain_cfg = dpo.DPOStageConfig(max_length=256)
    rows, _ = dpo.encode_pairs(tok, dpo.build_pairs(plain_cfg, [prefs], None)[0], plain_cfg)
    full0, eot0 = chosen_logps(base, rows)
    results = {}
    for name, nll, mask in SETTINGS:
        per_seed = []
        for seed in range(seeds):
            cfg = dpo.DPOStageConfig(beta=a.beta, nll_coef=nll, mask_formatting=mask, learning_rate=a.lr,
                                     epochs=a.epochs, batch_size=16, max_length=256,
                                     logging_steps=1 if a.smoke else 5, save_steps=10_000, variants=[{"seed": seed}])
            run_dir = root / f"{name.split()[0]}-{int(mask)}-{seed}".replace("+", "_")
            ctx = StageContext(stage="dpo", round=1, run_dir=run_dir, out_dir=run_dir / "dpo", config=cfg,
                               inputs={"sft_model": str(base), "preference_files": [str(prefs)],
                                       "samples": None}, seed=seed)
            res = dpo.run(ctx)
            out = run_dir / res.outputs["variants"][0]
            if not results and not per_seed:
                print(f"pairs: {res.metrics['pair_counts']}", flush=True)
            full1, eot1 = chosen_logps(out, rows)
            ev = evaluate(out, prompts, n=a.samples, max_new_tokens=24, seed=seed)
            per_seed.append({"d_chosen": full1 - full0, "d_eot": eot1 - eot0, **ev,
                             "acc_last": res.metrics["variants"]["v0"]["rewards/accuracies"]["last"]})
        results[name] = {k: statistics.fmean(r[k] for r in per_seed)
                         for k in ("d_chosen", "d_eot", "score", "eot_rate", "never_stop", "empty_stop",
                                   "mean_length", "acc_last")}
        results[name]["score_sd"] = statistics.pstdev(r["score"] for r in per_seed)

    print()
    print(f"{'setting':<18} {'d logp(chosen)':>15} {'d logp(eot)':>12} {'score':>13} {'never stop':>11} "
          f"{'empty stop':>11} {'mean len':>9} {'rew acc':>8}")
    print(f"{'SFT start':<18} {'':>15} {'':>12} {before['score']:>13.3f} {1 - before['eot_rate']:>11.3f} "
          f"{'':>11} {before['mean_length']:>9.1f} {'':>8}")
    for name, r in results.items():
        print(f"{name:<18} {r['d_chosen']:>+15.3f} {r['d_eot']:>+12.3f} {r['score']:>7.3f}±{r['score_sd']:.3f} "
              f"{r['never_stop']:>11.3f} {r['empty_stop']:>11.3f} {r['mean_length']:>9.1f} {r['acc_last']:>8.2f}")
    import shutil

    shutil.rmtree(root, ignore_errors=True)
    paper, plain = results[SETTINGS[0][0]], results[SETTINGS[-1][0]]
    print(f"dpo_ablation: {paper['score'] / plain['score']:.3f}x held-out score, nll+mask vs plain DPO "
          f"({paper['score']:.3f} vs {plain['score']:.3f}, SFT start {before['score']:.3f}; chosen logp change "
          f"{paper['d_chosen']:+.2f} vs {plain['d_chosen']:+.2f}; never-stop {paper['never_stop']:.3f} vs "
          f"{plain['never_stop']:.3f}; {seeds} seed(s))")


if __name__ == "__main__":
    sys.exit(main())

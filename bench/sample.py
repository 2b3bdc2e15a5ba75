"""Rejection-sampling throughput: shared prefill vs `generate(num_return_sequences=K)`, and vLLM.

    .venv/bin/python bench/sample.py            # about 4-6 minutes on 2 CPU cores
    .venv/bin/python bench/sample.py --smoke    # seconds (plus vLLM's start-up when found): what CI runs
    POSTTRAIN_VLLM_PYTHON=.venv-vllm/bin/python .venv/bin/python bench/sample.py   # with vLLM

A randomly initialised Llama of about 30M parameters (hidden 512, 8 layers, head_dim 64):
large enough that the model's compute dominates, not Python overhead. Same prompts (random
token ids, 300 tokens), same K (16), same sampling (temperature 1, top_p 1), 64 new tokens
and no stop token, so every method generates exactly prompts x K x 64 tokens.

(a) transformers: posttrain's shared prefill (each prompt prefilled once, KV cache repeated
    K times) vs `model.generate(num_return_sequences=K)` (each prompt prefilled K times),
    alternating, several runs; the ratio of generated tokens/s per run pair.
(b) vLLM (the CPU build when there is no GPU), in its own interpreter, prefix caching on
    and off; start-up is excluded (a warm-up call first), tokens/s over several calls.

The last line is the headline.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def build_model(out_dir: Path, layers: int, hidden: int) -> tuple[Path, int]:
    from posttrain.modeling import save_checkpoint
    from posttrain.world.tiny import build_tokenizer, make_tiny_model

    tok = build_tokenizer()
    model = make_tiny_model(tok, seed=0, hidden_size=hidden, num_layers=layers, num_heads=hidden // 64,
                            num_kv_heads=hidden // 64, intermediate_size=3 * hidden, max_position_embeddings=2048)
    n_params = sum(p.numel() for p in model.parameters())
    save_checkpoint(model, tok, out_dir)
    return out_dir, n_params


def make_prompts(n: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    import random

    rng = random.Random(seed)
    # ordinary (non-special) tokens only: ids 8.. in the tiny tokenizer
    return [[rng.randrange(8, vocab) for _ in range(length)] for _ in range(n)]


def run_shared_prefill(model, tok, prompts, k, new_tokens, seed) -> tuple[int, float]:
    from posttrain.engines import EngineOptions, TransformersGenerator
    from posttrain.jobs import SamplingSettings

    gen = TransformersGenerator(model=model, tokenizer=tok, options=EngineOptions(max_batch_sequences=len(prompts) * k))
    settings = SamplingSettings(k=k, temperature=1.0, top_p=1.0, max_new_tokens=new_tokens, seed=seed)
    t0 = time.perf_counter()
    out = gen.generate(prompts, settings)
    seconds = time.perf_counter() - t0
    return sum(sum(g.n_tokens) for g in out), seconds


def run_hf_generate(model, tok, prompts, k, new_tokens, seed) -> tuple[int, float]:
    import torch

    from posttrain.engines import left_pad

    ids, mask, _ = left_pad(prompts, tok.pad_token_id)
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=1.0, top_p=1.0,
                             top_k=0, num_return_sequences=k, max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, pad_token_id=tok.pad_token_id)
    seconds = time.perf_counter() - t0
    return (out.shape[1] - ids.shape[1]) * out.shape[0], seconds


def bench_transformers(model_dir: Path, prompts, k, new_tokens, runs, threads) -> list[dict]:
    import torch

    from posttrain.modeling import load_causal_lm, load_tokenizer

    tok = load_tokenizer(model_dir)
    model = load_causal_lm(model_dir, dtype="float32", device="cpu").eval()
    model.generation_config.eos_token_id = None  # no stop token: every method makes the same tokens
    torch.set_num_threads(threads)
    # full-size warm-up of both (allocator growth, kernel selection): the first timed run was
    # otherwise about twice as slow as the others
    run_shared_prefill(model, tok, prompts, k, new_tokens, 0)
    run_hf_generate(model, tok, prompts, k, new_tokens, 0)
    results = []
    for r in range(runs):
        n_new, s_new = run_shared_prefill(model, tok, prompts, k, new_tokens, seed=r)
        n_old, s_old = run_hf_generate(model, tok, prompts, k, new_tokens, seed=r)
        assert n_new == n_old == len(prompts) * k * new_tokens, (n_new, n_old)
        results.append({"shared": n_new / s_new, "generate": n_old / s_old})
        print(f"  run {r + 1}: shared prefill {n_new / s_new:8.1f} tok/s ({s_new:6.2f} s)   "
              f"generate(num_return_sequences) {n_old / s_old:8.1f} tok/s ({s_old:6.2f} s)   "
              f"ratio {s_old / s_new:.2f}x", flush=True)
    return results


def vllm_child(args) -> None:
    """Runs in the vLLM interpreter: one engine, a warm-up call, then timed calls."""
    from posttrain.engines import EngineOptions, VLLMEngine
    from posttrain.jobs import SamplingSettings

    prompts = json.loads(Path(args.prompts_file).read_text())
    options = EngineOptions(enable_prefix_caching=args.prefix_caching == "on", dtype="float32")
    engine = VLLMEngine(args.model, options, max_model_len=max(map(len, prompts)) + args.new_tokens)
    # ignore the end-of-turn: no stop ids, so every sample has exactly new_tokens tokens
    warm = SamplingSettings(k=2, temperature=1.0, max_new_tokens=2, seed=99)
    engine.generate([prompts[0][: len(prompts[0]) // 2]], warm)
    rates = []
    for r in range(args.runs):
        # a different seed per run; prompts shifted by one token so no run hits an earlier run's cache
        run_prompts = [[(t + r + 1) % 300 + 8 for t in p] for p in prompts]
        settings = SamplingSettings(k=args.k, temperature=1.0, max_new_tokens=args.new_tokens, seed=r)
        t0 = time.perf_counter()
        out = engine.generate(run_prompts, settings)
        seconds = time.perf_counter() - t0
        rates.append(sum(sum(g.n_tokens) for g in out) / seconds)
    print("VLLM_RESULT " + json.dumps({"rates": rates}), flush=True)


def bench_vllm(python: str, model_dir: Path, prompts, k, new_tokens, runs, caching: str, tmp: Path) -> list[float]:
    pf = tmp / "prompts.json"
    pf.write_text(json.dumps(prompts))
    env = dict(os.environ, VLLM_CACHE_ROOT=str(tmp / "vllm-cache"), VLLM_NO_USAGE_STATS="1",
               VLLM_LOGGING_LEVEL="WARNING", VLLM_ENABLE_V1_MULTIPROCESSING="0", VLLM_CPU_KVCACHE_SPACE="2")
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    cmd = [python, str(Path(__file__).resolve()), "--vllm-child", "--model", str(model_dir), "--prompts-file", str(pf),
           "--k", str(k), "--new-tokens", str(new_tokens), "--runs", str(runs), "--prefix-caching", caching]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith("VLLM_RESULT "):
            return json.loads(line[len("VLLM_RESULT "):])["rates"]
    raise RuntimeError(f"vLLM child failed (exit {proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")


def spread(values: list[float]) -> str:
    return f"median {statistics.median(values):.1f}, min {min(values):.1f}, max {max(values):.1f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="seconds: tiny model, 1 run (what CI runs)")
    ap.add_argument("--prompts", type=int, default=1)
    ap.add_argument("--prompt-tokens", type=int, default=300)
    ap.add_argument("--k", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads for (a); 1 by default: on a shared machine several threads "
                         "oversubscribe the cores and the timings turn to noise")
    ap.add_argument("--no-vllm", action="store_true", help="skip (b) even when vLLM is found")
    # the vLLM child's arguments
    ap.add_argument("--vllm-child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--prompts-file", help=argparse.SUPPRESS)
    ap.add_argument("--prefix-caching", choices=["on", "off"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.vllm_child:
        vllm_child(args)
        return
    if args.smoke:
        args.prompts, args.prompt_tokens, args.k, args.new_tokens, args.runs = 1, 100, 4, 8, 1
        args.layers, args.hidden = 2, 128

    from posttrain.generation import GenerationError, find_vllm_python

    with tempfile.TemporaryDirectory(prefix="bench-sample-") as tmp:
        tmp = Path(tmp)
        model_dir, n_params = build_model(tmp / "model", args.layers, args.hidden)
        from posttrain.modeling import load_tokenizer

        vocab = len(load_tokenizer(model_dir))
        prompts = make_prompts(args.prompts, args.prompt_tokens, vocab)
        print(f"model: Llama {n_params / 1e6:.1f}M parameters (hidden {args.hidden}, {args.layers} layers); "
              f"{args.prompts} prompts x {args.prompt_tokens} tokens, K={args.k}, {args.new_tokens} new tokens, "
              f"{args.runs} runs, {args.threads} torch thread(s)", flush=True)

        print("(a) transformers: shared prefill vs generate(num_return_sequences=K)", flush=True)
        res = bench_transformers(model_dir, prompts, args.k, args.new_tokens, args.runs, args.threads)
        ratios = [r["shared"] / r["generate"] for r in res]
        shared = [r["shared"] for r in res]
        baseline = [r["generate"] for r in res]
        print(f"  shared prefill tok/s: {spread(shared)}; generate tok/s: {spread(baseline)}")

        vllm_line = None
        try:
            python = None if args.no_vllm else find_vllm_python()
        except GenerationError as err:
            print(f"(b) vLLM: skipped ({err})")
            python = None
        if python is None and not args.no_vllm:
            print("(b) vLLM: skipped (no interpreter with vllm; set POSTTRAIN_VLLM_PYTHON)")
        if python is not None:
            print(f"(b) vLLM ({python}), start-up excluded", flush=True)
            on = bench_vllm(python, model_dir, prompts, args.k, args.new_tokens, args.runs, "on", tmp)
            print(f"  prefix caching on : {spread(on)} tok/s", flush=True)
            off = bench_vllm(python, model_dir, prompts, args.k, args.new_tokens, args.runs, "off", tmp)
            print(f"  prefix caching off: {spread(off)} tok/s", flush=True)
            med = statistics.median
            print(f"  vLLM caching on vs off: {med(on) / med(off):.2f}x; vs shared prefill: "
                  f"{med(on) / med(shared):.2f}x; vs generate(num_return_sequences): {med(on) / med(baseline):.2f}x "
                  "(medians)")
            vllm_line = f"; vLLM prefix caching on {med(on) / med(shared):.2f}x of shared prefill"

        print(f"sample: {statistics.median(ratios):.2f}x generated tokens/s, shared prefill vs "
              f"generate(num_return_sequences={args.k}) (min {min(ratios):.2f}x, max {max(ratios):.2f}x, "
              f"{len(ratios)} runs{vllm_line or ''})")


if __name__ == "__main__":
    main()

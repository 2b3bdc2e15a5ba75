"""Generation on Ray vs on this machine: the overhead of the distributed path on one machine.

    .venv/bin/python bench/sample_ray.py            # about 4 minutes on 2 CPU cores
    .venv/bin/python bench/sample_ray.py --smoke    # seconds: what CI runs (needs requirements/ray.txt)

Both sides run the same jobs (shards) through `posttrain.generation.run_jobs`, the call the
sample stage makes, with the transformers backend and the same random Llama:

- local: one engine in a child process (the single-machine path), using both cores;
- Ray: `sample.cluster` with 2 actors of 1 CPU each on a local Ray cluster of 2 CPUs
  (started once, before the timings, as a real cluster is up before a run starts).

and, to isolate what Ray itself costs, one engine on one thread each way: the local child
with OMP_NUM_THREADS=1 vs 1 Ray actor of 1 CPU (the same compute; the difference is actor
start-up, shipping jobs and results through Ray, and the driver writing the files).

Each run starts from empty result files and includes loading the model (both paths load it
once per run), so the ratio is what a sample stage sees. Sides alternate, several runs; the
ratio is of generated tokens/s per run pair, Ray over local (above 1: Ray is faster). Every
job draws max_new_tokens tokens (no stop token), so both generate exactly the same count,
and the samples are checked to be identical.

The last line is the headline.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def build_model(out_dir: Path, layers: int, hidden: int) -> tuple[Path, int, int]:
    from posttrain.modeling import save_checkpoint
    from posttrain.world.tiny import build_tokenizer, make_tiny_model

    tok = build_tokenizer()
    model = make_tiny_model(tok, seed=0, hidden_size=hidden, num_layers=layers, num_heads=hidden // 64,
                            num_kv_heads=hidden // 64, intermediate_size=3 * hidden, max_position_embeddings=2048)
    save_checkpoint(model, tok, out_dir)
    return out_dir, sum(p.numel() for p in model.parameters()), len(tok)


def make_jobs(out: Path, n_jobs: int, prompts: int, length: int, vocab: int, k: int, new_tokens: int) -> list:
    import random

    from posttrain.jobs import Job, SamplingSettings

    rng = random.Random(0)
    out.mkdir(parents=True)
    return [Job([[rng.randrange(8, vocab) for _ in range(length)] for _ in range(prompts)],
                SamplingSettings(k=k, temperature=1.0, top_p=1.0, max_new_tokens=new_tokens, seed=1000 + j),
                str(out / f"shard_{j:05d}.g0.json"))
            for j in range(n_jobs)]


def timed(model_dir: Path, jobs: list, workdir: Path, cluster, threads: int | None = None) -> tuple[float, list]:
    from posttrain.engines import EngineOptions
    from posttrain.generation import run_jobs
    from posttrain.jobs import read_job_result

    saved = os.environ.get("OMP_NUM_THREADS")
    if threads is not None:
        os.environ["OMP_NUM_THREADS"] = str(threads)  # the local child's torch threads
    t0 = time.perf_counter()
    try:
        run_jobs(model_dir, jobs, backend="transformers", options=EngineOptions(max_batch_sequences=64),
                 workdir=workdir, cluster=cluster)
    finally:
        if threads is not None:
            if saved is None:
                os.environ.pop("OMP_NUM_THREADS")
            else:
                os.environ["OMP_NUM_THREADS"] = saved
    seconds = time.perf_counter() - t0
    return seconds, [[g.token_ids for g in read_job_result(j.out)] for j in jobs]


def spread(values: list[float]) -> str:
    return f"median {statistics.median(values):.1f}, min {min(values):.1f}, max {max(values):.1f}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="seconds: tiny model, 1 run (what CI runs)")
    ap.add_argument("--jobs", type=int, default=8, help="shards (jobs) per run")
    ap.add_argument("--prompts", type=int, default=4, help="prompts per job")
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=256)
    args = ap.parse_args()
    if args.smoke:
        args.jobs, args.prompts, args.new_tokens, args.runs, args.layers, args.hidden = 4, 2, 8, 1, 2, 128

    try:
        import ray
    except ImportError:
        print("sample_ray: skipped: Ray is not installed (pip install -r requirements/ray.txt)")
        return 77  # the bench scripts' "skipped" exit code (tests/test_bench_smoke.py)

    from posttrain.cluster import ClusterSettings

    with tempfile.TemporaryDirectory(prefix="bench-sample-ray-") as tmp:
        tmp = Path(tmp)
        model_dir, n_params, vocab = build_model(tmp / "model", args.layers, args.hidden)
        tokens = args.jobs * args.prompts * args.k * args.new_tokens
        print(f"model: Llama {n_params / 1e6:.1f}M parameters (hidden {args.hidden}, {args.layers} layers); "
              f"{args.jobs} jobs x {args.prompts} prompts x {args.prompt_tokens} tokens, K={args.k}, "
              f"{args.new_tokens} new tokens ({tokens} per run), {args.runs} runs", flush=True)
        t0 = time.perf_counter()
        ray.init(num_cpus=2, include_dashboard=False, object_store_memory=100 * 1024**2, log_to_driver=False)
        print(f"Ray: a local cluster of 2 CPUs started in {time.perf_counter() - t0:.1f} s (not timed below)",
              flush=True)
        sides = {  # name: (cluster, local child's threads)
            "local": (None, None),
            "ray": (ClusterSettings(address="auto", engines=2, cpus_per_engine=1), None),
            "local-1thread": (None, 1),
            "ray-1actor": (ClusterSettings(address="auto", engines=1, cpus_per_engine=1), None),
        }
        rates: dict[str, list[float]] = {side: [] for side in sides}
        try:
            for run in range(args.runs):
                samples = {}
                for side, (cluster, threads) in sides.items():
                    work = tmp / f"run{run}-{side}"
                    jobs = make_jobs(work / "out", args.jobs, args.prompts, args.prompt_tokens, vocab, args.k,
                                     args.new_tokens)
                    seconds, samples[side] = timed(model_dir, jobs, work, cluster, threads)
                    rates[side].append(tokens / seconds)
                    print(f"  run {run + 1} {side:13s}: {seconds:6.1f} s, {tokens / seconds:7.1f} tok/s", flush=True)
                if any(s != samples["local"] for s in samples.values()):
                    raise SystemExit("the Ray path drew other samples than the local path: not comparable")
        finally:
            ray.shutdown()
        ratios = [r / b for r, b in zip(rates["ray"], rates["local"])]
        overhead = [r / b for r, b in zip(rates["ray-1actor"], rates["local-1thread"])]
        for side, values in rates.items():
            print(f"  {side:13s} tok/s: {spread(values)}")
        print(json.dumps({"rates_tok_s": rates, "ratios": ratios, "one_engine_ratios": overhead}))
        print("samples identical on every side in every run")
        print(f"sample_ray: {statistics.median(ratios):.2f}x generated tokens/s, 2 Ray actors vs the local "
              f"engine on 2 CPUs (min {min(ratios):.2f}x, max {max(ratios):.2f}x, {len(ratios)} runs); at equal "
              f"compute, 1 actor vs a 1-thread local child: {statistics.median(overhead):.2f}x "
              f"(min {min(overhead):.2f}x, max {max(overhead):.2f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Data parallelism on 2 processes vs 1 process, same global batch: sft and dpo stages.

    .venv/bin/python bench/ddp.py            # ~30M-parameter Llama, about 10 minutes on 2 CPU cores
    .venv/bin/python bench/ddp.py --smoke    # seconds: tiny model, 3 steps, 1 run (what CI runs)

Each stage runs through the stage worker exactly as the orchestrator starts it: 1 process
with batch B (2 threads), and 2 gloo processes with batch B/2 each (1 thread each, launched
by `accelerate launch --config_file configs/accelerate/multi_gpu.yaml --num_processes 2`).
Both see the same samples in every optimizer step, so they must train the same weights; the
bench reports the largest weight difference. On one 2-core machine 2 processes cannot be
faster than 1 with 2 threads: the ratio measures what data parallelism costs here
(communication, a second Python), not a speed-up.

Step throughput is timed inside the trainer (posttrain.rounds.meter: a callback on every
step; the first step is warm-up and not counted), so process start-up, loading and saving
are not in it. The 1- and
2-process runs alternate, `--reps` times; a rep's ratio is 2-process steps/s over 1-process
steps/s. Steps per CPU-second (CPU time of all processes) are reported beside it: on a
machine other jobs load, the wall-clock ratio also measures the scheduler's share, which
favours two single-thread processes over one two-thread one. The last line is the headline.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("POSTTRAIN_PROGRESS", "0")

ROOT = Path(__file__).resolve().parents[1]
MULTI_GPU = ROOT / "configs" / "accelerate" / "multi_gpu.yaml"
THREADS = 2  # CPU threads in all: 1 process gets them all, 2 processes half each (--threads)


# ------------------------------------------------------------------------- driver side


def build_model(out: Path, *, hidden: int, layers: int, inter: int) -> int:
    from posttrain.modeling import save_checkpoint
    from posttrain.world.tiny import build_tokenizer, make_tiny_model

    tok = build_tokenizer()
    model = make_tiny_model(tok, seed=0, hidden_size=hidden, num_layers=layers, num_heads=max(1, hidden // 64),
                            num_kv_heads=max(1, hidden // 128), intermediate_size=inter)
    save_checkpoint(model, tok, out)
    return sum(p.numel() for p in model.parameters())


def write_data(root: Path, n_sft: int, n_pairs: int) -> tuple[Path, Path]:
    from posttrain.files import write_jsonl

    rng = random.Random(0)
    words = "sort reverse add count the numbers please answer briefly quick brown fox lazy dog".split()

    def text(lo, hi):
        return " ".join(rng.choice(words + [str(rng.randint(0, 99))]) for _ in range(rng.randint(lo, hi)))

    sft = write_jsonl(root / "sft.jsonl", [{"messages": [{"role": "user", "content": text(8, 16)},
                                                         {"role": "assistant", "content": text(10, 40)}]}
                                           for _ in range(n_sft)])
    prefs = [{"id": f"p{i}", "prompt": [{"role": "user", "content": text(8, 16)}],
              "chosen": [{"role": "assistant", "content": text(5, 40)}],
              "rejected": [{"role": "assistant", "content": text(5, 40)}], "strength": "better"}
             for i in range(n_pairs)]
    write_jsonl(root / "prefs.jsonl", prefs)
    assert sft == n_sft
    return root / "sft.jsonl", root / "prefs.jsonl"


def run_stage(root: Path, name: str, stage: str, cfg: dict, inputs: dict, base: Path, procs: int) -> tuple[Path, dict]:
    """One stage through the metered worker; returns (its model folder, {steps, seconds, cpu_seconds})."""
    from posttrain.launch import plan_launch
    from posttrain.rounds.meter import MeteredRunFailed, run_metered

    launcher = None
    if procs > 1:
        launcher = ["accelerate", "launch", "--config_file", str(MULTI_GPU), "--num_processes", str(procs),
                    "--main_process_port", str(_free_port())]
    plan = plan_launch(launcher, has_gpu=False)
    env = {"OMP_NUM_THREADS": str(max(1, THREADS // procs)), "PYTHONUNBUFFERED": "1",
           # Spinning OpenMP threads of the 2-thread process stall whenever another process holds a core
           # (measured: 0.27 vs 9 steps/s on a loaded 2-core machine); passive waiting keeps it fair.
           "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}
    try:
        run = run_metered(root / name, stage, inputs, {"name": "bench", "models": {"base": str(base)}, stage: cfg},
                          plan, env)
    except MeteredRunFailed as err:
        sys.exit(f"ddp: {name} failed: {err}")
    if len(run.rows) != 1:
        sys.exit(f"ddp: {name} trained {len(run.rows)} metered trainers, expected 1 (too few steps?)")
    return run.model, run.rows[0]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def max_weight_diff(a: Path, b: Path) -> float:
    from safetensors.torch import load_file

    x, y = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert x.keys() == y.keys()
    return max((x[k].float() - y[k].float()).abs().max().item() for k in x)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="seconds (what CI runs): tiny model, 3 steps, 1 run")
    p.add_argument("--reps", type=int, default=None, help="1-process / 2-process pairs of runs per stage "
                                                           "(default 3, smoke 1)")
    p.add_argument("--batch", type=int, default=8, help="global batch (1 process: B; 2 processes: B/2 each)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default 8, smoke 3; the "
                                                            "meter times all but the first, so at least 3)")
    p.add_argument("--threads", type=int, default=2, help="CPU threads in all (1 process: all; 2: half each)")
    args = p.parse_args()
    global THREADS
    THREADS = args.threads
    steps = args.steps or (3 if args.smoke else 8)
    args.reps = args.reps or (1 if args.smoke else 3)
    hidden, layers, inter = (128, 2, 256) if args.smoke else (512, 10, 1408)
    root = Path(tempfile.mkdtemp(prefix="bench-ddp-"))
    base = root / "base"
    n_params = build_model(base, hidden=hidden, layers=layers, inter=inter)
    sft_file, pref_file = write_data(root, steps * args.batch, steps * args.batch)
    print(f"model: Llama, {n_params / 1e6:.1f}M parameters; global batch {args.batch}, {steps} steps per run, "
          f"{args.reps} reps; work in {root}", flush=True)
    common = {"learning_rate": 1e-4, "epochs": 1, "save_steps": 10_000, "logging_steps": 1, "max_length": 256}
    stages = {
        "sft": ({**common}, {"init_model": str(base), "sft_files": [str(sft_file)]}),
        "dpo": ({**common, "nll_coef": 0.2}, {"sft_model": str(base), "preference_files": [str(pref_file)],
                                              "samples": None}),
    }
    ratios: dict[str, list[float]] = {s: [] for s in stages}
    cpu_ratios: dict[str, list[float]] = {s: [] for s in stages}
    diffs: dict[str, float] = {s: 0.0 for s in stages}
    for rep in range(args.reps):
        for stage, (cfg, inputs) in stages.items():
            one, t1 = run_stage(root, f"{stage}-r{rep}-1p", stage, {**cfg, "batch_size": args.batch}, inputs, base, 1)
            two, t2 = run_stage(root, f"{stage}-r{rep}-2p", stage, {**cfg, "batch_size": args.batch // 2}, inputs,
                                base, 2)
            s1, s2 = t1["steps"] / t1["seconds"], t2["steps"] / t2["seconds"]
            ratios[stage].append(s2 / s1)
            cpu_ratios[stage].append((t2["steps"] / t2["cpu_seconds"]) / (t1["steps"] / t1["cpu_seconds"]))
            diffs[stage] = max(diffs[stage], max_weight_diff(one, two))
            print(f"rep {rep + 1} {stage}: 1 process {s1:.2f} steps/s, 2 processes {s2:.2f} steps/s "
                  f"-> {s2 / s1:.2f}x (per CPU-second {cpu_ratios[stage][-1]:.2f}x); "
                  f"max weight diff {diffs[stage]:.1e}", flush=True)
    every = [r for rs in ratios.values() for r in rs]
    every_cpu = [r for rs in cpu_ratios.values() for r in rs]
    for stage, rs in ratios.items():
        cs = cpu_ratios[stage]
        print(f"{stage}: {statistics.median(rs):.2f}x steps/s (min {min(rs):.2f}, max {max(rs):.2f}); "
              f"{statistics.median(cs):.2f}x steps per CPU-second (min {min(cs):.2f}, max {max(cs):.2f})")
    print(f"ddp: {statistics.median(every):.2f}x steps/s, 2 processes vs 1 (min {min(every):.2f}, "
          f"max {max(every):.2f}, {args.reps} runs each of sft and dpo; per CPU-second "
          f"{statistics.median(every_cpu):.2f}x); max weight diff "
          f"sft {diffs['sft']:.0e}, dpo {diffs['dpo']:.0e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

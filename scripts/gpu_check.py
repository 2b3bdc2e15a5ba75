"""What a lent GPU machine should measure, in under 10 minutes. Run it as `bash scripts/gpu-check.sh`.

1. One GPU: the rm (packed), sft and dpo stages in bf16 on a small Llama-architecture model
   (random weights, about 180M parameters, posttrain's tiny tokenizer), each through the stage
   worker with a step meter (posttrain.rounds.meter): tokens/s, peak GPU memory, and MFU
   = 6 x parameters x tokens/s / the GPU's dense bf16 peak (where the GPU is known: the table
   in posttrain.throughput), beside what the stage's own record says (`throughput`).
2. With 2 or more GPUs: sft, dpo and rm again under each shipped accelerate config
   (configs/accelerate/multi_gpu.yaml, fsdp2.yaml, zero3.yaml) on every GPU, the same global
   batch, with the largest weight difference to the one-GPU output (bf16: expect ~1e-2, not 0).
   zero3 needs deepspeed, which the GPU image lacks: it is skipped with a note unless carried.
3. FSDP2's sharded trainer checkpoints and streamed final save (tests/fsdp2_checkpoint_worker.py,
   2 gloo processes on the CPU, a tiny model): whether this image's torch, transformers,
   accelerate and peft run them, with the equalities the CPU test asserts (resume = uninterrupted
   run, streamed save = full gather, peak held full tensor <= the largest tensor).

`--dry-run`: the same steps on the CPU with a tiny model in fp32 and 2 gloo processes for
multi_gpu (fsdp2 and zero3 are refused without GPUs, which is shown): checks the logic here.
Results: a table on stdout and JSON in $OUT/gpu-check.json (or ./gpu-check-out/), rewritten after
every measurement (`"finished": true` once the whole check ran), so a killed run keeps what it measured.
"""

from __future__ import annotations

import json
import os
import random
import socket
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BUDGET_S = 9 * 60
def peak_flops() -> float | None:
    """The GPU's dense bf16 peak from posttrain's one table (posttrain.throughput.GPU_BF16_PEAKS)."""
    import torch

    from posttrain.throughput import gpu_peak

    if not torch.cuda.is_available():
        return None
    return gpu_peak(torch.cuda.get_device_name(0))["flops_per_second"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build(root: Path, dry: bool) -> tuple[Path, int]:
    from posttrain.modeling import save_checkpoint
    from posttrain.world.tiny import build_tokenizer, make_tiny_model

    tok = build_tokenizer()
    dims = dict(hidden_size=128, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=256) if dry else \
        dict(hidden_size=1024, num_layers=16, num_heads=16, num_kv_heads=4, intermediate_size=2816)
    model = make_tiny_model(tok, seed=0, **dims)
    save_checkpoint(model, tok, root / "base")
    return root / "base", sum(p.numel() for p in model.parameters())


def write_data(root: Path, n: int, words_per_text: int) -> tuple[Path, Path]:
    from posttrain.files import write_jsonl

    rng = random.Random(0)
    vocab = "sort reverse add count the numbers please answer briefly quick brown fox lazy dog sky red".split()

    def text(k):
        return " ".join(rng.choice(vocab + [str(rng.randint(0, 999))]) for _ in range(k))

    w = words_per_text
    write_jsonl(root / "sft.jsonl", [{"messages": [{"role": "user", "content": text(w // 2)},
                                                   {"role": "assistant", "content": text(w)}]} for _ in range(n)])
    write_jsonl(root / "prefs.jsonl", [
        {"id": f"p{i}", "prompt": [{"role": "user", "content": text(w // 2)}],
         "edited": [{"role": "assistant", "content": text(w)}] if i % 2 else None,
         "chosen": [{"role": "assistant", "content": text(w)}],
         "rejected": [{"role": "assistant", "content": text(w)}], "strength": "significantly_better"}
        for i in range(n)])
    rows = [json.loads(line) for line in (root / "prefs.jsonl").read_text().splitlines()]
    write_jsonl(root / "prefs.jsonl", [{k: v for k, v in r.items() if v is not None} for r in rows])
    return root / "sft.jsonl", root / "prefs.jsonl"


def run_stage(root: Path, name: str, stage: str, cfg: dict, inputs: dict, base: Path,
              launcher: list[str] | None, env_extra: dict) -> dict:
    """One stage through the metered worker. Returns the meter row plus the model folder."""
    from posttrain.launch import LaunchError, plan_launch
    from posttrain.rounds.meter import MeteredRunFailed, run_metered

    try:
        plan = plan_launch(launcher)
    except LaunchError as err:
        return {"skipped": str(err)}
    t0 = time.time()
    try:
        run = run_metered(root / name, stage, inputs, {"name": "gpu-check", "models": {"base": str(base)}, stage: cfg},
                          plan, env_extra)
    except MeteredRunFailed as err:
        return {"failed": str(err)}
    (root / f"{name}.log").write_text(run.log)
    if not run.rows:
        return {"failed": "no meter row (too few steps?)"}
    row = run.rows[-1]
    row["wall_s"] = round(time.time() - t0, 1)
    row["out"] = str(run.model)
    row["world_size"] = plan.world_size
    row["record_throughput"] = run.metrics.get("throughput")  # what the stage itself recorded
    return row


def weight_diff(a: str, b: str) -> float:
    from safetensors.torch import load_file

    x, y = load_file(str(Path(a) / "model.safetensors")), load_file(str(Path(b) / "model.safetensors"))
    return max((x[k].float() - y[k].float()).abs().max().item() for k in x)


def describe(row: dict, n_params: int, peak: float | None) -> str:
    if "skipped" in row:
        reason = row["skipped"].split("]: ", 1)[-1]  # a LaunchError names the launcher first
        return "skipped: " + reason.splitlines()[0][:160]
    if "failed" in row:
        return "FAILED: " + row["failed"]
    tps = row["tokens"] / row["seconds"]
    mfu = f"{6 * n_params * tps / (peak * row['world_size']):.1%}" if peak else "n/a"
    mem = f"{row['peak_memory_gib']:.1f} GiB" if row.get("peak_memory_gib") is not None else "n/a"
    row.update(tokens_per_s=round(tps), mfu=mfu)
    rec = row.get("record_throughput") or {}
    own = (f"; record: {rec['tokens_per_second']:.0f} tok/s, MFU "
           + (f"{rec['mfu']:.1%}" if rec.get("mfu") is not None else "n/a")) if rec.get("tokens_per_second") else ""
    return (f"{tps:10.0f} tok/s  {row['steps'] / row['seconds']:6.2f} steps/s  peak mem {mem:>9}  MFU {mfu:>6}  "
            f"({row['steps']} timed steps, {row['wall_s']} s wall{own})")


def sharded_check(root: Path) -> dict:
    """Section 3: the three phases of tests/fsdp2_checkpoint_worker.py, and what they showed."""
    import subprocess

    from safetensors.torch import load_file

    from posttrain.modeling import save_checkpoint
    from posttrain.world.tiny import build_tokenizer, make_tiny_model

    tok = build_tokenizer()
    save_checkpoint(make_tiny_model(tok, seed=0), tok, root / "fsdp2-tiny")
    out = root / "fsdp2-checkpoints"
    out.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    t0 = time.time()
    for phase in ("straight", "first", "resume"):
        proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                               str(ROOT / "tests" / "fsdp2_checkpoint_worker.py"), phase, str(root / "fsdp2-tiny"),
                               str(out)], env=env, capture_output=True, text=True, timeout=300)
        if proc.returncode != 0:
            tb = [json.loads(f.read_text()).get("traceback", "") for f in sorted(out.glob(f"{phase}.rank*.json"))]
            return {"failed": f"{phase}: " + ((tb[0] if tb else "") or proc.stderr)[-1500:]}

    def diff(a: str, b: str) -> float:
        x, y = load_file(str(out / a / "model.safetensors")), load_file(str(out / b / "model.safetensors"))
        if sorted(x) != sorted(y):
            return float("inf")
        return max((x[k].float() - y[k].float()).abs().max().item() for k in x)

    straight = json.loads((out / "straight.json").read_text())
    return {"resumed_vs_straight": diff("resumed", "straight"),
            "lora_resumed_vs_straight": diff("lora_resumed", "lora_trained"),
            "streamed_vs_gathered": diff("straight", "gathered"),
            "lora_streamed_vs_peft_merge": diff("lora_streamed", "lora_reference"),
            "peak_full_bytes": max(m["peak_bytes"] for m in straight["stream_meter"]),
            "largest_tensor_bytes": straight["largest_tensor_bytes"],
            "gathered_bytes": straight["gather_held_bytes"][0], "wall_s": round(time.time() - t0, 1)}


def save(results: dict, out_dir: Path, started: float) -> None:
    """The results so far, rewritten after every measurement: a run killed midway keeps them."""
    from posttrain.files import atomic_write_json

    results["seconds"] = round(time.time() - started, 1)
    atomic_write_json(out_dir / "gpu-check.json", json.loads(json.dumps(results, default=str)))


def main() -> int:
    dry = "--dry-run" in sys.argv[1:]
    import torch

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("POSTTRAIN_PROGRESS", "0")
    gpus = torch.cuda.device_count()
    if not dry and gpus == 0:
        sys.exit("gpu-check: no CUDA device; use --dry-run to check the script on a CPU")
    started = time.time()
    out_dir = Path(os.environ.get("OUT") or ROOT / "gpu-check-out")
    out_dir.mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    base, n_params = build(root, dry)
    peak = peak_flops()
    steps, batch, words = (3, 4, 20) if dry else (12, 8, 120)
    sft_file, pref_file = write_data(root, n=(steps + 1) * batch, words_per_text=words)
    device = "cpu (dry run)" if dry else f"{gpus} x {torch.cuda.get_device_name(0)}"
    print(f"gpu-check: {device}; Llama {n_params / 1e6:.1f}M params; torch {torch.__version__}; "
          f"batch {batch} per GPU, {(steps + 1)} steps per stage; work in {root}", flush=True)
    common = {"learning_rate": 1e-5, "epochs": 1, "save_steps": 10_000, "logging_steps": 1_000,
              "max_length": 1024, "batch_size": batch}
    stages = {
        "rm": ({**common, "heldout_fraction": 0, "packing": True},
               {"base_model": str(base), "preference_files": [str(pref_file)], "heldout_preference_files": []}),
        "sft": (dict(common), {"init_model": str(base), "sft_files": [str(sft_file)]}),
        "dpo": ({**common, "nll_coef": 0.2}, {"sft_model": str(base), "preference_files": [str(pref_file)],
                                              "samples": None}),
    }
    one_gpu = {"CUDA_VISIBLE_DEVICES": "0"} if gpus else {"OMP_NUM_THREADS": "1"}
    results: dict = {"python": sys.version.split()[0], "device": device, "params": n_params,
                     "peak_bf16_flops": peak, "single": {}, "multi": {}, "finished": False}
    save(results, out_dir, started)
    print("\n1 GPU" if not dry else "\n1 process (CPU)")
    for stage, (cfg, inputs) in stages.items():
        row = run_stage(root, f"{stage}-1", stage, cfg, inputs, base, None, one_gpu)
        results["single"][stage] = row
        print(f"  {stage:4} {describe(row, n_params, peak)}", flush=True)
        save(results, out_dir, started)

    n = gpus if gpus >= 2 else (2 if dry else 0)
    if n:
        print(f"\n{n} {'GPUs' if gpus else 'gloo processes'}, the same global batch of {batch} "
              f"({max(1, batch // n)} per process)")
        for name in ("multi_gpu", "fsdp2", "zero3"):
            if time.time() - started > BUDGET_S:
                print(f"  {name}: not run (the 9-minute budget is spent)")
                continue
            if name == "zero3" and not _has("deepspeed"):
                results["multi"][name] = {"skipped": "deepspeed is not installed"}
                print(f"  {name}: skipped: deepspeed is not installed (carry it to test ZeRO-3)")
                save(results, out_dir, started)
                continue
            launcher = ["accelerate", "launch", "--config_file", str(ROOT / "configs" / "accelerate" / f"{name}.yaml"),
                        "--num_processes", str(n), "--main_process_port", str(free_port())]
            results["multi"][name] = {}
            # DDP's rm was checked on CPU (tests/test_distributed.py); FSDP2's packed rm was not, via accelerate.
            for stage in (("rm", "sft", "dpo") if name == "fsdp2" else ("sft", "dpo")):
                cfg, inputs = stages[stage]
                if time.time() - started > BUDGET_S:
                    print(f"  {name:9} {stage:4} not run (the 9-minute budget is spent)")
                    continue
                row = run_stage(root, f"{stage}-{name}", stage, {**cfg, "batch_size": max(1, batch // n)}, inputs,
                                base, launcher, {} if gpus else {"OMP_NUM_THREADS": "1"})
                one = results["single"][stage]
                if "out" in row and "out" in one:
                    row["max_weight_diff_vs_1"] = weight_diff(one["out"], row["out"])
                results["multi"][name][stage] = row
                diff = f"  max |w - w_1gpu| {row['max_weight_diff_vs_1']:.1e}" if "max_weight_diff_vs_1" in row else ""
                print(f"  {name:9} {stage:4} {describe(row, n_params, peak)}{diff}", flush=True)
                save(results, out_dir, started)
                if "skipped" in row:
                    break
    print("\nFSDP2 sharded checkpoints and streamed final save (2 gloo processes, tiny model)")
    row = sharded_check(root) if time.time() - started < BUDGET_S else {"failed": "not run: the budget is spent"}
    results["fsdp2_checkpoints"] = row
    print("  FAILED: " + row["failed"] if "failed" in row else
          f"  resumed vs uninterrupted {row['resumed_vs_straight']:.1e} (LoRA {row['lora_resumed_vs_straight']:.1e}), "
          f"streamed vs gathered "
          f"{row['streamed_vs_gathered']:.1e}, LoRA vs peft {row['lora_streamed_vs_peft_merge']:.1e}; peak full "
          f"tensor {row['peak_full_bytes']} B (largest {row['largest_tensor_bytes']} B, the gather held "
          f"{row['gathered_bytes']} B); {row['wall_s']} s", flush=True)
    results["finished"] = True
    save(results, out_dir, started)
    print(f"\ngpu-check: done in {results['seconds']} s; results in {out_dir / 'gpu-check.json'}")
    failed = [k for k, v in results["single"].items() if "failed" in v] + \
        (["fsdp2_checkpoints"] if "failed" in results["fsdp2_checkpoints"] else [])
    return 1 if failed else 0


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


if __name__ == "__main__":
    sys.exit(main())

"""Streaming checkpoint averaging vs the in-memory way, side by side.

    .venv/bin/python bench/average.py            # 3 inputs of ~400 MB, 3 alternating runs
    .venv/bin/python bench/average.py --smoke    # seconds: ~1 MB inputs, 1 run (what CI runs)

Makes three random Llama checkpoints (fp32, tied embeddings) in a temporary folder, then
averages them repeatedly, alternating the two ways, each in a fresh child process (the first
run's two outputs are compared: they must agree to fp32 rounding):

- streaming: `posttrain.averaging.average_checkpoints` (one tensor at a time);
- in-memory: load the three models with `from_pretrained`, average the state dicts, and
  `save_pretrained` the result.

Each child reports its own peak RSS (VmHWM, imports included: that is what the process
costs) and the wall time of the averaging itself (imports excluded, so transformers' import
time does not count against the baseline). The temporary folder is removed at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")


def _rss_mb() -> float:
    """This process's peak resident memory (VmHWM). Not ru_maxrss: Linux carries the parent's
    peak across fork+exec into the child's ru_maxrss, which would charge the child for the
    parent's checkpoint making."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    raise RuntimeError("no VmHWM in /proc/self/status (Linux only)")


def make_checkpoints(root: Path, n: int, smoke: bool) -> list[Path]:
    """n random LlamaForCausalLM checkpoints (fp32); ~100M parameters each, ~1 MB for a smoke run."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    size = dict(vocab_size=1000, hidden_size=128, num_hidden_layers=2, intermediate_size=256) if smoke else \
        dict(vocab_size=32000, hidden_size=768, num_hidden_layers=12, intermediate_size=2048)
    config = LlamaConfig(**size, num_attention_heads=size["hidden_size"] // 64, num_key_value_heads=2,
                         tie_word_embeddings=True, max_position_embeddings=2048)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in LlamaForCausalLM(config).state_dict().items() if k != "lm_head.weight"}
    paths = []
    for i in range(n):
        gen = torch.Generator().manual_seed(i)
        state = {k: torch.randn(s, generator=gen) * 0.02 for k, s in shapes.items()}
        path = root / f"in{i}"
        path.mkdir()
        save_file(state, path / "model.safetensors", metadata={"format": "pt"})
        config.save_pretrained(str(path))
        paths.append(path)
        del state
    return paths


def child(mode: str, inputs: list[Path], out: Path) -> dict:
    import torch

    torch.set_num_threads(1)
    if mode == "stream":
        from posttrain.averaging import average_checkpoints

        base = _rss_mb()
        start = time.perf_counter()
        average_checkpoints(inputs, out)
        seconds = time.perf_counter() - start
    else:
        from transformers import AutoModelForCausalLM

        base = _rss_mb()
        start = time.perf_counter()
        models = [AutoModelForCausalLM.from_pretrained(str(p), dtype=torch.float32) for p in inputs]
        states = [m.state_dict() for m in models]
        w = 1.0 / len(models)
        avg = {k: sum(w * s[k].float() for s in states) for k in states[0]}
        models[0].load_state_dict(avg)
        models[0].save_pretrained(str(out))
        seconds = time.perf_counter() - start
    return {"mode": mode, "peak_rss_mb": _rss_mb(), "rss_after_imports_mb": base, "seconds": seconds}


def run_child(mode: str, inputs: list[Path], out: Path, keep: bool = False) -> dict:
    cmd = [sys.executable, __file__, "--child", mode, "--out", str(out), *map(str, inputs)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{mode} child failed:\n{proc.stderr[-3000:]}")
    if not keep:
        shutil.rmtree(out)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def max_difference(a: Path, b: Path) -> float:
    """Largest difference between the two ways' outputs (they should agree to fp32 rounding)."""
    from safetensors.torch import load_file

    sa, sb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    if not set(sa) <= set(sb):
        raise RuntimeError(f"streaming output has tensors the in-memory one lacks: {sorted(set(sa) - set(sb))[:3]}")
    return max(float((sa[k] - sb[k]).abs().max()) for k in sa)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="seconds: tiny inputs, one run (what CI runs)")
    ap.add_argument("--runs", type=int, default=None, help="alternating runs of each way (default 3, smoke 1)")
    ap.add_argument("--dir", default=None, help="where to put the temporary checkpoints")
    ap.add_argument("--child", choices=["stream", "memory"], help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("inputs", nargs="*", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, [Path(p) for p in args.inputs], Path(args.out))))
        return

    runs = args.runs or (1 if args.smoke else 3)
    root = Path(tempfile.mkdtemp(prefix="posttrain_bench_average_", dir=args.dir))
    try:
        inputs = make_checkpoints(root, 3, args.smoke)
        in_mb = (inputs[0] / "model.safetensors").stat().st_size / 1e6
        print(f"3 inputs of {in_mb:.1f} MB each (fp32) in {root}")
        rss_ratios, time_ratios = [], []
        for r in range(runs):
            order = ["stream", "memory"] if r % 2 == 0 else ["memory", "stream"]
            res = {mode: run_child(mode, inputs, root / f"out_{mode}", keep=r == 0) for mode in order}
            if r == 0:
                diff = max_difference(root / "out_stream", root / "out_memory")
                print(f"max |streaming - in-memory| over all weights: {diff:.3g}")
                if diff > 1e-5:
                    raise SystemExit("average: the two ways disagree: fix that before timing")
                shutil.rmtree(root / "out_stream")
                shutil.rmtree(root / "out_memory")
            s, m = res["stream"], res["memory"]
            rss_ratios.append(s["peak_rss_mb"] / m["peak_rss_mb"])
            time_ratios.append(s["seconds"] / m["seconds"])
            for x in (s, m):
                print(f"run {r + 1} {x['mode']:>6}: peak RSS {x['peak_rss_mb']:7.0f} MB "
                      f"(after imports {x['rss_after_imports_mb']:5.0f} MB), {x['seconds']:6.2f} s")
            print(f"run {r + 1} ratio: {rss_ratios[-1]:.2f}x peak RSS, {time_ratios[-1]:.2f}x wall time")
        mean = lambda v: sum(v) / len(v)  # noqa: E731
        print(f"average: {mean(rss_ratios):.2f}x peak RSS, {mean(time_ratios):.2f}x wall time, streaming vs "
              f"in-memory (3 inputs of {in_mb:.1f} MB; RSS {min(rss_ratios):.2f}..{max(rss_ratios):.2f}, "
              f"time {min(time_ratios):.2f}..{max(time_ratios):.2f}, {runs} runs)")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()

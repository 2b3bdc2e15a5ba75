"""The stage worker with a step meter: `python -m posttrain.rounds.meter SPEC.json METER.jsonl`.

Runs exactly `posttrain.rounds.worker` (under any launcher), and adds to every trainer the
stage builds a callback that times its optimizer steps and counts the tokens they train on.
Rank 0 appends one JSON line per trainer to METER.jsonl: timed steps, seconds, CPU seconds and
tokens (both summed over ranks), peak device memory of rank 0. The first step is warm-up (compilation, allocator,
DDP bucket set-up) and is not timed. Used by bench/ddp.py and scripts/gpu_check.py, through
`run_metered`, which lays out one stage run by hand and reads back what it trained.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path


def write_stage_spec(run_dir, stage: str, inputs: dict, recipe: dict, plan) -> str:
    """Lay out `run_dir/round_01/<stage>` for one stage run by hand (a benchmark, the GPU
    check) and write the worker's spec there, as the orchestrator would; returns its path.
    `plan` is the stage's `posttrain.launch.plan_launch(...)`."""
    from pathlib import Path

    out = Path(run_dir) / "round_01" / stage
    out.mkdir(parents=True)
    spec = {"stage": stage, "round": 1, "run_dir": str(run_dir), "out_dir": str(out), "inputs": inputs,
            "extra": {}, "seed": 0, "recipe": recipe, "result": str(out / ".result.json"),
            "launch": plan.spec()}
    (out / ".spec.json").write_text(json.dumps(spec))
    return str(out / ".spec.json")


class MeteredRunFailed(RuntimeError):
    """The metered worker exited with an error; the message ends with its last output lines."""


@dataclass
class MeteredRun:
    model: Path
    """The stage's model (its first variant's, for dpo), as the stage's result names it."""
    rows: list[dict]
    """One meter row per trainer the stage built (empty when a trainer ran fewer than 3 steps)."""
    log: str
    """The worker's stdout and stderr."""
    metrics: dict = field(default_factory=dict)
    """The stage's own metrics (its record's), `throughput` among them."""


def run_metered(run_dir, stage: str, inputs: dict, recipe: dict, plan, env: dict | None = None) -> MeteredRun:
    """One stage run by hand under `plan` (a `posttrain.launch.plan_launch(...)`), metered.

    The model folder is read from the stage's own result (its `STAGE.model_outputs`), never
    spelled here, so a stage that moves its outputs does not leave this caller behind."""
    from posttrain.stage import get

    spec = write_stage_spec(run_dir, stage, inputs, recipe, plan)
    meter = Path(spec).with_name(".meter.jsonl")
    proc = subprocess.run([*plan.command, "-m", "posttrain.rounds.meter", spec, str(meter)],
                          env={**os.environ, **(env or {})}, capture_output=True, text=True)
    log = proc.stdout + proc.stderr
    if proc.returncode != 0:
        tail = "\n".join(log.splitlines()[-15:])
        raise MeteredRunFailed(f"{stage} under {plan.launcher or 'one process'}: exit {proc.returncode}; "
                               f"last lines:\n{tail}")
    result = json.loads(Path(json.loads(Path(spec).read_text())["result"]).read_text())
    model = result["outputs"][get(stage).model_outputs[0]]
    if isinstance(model, list):
        model = model[0]
    rows = [json.loads(line) for line in meter.read_text().splitlines()] if meter.exists() else []
    return MeteredRun(model=Path(run_dir) / model, rows=rows, log=log, metrics=result.get("metrics") or {})


def batch_tokens(inputs: dict) -> int:
    """Real (non-padding) tokens of one batch: the stages' own count (posttrain.throughput)."""
    from posttrain.throughput import batch_tokens as real_tokens

    return int(real_tokens(inputs)[0])


def install(meter_file: str) -> None:
    import torch
    import transformers

    from posttrain import distributed

    def sync():
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    class StepMeter(transformers.TrainerCallback):
        def __init__(self):
            self.ends: list[float] = []
            self.cpu: list[float] = []
            self.tokens: list[int] = []
            self.pending = 0

        def on_step_end(self, args, state, control, **kwargs):
            sync()
            self.ends.append(time.perf_counter())
            self.cpu.append(time.process_time())
            self.tokens.append(self.pending)
            self.pending = 0
            return control

        def on_train_end(self, args, state, control, **kwargs):
            if len(self.ends) < 3:
                return control
            tokens = torch.tensor(float(sum(self.tokens[1:])))
            tokens = distributed.all_sum(tokens.to("cuda") if torch.cuda.is_available() else tokens)
            cpu = torch.tensor(self.cpu[-1] - self.cpu[0], dtype=torch.float64)
            cpu = distributed.all_sum(cpu.to("cuda") if torch.cuda.is_available() else cpu)
            if distributed.is_main():
                row = {"steps": len(self.ends) - 1, "seconds": self.ends[-1] - self.ends[0],
                       "cpu_seconds": cpu.item(), "tokens": int(tokens.item()),
                       "world_size": distributed.world_size(),
                       "peak_memory_gib": (torch.cuda.max_memory_allocated() / 2**30
                                           if torch.cuda.is_available() else None),
                       "trainer": type(kwargs.get("model")).__name__}
                with open(meter_file, "a") as f:
                    f.write(json.dumps(row) + "\n")
            return control

    real_init = transformers.Trainer.__init__
    real_step = transformers.Trainer.training_step

    def init(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        self._posttrain_meter = StepMeter()
        self.add_callback(self._posttrain_meter)

    def training_step(self, model, inputs, *args, **kwargs):
        meter = getattr(self, "_posttrain_meter", None)
        if meter is not None:
            meter.pending += batch_tokens(inputs)
        return real_step(self, model, inputs, *args, **kwargs)

    transformers.Trainer.__init__ = init
    transformers.Trainer.training_step = training_step


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        print("usage: python -m posttrain.rounds.meter SPEC.json METER.jsonl", file=sys.stderr)
        return 2
    install(argv[1])
    from posttrain.rounds.worker import main as worker_main

    return worker_main([argv[0]])


if __name__ == "__main__":
    sys.exit(main())

"""Throughput of a training run: tokens per second, achieved FLOP/s and the share of peak.

Every training stage (rm, sft, dpo) attaches a meter to its trainer (`attach`) and records
`summary(trainer)` per variant, and `combine(...)` of its variants at the stage's top level
(`metrics["throughput"]`, shape `Throughput`). `posttrain status` shows `headline(...)`, the
report a table per round.

What is counted, and how:

- **Tokens**: the real tokens of every micro-batch the training loop ran, padding excluded:
  for packed rows (rm, dpo: a `segment_ids` batch, -1 on padding) the positions with a segment,
  otherwise the ones of a 2-D `attention_mask`, otherwise every position of `input_ids` (a
  padding-free batch). `tokens_with_padding` counts every position of `input_ids`: what the
  matmuls ran on. A resumed run counts the steps of its own attempt (and times them alone).
- **Time**: the training loop only, from the trainer's `on_train_begin` to `on_train_end`,
  less every checkpoint save inside it (from the end of the step before it to `on_save`). Model
  loading, the DPO reference pass (TRL runs it while the trainer is built), the final save
  and evaluation are outside. Wall seconds (`time.perf_counter`, after a CUDA synchronize on a
  GPU) and the process's CPU seconds (`time.process_time`: every thread of the process).
- **FLOPs** (the 6N rule: Kaplan et al. 2020, "Scaling Laws for Neural Language Models",
  section 2.1), per real token:

      6 x N_trainable + 4 x N_frozen + 2 x N_reference

  A forward pass multiplies by every weight once (2 FLOPs per weight and token); the backward
  pass propagates activation gradients through every weight (2) and computes weight gradients
  for the trainable ones only (2). Full fine-tuning is 6 x N. With LoRA, N_trainable is the
  adapters (and a head kept trainable), N_frozen the base model: 4 x base + 6 x adapters
  (slightly high: no activation gradient is needed below the first adapter, which torch's FLOP
  counter puts at 5% of a 2-layer tiny Llama, about 1/layers of the input projections). A
  live DPO reference model adds its forward, 2 x its parameters per token (DPO with the
  reference log-probs precomputed, the default, adds nothing: that pass runs before the loop).
  N counts the weights that multiply: an input embedding is a lookup and is left out
  (`embedding_lookup`), unless it is tied to the output head, which multiplies. Attention's
  own products (scores and the weighted sum: 12 x layers x width x sequence length per token
  in training) are not counted, so the figure is a lower bound, close for short sequences.
- **Peak**: on a GPU, the device's bf16 dense tensor peak from `GPU_BF16_PEAKS` (vendors'
  datasheet figures, by `torch.cuda.get_device_name`; an unknown device gives no fraction,
  with the reason); on a CPU, an fp32 matmul peak measured once per machine (`cpu_peak`), per
  wall second and per CPU-second (`mfu_cpu_time`: on a machine shared with other work, the
  wall-clock share moves with the load, the CPU-time share much less).
  Over W processes the peak is W x one device's (one GPU per rank; on a CPU, W x the peak
  measured with one rank's thread count).
- **Several processes**: tokens, FLOPs and CPU seconds are summed over the ranks, the wall is
  the slowest rank's (`distributed.all_reduce_floats` in `on_train_end`, which every rank runs).
  A rank left without data in the last step runs one row at weight 0 (`distributed.ZeroWeight`,
  exact data parallelism); its forward and backward are computed, so its tokens count: W
  processes may count up to W - 1 such rows more than one process.

Heavy libraries (torch, transformers) are imported inside the functions that need them.
"""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import re
import time
from typing import Any, TypedDict

from posttrain import distributed, files

log = logging.getLogger(__name__)

CPU_PEAK_VERSION = 2
"""Part of the CPU peak's cache key: a change in how it is measured measures again."""
GEMM_N = 2048
"""Side of the square fp32 matrices `cpu_peak` multiplies (2 x 2048^3 = 17.2 GFLOP each)."""
GEMM_REPS = 5
"""Timed multiplies after the warm-up one (fewer when `budget_s` runs out)."""

FORMULA = "6 x trainable + 4 x frozen + 2 x reference parameters per real token"

# (pattern on the lowercased device name, bf16 dense tensor TFLOP/s or None, source or reason).
# The first match wins, so a more specific name (H100 NVL) comes before a general one (H100).
# Vendors quote bf16 "with sparsity" first; the dense figure is half of it.
GPU_BF16_PEAKS: tuple[tuple[str, float | None, str], ...] = (
    (r"\bgh200\b", 989.4, "NVIDIA GH200 Grace Hopper datasheet: the H100 tensor core, 1,979 TFLOPS bf16 with "
                          "sparsity, 989 dense"),
    (r"\bh200\b.*\bnvl\b", 835.5, "NVIDIA H200 datasheet, H200 NVL: 1,671 TFLOPS bf16 with sparsity, 835.5 dense"),
    (r"\bh200\b", 989.4, "NVIDIA H200 datasheet, H200 SXM: 1,979 TFLOPS bf16 with sparsity, 989 dense"),
    (r"\bh100\b.*\bnvl\b", 835.5, "NVIDIA H100 datasheet, H100 NVL: 1,671 TFLOPS bf16 with sparsity, 835.5 dense"),
    (r"\bh100\b.*\bpcie\b", 756.5, "NVIDIA H100 datasheet, H100 PCIe: 1,513 TFLOPS bf16 with sparsity, 756.5 dense"),
    (r"\bh100\b", 989.4, "NVIDIA H100 datasheet, H100 SXM: 1,979 TFLOPS bf16 with sparsity, 989 dense"),
    (r"\bh800\b", 989.4, "NVIDIA H800 SXM (the H100 SXM's compute): 1,979 TFLOPS bf16 with sparsity, 989 dense"),
    (r"\bb200\b", 2250.0, "NVIDIA HGX B200 specifications: 4.5 PFLOPS bf16 with sparsity per GPU, 2.25 dense"),
    (r"\ba100\b|\ba800\b", 312.0, "NVIDIA A100 datasheet: 312 TFLOPS bf16 dense (624 with sparsity), SXM and "
                                   "PCIe (the A800 has the A100's compute)"),
    (r"\bl40s\b", 362.05, "NVIDIA L40S datasheet: 362.05 TFLOPS bf16 dense (733 with sparsity)"),
    (r"\bl40\b", 181.05, "NVIDIA L40 datasheet: 181.05 TFLOPS bf16 dense (362.1 with sparsity)"),
    (r"\bl4\b", 121.0, "NVIDIA L4 datasheet: 242 TFLOPS bf16 with sparsity, 121 dense"),
    (r"\ba10\b", 125.0, "NVIDIA A10 datasheet: 125 TFLOPS bf16 dense (250 with sparsity)"),
    (r"rtx 4090", 165.2, "NVIDIA Ada Lovelace architecture whitepaper, GeForce RTX 4090: 165.2 TFLOPS bf16 dense "
                         "with fp32 accumulate"),
    (r"rtx 3090", 71.0, "NVIDIA Ampere GA102 whitepaper, GeForce RTX 3090: 71 TFLOPS bf16 dense with fp32 "
                        "accumulate"),
    (r"mi300x", 1307.4, "AMD Instinct MI300X datasheet: 1,307.4 TFLOPS bf16 dense"),
    (r"\bv100\b|\bt4\b|rtx 20\d0|quadro rtx", None, "this GPU has no bf16 tensor cores (Volta/Turing): no bf16 peak"),
)


class Peak(TypedDict):
    """One device's peak: what a run's FLOP/s is a fraction of."""

    flops_per_second: float | None
    """None: no peak known here (`reason` says why)."""
    flops_per_cpu_second: float | None
    """A CPU's: the matmul's FLOPs per CPU-second of its threads (None on a GPU). On a machine
    shared with other work the wall-clock peak and MFU move with the load; per CPU-second less."""
    device: str
    kind: str | None
    """'gpu_bf16_dense' (a datasheet figure) or 'cpu_fp32_matmul' (measured here)."""
    source: str | None
    """Where the figure comes from: the datasheet, or how and where it was measured."""
    reason: str | None
    """Why there is no figure (an unknown GPU, another device type)."""


class Params(TypedDict):
    """Parameters by the part they play in the FLOP formula (each shared tensor once)."""

    trainable: int
    frozen: int
    """Multiplied by in the forward and the backward, but not updated (a LoRA base model)."""
    reference: int
    """A live reference model's forward per token (DPO without precomputed reference log-probs)."""
    embedding_lookup: int
    """Input embeddings not tied to the output head: a lookup, no FLOPs, left out."""


class Throughput(TypedDict):
    """`metrics["throughput"]` of a training stage and of each of its variants."""

    device: str
    """'cpu' or 'cuda' (the training device's type)."""
    world_size: int
    steps: int
    """Optimizer steps this attempt ran."""
    micro_batches: int
    tokens: int
    """Real tokens of every micro-batch (padding excluded), summed over the ranks."""
    tokens_with_padding: int
    seconds: float
    """Wall seconds of the training loop (checkpoint saves excluded), the slowest rank's."""
    cpu_seconds: float
    """CPU seconds of the processes during the loop, summed over the ranks."""
    tokens_per_second: float | None
    tokens_per_cpu_second: float | None
    """On a CPU only."""
    params: Params
    flops_per_token: int
    flops: float
    flops_per_second: float | None
    formula: str
    peak: Peak
    """One device's peak."""
    peak_flops_per_second: float | None
    """world_size x the device's peak."""
    mfu: float | None
    """flops_per_second / peak_flops_per_second (None without a peak)."""
    mfu_cpu_time: float | None
    """On a CPU: FLOPs per CPU-second of the loop over the peak's FLOPs per CPU-second (the
    share of what the CPU time the processes got could have done; less moved by other work)."""


# ----------------------------------------------------------------------------- parameters, FLOPs


def _numel(p) -> int:
    # ZeRO-3 partitions a parameter and keeps its full size in `ds_numel`; a DTensor's numel is global.
    return int(getattr(p, "ds_numel", 0) or p.numel())


def count_params(model) -> Params:
    """The model's parameters split as the FLOP formula needs them: trainable, frozen, and the
    input-embedding lookups left out. An embedding tied to the output head multiplies (the head's
    matmul) and counts with the others."""
    import torch

    get_output = getattr(model, "get_output_embeddings", None)
    head = get_output() if callable(get_output) else None
    multiplied = {id(head.weight)} if isinstance(getattr(head, "weight", None), torch.Tensor) else set()
    lookups = {id(m.weight) for m in model.modules()
               if isinstance(m, torch.nn.Embedding) and id(m.weight) not in multiplied}
    counts = {"trainable": 0, "frozen": 0, "embedding_lookup": 0}
    for p in model.parameters():  # a shared (tied) tensor comes once
        part = "embedding_lookup" if id(p) in lookups else "trainable" if p.requires_grad else "frozen"
        counts[part] += _numel(p)
    return Params(trainable=counts["trainable"], frozen=counts["frozen"], reference=0,
                  embedding_lookup=counts["embedding_lookup"])


def flops_per_token(params: Params) -> int:
    """6 x trainable + 4 x frozen + 2 x reference (see the module's docstring)."""
    return 6 * params["trainable"] + 4 * params["frozen"] + 2 * params["reference"]


def live_reference_params(trainer) -> int:
    """The parameters a live DPO reference forward multiplies by: the separate reference
    model's, or, with none (a PEFT policy whose adapters are switched off), the policy's frozen
    base."""
    ref = getattr(trainer, "ref_model", None)
    if ref is not None:
        p = count_params(ref)
        return p["trainable"] + p["frozen"]
    return count_params(trainer.model)["frozen"]


def batch_tokens(inputs) -> tuple[Any, int]:
    """(real tokens of one batch, as a 0-d tensor on its device; every position of input_ids).

    Packed rows (`segment_ids`, -1 on padding): the positions with a segment; else the ones of a
    2-D attention mask; else every position (a padding-free batch)."""
    ids = inputs.get("input_ids")
    if ids is None:
        raise KeyError(f"a training batch without input_ids (keys: {sorted(inputs)}): no tokens to count")
    seg, mask = inputs.get("segment_ids"), inputs.get("attention_mask")
    if seg is not None:
        real = (seg >= 0).sum()
    elif mask is not None and mask.dim() == 2:
        real = mask.sum()
    else:
        real = ids.new_tensor(ids.numel())
    return real, int(ids.numel())


# ----------------------------------------------------------------------------- peaks


def gpu_peak(name: str) -> Peak:
    """The bf16 dense peak of a GPU named `name` (`torch.cuda.get_device_name`), from GPU_BF16_PEAKS."""
    low = name.lower()
    for pattern, tflops, text in GPU_BF16_PEAKS:
        if re.search(pattern, low):
            if tflops is None:
                return Peak(flops_per_second=None, flops_per_cpu_second=None, device=name, kind=None, source=None,
                            reason=text)
            return Peak(flops_per_second=tflops * 1e12, flops_per_cpu_second=None, device=name, kind="gpu_bf16_dense",
                        source=text, reason=None)
    return Peak(flops_per_second=None, flops_per_cpu_second=None, device=name, kind=None, source=None,
                reason=f"{name!r} is not in posttrain.throughput.GPU_BF16_PEAKS (add its bf16 dense peak and source)")


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo's first 'model name'), else what platform knows."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def cpu_peak_key() -> dict:
    """What the measured CPU peak depends on: CPU model, thread count, torch and its kernels."""
    import torch

    return {"version": CPU_PEAK_VERSION, "cpu": cpu_model(), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "capability": torch.backends.cpu.get_cpu_capability(),
            "dtype": "float32", "n": GEMM_N}


def cpu_peak_path(key: dict):
    return files.cache_root() / "throughput" / f"cpu_matmul_peak-{files.hash_json(key)[:16]}.json"


def measure_gemm(n: int = GEMM_N, reps: int = GEMM_REPS, budget_s: float = 2.0) -> dict:
    """fp32 matmul FLOP/s of this process: one warm-up `torch.mm` of two n x n matrices, then
    up to `reps` timed ones (stopping once `budget_s` has passed); the best time counts (the
    least disturbed by other work on the machine). 2 x n^3 FLOPs each."""
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    out = torch.empty(n, n)
    torch.mm(a, b, out=out)  # threads started, pages touched
    best = best_cpu = math.inf
    done, start = 0, time.perf_counter()
    while done < reps and (done == 0 or time.perf_counter() - start < budget_s):
        t, c = time.perf_counter(), time.process_time()
        torch.mm(a, b, out=out)
        best, best_cpu = min(best, time.perf_counter() - t), min(best_cpu, time.process_time() - c)
        done += 1
    return {"flops_per_second": 2.0 * n ** 3 / best, "best_seconds": best, "reps": done, "n": n,
            "flops_per_cpu_second": 2.0 * n ** 3 / max(best_cpu, 1e-9), "best_cpu_seconds": best_cpu,
            "threads": torch.get_num_threads(), "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            # a machine busy with other work gives a lower "peak" (and so a higher MFU later): said, not hidden
            "load_average": _load_average()}


def _load_average() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):  # not on every OS
        return None


def _cached_peak(path, key: dict) -> dict | None:
    """The cache file's measurement when it is whole and for this key; None (and a warning for
    a damaged file) otherwise: a bad file is measured again, never trusted."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError, ValueError) as e:
        log.warning("%s: unreadable CPU peak cache (%s); measuring again", path, e)
        return None
    def positive(v) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0

    if (not isinstance(data, dict) or data.get("key") != key or not positive(data.get("flops_per_second"))
            or not positive(data.get("flops_per_cpu_second"))
            or not isinstance(data.get("reps"), int) or not isinstance(data.get("n"), int)):
        log.warning("%s: CPU peak cache is not a measurement for %s; measuring again", path, key)
        return None
    return data


def cpu_peak() -> Peak:
    """This CPU's fp32 matmul peak with this process's thread count, measured once per machine
    (`measure_gemm`: a few seconds at most) and cached in $POSTTRAIN_CACHE/throughput, keyed by
    CPU model, thread count, torch version and kernel capability; written atomically. The source
    names the machine's load average at the time: a peak measured beside other work is low."""
    key = cpu_peak_key()
    path = cpu_peak_path(key)
    data = _cached_peak(path, key)
    if data is None:
        data = {**measure_gemm(), "key": key}
        files.atomic_write_json(path, data)
    return Peak(flops_per_second=float(data["flops_per_second"]),
                flops_per_cpu_second=float(data["flops_per_cpu_second"]),
                device=f"cpu: {key['cpu']}, {key['threads']} threads",
                kind="cpu_fp32_matmul",
                source=(f"measured here: best of {data['reps']} fp32 {data['n']}x{data['n']} torch.mm, "
                        f"{key['threads']} threads, torch {key['torch']} ({data.get('measured_at', '?')}, load average "
                        f"{data.get('load_average', '?')}; delete {path} to measure again)"),
                reason=None)


def device_peak(device) -> Peak:
    """The peak of a training device (a torch.device or its name)."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        return gpu_peak(torch.cuda.get_device_name(device))
    if device.type == "cpu":
        return cpu_peak()
    return Peak(flops_per_second=None, flops_per_cpu_second=None, device=str(device), kind=None, source=None,
                reason=f"no peak known for device type {device.type!r}")


# ----------------------------------------------------------------------------- the meter


class Meter:
    """Tokens and time of one trainer's training loop (see the module's docstring)."""

    def __init__(self, params: Params, device):
        self.params = params
        self.device = device
        self._real = None  # a device tensor: no synchronisation per batch
        self.tokens_with_padding = 0
        self.micro_batches = 0
        self._paused = self._cpu_paused = 0.0
        self._mark = self._cpu_mark = None
        self.totals: dict | None = None

    def _sync(self) -> None:
        if self.device.type == "cuda":
            import torch

            torch.cuda.synchronize(self.device)

    def count(self, inputs) -> None:
        real, padded = batch_tokens(inputs)
        self._real = real.detach() if self._real is None else self._real + real.detach()
        self.tokens_with_padding += padded
        self.micro_batches += 1

    def begin(self, step: int) -> None:
        self._sync()
        self._step0 = step
        self._t0, self._cpu0 = time.perf_counter(), time.process_time()

    def step_end(self, saving: bool) -> None:
        if saving:  # the save that follows is not training: its start is here
            self._sync()
            self._mark, self._cpu_mark = time.perf_counter(), time.process_time()

    def saved(self) -> None:
        if self._mark is not None:
            self._paused += time.perf_counter() - self._mark
            self._cpu_paused += time.process_time() - self._cpu_mark
            self._mark = self._cpu_mark = None

    def end(self, step: int) -> None:
        """Close the window and make the totals global (a collective: every rank calls it)."""
        self._sync()
        wall = time.perf_counter() - self._t0 - self._paused
        cpu = time.process_time() - self._cpu0 - self._cpu_paused
        real = 0 if self._real is None else int(self._real.item())
        tokens, padded, cpu, batches = distributed.all_reduce_floats(
            [real, self.tokens_with_padding, cpu, self.micro_batches], "sum")
        (wall,) = distributed.all_reduce_floats([wall], "max")
        self.totals = {"world_size": distributed.world_size(), "steps": step - self._step0,
                       "micro_batches": int(batches), "tokens": int(tokens), "tokens_with_padding": int(padded),
                       "seconds": wall, "cpu_seconds": cpu}


def _callback(meter: Meter):
    from transformers import TrainerCallback

    class ThroughputCallback(TrainerCallback):
        """Feeds the meter the loop's edges and its checkpoint saves."""

        def __init__(self):
            self.meter = meter

        def on_train_begin(self, args, state, control, **kwargs):
            meter.begin(state.global_step)

        def on_step_end(self, args, state, control, **kwargs):
            meter.step_end(bool(control.should_save))  # DefaultFlowCallback, first in line, decided it

        def on_epoch_end(self, args, state, control, **kwargs):
            meter.step_end(bool(control.should_save))

        def on_save(self, args, state, control, **kwargs):
            meter.saved()

        def on_train_end(self, args, state, control, **kwargs):
            meter.end(state.global_step)

    return ThroughputCallback()


def attach(trainer, *, reference_params: int = 0) -> Meter:
    """Meter `trainer`'s training loop: its callbacks get the loop's edges, and its
    `training_step` (the public hook transformers calls once per micro-batch) counts each batch's
    tokens before running as before. Call after the trainer is built (PEFT has wrapped the model,
    so trainable and frozen are known) and before `train()`. `reference_params`: a live reference
    forward's parameters per token (`live_reference_params`), 0 when there is none."""
    params = count_params(trainer.model)
    params["reference"] = int(reference_params)
    meter = Meter(params, trainer.args.device)
    step = trainer.training_step

    def training_step(model, inputs, *args, **kwargs):
        meter.count(inputs)
        return step(model, inputs, *args, **kwargs)

    trainer.training_step = training_step
    trainer.add_callback(_callback(meter))
    return meter


def _meter_of(trainer) -> Meter:
    for cb in trainer.callback_handler.callbacks:
        if isinstance(getattr(cb, "meter", None), Meter):
            return cb.meter
    raise RuntimeError("this trainer has no throughput meter: call posttrain.throughput.attach(trainer) before train()")


def _rates(totals: dict, params: Params, device: str, peak: Peak) -> Throughput:
    per_token = flops_per_token(params)
    secs, cpu = round(totals["seconds"], 6), round(totals["cpu_seconds"], 6)  # the rates are of what is recorded
    flops = float(totals.get("flops", per_token * totals["tokens"]))
    fps = flops / secs if secs > 0 else None
    total_peak = peak["flops_per_second"] * totals["world_size"] if peak["flops_per_second"] else None
    return Throughput(
        device=device, world_size=totals["world_size"], steps=totals["steps"], micro_batches=totals["micro_batches"],
        tokens=totals["tokens"], tokens_with_padding=totals["tokens_with_padding"],
        seconds=secs, cpu_seconds=cpu,
        tokens_per_second=round(totals["tokens"] / secs, 3) if secs > 0 else None,
        tokens_per_cpu_second=round(totals["tokens"] / cpu, 3) if device == "cpu" and cpu > 0 else None,
        params=params, flops_per_token=per_token, flops=flops, flops_per_second=fps, formula=FORMULA,
        peak=peak, peak_flops_per_second=total_peak,
        mfu=round(fps / total_peak, 6) if fps is not None and total_peak else None,
        mfu_cpu_time=(round(flops / cpu / peak["flops_per_cpu_second"], 6)
                      if device == "cpu" and cpu > 0 and peak.get("flops_per_cpu_second") else None))


def summary(trainer) -> Throughput:
    """The attached meter's numbers after `train()`. The peak is looked up (or, on a CPU,
    measured once per machine) on rank 0 only, whose metrics are the ones recorded."""
    meter = _meter_of(trainer)
    if meter.totals is None:
        raise RuntimeError("the throughput meter has no totals: train() has not finished")
    if distributed.is_main():
        peak = device_peak(meter.device)
    else:
        peak = Peak(flops_per_second=None, flops_per_cpu_second=None, device=str(meter.device), kind=None, source=None,
                    reason="looked up on rank 0 only")
    return _rates(meter.totals, dict(meter.params), meter.device.type, peak)


def combine(parts: list[Throughput | None]) -> Throughput | None:
    """A stage's throughput over its variants (trained one after another): tokens, FLOPs and
    seconds summed, the rates of the sums. Variants without a measurement (recorded before
    posttrain measured) are left out; None when no variant has one."""
    parts = [p for p in parts if p]
    if len(parts) <= 1:
        return parts[0] if parts else None
    keys = ("steps", "micro_batches", "tokens", "tokens_with_padding", "seconds", "cpu_seconds", "flops")
    totals: dict[str, Any] = {k: sum(p[k] for p in parts) for k in keys}
    totals["world_size"] = parts[0]["world_size"]
    out = _rates(totals, parts[0]["params"], parts[0]["device"], parts[0]["peak"])
    out["flops_per_token"] = round(totals["flops"] / totals["tokens"]) if totals["tokens"] else 0
    return out


# ----------------------------------------------------------------------------- how it is shown


def rate(x: float) -> int | str:
    """A tokens/s figure as status shows it: whole numbers from 100 up, 3 significant digits below."""
    return round(x) if x >= 100 else f"{x:.3g}"


def percent(fraction: float) -> str:
    return f"{100 * fraction:.1f}%" if fraction >= 0.01 else f"{100 * fraction:.2g}%"


def si(x: float | None, unit: str) -> str:
    """1.23e11 -> '123 GFLOP/s' style (3 significant digits)."""
    if x is None:
        return "-"
    for scale, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= scale:
            return f"{x / scale:.3g} {prefix}{unit}"
    return f"{x:.3g} {unit}"


def headline(metrics: dict) -> list[tuple[str, Any]]:
    """What `posttrain status` and a stage's end line show: tokens/s and the share of peak."""
    t = metrics.get("throughput") if isinstance(metrics, dict) else None
    if not isinstance(t, dict):
        return []
    out: list[tuple[str, Any]] = []
    if isinstance(t.get("tokens_per_second"), (int, float)):
        out.append(("tok/s", rate(t["tokens_per_second"])))
    if isinstance(t.get("mfu"), (int, float)):
        out.append(("mfu", percent(t["mfu"])))
    return out

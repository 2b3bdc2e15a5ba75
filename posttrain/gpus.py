"""Which GPUs this process may use, and how they are split between engines.

`CUDA_VISIBLE_DEVICES` takes several forms, and a child process must be given back the same
form it was handed (an index means something else once a list of UUIDs was applied):

- indices: `0,1,3`;
- GPU UUIDs: `GPU-8f2a...` (a unique prefix is enough for CUDA);
- MIG instances: `MIG-<uuid>` (or the older `MIG-GPU-<uuid>/<gi>/<ci>`);
- empty: no GPU at all;
- unset: every GPU of the machine.

CUDA reads the list left to right and stops at the first entry it cannot parse (`0,1,-1,2`
is `0,1`); so does `parse_visible`. When the variable is unset the GPUs are counted by this
process's torch if it has CUDA, else by `nvidia-smi` (the orchestrator's torch may be a CPU
build while vLLM lives in its own environment), else there are none.

Standard library only: the generation child imports this file without the rest of posttrain.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Mapping

_INDEX = re.compile(r"^\d+$")
_UUID = re.compile(r"^(GPU|MIG)-[0-9A-Za-z][0-9A-Za-z/_-]*$")


class GPUAssignmentError(RuntimeError):
    """The visible GPUs cannot hold what was asked for; the message says what is visible."""


def parse_visible(value: str) -> list[str]:
    """The device entries of a CUDA_VISIBLE_DEVICES value, in order, as CUDA reads them."""
    devices: list[str] = []
    for raw in value.split(","):
        entry = raw.strip()
        if _INDEX.match(entry):
            devices.append(str(int(entry)))  # CUDA reads "01" as 1
        elif _UUID.match(entry):
            devices.append(entry)
        else:
            break  # CUDA ignores an invalid entry and everything after it
    return devices


def _count_with_torch() -> int | None:
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None  # a CPU build, or no driver: nvidia-smi may still see GPUs
    return torch.cuda.device_count()


def _count_with_nvidia_smi() -> int | None:
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return None
    try:
        out = subprocess.run([smi, "--query-gpu=index", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return None
    return sum(1 for line in out.stdout.splitlines() if line.strip().isdigit())


def visible_devices(environ: Mapping[str, str] | None = None, counters=None) -> list[str]:
    """The GPUs this process may use, each as the CUDA_VISIBLE_DEVICES entry that names it.

    `counters` count the machine's GPUs when the variable is unset (the first that answers
    wins); default: this process's torch, then nvidia-smi.
    """
    environ = os.environ if environ is None else environ
    counters = counters if counters is not None else (_count_with_torch, _count_with_nvidia_smi)
    value = environ.get("CUDA_VISIBLE_DEVICES")
    if value is not None:
        return parse_visible(value)
    for count in counters:
        n = count()
        if n is not None:
            return [str(i) for i in range(n)]
    return []


def is_mig(device: str) -> bool:
    return device.startswith("MIG-")


def assign(devices: list[str], engines: int, per_engine: int) -> list[list[str]] | None:
    """Disjoint device lists for `engines` engines of `per_engine` GPUs each, in visible order.

    None when no GPU is visible (the engines run on CPU). An error when too few are visible,
    or when an engine would get several MIG instances: a CUDA process uses at most one MIG
    instance, so tensor parallelism across MIG slices cannot work.
    """
    if engines < 1 or per_engine < 1:
        raise ValueError(f"assign: engines and per_engine must be >= 1, got {engines} and {per_engine}")
    if not devices:
        return None
    need = engines * per_engine
    if len(devices) < need:
        raise GPUAssignmentError(f"{engines} engine(s) x {per_engine} GPU(s) need {need} GPUs, "
                                 f"{len(devices)} visible: {','.join(devices)}")
    if per_engine > 1 and any(is_mig(d) for d in devices[:need]):
        raise GPUAssignmentError(f"an engine of {per_engine} GPUs would span MIG instances "
                                 f"({','.join(devices[:per_engine])}); a CUDA process uses one MIG "
                                 "instance, so use tensor_parallel_size 1 on MIG")
    return [devices[e * per_engine:(e + 1) * per_engine] for e in range(engines)]


def visible_value(devices: list[str]) -> str:
    """The CUDA_VISIBLE_DEVICES value that shows exactly `devices`."""
    return ",".join(devices)

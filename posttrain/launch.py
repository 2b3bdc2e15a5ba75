"""How a training stage's processes are started: the recipe's `run.launcher`, made explicit.

The launcher is part of the run. `plan_launch` turns the recipe's command prefix into the
command that actually runs (accelerate and torchrun taken from posttrain's own Python, never
from whatever PATH holds), the number of processes it starts, and the identity the stage
record keeps (a changed launcher, process count or accelerate config is a changed input).

Settings that would silently run fewer processes, or another kind of parallelism, than the
recipe asks for are refused here, before anything starts; the worker checks again at start-up
that it got the world size the plan promised (`check_world_size`).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class LaunchError(ValueError):
    """The recipe's launcher cannot start what it asks for."""


# What each launcher's first word becomes: the same tool, from the interpreter running posttrain.
_MODULES = {"accelerate": "accelerate.commands.launch", "torchrun": "torch.distributed.run"}
# accelerate distributed types that start one process per rank through torch's launcher.
_MULTI_PROCESS_TYPES = {"MULTI_GPU": "ddp", "FSDP": "fsdp", "DEEPSPEED": "deepspeed"}


@dataclass
class LaunchPlan:
    """What starts a training stage, and what it is recorded as."""

    command: list[str]
    """The command prefix to run (`-m posttrain.rounds.worker SPEC` follows)."""
    launcher: list[str] | None
    """The recipe's launcher as written (None: plain Python, one process)."""
    world_size: int
    """Processes started (all ranks, all machines)."""
    parallelism: str = "none"
    """none | ddp | fsdp | deepspeed."""
    config_file: Path | None = None
    """The accelerate config file the launcher reads (given, or accelerate's default one)."""
    settings: dict[str, Any] = field(default_factory=dict)
    """The config file's content (for the record; its hash is what counts as an input)."""

    def identity(self, hash_path) -> dict:
        """What the record keeps and compares: launcher, process count, parallelism, config content."""
        return {"launcher": self.launcher, "world_size": self.world_size, "parallelism": self.parallelism,
                "config": None if self.config_file is None else hash_path(str(self.config_file))}

    def summary(self) -> str:
        """Short form for `posttrain status`: e.g. `2 procs ddp`."""
        return "1 proc" if self.world_size == 1 and self.parallelism == "none" else \
            f"{self.world_size} proc{'s' if self.world_size != 1 else ''} {self.parallelism}"


def _option(args: list[str], *names: str) -> str | None:
    """Value of `--name V` or `--name=V` (accelerate also accepts dashes for underscores)."""
    spellings = {n for name in names for n in (name, name.replace("_", "-"))}
    for i, a in enumerate(args):
        if a in spellings and i + 1 < len(args):
            return args[i + 1]
        key, eq, value = a.partition("=")
        if eq and key in spellings:
            return value
    return None


def _flag(args: list[str], *names: str) -> bool:
    spellings = {n for name in names for n in (name, name.replace("_", "-"))}
    return any(a in spellings for a in args)


def _int(value: str, what: str, launcher: list[str]) -> int:
    try:
        n = int(value)
    except ValueError:
        raise LaunchError(f"run.launcher {launcher}: {what} must be a number of processes, got {value!r} "
                          "(posttrain records the process count, so it must be explicit)") from None
    if n < 1:
        raise LaunchError(f"run.launcher {launcher}: {what} must be at least 1, got {n}")
    return n


def _accelerate_default_config() -> Path | None:
    root = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")),
                                                     "huggingface")
    path = Path(os.environ.get("ACCELERATE_CONFIG_FILE") or Path(root) / "accelerate" / "default_config.yaml")
    return path if path.is_file() else None


def _resolve_file(value: str, base_dir: Path | None) -> Path:
    p = Path(value).expanduser()
    if not p.is_absolute() and base_dir is not None and (base_dir / p).exists():
        return (base_dir / p).resolve()
    return p.resolve()


def _plan_accelerate(launcher: list[str], args: list[str], base_dir: Path | None, has_gpu: bool) -> LaunchPlan:
    import yaml

    config_file = None
    given = _option(args, "--config_file")
    if given is not None:
        config_file = _resolve_file(given, base_dir)
        if not config_file.is_file():
            raise LaunchError(f"run.launcher {launcher}: accelerate config file {given} does not exist "
                              f"(looked beside the recipe and in the current folder)")
        args = [str(config_file) if a == given else a for a in args]
    elif not _flag(args, "--cpu"):
        config_file = _accelerate_default_config()  # accelerate reads it silently; so do we, and record it
    settings = yaml.safe_load(config_file.read_text(encoding="utf-8")) or {} if config_file else {}
    if not isinstance(settings, dict):
        raise LaunchError(f"{config_file}: an accelerate config must be a mapping")

    n = _option(args, "--num_processes")
    world = _int(n, "--num_processes", launcher) if n is not None else int(settings.get("num_processes") or 1)
    dtype = str(settings.get("distributed_type", "NO")).upper()
    if _flag(args, "--use_deepspeed"):
        parallelism = "deepspeed"
    elif _flag(args, "--use_fsdp"):
        parallelism = "fsdp"
    elif _flag(args, "--multi_gpu"):
        parallelism = "ddp"
    else:
        parallelism = _MULTI_PROCESS_TYPES.get(dtype, "none")
    cpu = _flag(args, "--cpu") or bool(settings.get("use_cpu"))
    if world > 1 and (cpu or parallelism == "none"):
        raise LaunchError(
            f"run.launcher {launcher}: accelerate would start ONE process, not {world}: "
            + ("`--cpu`/`use_cpu` with several processes expects mpirun (MULTI_CPU). "
               if cpu else f"distributed_type {dtype} starts a single process. ")
            + "For several processes use `--multi_gpu` or configs/accelerate/multi_gpu.yaml; on a machine "
              "without GPUs that gives one gloo process per rank on the CPU.")
    if world == 1 and parallelism != "none":
        raise LaunchError(f"run.launcher {launcher}: {parallelism} with 1 process; "
                          "give --num_processes (or num_processes in the config) of 2 or more")
    if parallelism in ("fsdp", "deepspeed") and not has_gpu:
        raise LaunchError(
            f"run.launcher {launcher}: {parallelism} needs GPUs; without one accelerate falls back to plain "
            "data parallelism (MULTI_CPU) and would run something other than the config says. "
            "Use configs/accelerate/multi_gpu.yaml on a CPU machine.")
    module = [sys.executable, "-m", _MODULES["accelerate"]]
    return LaunchPlan(command=[*module, *args], launcher=list(launcher), world_size=world,
                      parallelism=parallelism if world > 1 else "none", config_file=config_file,
                      settings=settings)


def _plan_torchrun(launcher: list[str], args: list[str]) -> LaunchPlan:
    nproc = _option(args, "--nproc_per_node")
    nnodes = _option(args, "--nnodes") or "1"
    if nproc is None:
        raise LaunchError(f"run.launcher {launcher}: give --nproc_per_node N (torchrun's default is 1)")
    if ":" in nnodes:
        raise LaunchError(f"run.launcher {launcher}: elastic --nnodes {nnodes} has no fixed world size; "
                          "give a number")
    world = _int(nproc, "--nproc_per_node", launcher) * _int(nnodes, "--nnodes", launcher)
    return LaunchPlan(command=[sys.executable, "-m", _MODULES["torchrun"], *args], launcher=list(launcher),
                      world_size=world, parallelism="ddp" if world > 1 else "none")


def plan_launch(launcher: list[str] | None, *, base_dir: str | os.PathLike | None = None,
                has_gpu: bool | None = None) -> LaunchPlan:
    """The plan for a recipe's `run.launcher` (None: this Python, one process).

    The first word must be `accelerate` (then `launch`) or `torchrun`, or a path to one of them;
    it is replaced by `python -m accelerate.commands.launch` / `python -m torch.distributed.run`
    with posttrain's own interpreter, so the launcher is the one installed beside posttrain.
    A relative `--config_file` is looked up beside the recipe first (`base_dir`).
    """
    if not launcher:
        return LaunchPlan(command=[sys.executable], launcher=None, world_size=1)
    if has_gpu is None:
        import torch

        has_gpu = torch.cuda.is_available()
    base = Path(base_dir) if base_dir is not None else None
    tool = Path(launcher[0]).name
    if tool == "accelerate":
        if len(launcher) < 2 or launcher[1] != "launch":
            raise LaunchError(f"run.launcher {launcher}: expected `accelerate launch ...`")
        return _plan_accelerate(launcher, list(launcher[2:]), base, has_gpu)
    if tool == "torchrun":
        return _plan_torchrun(launcher, list(launcher[1:]))
    raise LaunchError(f"run.launcher {launcher}: posttrain starts training stages with `accelerate launch ...` "
                      "or `torchrun ...` (it records how many processes they start); "
                      f"{launcher[0]!r} is neither")


def check_world_size(expected: int, launcher: list[str] | None) -> None:
    """Raise when this process's world differs from the one the launch plan promised."""
    actual = int(os.environ.get("WORLD_SIZE", "1"))
    if actual != expected:
        raise LaunchError(f"the launcher {launcher} started {actual} process(es), the plan expected {expected}; "
                          "the stage would train with another batch size than recorded. Fix run.launcher.")

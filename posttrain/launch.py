"""How a training stage's processes are started: the recipe's `run.launcher`, made explicit.

The launcher is part of the run. `plan_launch` turns the recipe's command prefix into the
command that actually runs (accelerate and torchrun taken from posttrain's own Python, never
from whatever PATH holds), the number of processes it starts, and the identity the stage
record keeps (a changed launcher, process count or accelerate config is a changed input).

Settings that would silently run fewer processes, or another kind of parallelism, than the
recipe asks for are refused here, before anything starts; the worker checks again at start-up
that it got the world size the plan promised (`check_world_size`).

Several nodes: the launcher's own options say so (torchrun `--nnodes N --node_rank R
--master_addr H --master_port P`; accelerate `--num_machines N --machine_rank R
--main_process_ip H --main_process_port P`, or the same keys in its config file). The world
is every node's processes; this plan starts this node's. One recipe serves every node, so a
launcher word may name an environment variable (`--node_rank ${NODE_RANK}`, `${SLURM_NODEID}`
under srun), expanded here for the command and kept as written for the record. Node 0 runs
the round and writes; the others take part in the training stages only
(posttrain.rounds.nodes).
"""

from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping


class LaunchError(ValueError):
    """The recipe's launcher cannot start what it asks for."""


# What each launcher's first word becomes: the same tool, from the interpreter running posttrain.
_MODULES = {"accelerate": "accelerate.commands.launch", "torchrun": "torch.distributed.run"}
# What actually runs it: posttrain's agent, which runs the tool in-process and turns a failed
# rank into one line naming it (posttrain.rounds.agent).
AGENT = "posttrain.rounds.agent"
# accelerate distributed types that start one process per rank through torch's launcher.
_MULTI_PROCESS_TYPES = {"MULTI_GPU": "ddp", "FSDP": "fsdp", "DEEPSPEED": "deepspeed"}
_VAR = re.compile(r"\$\{(\w+)\}|\$(\w+)")


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
    nodes: int = 1
    """Machines the world spans (torchrun --nnodes, accelerate num_machines)."""
    node_rank: int = 0
    """This machine's rank among them (0 writes the run folder)."""
    master: str | None = None
    """`host:port` every node meets at (several nodes only)."""

    def identity(self, hash_path) -> dict:
        """What the record keeps and compares: launcher, process count, parallelism, config
        content, and the number of nodes when there are several (which node is which is not an
        input: the same stage on other machines trains the same model)."""
        ident = {"launcher": self.launcher, "world_size": self.world_size, "parallelism": self.parallelism,
                 "config": None if self.config_file is None else hash_path(str(self.config_file))}
        if self.nodes > 1:
            ident["nodes"] = self.nodes
        return ident

    def spec(self) -> dict:
        """What the stage worker is told (and checks) about its launch."""
        out = {"launcher": self.launcher, "world_size": self.world_size, "parallelism": self.parallelism}
        if self.nodes > 1:
            out["nodes"] = self.nodes
        return out

    def summary(self) -> str:
        """Short form for `posttrain status`: e.g. `2 procs ddp`, `16 procs ddp on 2 nodes`."""
        if self.world_size == 1 and self.parallelism == "none":
            return "1 proc"
        nodes = f" on {self.nodes} nodes" if self.nodes > 1 else ""
        return f"{self.world_size} proc{'s' if self.world_size != 1 else ''} {self.parallelism}{nodes}"


def _spellings(names) -> set[str]:
    return {n for name in names for n in (name, name.replace("_", "-"))}


def _option(args: list[str], *names: str) -> str | None:
    """Value of `--name V` or `--name=V` (accelerate also accepts dashes for underscores)."""
    spellings = _spellings(names)
    for i, a in enumerate(args):
        if a in spellings and i + 1 < len(args):
            return args[i + 1]
        key, eq, value = a.partition("=")
        if eq and key in spellings:
            return value
    return None


def _flag(args: list[str], *names: str) -> bool:
    spellings = _spellings(names)
    return any(a in spellings for a in args)


def _int(value: Any, what: str, launcher: list[str], minimum: int = 1, unit: str = "processes") -> int:
    try:
        n = int(value)
    except (TypeError, ValueError):
        raise LaunchError(f"run.launcher {launcher}: {what} must be a number of {unit}, got {value!r} "
                          f"(posttrain records the {unit[:-1] if unit.endswith('s') else unit} count, "
                          "so it must be explicit)") from None
    if n < minimum:
        raise LaunchError(f"run.launcher {launcher}: {what} must be at least {minimum}, got {n}")
    return n


def expand(launcher: list[str], environ: Mapping[str, str] | None = None, *, strict: bool = True) -> list[str]:
    """The launcher's words with `$NAME` / `${NAME}` replaced from the environment (one recipe
    for every node: `--node_rank ${NODE_RANK}`). An unset name is a LaunchError; with
    `strict=False` (validate, on a machine that is none of the nodes) it stays as written."""
    env = os.environ if environ is None else environ

    def one(m: re.Match) -> str:
        name = m.group(1) or m.group(2)
        if name in env:
            return env[name]
        if not strict:
            return m.group(0)
        raise LaunchError(f"run.launcher {launcher}: {m.group(0)} is not set in this environment. Start each node "
                          f"with it set (e.g. `{name}=1 posttrain run-round ...` on node 1, or under SLURM "
                          "`--node_rank ${SLURM_NODEID}`); see the README's 'Several nodes'")

    return [_VAR.sub(one, word) for word in launcher]


def _unexpanded(value: str | None) -> bool:
    return value is not None and _VAR.search(value) is not None


def _node_rank(value: Any, what: str, nodes: int, launcher: list[str]) -> int:
    if _unexpanded(str(value)):
        return 0  # validate on a machine that is none of the nodes: any rank will do
    rank = _int(value, what, launcher, minimum=0, unit="nodes")
    if rank >= nodes:
        raise LaunchError(f"run.launcher {launcher}: {what} {rank} with {nodes} nodes (ranks are 0 to {nodes - 1})")
    return rank


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


def sharding_refusal(parallelism: str, has_gpu: bool) -> str | None:
    """Why `parallelism` cannot run on this machine, or None. The one rule both `posttrain
    validate` and a stage's launch apply (through plan_launch): FSDP and ZeRO-3 need GPUs,
    since without them accelerate falls back to plain data parallelism (MULTI_CPU)."""
    if parallelism in ("fsdp", "deepspeed") and not has_gpu:
        return (f"{parallelism} needs GPUs; without one accelerate falls back to plain data parallelism "
                "(MULTI_CPU) and would run something other than the config says. "
                "Use configs/accelerate/multi_gpu.yaml on a CPU machine.")
    return None


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

    def setting(flag: str, key: str):
        value = _option(args, flag)
        return value if value is not None else settings.get(key)

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
    why = sharding_refusal(parallelism, has_gpu)
    if why:
        raise LaunchError(f"run.launcher {launcher}: {why}")
    nodes = _int(setting("--num_machines", "num_machines") or 1, "--num_machines", launcher, unit="machines")
    node_rank, master = 0, None
    if nodes > 1:
        if world % nodes:  # accelerate's num_processes counts every machine's processes
            raise LaunchError(f"run.launcher {launcher}: --num_processes {world} (all machines together, as "
                              f"accelerate counts them) does not divide by --num_machines {nodes}")
        rank = setting("--machine_rank", "machine_rank")
        ip = setting("--main_process_ip", "main_process_ip")
        if rank is None or ip is None:
            raise LaunchError(f"run.launcher {launcher}: {nodes} machines need --machine_rank (e.g. "
                              "`--machine_rank ${NODE_RANK}`) and --main_process_ip (node 0's address), in the "
                              "launcher or the config file; without them every machine believes it is the first")
        node_rank = _node_rank(rank, "--machine_rank", nodes, launcher)
        master = f"{ip}:{setting('--main_process_port', 'main_process_port') or 29500}"
    module = [sys.executable, "-m", AGENT, "accelerate"]
    return LaunchPlan(command=[*module, *args], launcher=list(launcher), world_size=world,
                      parallelism=parallelism if world > 1 else "none", config_file=config_file,
                      settings=settings, nodes=nodes, node_rank=node_rank, master=master)


def _plan_torchrun(launcher: list[str], args: list[str]) -> LaunchPlan:
    nproc = _option(args, "--nproc_per_node")
    nnodes = _option(args, "--nnodes") or "1"
    if nproc is None:
        raise LaunchError(f"run.launcher {launcher}: give --nproc_per_node N (torchrun's default is 1)")
    if ":" in nnodes:
        raise LaunchError(f"run.launcher {launcher}: elastic --nnodes {nnodes} has no fixed world size; "
                          "give a number")
    nodes = _int(nnodes, "--nnodes", launcher, unit="nodes")
    world = _int(nproc, "--nproc_per_node", launcher) * nodes
    node_rank, master = 0, None
    if nodes > 1:
        if _flag(args, "--standalone"):
            raise LaunchError(f"run.launcher {launcher}: --standalone is one machine; with --nnodes {nodes} give "
                              "--master_addr (node 0's address) instead")
        backend = _option(args, "--rdzv_backend") or "static"
        if backend != "static":
            raise LaunchError(f"run.launcher {launcher}: --rdzv_backend {backend} numbers the nodes in the order "
                              "they join; posttrain needs node 0 to be the machine that writes the run folder: "
                              "use the static rendezvous (--node_rank with --master_addr and --master_port)")
        rank = _option(args, "--node_rank")
        addr = _option(args, "--master_addr")
        endpoint = _option(args, "--rdzv_endpoint")
        if rank is None or (addr is None and endpoint is None):
            raise LaunchError(f"run.launcher {launcher}: --nnodes {nodes} needs --node_rank (e.g. "
                              "`--node_rank ${NODE_RANK}`, the same recipe on every node) and --master_addr "
                              "(node 0's address); without them each node waits for the others at its own address")
        node_rank = _node_rank(rank, "--node_rank", nodes, launcher)
        master = endpoint or f"{addr}:{_option(args, '--master_port') or 29500}"
    return LaunchPlan(command=[sys.executable, "-m", AGENT, "torchrun", *args], launcher=list(launcher),
                      world_size=world, parallelism="ddp" if world > 1 else "none", nodes=nodes,
                      node_rank=node_rank, master=master)


def plan_launch(launcher: list[str] | None, *, base_dir: str | os.PathLike | None = None,
                has_gpu: bool | None = None, environ: Mapping[str, str] | None = None,
                strict: bool = True) -> LaunchPlan:
    """The plan for a recipe's `run.launcher` (None: this Python, one process).

    The first word must be `accelerate` (then `launch`) or `torchrun`, or a path to one of them;
    the tool runs from posttrain's own interpreter (`python -m posttrain.rounds.agent torchrun
    ...`, which runs `torch.distributed.run` / `accelerate.commands.launch` in its process), so
    the launcher is the one installed beside posttrain. A relative `--config_file` is looked up
    beside the recipe first (`base_dir`). `$NAME` words are expanded from `environ` (default:
    this process's); `strict=False` leaves unset ones as written (validate).
    """
    if not launcher:
        return LaunchPlan(command=[sys.executable], launcher=None, world_size=1)
    if has_gpu is None:
        import torch

        has_gpu = torch.cuda.is_available()
    base = Path(base_dir) if base_dir is not None else None
    words = expand(list(launcher), environ, strict=strict)
    tool = Path(words[0]).name
    if tool == "accelerate":
        if len(words) < 2 or words[1] != "launch":
            raise LaunchError(f"run.launcher {launcher}: expected `accelerate launch ...`")
        plan = _plan_accelerate(launcher, list(words[2:]), base, has_gpu)
    elif tool == "torchrun":
        plan = _plan_torchrun(launcher, list(words[1:]))
    else:
        raise LaunchError(f"run.launcher {launcher}: posttrain starts training stages with `accelerate launch ...` "
                          "or `torchrun ...` (it records how many processes they start); "
                          f"{launcher[0]!r} is neither")
    plan.launcher = list(launcher)  # as written: the record is the same on every node
    return plan


def check_world_size(expected: int, launcher: list[str] | None) -> None:
    """Raise when this process's world differs from the one the launch plan promised."""
    actual = int(os.environ.get("WORLD_SIZE", "1"))
    if actual != expected:
        raise LaunchError(f"the launcher {launcher} started {actual} process(es), the plan expected {expected}; "
                          "the stage would train with another batch size than recorded. Fix run.launcher.")

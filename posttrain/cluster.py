"""Generation and scoring on a Ray cluster (`sample.cluster` in a recipe; off by default).

The single-machine path (posttrain.generation.run_jobs) starts engines as child processes.
With a cluster (`run_jobs(..., cluster=...)`), the same jobs (posttrain.jobs) go to Ray actors
instead, as OpenRLHF and Ray's offline batch inference do it:

- **generation**: `engines` actors, each one engine (vLLM, or the transformers shared-prefill
  backend) holding the policy once. With vLLM and `tensor_parallel_size` T > 1 an engine is a
  placement group of T one-GPU bundles; the actor sits on the first bundle and vLLM's Ray
  executor (`distributed_executor_backend="ray"`) puts its T workers on the group, on one node
  or across nodes (`placement_strategy`). With T = 1 the actor takes one GPU and runs vLLM
  in its own process.
- **scoring**: `reward_actors` actors each hold the reward (the trained RM or any Reward
  object, shipped by pickle before its `setup()`), so the reward model loads on the cluster's
  GPUs, never on the orchestrator's. Generation actors are gone before reward actors start,
  as on one machine: the policy and the reward never hold memory at the same time.

The orchestrator (the Ray driver) keeps the disk: actors return results, and the driver
writes each one atomically to the same file the local path writes, the moment it arrives.
So resume, shards and records are exactly those of the local path, and a prompt's samples do
not depend on where it ran: a transformers job runs whole on one actor with its own seed
(as in the local child); vLLM jobs are cut into the same slices, with the same per-prompt
seeds, as the local engines use. An actor that dies loses only its task in flight: one log
line names the actor (name, pid, node) and what killed it, as far as Ray can tell; the task
goes back to the queue for the live actors (at most `task_retries` times); when none is left,
or a task has lost too many, the stage fails with the finished results on disk, and the rerun
does only what is missing.

Ray is imported only here and only when a recipe asks for a cluster: one machine needs no Ray.
Paths (the policy, the reward model) must be readable at the same path on every node (a
shared filesystem), and the cluster's Python must have posttrain (and vLLM for that backend).
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections import deque
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Iterator, Literal

from pydantic import Field

from posttrain.jobs import Generation, even_slices, join_parts, part_path, read_job_result, write_job_result
from posttrain.schema import StrictModel

log = logging.getLogger(__name__)


class ClusterSettings(StrictModel):
    """Run generation and scoring as Ray actors on a cluster (off when the section is absent)."""

    address: str = "auto"
    """`auto`: the Ray cluster this machine joined with `ray start` (or $RAY_ADDRESS);
    `ray://HOST:10001`: a remote cluster through Ray Client; `HOST:6379`: a cluster's head;
    `local`: a one-machine Ray started for this run."""
    engines: int = Field(1, ge=1)
    """Generation actors (data parallel), each one engine on its own GPUs and share of the jobs.
    Replaces `sample.vllm.engines`, which counts local child processes."""
    cpus_per_engine: float = Field(1, gt=0)
    """CPUs Ray reserves for each generation actor."""
    gpus_per_engine: int | None = Field(None, ge=0)
    """GPUs per generation actor. Default: `sample.vllm.tensor_parallel_size` on a cluster
    with GPUs, 0 on a CPU-only one."""
    placement_strategy: Literal["PACK", "STRICT_PACK", "SPREAD", "STRICT_SPREAD"] = "PACK"
    """How a tensor-parallel engine's GPUs are placed: `STRICT_PACK` keeps them on one node
    (NVLink), `PACK` prefers one node, `SPREAD` crosses nodes (vLLM's multi-node TP)."""
    reward_actors: int = Field(1, ge=1)
    """Scoring actors, each holding the reward (a reward model loads once per actor)."""
    cpus_per_reward: float = Field(1, gt=0)
    """CPUs Ray reserves for each scoring actor."""
    gpus_per_reward: float | None = Field(None, ge=0)
    """GPUs per scoring actor. Default: 1 on a cluster with GPUs, 0 on a CPU-only one."""
    runtime_env: dict[str, Any] = Field(default_factory=dict)
    """Ray runtime environment for the actors (`env_vars`, `py_modules`, `working_dir`, ...),
    e.g. to make a custom reward's module importable on every node."""
    num_cpus: int | None = Field(None, ge=1)
    """`address: local` only: CPUs the one-machine Ray may use (default: all)."""
    task_retries: int = Field(2, ge=0)
    """Times a task goes to another actor after the actor running it died (each death is one
    log line naming the actor and its cause); a task that loses more stops the stage, as one
    that kills every actor it reaches (memory) would otherwise take the whole pool down."""


class ClusterError(RuntimeError):
    """Ray is missing, the cluster cannot be reached, or its actors died; the message says which."""


# --------------------------------------------------------------------------------------
# Connecting
# --------------------------------------------------------------------------------------


def require_ray():
    """The ray module, or a ClusterError saying how to get it."""
    try:
        import ray
    except ImportError:
        raise ClusterError("the recipe sets sample.cluster, which needs Ray on this machine and on the "
                           "cluster: pip install -r requirements/ray.txt (or remove sample.cluster to "
                           "run on this machine alone)") from None
    return ray


def connect(settings: ClusterSettings):
    """Join the cluster once per process (a driver already connected, e.g. by a test, is reused)."""
    ray = require_ray()
    if ray.is_initialized():
        return ray
    # Quiet terminal: Ray's own start-up lines and the actors' output go nowhere near it.
    kwargs: dict[str, Any] = {"runtime_env": _runtime_env(settings), "log_to_driver": False,
                              "logging_level": logging.WARNING}
    if settings.address == "local":
        kwargs.update(num_cpus=settings.num_cpus, include_dashboard=False)
    else:
        kwargs["address"] = settings.address
    try:
        ray.init(**kwargs)
    except ConnectionError as err:
        raise ClusterError(f"sample.cluster.address={settings.address!r}: no Ray cluster there ({err}); "
                           "start one with `ray start --head` or use address: local") from None
    return ray


def _runtime_env(settings: ClusterSettings) -> dict[str, Any]:
    env = dict(settings.runtime_env)
    # The actors never look for a model hub (a lookup hangs offline), whatever the nodes' env says.
    env["env_vars"] = {"HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1"), "TOKENIZERS_PARALLELISM": "false",
                       "VLLM_NO_USAGE_STATS": "1", **dict(env.get("env_vars", {}))}
    return env


def cluster_has_gpus(ray) -> bool:
    return ray.cluster_resources().get("GPU", 0) > 0


# --------------------------------------------------------------------------------------
# Actors (plain classes; ray.remote wraps them when a pool starts)
# --------------------------------------------------------------------------------------


class GenerationWorker:
    """One engine on the cluster: the policy loaded once, jobs generated on request."""

    def __init__(self, backend: str, model_dir: str, options: dict, max_model_len: int | None):
        from posttrain.engines import EngineOptions, TransformersGenerator, VLLMEngine

        if not Path(model_dir).is_dir():
            raise FileNotFoundError(f"{model_dir}: no model folder on node {_node()}; the policy must be "
                                    "at the same path on every node (a shared filesystem)")
        engine_options = EngineOptions.from_dict(options)
        self.backend = backend
        if backend == "vllm":
            if engine_options.distributed_executor_backend == "ray":
                # vLLM's Ray executor places its workers on this actor's placement group and sets
                # each worker's GPU; this actor itself holds none (Ray gave it an empty list).
                os.environ.pop("CUDA_VISIBLE_DEVICES", None)
                # The engine core must run in this process: a vLLM V1 engine-core subprocess does
                # not inherit the actor's placement group and would look for GPUs elsewhere.
                os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
            self.engine = VLLMEngine(model_dir, engine_options, max_model_len=max_model_len)
        else:
            self.engine = TransformersGenerator(model_dir, options=engine_options)

    def where(self) -> dict:
        import ray

        return {"node": _node(), "pid": os.getpid(), "gpus": [str(g) for g in ray.get_gpu_ids()]}

    def generate(self, prompt_ids: list[list[int]], settings: dict, seed_offset: int) -> list[dict]:
        from posttrain.jobs import SamplingSettings

        sampling = SamplingSettings.from_dict(settings)
        if self.backend == "vllm":
            gens = self.engine.generate(prompt_ids, sampling, seed_offset=seed_offset)
        else:
            gens = self.engine.generate(prompt_ids, sampling)
        return [asdict(g) for g in gens]


class RewardWorker:
    """One copy of the reward on the cluster, set up in the actor's process."""

    def __init__(self, reward: Any):
        from posttrain.reward import setup

        self.reward = reward
        setup(reward)

    def where(self) -> dict:
        return {"node": _node(), "pid": os.getpid()}

    def score(self, prompts: list, responses: list[str], metas: list[dict] | None) -> list:
        """One `Scored` (value, reason, detail) per sample, as the local path scores them."""
        from posttrain.reward import checked_verdicts

        return checked_verdicts(self.reward, prompts, responses, metas)

    def teardown(self) -> None:
        from posttrain.reward import teardown

        teardown(self.reward)


def _node() -> str:
    import socket

    return socket.gethostname()


def _has_vllm() -> bool:
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


# --------------------------------------------------------------------------------------
# A pool of actors working through a queue of tasks
# --------------------------------------------------------------------------------------


def _actor_died(ray, err: BaseException) -> bool:
    return isinstance(err, (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError))


def _field(text: str, name: str) -> str | None:
    m = re.search(rf"^\s*{name}: (.+)$", text, re.M)
    return m.group(1).strip() if m else None


def death_cause(err: BaseException) -> str:
    """What ended an actor, in words, from what Ray says (its ActorDiedError's message: the
    worker's exit type and detail, the node's death, the memory monitor, ray.kill). Ray sees a
    SIGKILL only as a worker whose connection dropped, so that is what it says."""
    text = str(getattr(err, "error_msg", None) or err)
    exit_type = re.search(r"Worker exit type: (\w+)", text)
    if getattr(err, "preempted", False):
        return "its node was preempted (drained by the autoscaler)"
    if getattr(err, "actor_init_failed", False):
        inner = text.split("creation task, ", 1)[-1].strip().splitlines()
        return f"its set-up raised: {inner[-1].strip() if inner else '?'}"
    if "memory monitor" in text or "OutOfMemoryError" in text or "low on memory" in text:
        return "Ray's memory monitor killed it: its node ran low on memory"
    if re.search(r"node (has died|died|.*is dead|was terminated)", text, re.I):
        return "its node died (the machine, or its raylet, went away)"
    if "ray.kill" in text or (exit_type and exit_type.group(1) == "INTENDED_USER_EXIT"):
        return "it was stopped by ray.kill"
    if exit_type and exit_type.group(1) == "SYSTEM_ERROR":
        return ("its process died without an error (SIGKILL, e.g. the kernel's out-of-memory killer, or a crash "
                "such as SIGSEGV: Ray tells only that its connection dropped; see dmesg on its node)")
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else type(err).__name__


def describe_actor_death(err: BaseException, where: dict | None = None) -> str:
    """`actor NAME (pid P on node IP) died: CAUSE`, from Ray's error and what the actor said
    about itself when it started (`where`)."""
    text = str(getattr(err, "error_msg", None) or err)
    where = where or {}
    name = _field(text, "name") or where.get("name") or _field(text, "actor_id") or getattr(err, "actor_id", None)
    pid = _field(text, "pid") or where.get("pid")
    node = _field(text, "ip") or where.get("node")
    place = ", ".join(x for x in (f"pid {pid}" if pid else "", f"on node {node}" if node else "") if x)
    return f"actor {name}" + (f" ({place})" if place else "") + f" died: {death_cause(err)}"


TASK_RETRIES = ClusterSettings.model_fields["task_retries"].default


def run_queue(ray, actors: list, tasks: list, call: Callable[[Any, Any], Any], what: str, *,
              retries: int = TASK_RETRIES, label: Callable[[Any], str] = str) -> Iterator[tuple[Any, Any]]:
    """Each task to the next free actor (`call(actor, task)` returns an object ref); yields
    (task, value) as each finishes, so the caller keeps it before the next one. A task whose
    actor died goes back to the queue for the live actors, at most `retries` times; every
    death is one log line naming the actor and what killed it. When no actor is left, or a
    task ran out of retries, ClusterError (everything finished was already yielded). An error
    raised inside a task is raised here as it is."""
    queue, free, running = deque(tasks), list(actors), {}
    alive = len(actors)
    lost: dict[int, int] = {}  # id(task) -> actors it lost
    while queue or running:
        while queue and free:
            actor, task = free.pop(), queue.popleft()
            running[call(actor, task)] = (actor, task)
        ready, _ = ray.wait(list(running), num_returns=1, timeout=1.0)
        for ref in ready:
            actor, task = running.pop(ref)
            try:
                value = ray.get(ref)
            except Exception as err:
                if not _actor_died(ray, err):
                    raise
                alive -= 1
                death = describe_actor_death(err)
                lost[id(task)] = tries = lost.get(id(task), 0) + 1
                if alive == 0:
                    raise ClusterError(f"{what}: {death}; no actor is left for its task ({label(task)}). The finished "
                                       "results are kept: run again to do the rest") from err
                if tries > retries:
                    raise ClusterError(f"{what}: {death}; its task ({label(task)}) has now lost {tries} actors, "
                                       "so it is likely what kills them (memory?). The finished results are kept") \
                        from err
                queue.appendleft(task)
                log.warning("%s: %s; its task (%s) goes to the %d live actor(s) (retry %d of %d)", what, death,
                            label(task), alive, tries, retries)
                continue
            free.append(actor)
            yield task, value


def _start(ray, cls, args: tuple, *, n: int, num_cpus: float, num_gpus: float, name: str,
           strategy_for: Callable[[int], Any] | None = None) -> list:
    remote = ray.remote(cls)
    actors = []
    for i in range(n):
        # Named, so an operator (or a test) can find and kill one: `ray.get_actor(name)`.
        opts: dict[str, Any] = {"num_cpus": num_cpus, "num_gpus": num_gpus, "max_restarts": 0,
                                "name": f"{name}-{os.getpid()}-{time.monotonic_ns()}-{i}"}
        if strategy_for is not None:
            opts["scheduling_strategy"] = strategy_for(i)
        actors.append(remote.options(**opts).remote(*args))
    return actors


def _stop(ray, actors: list) -> None:
    for actor in actors:
        ray.kill(actor, no_restart=True)


# --------------------------------------------------------------------------------------
# Generation
# --------------------------------------------------------------------------------------


def resolve_cluster_backend(ray, backend: str) -> str:
    """'auto' is vLLM when the cluster's Python has it (asked on the cluster, not here)."""
    if backend == "transformers":
        return backend
    if ray.get(ray.remote(num_cpus=0)(_has_vllm).remote()):
        return "vllm"
    if backend == "vllm":
        raise ClusterError("backend 'vllm' requested but vllm does not import in the cluster's Python")
    return "transformers"


def run_jobs_on_ray(model_dir: str | os.PathLike, jobs: list, *, backend: str, options, settings: ClusterSettings,
                    progress: Callable[[int], None] | None = None,
                    on_prompts: Callable[[int], None] | None = None) -> str:
    """posttrain.generation.run_jobs on a Ray cluster: the same result files, written by this
    driver as actors return them. `jobs` are those still to do. Returns the backend used."""
    ray = connect(settings)
    backend = resolve_cluster_backend(ray, backend)
    if not jobs:
        return backend
    tp = options.tensor_parallel_size if backend == "vllm" else 1
    gpus = settings.gpus_per_engine if settings.gpus_per_engine is not None else (
        tp if cluster_has_gpus(ray) else 0)
    engines = max(1, min(settings.engines, sum(len(j.prompt_ids) for j in jobs)))

    # A transformers job runs whole (its seed drives one random stream, as in the local child);
    # a vLLM job is cut into `engines` slices with per-prompt seeds, as the local engines cut it.
    def slices(job) -> list[tuple[int, int]]:
        return even_slices(len(job.prompt_ids), engines) if backend == "vllm" else [(0, len(job.prompt_ids))]

    def part(job, i: int, n: int) -> str:
        return part_path(job.out, i, n)

    tasks = [(j, i, len(bounds), start, end)
             for j, job in enumerate(jobs) for bounds in [slices(job)]
             for i, (start, end) in enumerate(bounds) if not Path(part(job, i, len(bounds))).exists()]
    done_jobs = {j for j in range(len(jobs)) if all(t[0] != j for t in tasks)}
    prompts_done = sum(len(jobs[j].prompt_ids) for j in done_jobs)

    engine_options = asdict(options)
    pgs: list = []
    strategy_for = None
    num_gpus: float = gpus
    if backend == "vllm" and tp > 1 and gpus > 0:
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        engine_options["distributed_executor_backend"] = "ray"
        pgs = [placement_group([{"GPU": 1, "CPU": 1}] * tp, strategy=settings.placement_strategy)
               for _ in range(engines)]
        ray.get([pg.ready() for pg in pgs])

        def strategy_for(i: int):
            return PlacementGroupSchedulingStrategy(placement_group=pgs[i], placement_group_bundle_index=0,
                                                    placement_group_capture_child_tasks=True)
        num_gpus = 0  # the engine's T workers take the group's GPUs
    max_model_len = max(len(p) + j.settings.max_new_tokens for j in jobs for p in j.prompt_ids)
    actors = _start(ray, GenerationWorker, (backend, str(model_dir), engine_options, max_model_len),
                    n=engines, num_cpus=settings.cpus_per_engine, num_gpus=num_gpus, name="posttrain-generate",
                    strategy_for=strategy_for)
    log.info("generation on Ray (%s): %d %s actor(s), %d GPU(s) each, %d task(s)", settings.address, engines,
             backend, tp if pgs else gpus, len(tasks))

    def call(actor, task):
        j, i, n, start, end = task
        job = jobs[j]
        return actor.generate.remote(job.prompt_ids[start:end], job.settings.to_dict(), start)

    try:
        def label(task) -> str:
            j, i, n, start, end = task
            return f"{Path(jobs[j].out).name}, prompts {start}-{end - 1}"

        for (j, i, n, start, end), gens in run_queue(ray, actors, tasks, call, what=f"generation ({backend})",
                                                     label=label, retries=settings.task_retries):
            job = jobs[j]
            if len(gens) != end - start:
                raise ClusterError(f"{backend} actor returned {len(gens)} results for {end - start} prompts "
                                   f"({job.out})")
            write_job_result(part(job, i, n), [Generation(**g) for g in gens], 0.0)
            if n > 1 and all(Path(part(job, k, n)).exists() for k in range(n)):
                join_parts(job.out, [part(job, k, n) for k in range(n)])
            prompts_done += end - start
            if Path(job.out).exists():
                done_jobs.add(j)
            if progress is not None:
                progress(len(done_jobs))
            if on_prompts is not None:
                on_prompts(prompts_done)
    finally:
        _stop(ray, actors)
        if pgs:
            from ray.util.placement_group import remove_placement_group

            for pg in pgs:
                remove_placement_group(pg)
    for job in jobs:
        if len(read_job_result(job.out)) != len(job.prompt_ids):
            raise ClusterError(f"{backend}: {job.out} does not hold one result per prompt")
    return backend


# --------------------------------------------------------------------------------------
# Scoring
# --------------------------------------------------------------------------------------


class RewardPool:
    """`reward_actors` copies of a reward on the cluster. Use as a context manager."""

    def __init__(self, reward: Any, settings: ClusterSettings):
        self.reward = reward
        self.settings = settings
        self.actors: list = []
        self.ray: Any = None

    def __enter__(self) -> RewardPool:
        from posttrain.reward import reward_name

        ray = self.ray = connect(self.settings)
        gpus = self.settings.gpus_per_reward
        if gpus is None:
            gpus = 1 if cluster_has_gpus(ray) else 0
        self.actors = _start(ray, RewardWorker, (self.reward,), n=self.settings.reward_actors,
                             num_cpus=self.settings.cpus_per_reward, num_gpus=gpus, name="posttrain-reward")
        log.info("scoring on Ray: %d actor(s) of %s, %s GPU(s) each", len(self.actors), reward_name(self.reward),
                 gpus)
        return self

    def __exit__(self, *exc) -> None:
        ray, actors, self.actors = self.ray, self.actors, []
        if ray is None or not actors:
            return
        for actor in actors:
            try:
                ray.get(actor.teardown.remote(), timeout=120)
            except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError,
                    ray.exceptions.GetTimeoutError):
                pass  # a dead or hung actor is killed below, which frees what it held
        _stop(ray, actors)

    def score_each(self, keys: list, load: Callable[[Any], tuple[list, list[str], list[dict] | None]]
                   ) -> Iterator[tuple[Any, list]]:
        """(key, verdicts: one `Scored` per sample) for each key, as each finishes; `load(key)` gives its (prompts, responses,
        metas) when it is sent, so only the requests in flight are held in memory. A request is
        scored whole by one actor, in one call, as the local path scores it."""
        def call(actor, key):
            return actor.score.remote(*load(key))

        yield from run_queue(self.ray, self.actors, list(keys), call, what="scoring",
                             retries=self.settings.task_retries)

    def score(self, prompts: list, responses: list[str], metas: list[dict] | None = None) -> list[float | None]:
        """Scores of all samples, in order: contiguous chunks, one per actor."""
        chunks = {(s, e): (prompts[s:e], responses[s:e], None if metas is None else metas[s:e])
                  for s, e in even_slices(len(prompts), len(self.actors)) if e > s}
        out: list[float | None] = [None] * len(prompts)
        for (s, e), verdicts in self.score_each(list(chunks), chunks.__getitem__):
            out[s:e] = [v.value for v in verdicts]
        return out


@contextmanager
def scoring(reward: Any, settings: ClusterSettings | None):
    """A function (prompts, responses, metas) -> checked scores: on this machine (the reward set
    up here) without a cluster, in a RewardPool with one."""
    if settings is None:
        from posttrain.reward import active, checked_score

        with active(reward):
            yield lambda prompts, responses, metas=None: checked_score(reward, prompts, responses, metas)
        return
    with RewardPool(reward, settings) as pool:
        yield pool.score

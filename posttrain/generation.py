"""Generation backends for rejection sampling: K responses per prompt, with token counts.

Two backends sit behind one call, `generate(model_dir, prompt_token_ids, settings, ...)`:

- **vllm** (the default when an interpreter with vLLM is found): one `LLM` engine,
  `SamplingParams(n=K)`, prefix caching on, so a prompt's KV pages are computed once and
  shared by its K outputs; a request is admitted only when memory for its maximum output
  length is free. Several engines (data parallel) are several child processes, each on its
  own slice of the prompts and its own GPUs; `tensor_parallel_size` goes to `LLM`.
- **transformers** (CPU and fallback): each prompt is prefilled **once** (prompts batched,
  left padded), its KV cache is repeated K times, and all B*K sequences are decoded
  together; a sequence leaves the batch when it emits a stop token. This replaces
  `generate(num_return_sequences=K)`, which prefills every prompt K times.

Prompts arrive as token ids, already rendered with the chat template (`posttrain.chat`),
so both backends see exactly the same tokens and the caller can check prompt lengths once.

The backend runs in a child process (`python -m posttrain.generation REQUEST.json`) so
every byte of model and KV-cache memory is released before training starts, and so vLLM
can live in its own environment (`scripts/install-vllm.sh`; its interpreter is named by
POSTTRAIN_VLLM_PYTHON). This module imports only the standard library, posttrain.engines
(the backends) and posttrain.jobs (jobs and their result files) at the top, and they only the
standard library: the vLLM child imports nothing else from posttrain. With a cluster
(`cluster=`) the same jobs run on Ray actors instead (posttrain.cluster).

Token counts include the stop token (it is generated and is a training target); texts do
not contain it (special tokens are skipped when decoding, as vLLM does by default).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable

from posttrain.engines import EngineOptions, TransformersGenerator, VLLMEngine
from posttrain.jobs import (
    Generation,
    Job,
    SamplingSettings,
    even_slices,
    join_parts,
    part_path,
    read_job_result,
    write_job_result,
)

BACKENDS = ("auto", "vllm", "transformers")
VLLM_PYTHON_ENV = "POSTTRAIN_VLLM_PYTHON"


class GenerationError(RuntimeError):
    """A backend failed; the message names the backend and carries the child's error output."""


# --------------------------------------------------------------------------------------
# Choosing the backend and running it in a child process
# --------------------------------------------------------------------------------------


def _python_has_vllm(python: str) -> bool:
    # abspath, not realpath: two venvs' interpreters are symlinks to the same binary.
    if os.path.abspath(python) == os.path.abspath(sys.executable):
        return importlib.util.find_spec("vllm") is not None
    probe = "import importlib.util, sys; sys.exit(importlib.util.find_spec('vllm') is None)"
    return subprocess.run([python, "-c", probe], capture_output=True).returncode == 0


def find_vllm_python(configured: str | None = None) -> str | None:
    """The interpreter that runs the vLLM backend, or None when there is none.

    Order: $POSTTRAIN_VLLM_PYTHON (machine-specific, set by CI and install-vllm.sh users),
    then the recipe's `sample.vllm.python`, then this interpreter if vllm imports here. A
    named interpreter that does not exist or lacks vllm is an error, not a silent fallback.
    """
    for source, python in ((VLLM_PYTHON_ENV, os.environ.get(VLLM_PYTHON_ENV)),
                           ("sample.vllm.python", configured)):
        if python:
            if not (os.path.isfile(python) and os.access(python, os.X_OK)):
                raise GenerationError(f"{source}={python!r}: no such interpreter")
            if not _python_has_vllm(python):
                raise GenerationError(f"{source}={python!r}: vllm does not import there "
                                      "(build it with scripts/install-vllm.sh)")
            return python
    return sys.executable if importlib.util.find_spec("vllm") is not None else None


def resolve_backend(backend: str = "auto", vllm_python: str | None = None) -> tuple[str, str]:
    """(backend, interpreter) for a requested backend: 'auto' takes vLLM when it is found."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown generation backend {backend!r}; choose one of {BACKENDS}")
    if backend == "transformers":
        return "transformers", sys.executable
    python = find_vllm_python(vllm_python)
    if python is not None:
        return "vllm", python
    if backend == "vllm":
        raise GenerationError("backend 'vllm' requested but no interpreter with vllm was found: "
                              f"install it (scripts/install-vllm.sh) and set {VLLM_PYTHON_ENV}")
    return "transformers", sys.executable


def _child_env(backend: str, workdir: Path, gpus: list[str] | None) -> dict[str, str]:
    env = dict(os.environ)
    # The child finds this very posttrain source even in an environment that did not install it.
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    if backend == "vllm":
        env.setdefault("VLLM_CACHE_ROOT", str(workdir / "vllm-cache"))
        env.setdefault("VLLM_NO_USAGE_STATS", "1")
        env.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    if gpus is not None:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(gpus)  # the entries as given: indices, GPU- or MIG- UUIDs
    return env


def generate(model_dir: str | os.PathLike, prompt_ids: list[list[int]], settings: SamplingSettings, *,
             backend: str = "auto", options: EngineOptions | None = None, vllm_python: str | None = None,
             workdir: str | os.PathLike | None = None,
             on_prompts: Callable[[int], None] | None = None, cluster=None) -> list[Generation]:
    """K responses for each prompt (token ids, chat template already applied).

    Runs the backend in child processes (one per vLLM engine; one for transformers) and
    returns one Generation per prompt, in order (for a model in this process:
    `engines.TransformersGenerator`, `engines.generate_messages`). `workdir` holds the
    request/response files and vLLM's caches (a temporary folder inside it, removed after).
    `on_prompts(n)` is called now and then with the number of prompts done (for a bar).
    `cluster` (posttrain.cluster.ClusterSettings) runs the engines as Ray actors instead.
    """
    options = options or EngineOptions()
    if not prompt_ids:
        return []
    with tempfile.TemporaryDirectory(prefix="posttrain-gen-", dir=workdir) as tmp:
        job = Job(prompt_ids, settings, str(Path(tmp) / "result.json"))
        run_jobs(model_dir, [job], backend=backend, options=options, vllm_python=vllm_python, workdir=tmp,
                 on_prompts=on_prompts, cluster=cluster)
        return read_job_result(job.out)


def run_jobs(model_dir: str | os.PathLike, jobs: list[Job], *, backend: str = "auto",
             options: EngineOptions | None = None, vllm_python: str | None = None,
             workdir: str | os.PathLike, progress=None,
             on_prompts: Callable[[int], None] | None = None, cluster=None) -> str:
    """Run every job whose `out` is missing with one engine load (per vLLM engine), in child processes.

    Each result file is written atomically as soon as its job is done, so a killed run keeps
    the finished jobs. With several vLLM engines, engine e takes slice e of every job and
    writes `out.part{e}of{n}`; the parts are joined (and removed) once all are present; parts
    left by a killed run with the same engine count are reused. `progress(done)` is called
    with the number of finished jobs while the children run, `on_prompts(done)` with the
    number of prompts done (the transformers backend reports within a job, batch by batch,
    through `<out>.progress`; vLLM by finished job or part). Returns the backend used.

    With `cluster` (posttrain.cluster.ClusterSettings) the engines are Ray actors, possibly on
    other nodes, and this process writes the same result files as they report (cluster.py).
    """
    options = options or EngineOptions()
    if cluster is not None:
        from posttrain.cluster import run_jobs_on_ray

        Path(workdir).mkdir(parents=True, exist_ok=True)
        pending = [j for j in jobs if not Path(j.out).exists() and j.prompt_ids]
        return run_jobs_on_ray(model_dir, pending, backend=backend, options=options, settings=cluster,
                               progress=progress, on_prompts=on_prompts)
    backend, python = resolve_backend(backend, vllm_python)
    jobs = [j for j in jobs if not Path(j.out).exists() and j.prompt_ids]
    if not jobs:
        return backend
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    engines = options.engines if backend == "vllm" else 1
    engines = max(1, min(engines, max(len(j.prompt_ids) for j in jobs)))
    engine_gpus = _engine_gpus(engines, options.tensor_parallel_size)
    children = [_start_engine(python, backend, workdir, e,
                              _engine_request(backend, model_dir, options, jobs, e, engines),
                              engine_gpus[e] if engine_gpus else None)
                for e in range(engines)]
    _watch(children, jobs, engines, progress, on_prompts)
    _check_exits(children, backend)
    _finish_jobs(jobs, engines, backend)
    if progress is not None:
        progress(len(jobs))
    if on_prompts is not None:
        on_prompts(sum(len(j.prompt_ids) for j in jobs))
    return backend


def _engine_request(backend: str, model_dir, options: EngineOptions, jobs: list[Job], e: int, engines: int) -> dict:
    """What engine `e` of `engines` runs: slice e of every job (a job with fewer prompts than
    engines leaves the last engines out), written to the part file of that slice."""
    tasks = []
    for job in jobs:
        start, end = even_slices(len(job.prompt_ids), engines)[e] if e < len(job.prompt_ids) else (0, 0)
        if end > start:
            tasks.append({"prompt_ids": job.prompt_ids[start:end], "settings": job.settings.to_dict(),
                          "seed_offset": start, "out": part_path(job.out, e, engines)})
    return {"backend": backend, "model_dir": str(model_dir), "options": asdict(options), "tasks": tasks}


def _start_engine(python: str, backend: str, workdir: Path, e: int, request: dict, gpus: list[str] | None):
    """(process, request file, log file) of engine `e`: `python -m posttrain.generation REQUEST.json`."""
    req = workdir / f"request_{os.getpid()}_{e}.json"
    req.write_text(json.dumps(request))
    log = open(workdir / f"worker_{e}.log", "w+b")
    return start_engine(python, req, _child_env(backend, workdir, gpus), log), req, log


def _engine_parts(job: Job, engines: int) -> list[str]:
    """The part files of `job`'s slices (its `out` itself with one engine)."""
    return [part_path(job.out, e, engines) for e in range(engines) if e < len(job.prompt_ids)]


def _watch(children, jobs: list[Job], engines: int, progress, on_prompts) -> None:
    """Report progress every half second until every child has exited; kill the children left
    running when this is interrupted."""
    try:
        while any(proc.poll() is None for proc, _, _ in children):
            if progress is not None:
                progress(sum(all(Path(part).exists() for part in _engine_parts(j, engines)) for j in jobs))
            if on_prompts is not None:
                on_prompts(sum(_prompts_done(part, len(j.prompt_ids))
                               for j in jobs for part in _engine_parts(j, engines)))
            time.sleep(0.5)
    finally:
        for proc, _, _ in children:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def _check_exits(children, backend: str) -> None:
    """Remove the request files; raise GenerationError with the log tail of every child that failed."""
    failures = []
    for e, (proc, req, log) in enumerate(children):
        log.seek(0)
        tail = log.read().decode("utf-8", "replace")[-4000:]
        log.close()
        req.unlink(missing_ok=True)
        if proc.returncode != 0:
            failures.append(f"{backend} worker {e} (exit {proc.returncode}):\n{tail}")
    if failures:
        raise GenerationError("generation failed:\n" + "\n".join(failures))


def _finish_jobs(jobs: list[Job], engines: int, backend: str) -> None:
    """Join each job's parts into its result file and check it holds one result per prompt."""
    for job in jobs:
        if engines > 1:
            join_parts(job.out, _engine_parts(job, engines))
        if len(read_job_result(job.out)) != len(job.prompt_ids):
            raise GenerationError(f"{backend}: {job.out} does not hold one result per prompt")


def start_engine(python: str, request: Path, env: dict[str, str], log) -> subprocess.Popen:
    """Start one engine's child process on its request file (`run_engine` there), its output
    to `log`. The one place a child starts: a caller that must keep everything in one process
    (a test without time for a child's start-up) replaces this function."""
    return subprocess.Popen([python, "-m", "posttrain.generation", str(request)], env=env, stdout=log,
                            stderr=subprocess.STDOUT)


def _engine_gpus(engines: int, tensor_parallel_size: int) -> list[list[str]] | None:
    """Each engine's CUDA_VISIBLE_DEVICES entries; None (inherit) for one engine or no GPU."""
    if engines == 1:
        return None
    from posttrain import gpus

    try:
        return gpus.assign(gpus.visible_devices(), engines, tensor_parallel_size)
    except gpus.GPUAssignmentError as err:
        raise GenerationError(f"vllm: {err}") from None


def _prompts_done(out: str, n_prompts: int) -> int:
    """Prompts a running task has finished: all once its result exists, else what its
    `.progress` file says (the transformers backend writes it after each batch)."""
    if Path(out).exists():
        return n_prompts  # an engine's part holds fewer; the count is for a progress bar
    try:
        return int(Path(f"{out}.progress").read_text())
    except (OSError, ValueError):
        return 0


def _note_progress(out: str, done: int) -> None:
    tmp = Path(f"{out}.progress.tmp")
    tmp.write_text(str(done))
    os.replace(tmp, f"{out}.progress")


def run_engine(request: dict) -> None:
    """What an engine's child process does with its request (`start_engine`): load the engine
    once, run every task whose result file is missing, write each result atomically."""
    options = EngineOptions.from_dict(request["options"])
    tasks = [t for t in request["tasks"] if not Path(t["out"]).exists()]
    if not tasks:
        return
    if request["backend"] == "vllm":
        engine = VLLMEngine(request["model_dir"], options,
                            max_model_len=max(len(p) + t["settings"]["max_new_tokens"]
                                              for t in tasks for p in t["prompt_ids"]))
    else:
        engine = TransformersGenerator(request["model_dir"], options=options)
    for task in tasks:
        start = time.perf_counter()
        settings = SamplingSettings.from_dict(task["settings"])
        if request["backend"] == "vllm":
            gens = engine.generate(task["prompt_ids"], settings, seed_offset=task["seed_offset"])
        else:
            gens = engine.generate(task["prompt_ids"], settings,
                                   on_progress=lambda done, out=task["out"]: _note_progress(out, done))
        write_job_result(task["out"], gens, time.perf_counter() - start)
        Path(f"{task['out']}.progress").unlink(missing_ok=True)


if __name__ == "__main__":
    # vLLM's workers re-import the main module: nothing may run outside this guard.
    run_engine(json.loads(Path(sys.argv[1]).read_text()))

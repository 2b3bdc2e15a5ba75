"""lm-evaluation-harness as a benchmark backend (`eval.benchmarks: [{name: lm_eval, ...}]`).

lm-eval runs in a child process (`python -m posttrain.lmeval JOB.json`) through its Python API,
`lm_eval.simple_evaluate`, on a local checkpoint: `model="hf"` (or `"vllm"`) with
`pretrained` and `tokenizer` the checkpoint's folder, so the chat template is the one the
policy was trained with. The child's output (lm-eval's logging, its warnings, the git call
that fails outside a repository) goes to a log file that is copied into the run's log, never
to the terminal; the child keeps lm-eval's logging set-up and working directory out of the
orchestrator's process, and gives the model's memory back when it ends.

Tasks are found by a `TaskManager` over `include_path` (a folder of task YAMLs) and lm-eval's
own task folder. The child loads each task on its own, so a task whose dataset is neither
local nor downloadable (HF_HUB_OFFLINE=1) fails with its name. Relative `data_files` in a
local YAML are read relative to `include_path` (the child works in that folder).

What comes back is lm-eval's own: `results[task]["<metric>,<filter>"]` and its
`"<metric>_stderr,<filter>"`, parsed by `numbers_from_results` into `<task>/<metric>` and
`<task>/<metric>_stderr` (a filter other than `none` stays in the name:
`<task>/<metric>,<filter>`), with each task's document count, few-shot count and version, and
the settings (lm-eval's version, model arguments, seeds, chat template, system prompt).
"""

from __future__ import annotations

import functools
import importlib.util
import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from posttrain.benchmarks import Benchmark, BenchmarkError

log = logging.getLogger("posttrain")

INSTALL = ".venv/bin/python -m pip install -r requirements/lmeval.txt"
ERROR_MARK = "posttrain-lmeval-error: "
"""Starts the child's one-line error (the message a person reads) on its output."""
SKIP_KEYS = ("name", "alias", "sample_len", "samples")
"""Entries of lm-eval's per-task results that are not metrics."""


def require_lm_eval(python: str | None = None) -> None:
    """BenchmarkError (one line) when lm-eval does not import in `python` (default: this one)."""
    if python is None or os.path.abspath(python) == os.path.abspath(sys.executable):
        if importlib.util.find_spec("lm_eval") is None:
            raise BenchmarkError(f"eval.benchmarks: lm_eval needs the lm-eval package: {INSTALL}")
        return
    probe = "import importlib.util, sys; sys.exit(importlib.util.find_spec('lm_eval') is None)"
    if subprocess.run([python, "-c", probe], capture_output=True).returncode != 0:
        raise BenchmarkError(f"eval.benchmarks: lm_eval with backend vllm runs in {python}, where lm-eval does "
                             f"not import: install requirements/lmeval.txt there too")


def vllm_python(configured: str | None) -> str:
    """The interpreter the vllm backend runs in (posttrain.generation's choice); BenchmarkError
    when vllm imports nowhere."""
    from posttrain.generation import GenerationError, find_vllm_python

    try:
        python = find_vllm_python(configured)
    except GenerationError as e:
        raise BenchmarkError(f"eval.benchmarks: lm_eval backend vllm: {e}") from None
    if python is None:
        raise BenchmarkError("eval.benchmarks: lm_eval backend vllm: vllm does not import here and no vLLM "
                             "interpreter is set (scripts/install-vllm.sh, POSTTRAIN_VLLM_PYTHON); use backend hf")
    return python


def local_tasks(include_path: str) -> dict[str, Any]:
    """The tasks, groups and tags defined by the YAMLs under `include_path`, by name (lm-eval's
    own index of that folder alone: fast, and no dataset is read)."""
    from lm_eval.tasks import TaskManager

    return dict(TaskManager(include_path=include_path, include_defaults=False).task_index)


@functools.cache
def builtin_tasks() -> frozenset[str]:
    """lm-eval's own task, group and tag names (about 15k: a few seconds to index)."""
    from lm_eval.tasks import TaskManager

    return frozenset(TaskManager(include_defaults=True).all_tasks)


def check(spec: Benchmark, include_path: str | None, key: str, *, files: bool = True) -> list[str]:
    """What `posttrain validate` finds wrong with an lm_eval benchmark, without loading a model
    or a dataset: lm-eval missing, and (with `files`) a missing include_path or a task name
    that neither the folder nor lm-eval's own tasks define. Each problem is one line that
    starts with `key`."""
    try:
        require_lm_eval()
    except BenchmarkError as e:
        return [f"{key}: {str(e).removeprefix('eval.benchmarks: ')}"]
    if not files:
        return []
    if include_path is not None and not Path(include_path).is_dir():
        return [f"{key}.include_path: {include_path!r}: no such folder"]
    local = local_tasks(include_path) if include_path is not None else {}
    missing = [t for t in spec.tasks if t not in local]
    if not missing:
        return []
    unknown = [t for t in missing if t not in builtin_tasks()]
    if not unknown:
        return []
    where = (f"in {include_path} ({', '.join(sorted(local)) or 'no tasks there'}) or " if include_path else "")
    return [f"{key}.tasks: {t!r} is not a task {where}among lm-eval's own tasks" for t in unknown]


# ----------------------------------------------------------------------------- results


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def numbers_from_results(results: dict) -> dict[str, float | None]:
    """lm-eval's per-task metrics as `<task>/<metric>` and `<task>/<metric>_stderr` (None where
    lm-eval gives "N/A"), tasks in lm-eval's order, each metric followed by its stderr. A group's
    aggregate (`results["groups"]`, or a group's own row) counts as a task named by the group."""
    out: dict[str, float | None] = {}
    rows = {**results.get("results", {}), **results.get("groups", {})}
    for task, row in rows.items():
        metrics = [k for k in row if k not in SKIP_KEYS and "," in k and "_stderr," not in k]
        for k in metrics:
            metric, filt = k.split(",", 1)
            name = f"{task}/{metric}" + ("" if filt == "none" else f",{filt}")
            out[name] = _number(row[k])
            stderr = row.get(f"{metric}_stderr,{filt}")
            out[f"{task}/{metric}_stderr" + ("" if filt == "none" else f",{filt}")] = _number(stderr)
    return out


def task_facts(results: dict) -> dict[str, dict]:
    """Per task: documents evaluated (`n-samples` effective), few-shot count, version, and
    whether a higher number is better, per metric."""
    facts = {}
    for task in results.get("results", {}):
        facts[task] = {"documents": (results.get("n-samples", {}).get(task) or {}).get("effective"),
                       "num_fewshot": results.get("n-shot", {}).get(task),
                       "version": results.get("versions", {}).get(task),
                       "higher_is_better": results.get("higher_is_better", {}).get(task)}
    return facts


# ----------------------------------------------------------------------------- the parent side


def job_for(spec: Benchmark, model_dir: str, include_path: str | None, *, device: str, dtype: str,
            system_prompt: str | None, trust_remote_code: bool = False) -> dict:
    """The child's job: everything simple_evaluate is called with (and the record's settings)."""
    model_args: dict[str, Any] = {"pretrained": str(Path(model_dir).resolve()),
                                  "tokenizer": str(Path(model_dir).resolve()), "dtype": dtype}
    if trust_remote_code:
        model_args["trust_remote_code"] = True
    model_args.update(spec.model_args)
    return {"model": spec.backend, "model_args": model_args, "tasks": list(spec.tasks),
            "include_path": str(Path(include_path).resolve()) if include_path else None,
            "num_fewshot": spec.num_fewshot, "limit": spec.max_problems, "batch_size": spec.batch_size,
            "device": device if spec.backend == "hf" else None, "apply_chat_template": spec.apply_chat_template,
            "fewshot_as_multiturn": spec.apply_chat_template, "system_instruction": system_prompt,
            "gen_kwargs": spec.gen_kwargs}


def run_job(job: dict, out_dir: Path, name: str, python: str | None = None, samples_file: str | None = None) -> dict:
    """Run one job in a child process: lm-eval's results dict (written to `out_dir/<name>.results.json`,
    each sample with its metrics to `out_dir/<samples_file>`, default `<name>.samples.jsonl`).
    The child's output goes to `<name>.log` there and into the run's log; a failure raises
    BenchmarkError with the child's own message."""
    from posttrain.files import atomic_write_json

    out_dir.mkdir(parents=True, exist_ok=True)
    job = {**job, "results": str(out_dir / f"{name}.results.json"),
           "samples": str(out_dir / (samples_file or f"{name}.samples.jsonl"))}
    job_path = out_dir / f"{name}.job.json"
    atomic_write_json(job_path, job)
    Path(job["results"]).unlink(missing_ok=True)
    logfile = out_dir / f"{name}.log"
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parent.parent)  # this posttrain, in whatever Python runs the child
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    # bars that take tqdm's defaults stay off; lm-eval's own set `disable` themselves, so of
    # those only each line's last state (after its last carriage return) reaches the run's log
    env.setdefault("TQDM_DISABLE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    if env.get("HF_HUB_OFFLINE") == "1":
        env.setdefault("HF_DATASETS_OFFLINE", "1")
    with open(logfile, "wb") as f:
        code = subprocess.run([python or sys.executable, "-m", "posttrain.lmeval", str(job_path)],
                              stdout=f, stderr=subprocess.STDOUT, env=env).returncode
    # str.splitlines would split at every carriage return of a progress bar
    lines = [line.rsplit("\r", 1)[-1] for line in logfile.read_text(encoding="utf-8", errors="replace").split("\n")]
    for line in lines:
        if line.strip():
            log.debug("lm-eval %s: %s", name, line)
    if code != 0 or not Path(job["results"]).is_file():
        said = [line[len(ERROR_MARK):] for line in lines if line.startswith(ERROR_MARK)]
        if said:
            raise BenchmarkError(f"eval.benchmarks: lm_eval: {said[-1]}")
        tail = "\n".join(lines[-20:])
        raise BenchmarkError(f"eval.benchmarks: lm_eval failed (exit {code}; its output: {logfile}):\n{tail}")
    job_path.unlink(missing_ok=True)
    with open(job["results"], encoding="utf-8") as f:
        return json.load(f)


# ----------------------------------------------------------------------------- the child side


class _Refused(Exception):
    """A job the child cannot run; the message is for the person."""


def _load_tasks(manager, names: list[str], offline: bool) -> list:
    """Each named task, group or tag built on its own (its dataset read now), so a failure
    names the task."""
    from lm_eval.api.group import Group
    from lm_eval.api.task import Task

    built: list = []
    for name in names:
        if name not in manager.all_tasks:
            raise _Refused(f"task {name!r} is not a task of the include_path or of lm-eval")
        try:
            loaded = manager.load([name])
        except Exception as e:  # noqa: BLE001 - any failure to read a dataset is reported with the task's name
            why = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
            if offline:
                raise _Refused(f"task {name!r}: its dataset could not be read offline (HF_HUB_OFFLINE=1: "
                               f"nothing is downloaded; put it in the local datasets cache, or define the task "
                               f"over a local file in include_path): {why}") from e
            raise _Refused(f"task {name!r}: its dataset could not be read: {why}") from e
        obj = loaded["groups"].get(name) or loaded["tasks"].get(name)
        if isinstance(obj, (Task, Group)):
            built.append(obj)
        else:  # a tag: its tasks
            built.extend(loaded["tasks"].values())
    return built


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def is_task_folder(path: str | os.PathLike) -> bool:
    """Whether `path` is a folder of lm-eval task YAMLs (an `include_path`), not a `datasets`
    folder of prompt rows."""
    p = Path(path)
    return (p.is_dir() and not (p / "dataset_info.json").exists() and not (p / "dataset_dict.json").exists()
            and any(p.rglob("*.yaml")))


def folder_prompts(include_path: str, work: Path) -> list[str]:
    """The prompts of every task defined under `include_path`, as lm-eval renders them
    (`doc_to_text` of each evaluated document, no chat template): what decontamination checks
    training data against. Read by lm-eval in a child process (`work` holds its files)."""
    require_lm_eval()
    job = {"mode": "prompts", "include_path": str(Path(include_path).resolve())}
    prompts = run_job(job, work, "prompts")
    return [str(t) for t in prompts["prompts"]]


def _prompts_main(job: dict, manager) -> int:
    from posttrain.files import atomic_write_json

    names = [n for n in manager.all_subtasks]
    texts: list[str] = []
    for task in (t for obj in _load_tasks(manager, names, os.environ.get("HF_HUB_OFFLINE") == "1")
                 for t in ([obj] if not hasattr(obj, "get_all_tasks") else obj.get_all_tasks())):
        texts += [str(task.doc_to_text(doc)) for doc in task.eval_docs]
    atomic_write_json(job["results"], {"prompts": texts, "tasks": names})
    return 0


def child_main(job_path: str) -> int:
    with open(job_path, encoding="utf-8") as f:
        job = json.load(f)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if job["include_path"]:
        os.chdir(job["include_path"])  # relative data_files in a local YAML are read from here
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
    except ImportError as e:
        print(f"{ERROR_MARK}lm-eval does not import in {sys.executable} ({e}): {INSTALL}", flush=True)
        return 2
    if job.get("mode") == "prompts":
        try:
            return _prompts_main(job, TaskManager(include_path=job["include_path"], include_defaults=False))
        except _Refused as e:
            print(f"{ERROR_MARK}{e}", flush=True)
            return 2
    if job["model"] == "vllm" and importlib.util.find_spec("vllm") is None:
        print(f"{ERROR_MARK}backend vllm: vllm does not import in {sys.executable}", flush=True)
        return 2
    offline = os.environ.get("HF_HUB_OFFLINE") == "1"
    local = TaskManager(include_path=job["include_path"], include_defaults=False) if job["include_path"] else None
    # lm-eval's own ~15k tasks take seconds to index: only when a task is not a local one
    manager = (local if local is not None and all(t in local.all_tasks for t in job["tasks"])
               else TaskManager(include_path=job["include_path"]))
    try:
        tasks = _load_tasks(manager, job["tasks"], offline)
    except _Refused as e:
        print(f"{ERROR_MARK}{e}", flush=True)
        return 2
    results = lm_eval.simple_evaluate(
        model=job["model"], model_args=job["model_args"], tasks=tasks, num_fewshot=job["num_fewshot"],
        limit=job["limit"], batch_size=job["batch_size"], device=job["device"], task_manager=manager,
        apply_chat_template=job["apply_chat_template"], fewshot_as_multiturn=job["fewshot_as_multiturn"],
        system_instruction=job["system_instruction"], gen_kwargs=job["gen_kwargs"], log_samples=True)
    from importlib import metadata

    from posttrain.files import atomic_write_json, write_jsonl

    samples = results.pop("samples", {}) or {}
    rows = []
    for task, docs in samples.items():
        for s in docs:
            rows.append(_jsonable({"task": task, "doc_id": s.get("doc_id"), "target": s.get("target"),
                                   "arguments": s.get("arguments"), "filtered_resps": s.get("filtered_resps"),
                                   "filter": s.get("filter"),
                                   **{m: s.get(m) for m in s.get("metrics", [])}}))
    write_jsonl(job["samples"], rows)
    results["lm_eval_version"] = metadata.version("lm_eval")
    results["chat_template_used"] = job["apply_chat_template"]
    atomic_write_json(job["results"], _jsonable(results))
    return 0


if __name__ == "__main__":
    sys.exit(child_main(sys.argv[1]))

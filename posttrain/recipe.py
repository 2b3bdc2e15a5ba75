"""The recipe: one YAML file that says everything about a run, validated before any model loads.

A recipe has a base part and per-round `overrides`; `load_recipe(path).for_round(n)` gives
the recipe that round n runs with. Unknown keys are errors, and every error names the key
path and what was expected.
"""

from __future__ import annotations

import copy
import math
import os
import re
import stat
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from posttrain.benchmarks import Benchmark
from posttrain.reward.base import RewardSpec
from posttrain.schema import Count, Rounds, Samples, StrictModel, Tokens


class RecipeError(ValueError):
    """A recipe that cannot be used; the message names the file and the key path."""


# --------------------------------------------------------------------------- sections


class Models(StrictModel):
    """Where the models come from."""

    base: str
    """The pre-trained checkpoint: the reward model and (by default) every round's SFT start
    from it. A local folder, `world:base_model` for the embedded world, or a hub id."""
    initial_policy: str | None = None
    """The model round 1 samples from (default: `base`)."""
    trust_remote_code: bool = False
    """Allow model code shipped with a checkpoint to run. Off: only transformers' own code runs."""


class PreferenceBatch(StrictModel):
    """One batch of human (or simulated) preference annotations."""

    path: str
    """File (JSONL, Parquet) or `datasets` folder in TRL's preference format."""
    round: Rounds
    """The round in which this batch becomes available (the paper annotates each round's models)."""


class PromptSet(StrictModel):
    """Prompts for rejection sampling or evaluation."""

    path: str
    """File or folder of prompt rows (`prompt` as text or messages; optional `id`, `capability`, `system`)."""
    capability: str | None = None
    """Capability of every prompt in the set (overrides the rows' own `capability`)."""


class DataSources(StrictModel):
    """The data each stage reads."""

    preference_batches: list[PreferenceBatch] = Field(default_factory=list)
    """Preference batches by round. `rm` trains on every batch up to the round (cumulative),
    `dpo` on the latest round's batch by default."""
    heldout_preferences: list[str] = Field(default_factory=list)
    """Preference files never trained on: the reward model's held-out accuracy."""
    sft: list[str] = Field(default_factory=list)
    """Human or synthetic SFT data (messages or prompt/completion rows) used every round."""
    prompts: list[PromptSet] = Field(default_factory=list)
    """Prompts for rejection sampling."""
    eval_prompts: list[PromptSet] = Field(default_factory=list)
    """Held-out prompts for evaluation after each round."""


class ChatSettings(StrictModel):
    """Chat format."""

    formatting_tokens: list[str] | None = None
    """Token strings masked out of the DPO log-probabilities (default: derived from the
    tokenizer and its chat template: header tokens, role names, termination tokens, BOS)."""


class Capability(StrictModel):
    """Settings of one capability (prompts tagged with its name)."""

    system_prompt: str | None = None
    """System prompt added to this capability's prompts during sampling (the paper steers
    tone, format and verbosity this way in later rounds)."""
    k: Samples | None = None
    """Samples per prompt (default: sample.k)."""
    temperature: float | None = Field(None, ge=0)
    """Sampling temperature (default: sample.temperature)."""
    top_p: float | None = Field(None, gt=0, le=1)
    """Nucleus sampling (default: sample.top_p)."""
    max_new_tokens: Tokens | None = None
    """Longest response (default: sample.max_new_tokens)."""
    sample: bool = True
    """Run rejection sampling for this capability (the paper saw no gain for tool use)."""


class RunSettings(StrictModel):
    """How the run executes."""

    device: str = "auto"
    """`auto` (CUDA when present), `cpu` or `cuda`."""
    report_to: list[Literal["tensorboard", "wandb"]] = Field(default_factory=list)
    """Where training metrics also go (besides the run folder's records and log)."""
    launcher: list[str] | None = None
    """Command prefix that starts rm, sft and dpo on several processes: `[accelerate, launch,
    --config_file, configs/accelerate/fsdp2.yaml]` (or multi_gpu.yaml, zero3.yaml; a relative
    config path is looked up beside the recipe, then in the current folder) or `[torchrun,
    --nproc_per_node, 8]`. Run with posttrain's own Python; part of the stage's inputs (a
    change refuses like any other); settings that would start fewer processes than asked are
    refused. `batch_size` is per process. Several nodes: the launcher's own options (torchrun
    `--nnodes 2 --node_rank ${NODE_RANK} --master_addr H`, accelerate `--num_machines` /
    `--machine_rank` / `--main_process_ip`); `${VAR}` words are expanded from each node's
    environment, the same command runs on every node, node 0 writes the run folder (which must
    be shared; see the README's 'Several nodes'). Default: the current Python, one process."""
    keep_checkpoints: bool = False
    """Keep each training stage's `work` folder (trainer checkpoints with optimizer state,
    variant models before averaging) after the stage's record is written. Off: it is deleted
    then (about 12 bytes per parameter per variant: 100 GB per variant at 8B)."""


class EvalSettings(StrictModel):
    """Evaluation after each round (held-out prompts)."""

    enabled: bool = True
    """Evaluate the round's final model after the round."""
    samples_per_prompt: Samples = 1
    """Responses per held-out prompt."""
    temperature: float = Field(0.0, ge=0)
    """0 is greedy decoding."""
    max_new_tokens: Tokens = 256
    """Longest response."""
    max_prompts: Count | None = None
    """Evaluate on at most this many held-out prompts (the first ones)."""
    checker: RewardSpec | None = None
    """A programmatic checker giving the task score (e.g. unit tests, answer match)."""
    backend: Literal["auto", "vllm", "transformers"] = "auto"
    """Generation backend."""
    variants: bool = False
    """Also evaluate each of the round's DPO variants, so the averaged model can be compared
    with every model it averages (`variants` in the eval metrics; with two or more variants)."""
    benchmarks: list[Benchmark] = Field(default_factory=list)
    """Standard benchmarks run on each round's final model and, in round 1, the initial
    policy (posttrain.benchmarks): e.g. `[{name: humaneval, n: 1}, {name: ifbench, mode:
    both}, {name: ifeval_file, path: my_ifeval.jsonl}]`. Empty: none."""


class Decontamination(StrictModel):
    """Training data checked against the eval prompts by n-gram overlap (posttrain.decontam).
    Written as a section or as the mode alone (`decontaminate: drop`)."""

    mode: Literal["off", "warn", "drop"] = "off"
    """`warn`: count contaminated rows per source file (stage metrics, report) and train on
    them; `drop`: remove them too; `off` (default): no check, and the eval prompt files are
    no input of the training stages."""
    n: int = Field(8, ge=1)
    """Words per n-gram (the Llama 3 report's 8); shorter texts are compared whole."""


# --------------------------------------------------------------------------- the recipe


def _stage_configs():
    # Imported here so each stage owns its config (next to its trainer, as TRL does).
    from posttrain.stages.average import AverageConfig
    from posttrain.stages.curate import CurateConfig
    from posttrain.stages.dpo import DPOStageConfig
    from posttrain.stages.rm import RMConfig
    from posttrain.stages.sample import SampleConfig
    from posttrain.stages.sft import SFTStageConfig

    from posttrain.stages.annotate import AnnotateConfig

    return RMConfig, SampleConfig, CurateConfig, SFTStageConfig, DPOStageConfig, AverageConfig, AnnotateConfig


RMConfig, SampleConfig, CurateConfig, SFTStageConfig, DPOStageConfig, AverageConfig, AnnotateConfig = _stage_configs()


class Recipe(StrictModel):
    """A posttrain recipe. Top-level keys are the sections below."""

    name: str
    """Short name of the recipe."""
    description: str = ""
    """What the recipe is for."""
    rounds: Rounds = 6
    """Rounds `posttrain run` runs by default (the paper: six)."""
    seed: int = 0
    """Seed of everything (variants add their index)."""
    models: Models
    """Model paths."""
    data: DataSources = DataSources()
    """Data sources."""
    chat: ChatSettings = ChatSettings()
    """Chat format."""
    reward: Literal["rm"] | RewardSpec = "rm"
    """Reward for rejection sampling and evaluation: `rm` (the round's trained reward model)
    or an import path. Inside its kwargs the string "@rm" stands for the round's reward model,
    e.g. a checker with the RM as tie-break: `{target: posttrain.reward:WeightedReward, kwargs:
    {components: [[{target: posttrain.reward.math:MathAnswerReward}, 1.0], ["@rm", 0.01]]}}`."""
    capabilities: dict[str, Capability] = Field(default_factory=dict)
    """Per-capability sampling settings, keyed by the prompts' `capability` tag."""
    run: RunSettings = RunSettings()
    """Execution settings."""
    rm: RMConfig = RMConfig()
    """Stage 1: reward model."""
    sample: SampleConfig = SampleConfig()
    """Stage 2: rejection sampling."""
    curate: CurateConfig = CurateConfig()
    """Data quality control between sample and sft (report 4.2.3); off unless enabled."""
    sft: SFTStageConfig = SFTStageConfig()
    """Stage 3: supervised fine-tuning."""
    dpo: DPOStageConfig = DPOStageConfig()
    """Stage 4: direct preference optimisation."""
    average: AverageConfig = AverageConfig()
    """Stage 5: averaging the DPO variants into the round's model."""
    eval: EvalSettings = EvalSettings()
    """Evaluation after each round."""
    decontaminate: Decontamination = Decontamination()
    """Check every round's training data (sft rows, rm/dpo preferences, sampling prompts)
    against `data.eval_prompts` by n-gram overlap: `off`, `warn` or `drop`."""
    annotate: AnnotateConfig | None = None
    """After the round's model: the next round's preference batch, from the latest models
    (posttrain.stages.annotate). None: no annotate step (the recipe's fixed batches only)."""
    overrides: dict[str, dict[str, Any]] = Field(default_factory=dict)
    """Per-round changes: keys are a round (`"3"`), a range (`"2-4"`) or an open range
    (`"4-"`); values are recipe sections, merged over the base for those rounds. Where
    several cover a round, the narrower range is applied last and wins."""

    @field_validator("decontaminate", mode="before")
    @classmethod
    def _mode_alone(cls, v: Any) -> Any:
        return {"mode": v} if isinstance(v, str) else v

    @field_validator("overrides")
    @classmethod
    def _round_keys(cls, v: dict[str, dict]) -> dict[str, dict]:
        for key, value in v.items():
            if _round_range(key) is None:
                raise ValueError(f"key {key!r}: expected a round like '3', '2-4' or '4-'")
            if "overrides" in value:
                raise ValueError(f"key {key!r}: overrides cannot nest")
        return v

    @model_validator(mode="after")
    def _override_rounds_exist(self) -> "Recipe":
        for key in self.overrides:
            lo, hi = _round_range(key)
            if hi is not None and hi < lo:
                raise ValueError(f"overrides.{key}: the range ends before it starts")
            if lo > self.rounds:
                raise ValueError(f"overrides.{key}: round {lo} is past the recipe's last round ({self.rounds}), "
                                 "so it would apply to nothing")
        return self

    @model_validator(mode="after")
    def _benchmark_capabilities(self) -> "Recipe":
        for i, bench in enumerate(self.eval.benchmarks):
            if bench.capability is not None and bench.capability not in self.capabilities:
                raise ValueError(f"eval.benchmarks[{i}].capability: {bench.capability!r} is not in capabilities "
                                 f"({', '.join(sorted(self.capabilities)) or 'none defined'})")
        return self

    @model_validator(mode="after")
    def _batches_per_round(self) -> "Recipe":
        for cap in (p.capability for p in self.data.prompts if p.capability):
            if self.capabilities and cap not in self.capabilities:
                raise ValueError(
                    f"data.prompts names capability {cap!r}, which is not in capabilities "
                    f"({', '.join(sorted(self.capabilities))})"
                )
        return self


def _round_range(key: str) -> tuple[int, int | None] | None:
    m = re.fullmatch(r"\s*(\d+)\s*(?:(-)\s*(\d+)?)?\s*", str(key))
    if not m:
        return None
    lo = int(m.group(1))
    if m.group(2) is None:
        return lo, lo
    return lo, int(m.group(3)) if m.group(3) else None


def _deep_merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def _format_validation_error(err: ValidationError, source: str, prefix: str = "") -> str:
    lines = [f"{source}: invalid recipe"]
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"])
        path = ".".join(x for x in (prefix, loc) if x)
        kind = e["type"]
        if kind == "extra_forbidden":
            msg = "unknown key (not part of the recipe schema)"
        elif kind == "missing":
            msg = "required key is missing"
        else:
            got = e.get("input")
            shown = "" if isinstance(got, dict) else f" (got {_short(got)})"
            msg = f"{e['msg']}{shown}"
        lines.append(f"  {path or '<top>'}: {msg}")
    return "\n".join(lines)


class LoadedRecipe:
    """A validated recipe file: the raw mapping, its folder, and per-round resolution."""

    def __init__(self, raw: dict, path: Path):
        self.raw = raw
        self.path = path
        self.base = self._validate(raw, prefix="")
        # Validate every override against the schema now, not when its round comes.
        for key in self.base.overrides:
            lo, hi = _round_range(key)
            self.for_round(lo)
            if hi is not None:
                self.for_round(hi)

    def _validate(self, raw: dict, prefix: str) -> Recipe:
        try:
            return Recipe.model_validate(raw)
        except ValidationError as err:
            raise RecipeError(_format_validation_error(err, str(self.path), prefix)) from None

    def for_round(self, n: int) -> Recipe:
        """The recipe round `n` runs with: the base with every override that covers `n`."""
        if isinstance(n, bool) or not isinstance(n, int):
            raise RecipeError(f"{self.path}: a round is a whole number, got {n!r}")
        if n < 1:
            raise RecipeError(f"{self.path}: rounds start at 1, got {n}")
        if n > self.base.rounds:
            raise RecipeError(f"{self.path}: round {n} is past the recipe's last round (rounds: {self.base.rounds})")
        merged = {k: v for k, v in self.raw.items() if k != "overrides"}
        applied = []
        # Narrower ranges apply last, so "5" beats "5-" and "2-6" for round 5.
        def width(kv):
            lo, hi = _round_range(kv[0])
            return (-(hi - lo) if hi is not None else -math.inf, lo)

        for key, over in sorted(self.base.overrides.items(), key=width):
            lo, hi = _round_range(key)
            if lo <= n and (hi is None or n <= hi):
                merged = _deep_merge(merged, over)
                applied.append(key)
        try:
            recipe = Recipe.model_validate(merged)
        except ValidationError as err:
            which = ", ".join(f"overrides.{k}" for k in applied) or "the base recipe"
            raise RecipeError(_format_validation_error(err, f"{self.path} (round {n}, with {which})")) from None
        return recipe

    def distinct_rounds(self) -> list[int]:
        """One round for each distinct set of overrides that applies: rounds with the same set
        run with the same recipe, so checking these checks every round (in time that grows
        with the overrides, not with `rounds`)."""
        starts = {1}
        for key in self.base.overrides:
            lo, hi = _round_range(key)
            starts.add(lo)
            if hi is not None:
                starts.add(hi + 1)
        return sorted(n for n in starts if n <= self.base.rounds)

    def check(self, *, files: bool = True, reward_given: bool = False) -> None:
        """What `posttrain validate` checks beyond the schema, for every round, without
        loading a model or calling anything: each reward/checker target imports and is a reward
        (`posttrain.reward.check_reward_spec`), `run.launcher` plans as a stage's launch does
        (posttrain.launch.plan_launch: the same refusals, e.g. FSDP2/ZeRO-3 without GPUs, a
        multi-node launcher without a node rank), and (with `files`) each data file exists and
        is a regular file or a folder. `reward_given`: the caller ranks with its own reward (the
        Python API's `reward=`), so the recipe's `reward` key needs no reward model. Raises
        RecipeError listing every problem by recipe key."""
        from posttrain.reward.base import RewardError, check_reward_spec
        from posttrain.stage import steps

        problems: dict[str, str] = {}
        for n in self.distinct_rounds():
            recipe = self.for_round(n)
            specs = [("reward", recipe.reward), ("eval.checker", recipe.eval.checker)]
            for key, spec in specs:
                if isinstance(spec, RewardSpec):
                    try:
                        check_reward_spec(spec, key)
                    except RewardError as e:
                        problems.setdefault(key + spec.target, f"{e} (round {n})" if self.base.overrides else str(e))
            from posttrain.stages.rm import has_preference_data, rm_users

            users = [u for u in rm_users(recipe) if not (reward_given and u.startswith("reward"))]
            # with the data checks: `--skip-files` and run-round's early check skip it (rm then stops at its data)
            if files and "rm" in steps() and users and not has_preference_data(recipe):
                problems.setdefault("rm-data", f"{', '.join(users)} use(s) the round's reward model, but the "
                                    "recipe has no preference data to train it on (data.preference_batches is empty "
                                    "and there is no annotate step): add preference batches, or rank with a checker "
                                    "alone (a reward without \"@rm\") so the round runs without an rm stage")
            if recipe.annotate is not None:
                from posttrain.annotate.base import AnnotatorError, check_annotator_spec

                try:
                    check_annotator_spec(recipe.annotate.annotator, "annotate.annotator")
                except AnnotatorError as e:
                    problems.setdefault("annotate.annotator" + recipe.annotate.annotator.target, str(e))
            if recipe.run.launcher:  # the launch's own refusals (posttrain.launch), before any stage starts
                from posttrain.launch import LaunchError, plan_launch

                try:
                    # strict=False: a ${NODE_RANK} word is set on the nodes, not necessarily here
                    plan_launch(recipe.run.launcher, base_dir=self.path.parent, strict=False)
                except LaunchError as e:
                    problems.setdefault("run.launcher", f"{e} (round {n})" if self.base.overrides else str(e))
            for i, bench in enumerate(recipe.eval.benchmarks):
                if bench.name == "lm_eval":  # lm-eval installed, its task names known: now, not after a round
                    from posttrain import lmeval

                    folder = self.resolve_path(bench.include_path) if bench.include_path is not None else None
                    found = lmeval.check(bench, folder, f"eval.benchmarks[{i}]", files=files)
                    if bench.backend == "vllm":
                        try:
                            lmeval.vllm_python(recipe.sample.vllm.python)
                        except lmeval.BenchmarkError as e:
                            found.append(f"eval.benchmarks[{i}].backend: {str(e).removeprefix('eval.benchmarks: ')}")
                    for problem in found:
                        problems.setdefault(problem, problem)
            if recipe.sample.cluster is not None:  # found now, not after the rm stage trained
                from posttrain.cluster import ClusterError, require_ray

                try:
                    require_ray()
                except ClusterError as e:
                    problems.setdefault("sample.cluster", f"sample.cluster: {e}")
            if not files:
                continue
            models = recipe.models
            for key, value in (("models.base", models.base), ("models.initial_policy", models.initial_policy)):
                if value is None:
                    continue
                why, config = self._model_problem(value)
                if why:
                    problems.setdefault(key + value, f"{key}: {value!r}: {why}")
                elif config is not None:
                    for length_key, length, limit in _lengths_past_positions(recipe, config):
                        problems.setdefault(length_key + value, f"{length_key}: {length} tokens, more than {key}'s "
                                            f"max_position_embeddings ({limit}, from {config})")
            for key, value in _data_paths(recipe):
                why = self._missing(value)
                if why:
                    problems.setdefault(key + value, f"{key}: {value!r}: {why}")
        if problems:
            raise RecipeError(f"{self.path}: " + ("\n  ".join([""] + list(problems.values())) if len(problems) > 1
                                                 else next(iter(problems.values()))))

    def warnings(self) -> list[str]:
        """What `posttrain validate` reports without failing, for every round: each reward or
        checker (nested ones too) whose target class has `prompt_warnings(prompts)` (the
        instruction reward: the instructions that abstain on this machine) gives its lines for
        the recipe's prompt files, each prefixed by the file's recipe key."""
        from posttrain.data import DataError, DataErrors, load_prompts
        from posttrain.reward.base import nested_reward_specs, resolve_reward_target

        lines: dict[str, None] = {}  # ordered and without repeats across rounds
        loaded: dict[str, Any] = {}
        for n in range(1, self.base.rounds + 1):
            recipe = self.for_round(n)
            targets = {t for spec in (recipe.reward, recipe.eval.checker) if isinstance(spec, RewardSpec)
                       for t in [spec.target] + [s["target"] for _, s in nested_reward_specs(spec.kwargs, "")]}
            hooks = [getattr(resolve_reward_target(t), "prompt_warnings", None) for t in sorted(targets)]
            hooks = [h for h in hooks if callable(h)]
            if not hooks:
                continue
            sets = [(f"data.prompts[{i}].path", p.path) for i, p in enumerate(recipe.data.prompts)]
            sets += [(f"data.eval_prompts[{i}].path", p.path) for i, p in enumerate(recipe.data.eval_prompts)]
            for key, value in sets:
                path = self.resolve_path(value)
                if path not in loaded:
                    try:
                        loaded[path] = load_prompts(path)
                    except DataError as e:
                        first = e.errors[0] if isinstance(e, DataErrors) else e
                        loaded[path] = (f"{key}: the file has problems; `posttrain validate-data {path} --kind "
                                        f"prompts` lists them (first: {str(first)[:200]})")
                if isinstance(loaded[path], str):
                    lines[loaded[path]] = None
                    continue
                for hook in hooks:
                    lines.update((f"{key}: {line}", None) for line in hook(loaded[path]))
        return list(lines)

    def _missing(self, value: str) -> str | None:
        """Why a data path from the recipe cannot be read, or None."""
        if value.startswith("world:") or value.startswith("world@"):
            return _unknown_world_name(value)
        resolved = Path(self.resolve_path(value))
        try:
            st = os.stat(resolved)
        except OSError as e:
            return f"no such file ({resolved})" if isinstance(e, FileNotFoundError) else f"{e.strerror} ({resolved})"
        if not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):
            return f"not a regular file or folder ({resolved})"
        return None

    def _model_problem(self, value: str) -> tuple[str | None, Path | None]:
        """(why a model path from the recipe cannot be used, or None; its config.json when it
        is readable here), without loading anything or reaching the network."""
        if value.startswith("world:") or value.startswith("world@"):
            why = _unknown_world_name(value)
            return why, None if why else _world_config(value)
        resolved = self.resolve_path(value)
        if resolved == value and not Path(os.path.expanduser(value)).is_absolute():
            return _hub_model_problem(value)
        folder = Path(resolved)
        if not folder.is_dir():
            hint = " (a hub id is written owner/name)" if "/" not in value else ""
            return (f"no such model folder ({folder}){hint}" if not folder.exists()
                    else f"not a folder ({folder}): a checkpoint is a folder with config.json"), None
        config = folder / "config.json"
        if not config.is_file() and not (folder / "adapter_config.json").is_file():
            return f"{folder} has no config.json: not a model checkpoint", None
        return None, config if config.is_file() else None

    def resolve_path(self, value: str) -> str:
        """A data or model path from the recipe: `world:` names, absolute paths, paths
        relative to the recipe's folder, or (models only) a hub id passed through."""
        if value.startswith("world:") or value.startswith("world@"):
            from posttrain.world.build import resolve_world_path

            return str(resolve_world_path(value))
        p = Path(os.path.expanduser(value))
        if p.is_absolute():
            return str(p)
        beside = (self.path.parent / p).resolve()
        if beside.exists() or not re.fullmatch(r"[\w.-]+/[\w.-]+", value):
            return str(beside)
        return value  # a hub id such as meta-llama/Llama-3.1-8B


def _data_paths(recipe: Recipe) -> list[tuple[str, str]]:
    """(recipe key, path) of every data file a round reads."""
    d = recipe.data
    return ([(f"data.preference_batches[{i}].path", b.path) for i, b in enumerate(d.preference_batches)]
            + [(f"data.heldout_preferences[{i}]", p) for i, p in enumerate(d.heldout_preferences)]
            + [(f"data.sft[{i}]", p) for i, p in enumerate(d.sft)]
            + [(f"data.prompts[{i}].path", p.path) for i, p in enumerate(d.prompts)]
            + [(f"data.eval_prompts[{i}].path", p.path) for i, p in enumerate(d.eval_prompts)]
            + [(f"annotate.prompts[{i}]", p) for i, p in enumerate(recipe.annotate.prompts if recipe.annotate else [])])


def _hub_model_problem(repo_id: str) -> tuple[str | None, Path | None]:
    """A hub id: well formed, and (offline) in the local cache. Online, whether it exists is
    only known when the stage downloads it."""
    from huggingface_hub import constants, try_to_load_from_cache
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        return f"neither a local folder nor a well-formed hub id: {e}", None
    cached = try_to_load_from_cache(repo_id, "config.json")
    if isinstance(cached, str):
        return None, Path(cached)
    if constants.HF_HUB_OFFLINE:
        return ("not a local folder, and a hub id that is not in the local cache "
                f"({constants.HF_HUB_CACHE}); this machine is offline (HF_HUB_OFFLINE=1), so nothing can "
                "be downloaded: download it where the hub is reachable, or name a local folder"), None
    return None, None


def _world_config(value: str) -> Path | None:
    """The config.json of a `world:` model when the world is already built (never builds it)."""
    from posttrain.world.build import world_dir

    head, _, name = value.partition(":")
    seed = int(head[len("world@"):]) if head.startswith("world@") else 0
    config = world_dir(seed=seed) / name.strip().strip("/") / "config.json"
    return config if config.is_file() else None


POSITION_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")
"""Where a transformers config says its longest sequence (the first one present counts)."""


def max_positions(config: Path) -> int | None:
    """The longest sequence a model's config.json allows (its text model's, for a
    multimodal one), or None when it says none or is unreadable."""
    import json

    try:
        data = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    for section in (data, data.get("text_config") if isinstance(data, dict) else None):
        if isinstance(section, dict):
            for key in POSITION_KEYS:
                value = section.get(key)
                if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                    return value
    return None


def _lengths_past_positions(recipe: Recipe, config: Path) -> list[tuple[str, int, int]]:
    """(recipe key, tokens, limit) of every sequence length the recipe asks for that is longer
    than the model can place (prompt + response where a stage bounds both)."""
    limit = max_positions(config)
    if limit is None:
        return []
    s, a = recipe.sample, recipe.annotate
    lengths = [("rm.max_length", recipe.rm.max_length), ("sft.max_length", recipe.sft.max_length),
               ("dpo.max_length", recipe.dpo.max_length),
               ("sample.max_prompt_length + sample.max_new_tokens", s.max_prompt_length + s.max_new_tokens),
               ("eval.max_new_tokens", recipe.eval.max_new_tokens)]
    lengths += [(f"sample.max_prompt_length + capabilities.{name}.max_new_tokens",
                 s.max_prompt_length + c.max_new_tokens)
                for name, c in recipe.capabilities.items() if c.max_new_tokens is not None]
    if a is not None:
        lengths += [(f"annotate.max_prompt_length + annotate.sampling[{i}].max_new_tokens",
                     a.max_prompt_length + setup.max_new_tokens) for i, setup in enumerate(a.sampling)
                    if i == 0 or setup is not a.sampling[0]]  # one setup given is used for both models
    return [(key, n, limit) for key, n in lengths if n > limit]


def _unknown_world_name(value: str) -> str | None:
    """Why a `world:` path names nothing in the embedded world (checked without building it)."""
    from posttrain.world.build import WORLD_NAMES, World

    head, _, name = value.partition(":")
    if head != "world" and not re.fullmatch(r"world@\d+", head):
        return "expected 'world:<name>' or 'world@<seed>:<name>'"
    name = name.strip().strip("/")
    layout = World.at("/world", 99)
    known = {"base_model", "world.json"} | {
        str(getattr(layout, f).relative_to(layout.root)) for f in WORLD_NAMES if f != "root"} | {
        str(p.relative_to(layout.root)) for p in layout.preference_rounds}
    if name in WORLD_NAMES or name in known:
        return None
    return ("not in the embedded world (known: " + ", ".join(sorted(set(WORLD_NAMES) - {"root"}))
            + ", sft_seed.jsonl, prompts/train.jsonl, prompts/heldout.jsonl, preferences/round_NN.jsonl, "
            "preferences/heldout.jsonl)")


def find_recipe(name_or_path: str | os.PathLike) -> Path:
    """A recipe file by path, or by name among the recipes shipped with posttrain."""
    p = Path(name_or_path)
    if p.exists():
        return p.resolve()
    name = p.name if p.suffix in (".yaml", ".yml") else f"{p.name}.yaml"
    candidates = [Path(__file__).resolve().parent.parent / "recipes" / name]
    try:
        candidates.append(Path(str(resources.files("posttrain.recipes").joinpath(name))))
    except (ModuleNotFoundError, TypeError):
        pass
    for c in candidates:
        if c.exists():
            return c
    raise RecipeError(f"no recipe file {str(name_or_path)!r}, and no shipped recipe named {p.stem!r} "
                      f"(shipped: {', '.join(shipped_recipes())})")


def shipped_recipes() -> list[str]:
    folder = Path(__file__).resolve().parent.parent / "recipes"
    if not folder.is_dir():
        try:
            folder = Path(str(resources.files("posttrain.recipes")))
        except ModuleNotFoundError:
            return []
    return sorted(p.stem for p in folder.glob("*.yaml"))


MAX_RECIPE_BYTES = 1 << 20
"""A recipe is a page of settings; anything larger is a mistake (or an attack)."""
MAX_RECIPE_VALUES = 100_000
"""Values in the loaded recipe, counting every YAML alias expansion (an alias bomb is small
as text and huge once expanded)."""
MAX_RECIPE_DEPTH = 32


def _short(value: Any, limit: int = 200) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} characters)"


def _check_expanded_size(raw: Any, path: Path) -> None:
    """Refuse a loaded recipe whose values, with aliases expanded, exceed the bounds."""
    count, stack = 0, [(raw, 0)]
    while stack:
        value, depth = stack.pop()
        count += 1
        if count > MAX_RECIPE_VALUES:
            raise RecipeError(f"{path}: more than {MAX_RECIPE_VALUES} values once YAML aliases are expanded "
                              "(an alias bomb?)")
        if depth > MAX_RECIPE_DEPTH:
            raise RecipeError(f"{path}: nested deeper than {MAX_RECIPE_DEPTH} levels")
        if isinstance(value, dict):
            stack.extend((v, depth + 1) for kv in value.items() for v in kv)
        elif isinstance(value, list):
            stack.extend((v, depth + 1) for v in value)


def read_recipe_text(path: Path) -> str:
    """The recipe file's text: a regular file (not a folder, FIFO or device) of at most
    MAX_RECIPE_BYTES, in UTF-8."""
    try:
        st = os.stat(path)
    except OSError as e:
        raise RecipeError(f"{path}: cannot read the recipe: {e.strerror}") from None
    if stat.S_ISDIR(st.st_mode):
        raise RecipeError(f"{path}: is a folder, not a recipe file")
    if not stat.S_ISREG(st.st_mode):
        raise RecipeError(f"{path}: not a regular file (a FIFO or device cannot be a recipe)")
    if st.st_size > MAX_RECIPE_BYTES:
        raise RecipeError(f"{path}: {st.st_size} bytes; a recipe may have at most {MAX_RECIPE_BYTES}")
    # O_NONBLOCK: if the path was swapped for a FIFO since the stat, the open does not hang.
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            raise RecipeError(f"{path}: not a regular file")
        data = f.read(MAX_RECIPE_BYTES + 1)
    if len(data) > MAX_RECIPE_BYTES:
        raise RecipeError(f"{path}: more than {MAX_RECIPE_BYTES} bytes; a recipe may have at most that")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise RecipeError(f"{path}: not UTF-8 text (byte {e.start})") from None


def load_recipe(name_or_path: str | os.PathLike) -> LoadedRecipe:
    path = find_recipe(name_or_path)
    text = read_recipe_text(path)
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise RecipeError(f"{path}: not valid YAML: {_short(str(err), 500)}") from None
    except RecursionError:
        raise RecipeError(f"{path}: nested too deep to read") from None
    if not isinstance(raw, dict):
        raise RecipeError(f"{path}: a recipe is a mapping of sections, got {type(raw).__name__}")
    _check_expanded_size(raw, path)
    return LoadedRecipe(raw, path)


def dump_recipe(recipe: Recipe) -> str:
    data = recipe.model_dump(mode="json", exclude={"overrides"})
    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True)

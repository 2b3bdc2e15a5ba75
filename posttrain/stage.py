"""The contract between the round orchestrator and the stages, and the stage registry.

A stage is a module with `run(ctx: StageContext) -> StageResult` and a `STAGE = StageDef(...)`
that says everything the orchestrator needs to know about it: its typed inputs and how they
are resolved from the recipe and earlier records, where it runs, which outputs are models,
its typed metrics (a `Metrics` dataclass), its headline, its line of the status legend and its
row of the report's data table. The orchestrator (posttrain.rounds.orchestrator), `posttrain
status` (posttrain.api) and the report (posttrain.report) only walk `REGISTRY`: adding a stage
means writing its module in `posttrain/stages/` and adding its name here.

The orchestrator resolves every input from earlier records (never by guessing paths),
hashes them, runs the stage, and writes the stage's record last. The stage writes only under
`ctx.out_dir`, atomically, and may continue from whatever complete work it finds there.
"""

from __future__ import annotations

import dataclasses
import importlib
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

REGISTRY: tuple[str, ...] = ("rm", "sample", "curate", "sft", "dpo", "average", "eval", "annotate")
"""The round, in order. Each name is a module of `posttrain.stages` that defines `STAGE` and
`run`; a stage whose `enabled(recipe)` is false (curate, annotate by default) is skipped."""
STEPS = REGISTRY
"""Every step of a round, in the order it runs (the columns of `posttrain status`)."""


WAITING_FILE = "waiting.json"


class RoundError(RuntimeError):
    """A round cannot run (an earlier round is unfinished, a stage failed, ...). Here, below the
    stages and the orchestrator, because a stage raises it too (an input not ready)."""


class StageWaiting(Exception):
    """A stage waits for something outside posttrain (people labelling): not a failure. Before
    raising it the stage writes `WAITING_FILE` in its folder, `{"summary": "...", ...}`; the
    round stops there, `posttrain status` shows "waiting <summary>", the next round refuses
    to start, and the same command continues once the wait is over."""


def module(name: str):
    """Stage `name`'s module (imported on first use: the CLI need not load every trainer)."""
    if name not in REGISTRY:
        raise KeyError(f"{name!r} is not a stage (stages: {', '.join(REGISTRY)})")
    return importlib.import_module(f"posttrain.stages.{name}")


def steps() -> tuple[str, ...]:
    """The registry as it is when called (what the orchestrator, status and the report walk; a
    test may put a toy stage in it for a while)."""
    return REGISTRY


def get(name: str) -> StageDef:
    """The definition of stage `name`."""
    return module(name).STAGE


def path_field(**kwargs) -> Any:
    """A field of a stage's inputs that holds a path (or a list of paths): hashed by content
    for the record, so a changed file is a changed input."""
    return field(metadata={"path": True}, **kwargs)


class Resolver(Protocol):
    """What a stage's `resolve` may ask of the round being run (posttrain.rounds.orchestrator.Round)."""

    n: int
    recipe: Any
    loaded: Any
    """The whole recipe (posttrain.recipe.LoadedRecipe): `loaded.for_round(m)` is round m's."""
    run_dir: Path

    def path(self, value: str) -> str: ...
    def record(self, stage: str, n: int | None = None) -> dict | None: ...
    def output(self, stage: str, name: str, n: int | None = None) -> Any: ...
    def preference_files(self, *, only_latest: bool) -> list[str]: ...
    def previous_model(self) -> str | None: ...
    def initial_policy(self) -> str: ...


class MetricsMissing(RuntimeError):
    """A stage's metrics lack a field its `Metrics` class says it always writes."""


@dataclass(kw_only=True)
class Metrics:
    """A stage's metrics, typed (`StageDef.metrics`; subclass it beside the stage's `StageDef`).

    Stages return plain JSON-able dicts (`StageResult.metrics`, written as they are into the
    record); everything that reads them (the headline, `posttrain status`, the report, a later
    stage's resolve) reads `Cls.read(record_metrics)` instead of key paths. A subclass declares
    what is read: a field without a default is one the stage always writes, the headline's
    (`missing` lists the ones a dict lacks; the orchestrator refuses to record a stage whose
    metrics lack one, so a headline key a stage stopped writing fails its tests instead of
    vanishing from status); a field with a default may be absent. Reading is lenient: an older record's absent field is
    None (a nested `Metrics` is an empty one), and keys no field declares stay in `raw`, so a
    stage may write more than its class declares, and declaring one more is one line."""

    def __post_init__(self):
        self.raw: dict = {}
        """Every key the stage wrote, declared or not."""

    @classmethod
    def read(cls, raw: Mapping | None):
        raw = dict(raw or {})
        hints = _hints(cls)
        values = {}
        for f in dataclasses.fields(cls):
            nested = _metrics_type(hints[f.name])
            if f.name in raw:
                value = raw[f.name]
                values[f.name] = nested.read(value) if nested and isinstance(value, Mapping) else value
            elif _required(f):
                values[f.name] = nested.read({}) if nested else None
        obj = cls(**values)
        obj.raw = raw
        return obj

    @classmethod
    def missing(cls, raw: Mapping, prefix: str = "") -> list[str]:
        """The always-written fields (nested ones as `a.b`) that `raw` lacks."""
        hints = _hints(cls)
        out = []
        for f in dataclasses.fields(cls):
            nested = _metrics_type(hints[f.name])
            if f.name not in raw:
                if _required(f):
                    out.append(prefix + f.name)
            elif nested and isinstance(raw[f.name], Mapping):
                out += nested.missing(raw[f.name], f"{prefix}{f.name}.")
        return out


def _required(f: dataclasses.Field) -> bool:
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _metrics_type(hint: Any) -> type[Metrics] | None:
    """The Metrics subclass a field holds (`X` or `X | None`), else None."""
    for t in (hint, *typing.get_args(hint)):
        if isinstance(t, type) and issubclass(t, Metrics):
            return t
    return None


@dataclass
class DataRow:
    """A stage's row of the report's "Data per stage" table (`StageDef.data_row`)."""

    unit: str
    read: Any
    trained: str
    dropped: dict
    """{reason: count}; reasons with none are left out of the table."""
    truncated: Any = None
    contaminated: dict | None = None
    """{source file: rows sharing an n-gram with an eval prompt} (posttrain.decontam)."""


def _no_settings(recipe) -> dict:
    return {}


def _always(recipe) -> bool:
    return True


@dataclass(frozen=True)
class StageDef:
    """What the orchestrator knows about a stage."""

    name: str
    inputs: type
    """A dataclass: the stage's inputs. Fields made with `path_field` are files, hashed by content."""
    resolve: Callable[[Resolver], Any]
    """Builds the inputs from the recipe (`rnd.recipe`) and earlier records (`rnd.output`)."""
    headline: Callable[[Any], list[tuple[str, Any]]]
    """The (label, value) pairs that summarise a finished stage, most important first, read
    from its typed metrics (`metrics`); shown at the stage's end and by `posttrain status`."""
    metrics: type[Metrics] = Metrics
    """The stage's typed metrics: what the headline, status and the report read."""
    legend: str = ""
    """What the stage's cell in `posttrain status` shows (its headline's labels), for the legend."""
    data_row: Callable[[Any], DataRow | None] | None = None
    """The stage's row of the report's "Data per stage" table (read, trained on, dropped), from
    its typed metrics; None: the stage has none."""
    status_column: str = "always"
    """'always', or 'when_run': a column in `posttrain status` only for runs where the stage ran
    (a step the recipe turns on), so other runs' tables stay as they were."""
    model_outputs: tuple[str, ...] = ()
    """Outputs that are model folders (a path or a list of paths): each is checked with
    `modeling.verify_model_folder` before the record is written."""
    settings: Callable[[Any], dict] = _no_settings
    """Parts of the recipe, beyond the stage's own section, that change its result (hashed)."""
    uses_reward: bool = False
    """Gets `ctx.reward` (the recipe's reward, built from the inputs' `reward_model`). Such a
    stage runs in the orchestrator's process, so a reward object passed from Python works;
    it starts its own child processes for generation."""
    uses_annotator: bool = False
    """Gets `ctx.annotator` (the recipe's annotator, or an object passed from Python). Such a
    stage runs in the orchestrator's process too, for the same reason as `uses_reward`."""
    launcher: bool = False
    """A training stage: started by the recipe's `run.launcher` (several processes) when set."""
    required: bool = True
    """The next round needs this stage's record (evaluation is not needed)."""
    preference_batches: Callable[[Resolver], list[tuple[int, str]]] | None = None
    """For a stage that produces preference data: (round it is for, file) of every batch its
    earlier rounds made for this round (`Resolver.preference_files` adds them to the recipe's)."""
    enabled: Callable[[Any], bool] = _always
    """Whether the stage runs in a round, given the round's recipe."""
    config: str | None = None
    """The recipe section holding the stage's config (default: its name)."""
    evaluation: bool = False
    """The round's evaluation: `run_round(evaluate=...)` overrides its `enabled`, and it is
    not needed for the round to count as finished."""
    round_model: str | None = None
    """The output that is the round's final model (the next round's policy), on the one stage
    that makes it; its record means the round has finished."""

    def config_of(self, recipe) -> Any:
        return getattr(recipe, self.config or self.name)


def hashed_inputs(inputs: Any, hash_paths: Callable[[Any], Any]) -> dict:
    """The inputs for the record: path fields replaced by content hashes, the rest as is. A
    field marked `omit_if_empty` is left out while empty, so adding such an input to a stage
    keeps the hash of records that do not use it."""
    return {f.name: hash_paths(getattr(inputs, f.name)) if f.metadata.get("path") else getattr(inputs, f.name)
            for f in dataclasses.fields(inputs)
            if not (f.metadata.get("omit_if_empty") and not getattr(inputs, f.name))}


@dataclass
class StageContext:
    stage: str
    """A registered stage's name."""
    round: int
    """1-based round number."""
    run_dir: Path
    """The run folder; record outputs relative to it."""
    out_dir: Path
    """run_dir/round_NN/<stage>: the stage writes here only."""
    config: Any
    """The stage's own resolved config section (e.g. posttrain.stages.rm.RMConfig) for this round."""
    inputs: Any
    """The stage's typed inputs (its `StageDef.inputs`); a dict is converted on creation."""
    recipe: Any = None
    """The whole resolved recipe (posttrain.recipe.Recipe) for this round, for shared settings."""
    seed: int = 0
    """The recipe's seed (variants add their index)."""
    trust_remote_code: bool = False
    """Passed to every from_pretrained; off unless the recipe turns it on."""
    formatting_tokens: list[str] | None = None
    """Recipe override of the formatting-token set (token strings); None derives it."""
    report_to: list[str] | str = "none"
    """Where training metrics go ('none', 'tensorboard', 'wandb')."""
    reward: Any = None
    """For stages with `uses_reward`: a ready reward object following posttrain.reward.Reward."""
    annotator: Any = None
    """For stages with `uses_annotator`: a ready annotator (posttrain.annotate.base.Annotator)."""
    callbacks: tuple = ()
    """Extra transformers TrainerCallbacks for training stages (tests, tooling)."""
    keep_checkpoints: bool = False
    """Keep trainer checkpoints of finished variants (`run.keep_checkpoints`)."""

    def __post_init__(self):
        if isinstance(self.inputs, dict):
            self.inputs = get(self.stage).inputs(**self.inputs)


@dataclass
class StageResult:
    outputs: dict[str, str]
    """Named outputs as paths relative to ctx.run_dir (e.g. {"model": "round_01/rm/model"})."""
    metrics: dict[str, Any] = field(default_factory=dict)
    """JSON-able metrics for the record and the report."""


# ----------------------------------------------------------------------------- headline metrics
# Helpers for the stages' `headline` functions.


def metric(metrics: dict, *path: str) -> Any:
    """metrics[path[0]][path[1]]..., or None where a key is missing."""
    for key in path:
        if not isinstance(metrics, dict):
            return None
        metrics = metrics.get(key)
    return metrics


def variant_mean(metrics: Mapping | Metrics, *path: str) -> float | None:
    """The mean over a training stage's variants of one metric (None if none has it)."""
    variants = getattr(metrics, "variants", None) if isinstance(metrics, Metrics) else metrics.get("variants")
    vals = [metric(v, *path) for v in (variants or {}).values()]
    vals = [v for v in vals if isinstance(v, (int, float))]
    return sum(vals) / len(vals) if vals else None


def typed_metrics(step: str, metrics: Mapping | None) -> Metrics:
    """A stage's metrics (a record's `metrics` dict) as its `StageDef.metrics` class."""
    return get(step).metrics.read(metrics)


def headline(step: str, metrics: Mapping | None) -> list[tuple[str, Any]]:
    """Stage `step`'s headline pairs from its metrics. A value that is None (the stage wrote
    None: nothing to measure this time, or an older record lacks an optional field) is left
    out; a key the stage must write and did not is refused when its record is written
    (`Metrics.missing`), and a headline reading an undeclared field raises AttributeError."""
    return [(k, v) for k, v in get(step).headline(typed_metrics(step, metrics)) if v is not None]


def round_model_stage() -> StageDef:
    """The stage whose output is the round's final model (`StageDef.round_model`)."""
    found = [d for d in map(get, steps()) if d.round_model]
    if len(found) != 1:
        raise RuntimeError(f"the registry needs exactly one stage with a round_model, found {len(found)}")
    return found[0]


def fmt(v) -> str:
    """A metric as a table cell: floats to 3 places, None as "-"."""
    if isinstance(v, float):
        return f"{v:.3f}"
    return "-" if v is None else str(v)


def format_headline(pairs: list[tuple[str, Any]]) -> str:
    return " ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in pairs)

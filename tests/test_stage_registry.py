"""A stage is one module: its typed metrics, headline, status legend and report row come from
its `StageDef`, and the orchestrator, `posttrain status` and the report only walk the registry.

Proved with toy stages registered for the length of a test (the registry and `sys.modules`
are put back by monkeypatch): a round of them runs through the real orchestrator, in its own
process (they take the reward, so no worker process is started), with no model anywhere.
"""

from __future__ import annotations

import sys
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from posttrain import stage
from posttrain.files import iter_jsonl, write_jsonl
from posttrain.stage import Metrics, MetricsMissing, StageDef, StageResult, path_field


class CountingReward:
    name = "counting"

    def score(self, prompts, responses):
        return [float(len(r)) for r in responses]


@dataclass
class MakeInputs:
    previous: str | None = path_field(default=None)
    """The previous round's model (the `final` toy stage's): where round n starts from."""
    reward_model: str | None = None


@dataclass
class ToyInputs:
    rows: str = path_field()
    reward_model: str | None = None


@dataclass(kw_only=True)
class ToyMetrics(Metrics):
    seen: int | None
    best: float | None
    contaminated: dict | None = None


def _make(ctx) -> StageResult:
    rows = [{"id": f"r{i}", "text": "x" * (i + ctx.round)} for i in range(3)]
    write_jsonl(ctx.out_dir / "rows.jsonl", rows)
    return StageResult(outputs={"rows": f"round_{ctx.round:02d}/make/rows.jsonl"}, metrics={"rows": len(rows)})


def _toy(ctx) -> StageResult:
    rows = list(iter_jsonl(ctx.inputs.rows))
    scores = ctx.reward.score([[]] * len(rows), [r["text"] for r in rows])
    metrics = {"seen": len(rows), "best": max(scores), "contaminated": {"/d/rows.jsonl": 1}}
    if ctx.config.max_shard_size == 12345:  # the broken toy: a field it declares it always writes is absent
        del metrics["best"]
    (ctx.out_dir / "seen.txt").write_text(str(len(rows)))
    return StageResult(outputs={"seen": f"round_{ctx.round:02d}/toy/seen.txt"}, metrics=metrics)


def _final(ctx) -> StageResult:
    (ctx.out_dir / "model").mkdir(exist_ok=True)
    (ctx.out_dir / "model" / "weights.txt").write_text(f"round {ctx.round}")
    return StageResult(outputs={"model": f"round_{ctx.round:02d}/final/model"}, metrics={"n_inputs": 1})


def _module(name: str, run, defn: StageDef) -> types.ModuleType:
    mod = types.ModuleType(f"posttrain.stages.{name}")
    mod.run, mod.STAGE = run, defn
    return mod


@pytest.fixture
def toy_registry(monkeypatch):
    """make -> toy -> final, with the real `eval` registered but off (the report reads it)."""
    from posttrain.stages.average import AverageMetrics

    defs = {
        "make": (_make, StageDef(name="make", inputs=MakeInputs, config="average", uses_reward=True,
                                 resolve=lambda rnd: MakeInputs(previous=rnd.previous_model()),
                                 headline=lambda m: [])),
        "toy": (_toy, StageDef(name="toy", inputs=ToyInputs, config="average", uses_reward=True,
                               resolve=lambda rnd: ToyInputs(rows=rnd.output("make", "rows")),
                               metrics=ToyMetrics, headline=lambda m: [("seen", m.seen), ("best", m.best)],
                               legend="seen: rows the toy stage scored",
                               data_row=lambda m: stage.DataRow("rows", m.seen, f"{m.seen} scored", {"none": 0},
                                                                None, m.contaminated))),
        "final": (_final, StageDef(name="final", inputs=MakeInputs, config="average", uses_reward=True,
                                   resolve=lambda rnd: MakeInputs(), metrics=AverageMetrics, round_model="model",
                                   headline=lambda m: [("models", m.n_inputs)])),
    }
    for name, (run, defn) in defs.items():
        monkeypatch.setitem(sys.modules, f"posttrain.stages.{name}", _module(name, run, defn))
    monkeypatch.setattr(stage, "REGISTRY", ("make", "toy", "final", "eval"))
    return defs


def _recipe(tmp_path: Path, **average) -> Path:
    path = tmp_path / "toy.yaml"
    path.write_text(yaml.safe_dump({"name": "toy", "rounds": 2, "models": {"base": "some/model"},
                                    "eval": {"enabled": False}, "average": average}))
    return path


def test_a_round_of_toy_stages_runs_and_shows_in_status_and_the_report(tmp_path, toy_registry):
    from posttrain.api import status_table
    from posttrain.records import load_record
    from posttrain.report import collect, data_rows, write_report
    from posttrain.rounds.orchestrator import round_finished, run_round

    recipe, run_dir = _recipe(tmp_path), tmp_path / "run"
    for n in (1, 2):
        records = run_round(n, recipe, run_dir, reward=CountingReward())
        assert list(records) == ["make", "toy", "final"]  # eval is off in the recipe
        assert round_finished(run_dir, n)  # the record of the stage with the round's model
    # Round 2 started from round 1's model: `previous_model` found the toy `final` stage by its
    # `round_model`, not by a name the orchestrator knows.
    make2 = load_record(run_dir, 2, "make")
    assert make2.inputs["inputs"]["previous"]["path"].endswith("round_01/final/model")
    toy = load_record(run_dir, 2, "toy")
    assert toy.typed_metrics() == ToyMetrics(seen=3, best=4.0, contaminated={"/d/rows.jsonl": 1})

    table = status_table(run_dir)
    header = table.splitlines()[0].split()
    assert header == ["round", "make", "toy", "final", "eval"]
    assert "seen=3 best=4.000" in table.splitlines()[3] and "models=1" in table.splitlines()[3]
    assert "toy seen: rows the toy stage scored" in " ".join(table.split())

    assert data_rows(collect(run_dir)) == [["1", "toy", "rows", "3", "3 scored", "0", "-"],
                                           ["2", "toy", "rows", "3", "3 scored", "0", "-"]]
    report = write_report(run_dir).read_text()
    assert "| 2 | toy | rows | 3 | 3 scored | 0 | - | rows.jsonl 1 |" in report


def test_a_stage_that_stops_writing_a_headline_key_fails_before_its_record(tmp_path, toy_registry):
    from posttrain.records import read_record
    from posttrain.rounds.orchestrator import run_round

    with pytest.raises(MetricsMissing, match=r"round 1 toy: its metrics lack best, which ToyMetrics says"):
        run_round(1, _recipe(tmp_path, max_shard_size=12345), tmp_path / "run", reward=CountingReward())
    assert read_record(tmp_path / "run", 1, "toy") is None


def test_typed_metrics_read_old_records_and_keep_what_they_do_not_declare():
    m = ToyMetrics.read({"seen": 2, "throughput": {"tokens_per_s": 9.5}})
    assert (m.seen, m.best, m.contaminated) == (2, None, None)  # an older record: absent is None
    assert m.raw["throughput"] == {"tokens_per_s": 9.5}  # a field another stage version writes
    assert ToyMetrics.missing({"seen": 2}) == ["best"]
    from posttrain.stages.rm import RMMetrics

    assert RMMetrics.read({}).heldout.accuracy is None  # a nested block absent: an empty one
    assert "heldout.accuracy" not in RMMetrics.missing({"heldout": {}})  # optional inside


@pytest.mark.parametrize("name", stage.REGISTRY)
def test_every_stage_declares_what_its_headline_and_report_row_read(name):
    """Each real stage's headline and data row, on metrics where every declared field is set,
    read only declared fields (an undeclared one raises AttributeError here) and show a value
    for every pair: a pair reading a key no field declares cannot slip through as None."""
    defn = stage.get(name)
    filled = _filled(defn.metrics)
    pairs = defn.headline(filled)
    assert pairs and all(v is not None for _, v in pairs), (name, pairs)
    if defn.data_row is not None:
        assert defn.data_row(filled) is not None
    assert defn.legend or name in ("average",), f"{name} has no status legend"


DICTS = {  # dict fields whose values have a shape of their own
    "variants": {v: {"loss": {"last": 0.5}, "rewards/accuracies": {"last": 0.5}} for v in ("v0", "v1")},
    "benchmarks": {"humaneval": {"numbers": {"pass@1": 0.5}}},
}


def _filled(cls: type[Metrics]) -> Metrics:
    """An instance of `cls` with every field set to a value of its type (nested ones filled too)."""
    import dataclasses
    import typing

    hints = typing.get_type_hints(cls)
    samples: dict[Any, Any] = {int: 3, float: 0.5, bool: True, str: "x"}
    values = {}
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        options = [t for t in (hint, *typing.get_args(hint)) if t is not type(None)]
        nested = next((t for t in options if isinstance(t, type) and issubclass(t, Metrics)), None)
        if nested is not None:
            values[f.name] = _filled(nested)
        elif any(typing.get_origin(t) is dict or t is dict for t in options):
            values[f.name] = DICTS.get(f.name, {"k": 1})
        else:
            values[f.name] = next((samples[t] for t in options if t in samples), 1)
    return cls(**values)

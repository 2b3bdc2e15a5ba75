"""The sample stage: selection, capabilities, over-long prompts, shards and resumption."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from posttrain import files, generation
from posttrain.files import write_jsonl
from posttrain.reward import Scored
from posttrain.stages import sample as sample_stage
from posttrain.stages.sample import SampleConfig, score_summary, select_best
from posttrain.stage import StageContext, headline
from test_generation import eot_prone_model

# ---- selection against hand-worked cases ------------------------------------------------


def test_select_best_highest_score_wins():
    assert select_best([0.1, 0.9, 0.5], [5, 5, 5]) == (1, 0)


def test_select_best_ties_go_to_shortest_then_lowest_index():
    # best: 0.9 at 1 (len 7), 2 (len 3), 3 (len 3) -> shortest are 2 and 3 -> lowest index 2
    # worst: 0.2 at 0 (len 4) and 4 (len 9) -> the longest, 4
    assert select_best([0.2, 0.9, 0.9, 0.9, 0.2], [4, 7, 3, 3, 9]) == (2, 4)
    # complete tie: best is the shortest; worst is the longest
    assert select_best([1.0, 1.0], [3, 8]) == (0, 1)
    assert select_best([1.0, 1.0], [5, 5]) == (0, 0)


def test_select_best_abstentions_never_win():
    assert select_best([None, -3.0, None], [1, 1, 1]) == (1, 1)
    assert select_best([None, None], [1, 2]) == (None, None)


def test_select_best_requires_finished_for_best_only():
    # index 0 scores highest but was cut at max_new_tokens: it cannot be the SFT target
    assert select_best([5.0, 1.0, 0.0], [64, 3, 4], [False, True, True]) == (1, 2)
    assert select_best([5.0, 1.0], [64, 64], [False, False]) == (None, 1)


def test_score_summary():
    assert score_summary([1.0, None, 4.0, 1.0]) == {"best": 4.0, "mean": 2.0, "worst": 1.0}
    assert score_summary([None]) == {"best": None, "mean": None, "worst": None}


# ---- the stage end to end (tiny model, transformers backend) ----------------------------


class LengthReward:
    """Prefers responses near 12 characters; abstains on responses that start with a digit."""

    name = "length"

    def __init__(self, fail_on_call: int | None = None):
        self.calls = 0
        self.fail_on_call = fail_on_call
        self.events: list[str] = []

    def setup(self):
        self.events.append("setup")

    def teardown(self):
        self.events.append("teardown")

    def score(self, prompts, responses):
        self.calls += 1
        if self.fail_on_call == self.calls:
            raise KeyboardInterrupt("simulated kill while scoring")
        return [None if r[:1].isdigit() else -abs(len(r) - 12) for r in responses]


@pytest.fixture(scope="module")
def eot_model_dir(tmp_path_factory, tiny_tokenizer):
    from posttrain.modeling import save_checkpoint

    out = tmp_path_factory.mktemp("sample") / "model"
    return save_checkpoint(eot_prone_model(tiny_tokenizer, eot_push=1.5), tiny_tokenizer, out)


def write_prompts(path: Path) -> Path:
    rows = [{"id": f"p{i}", "prompt": f"count to {i} please", "capability": "general"} for i in range(5)]
    rows.append({"id": "sys", "prompt": "be brief", "capability": "steer"})
    rows.append({"id": "tool", "prompt": "call the tool", "capability": "tool_use"})
    rows.append({"id": "long", "prompt": "word " * 200, "capability": "general"})
    rows.append({"id": "own-system", "prompt": "hello", "capability": "steer", "system": "Row system."})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


CAPABILITIES = {
    "general": {"system_prompt": None, "k": None, "temperature": None, "top_p": None,
                "max_new_tokens": None, "sample": True},
    "steer": {"system_prompt": "Answer in one line.", "k": 2, "temperature": 0.7, "top_p": None,
              "max_new_tokens": None, "sample": True},
    "tool_use": {"sample": False},
}


def make_ctx(run_dir: Path, model_dir: Path, prompts: Path, reward, **cfg) -> StageContext:
    config = SampleConfig(**{"k": 3, "max_new_tokens": 12, "max_prompt_length": 60, "shard_size": 2,
                             "backend": "transformers", **cfg})
    return StageContext(stage="sample", round=1, run_dir=run_dir, out_dir=run_dir / "round_01" / "sample",
                        config=config, inputs={"policy_model": str(model_dir), "prompt_files": [str(prompts)],
                                               "capabilities": CAPABILITIES},
                        seed=5, reward=reward)


@pytest.fixture
def in_process_jobs(monkeypatch, engines_here):
    """Generation in this process (the child-process path is tested in test_generation); the
    result files each call still had to make."""
    calls = []

    def run_jobs(*args, **kwargs):
        calls.append([j.out for j in args[1] if not Path(j.out).exists()])
        return generation.run_jobs(*args, **kwargs)

    monkeypatch.setattr(sample_stage, "run_jobs", run_jobs)
    return calls


def read_shards(out_dir: Path) -> list[dict]:
    return [r for p in sorted((out_dir / "samples").glob("shard_*.jsonl")) for r in files.iter_jsonl(p)]


def test_stage_writes_shards_top1_and_reports(tmp_path, eot_model_dir, tiny_tokenizer):
    # generation in a real child process here (the other tests generate in process)
    reward = LengthReward()
    ctx = make_ctx(tmp_path, eot_model_dir, write_prompts(tmp_path / "prompts.jsonl"), reward)
    result = sample_stage.run(ctx)
    rows = read_shards(ctx.out_dir)
    ids = [r["id"] for r in rows]
    assert ids == ["p0", "p1", "p2", "p3", "p4", "sys", "own-system"]  # tool_use off, long reported
    assert reward.events == ["setup", "teardown"]

    m = result.metrics
    assert m["too_long"] == {"count": 1, "ids": ["long"]}
    assert json.loads((ctx.out_dir / "samples" / "too_long.json").read_text())[0]["id"] == "long"
    assert m["skipped_by_capability"] == 1 and m["prompts_read"] == 9 and m["prompts"] == 7
    # the status column reads what the stage wrote
    assert [k for k, _ in headline("sample", m)] == ["top1", "prompts", "no_top1"]
    assert m["samples"] == 5 * 3 + 2 * 2

    by_id = {r["id"]: r for r in rows}
    # capability settings: k and temperature for "steer", its system prompt first; a row's own
    # system prompt wins over the capability's
    assert len(by_id["sys"]["responses"]) == 2 and by_id["sys"]["sampling"]["temperature"] == 0.7
    assert by_id["sys"]["prompt"][0] == {"role": "system", "content": "Answer in one line."}
    assert by_id["own-system"]["prompt"][0] == {"role": "system", "content": "Row system."}
    assert len(by_id["p0"]["responses"]) == 3 and by_id["p0"]["sampling"]["temperature"] == 1.0

    for r in rows:
        k = len(r["responses"])
        assert len(r["n_tokens"]) == len(r["finished"]) == len(r["scores"]) == k
        # the reward's scores, recomputed by hand
        assert r["scores"] == [None if t[:1].isdigit() else -abs(len(t) - 12) for t in r["responses"]]
        assert (r["best"], r["worst"]) == select_best(r["scores"], r["n_tokens"], r["finished"])
        assert r["sampling"]["backend"] == "transformers" and r["sampling"]["k"] == k

    top1 = list(files.iter_jsonl(ctx.out_dir / "top1.jsonl"))
    expected = [r for r in rows if r["best"] is not None]
    assert [t["prompt_id"] for t in top1] == [r["id"] for r in expected]
    # ids name the round, so the cumulative SFT data of several rounds keeps unique ids
    assert [t["id"] for t in top1] == [f"round_{ctx.round:02d}/{r['id']}" for r in expected]
    for t, r in zip(top1, expected):
        assert t["messages"] == r["prompt"] + [{"role": "assistant", "content": r["responses"][r["best"]]}]
        assert t["score"] == r["scores"][r["best"]]
    bests = [score_summary(r["scores"])["best"] for r in rows if score_summary(r["scores"])["best"] is not None]
    assert m["score_best_mean"] == pytest.approx(sum(bests) / len(bests))
    assert result.outputs == {"samples": "round_01/sample/samples", "top1": "round_01/sample/top1.jsonl"}
    assert not (ctx.out_dir / "samples" / ".work").exists()


def test_killed_stage_resumes_without_losing_or_duplicating(tmp_path, eot_model_dir, in_process_jobs):
    prompts = write_prompts(tmp_path / "prompts.jsonl")
    whole = make_ctx(tmp_path / "whole", eot_model_dir, prompts, LengthReward())
    sample_stage.run(whole)
    expected = read_shards(whole.out_dir)
    in_process_jobs.clear()

    # killed while scoring the second shard: shard 0 is on disk, shard 1 is not (not even half)
    ctx = make_ctx(tmp_path / "killed", eot_model_dir, prompts, LengthReward(fail_on_call=2))
    with pytest.raises(KeyboardInterrupt):
        sample_stage.run(ctx)
    samples = ctx.out_dir / "samples"
    assert sorted(p.name for p in samples.glob("shard_*.jsonl")) == ["shard_00000.jsonl"]
    assert not (ctx.out_dir / "top1.jsonl").exists()

    # a generation result of a later shard is lost too (as if the kill came during generation)
    lost = samples / ".work" / "shard_00003.g0.json"
    lost.unlink()
    in_process_jobs.clear()
    result = sample_stage.run(ctx := make_ctx(tmp_path / "killed", eot_model_dir, prompts, LengthReward()))
    # only the lost job was generated again; shard 0 was not touched
    assert in_process_jobs == [[str(lost)]]
    rows = read_shards(ctx.out_dir)
    assert rows == expected  # same samples as the uninterrupted run: nothing lost, duplicated or redrawn
    assert result.metrics["shards"] == 4 and result.metrics["shards_this_run"] == 3


def test_other_inputs_discard_old_shards(tmp_path, eot_model_dir, in_process_jobs):
    """A resumed folder whose manifest was made for other inputs is not mixed in. The second
    run also exercises the orchestrator's per-file capability override."""
    prompts = write_prompts(tmp_path / "prompts.jsonl")
    sample_stage.run(make_ctx(tmp_path, eot_model_dir, prompts, LengthReward()))
    ctx = make_ctx(tmp_path, eot_model_dir, prompts, LengthReward())
    ctx.inputs.prompt_capabilities = {str(prompts): "steer"}  # every prompt of the file is "steer"
    sample_stage.run(ctx)
    rows = read_shards(ctx.out_dir)
    # tool_use is no longer off (its rows are "steer" now); only the over-long prompt is missing
    assert [r["id"] for r in rows] == ["p0", "p1", "p2", "p3", "p4", "sys", "tool", "own-system"]
    assert all(len(r["responses"]) == 2 and r["capability"] == "steer" for r in rows)
    assert all(r["prompt"][0]["role"] == "system" for r in rows)
    top1 = list(files.iter_jsonl(ctx.out_dir / "top1.jsonl"))
    assert {t["capability"] for t in top1} <= {"steer"}


def test_duplicate_prompt_ids_are_an_error(tmp_path, eot_model_dir, in_process_jobs):
    from posttrain.data import DataError

    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"id": "a", "prompt": "x"}) + "\n" + json.dumps({"id": "a", "prompt": "y"}) + "\n")
    with pytest.raises(DataError, match="'a'"):
        sample_stage.run(make_ctx(tmp_path, eot_model_dir, path, LengthReward()))


def test_config_rejects_unknown_keys():
    with pytest.raises(ValueError, match="extra"):
        SampleConfig(kk=3)
    with pytest.raises(ValueError):
        SampleConfig(vllm={"engine": 2})


def test_seen_conversation_row_system_wins_over_the_capabilitys():
    from posttrain.data import Prompt
    from posttrain.stages.sample import seen_conversation

    user = [{"role": "user", "content": "Sort these numbers: 3 1 2"}]
    own = Prompt(id="a", messages=user, capability="math", system="Row prompt.", meta={}, source="f:1")
    bare = Prompt(id="b", messages=user, capability="math", system=None, meta={}, source="f:2")
    assert seen_conversation(own, "Capability prompt.")[0] == {"role": "system", "content": "Row prompt."}
    assert seen_conversation(bare, "Capability prompt.") == [{"role": "system", "content": "Capability prompt."}, *user]
    assert seen_conversation(bare, None) == user


def test_metrics_count_prompts_without_top1_and_the_score_length_correlation():
    from posttrain.stages.sample import _metrics
    from posttrain.samples import SampleRow

    rows = [SampleRow(id="a", prompt=[], capability=None, responses=["x", "xx"], n_tokens=[1, 3],
                      finished=[True, True], scores=[0.0, 1.0], best=1, worst=0),
            SampleRow(id="b", prompt=[], capability=None, responses=["y", "yy"], n_tokens=[2, 4],
                      finished=[True, False], scores=[None, None], best=None, worst=None),
            SampleRow(id="c", prompt=[], capability=None, responses=["z"], n_tokens=[5], finished=[True],
                      scores=[2.0], best=0, worst=0)]
    m = _metrics(rows, top1=[{}, {}], too_long=[], skipped=[], n_read=3)
    assert (m["top1"], m["prompts_without_top1"], m["prompts_without_top1_ids"]) == (2, 1, ["b"])
    # by hand over the scored samples (score, length): (0, 1), (1, 3), (2, 5): exactly linear
    assert m["score_length_correlation"] == pytest.approx(1.0)


def test_a_broken_shard_row_names_the_shard_row_and_field(tmp_path):
    from posttrain.samples import SampleRowError, iter_rows

    good = {"id": "a", "prompt": [], "capability": None, "responses": ["x", "y"], "n_tokens": [1, 1],
            "finished": [True, True], "scores": [0.5, 0.1], "best": 0, "worst": 1}
    write_jsonl(tmp_path / "shard_00000.jsonl", [good, {**good, "id": "b", "best": 2}])
    with pytest.raises(SampleRowError, match=r"shard_00000.jsonl: row 2: field 'best': 2 is not an index"):
        list(iter_rows(tmp_path))
    write_jsonl(tmp_path / "shard_00000.jsonl", [{**good, "scores": [0.5]}])
    with pytest.raises(SampleRowError, match=r"row 1: field 'scores': expected a list of 2 values"):
        list(iter_rows(tmp_path))
    write_jsonl(tmp_path / "shard_00000.jsonl", [good])
    assert [(w.rsplit("/", 1)[-1], r.best) for w, r in iter_rows(tmp_path)] == [("shard_00000.jsonl:1", 0)]


class ReasonedReward:
    """Says why: "short" or "long" by length; raises on a response containing "e" after its third
    character, which the reward protocol turns into that one sample's 0.0 (reason reward_error)."""

    name = "reasoned"

    def score(self, prompts, responses):
        if any("e" in r[3:] for r in responses):
            raise ValueError("no 'e' please")
        return [Scored(float(len(r)), "long" if len(r) > 8 else "short", f"{len(r)} chars") for r in responses]


def test_shards_keep_each_samples_reason_and_the_metrics_count_them(tmp_path, eot_model_dir, in_process_jobs):
    ctx = make_ctx(tmp_path, eot_model_dir, write_prompts(tmp_path / "prompts.jsonl"), ReasonedReward())
    m = sample_stage.run(ctx).metrics
    rows = read_shards(ctx.out_dir)
    counts: dict[str, int] = {}
    for r in rows:
        assert len(r["reasons"]) == len(r["details"]) == len(r["responses"])
        for text, score, reason, detail in zip(r["responses"], r["scores"], r["reasons"], r["details"]):
            if "e" in text[3:]:
                assert (score, reason, detail) == (0.0, "reward_error", "ValueError: no 'e' please")
            else:
                assert (score, reason, detail) == (len(text), "long" if len(text) > 8 else "short",
                                                   f"{len(text)} chars")
            counts[reason] = counts.get(reason, 0) + 1
    assert m["reasons"] == dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))
    assert sum(m["reasons"].values()) == m["samples"]


def test_min_top1_score_keeps_only_good_enough_bests_as_sft_rows(tmp_path, eot_model_dir, in_process_jobs):
    # LengthReward scores -|len - 12|: a best of -2 or better becomes a top-1 row, the others
    # keep their best and worst in the shards (on-policy DPO pairs) but make no SFT row
    ctx = make_ctx(tmp_path, eot_model_dir, write_prompts(tmp_path / "prompts.jsonl"), LengthReward(),
                   min_top1_score=-2.0)
    m = sample_stage.run(ctx).metrics
    rows = read_shards(ctx.out_dir)
    top1 = list(files.iter_jsonl(ctx.out_dir / "top1.jsonl"))
    kept = [r["id"] for r in rows if r["best"] is not None and r["scores"][r["best"]] >= -2.0]
    below = [r["id"] for r in rows if r["best"] is not None and r["scores"][r["best"]] < -2.0]
    assert [t["prompt_id"] for t in top1] == kept and all(t["score"] >= -2.0 for t in top1)
    assert below, "the tiny model's samples should not all be near 12 characters"
    assert m["top1"] == len(kept) and m["below_min_top1_score"] == len(below)
    assert all(r["best"] is not None for r in rows if r["id"] in below)  # still in the shards

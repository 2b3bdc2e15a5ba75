"""Annotators (world, AI feedback, JSONL), the annotate step, and rounds that train on its batches."""

from __future__ import annotations

import pytest

from posttrain import data
from posttrain.annotate import (
    AnnotatorError,
    Label,
    Request,
    Response,
    checked_annotate,
    load_annotator,
)
from posttrain.files import atomic_write_json, iter_jsonl, read_json, write_jsonl
from posttrain.world import task
from posttrain.world.annotator import WorldAnnotator, simulated_judgement


def req(rid: str, prompt_text: str, a: str, b: str, **meta) -> Request:
    return Request(id=rid, prompt=[{"role": "user", "content": prompt_text}],
                   a=Response(a, "round", {"temperature": 0.7}), b=Response(b, "previous", {"temperature": 1.3}),
                   meta=meta)


# ----------------------------------------------------------------------------- world


def test_world_annotator_prefers_the_higher_task_score_with_strength_from_the_gap():
    p = "Sort these numbers: 5 1 3"  # reference "1 3 5"
    requests = [
        req("perfect-vs-garbage", p, "1 3 5", "x y z"),        # gap 1.0: significantly_better, a
        req("near-vs-worse", p, "1 5 3", "1 3 5 9"),            # 1/3 vs 0.75 (capped 0.9): b, gap 0.4167: better
        req("tie", p, "3 1 5", "5 3 1"),                        # 0 vs 0: tie
        req("not-a-task", "Hello there", "hi", "hello"),
    ]
    labels = checked_annotate(WorldAnnotator(edit_share=0.0), requests)
    assert [lb.preferred for lb in labels] == ["a", "b", None, None]
    assert labels[0].strength == "significantly_better"
    assert task.score(p, "1 3 5 9") - task.score(p, "1 5 3") == pytest.approx(0.75 - 1 / 3)
    assert labels[1].strength == "better"
    assert (labels[2].reason, labels[3].reason) == ("tie", "not a task prompt")
    assert all(lb.edited is None for lb in labels)


def test_world_annotator_edits_fix_the_chosen_answer_and_draws_are_per_request():
    p = "Sort these numbers: 9 2 4 4"
    requests = [req(f"r{i}", p, "2 4 9 4", "9 9 9 9") for i in range(40)]
    labels = WorldAnnotator(edit_share=1.0).annotate(requests)
    assert all(lb.preferred == "a" and lb.edited == "2 4 4 9" for lb in labels)
    # A perfect chosen answer is never edited.
    perfect = WorldAnnotator(edit_share=1.0).annotate([req("ok", p, "2 4 4 9", "9")])[0]
    assert perfect.preferred == "a" and perfect.edited is None
    # Draws depend on (seed, request id) only: the same labels in any order or batch size.
    ann = WorldAnnotator(edit_share=0.5, flip_share=0.3, seed=7)
    once = ann.annotate(requests)
    again = ann.annotate(list(reversed(requests)))[::-1]
    assert once == again
    flipped = sum(lb.preferred == "b" for lb in once)
    edited = sum(lb.edited is not None for lb in once)
    assert 0 < flipped < 40 and 0 < edited < 40


def test_world_build_and_annotator_share_one_judgement_rule():
    j = simulated_judgement("Sort these numbers: 3 1 2", "1 2 3", "1 2 2", 0.0, edit_share=0.3)
    assert (j.preferred, j.strength, j.edited) == ("a", "better", None)  # gap 1 - 2/3: a perfect answer is kept
    j = simulated_judgement("Sort these numbers: 3 1 2", "3 1 2", "1 3 2", 0.1, edit_share=0.3)
    assert (j.preferred, j.edited) == ("b", "1 2 3")
    assert simulated_judgement("Sort these numbers: 3 1 2", "2 2 2", "2 2 2", 0.0) is None


# ----------------------------------------------------------------------------- AI feedback


class HalfAbstaining:
    """Scores by length, abstains on responses containing '?'."""

    name = "half_abstaining"

    def score(self, prompts, responses):
        return [None if "?" in r else float(len(r)) for r in responses]


def test_ai_feedback_strength_from_score_gap_and_abstentions_skip_the_pair():
    ann = load_annotator({"target": "posttrain.annotate.ai:RewardAnnotator",
                          "kwargs": {"reward": HalfAbstaining(), "thresholds": [4, 2, 1]}})
    requests = [req("big", "q", "aaaaaa", "a"), req("small", "q", "ab", "abc"),
                req("equal", "q", "ab", "cd"), req("unsure", "q", "ab?", "a"), req("half", "q", "aaaa", "a a")]
    labels = checked_annotate(ann, requests)
    assert [(lb.preferred, lb.strength) for lb in labels] == [
        ("a", "significantly_better"), ("b", "slightly_better"), (None, None), (None, None), ("a", "slightly_better")]
    assert labels[2].reason.startswith("equal scores") and labels[3].reason == "the reward abstained"
    assert ann.name == "ai_feedback(half_abstaining)"


def test_ai_feedback_with_the_task_checker_from_a_recipe_spec():
    ann = load_annotator({"target": "posttrain.annotate.ai:RewardAnnotator",
                          "kwargs": {"reward": {"target": "posttrain.world.task:TaskReward"}}})
    p = "Sort these numbers: 2 1"
    labels = checked_annotate(ann, [req("x", p, "2 1", "1 2"), req("y", "not a task", "a", "b")])
    assert (labels[0].preferred, labels[0].strength) == ("b", "significantly_better")
    assert labels[1].preferred is None  # TaskReward abstains on other prompts


def test_annotator_targets_are_checked_before_anything_is_called():
    with pytest.raises(AnnotatorError, match="not an annotator class or a function marked"):
        load_annotator({"target": "os:system"})
    with pytest.raises(AnnotatorError, match="has no annotate"):
        load_annotator({"target": "posttrain.world.task:TaskReward"})
    with pytest.raises(AnnotatorError, match="cannot import module"):
        load_annotator({"target": "no_such_module_xyz:Thing"})



def test_annotator_kwargs_are_checked_against_the_signature_and_so_are_its_reward_specs():
    from posttrain.annotate import check_annotator_spec

    ai = "posttrain.annotate.ai:RewardAnnotator"
    with pytest.raises(AnnotatorError) as info:
        check_annotator_spec({"target": ai, "kwargs": {"reward": "@rm", "treshold": [1, 2, 3]}}, "annotate.annotator")
    assert str(info.value) == (f"annotate.annotator.kwargs.treshold: not an argument of {ai} "
                               "(it takes: reward, thresholds)")
    with pytest.raises(AnnotatorError, match=r"^annotate\.annotator\.kwargs: .*RewardAnnotator needs 'reward'"):
        check_annotator_spec({"target": ai}, "annotate.annotator")
    with pytest.raises(AnnotatorError, match=r"^annotate\.annotator\.kwargs\.reward\.kwargs\.no_such_kwarg: "
                                             r"not an argument of posttrain\.reward\.math:MathAnswerReward"):
        check_annotator_spec({"target": ai, "kwargs": {"reward": {"target": "posttrain.reward.math:MathAnswerReward",
                                                                   "kwargs": {"no_such_kwarg": 1}}}}, "annotate.annotator")
    with pytest.raises(AnnotatorError, match=r"^annotator\.kwargs\.no_such_kwarg: not an argument of "
                                             r"posttrain\.annotate\.world:WorldAnnotator"):
        load_annotator({"target": "posttrain.annotate.world:WorldAnnotator", "kwargs": {"no_such_kwarg": 1}})
    check_annotator_spec({"target": ai, "kwargs": {"reward": "@rm"}}, "annotate.annotator")  # a placeholder is fine


class Liar:
    name = "liar"

    def __init__(self, mode):
        self.mode = mode

    def annotate(self, requests):
        if self.mode == "short":
            return []
        r = requests[0]
        if self.mode == "other_pair":
            return [Label(r.id, "0" * 64, "a", "better")]
        if self.mode == "bad_strength":
            return [Label.for_request(r, "a", "much_better")]
        raise ValueError("boom")


@pytest.mark.parametrize("mode,match", [
    ("short", "returned 0 answers for 1 requests"),
    ("other_pair", "made for other responses"),
    ("bad_strength", "field 'strength'"),
    ("raise", "raised ValueError: boom"),
])
def test_checked_annotate_refuses_broken_answers_naming_the_annotator(mode, match):
    with pytest.raises(AnnotatorError, match=match) as e:
        checked_annotate(Liar(mode), [req("r1", "q", "a", "b")])
    assert "'liar'" in str(e.value)


# ----------------------------------------------------------------------------- JSONL


def _fake_step_folder(run_dir, requests):
    folder = run_dir / "round_01" / "annotate"
    write_jsonl(folder / "requests.jsonl", [r.to_row() for r in requests])
    atomic_write_json(folder / "requests.json", {"fingerprint": "x", "requests": len(requests), "skipped": {}})
    return folder


def test_jsonl_export_import_round_trip_and_refusals(tmp_path):
    from posttrain.stages.annotate import export_requests, import_labels
    from posttrain.stages.annotate import preference_rows, read_labels_file

    requests = [req("r01-a", "Sort these numbers: 2 1", "1 2", "2 1"), req("r01-b", "hi", "x", "y")]
    folder = _fake_step_folder(tmp_path, requests)
    assert export_requests(tmp_path, 1, tmp_path / "out.jsonl") == 2
    exported = list(iter_jsonl(tmp_path / "out.jsonl"))
    assert [r["id"] for r in exported] == ["r01-a", "r01-b"]
    assert exported[0]["response_a"]["model"] == "round" and exported[0]["response_b"]["sampling"]

    labels = [{"id": "r01-a", "pair_sha256": exported[0]["pair_sha256"], "preferred": "a", "strength": "better",
               "edited": "1 2 ", "annotator": "alice"},
              {"id": "r01-b", "pair_sha256": exported[1]["pair_sha256"], "preferred": None, "reason": "unsure"}]
    write_jsonl(tmp_path / "labels.jsonl", labels)
    got = import_labels(tmp_path, 1, tmp_path / "labels.jsonl")
    assert got == {"imported": 2, "replaced": 0, "changed": 0, "labelled": 2, "requests": 2}
    kept = read_labels_file(folder)
    assert kept["r01-a"].annotator == "alice" and kept["r01-b"].preferred is None
    rows, counts = preference_rows(requests, kept)
    assert counts["labelled"] == 1 and counts["abstained"] == 1 and counts["edited"] == 0  # edit == chosen
    assert rows[0]["chosen"][0]["content"] == "1 2" and rows[0]["chosen_model"] == "round"

    # A label joined to a response that changed since the export is refused, naming file, row, field.
    changed = [req("r01-a", "Sort these numbers: 2 1", "1 2", "2 1 1"), requests[1]]
    _fake_step_folder(tmp_path, changed)
    with pytest.raises(data.DataErrors) as e:
        import_labels(tmp_path, 1, tmp_path / "labels.jsonl")
    text = str(e.value)
    assert f"{tmp_path / 'labels.jsonl'}: row 1: field 'pair_sha256'" in text
    assert "responses changed since the export" in text
    assert "row 2" not in text  # the unchanged request's label is fine; nothing was imported though
    assert read_labels_file(folder)["r01-a"].pair_sha256 == exported[0]["pair_sha256"]

    # Unknown request, bad strength, duplicate: every row is reported.
    write_jsonl(tmp_path / "bad.jsonl", [
        {"id": "r09-zzz", "pair_sha256": "0", "preferred": "a", "strength": "better"},
        {"id": "r01-b", "pair_sha256": exported[1]["pair_sha256"], "preferred": "b", "strength": "much"},
        {"id": "r01-b", "pair_sha256": exported[1]["pair_sha256"], "preferred": "b", "strength": "better"},
        {"id": "r01-b", "pair_sha256": exported[1]["pair_sha256"], "preferred": "b", "strength": "better", "x": 1},
    ])
    with pytest.raises(data.DataErrors) as e:
        import_labels(tmp_path, 1, tmp_path / "bad.jsonl")
    text = str(e.value)
    assert "row 1: field 'id': no request 'r09-zzz'" in text
    assert "row 2: field 'strength'" in text
    assert "row 4: field 'x': unknown field" in text

    # Once the step is recorded, its labels cannot change under it.
    atomic_write_json(folder / "record.json", {"stage": "annotate"})
    with pytest.raises(FileExistsError, match="has finished"):
        import_labels(tmp_path, 1, tmp_path / "labels.jsonl")


# ----------------------------------------------------------------------------- the step


def _ctx(tmp_path, model_dir, annotator, **cfg):
    from posttrain.stages.annotate import AnnotateConfig
    from posttrain.stage import StageContext

    prompts = [{"id": f"p{i}", "prompt": f"Sort these numbers: {i} 3 1"} for i in range(6)]
    write_jsonl(tmp_path / "pool.jsonl", prompts)
    config = AnnotateConfig.model_validate({
        "prompts": [str(tmp_path / "pool.jsonl")], "comparisons": 4, "models": ["round", "previous"],
        "sampling": [{"temperature": 1.0, "max_new_tokens": 6}, {"temperature": 1.5, "max_new_tokens": 6}],
        "annotator": {"target": "posttrain.annotate.jsonl:ExternalAnnotator"}, "require_finished": False,
        "backend": "transformers", **cfg})
    run_dir = tmp_path / "run"
    return StageContext(stage="annotate", round=1, run_dir=run_dir, out_dir=run_dir / "round_01" / "annotate",
                        config=config, inputs={"model_a": str(model_dir), "model_b": str(model_dir),
                                               "prompt_files": [str(tmp_path / "pool.jsonl")],
                                               "model_names": ["round", "previous"]},
                        seed=1000, annotator=annotator)


def test_annotate_step_waits_for_labels_then_writes_a_loadable_batch(tmp_path, tiny_model_dir):
    from posttrain.annotate.jsonl import ExternalAnnotator
    from posttrain.stages.annotate import import_labels
    from posttrain.stages.annotate import WaitingForLabels, run

    ctx = _ctx(tmp_path, tiny_model_dir, ExternalAnnotator())
    with pytest.raises(WaitingForLabels, match=r"waiting for labels: 0/\d+ labelled, export with `posttrain annotate export \S+ 1 requests.jsonl`"):
        run(ctx)
    folder = ctx.out_dir
    requests = list(iter_jsonl(folder / "requests.jsonl"))
    skipped = read_json(folder / "requests.json")["skipped"]
    assert (skipped["pool"], skipped["drawn"]) == (6, 4)
    assert requests and len(requests) + sum(v for k, v in skipped.items() if k not in ("pool", "drawn")) == 4
    for r in requests:
        assert r["id"].startswith("r01-p")
        assert {r["response_a"]["model"], r["response_b"]["model"]} == {"round", "previous"}
        temps = {r[k]["model"]: r[k]["sampling"]["temperature"] for k in ("response_a", "response_b")}
        assert temps == {"round": 1.0, "previous": 1.5}
    assert (folder / "waiting.json").is_file()

    # A second run reuses the same requests (nothing regenerated) and still waits.
    mtime = (folder / "requests.jsonl").stat().st_mtime_ns
    with pytest.raises(WaitingForLabels):
        run(ctx)
    assert (folder / "requests.jsonl").stat().st_mtime_ns == mtime and requests == list(
        iter_jsonl(folder / "requests.jsonl"))

    labels = [{"id": r["id"], "pair_sha256": r["pair_sha256"], "preferred": "a" if i % 2 == 0 else "b",
               "strength": "better", **({"edited": "1 2 3"} if i == 0 else {})} for i, r in enumerate(requests)]
    labels[-1] = {"id": requests[-1]["id"], "pair_sha256": requests[-1]["pair_sha256"], "preferred": None}
    write_jsonl(tmp_path / "labels.jsonl", labels)
    import_labels(ctx.run_dir, 1, tmp_path / "labels.jsonl")
    result = run(ctx)
    assert not (folder / "waiting.json").exists()
    m = result.metrics
    assert (m["requests"], m["labelled"], m["abstained"], m["edited"]) == (len(requests), len(requests) - 1, 1, 1)
    assert sum(m["chosen_by_model"].values()) == len(requests) - 1
    batch = data.load_preferences([ctx.run_dir / result.outputs["preferences"]])
    assert len(batch) == len(requests) - 1 and all(p.strength == "better" for p in batch)
    assert batch[0].edited == "1 2 3"
    first = requests[0]
    assert batch[0].chosen == first["response_a"]["text"] and batch[0].rejected == first["response_b"]["text"]


def test_annotate_step_starts_again_when_its_inputs_change_while_waiting(tmp_path, tiny_model_dir):
    from posttrain.annotate.jsonl import ExternalAnnotator
    from posttrain.stages.annotate import import_labels
    from posttrain.stages.annotate import WaitingForLabels, read_labels_file, run

    ctx = _ctx(tmp_path, tiny_model_dir, ExternalAnnotator())
    with pytest.raises(WaitingForLabels):
        run(ctx)
    first = list(iter_jsonl(ctx.out_dir / "requests.jsonl"))
    write_jsonl(tmp_path / "labels.jsonl", [{"id": first[0]["id"], "pair_sha256": first[0]["pair_sha256"],
                                             "preferred": "a", "strength": "better"}])
    import_labels(ctx.run_dir, 1, tmp_path / "labels.jsonl")
    # Another sampling setup means other responses: the old labels must not carry over.
    changed = _ctx(tmp_path, tiny_model_dir, ExternalAnnotator(),
                   sampling=[{"temperature": 0.5, "max_new_tokens": 6}])
    with pytest.raises(WaitingForLabels, match=r": 0/\d+ labelled"):
        run(changed)
    again = list(iter_jsonl(ctx.out_dir / "requests.jsonl"))
    assert {r["response_a"]["sampling"]["temperature"] for r in again} == {0.5}
    assert read_labels_file(ctx.out_dir) == {}


def test_ranking_accuracy_by_hand():
    from posttrain.stages.annotate import ranking_accuracy

    got = ranking_accuracy([1.0, 2.0, None, 3.0], [0.0, 2.0, 1.0, 4.0],
                           ["better", "better", "better", "slightly_better"])
    # pairs 1 (right), 2 (tie: half), 4 (wrong); pair 3 abstained
    assert got == {"pairs": 3, "abstained": 1, "accuracy": 0.5,
                   "by_strength": {"better": 0.75, "slightly_better": 0.0}}


# ----------------------------------------------------------------------------- rounds


def test_round_resolves_fixed_and_annotated_batches_from_records(tmp_path):
    import yaml

    from posttrain.recipe import load_recipe
    from posttrain.records import Plan, write_record
    from posttrain.rounds.orchestrator import Round, RoundError

    for name in ("fixed1.jsonl", "fixed3.jsonl"):
        write_jsonl(tmp_path / name, [{"prompt": "q", "chosen": "a", "rejected": "b"}])
    recipe = {"name": "t", "rounds": 3, "models": {"base": str(tmp_path)},
              "data": {"preference_batches": [{"path": "fixed1.jsonl", "round": 1},
                                              {"path": "fixed3.jsonl", "round": 3}]},
              "annotate": {"prompts": ["fixed1.jsonl"],
                           "annotator": {"target": "posttrain.annotate.world:WorldAnnotator"}}}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    loaded = load_recipe(tmp_path / "r.yaml")
    run_dir = tmp_path / "run"
    with pytest.raises(RoundError, match="the preference batch that round 1's annotate step labels, but that step"):
        Round(2, loaded, run_dir).preference_files(only_latest=False)
    for m in (1, 2):
        batch = run_dir / f"round_{m:02d}" / "annotate" / "preferences.jsonl"
        write_jsonl(batch, [{"prompt": "q", "chosen": f"c{m}", "rejected": "r"}])
        write_record(run_dir, m, "annotate", plan=Plan("run", None, "h", {}), started=0.0,
                     outputs={"preferences": f"round_{m:02d}/annotate/preferences.jsonl"},
                     metrics={"labelled": 1})
    r2 = Round(2, loaded, run_dir)
    assert r2.preference_files(only_latest=False) == [str(tmp_path / "fixed1.jsonl"),
                                                      str(run_dir / "round_01/annotate/preferences.jsonl")]
    assert r2.preference_files(only_latest=True) == [str(run_dir / "round_01/annotate/preferences.jsonl")]
    r3 = Round(3, loaded, run_dir)
    # Round 3: the fixed round-3 batch and round 2's annotated batch are both the latest.
    assert r3.preference_files(only_latest=True) == [str(tmp_path / "fixed3.jsonl"),
                                                     str(run_dir / "round_02/annotate/preferences.jsonl")]
    assert len(r3.preference_files(only_latest=False)) == 4
    # rm resolves its data through it (dpo does too; the slow two-round test runs both).
    from posttrain.stage import get

    assert get("rm").resolve(r3).preference_files == r3.preference_files(only_latest=False)


@pytest.mark.slow
def test_round_two_trains_on_what_round_one_annotated(tmp_path):
    """Two rounds of the shrunk demo with an annotate step: round 1's world-annotated batch
    (its two latest models' responses) is round 2's newest RM data and its whole DPO data."""
    import yaml

    from posttrain.records import read_record
    from tests.test_rounds import cli, small_recipe

    path = small_recipe(tmp_path, n_prompts=16)
    recipe = yaml.safe_load(path.read_text())
    recipe["rounds"] = 2
    recipe["data"]["preference_batches"] = recipe["data"]["preference_batches"][:1]
    recipe["overrides"] = {"2": {"annotate": {"enabled": False}}}  # the last round's batch has no round
    recipe["annotate"] = {
        "prompts": ["world:prompts/train.jsonl"], "comparisons": 48, "models": ["round", "previous"],
        "sampling": [{"temperature": 1.0, "max_new_tokens": 24}],
        "annotator": {"target": "posttrain.annotate.world:WorldAnnotator", "kwargs": {"seed": 3}},
        "backend": "transformers"}
    path.write_text("# posttrain run --recipe small.yaml --run-dir run --rounds 1-2\n" + yaml.safe_dump(recipe))
    run_dir = tmp_path / "run"
    done = cli("run", "--rounds", "1-2", "--no-eval", "--recipe", str(path), "--run-dir", str(run_dir))
    assert done.returncode == 0, done.stderr[-3000:]

    ann = read_record(run_dir, 1, "annotate")
    m = ann["metrics"]
    assert m["labelled"] > 0 and m["requests"] == m["labelled"] + m["abstained"]
    assert set(m["chosen_by_model"]) == {"round", "previous"}
    batch = ann["outputs"]["preferences"]
    rows = list(iter_jsonl(run_dir / batch["path"]))
    assert len(rows) == m["labelled"] and {r["chosen_model"] for r in rows} <= {"round", "previous"}
    assert read_record(run_dir, 2, "annotate") is None  # the last round has no batch to make
    # Round 1's RM, which never saw the batch, is measured on it.
    acc = m["rm_accuracy"]
    assert acc["pairs"] + acc["abstained"] == m["labelled"] and 0.0 <= acc["accuracy"] <= 1.0
    rm2 = read_record(run_dir, 2, "rm")["inputs"]["inputs"]["preference_files"]
    dpo2 = read_record(run_dir, 2, "dpo")["inputs"]["inputs"]["preference_files"]
    assert [f["sha256"] for f in rm2][-1] == batch["sha256"] and len(rm2) == 2  # fixed round-1 batch + annotated
    assert [f["sha256"] for f in dpo2] == [batch["sha256"]]
    assert read_record(run_dir, 2, "rm")["metrics"]["rankings"] > read_record(run_dir, 1, "rm")["metrics"]["rankings"]

    status = cli("status", str(run_dir))
    assert "done" in status.stdout and "labelled=" in status.stdout


def test_validate_checks_the_annotator_target_before_anything_runs(tmp_path):
    import yaml

    from posttrain.recipe import RecipeError, load_recipe

    recipe = {"name": "t", "rounds": 2, "models": {"base": str(tmp_path)},
              "annotate": {"prompts": ["pool.jsonl"], "models": ["dpo:0", "dpo:1"],
                           "annotator": {"target": "os:system"}}}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    with pytest.raises(RecipeError, match=r"annotate.annotator.target: annotator target 'os:system' is a function"):
        load_recipe(tmp_path / "r.yaml").check(files=False)
    with pytest.raises(RecipeError, match=r"annotate.prompts\[0\]: 'pool.jsonl': no such file"):
        recipe["annotate"]["annotator"] = {"target": "posttrain.annotate.ai:RewardAnnotator",
                                           "kwargs": {"reward": {"target": "posttrain.world.task:TaskReward"}}}
        (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
        load_recipe(tmp_path / "r.yaml").check(files=True)
    recipe["annotate"]["models"] = ["round", "round"]
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    with pytest.raises(RecipeError, match="the two models must differ"):
        load_recipe(tmp_path / "r.yaml")
    recipe["annotate"]["models"] = ["round", "best"]
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    with pytest.raises(RecipeError, match="expected round, previous, sft or dpo:K"):
        load_recipe(tmp_path / "r.yaml")


def test_cli_annotate_export_and_import(tmp_path, capsys):
    from posttrain.cli import main

    requests = [req("r01-a", "Sort these numbers: 2 1", "1 2", "2 1")]
    _fake_step_folder(tmp_path, requests)
    assert main(["annotate", "export", str(tmp_path), "1", str(tmp_path / "out.jsonl")]) == 0
    assert "wrote 1 requests" in capsys.readouterr().out
    row = next(iter_jsonl(tmp_path / "out.jsonl"))
    write_jsonl(tmp_path / "labels.jsonl", [{"id": row["id"], "pair_sha256": row["pair_sha256"],
                                             "preferred": "a", "strength": "better"}])
    assert main(["annotate", "import", str(tmp_path), "1", str(tmp_path / "labels.jsonl")]) == 0
    assert "1/1 requests labelled" in capsys.readouterr().out
    write_jsonl(tmp_path / "labels.jsonl", [{"id": row["id"], "pair_sha256": "x", "preferred": "a"}])
    assert main(["annotate", "import", str(tmp_path), "1", str(tmp_path / "labels.jsonl")]) == 1
    assert "row 1: field 'pair_sha256'" in capsys.readouterr().err
    assert main(["annotate", "export", str(tmp_path), "2", str(tmp_path / "x.jsonl")]) == 1
    assert "round 2 has no annotation requests yet" in capsys.readouterr().err


def test_cli_run_that_waits_for_labels_is_not_a_failure(tmp_path, capsys, monkeypatch):
    from posttrain import api
    from posttrain.stages.annotate import WaitingForLabels, waiting_summary
    from posttrain.cli import main

    folder = tmp_path / "round_01" / "annotate"
    info = {"requests": 8, "labelled": 3, "waiting": 5, "where": "http://localhost:8080/projects/1/data"}
    atomic_write_json(folder / "waiting.json", {**info, "summary": waiting_summary(info)})

    def waits(*args, **kwargs):
        raise WaitingForLabels(1, info)

    monkeypatch.setattr(api, "run", waits)
    assert main(["run", "--recipe", "demo", "--run-dir", str(tmp_path)]) == 0
    captured = capsys.readouterr()
    assert "round 1 annotate: waiting for labels: 3/8 labelled, label at http://localhost:8080/projects/1/data" \
        in captured.err
    assert "waiting 3/8 labelled" in captured.out  # the status table's annotate column

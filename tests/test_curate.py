"""The curate stage (report 4.2.3): each filter on hand-made rows, exact keeps, drops and reasons."""

from __future__ import annotations

import math

import numpy as np
import pytest
from pydantic import ValidationError

from posttrain.stages.curate import (
    CurateConfig,
    CurationRow,
    RuleSpec,
    Scores,
    clean_preferences,
    curate_rows,
    parse_judge,
    percentile_ranks,
    priority,
    rm_high_quality,
    rule_violations,
    semantic_dedup,
)
from posttrain.files import iter_jsonl, read_json, write_jsonl

APOLOGY = RuleSpec(name="apology", pattern=r"\b(i'?m sorry|i apologi[sz]e)\b", max_count=0)
BANG = RuleSpec(name="exclamation", pattern="!", max_count=3, max_per_100_words=10)
EMOJI = RuleSpec(name="emoji", pattern="[\U0001F300-\U0001FAFF]", max_count=2)


def row(i, answer, kind="top1", user="Sort 3 1 2", earlier=None):
    msgs = [{"role": "user", "content": user}]
    if earlier is not None:
        msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": earlier}] + msgs
    msgs.append({"role": "assistant", "content": answer})
    return CurationRow(f"r{i}", msgs, kind, "last_turn" if kind == "top1" else "all_turns")


# ----------------------------------------------------------------------------- rules


def test_rule_violations_count_rate_and_case():
    text = "I'm sorry! I apologise! Here: 1 2 3!"  # 8 words, 3 "!", 2 apologies
    assert rule_violations(text, [APOLOGY, BANG, EMOJI]) == [
        {"rule": "apology", "count": 2, "per_100_words": 25.0, "limit": "count 2 > 0"},
        {"rule": "exclamation", "count": 3, "per_100_words": 37.5,
         "limit": "37.5 per 100 words > 10"},
    ]
    # One '!' in a short reply is a high rate but under rate_min_count (2): not over-use.
    assert rule_violations("Done!", [BANG]) == []
    # Case: ignore_case off, "I'M SORRY" does not match a lower-case pattern.
    strict = RuleSpec(name="apology", pattern="i'm sorry", ignore_case=False, max_count=0)
    assert rule_violations("I'M SORRY", [strict]) == []
    assert rule_violations("ok i'm sorry", [strict])[0]["count"] == 1


def test_rule_config_errors_name_the_problem():
    with pytest.raises(ValidationError, match="not a valid regex"):
        RuleSpec(name="x", pattern="(", max_count=0)
    with pytest.raises(ValidationError, match="set max_count, max_per_100_words or both"):
        RuleSpec(name="x", pattern="!")
    with pytest.raises(ValidationError, match=r"\{conversation\}"):
        CurateConfig.model_validate({"judge": {"prompt": "rate it"}})
    with pytest.raises(ValidationError, match="capture group"):
        CurateConfig.model_validate({"judge": {"quality_pattern": "quality: \\d"}})
    with pytest.raises(ValidationError, match="extra"):
        CurateConfig.model_validate({"dedupe": {}})
    with pytest.raises(ValidationError, match="no filter is on"):
        CurateConfig.model_validate({"enabled": True})
    with pytest.raises(ValidationError, match="preferences: true cleans preference rows with the rules"):
        CurateConfig.model_validate({"preferences": True})


def test_rules_drop_exactly_the_offending_rows_with_reasons():
    rows = [
        row(0, "1 2 3"),
        row(1, "I'm sorry, 1 2 3"),  # 5 words
        row(2, "1 2 3 \U0001F600\U0001F600\U0001F600"),
        row(3, "1 2 3", earlier="I apologize for that"),  # top-1: only the last turn is trained
        row(4, "1 2 3", kind="sft", earlier="I apologize for that"),  # sft data: every turn is
    ]
    cfg = CurateConfig.model_validate({"enabled": True, "rules": {"enabled": True}})
    cfg.rules.rules = [APOLOGY, BANG, EMOJI]
    decisions, summary = curate_rows(rows, cfg, Scores())
    assert [d.keep for d in decisions] == [True, False, False, True, False]
    assert decisions[1].reasons == [{"filter": "rule", "rule": "apology", "count": 1, "per_100_words": 20.0,
                                     "limit": "count 1 > 0"}]
    assert decisions[2].reasons[0]["rule"] == "emoji" and decisions[2].reasons[0]["count"] == 3
    assert decisions[4].reasons[0]["rule"] == "apology"
    assert summary["dropped_by_reason"] == {"rule:apology": 2, "rule:emoji": 1}
    assert (summary["rows"], summary["kept"], summary["dropped"]) == (5, 2, 3)
    # turns: all checks earlier assistant turns of top-1 rows too.
    cfg.rules.turns = "all"
    decisions, _ = curate_rows(rows, cfg, Scores())
    assert [d.keep for d in decisions] == [True, False, False, False, False]


# ----------------------------------------------------------------------------- quality


def test_rm_top_quartile_by_hand():
    # numpy's linear quantile of [1, 2, 3, 4, 5] at 0.75: position 0.75 * 4 = 3 -> 4.0
    high, t = rm_high_quality([3.0, 1.0, None, 5.0, 2.0, 4.0], 0.75)
    assert t == 4.0
    assert high == [False, False, False, True, False, True]
    # position 0.75 * 3 = 2.25 -> 3 + 0.25 * (4 - 3)
    assert rm_high_quality([1.0, 2.0, 3.0, 4.0], 0.75)[1] == pytest.approx(3.25)
    assert rm_high_quality([None, None], 0.75) == ([False, False], None)


def test_parse_judge_reads_the_recipe_patterns():
    cfg = CurateConfig().judge
    assert parse_judge("Quality: 4\nDifficulty: 2", cfg.quality_pattern, cfg.difficulty_pattern) == (4.0, 2.0)
    assert parse_judge("quality=3.5 difficulty = 5", cfg.quality_pattern, cfg.difficulty_pattern) == (3.5, 5.0)
    assert parse_judge("I think it is fine", cfg.quality_pattern, cfg.difficulty_pattern) == (None, None)
    assert parse_judge("Q 7 D 1", r"Q (\d)", r"D (\d)") == (7.0, 1.0)


def test_quality_keeps_the_union_of_rm_and_judge():
    rows = [row(i, f"answer {i}") for i in range(5)]
    rm = [1.0, 2.0, 3.0, 4.0, 5.0]  # top quartile: >= 4.0 -> rows 3, 4
    judge_q = [5.0, 2.0, None, 1.0, 1.0]  # high (>= 4): row 0 only; row 2 unparsed
    cfg = CurateConfig.model_validate({"enabled": True, "rm_quality": {"enabled": True},
                                       "judge": {"enabled": True}})
    decisions, summary = curate_rows(rows, cfg, Scores(rm=rm, judge_quality=judge_q, judge_difficulty=[None] * 5))
    assert [d.keep for d in decisions] == [True, False, False, True, True]
    assert decisions[1].reasons == [{"filter": "quality", "rm_score": 2.0, "rm_threshold": 4.0,
                                     "judge_quality": 2.0, "judge_threshold": 4.0}]
    assert decisions[2].reasons[0]["judge_quality"] is None
    assert summary["judge_unparsed"] == 1
    assert summary["dropped_by_reason"] == {"quality": 2}
    # The RM alone: only its top quartile.
    cfg.judge.enabled = False
    decisions, _ = curate_rows(rows, cfg, Scores(rm=rm))
    assert [d.keep for d in decisions] == [False, False, False, True, True]
    assert decisions[0].reasons == [{"filter": "quality", "rm_score": 1.0, "rm_threshold": 4.0}]


def test_a_filter_that_is_on_without_its_scores_is_an_error():
    cfg = CurateConfig.model_validate({"enabled": True, "rm_quality": {"enabled": True}})
    with pytest.raises(ValueError, match="rm_quality is on but the RM scores are missing"):
        curate_rows([row(0, "a")], cfg, Scores())


def test_percentile_ranks_and_priority_by_hand():
    assert percentile_ranks([-3.0, 1.0, None, 1.0, 7.0]) == [0.25, 0.75, None, 0.75, 1.0]
    assert priority([0.5, None, 4.0], [2.0, 3.0, None]) == [1.0, 3.0, 4.0]


# ----------------------------------------------------------------------------- dedup


def unit(deg):
    return [math.cos(math.radians(deg)), math.sin(math.radians(deg))]


def test_greedy_dedup_keeps_by_priority_and_a_dropped_row_blocks_nothing():
    # a=0 deg, b=16 deg, c=32 deg: cos(a,b) = cos(b,c) = 0.961, cos(a,c) = 0.848
    emb = np.array([unit(0), unit(16), unit(32), unit(90)], dtype=np.float32)
    res = semantic_dedup(emb, [1.0, 1.0, 1.0, 1.0], threshold=0.95)
    # a first (ties by index); b is a's duplicate; c is similar only to the dropped b: kept.
    assert res.keep == [True, False, True, True]
    assert res.duplicate_of == [None, 0, None, None]
    assert res.similarity[1] == pytest.approx(math.cos(math.radians(16)), abs=1e-6)
    # b has the highest priority: it is kept, and now both a and c are its duplicates.
    res = semantic_dedup(emb, [1.0, 2.0, 1.0, 1.0], threshold=0.95)
    assert res.keep == [False, True, False, True]
    assert res.duplicate_of == [1, None, 1, None]


def test_a_similarity_equal_to_the_threshold_is_a_duplicate():
    emb = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]], dtype=np.float32)
    assert semantic_dedup(emb, [0, 0, 0], threshold=1.0).keep == [True, False, True]
    assert semantic_dedup(np.array([unit(0), unit(60)]), [0, 0], threshold=0.5).keep == [True, False]


def test_dedup_stays_inside_clusters():
    # Two far-apart groups, each of 50 copies of one direction plus small noise: k-means with
    # 2 clusters finds them, and each keeps exactly one row (the highest priority).
    rng = np.random.default_rng(0)
    a, b = np.eye(16, dtype=np.float32)[0], np.eye(16, dtype=np.float32)[1]
    emb = np.concatenate([a + 0.01 * rng.normal(size=(50, 16)), b + 0.01 * rng.normal(size=(50, 16))])
    prio = list(rng.random(100))
    res = semantic_dedup(emb, prio, threshold=0.9, rows_per_cluster=50)
    assert res.n_clusters == 2
    assert len(set(res.clusters[:50])) == 1 and len(set(res.clusters[50:])) == 1
    assert [i for i, k in enumerate(res.keep) if k] == [int(np.argmax(prio[:50])), 50 + int(np.argmax(prio[50:]))]


def test_chunked_neighbour_search_gives_the_same_greedy_as_one_search(monkeypatch):
    # Invariant: how many rows one range search covers changes memory, never the result.
    from posttrain.curate import dedup

    rng = np.random.default_rng(3)
    emb = np.repeat(rng.normal(size=(60, 8)), 5, axis=0) + 0.05 * rng.normal(size=(300, 8))
    prio = list(rng.random(300))
    whole = semantic_dedup(emb, prio, 0.97, rows_per_cluster=300)
    monkeypatch.setattr(dedup, "SEARCH_CHUNK", 7)
    chunked = semantic_dedup(emb, prio, 0.97, rows_per_cluster=300)
    assert 50 < sum(whole.keep) < 300
    assert (chunked.keep, chunked.duplicate_of) == (whole.keep, whole.duplicate_of)
    assert chunked.similarity == pytest.approx(whole.similarity)


def test_dedup_rejects_bad_embeddings():
    with pytest.raises(ValueError, match="NaN"):
        semantic_dedup(np.array([[np.nan, 1.0]]), [0], 0.9)
    with pytest.raises(ValueError, match="2 embeddings but 1 priorities"):
        semantic_dedup(np.eye(2), [0], 0.9)


def test_curate_rows_dedups_only_rows_that_passed_and_orders_by_quality():
    rows = [row(0, "I'm sorry"), row(1, "1 2 3"), row(2, "1 2 3 "), row(3, "other")]
    emb = np.array([unit(0), unit(0), unit(1), unit(90)], dtype=np.float32)
    cfg = CurateConfig.model_validate({"enabled": True, "rules": {"enabled": True}, "dedup": {"enabled": True},
                                       "judge": {"enabled": True, "high_quality": 1}})
    cfg.rules.rules = [APOLOGY]
    scores = Scores(judge_quality=[5.0, 2.0, 4.0, 3.0], judge_difficulty=[1.0, 1.0, 1.0, 1.0], embeddings=emb)
    decisions, summary = curate_rows(rows, cfg, scores)
    # row 0 fails the rule (so it is not a dedup candidate); row 2 (quality 4) beats row 1 (2).
    assert [d.keep for d in decisions] == [False, False, True, True]
    assert decisions[1].reasons == [{"filter": "duplicate", "of": "r2", "similarity": pytest.approx(0.9998, abs=1e-4),
                                     "threshold": 0.95, "priority": 2.0}]
    assert summary["dropped_by_reason"] == {"duplicate": 1, "rule:apology": 1}


# ----------------------------------------------------------------------------- preferences


def test_clean_preferences_checks_chosen_and_edited_not_rejected():
    from posttrain.data import Preference

    prefs = [Preference("p0", [{"role": "user", "content": "q"}], chosen="fine", rejected="I'm sorry"),
             Preference("p1", [{"role": "user", "content": "q"}], chosen="I'm sorry", rejected="no"),
             Preference("p2", [{"role": "user", "content": "q"}], chosen="ok", rejected="no", edited="I apologize")]
    kept, dropped = clean_preferences(prefs, [APOLOGY])
    assert [p.id for p in kept] == ["p0"]
    assert [(d["id"], d["reason"], d["reasons"][0]["side"]) for d in dropped] == [
        ("p1", "rule:apology", "chosen"), ("p2", "rule:apology", "edited")]


# ----------------------------------------------------------------------------- the stage


def _ctx(tmp_path, model_dir, cfg: CurateConfig, top1, sft):
    from posttrain.stage import StageContext

    run = tmp_path / "run"
    write_jsonl(tmp_path / "top1.jsonl", top1)
    write_jsonl(tmp_path / "sft.jsonl", sft)
    return StageContext(stage="curate", round=1, run_dir=run, out_dir=run / "round_01" / "curate", config=cfg,
                        inputs={"top1_file": str(tmp_path / "top1.jsonl"), "sft_files": [str(tmp_path / "sft.jsonl")],
                                "embedding_model": str(model_dir)})


def _msgs(q, a):
    return [{"role": "user", "content": q}, {"role": "assistant", "content": a}]


def test_stage_writes_kept_rows_reasons_and_resumes_from_its_cache(tmp_path, tiny_model_dir, monkeypatch):
    from posttrain.stages import curate

    top1 = [{"id": "round_01/a", "messages": _msgs("Sort 3 1 2", "1 2 3"), "score": 1.0},
            {"id": "round_01/b", "messages": _msgs("Sort 3 1 2", "1 2 3"), "score": 0.9},  # a's duplicate
            {"id": "round_01/c", "messages": _msgs("Sort 9 8", "I'm sorry, 8 9"), "score": 0.5}]
    sft = [{"id": "s1", "messages": _msgs("Sort 5 4", "4 5")}]
    cfg = CurateConfig.model_validate({"enabled": True, "rules": {"enabled": True}, "dedup": {"enabled": True}})
    cfg.rules.rules = [APOLOGY]
    ctx = _ctx(tmp_path, tiny_model_dir, cfg, top1, sft)
    ctx.out_dir.mkdir(parents=True)
    result = curate.run(ctx)
    out = ctx.out_dir
    assert [r["id"] for r in iter_jsonl(out / "top1.jsonl")] == ["round_01/a"]
    assert list(iter_jsonl(out / "top1.jsonl"))[0] == top1[0]  # written back as read
    assert list(iter_jsonl(out / "sft.jsonl")) == [{"id": "s1", "messages": sft[0]["messages"]}]
    dropped = {d["id"]: d for d in iter_jsonl(out / "dropped.jsonl")}
    assert dropped["round_01/c"]["reason"] == "rule:apology"
    assert dropped["round_01/b"]["reason"] == "duplicate"
    assert dropped["round_01/b"]["reasons"][0]["of"] == "round_01/a"
    assert dropped["round_01/b"]["reasons"][0]["similarity"] == pytest.approx(1.0, abs=1e-4)
    m = result.metrics
    assert (m["kept"], m["dropped"], m["dropped_by_reason"]) == (2, 2, {"duplicate": 1, "rule:apology": 1})
    assert m["by_kind"] == {"top1": {"read": 3, "kept": 1}, "sft": {"read": 1, "kept": 1}}
    assert [d["id"] for d in m["dropped_examples"]] == ["round_01/b", "round_01/c"]
    assert result.outputs == {"top1": "round_01/curate/top1.jsonl", "sft": "round_01/curate/sft.jsonl",
                              "dropped": "round_01/curate/dropped.jsonl", "report": "round_01/curate/report.json"}
    assert read_json(out / "report.json")["kept"] == 2
    from posttrain.stage import format_headline, headline

    assert format_headline(headline("curate", m)) == "kept=2 dropped=2 duplicate=1 rule:apology=1"

    # A second run (a resumed stage) reads the embeddings from work/ instead of embedding again.
    def no_embedding(*a, **k):
        raise AssertionError("embedded twice")

    monkeypatch.setattr(curate, "embed_dialogs", no_embedding)
    assert curate.run(ctx).metrics["kept"] == 2


def test_stage_scores_with_the_rm_and_a_judge_through_the_generation_backend(tmp_path, tiny_model_dir):
    """The RM and the judge are real models here (the random tiny Llama, its RM head untrained):
    the RM keeps its top quartile, and the judge's replies, which name no score, vote no, so
    the union keeps exactly the RM's top row; every dropped row carries the judge's reply."""
    from posttrain.stages import curate

    top1 = [{"id": f"t{i}", "messages": _msgs(f"Sort these numbers: {i} 2", f"2 {i}")} for i in range(3, 7)]
    cfg = CurateConfig.model_validate({"enabled": True, "rm_quality": {"enabled": True},
                                       "judge": {"enabled": True, "max_new_tokens": 4, "backend": "transformers"}})
    ctx = _ctx(tmp_path, tiny_model_dir, cfg, top1, [])
    ctx.inputs.reward_model = ctx.inputs.judge_model = str(tiny_model_dir)
    ctx.inputs.sft_files = []
    ctx.out_dir.mkdir(parents=True)
    result = curate.run(ctx)
    m = result.metrics
    assert (m["kept"], m["dropped_by_reason"], m["judge_unparsed"]) == (1, {"quality": 3}, 4)
    dropped = list(iter_jsonl(ctx.out_dir / "dropped.jsonl"))
    assert all(d["reasons"][0]["rm_score"] < d["reasons"][0]["rm_threshold"] for d in dropped)
    assert all(isinstance(d["judge_reply"], str) and d["reasons"][0]["judge_quality"] is None for d in dropped)


def test_judge_prompt_renders_the_dialog_into_the_recipe_template(tiny_tokenizer):
    from posttrain.stages.curate import judge_prompt_ids

    rows = [row(0, "1 2 3")]
    ids = judge_prompt_ids(tiny_tokenizer, "Grade this:\n{conversation}", rows)
    text = tiny_tokenizer.decode(ids[0])
    assert "Grade this:\nuser: Sort 3 1 2\nassistant: 1 2 3" in text
    assert text.rstrip().endswith("assistant<|end_header_id|>")  # the generation prompt: the judge answers next


def test_dry_run_reports_but_hands_sft_nothing(tmp_path, tiny_model_dir):
    from posttrain.stages import curate

    top1 = [{"id": "a", "messages": _msgs("q", "I'm sorry")}, {"id": "b", "messages": _msgs("q", "fine")}]
    cfg = CurateConfig.model_validate({"enabled": True, "dry_run": True, "rules": {"enabled": True}})
    cfg.rules.rules = [APOLOGY]
    ctx = _ctx(tmp_path, tiny_model_dir, cfg, top1, [])
    ctx.out_dir.mkdir(parents=True)
    result = curate.run(ctx)
    assert set(result.outputs) == {"dropped", "report"}  # sft then reads the uncurated files
    assert [d["id"] for d in iter_jsonl(ctx.out_dir / "dropped.jsonl")] == ["a"]
    from posttrain.stage import headline

    assert ("dry_run", "yes") in headline("curate", result.metrics)


def test_duplicate_ids_across_top1_and_sft_are_refused(tmp_path, tiny_model_dir):
    from posttrain.stages import curate

    cfg = CurateConfig.model_validate({"enabled": True, "rules": {"enabled": True}})
    ctx = _ctx(tmp_path, tiny_model_dir, cfg, [{"id": "x", "messages": _msgs("q", "a")}],
               [{"id": "x", "messages": _msgs("q", "a")}])
    with pytest.raises(ValueError, match="row id 'x' appears in the top1 rows and again in the sft rows"):
        curate.run(ctx)


def test_embeddings_are_mean_pooled_unit_vectors_and_identical_dialogs_match(tiny_model_dir):
    from posttrain.stages.curate import embed_dialogs

    emb = embed_dialogs(tiny_model_dir, ["user: a\nassistant: b", "user: a\nassistant: b", "user: zzz"],
                        batch_size=2)
    assert emb.shape[0] == 3 and emb.dtype == np.float32
    assert np.allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    assert float(emb[0] @ emb[1]) == pytest.approx(1.0, abs=1e-5)  # padding does not change the mean
    assert float(emb[0] @ emb[2]) < 0.999


def test_embedding_with_the_reward_model_uses_its_backbone(tmp_path, tiny_model_dir):
    # `embed_with: rm`: AutoModel loads a sequence classifier's backbone without its head. The
    # tiny Llama saved as a reward model has the same backbone, so the vectors are the same.
    from posttrain.stages.curate import embed_dialogs
    from posttrain.modeling import load_sequence_classifier, load_tokenizer

    rm_dir = tmp_path / "rm"
    load_sequence_classifier(tiny_model_dir, dtype="float32", device="cpu").save_pretrained(rm_dir)
    load_tokenizer(tiny_model_dir).save_pretrained(rm_dir)
    texts = ["user: a\nassistant: b", "user: Sort 3 1\nassistant: 1 3"]
    assert np.allclose(embed_dialogs(rm_dir, texts), embed_dialogs(tiny_model_dir, texts), atol=1e-5)


def test_general_recipe_ships_the_papers_settings_off():
    from posttrain.recipe import load_recipe

    c = load_recipe("general").for_round(1).curate
    assert c.enabled is False
    assert c.rules.enabled and {r.name for r in c.rules.rules} == {"emoji", "exclamation", "apology"}
    assert c.rm_quality.enabled and c.rm_quality.quantile == 0.75
    assert c.judge.enabled and c.dedup.enabled
    assert rule_violations("I'm sorry, no.", c.rules.rules)[0]["rule"] == "apology"
    assert load_recipe("demo").for_round(1).curate.enabled is False


# ----------------------------------------------------------------------------- a round


@pytest.mark.slow
def test_a_round_with_curate_hands_sft_the_kept_rows_and_shows_its_headline(tmp_path):
    """One small demo round with curate on (the shipped rules, an apology-laden SFT file, dedup
    over the policy's states): the stage is recorded, sft trains on its kept rows, and status
    and the report show its counts; a second run skips it; a changed rule refuses."""
    import yaml

    from posttrain.api import status_table
    from posttrain.records import read_record
    from posttrain.report import write_report
    from posttrain.records import InputsChanged
    from posttrain.rounds.orchestrator import run_round
    from tests.test_rounds import small_recipe

    path = small_recipe(tmp_path, n_prompts=16)
    recipe = yaml.safe_load(path.read_text())
    sft_rows = [{"id": f"clean{i}", "messages": _msgs(f"Sort these numbers: {i} 1 0", f"0 1 {i}")} for i in range(2, 8)]
    sft_rows += [{"id": "sorry", "messages": _msgs("Sort these numbers: 9 8", "I'm sorry, 8 9")},
                 {"id": "dup", "messages": _msgs("Sort these numbers: 2 1 0", "0 1 2")}]  # clean2's twin
    write_jsonl(tmp_path / "sft.jsonl", sft_rows)
    recipe["data"]["sft"] = [str(tmp_path / "sft.jsonl")]
    general = yaml.safe_load((__import__("pathlib").Path(__file__).parent.parent / "recipes" / "general.yaml")
                             .read_text())["curate"]
    recipe["curate"] = {"enabled": True, "rules": general["rules"],
                        "dedup": {"enabled": True, "threshold": 0.9999, "embed_with": "policy"}}
    recipe["eval"]["enabled"] = False
    path.write_text("# test\n" + yaml.safe_dump(recipe))
    run_dir = tmp_path / "run"
    records = run_round(1, path, run_dir)
    cur = records["curate"]
    m = cur["metrics"]
    assert m["by_kind"]["sft"] == {"read": 8, "kept": 6}
    dropped = {d["id"]: d for d in iter_jsonl(run_dir / cur["outputs"]["dropped"]["path"])}
    assert dropped["sorry"]["reason"] == "rule:apology"
    assert dropped["dup"]["reason"] == "duplicate" and dropped["dup"]["reasons"][0]["of"] == "clean2"
    kept_top1 = list(iter_jsonl(run_dir / cur["outputs"]["top1"]["path"]))
    sft = read_record(run_dir, 1, "sft")
    # sft read the curated files (their hashes are its inputs) and trained on exactly their rows.
    assert sft["inputs"]["inputs"]["sft_files"][0]["sha256"] == cur["outputs"]["sft"]["sha256"]
    assert sft["inputs"]["inputs"]["top1_files"][0]["sha256"] == cur["outputs"]["top1"]["sha256"]
    assert sft["metrics"]["rows_read"] == len(kept_top1) + 6
    table = status_table(run_dir)
    assert f"kept={m['kept']} dropped={m['dropped']}" in table and "rule:apology=1" in table
    assert "| 1 | curate | rows |" in write_report(run_dir).read_text()
    # Same inputs: skipped. A changed rule: refused, naming the config.
    again = run_round(1, path, run_dir)
    assert again["curate"]["timing"] == cur["timing"]
    recipe["curate"]["rules"]["rules"][2]["max_count"] = 1
    path.write_text("# test\n" + yaml.safe_dump(recipe))
    with pytest.raises(InputsChanged, match=r"'curate' already finished with other inputs \(changed: config\)"):
        run_round(1, path, run_dir)


def test_world_noise_is_opt_in_and_the_default_world_is_unchanged():
    import random

    from posttrain.world import task
    from posttrain.world.build import OPT_IN_FIELDS, WorldConfig, seed_sft_rows

    items = task.sample_items(40, random.Random(0))
    default = WorldConfig()
    assert default.key() == "" and not set(OPT_IN_FIELDS) & set(default.manifest_config())
    rng = random.Random(5)
    rows = seed_sft_rows(items, default, rng)
    assert rng.random() == random.Random(5).random()  # the default never draws from its stream
    assert [r["messages"][-1]["content"] for r in rows] == [it.answer for it in items]
    noisy = WorldConfig(sft_noisy_share=0.5, sft_duplicate_share=0.25)
    assert noisy.key() != "" and noisy.manifest_config()["sft_noisy_share"] == 0.5
    rows = seed_sft_rows(items, noisy, random.Random(5))
    assert len(rows) == 50
    from posttrain.recipe import load_recipe

    rules = load_recipe("general").for_round(1).curate.rules.rules
    broken = [r for r in rows[:40] if rule_violations(r["messages"][-1]["content"], rules)]
    padded = [r for r, it in zip(rows[:40], items) if r["messages"][-1]["content"] != it.answer]
    assert broken == padded and 10 <= len(padded) <= 30  # every padded answer breaks a shipped rule
    # Each near-duplicate is an earlier row with its prompt's numbers reordered, same answer.
    def key(r):
        return sorted(task.parse_prompt(r["messages"][0]["content"])), r["messages"][-1]["content"]

    originals = [key(r) for r in rows[:40]]
    assert all(key(d) in originals for d in rows[40:])

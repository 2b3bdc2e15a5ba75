"""Decontamination (posttrain.decontam): the n-gram index on hand cases, each stage's screening
of its rows, the recipe key, and the stage hashes it leaves alone when off."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from posttrain import decontam
from posttrain.data import Preference, SFTExample
from posttrain.files import write_jsonl
from posttrain.recipe import Recipe
from posttrain.stage import hashed_inputs

EVAL = "Write a Python function that returns the sum of the squares of a list of integers."
SHORT = "Capital of France?"


def index(n=8):
    idx = decontam.NgramIndex(n)
    idx.add("heldout", [EVAL, SHORT])
    return idx


def test_overlap_of_eight_words_is_found():
    # 8 consecutive words of the eval prompt inside an unrelated text
    assert index().check("Please, the sum of the squares of a list now, and also more words") == "heldout"


def test_seven_shared_words_are_a_near_miss():
    # 7 consecutive words ("the sum of the squares of a"), then a different word
    assert index().check("compute the sum of the squares of a matrix quickly for me please") is None


def test_case_and_punctuation_do_not_hide_an_overlap():
    assert index().check("RETURNS... the SUM, of the squares; of a LIST!") == "heldout"


def test_short_texts_are_compared_whole():
    idx = index()
    assert idx.check("capital   OF france") == "heldout"
    assert idx.check("capital of france today") is None  # not equal as a whole
    assert idx.check("Capital of Spain?") is None
    assert idx.check("") is None and idx.check("...") is None


def test_check_any_reports_the_first_set():
    idx = decontam.NgramIndex(3)
    idx.add("a", ["one two three"])
    idx.add("b", ["four five six", "one two three"])
    assert idx.check("x four five six y") == "b"
    assert idx.check_any(["nothing here at all", "one two three"]) == "a"
    assert idx.check_any([None, "nothing"]) is None


def test_n_must_be_positive():
    with pytest.raises(ValueError, match="at least 1"):
        decontam.NgramIndex(0)


# ----------------------------------------------------------------------------- stages


@pytest.fixture
def eval_file(tmp_path):
    path = tmp_path / "heldout.jsonl"
    write_jsonl(path, [{"id": "e1", "prompt": EVAL}, {"id": "e2", "prompt": SHORT}])
    return str(path)


def inputs(eval_file, mode):
    return SimpleNamespace(decontaminate={"mode": mode, "n": 8}, eval_prompt_files=[eval_file])


def conv(user, answer):
    return [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]


def test_sft_rows_counted_and_dropped(eval_file):
    from posttrain.stages.sft import screen_examples

    rows = [SFTExample("a", conv(EVAL, "def f(xs): ..."), source="sft.jsonl:1"),
            # an earlier assistant turn copies the eval prompt
            SFTExample("b", conv("Hello", "Answer: " + EVAL.lower()) + conv("More?", "No."), source="sft.jsonl:2"),
            SFTExample("c", conv("Sort 3 1 2", "1 2 3"), source="other.jsonl:1")]
    kept, counts = screen_examples(inputs(eval_file, "warn"), rows)
    assert kept == rows and counts == {"sft.jsonl": 2}
    kept, counts = screen_examples(inputs(eval_file, "drop"), rows)
    assert [r.id for r in kept] == ["c"] and counts == {"sft.jsonl": 2}
    off = SimpleNamespace(decontaminate=None, eval_prompt_files=[])
    assert screen_examples(off, rows) == (rows, {})


def test_preferences_checked_on_every_response(eval_file):
    prompt = [{"role": "user", "content": "Tell me a joke"}]
    prefs = [Preference("p1", prompt, "a", "b", source="prefs.jsonl:1"),
             Preference("p2", prompt, "a", "b", edited=SHORT, source="prefs.jsonl:2"),
             Preference("p3", prompt, "a", EVAL, source="prefs.jsonl:3"),
             Preference("p4", [{"role": "user", "content": SHORT}], "a", "b", source="more.jsonl:1")]
    kept, removed, counts = decontam.screen_preferences(inputs(eval_file, "drop"), prefs, "rm")
    assert [p.id for p in kept] == ["p1"] and [p.id for p in removed] == ["p2", "p3", "p4"]
    assert counts == {"more.jsonl": 1, "prefs.jsonl": 2}


def test_dpo_pairs_counted_by_origin_file(eval_file):
    from posttrain.stages.dpo import Pair, screen_pairs

    prompt = [{"role": "user", "content": "hi"}]
    pairs = [Pair(prompt, EVAL, "no", "on_policy", "samples/shard_00000.jsonl:4"),
             Pair(prompt, "yes", "no", "preferences", "prefs.jsonl:2")]
    kept, counts = screen_pairs(inputs(eval_file, "drop"), pairs)
    assert kept == pairs[1:] and counts == {"samples/shard_00000.jsonl": 1}


def test_sample_prompts_dropped_before_sampling(eval_file, tmp_path):
    from posttrain.stages.sample import SampleConfig, plan_items

    prompts = tmp_path / "train.jsonl"
    write_jsonl(prompts, [{"id": "t1", "prompt": "Sort these numbers: 3 1 2"},
                          {"id": "t2", "prompt": "capital of FRANCE?"}])

    class Tok:
        chat_template = "plain"
        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": list(range(len(text.split())))}

        def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=True, **kw):
            return " ".join(m["content"] for m in messages)

    ctx = SimpleNamespace(config=SampleConfig(), inputs=SimpleNamespace(
        prompt_files=[str(prompts)], capabilities={}, prompt_capabilities={},
        decontaminate={"mode": "drop", "n": 8}, eval_prompt_files=[eval_file]))
    items, _, _, n_read, contaminated = plan_items(ctx, Tok())
    assert n_read == 2 and [it.id for it in items] == ["t1"] and contaminated == {str(prompts): 1}


# ----------------------------------------------------------------------------- the recipe and the hash


def recipe(**extra):
    return Recipe.model_validate({"name": "t", "models": {"base": "m"}, **extra})


def test_recipe_key_forms_and_default():
    assert recipe().decontaminate.mode == "off"
    assert recipe(decontaminate="drop").decontaminate.mode == "drop"
    r = recipe(decontaminate={"mode": "warn", "n": 13})
    assert (r.decontaminate.mode, r.decontaminate.n) == ("warn", 13)


@pytest.mark.parametrize("bad", ["sometimes", {"mode": "drop", "n": 0}, {"mode": "warn", "size": 8}])
def test_recipe_key_refuses_bad_values(bad):
    with pytest.raises(ValueError, match="decontaminate"):
        recipe(decontaminate=bad)


def test_off_leaves_the_input_hash_as_before(eval_file):
    from posttrain.stages.dpo import DPOInputs

    hash_paths = lambda v: v  # noqa: E731
    off = hashed_inputs(DPOInputs(sft_model="m"), hash_paths)
    assert "decontaminate" not in off and "eval_prompt_files" not in off
    on = hashed_inputs(DPOInputs(sft_model="m", decontaminate={"mode": "warn", "n": 8},
                                 eval_prompt_files=[eval_file]), hash_paths)
    assert on["eval_prompt_files"] == [eval_file] and on["decontaminate"]["mode"] == "warn"


def test_report_column_lines_up_with_the_data_rows():
    from posttrain.report import contaminated_cells, data_rows

    trained = {"unit": "examples", "rows_read": 5, "rows_trained": 3, "rows_trained_by_variant": {},
               "dropped": {"contaminated": 2}, "truncated": 0}
    records = {1: {"rm": {"metrics": {}},  # no data counts: not a row of the table
                   "sample": {"metrics": {"prompts_read": 4, "contaminated": {"/d/train.jsonl": 1}}},
                   "sft": {"metrics": {**trained, "contaminated": {"/d/sft.jsonl": 2}}},
                   "dpo": {"metrics": {**trained, "dropped": {}}}}}
    rows, cells = data_rows(records), contaminated_cells(records)
    assert [r[1] for r in rows] == ["sample", "sft", "dpo"]
    assert cells == ["train.jsonl 1", "sft.jsonl 2", "-"]
    assert "contaminated 2" in rows[1][5]


def test_benchmark_prompts_are_checked_too(eval_file):
    """A recipe's `eval.benchmarks` join the sets training data is checked against: an SFT row
    that copies HumanEval's first function stub is caught."""
    from posttrain import benchmarks
    from posttrain.decontam import resolve_inputs
    from posttrain.recipe import Recipe
    from posttrain.stages.sft import screen_examples

    recipe = Recipe.model_validate({"name": "t", "models": {"base": "x/y"}, "decontaminate": "drop",
                                    "data": {"eval_prompts": [{"path": eval_file}]},
                                    "eval": {"benchmarks": [{"name": "humaneval"}]}})
    rnd = SimpleNamespace(recipe=recipe, path=lambda p: p)
    got = resolve_inputs(rnd)
    humaneval = benchmarks.data_file(benchmarks.Benchmark(name="humaneval"))
    assert got["eval_prompt_files"] == [eval_file, humaneval]
    stub = benchmarks.load_problems(benchmarks.Benchmark(name="humaneval"), humaneval)[0].prompt
    rows = [SFTExample("copy", conv("Complete this:\n" + stub, "pass"), source="sft.jsonl:1"),
            SFTExample("own", conv("Sort 3 1 2", "1 2 3"), source="sft.jsonl:2")]
    kept, counts = screen_examples(SimpleNamespace(**got), rows)
    assert [r.id for r in kept] == ["own"] and counts == {"sft.jsonl": 1}

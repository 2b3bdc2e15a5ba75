"""Recipe validation: unknown keys, wrong types and missing keys are errors naming the key path."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from posttrain.recipe import RecipeError, find_recipe, load_recipe, shipped_recipes

ROOT = Path(__file__).resolve().parent.parent


def write(tmp_path, data) -> Path:
    p = tmp_path / "r.yaml"
    p.write_text(yaml.safe_dump(data))
    return p


MINIMAL = {"name": "t", "models": {"base": "some/model"}}


def test_minimal_recipe_gets_the_papers_defaults(tmp_path):
    r = load_recipe(write(tmp_path, MINIMAL)).for_round(1)
    assert r.rounds == 6
    assert r.dpo.beta == pytest.approx(0.1)
    assert r.reward == "rm"
    assert r.rm.margin is False
    assert r.rm.keep_strengths == ["significantly_better", "better"]


def test_unknown_key_is_named_with_its_path(tmp_path):
    with pytest.raises(RecipeError, match=r"dpo\.betta: unknown key"):
        load_recipe(write(tmp_path, {**MINIMAL, "dpo": {"betta": 0.2}}))


def test_unknown_top_level_key(tmp_path):
    with pytest.raises(RecipeError, match=r"modles: unknown key"):
        load_recipe(write(tmp_path, {**MINIMAL, "modles": {}}))


def test_wrong_type_names_path_and_expectation(tmp_path):
    with pytest.raises(RecipeError, match=r"(?s)sample\.k: Input should be a valid integer.*'many'"):
        load_recipe(write(tmp_path, {**MINIMAL, "sample": {"k": "many"}}))


def test_missing_required_key(tmp_path):
    with pytest.raises(RecipeError, match=r"models\.base: required key is missing"):
        load_recipe(write(tmp_path, {"name": "t", "models": {}}))


def test_bad_override_is_caught_at_load_time_naming_the_round(tmp_path):
    data = {**MINIMAL, "overrides": {"3": {"sample": {"k": -1}}}}
    with pytest.raises(RecipeError, match=r"(?s)round 3, with overrides\.3.*sample\.k"):
        load_recipe(write(tmp_path, data))


def test_bad_override_key(tmp_path):
    with pytest.raises(RecipeError, match=r"overrides.*expected a round like"):
        load_recipe(write(tmp_path, {**MINIMAL, "overrides": {"third": {}}}))


def test_per_round_overrides_single_range_and_open(tmp_path):
    data = {**MINIMAL, "sample": {"k": 8}, "overrides": {
        "3": {"sample": {"k": 20}},
        "2-4": {"dpo": {"beta": 0.2}},
        "5-": {"capabilities": {"general": {"system_prompt": "Be concise."}}},
    }}
    loaded = load_recipe(write(tmp_path, data))
    assert [loaded.for_round(n).sample.k for n in (1, 2, 3, 4)] == [8, 8, 20, 8]
    assert [loaded.for_round(n).dpo.beta for n in (1, 2, 4, 5)] == [0.1, 0.2, 0.2, 0.1]
    assert loaded.for_round(4).capabilities == {}
    assert loaded.for_round(6).capabilities["general"].system_prompt == "Be concise."
    # Overrides merge key by key: the rest of the section keeps the base values.
    assert loaded.for_round(3).sample.temperature == loaded.for_round(1).sample.temperature


def test_reward_spec_is_an_import_path_never_a_file(tmp_path):
    with pytest.raises(RecipeError, match=r"reward"):
        load_recipe(write(tmp_path, {**MINIMAL, "reward": {"target": "rewards.py"}}))
    ok = load_recipe(write(tmp_path, {**MINIMAL, "reward": {"target": "pkg.mod:Name", "kwargs": {"a": 1}}}))
    assert ok.for_round(1).reward.target == "pkg.mod:Name"


def test_relative_paths_resolve_beside_the_recipe(tmp_path):
    (tmp_path / "prefs.jsonl").write_text("")
    loaded = load_recipe(write(tmp_path, MINIMAL))
    assert loaded.resolve_path("prefs.jsonl") == str(tmp_path / "prefs.jsonl")
    assert loaded.resolve_path("meta-llama/Llama-3.1-8B") == "meta-llama/Llama-3.1-8B"


def test_recipes_are_found_by_name():
    assert "demo" in shipped_recipes() and "general" in shipped_recipes()
    assert find_recipe("general") == ROOT / "recipes" / "general.yaml"
    with pytest.raises(RecipeError, match="no shipped recipe named 'nope'"):
        find_recipe("nope")


@pytest.mark.parametrize("path", sorted((ROOT / "recipes").rglob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_recipe_validates_for_every_round(path):
    text = path.read_text()
    assert text.startswith("# posttrain "), f"{path.name} must open with the command that runs it"
    loaded = load_recipe(path)
    for n in range(1, loaded.base.rounds + 1):
        loaded.for_round(n)
    loaded.check(files=False)  # every reward, checker and annotator target and its kwargs


def test_check_names_the_round_whose_override_misspells_a_reward_kwarg(tmp_path):
    math_reward = {"target": "posttrain.reward.math:MathAnswerReward", "kwargs": {"rel_tol": 0.01}}
    loaded = load_recipe(write(tmp_path, {**MINIMAL, "reward": math_reward,
                                          "overrides": {"3": {"reward": {"kwargs": {"rel_tolerance": 0.1}}}}}))
    with pytest.raises(RecipeError) as info:
        loaded.check(files=False)
    assert str(info.value) == (f"{tmp_path / 'r.yaml'}: reward.kwargs.rel_tolerance: not an argument of "
                               "posttrain.reward.math:MathAnswerReward (it takes: prompts_file, rel_tol, abs_tol) "
                               "(round 3)")


def test_validate_command_prints_the_resolved_recipe(capsys):
    from posttrain.cli import main

    # --skip-files: the shipped recipes name data files you write yourself
    assert main(["validate", "general", "--round", "2", "--skip-files"]) == 0
    out = capsys.readouterr().out
    assert "resolved for round 2: valid" in out
    assert yaml.safe_load(out)["dpo"]["beta"] == 0.1


def test_validate_command_reports_errors_with_exit_code(tmp_path, capsys):
    from posttrain.cli import main

    bad = write(tmp_path, {**MINIMAL, "sft": {"epochz": 1}})
    assert main(["validate", str(bad)]) == 1
    assert "sft.epochz: unknown key" in capsys.readouterr().err


def test_narrower_overrides_win_whatever_their_order(tmp_path):
    data = {**MINIMAL, "overrides": {"5": {"sample": {"k": 5}}, "5-": {"sample": {"k": 50}},
                                     "2-6": {"sample": {"k": 26}}}}
    loaded = load_recipe(write(tmp_path, data))
    # Narrower ranges win: "5" over everything in round 5; "2-6" over the open "5-" in round 6.
    assert [loaded.for_round(n).sample.k for n in (1, 2, 5, 6)] == [8, 26, 5, 26]


# ------------------------------------------------------------------ a round without a reward model


@pytest.mark.parametrize("name", [n for n in shipped_recipes() if n != "real_instruct"])
def test_every_recipe_with_preference_data_still_trains_a_reward_model_every_round(name):
    from posttrain.stages.rm import enabled

    loaded = load_recipe(name)
    assert all(enabled(loaded.for_round(n)) for n in range(1, loaded.base.rounds + 1))


def test_a_checker_ranked_recipe_without_preference_data_has_no_rm_stage():
    from posttrain.stages.rm import enabled, rm_users

    loaded = load_recipe("real_instruct")
    recipe = loaded.for_round(1)
    assert not recipe.data.preference_batches and rm_users(recipe) == [] and not enabled(recipe)
    loaded.check(files=False)


CHECKER = {"target": "posttrain.reward.instructions:InstructionReward"}


@pytest.mark.parametrize("reward, key", [
    ("rm", "reward"),
    ({"target": "posttrain.reward:WeightedReward", "kwargs": {"components": [[CHECKER, 1.0], ["@rm", 0.01]]}},
     'reward.kwargs ("@rm")'),
])
def test_validate_refuses_a_reward_that_needs_the_rm_when_there_is_no_preference_data(tmp_path, reward, key):
    pytest.importorskip("if_verifiable", reason="needs requirements/ifeval.txt")
    from posttrain.stages.rm import enabled

    loaded = load_recipe(write(tmp_path, {**MINIMAL, "reward": reward}))
    assert enabled(loaded.for_round(1))  # it would run, and fail on no data: validate says so first
    with pytest.raises(RecipeError, match=rf"{re.escape(key)} use\(s\) the round's reward model, but the recipe "
                                          r"has no preference data"):
        loaded.check()
    loaded.check(files=False)  # run-round's early check: the rm stage itself stops at its missing data
    with_data = {**MINIMAL, "reward": reward, "data": {"preference_batches": [{"path": "p.jsonl", "round": 1}]}}
    (tmp_path / "p.jsonl").write_text("")
    with pytest.raises(RecipeError) as err:  # MINIMAL's base model is not on this machine: that alone
        load_recipe(write(tmp_path, with_data)).check()
    assert "models.base" in str(err.value) and "preference data" not in str(err.value)


def test_curate_by_rm_quality_needs_the_rm_too(tmp_path):
    from posttrain.stages.rm import rm_users

    data = {**MINIMAL, "reward": CHECKER, "curate": {"enabled": True, "rm_quality": {"enabled": True}}}
    assert rm_users(load_recipe(write(tmp_path, data)).for_round(1)) == ["curate.rm_quality"]


def test_min_top1_score_is_left_out_of_the_dumped_config_while_unset():
    from posttrain.stages.sample import SampleConfig

    assert "min_top1_score" not in SampleConfig().model_dump(mode="json")  # records hash as before it existed
    assert SampleConfig(min_top1_score=1.0).model_dump(mode="json")["min_top1_score"] == 1.0

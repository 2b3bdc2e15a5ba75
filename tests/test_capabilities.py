"""Capability recipes and the tiny code / math task variants.

Fast tests: the variants are deterministic, disjoint, and their preference rows are right
by the checkers themselves (chosen passes, rejected fails); each shipped capability recipe
encodes the paper's capability-specific choice it claims.

Slow tests: one short round of `code` and of `math` end to end through `posttrain.run_round`
on the tiny variants, with the execution-checked and answer-checked rewards (math combined
with the round's trained RM), checking that the sample shards hold the checkers' scores.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from posttrain import files
from posttrain.world.variants import build_code_variant, build_math_variant, code_items

ROOT = Path(__file__).resolve().parent.parent
STAGES = ("rm", "sample", "sft", "dpo", "average")


def _read(path: Path) -> list[dict]:
    return list(files.iter_jsonl(path))


def _all_files(v) -> list[Path]:
    return [v.train_prompts, v.heldout_prompts, *v.preference_rounds, v.heldout_preferences, v.sft_seed]


def _prompt_text(row: dict) -> str:
    msgs = row["prompt"] if "prompt" in row else row["messages"][:-1]
    return msgs[-1]["content"]


# --------------------------------------------------------------------------- variants


@pytest.mark.parametrize("build", [build_code_variant, build_math_variant])
def test_variants_are_deterministic_in_the_seed(tmp_path, build):
    a = build(tmp_path / "a", seed=3)
    b = build(tmp_path / "b", seed=3)
    c = build(tmp_path / "c", seed=4)
    assert [p.read_bytes() for p in _all_files(a)] == [p.read_bytes() for p in _all_files(b)]
    assert a.train_prompts.read_bytes() != c.train_prompts.read_bytes()


@pytest.mark.parametrize("build", [build_code_variant, build_math_variant])
def test_variant_files_are_disjoint_and_sized(tmp_path, build):
    v = build(tmp_path, seed=0, n_train=5, n_heldout=3, n_pref_per_round=4, n_heldout_pref=2, rounds=3,
              n_sft_seed=2)
    sizes = [len(_read(p)) for p in _all_files(v)]
    assert sizes == [5, 3, 4, 4, 4, 2, 2]
    texts = [_prompt_text(r) for p in _all_files(v) for r in _read(p)]
    assert len(texts) == len(set(texts)) == 5 + 3 + 3 * 4 + 2 + 2


def test_code_variant_rows_and_checks(tmp_path):
    v = build_code_variant(tmp_path, seed=0)
    row = _read(v.train_prompts)[0]
    assert row["capability"] == "code" and len(row["tests"]) == 3
    fname = row["prompt"][0]["content"].split("function ")[1].split("(")[0]
    assert all(t.startswith(f"assert {fname}(") for t in row["tests"])
    # The family: 6 templates x k in 2..19, every function name distinct.
    assert len({it.key for it in code_items()}) == 6 * 18
    with pytest.raises(ValueError, match=r"asked for 236 distinct tasks but the family has 108"):
        build_code_variant(tmp_path / "big", n_train=200)


def test_code_add_task_by_hand():
    item = next(it for it in code_items() if it.key == "add3")
    assert item.prompt == "Write a Python function add3(x) that returns x + 3."
    assert item.check == {"tests": ["assert add3(0) == 3", "assert add3(3) == 6", "assert add3(6) == 9"]}
    assert item.correct == "```python\ndef add3(x):\n    return x + 3\n```"


def test_math_variant_answers_by_hand(tmp_path):
    from posttrain.world.variants import _math_item

    item = _math_item("div", "Ana", "pens", 4, 3)
    assert item.prompt == "Ana shares 12 pens among 3 friends. How many each?"
    assert item.check == {"answer": "4"}
    assert item.correct == "12 / 3 = 4. The answer is 4."
    assert item.wrong == "12 * 3 = 36. The answer is 36."
    v = build_math_variant(tmp_path, seed=0)
    assert all(r["capability"] == "math" and r["answer"].lstrip("-").isdigit() for r in _read(v.train_prompts))


def test_math_preferences_are_right_by_the_checker(tmp_path):
    from posttrain.reward import checked_score
    from posttrain.reward.math import MathAnswerReward

    v = build_math_variant(tmp_path, seed=1)
    answers = {_prompt_text(r): r["answer"] for r in _read(v.train_prompts)}
    rows = _read(v.preference_rounds[0]) + _read(v.heldout_preferences)
    assert rows and all(r["strength"] == "significantly_better" for r in rows)
    reward = MathAnswerReward()
    prompts = [r["prompt"] for r in rows]
    # The preference prompts are not in the prompt files (disjoint), so the reference is
    # recomputed from the chosen working's last number: it must be what the checker reads.
    metas = [{"answer": r["chosen"][0]["content"].rsplit(" ", 1)[1].rstrip(".")} for r in rows]
    assert checked_score(reward, prompts, [r["chosen"][0]["content"] for r in rows], metas) == [1.0] * len(rows)
    assert checked_score(reward, prompts, [r["rejected"][0]["content"] for r in rows], metas) == [0.0] * len(rows)
    # Through prompts_file (the plain protocol): the file's own prompts find their answers.
    by_file = MathAnswerReward(prompts_file=str(v.train_prompts))
    rows = _read(v.train_prompts)
    assert checked_score(by_file, [r["prompt"] for r in rows],
                         [f"The answer is {answers[_prompt_text(r)]}." for r in rows]) == [1.0] * len(rows)


def test_code_preferences_pass_and_fail_their_tests(tmp_path):
    """Chosen solutions pass all three tests, rejected ones fail at least one (the sandboxed
    code reward runs them)."""
    from posttrain.reward.code import CodeTestReward

    items = code_items()[::9]  # 12 tasks, two per template
    reward = CodeTestReward(max_workers=2)
    reward.setup()
    try:
        prompts = [it.messages() for it in items]
        metas = [it.check for it in items]
        chosen = [s.value for s in reward.score_with_meta(prompts, [it.correct for it in items], metas)]
        rejected = [s.value for s in reward.score_with_meta(prompts, [it.wrong for it in items], metas)]
    finally:
        reward.teardown()
    assert chosen == [1.0] * len(items)
    assert all(s is not None and s < 1.0 for s in rejected), rejected


# --------------------------------------------------------------------------- shipped recipes


CAPABILITY_RECIPES = ["general", "code", "math", "multilingual", "long_context", "tool_use", "factuality",
                      "steerability"]


@pytest.mark.parametrize("name", CAPABILITY_RECIPES)
def test_capability_recipe_opens_with_its_command_and_validates(name):
    from posttrain.recipe import load_recipe

    path = ROOT / "recipes" / f"{name}.yaml"
    first = path.read_text().splitlines()[0]
    assert first == f"# posttrain run --recipe recipes/{name}.yaml --run-dir runs/{name} --rounds 1-6"
    loaded = load_recipe(path)
    for n in range(1, 7):
        r = loaded.for_round(n)
        # The paper's defaults (4.1): DPO beta 0.1, NLL 0.2, lr 1e-5, formatting masked,
        # two variants averaged at rm, sft and dpo; K within 10-30 wherever sampling is on.
        assert (r.dpo.beta, r.dpo.nll_coef, r.dpo.learning_rate, r.dpo.mask_formatting) == (0.1, 0.2, 1e-5, True)
        assert r.sft.learning_rate == 1e-5 and r.rm.margin is False
        assert len(r.rm.variants) == len(r.sft.variants) == len(r.dpo.variants) == 2
        assert 10 <= r.sample.k <= 30
        assert all(10 <= c.k <= 30 for c in r.capabilities.values() if c.sample and c.k is not None)
        assert r.rounds == 6


def test_multilingual_temperature_schedule_and_language_check():
    from posttrain.recipe import load_recipe

    loaded = load_recipe(ROOT / "recipes" / "multilingual.yaml")
    temps = [loaded.for_round(n).capabilities["multilingual"].temperature for n in range(1, 7)]
    assert all(0.2 <= t <= 1.0 for t in temps[:4]) and {min(temps[:4]), max(temps[:4])} == {0.2, 1.0}
    assert temps[4:] == [0.6, 0.6]
    for n in range(1, 7):
        comps = loaded.for_round(n).reward.kwargs["components"]
        assert comps[0] == ["@rm", 1.0]  # this round's reward model, whatever the run folder
        assert comps[1] == [{"target": "posttrain.reward.language:LanguageMatchReward"}, 100.0]


def test_tool_use_samples_nothing_for_tools():
    from posttrain.recipe import load_recipe

    r = load_recipe(ROOT / "recipes" / "tool_use.yaml").for_round(1)
    assert r.capabilities["tool_use"].sample is False
    assert r.capabilities["general"].sample is True
    caps = {p.capability for p in r.data.prompts}
    assert caps == {"general", "tool_use"}


def test_code_and_math_recipes_use_their_checkers():
    from posttrain.recipe import load_recipe

    code = load_recipe(ROOT / "recipes" / "code.yaml").for_round(1)
    math = load_recipe(ROOT / "recipes" / "math.yaml").for_round(1)
    assert code.reward.target == code.eval.checker.target == "posttrain.reward.code:CodeTestReward"
    assert code.capabilities["code"].system_prompt
    assert math.reward.target == math.eval.checker.target == "posttrain.reward.math:MathAnswerReward"


def test_long_context_recipe_keeps_dpo_short():
    from posttrain.recipe import load_recipe

    r = load_recipe(ROOT / "recipes" / "long_context.yaml").for_round(1)
    assert r.sft.max_length >= 131072 > r.dpo.max_length


# --------------------------------------------------------------------------- one round end to end


def _tiny_recipe(path: Path, *, base: Path, v, capability: str, reward, checker, system_prompt: str) -> Path:
    train = {"epochs": 1, "batch_size": 4, "max_length": 128, "learning_rate": 1e-3, "save_steps": 1000,
             "logging_steps": 1}
    recipe = {
        "name": f"tiny-{capability}",
        "rounds": 1,
        "seed": 0,
        "models": {"base": str(base)},
        "data": {
            "preference_batches": [{"path": str(v.preference_rounds[0]), "round": 1}],
            "heldout_preferences": [str(v.heldout_preferences)],
            "sft": [str(v.sft_seed)],
            "prompts": [{"path": str(v.train_prompts), "capability": capability}],
            "eval_prompts": [{"path": str(v.heldout_prompts), "capability": capability}],
        },
        "reward": reward,
        "capabilities": {capability: {"system_prompt": system_prompt, "k": 2, "temperature": 1.0,
                                      "max_new_tokens": 24}},
        "run": {"device": "cpu"},
        # Four held-out pairs on a random tiny model: the accuracy gate would only measure noise.
        "rm": {**train, "max_length": 256, "min_heldout_accuracy": 0},
        "sample": {"k": 3, "max_new_tokens": 8, "backend": "transformers", "max_prompt_length": 100},
        "sft": train,
        # Two DPO variants, so the average stage averages two models as in the paper's recipes.
        "dpo": {**train, "learning_rate": 1e-4, "variants": [{"seed": 0}, {"seed": 1}]},
        "eval": {"max_new_tokens": 16, "max_prompts": 2, "backend": "transformers", "checker": checker},
    }
    path.write_text("# posttrain run-round 1 --recipe recipe.yaml --run-dir run\n" + yaml.safe_dump(recipe))
    return path


def _shard_rows(run_dir: Path, record: dict) -> list[dict]:
    from posttrain.records import output_path

    samples = output_path(run_dir, record, "samples")
    shards = sorted(samples.glob("shard_*.jsonl"))
    assert shards, f"no sample shards in {samples}"
    return [row for s in shards for row in files.iter_jsonl(s)]


def _check_records(run_dir: Path, records: dict) -> None:
    from posttrain.records import read_record

    for stage in STAGES:
        assert stage in records
        assert read_record(run_dir, 1, stage) is not None, f"round 1 {stage} has no record"
    assert "eval" in records and read_record(run_dir, 1, "eval") is not None


@pytest.mark.slow
def test_one_round_of_code_end_to_end(tmp_path, tiny_model_dir):
    import posttrain
    from posttrain.reward.code import CodeTestReward

    v = build_code_variant(tmp_path / "code", seed=0, n_train=4, n_heldout=2, n_pref_per_round=8,
                           n_heldout_pref=4, rounds=1, n_sft_seed=4)
    reward = {"target": "posttrain.reward.code:CodeTestReward",
              "kwargs": {"prompts_file": str(v.train_prompts), "max_workers": 2}}
    checker = {"target": "posttrain.reward.code:CodeTestReward",
               "kwargs": {"prompts_file": str(v.heldout_prompts), "max_workers": 2}}
    recipe = _tiny_recipe(tmp_path / "recipe.yaml", base=tiny_model_dir, v=v, capability="code",
                          reward=reward, checker=checker, system_prompt="Use Python.")
    run_dir = tmp_path / "run"
    records = posttrain.run_round(1, recipe, run_dir)
    _check_records(run_dir, records)

    rows = _shard_rows(run_dir, records["sample"])
    tests = {r["id"]: r["tests"] for r in _read(v.train_prompts)}
    assert sorted(r["id"] for r in rows) == sorted(tests)
    for row in rows:
        assert row["capability"] == "code"
        assert row["prompt"][0] == {"role": "system", "content": "Use Python."}
        assert len(row["responses"]) == len(row["scores"]) == 2  # the capability's K, not sample.k
        assert all(s is not None and 0.0 <= s <= 1.0 for s in row["scores"])
    # The scores are the checker's: the same responses re-run against the rows' tests agree.
    again = CodeTestReward(max_workers=2)
    with posttrain.reward.active(again):
        rescored = again.score_with_meta([r["prompt"] for r in rows for _ in r["responses"]],
                                         [x for r in rows for x in r["responses"]],
                                         [{"tests": tests[r["id"]]} for r in rows for _ in r["responses"]])
    assert [v.value for v in rescored] == [s for r in rows for s in r["scores"]]
    ev = json.loads((run_dir / "round_01" / "eval" / "record.json").read_text())
    assert 0.0 <= ev["metrics"]["task_score"] <= 1.0


@pytest.mark.slow
def test_one_round_of_math_with_the_rm_end_to_end(tmp_path, tiny_model_dir):
    import posttrain
    from posttrain.reward import RMReward
    from posttrain.reward.math import MathAnswerReward

    v = build_math_variant(tmp_path / "math", seed=0, n_train=4, n_heldout=2, n_pref_per_round=8,
                           n_heldout_pref=4, rounds=1, n_sft_seed=4)
    run_dir = tmp_path / "run"
    rm_path = run_dir / "round_01" / "rm" / "model"
    # The checker decides right / wrong; the round's RM (trained by the rm stage just before
    # sampling) orders samples the checker ties on.
    reward = {"target": "posttrain.reward:WeightedReward", "kwargs": {"components": [
        [{"target": "posttrain.reward.math:MathAnswerReward", "kwargs": {"prompts_file": str(v.train_prompts)}}, 1.0],
        [{"target": "posttrain.reward:RMReward", "kwargs": {"path": str(rm_path), "device": "cpu"}}, 0.01],
    ]}}
    checker = {"target": "posttrain.reward.math:MathAnswerReward", "kwargs": {"prompts_file": str(v.heldout_prompts)}}
    recipe = _tiny_recipe(tmp_path / "recipe.yaml", base=tiny_model_dir, v=v, capability="math",
                          reward=reward, checker=checker, system_prompt="Say: The answer is X.")
    records = posttrain.run_round(1, recipe, run_dir)
    _check_records(run_dir, records)

    rows = _shard_rows(run_dir, records["sample"])
    answers = {r["id"]: r["answer"] for r in _read(v.train_prompts)}
    assert sorted(r["id"] for r in rows) == sorted(answers)
    prompts = [r["prompt"] for r in rows for _ in r["responses"]]
    responses = [x for r in rows for x in r["responses"]]
    checks = posttrain.reward.checked_score(MathAnswerReward(), prompts, responses,
                                            [{"answer": answers[r["id"]]} for r in rows for _ in r["responses"]])
    assert set(checks) <= {0.0, 1.0}
    rm = RMReward(rm_path, device="cpu")
    with posttrain.reward.active(rm):
        rm_scores = rm.score(prompts, responses)
    scores = [s for r in rows for s in r["scores"]]
    # combined = 1 * check + 0.01 * rm (no component abstains: every prompt has an answer and
    # every sample fits the RM's positions).
    for s, c, q in zip(scores, checks, rm_scores):
        assert q is not None and s == pytest.approx(c + 0.01 * q, abs=1e-4)
    ev = json.loads((run_dir / "round_01" / "eval" / "record.json").read_text())
    assert ev["metrics"]["task_score"] in (0.0, 0.5, 1.0)  # 2 prompts x 1 greedy sample, each 0 or 1

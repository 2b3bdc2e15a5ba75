"""Math answer reward: extraction, normalisation across notations, abstention, prompts_file lookup."""

import json
from fractions import Fraction

import pytest

from posttrain.reward.math import MathAnswerReward, answers_match, extract_answer, last_boxed, to_number


def test_last_boxed_handles_nested_braces_and_takes_the_last():
    assert last_boxed(r"first \boxed{1} then \boxed{\frac{1}{2}} done") == r"\frac{1}{2}"
    assert last_boxed(r"\boxed{{a}{b}}") == "{a}{b}"
    assert last_boxed("no box") is None
    assert last_boxed(r"\boxed{unclosed") is None


@pytest.mark.parametrize("response, expected", [
    (r"So the result is \boxed{42}.", "42"),
    ("Adding them, the answer is 17.", "17"),
    ("Answer: -3/4\n", "-3/4"),
    ("step one\n#### 1,234", "1,234"),
    ("We get 3 apples and then 5 more, 8 in total", "8"),
    ("I do not know.", None),
    (r"the answer is 7 but wait \boxed{9}", "9"),   # boxed beats "answer is"
])
def test_extract_answer(response, expected):
    assert extract_answer(response) == expected


@pytest.mark.parametrize("text, value", [
    ("42", Fraction(42)),
    ("-7", Fraction(-7)),
    ("1,234,567", Fraction(1234567)),
    ("3.25", Fraction(13, 4)),
    ("3/4", Fraction(3, 4)),
    (r"\frac{3}{4}", Fraction(3, 4)),
    (r"\dfrac{-6}{8}", Fraction(-3, 4)),
    (r"-\frac12", Fraction(-1, 2)),
    (r"$\boxed{12}$", Fraction(12)),
    (r"\text{ 5 }", Fraction(5)),
    (r"50\%", Fraction(50)),
    ("x = 9.", Fraction(9)),
    ("1e-3", 0.001),
    ("apple", None),
    ("1/0", None),
])
def test_to_number(text, value):
    assert to_number(text) == value


@pytest.mark.parametrize("answer, reference, ok", [
    ("0.75", "3/4", True),
    (r"\frac{3}{4}", 0.75, True),
    ("1,000", 1000, True),
    ("0.3333333", "1/3", True),        # within rel_tol 1e-6
    ("0.333", "1/3", False),           # not within it
    ("-2", "2", False),
    (r"\text{Paris}", "paris", True),  # non-numeric: normalised text
    ("London", "Paris", False),
    ("2.0", "2", True),
])
def test_answers_match(answer, reference, ok):
    assert answers_match(answer, reference) is ok


def test_reward_scores_several_notations_and_abstains_without_reference():
    reward = MathAnswerReward()
    prompts = [[{"role": "user", "content": "q"}]] * 6
    responses = [r"... \boxed{\dfrac{1}{2}}", "The answer is 0.5.", "#### 1/2", "so 2", "no number here", "1"]
    metas = [{"answer": "1/2"}] * 5 + [{}]
    assert reward.score_with_meta(prompts, responses, metas) == [1.0, 1.0, 1.0, 0.0, 0.0, None]


def test_reward_score_uses_prompts_file_and_ignores_added_system_prompt(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text(json.dumps({"id": "a", "prompt": "What is 2+2?", "answer": "4"}) + "\n"
                    + json.dumps({"id": "b", "prompt": [{"role": "user", "content": "Name it"}]}) + "\n")
    reward = MathAnswerReward(prompts_file=str(path))
    sys_msg = {"role": "system", "content": "Think step by step."}
    prompts = [[sys_msg, {"role": "user", "content": "What is 2+2?"}],
               [{"role": "user", "content": "What is 2+2?"}],
               [{"role": "user", "content": "Name it"}],
               [{"role": "user", "content": "unknown prompt"}]]
    assert reward.score(prompts, [r"\boxed{4}", "It is 5", "x", "4"]) == [1.0, 0.0, None, None]


def test_prompts_file_errors_name_file_row_field(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"prompt": "q", "answer": "1"}) + "\n" + json.dumps({"prompt": 5}) + "\n")
    with pytest.raises(ValueError, match=r"p\.jsonl: row 2: field 'prompt'"):
        MathAnswerReward(prompts_file=str(path))
    path.write_text(json.dumps({"prompt": "q", "answer": "1"}) + "\n" + json.dumps({"prompt": "q", "answer": "2"}) + "\n")
    with pytest.raises(ValueError, match="row 2: field 'prompt': same prompt as row 1"):
        MathAnswerReward(prompts_file=str(path))


def test_score_without_prompts_file_raises():
    with pytest.raises(ValueError, match="prompts_file"):
        MathAnswerReward().score([[{"role": "user", "content": "q"}]], ["1"])

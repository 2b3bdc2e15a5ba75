"""Math answer reward: extraction, normalisation across notations, abstention, prompts_file lookup."""

import json
import signal
from fractions import Fraction

import pytest

from posttrain.reward.base import Scored, checked_verdicts
from posttrain.reward.math import (
    MathAnswerReward,
    answers_match,
    extract_answer,
    judge,
    last_boxed,
    outermost_boxes,
    read_number,
    same_number,
    to_number,
)


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
    ("1e-3", Fraction(1, 1000)),       # exact: scientific notation too
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
    verdicts = reward.score_with_meta(prompts, responses, metas)
    assert [v.value for v in verdicts] == [1.0, 1.0, 1.0, 0.0, 0.0, None]
    assert [v.reason for v in verdicts] == ["correct"] * 3 + ["wrong", "unparseable", "no_reference"]


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
    assert [v.value for v in reward.score(prompts, [r"\boxed{4}", "It is 5", "x", "4"])] == [1.0, 0.0, None, None]


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


# ------------------------------------------------------------------------------ issue 24: real answers

def verdict(response, reference):
    return judge(response, reference)


@pytest.mark.parametrize("response, reference", [
    ("The answer is 540 meters.", "540"),
    (r"So the distance is \boxed{540\text{ meters}}.", "540"),
    (r"The answer is \$64.", "64"),
    (r"\boxed{-5^\circ}", "-5"),
    (r"\boxed{-5^{\circ}}", "-5"),
    ("It gets colder by 5°, so \\boxed{-5°}", "-5"),
    ("Answer: 20 cups", "20"),
    ("The answer is $1,234.50", "1234.5"),
    ("The answer is 50%", "50"),
    ("Answer: x = 3 cm", "3"),
    ("Answer: 12 km/h", "12"),
    ("Answer: 5 m^2", "5"),
    ("The answer is **42** apples, which is what we wanted.", "42"),
    ("The answer is 2.0", "2"),
    ("The answer is −7", "-7"),               # a Unicode minus
    ("so 18 in all.\n#### 18", "Natalia sold 48/2 = 24 clips.\n#### 18"),  # GSM8K's answer field as shipped
    ("The answer is $540$ meters.", "540"),
    (r"The answer is \(540\) meters.", "540"),
    ("It is 30°C", "30"),
    (r"\boxed{30^\circ \text{C}}", "30"),
    (r"\boxed{1{,}234}", "1234"),
    ("Answer: total cost = $64", "64"),
    (r"\boxed{3 \text{ cm}^2}", "3"),
    ("Answer: (-5)", "-5"),
    (r"\boxed{(A)}", "A"),
    (r"$\boxed{5}$.", "5"),
    (r"\boxed{\boxed{5}}", "5"),
    ("Answer: $$5$$", "5"),
])
def test_units_and_words_after_the_answer_read_as_the_number(response, reference):
    v = verdict(response, reference)
    assert (v.value, v.reason) == (1.0, "correct"), v


@pytest.mark.parametrize("response, reference", [
    ("The answer is 5 or 6", "5"),             # a hedge, not 5
    ("The answer is 3 - 1", "3"),              # an expression, not 3
    ("The answer is 2^3", "2"),
    ("The answer is 5!", "5"),                 # a factorial
    ("Answer: 5x", "5"),                       # a single letter is not a unit
    ("Answer: 5 thousand", "5"),
    ("Answer: 5 squared", "5"),
    ("Answer: 3 halves", "3"),
    ("Answer: 0.3 repeating", "0.3"),
    ("Answer: 5 pi", "5"),
    ("Answer: 5 more than x", "5"),
    ("Answer: approximately 5", "5"),
    ("Answer: 5\\sqrt{2}", "5"),
    (r"\boxed{5^{2}}", "5"),
    (r"\boxed{\phantom{6}5}", "5"),
    ("The answer is 6 not 5", "6"),
    ("Answer: not x = 5", "5"),
    ("Answer: approximately x = 5", "5"),
    ("Answer: 5\u200b", "5"),                  # a zero-width character is not a unit
    ("Answer: ５", "5"),                         # nor is a fullwidth digit a digit
])
def test_a_unit_strip_never_turns_a_wrong_answer_into_a_right_one(response, reference):
    assert verdict(response, reference).value == 0.0


def test_real_dataset_formats():
    """GSM8K's `answer` field (working with calculator annotations, then `#### X`) and MATH's
    `solution` (a box in prose) work as references, and as responses in their style."""
    gsm8k = ("Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
             "Natalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.\n#### 72")
    assert verdict(gsm8k, gsm8k).reason == "correct"
    assert verdict("She sold 72 clips.", gsm8k).reason == "correct"
    assert verdict("She sold 24 + 48 = 72 clips.\n#### 73", gsm8k).reason == "wrong"
    math_solution = r"The two roots sum to $\frac{-b}{a}$, so the answer is $\boxed{\frac{14}{3}}$."
    assert verdict(r"Final Answer: The final answer is $\frac{14}{3}$. I hope it is correct.",
                   math_solution).reason == "correct"       # Minerva's answer format
    assert verdict(r"So $x = \dfrac{14}{3}$, i.e. \boxed{\dfrac{14}{3}}", math_solution).reason == "correct"
    assert verdict(r"\boxed{4.6667}", math_solution).reason == "wrong"   # 4.6667 is not 14/3 at rel_tol 1e-6


def test_four_hashes_win_over_an_answer_is_line_and_a_markdown_heading_is_not_one():
    assert verdict("The answer is 7 before we double.\n#### 18", "18").reason == "correct"
    assert verdict("The answer is 7 before we double.\n#### 18", "7").reason == "wrong"
    assert verdict("#### Step 2: double it\nSo \\boxed{18}", "18").reason == "correct"
    assert extract_answer("#### Step 2\nThe answer is 18.") == "18"
    assert verdict("##### 5\nthe answer is 6", "6").reason == "correct"   # five hashes: a heading


def test_integers_compare_exactly_and_non_integers_with_a_tolerance():
    assert verdict("#### 1000001", "1000000").reason == "wrong"
    assert verdict("#### 1000000.5", "1000000").reason == "wrong"
    assert verdict("#### 999999.9999999", "1000000").reason == "wrong"
    assert verdict("#### 1000000.0", "1000000").reason == "correct"
    assert verdict("#### 1e6", "1000000").reason == "correct"
    assert verdict("#### 12345678901234567890", "12345678901234567891").reason == "wrong"
    assert verdict("#### 0.3333333", "1/3").reason == "correct"      # non-integer: rel_tol 1e-6
    assert verdict("#### 0.333", "1/3").reason == "wrong"
    assert verdict(r"\boxed{\frac{2}{6}}", "1/3").reason == "correct"
    assert verdict("#### 2/3", "0.6666667").reason == "correct"
    assert MathAnswerReward(rel_tol=0.0, abs_tol=0.0).score_with_meta(
        [[]], ["#### 0.3333333"], [{"answer": "1/3"}])[0].reason == "wrong"
    assert same_number(read_number("1000001"), read_number("1000000"), rel_tol=0.5) is False


@pytest.mark.parametrize("response", [
    "The answer is 4 or 5.",
    "The answer is either 4 or 5.",
    "Answer: 3, 4, or 5",
    "Answer: 4, 5",
    "The answer is between 4 and 5.",
    "Answer: 4 to 5",
    r"\boxed{4 \text{ or } 5}",
    r"\boxed{4} or \boxed{5}",
    r"First \boxed{4}. Hmm, let me redo it. \boxed{5}",   # two different boxes: a hedge too
    "\\boxed{4}\n#### 5",                                # a #### answer that a box contradicts
    "#### 4\n#### 5",
    "x = 4 or x = 5",
    "Answer: x = 4 or x = 5",
    "I am not sure: it is 4 or 5",
    "Hmm, 3, 4, or 5",
    "Somewhere between 4 and 5",
    r"Answer: $\pm 5$",
])
def test_hedges_score_zero(response):
    v = verdict(response, "5")
    assert (v.value, v.reason) == (0.0, "hedged"), v


def test_what_is_not_a_hedge():
    assert verdict(r"\boxed{5} and again \boxed{5.0}", "5").reason == "correct"   # the same answer twice
    assert verdict("We get 3 apples and then 5 more, 8 in total", "8").reason == "correct"
    assert verdict("It could be 4 or 5. Checking: it is 5", "5").reason == "correct"  # committed in the end
    assert verdict("The difference between 8 and 5 is 3", "3").reason == "correct"
    assert verdict(r"\boxed{1, 2}", "1, 2").reason == "correct"          # a list reference compares as a list
    assert verdict(r"\boxed{1 or 2}", "1, 2").reason == "wrong"


def test_every_sample_carries_its_reason_and_an_auditable_detail():
    reward = MathAnswerReward()
    responses = ["The answer is 540 meters.", "The answer is 541.", "The answer is 4 or 5.", "I give up.", "540"]
    metas = [{"answer": "540"}] * 4 + [{"answer": "  "}]
    verdicts = reward.score_with_meta([[]] * 5, responses, metas)
    assert all(isinstance(v, Scored) for v in verdicts)
    assert [(v.value, v.reason) for v in verdicts] == [
        (1.0, "correct"), (0.0, "wrong"), (0.0, "hedged"), (0.0, "unparseable"), (None, "no_reference")]
    assert verdicts[0].detail == "answer '540 meters' (answer is) vs reference '540'"
    assert verdicts[1].detail == "answer '541' (answer is) vs reference '540'"
    assert "4 or 5" in verdicts[2].detail
    assert verdicts[3].detail.startswith("no final answer")
    assert checked_verdicts(reward, [[]] * 5, responses, metas) == verdicts   # passes the contract check


# ------------------------------------------------------------------------------ hostile outputs


@pytest.fixture
def no_hang():
    """A quadratic parse of these inputs would run for minutes to hours; fail instead of stalling."""
    def on_alarm(signum, frame):
        raise TimeoutError("the math reward hung on a hostile response")
    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(60)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


def test_huge_numbers_are_just_wrong_or_right_answers(no_hang):
    zeros = r"\boxed{1" + "0" * 400 + "}"          # float() would overflow
    assert verdict(zeros, "1e400").reason == "correct"
    assert verdict(zeros, "1").reason == "wrong"
    digits = "9" * 5000                            # past Python's 4300-digit int() limit
    assert verdict(f"#### {digits}", digits).reason == "correct"
    assert verdict(f"#### {digits}", digits[:-1] + "8").reason == "wrong"
    assert verdict(f"#### {digits}", "5").reason == "wrong"
    assert verdict(f"#### {digits}.5", "2.5").reason == "wrong"
    assert verdict("#### 1" + "0" * 5000, "1e5000").reason == "correct"  # as written, canonically
    assert verdict("#### 1e999999999", "1").reason == "wrong"            # never built: 10**999999999
    assert verdict("#### 1e99999999999999", "1").reason == "wrong"      # an absurd exponent is not a number
    assert verdict(r"\boxed{\frac{1}{" + "0" * 3 + "}}", "1").reason == "wrong"  # division by zero


def test_unbalanced_boxes_nested_boxes_and_megabyte_responses_score(no_hang):
    """Sizes at which the old quadratic parse (56 s for 20k unbalanced boxes) would hang."""
    assert verdict("\\boxed{" * 200_000 + " so 5", "5").reason == "correct"
    assert verdict("\\boxed{" * 200_000 + "\\boxed{5}", "5").reason == "correct"  # closed boxes after open ones count
    assert verdict("\\boxed{" * 100_000 + "5" + "}" * 100_000, "5").reason == "wrong"  # too deep to unwrap: not 5
    assert verdict("\\boxed{5}" * 100_000, "5").reason == "correct"
    many = "".join(f"\\boxed{{{i}}}" for i in range(100_000))
    assert verdict(many, "99999").reason == "hedged"
    for filler in ("1 ", "1,", "-", "$", " ", "answer is ", "{", "\\frac{", "\\text{a", "4 or ", "#### 5\n"):
        response = filler * (300_000 // len(filler)) + " The answer is 5."
        assert verdict(response, "5").value in (0.0, 1.0)
    assert verdict("x" * 1_000_000 + " #### 5", "5").reason == "correct"
    assert verdict("The answer is " + "5 " * 500_000, "5").reason == "wrong"   # not one number, not 5


def test_outermost_boxes_reads_each_brace_once():
    assert outermost_boxes(r"\boxed{a} \boxed{\boxed{b}} \boxed{c") == ["a", r"\boxed{b}"]
    assert outermost_boxes(r"\boxed{ \fbox{x} } } \boxed{y}") == [r" \fbox{x} ", "y"]
    assert outermost_boxes("{{" * 50_000) == []


def test_a_policy_cannot_score_without_the_right_answer():
    """Attacks: several answers, the prompt's numbers copied back, answers hidden in LaTeX."""
    reward = MathAnswerReward()
    prompt = [{"role": "user", "content": "Ana has 12 pens and gives 3 to each of her 4 friends. How many are left?"}]
    attacks = [
        " ".join(f"\\boxed{{{i}}}" for i in range(100)),                 # every candidate boxed
        "Ana has 12 pens and gives 3 to each of her 4 friends. How many are left?",  # the prompt copied back
        "12 - 3*4 = 0? Or 12? The answer is 0 or 12 or 3 or 4",
        "The answer is 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12",
        r"\boxed{12\text{ or }0}",
        r"\boxed{0}" + "\n#### 12",                                       # two markers, two answers
        r"\boxed{\phantom{0}12}",
        r"\boxed{0^{12}}",
        "#### 0 " + "0" * 10_000,
        "Answer: 0 thousand",
        "The answer is not 0",
    ]
    verdicts = reward.score_with_meta([prompt] * len(attacks), attacks, [{"answer": "0"}] * len(attacks))
    assert [v.value for v in verdicts] == [0.0] * len(attacks), [(a[:40], v) for a, v in zip(attacks, verdicts)]
    honest = reward.score_with_meta([prompt], ["12 - 3*4 = 0. The answer is 0."], [{"answer": "0"}])
    assert honest[0].reason == "correct"

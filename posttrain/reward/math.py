"""Answer-checked reward for math: 1.0 when the response's final answer equals the reference.

This module holds the verdict (`judge`) and the reward (`MathAnswerReward`); reading numbers,
answers and final answers from text is posttrain.reward.math_reading, by the rules below.

The reference comes the same two ways as the code reward's tests (see
`posttrain.reward.code`): `score_with_meta(prompts, responses, metas)` with `metas[i]["answer"]`,
or `score(prompts, responses)` with `prompts_file=` rows carrying `answer`. A reference that
holds a `#### X` line (GSM8K's `answer` field as shipped, with its working) means X; one
that holds a `\\boxed{X}` (a MATH `solution`) means its last box.

Every sample gets a `Scored(value, reason, detail)`; the reasons:

* "correct" (1.0) and "wrong" (0.0), detail e.g. "answer '540 meters' (answer is) vs
  reference '540'" (the answer as read, where it was found, the reference);
* "hedged" (0.0): the final answer names several candidates ("4 or 5", "either 4 or 5",
  "3, 4, or 5", "between 4 and 5", `4 \\text{ or } 5`), or the response boxes two different
  answers (anywhere in it: a self-correction that keeps both boxes is a hedge too; so are
  more than `MAX_BOX_READINGS` different boxes), or two `####` answers, or a box and a
  `####` answer, that differ;
* "unparseable" (0.0): no final answer found;
* "no_reference" (None, abstain): the prompt has no reference, so in a `WeightedReward` the
  trained RM decides those.

The final answer, first kind found wins (not the position in the text):
1. the last `#### X` (GSM8K's final-answer marker; X must not start with a letter, so a
   Markdown heading `#### Step 2` is not one);
2. the last `\\boxed{...}` / `\\fbox{...}` (braces nested to any depth; a box inside a box is
   part of the outer one);
3. the last "answer is X" / "answer: X", up to the end of its sentence or line;
4. the last number in the response (hedged when it ends "4 or 5", "between 4 and 5").

Reading an answer: math delimiters (`$...$`, `\\(...\\)`), a box around the whole answer,
`\\text{}` and friends, `\\left`/`\\right`, LaTeX spacing, `{,}`, Markdown bold, enclosing
parentheses, a trailing period and a leading `x =` (or "total cost =") are removed. It is a
number when it is one number (integers, decimals, thousands commas `1,234`, fractions `a/b`
and `\\frac{a}{b}`, `\\dfrac`, negatives, scientific `1e-3`) with at most a currency sign before
it (`$1,234.50`, `\\$64`), a percent sign (`50%` reads 50, the number the text writes, so `0.5`
does not match `50%`) or a degree sign (`-5^\\circ`, `30°C`) after it, and then only words
(units: "540 meters", `540\\text{ meters}`, "20 cups", "3 cm", "12 km/h", "5 m^2"). Words
that change the number never strip: "or", "and", "to", "not", "thousand", "half",
"squared", "pi", "more", ... (`_CHANGES_THE_NUMBER`), nor a single letter other than a
unit (m, g, s, h, l, L: "5x" is not 5), nor a factorial "5!", nor anything with an operator
or another digit ("3 - 1", "2^3", "5 or 6" are not 3, 2 and 5). Anything else compares as
normalised text (case-insensitive, whitespace removed). Only boxes and `####` answers are
checked against each other for a hedge: an "answer is" in the working may be about a step.

Comparing numbers, exactly (fractions, never floats): a reference with an integer value
must be matched exactly (reference 1000000 rejects 1000001 and 1000000.5; "2.0" matches 2).
A non-integer reference accepts |answer - reference| <= abs_tol + rel_tol * |reference|
(so 0.3333333 matches 1/3 at the default rel_tol 1e-6). Numbers with more than
`MAX_EXACT_DIGITS` significant digits or a larger power of ten are compared as written
(digits and exponent): such a number is simply right when equal, else wrong.

Cost: linear in the response's length, a fixed number of passes over it (possessive
regexes that cannot backtrack across it; braces matched with one stack; the last number
found from the end), so a 1 MB response, 200,000 unclosed `\\boxed{` or a 5000-digit
number score in well under a second each, and never raise.
"""

from __future__ import annotations

import functools
import math
from typing import Any

from posttrain.reward.base import Scored
from posttrain.reward.code import ReferenceIndex
from posttrain.reward.math_reading import (
    MAX_BOX_READINGS,
    MAX_EXACT_DIGITS,
    FinalAnswer,
    Number,
    Reading,
    extract_answer,
    find_final_answer,
    last_boxed,
    normalize_text,
    outermost_boxes,
    read,
    read_number,
    reference_text,
    same_number,
    to_number,
)

Message = dict[str, Any]


@functools.lru_cache(maxsize=4096)
def _read_reference(text: str) -> Reading:
    """A reference is read once for all the samples of its prompt."""
    return read(text)


def _matches(answer: Reading, reference: Reading, rel_tol: float, abs_tol: float) -> bool:
    if reference.number is not None:
        return answer.number is not None and same_number(answer.number, reference.number, rel_tol, abs_tol)
    return answer.text == reference.text


def judge(response: str, reference: Any, rel_tol: float = 1e-6, abs_tol: float = 1e-9) -> Scored:
    """One sample's verdict: Scored(value, reason, detail), the reasons of the module docstring."""
    ref_text = reference_text(reference)
    ref = _read_reference(ref_text) if ref_text is not None else None
    if ref is None or not ref.text:
        return Scored(None, "no_reference", "the prompt has no reference answer")
    found = find_final_answer(response)
    if found is None:
        return Scored(0.0, "unparseable", "no final answer: no \\boxed{}, '####', 'answer is' or number")
    answer = read(found.text)
    if not answer.text:
        return Scored(0.0, "unparseable", f"no final answer: an empty answer ({found.source})")
    said = f"answer '{answer.shown}' ({found.source}) vs reference '{ref.shown}'"
    if found.hedged:
        return Scored(0.0, "hedged", f"{found.hedged}; {said}")
    if answer.hedged and ref.number is not None:
        return Scored(0.0, "hedged", f"several candidates: {said}")
    if _matches(answer, ref, rel_tol, abs_tol):
        return Scored(1.0, "correct", said)
    return Scored(0.0, "wrong", said)


def answers_match(answer: str, reference: Any, rel_tol: float = 1e-6, abs_tol: float = 1e-9) -> bool:
    """Is the answer text `answer` (already extracted) the reference?"""
    ref_text = reference_text(reference)
    return ref_text is not None and _matches(read(answer), _read_reference(ref_text), rel_tol, abs_tol)


class MathAnswerReward:
    """1.0 when the final answer matches the prompt's reference answer, 0.0 when not (also
    when the response has no answer, or hedges), None when the prompt has no reference; each
    as a `Scored` with its reason (see the module docstring).

    Args: prompts_file (JSONL rows with `prompt` and `answer`, for `score()`), rel_tol, abs_tol
    (the tolerance for non-integer references).
    """

    name = "math_answer"

    def __init__(self, prompts_file: str | None = None, rel_tol: float = 1e-6, abs_tol: float = 1e-9):
        if rel_tol < 0 or abs_tol < 0 or not math.isfinite(rel_tol + abs_tol):
            raise ValueError("MathAnswerReward: rel_tol and abs_tol must be finite and >= 0")
        self.rel_tol, self.abs_tol = rel_tol, abs_tol
        self.references = ReferenceIndex(prompts_file, ["answer"]) if prompts_file else None

    def score(self, prompts: list[list[Message]], responses: list[str]) -> list[Scored]:
        if self.references is None:
            raise ValueError("MathAnswerReward.score needs prompts_file= (prompt rows with `answer`); "
                             "or call score_with_meta(prompts, responses, metas)")
        return self.score_with_meta(prompts, responses, [self.references.meta_for(p) for p in prompts])

    def score_with_meta(self, prompts: list[list[Message]], responses: list[str],
                        metas: list[dict]) -> list[Scored]:
        if not len(prompts) == len(responses) == len(metas):
            raise ValueError(f"MathAnswerReward: {len(prompts)} prompts, {len(responses)} responses, "
                             f"{len(metas)} metas")
        return [judge(response, (meta or {}).get("answer"), self.rel_tol, self.abs_tol)
                for response, meta in zip(responses, metas)]


__all__ = ["MAX_BOX_READINGS", "MAX_EXACT_DIGITS", "FinalAnswer", "MathAnswerReward", "Number", "Reading",
           "answers_match", "extract_answer", "find_final_answer", "judge", "last_boxed", "normalize_text",
           "outermost_boxes", "read", "read_number", "reference_text", "same_number", "to_number"]

"""Answer-checked reward for math: 1.0 when the response's final answer equals the reference.

The reference comes the same two ways as the code reward's tests (see
`posttrain.reward.code`): `score_with_meta(prompts, responses, metas)` with `metas[i]["answer"]`,
or `score(prompts, responses)` with `prompts_file=` rows carrying `answer`. A prompt without
a reference gets `None` (abstain), so in a `WeightedReward` the trained RM decides those.

Final answer, first match wins:
1. the last `\\boxed{...}` / `\\fbox{...}` (braces nested to any depth);
2. the last "answer is X" / "answer: X" (up to the end of the sentence or line);
3. the last "#### X" (GSM8K style);
4. the last number in the response.

Normalisation: `$...$`, `\\(...\\)`, `\\text{}`, `\\mathrm{}`, `\\left`/`\\right`, `\\!`, spaces and
a trailing period are removed; then the answer is read as a number when it can be:
integers, decimals, thousands commas (`1,234`), fractions `a/b`, `\\frac{a}{b}`, `\\dfrac`,
`\\tfrac`, negatives, percentages (`50\\%` = 50, the number the text writes; so `0.5` does not
match `50%`), scientific `1e-3`, and a leading `x =`. Numbers compare with
`|a - b| <= abs_tol + rel_tol * |b|`; anything else compares as normalised text
(case-insensitive).
"""

from __future__ import annotations

import math
import re
from fractions import Fraction
from typing import Any

from posttrain.reward.code import ReferenceIndex

Message = dict[str, Any]

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:[eE][-+]?\d+)?|-?\.\d+")


def _braced(text: str, open_at: int) -> tuple[str, int] | None:
    """(content, index after the closing brace) for the `{` at `open_at`; None if unbalanced."""
    depth = 0
    for i in range(open_at, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return text[open_at + 1:i], i + 1
    return None


def last_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}` or `\\fbox{...}` (nested braces allowed)."""
    found = None
    for m in re.finditer(r"\\(?:boxed|fbox)\s*\{", text):
        got = _braced(text, m.end() - 1)
        if got is not None:
            found = got[0]
    return found


def extract_answer(response: str) -> str | None:
    """The response's final answer as written (not normalised), or None when it has none."""
    boxed = last_boxed(response)
    if boxed is not None:
        return boxed
    said = list(re.finditer(r"answer\s*(?:is|:)\s*:?\s*(.+?)(?:\.(?:\s|$)|\n|$)", response, re.IGNORECASE))
    if said:
        return said[-1].group(1)
    hashes = list(re.finditer(r"####\s*(.+?)\s*(?:\n|$)", response))
    if hashes:
        return hashes[-1].group(1)
    numbers = _NUMBER.findall(response.replace("$", " "))
    return numbers[-1] if numbers else None


def _unwrap(text: str) -> str:
    """Strip LaTeX/markdown wrappers that do not change the value."""
    s = text.strip()
    s = re.sub(r"^\$+|\$+$", "", s).strip()
    s = re.sub(r"^\\\(|\\\)$|^\\\[|\\\]$", "", s).strip()
    boxed = last_boxed(s)
    if boxed is not None:
        s = boxed
    s = re.sub(r"\\(?:text|textbf|mathrm|mathbf|operatorname)\s*\{([^{}]*)\}", r"\1", s)
    s = re.sub(r"\\left|\\right|\\!|\\,|\\;|\\ ", "", s)
    s = s.replace("\\%", "%").replace("**", "")
    s = re.sub(r"^[A-Za-z]\s*=\s*", "", s)       # "x = 5"
    s = s.strip().rstrip(".").strip()
    return s


def _frac(text: str) -> str:
    """`\\frac{a}{b}` / `\\dfrac` / `\\tfrac` / `\\frac12` -> `(a)/(b)`, innermost first."""
    pattern = re.compile(r"\\[dt]?frac\s*(?:\{([^{}]*)\}|(\d))\s*(?:\{([^{}]*)\}|(\d))")
    prev = None
    while prev != text:
        prev = text
        text = pattern.sub(lambda m: f"({m.group(1) or m.group(2)})/({m.group(3) or m.group(4)})", text)
    return text


def to_number(text: str) -> Fraction | float | None:
    """The value of a normalised answer, or None when it is not a plain number / fraction.
    Exact (Fraction) where the text is; float for scientific notation."""
    s = _frac(_unwrap(text)).replace(" ", "")
    if s.endswith("%"):
        s = s[:-1]
    s = s.replace("{", "").replace("}", "")
    sign = 1
    while s.startswith("(") and s.endswith(")") and _balanced(s[1:-1]):
        s = s[1:-1]
    if s.startswith("-"):
        sign, s = -1, s[1:]
    parts = s.split("/")
    if len(parts) > 2:
        return None
    values = []
    for part in parts:
        part = part.strip("()")
        if re.fullmatch(r"\d{1,3}(,\d{3})+(\.\d+)?", part):
            part = part.replace(",", "")
        if re.fullmatch(r"-?(\d+(\.\d*)?|\.\d+)", part):
            values.append(Fraction(part))
        elif re.fullmatch(r"-?(\d+(\.\d*)?|\.\d+)[eE][-+]?\d+", part):
            values.append(float(part))
        else:
            return None
    if len(values) == 2:
        if values[1] == 0:
            return None
        return sign * (values[0] / values[1])
    return sign * values[0]


def _balanced(s: str) -> bool:
    depth = 0
    for c in s:
        depth += {"(": 1, ")": -1}.get(c, 0)
        if depth < 0:
            return False
    return depth == 0


def normalize_text(text: str) -> str:
    return re.sub(r"\s+", "", _unwrap(text)).lower()


def answers_match(answer: str, reference: Any, rel_tol: float = 1e-6, abs_tol: float = 1e-9) -> bool:
    """Is `answer` the reference? Numbers: |a - b| <= abs_tol + rel_tol * |b|; else the
    normalised texts are equal."""
    ref = str(reference)
    a, b = to_number(answer), to_number(ref)
    if a is not None and b is not None:
        return abs(float(a) - float(b)) <= abs_tol + rel_tol * abs(float(b))  # exact Fractions pass too
    return normalize_text(answer) == normalize_text(ref)


class MathAnswerReward:
    """1.0 when the final answer matches the prompt's reference answer, 0.0 when not (also when
    the response has no answer at all), None when the prompt has no reference.

    Args: prompts_file (JSONL rows with `prompt` and `answer`, for `score()`), rel_tol, abs_tol.
    """

    name = "math_answer"

    def __init__(self, prompts_file: str | None = None, rel_tol: float = 1e-6, abs_tol: float = 1e-9):
        if rel_tol < 0 or abs_tol < 0 or not math.isfinite(rel_tol + abs_tol):
            raise ValueError("MathAnswerReward: rel_tol and abs_tol must be finite and >= 0")
        self.rel_tol, self.abs_tol = rel_tol, abs_tol
        self.references = ReferenceIndex(prompts_file, ["answer"]) if prompts_file else None

    def score(self, prompts: list[list[Message]], responses: list[str]) -> list[float | None]:
        if self.references is None:
            raise ValueError("MathAnswerReward.score needs prompts_file= (prompt rows with `answer`); "
                             "or call score_with_meta(prompts, responses, metas)")
        return self.score_with_meta(prompts, responses, [self.references.meta_for(p) for p in prompts])

    def score_with_meta(self, prompts: list[list[Message]], responses: list[str],
                        metas: list[dict]) -> list[float | None]:
        if not len(prompts) == len(responses) == len(metas):
            raise ValueError(f"MathAnswerReward: {len(prompts)} prompts, {len(responses)} responses, "
                             f"{len(metas)} metas")
        out: list[float | None] = []
        for response, meta in zip(responses, metas):
            reference = (meta or {}).get("answer")
            if reference is None or (isinstance(reference, str) and not reference.strip()):
                out.append(None)
                continue
            answer = extract_answer(response)
            ok = answer is not None and answers_match(answer, reference, self.rel_tol, self.abs_tol)
            out.append(1.0 if ok else 0.0)
        return out


__all__ = ["MathAnswerReward", "answers_match", "extract_answer", "last_boxed", "normalize_text", "to_number"]

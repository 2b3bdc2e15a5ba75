"""Reading math answers from text, exactly and in linear time: the pure half of the math reward.

- numbers as written -> exact values (`Number`: fractions, never floats) and the comparison
  rule (`same_number`);
- an answer text -> its value or normalised text, and whether it names several candidates
  (`read` -> `Reading`), after stripping the wrappers that do not change it;
- a response -> its final answer and whether it hedged (`find_final_answer`), and a reference
  field -> its answer (`reference_text`).

The rules (what is stripped, what counts as a unit, which final answer wins, the cost bound)
are in posttrain.reward.math's docstring; the verdict and the reward are there too.
"""

from __future__ import annotations

import collections
import itertools
import re
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

MAX_EXACT_DIGITS = 1000
"""Numbers with more significant digits (or a larger power of ten) are compared as written."""
MAX_BOX_READINGS = 64
"""At most this many different final answers (`\\boxed{}` contents, `####` lines) are read
to see whether they agree; a response with more is hedged (it is a list of guesses, and
reading them all is work an adversary chooses)."""
SHOWN_CHARS = 60

# One unsigned number as written. Possessive quantifiers: nothing here can backtrack.
_NUM = r"(?:\d{1,3}(?:,\d{3})++(?!\d)|\d++)(?:\.\d++)?+(?:[eE][-+]?+\d++)?+|\.\d++(?:[eE][-+]?+\d++)?+"
_NUMBER = re.compile(_NUM, re.ASCII)
_SIGNED_NUMBER = re.compile(rf"[-−]?(?:{_NUM})", re.ASCII)
_NOT_IN_A_NUMBER = re.compile(r"[^0-9,.eE+\-−]")
_CURRENCY = r"[$€£¥¤]"
_ONE_NUMBER = re.compile(rf"""
    (?:{_CURRENCY}\s*+)?(?P<sign>[-+−]?)\s*+(?:{_CURRENCY}\s*+)?
    (?: \\frac\s*+(?:\{{\s*+(?P<fsign>[-+−]?)\s*+(?P<fn>{_NUM})\s*+\}}|(?P<fn1>\d))
                \s*+(?:\{{\s*+(?P<fd>{_NUM})\s*+\}}|(?P<fd1>\d))
      | (?P<n>{_NUM})(?:\s*+/\s*+(?P<d>{_NUM}))?+ )
    \s*+(?P<pct>%)?+(?P<rest>.*)""", re.ASCII | re.VERBOSE | re.DOTALL)

# Words after a number that change what it means, so they are never stripped as a unit.
_CHANGES_THE_NUMBER = frozenset("""
    or nor and either neither between to from not no never than
    plus minus times over divided by multiplied mod modulo base power powers exponent
    squared cubed square cube root roots sqrt factorial pi
    half halves third thirds quarter quarters fourth fourths fifth fifths sixth sixths
    seventh sevenths eighth eighths ninth ninths tenth tenths hundredth hundredths
    thousandth thousandths millionth millionths point repeating recurring
    hundred hundreds thousand thousands million millions billion billions trillion trillions
    dozen dozens score grand lakh lakhs crore crores
    more less fewer greater smaller larger above below under least most
    about approximately approx around roughly nearly almost maybe perhaps possibly probably
    wrong incorrect false except
""".split())
_UNIT_LETTERS = frozenset("mgshlL")
_UNIT_EXPONENT = re.compile(r"(?<=[A-Za-z])\s*+\^\s*+\{?[23]\}?", re.ASCII)
_TAIL_CHARS = re.compile(r"[A-Za-z\s.,;:()'\"/²³!?-]*+", re.ASCII)
_WORD = re.compile(r"[A-Za-z]+", re.ASCII)

_TEXT_WRAPPER = re.compile(r"\\(?:text|textbf|textit|textrm|textsf|mathrm|mathbf|mathit|mathsf|mbox|operatorname)"
                           r"\s*+\{([^{}]*+)\}")
_LATEX_SPACE = re.compile(r"\\(?:left|right|displaystyle)(?![A-Za-z])|\\[!,;:>]")
_DEGREES = re.compile(r"(?:\^\s*+\{\s*+\\circ\s*+\}|\^\s*+\\circ(?![A-Za-z])|\\circ(?![A-Za-z])|°|\\degree(?![A-Za-z]))"
                      r"(?:\s*+[CF](?![A-Za-z]))?+")
_LEADING_NAME = re.compile(r"(?:\\?[A-Za-z][\w{}]*+\s*+){1,4}+=(?!=)\s*+", re.ASCII)  # "x =", "total cost ="
_CONNECTOR = re.compile(r"\b(?:or|nor|either|neither|between|and|to)\b|[,;&]", re.IGNORECASE)
_PLUS_MINUS = re.compile(r"±|∓|\\(?:pm|mp)(?![A-Za-z])")

_HASHES = re.compile(r"(?<!#)####(?!#)[ \t]*+(?=[^\sA-Za-z])([^\n]*+)")
_SAID = re.compile(r"answer(?:\s++is\b|\s*+:)\s*+:?+", re.IGNORECASE)
_SENTENCE_END = re.compile(r"\.(?=\s|$)")
_BRACES = re.compile(r"\\(?:boxed|fbox)\s*+\{|[{}]")
_BOX_OPENING = re.compile(r"\\(?:boxed|fbox)\s*+\{")


# ------------------------------------------------------------------------------ numbers


@dataclass(frozen=True)
class Number:
    """A number as exact as it can be held: `exact` is its value, or None when it is too
    large to compute with (see MAX_EXACT_DIGITS); `key` is the number as written, made
    canonical for a decimal (digits and power of ten: equal keys, equal values)."""

    exact: Fraction | None
    key: str


def _decimal(token: str) -> tuple[str, int] | None:
    """An unsigned number token as (significant digits, power of ten): "1,200.50" ->
    ("12005", -1); zero is ("", 0). None when its exponent is absurd (more than 9 digits)."""
    mantissa, _, exp_text = token.replace(",", "").lower().partition("e")
    if len(exp_text.lstrip("+-").lstrip("0")) > 9:
        return None
    exponent = int(exp_text) if exp_text else 0
    whole, _, frac = mantissa.partition(".")
    digits = (whole + frac).lstrip("0")
    significant = digits.rstrip("0")
    if not significant:
        return "", 0
    return significant, exponent - len(frac) + len(digits) - len(significant)


def _number(negative: bool, numerator: str, denominator: str | None = None) -> Number | None:
    top = _decimal(numerator)
    bottom = _decimal(denominator) if denominator is not None else ("1", 0)
    if top is None or bottom is None or not bottom[0]:
        return None  # an absurd exponent, or a division by zero
    sign = "-" if negative and top[0] else ""
    key = f"{sign}{top[0] or '0'}e{top[1]}" + ("" if denominator is None else f"/{bottom[0]}e{bottom[1]}")
    if max(len(top[0]), len(bottom[0]), abs(top[1]), abs(bottom[1])) > MAX_EXACT_DIGITS:
        return Number(None, key)
    shift = top[1] - bottom[1]  # (t * 10^et) / (b * 10^eb) = t * 10^shift / b
    p, q = int(top[0] or "0"), int(bottom[0])
    value = Fraction(p * 10 ** shift, q) if shift >= 0 else Fraction(p, q * 10 ** -shift)
    return Number(-value if sign else value, key)


def same_number(answer: Number, reference: Number, rel_tol: float = 1e-6, abs_tol: float = 1e-9) -> bool:
    """The comparison rule of the module docstring: an integer reference exactly, a
    non-integer one within abs_tol + rel_tol * |reference|; huge numbers as written."""
    a, b = answer.exact, reference.exact
    if a is None or b is None:
        return answer.key == reference.key
    if b.denominator == 1:
        return a == b
    return abs(a - b) <= Fraction(abs_tol) + Fraction(rel_tol) * abs(b)


# ------------------------------------------------------------------------------ reading an answer


def outermost_boxes(text: str) -> list[str]:
    """Contents of every closed `\\boxed{...}` / `\\fbox{...}` that is not inside another
    one, in order. One pass over the braces; an unclosed box is skipped, and the boxes
    after it still count."""
    if "\\boxed" not in text and "\\fbox" not in text:
        return []
    stack: list[tuple[int, bool]] = []  # (content start, is a box) per open brace
    closed: list[tuple[int, int]] = []
    for m in _BRACES.finditer(text):
        token = m.group()
        if token == "}":
            if stack:
                start, is_box = stack.pop()
                if is_box:
                    closed.append((start, m.start()))
        else:
            stack.append((m.end(), token != "{"))
    # Boxes close inner-first; keep those no earlier-starting box contains.
    closed.sort()
    out: list[str] = []
    reach = -1
    for start, end in closed:
        if start > reach:
            out.append(text[start:end])
            reach = end
    return out


def last_boxed(text: str) -> str | None:
    """Content of the last outermost `\\boxed{...}` or `\\fbox{...}` (nested braces allowed)."""
    boxes = outermost_boxes(text)
    return boxes[-1] if boxes else None


def _strip_end(s: str) -> str:
    s = s.strip()
    while s.endswith("."):
        s = s[:-1].rstrip()
    return s


def _unbox(s: str) -> str:
    """The content of a box that is the whole of `s` (`\\boxed{5}`), else `s`."""
    boxes = outermost_boxes(s)
    if len(boxes) == 1 and s.endswith(boxes[0] + "}") and _BOX_OPENING.fullmatch(s[:len(s) - len(boxes[0]) - 1]):
        return _strip_end(boxes[0])
    return s


def _clean(text: str) -> str:
    """Strip the wrappers that do not change an answer's value (see the module docstring)."""
    s = text.replace("\\$", "¤")  # an escaped dollar is money; the others delimit math
    if s.count("$") >= 2:
        s = s.replace("$", "")
    for delimiter in ("\\(", "\\)", "\\[", "\\]"):
        s = s.replace(delimiter, " ")
    s = _strip_end(s)
    for _ in range(3):  # `\boxed{\boxed{5}}`: a few levels, each one pass
        inner = _unbox(s)
        if inner is s:
            break
        s = inner
    s = _TEXT_WRAPPER.sub(r" \1 ", s)
    s = _LATEX_SPACE.sub("", s)
    s = _DEGREES.sub(" ", s.replace("{,}", ","))
    s = s.replace("\\ ", " ").replace("~", " ").replace("\\%", "%")
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac").replace("**", "").replace("`", "")
    s = s.strip()
    m = _LEADING_NAME.match(s)
    if m and not any(w.lower() in _CHANGES_THE_NUMBER for w in _WORD.findall(m.group())):
        s = s[m.end():]
    s = _strip_end(s)
    inner = s[1:-1]
    if s.startswith("(") and s.endswith(")") and not any(c in inner for c in "(),"):
        s = inner.strip()  # "(-5)", "(A)"; a tuple "(1, 2)" stays
    return s


def _unit_tail(rest: str) -> bool:
    """Is what follows a number only units or words that leave its value alone?"""
    rest = _UNIT_EXPONENT.sub("", rest)
    if not rest.strip():
        return True
    if not (rest[0].isspace() or rest[0].isalpha() or rest[0] in "(,;:"):
        return False  # "5!", "5^2", "5-1", "5.x"
    if _TAIL_CHARS.fullmatch(rest) is None:
        return False
    for word in _WORD.findall(rest):
        if word.lower() in _CHANGES_THE_NUMBER or (len(word) == 1 and word not in _UNIT_LETTERS):
            return False
    return True


def _one_number(s: str) -> Number | None:
    """The value of a cleaned answer that is one number with only units after it, or None."""
    m = _ONE_NUMBER.fullmatch(s)
    if m is None or not _unit_tail(m["rest"]):
        return None
    negative = (m["sign"] in ("-", "−")) != ((m["fsign"] or "") in ("-", "−"))
    if m["n"] is not None:
        return _number(negative, m["n"], m["d"])
    return _number(negative, m["fn"] or m["fn1"], m["fd"] or m["fd1"])


def _several(s: str) -> bool:
    """Does a cleaned answer name more than one number, joined as alternatives or a list
    ("4 or 5", "between 4 and 5", "3, 4, 5", "\\pm 2")? ("3 - 1" and "2^3" do not.)"""
    count = sum(1 for _ in itertools.islice(_NUMBER.finditer(s), 2))
    if count and _PLUS_MINUS.search(s):
        return True  # "\pm 5" is two answers
    return count == 2 and _CONNECTOR.search(_NUMBER.sub(" N ", s)) is not None


def read_number(text: str) -> Number | None:
    """The value of an answer that is one number (units and all, see the module
    docstring), or None."""
    return _one_number(_clean(text))


def to_number(text: str) -> Fraction | None:
    """The exact value of an answer that is one number not too large to compute with, or None."""
    n = read_number(text)
    return None if n is None else n.exact


def normalize_text(text: str) -> str:
    return re.sub(r"\s++", "", _clean(text)).lower()


@dataclass(frozen=True)
class Reading:
    """An answer read: `number` when it is one, `hedged` when it names several, and its
    normalised `text` always (non-numeric references compare on it)."""

    number: Number | None
    hedged: bool
    text: str
    shown: str

    def identity(self) -> tuple:
        """What two readings must share to be the same answer."""
        if self.number is not None:
            return ("number", self.number.exact if self.number.exact is not None else self.number.key)
        return ("text", self.text)


def _shown(text: str) -> str:
    s = " ".join(text[:4 * SHOWN_CHARS].split())
    return s if len(s) <= SHOWN_CHARS else s[:SHOWN_CHARS - 1] + "…"


def read(text: str) -> Reading:
    """An answer text read: its number (when it is one), whether it names several, its
    normalised text, and how messages show it."""
    s = _clean(text)
    number = _one_number(s)
    return Reading(number, number is None and _several(s), re.sub(r"\s++", "", s).lower(), _shown(s.replace("¤", "$")))


# ------------------------------------------------------------------------------ the final answer


def _hedged_last_number(text: str, previous: tuple[int, int], last: tuple[int, int]) -> bool:
    """In a response with no answer marker: does its last number end a hedge with the one
    before it ("4 or 5", "3, 4, or 5", "between 4 and 5"), within one sentence?"""
    gap = text[previous[1]:last[0]]
    if re.search(r"[.!?;:\n]", gap):
        return False
    if re.search(r"\b(?:or|nor)\b", gap, re.IGNORECASE):
        return True
    before = text[max(0, previous[0] - 12):previous[0]].lower().split()
    return bool(before) and before[-1] in ("between", "from") and gap.strip().lower() in ("and", "to", "-")


def _last_two_numbers(text: str) -> tuple[tuple[int, int] | None, tuple[int, int]] | None:
    """(start, end) of the response's last number and of the one before it (or None), found
    from the end: the scan starts at a character no number contains (so the matches after
    it are the whole text's), in windows growing 8x: a response dense with numbers costs
    its tail, a sparse one a scan in C."""
    size = 4096
    while True:
        start = 0
        if size < len(text):
            boundary = _NOT_IN_A_NUMBER.search(text, len(text) - size)
            if boundary is None:
                size *= 8
                continue
            start = boundary.start()
        found = collections.deque(_SIGNED_NUMBER.finditer(text, start), maxlen=2)
        if len(found) == 2 or start == 0:
            break
        size *= 8
    spans = []
    for m in found:
        a, b = m.span()
        if text[a] in "-−" and a > 0 and (text[a - 1].isalnum() or text[a - 1] in "_)]}"):
            a += 1  # `x-1`: a minus after a word or a bracket is a subtraction, not a sign
        spans.append((a, b))
    if not spans:
        return None
    return (spans[0] if len(spans) == 2 else None), spans[-1]


@dataclass(frozen=True)
class FinalAnswer:
    """The response's final answer as written, where it came from, and whether the response
    hedged between different final answers."""

    text: str
    source: str  # "####", "\\boxed", "answer is", "last number"
    hedged: str = ""  # why it is a hedge, or ""


def find_final_answer(response: str) -> FinalAnswer | None:
    """The final answer by the precedence of the module docstring, or None."""
    boxes = outermost_boxes(response)
    hashes = [m.group(1).strip() for m in _HASHES.finditer(response)]
    if hashes:
        found = FinalAnswer(hashes[-1], "####")
    elif boxes:
        found = FinalAnswer(boxes[-1], "\\boxed")
    else:
        said = None
        for said in _SAID.finditer(response):
            pass
        if said is not None:
            line_end = response.find("\n", said.end())
            span = response[said.end():len(response) if line_end < 0 else line_end]
            stop = _SENTENCE_END.search(span)
            return FinalAnswer((span[:stop.start()] if stop else span).strip(), "answer is")
        numbers = _last_two_numbers(response)
        if numbers is None:
            return None
        previous, last = numbers
        hedge = "its last number ends a hedge" if previous and _hedged_last_number(response, previous, last) else ""
        return FinalAnswer(response[last[0]:last[1]], "last number", hedge)
    # Every box and every #### answer must give the same answer; else the response hedged.
    others: dict[str, str] = {}  # answer as written -> where
    for where, texts in (("\\boxed", boxes), ("####", hashes)):
        for text in texts:
            if text != found.text:
                others.setdefault(text, where)
    if len(others) >= MAX_BOX_READINGS:
        return FinalAnswer(found.text, found.source, f"{len(others) + 1} different final answers")
    if others:
        final = read(found.text).identity()
        for text, where in others.items():
            if read(text).identity() != final:
                return FinalAnswer(found.text, found.source, f"different final answers: {where} "
                                   f"'{_shown(_clean(text))}' and {found.source} '{_shown(_clean(found.text))}'")
    return found


def extract_answer(response: str) -> str | None:
    """The response's final answer as written (not normalised), or None when it has none."""
    found = find_final_answer(response)
    return None if found is None else found.text


def reference_text(reference: Any) -> str | None:
    """The reference answer as text: after the last `####` line when it has one (GSM8K's
    `answer`, with its working), else the last box when it has one (a MATH `solution`);
    None when there is none."""
    if reference is None or isinstance(reference, bool):
        return None
    text = str(reference)
    marked = None
    for marked in _HASHES.finditer(text):
        pass
    if marked is not None:
        text = marked.group(1)
    else:
        text = last_boxed(text) or text
    return text if text.strip() else None

"""The embedded world's verifiable task: sort a short list of one-digit numbers.

    user:      "Sort these numbers: 7 2 9 4"
    assistant: "2 4 7 9"

Lists hold 3 to 6 numbers from 0-9 (repeats allowed), so prompts are about 10 tokens and
answers at most 7 with the end-of-turn token: a model of well under a million parameters
learns the format in seconds and the task in minutes, which is what a loop demo on two CPU
cores needs. The scorer gives partial credit, so a reward model and rejection sampling have
a gradient of quality to work with, not only right/wrong.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

PROMPT_PREFIX = "Sort these numbers:"
MIN_LEN, MAX_LEN = 3, 6
MAX_VALUE = 9

_PROMPT_RE = re.compile(r"^\s*Sort these numbers:\s*(\d+(?:\s+\d+)*)\s*$")

# A response that has every number in place but is not written exactly like the reference
# (extra inner whitespace, a newline between numbers) is close but not perfect: 1.0 is kept
# for exactly right, so "perfect" in the demo means the canonical answer.
NEAR_MISS_CAP = 0.9


@dataclass(frozen=True)
class TaskItem:
    numbers: tuple[int, ...]

    @property
    def prompt(self) -> str:
        return f"{PROMPT_PREFIX} {' '.join(map(str, self.numbers))}"

    @property
    def answer(self) -> str:
        return " ".join(map(str, sorted(self.numbers)))

    def messages(self) -> list[dict]:
        return [{"role": "user", "content": self.prompt}]


def random_item(rng: random.Random) -> TaskItem:
    n = rng.randint(MIN_LEN, MAX_LEN)
    return TaskItem(tuple(rng.randint(0, MAX_VALUE) for _ in range(n)))


def sample_items(n: int, rng: random.Random, exclude: set[str] | None = None) -> list[TaskItem]:
    """`n` distinct items whose prompts are not in `exclude`; adds their prompts to `exclude`.

    Sharing one `exclude` set between calls keeps held-out, training and annotation prompts
    disjoint.
    """
    seen = exclude if exclude is not None else set()
    out: list[TaskItem] = []
    while len(out) < n:
        item = random_item(rng)
        if item.prompt not in seen:
            seen.add(item.prompt)
            out.append(item)
    return out


def parse_prompt(prompt_text: str) -> list[int]:
    """The numbers of a task prompt; ValueError if the text is not a task prompt."""
    m = _PROMPT_RE.match(prompt_text)
    if m is None:
        raise ValueError(f"not a sorting-task prompt: {prompt_text[:80]!r}")
    return [int(x) for x in m.group(1).split()]


def is_task_prompt(prompt_text: str) -> bool:
    return _PROMPT_RE.match(prompt_text) is not None


def reference(prompt_text: str) -> str:
    """The correct answer to a task prompt: the numbers sorted ascending, one space apart."""
    return " ".join(map(str, sorted(parse_prompt(prompt_text))))


def positional_credit(answer: list[str], response: list[str]) -> float:
    """Share of positions right, penalising a wrong length.

        credit = #{i : response[i] == answer[i]} / max(len(answer), len(response))

    Both are lists of whitespace-separated words; a word that is not the right number at
    its position earns nothing, so garbage scores 0 and extra words dilute the credit.
    """
    denom = max(len(answer), len(response))
    if denom == 0:
        return 0.0
    hits = sum(a == r for a, r in zip(answer, response))
    return hits / denom


def score(prompt_text: str, response_text: str) -> float:
    """Task score in [0, 1]: 1.0 only for exactly the reference (surrounding whitespace
    ignored), otherwise the positional credit, capped at NEAR_MISS_CAP."""
    answer = reference(prompt_text)
    text = response_text.strip()
    if text == answer:
        return 1.0
    return min(positional_credit(answer.split(), text.split()), NEAR_MISS_CAP)


def last_user_content(messages: list[dict]) -> str | None:
    for m in reversed(messages):
        if m.get("role") == "user":
            return m.get("content")
    return None


class TaskReward:
    """The task's programmatic scorer as a posttrain reward (`posttrain.world.task:TaskReward`).

    Reads the task from the last user message. Abstains (None) on a conversation whose last
    user message is not a sorting prompt, so it can sit beside other rewards in a mixed
    recipe; `strict=True` raises on such a prompt instead.
    """

    name = "world_task"

    def __init__(self, strict: bool = False):
        self.strict = strict

    def score(self, prompts: list[list[dict]], responses: list[str]) -> list[float | None]:
        if len(prompts) != len(responses):
            raise ValueError(
                f"{self.name}: {len(prompts)} prompts but {len(responses)} responses"
            )
        out: list[float | None] = []
        for i, (messages, response) in enumerate(zip(prompts, responses)):
            text = last_user_content(messages)
            if text is None or not is_task_prompt(text):
                if self.strict:
                    raise ValueError(f"{self.name}: prompt {i} is not a sorting-task prompt: "
                                     f"{(text or '')[:80]!r}")
                out.append(None)
                continue
            out.append(score(text, response))
        return out

"""Tiny verifiable task variants for the code and math capabilities, in the embedded world's style.

    files = build_code_variant(out_dir, seed=0)   # prompts with unit tests in `tests`
    files = build_math_variant(out_dir, seed=0)   # word problems with a reference `answer`

Each variant writes, deterministically from its seed:

    prompts/train.jsonl         `id`, `prompt` (messages), `capability`, and `tests` / `answer`
    prompts/heldout.jsonl       the same, disjoint from every other file
    preferences/round_01.jsonl  TRL conversational preference rows (`prompt`, `chosen`,
    ...                         `rejected`, `strength`, `capability`): chosen is a correct
                                solution, rejected a wrong one (a plausible slip)
    preferences/heldout.jsonl   held-out preference rows (reward-model accuracy)
    sft_seed.jsonl              correct demonstrations, `messages` rows

The tasks are small enough that a prompt plus its solution fits the world's tiny model
(128 positions): they exist so the loop runs end to end with the execution-checked and
answer-checked rewards, not to be learned by a sub-million-parameter model (it mostly fails,
which is fine). Prompt rows carry their checks (`tests`, `answer`) so both doors of the
checking rewards work: `score_with_meta` from the sample stage, and `prompts_file=`.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from posttrain import files

STRENGTH = "significantly_better"
"""A correct solution against a wrong one is the clearest preference there is."""


@dataclass(frozen=True)
class VariantFiles:
    """Absolute paths of a built variant."""

    root: Path
    train_prompts: Path
    heldout_prompts: Path
    preference_rounds: tuple[Path, ...]
    heldout_preferences: Path
    sft_seed: Path


@dataclass(frozen=True)
class Item:
    """One task: the prompt text, a correct and a wrong response, and the check."""

    key: str
    prompt: str
    correct: str
    wrong: str
    check: dict  # {"tests": [...]} or {"answer": "..."}

    def messages(self) -> list[dict]:
        return [{"role": "user", "content": self.prompt}]


# ---------------------------------------------------------------------------------------
# Code: one-line functions of x with a constant k, three asserts each


@dataclass(frozen=True)
class _CodeTemplate:
    name: str  # function name prefix; the constant is appended (add3)
    says: str  # what the function returns, with {k}
    body: str  # correct expression in x and {k}
    slip: str  # a wrong expression that fails at least one test
    fn: Callable[[int, int], object]  # (k, x) -> the right value


_CODE_TEMPLATES = (
    _CodeTemplate("add", "x + {k}", "x + {k}", "x - {k}", lambda k, x: x + k),
    _CodeTemplate("mul", "x * {k}", "x * {k}", "x + {k}", lambda k, x: x * k),
    _CodeTemplate("sub", "x - {k}", "x - {k}", "{k} - x", lambda k, x: x - k),
    _CodeTemplate("mod", "x % {k}", "x % {k}", "x // {k}", lambda k, x: x % k),
    _CodeTemplate("gt", "x > {k}", "x > {k}", "x >= {k}", lambda k, x: x > k),
    _CodeTemplate("cap", "min(x, {k})", "min(x, {k})", "max(x, {k})", lambda k, x: min(x, k)),
)
_CODE_K = range(2, 20)


def _code_solution(fname: str, expr: str) -> str:
    return f"```python\ndef {fname}(x):\n    return {expr}\n```"


def _code_item(t: _CodeTemplate, k: int) -> Item:
    fname = f"{t.name}{k}"
    # 0, k and k + 3 separate every slip above from its template (k - x at 0, >= and // at k).
    tests = [f"assert {fname}({x}) == {t.fn(k, x)!r}" for x in (0, k, k + 3)]
    return Item(
        key=fname,
        prompt=f"Write a Python function {fname}(x) that returns {t.says.format(k=k)}.",
        correct=_code_solution(fname, t.body.format(k=k)),
        wrong=_code_solution(fname, t.slip.format(k=k)),
        check={"tests": tests},
    )


def code_items() -> list[Item]:
    """Every code task of the family, in a fixed order (108 tasks)."""
    return [_code_item(t, k) for t in _CODE_TEMPLATES for k in _CODE_K]


# ---------------------------------------------------------------------------------------
# Math: one-step word problems with an integer answer


_NAMES = ("Ana", "Ben", "Cy", "Dee", "Eli", "Fay")
_THINGS = ("apples", "pens", "cards", "eggs")


def _math_item(kind: str, name: str, thing: str, a: int, b: int) -> Item:
    if kind == "add":
        prompt = f"{name} has {a} {thing} and gets {b} more. How many {thing} now?"
        answer, work, slip = a + b, f"{a} + {b} = {a + b}", f"{a} - {b} = {a - b}"
    elif kind == "sub":
        prompt = f"{name} has {a + b} {thing} and gives away {b}. How many are left?"
        answer, work, slip = a, f"{a + b} - {b} = {a}", f"{a + b} + {b} = {a + 2 * b}"
    elif kind == "mul":
        prompt = f"{name} has {a} bags of {b} {thing}. How many {thing}?"
        answer, work, slip = a * b, f"{a} * {b} = {a * b}", f"{a} * {b} = {a * b - b}"  # one bag missed
    elif kind == "div":
        prompt = f"{name} shares {a * b} {thing} among {b} friends. How many each?"
        answer, work, slip = a, f"{a * b} / {b} = {a}", f"{a * b} * {b} = {a * b * b}"  # wrong operation
    else:
        raise ValueError(f"unknown math problem kind {kind!r}")
    wrong_answer = slip.rsplit("=", 1)[1].strip()
    if wrong_answer == str(answer):
        raise AssertionError(f"math slip equals the answer for {prompt!r}")  # excluded by a, b >= 2
    return Item(
        key=prompt,
        prompt=prompt,
        correct=f"{work}. The answer is {answer}.",
        wrong=f"{slip}. The answer is {wrong_answer}.",
        check={"answer": str(answer)},
    )


def math_items(rng: random.Random, n: int) -> list[Item]:
    """`n` distinct word problems drawn with `rng` (operands 2-9, so slips never land on the answer)."""
    out: dict[str, Item] = {}
    kinds = ("add", "sub", "mul", "div")
    while len(out) < n:
        item = _math_item(rng.choice(kinds), rng.choice(_NAMES), rng.choice(_THINGS),
                          rng.randint(2, 9), rng.randint(2, 9))
        out.setdefault(item.key, item)
    return list(out.values())


# ---------------------------------------------------------------------------------------
# Writing a variant


def _prompt_row(split: str, i: int, item: Item, capability: str) -> dict:
    return {"id": f"{capability}-{split}-{i:04d}", "prompt": item.messages(), "capability": capability,
            **item.check}


def _preference_row(split: str, i: int, item: Item, capability: str) -> dict:
    return {
        "id": f"{capability}-{split}-{i:04d}",
        "prompt": item.messages(),
        "chosen": [{"role": "assistant", "content": item.correct}],
        "rejected": [{"role": "assistant", "content": item.wrong}],
        "strength": STRENGTH,
        "capability": capability,
    }


def _write_variant(out_dir: str | os.PathLike, items: list[Item], capability: str, *, n_train: int,
                   n_heldout: int, n_pref_per_round: int, n_heldout_pref: int, rounds: int,
                   n_sft_seed: int) -> VariantFiles:
    sizes = [n_heldout, n_heldout_pref, n_train, n_sft_seed] + [n_pref_per_round] * rounds
    if min(sizes) < 0 or rounds < 1:
        raise ValueError(f"{capability} variant: sizes must be >= 0 and rounds >= 1, got {sizes} and {rounds}")
    if sum(sizes) > len(items):
        raise ValueError(f"{capability} variant: asked for {sum(sizes)} distinct tasks but the family has "
                         f"{len(items)}")
    root = Path(out_dir).resolve()
    # Consecutive slices of one shuffled list: every file is disjoint from every other.
    cuts, at = [], 0
    for n in sizes:
        cuts.append(items[at:at + n])
        at += n
    heldout, heldout_pref, train, sft_seed, *pref_rounds = cuts
    out = VariantFiles(
        root=root,
        train_prompts=root / "prompts" / "train.jsonl",
        heldout_prompts=root / "prompts" / "heldout.jsonl",
        preference_rounds=tuple(root / "preferences" / f"round_{r:02d}.jsonl" for r in range(1, rounds + 1)),
        heldout_preferences=root / "preferences" / "heldout.jsonl",
        sft_seed=root / "sft_seed.jsonl",
    )
    files.write_jsonl(out.train_prompts, [_prompt_row("train", i, it, capability) for i, it in enumerate(train)])
    files.write_jsonl(out.heldout_prompts,
                      [_prompt_row("heldout", i, it, capability) for i, it in enumerate(heldout)])
    for r, (path, batch) in enumerate(zip(out.preference_rounds, pref_rounds), start=1):
        files.write_jsonl(path, [_preference_row(f"round{r:02d}", i, it, capability) for i, it in enumerate(batch)])
    files.write_jsonl(out.heldout_preferences,
                      [_preference_row("heldout_pref", i, it, capability) for i, it in enumerate(heldout_pref)])
    files.write_jsonl(out.sft_seed, [
        {"id": f"{capability}-sft_seed-{i:04d}", "capability": capability,
         "messages": it.messages() + [{"role": "assistant", "content": it.correct}]}
        for i, it in enumerate(sft_seed)
    ])
    return out


def build_code_variant(out_dir: str | os.PathLike, seed: int = 0, *, n_train: int = 12, n_heldout: int = 6,
                       n_pref_per_round: int = 8, n_heldout_pref: int = 6, rounds: int = 2,
                       n_sft_seed: int = 8) -> VariantFiles:
    """Write the code variant into `out_dir`: prompts whose `tests` are assert statements on a
    one-line function of x, preferences of a correct over a slipped solution. Deterministic in
    `seed` and the sizes."""
    items = code_items()
    random.Random(f"posttrain-code-variant-{seed}").shuffle(items)
    return _write_variant(out_dir, items, "code", n_train=n_train, n_heldout=n_heldout,
                          n_pref_per_round=n_pref_per_round, n_heldout_pref=n_heldout_pref, rounds=rounds,
                          n_sft_seed=n_sft_seed)


def build_math_variant(out_dir: str | os.PathLike, seed: int = 0, *, n_train: int = 12, n_heldout: int = 6,
                       n_pref_per_round: int = 8, n_heldout_pref: int = 6, rounds: int = 2,
                       n_sft_seed: int = 8) -> VariantFiles:
    """Write the math variant into `out_dir`: one-step word problems with an integer `answer`,
    preferences of the right working over a wrong operation. Deterministic in `seed` and the sizes."""
    total = n_train + n_heldout + n_pref_per_round * rounds + n_heldout_pref + n_sft_seed
    items = math_items(random.Random(f"posttrain-math-variant-{seed}"), max(total, 0))
    return _write_variant(out_dir, items, "math", n_train=n_train, n_heldout=n_heldout,
                          n_pref_per_round=n_pref_per_round, n_heldout_pref=n_heldout_pref, rounds=rounds,
                          n_sft_seed=n_sft_seed)


__all__ = ["Item", "VariantFiles", "build_code_variant", "build_math_variant", "code_items", "math_items"]

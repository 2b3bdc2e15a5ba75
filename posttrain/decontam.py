"""Decontamination: training data checked against the prompts a run is judged by.

Llama 3 report, section 5.1.4, measures contamination by 8-gram overlap. Here a training text
is contaminated by a prompt set when it shares an n-gram of words with one of the set's
prompts (default n = 8; words are `\\w+` runs, lower-cased, so case and punctuation never
hide an overlap). A text shorter than n words has no n-gram: it is compared whole, after the
same normalisation, with the prompts that are shorter than n words too.

What is checked, per stage, before it trains (the recipe's `decontaminate`):
- sft: every user and assistant turn of each row;
- rm, dpo: the prompt's user turns and every response (chosen, rejected, edited);
- sample: the prompts' user turns.
`warn` counts contaminated rows per source file (in the stage's metrics and the report) and
trains on them; `drop` removes them too (counted under the reason `contaminated`).

The prompt sets come from `prompt_sets` (today the recipe's `data.eval_prompts`, one set per
file); another source of prompts (a benchmark's) is one more (name, texts) pair there.
"""

from __future__ import annotations

import logging
import re
import tempfile
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import field
from pathlib import Path
from typing import Any, TypeVar

log = logging.getLogger(__name__)

WORD = re.compile(r"\w+")
DEFAULT_N = 8

T = TypeVar("T")


def words(text: str) -> list[str]:
    """The normalised words of a text: `\\w+` runs, lower-cased."""
    return WORD.findall(text.lower())


class NgramIndex:
    """Every n-gram of a collection of prompt sets, each mapped to the first set that has it."""

    def __init__(self, n: int = DEFAULT_N):
        if n < 1:
            raise ValueError(f"decontamination n must be at least 1, got {n}")
        self.n = n
        self.grams: dict[tuple[str, ...], str] = {}
        self.whole: dict[tuple[str, ...], str] = {}
        """Prompts shorter than n words, as their whole word sequence."""

    def add(self, name: str, texts: Iterable[str]) -> None:
        n = self.n
        for text in texts:
            ws = words(text)
            if not ws:
                continue
            if len(ws) < n:
                self.whole.setdefault(tuple(ws), name)
                continue
            for gram in zip(*(ws[k:] for k in range(n))):
                self.grams.setdefault(gram, name)

    def __len__(self) -> int:
        return len(self.grams) + len(self.whole)

    def check(self, text: str) -> str | None:
        """The name of a prompt set `text` overlaps, or None."""
        ws = words(text)
        n = self.n
        if len(ws) < n:
            return self.whole.get(tuple(ws)) if ws else None
        # The common case (no overlap) stays in C: isdisjoint consumes the zip itself.
        if self.grams.keys().isdisjoint(zip(*(ws[k:] for k in range(n)))):
            return None
        for gram in zip(*(ws[k:] for k in range(n))):
            if gram in self.grams:
                return self.grams[gram]
        return None  # unreachable: isdisjoint found one

    def check_any(self, texts: Iterable[str]) -> str | None:
        """The first prompt set any of `texts` overlaps, or None."""
        for t in texts:
            hit = self.check(t) if isinstance(t, str) else None
            if hit is not None:
                return hit
        return None


# ----------------------------------------------------------------------------- prompt sets


def user_texts(messages: list[dict]) -> list[str]:
    """The user turns of a conversation (the prompt a person wrote)."""
    return [m["content"] for m in messages if m.get("role") == "user" and isinstance(m.get("content"), str)]


def prompt_sets(eval_prompt_files: Iterable[str]) -> Iterator[tuple[str, list[str]]]:
    """(set name, texts) of every prompt set training data is checked against, named by its
    file: each eval prompt file's user turns, and each benchmark's prompts (`eval.benchmarks`:
    HumanEval's function stubs, IFBench's or an IFEval-format file's requests, the documents
    of the lm-eval tasks in an lm_eval benchmark's include_path)."""
    from posttrain import benchmarks, data, lmeval

    for path in eval_prompt_files:
        if str(path).endswith(".gz"):  # a benchmark's own file (HumanEval ships gzipped JSONL)
            yield str(path), [str(row.get("prompt", "")) for _, row in benchmarks._rows(str(path))]
        elif lmeval.is_task_folder(path):  # an lm_eval benchmark's include_path: its tasks' prompts
            with tempfile.TemporaryDirectory(prefix="posttrain-lmeval-prompts-") as tmp:
                yield str(path), lmeval.folder_prompts(str(path), Path(tmp))
        else:
            yield str(path), [t for p in data.load_prompts([path]) for t in user_texts(p.messages)]


def build_index(sets: Iterable[tuple[str, Iterable[str]]], n: int = DEFAULT_N) -> NgramIndex:
    index = NgramIndex(n)
    for name, texts in sets:
        index.add(name, texts)
    return index


# ----------------------------------------------------------------------------- stage inputs


def settings_field() -> Any:
    """A stage input: {"mode": "warn" | "drop", "n": int}, or None when decontamination is off
    (then left out of the stage's input hash, which stays what it was before decontamination)."""
    return field(default=None, kw_only=True, metadata={"omit_if_empty": True})


def files_field() -> Any:
    """A stage input: the eval prompt files checked against (hashed by content; left out of the
    hash when empty, i.e. when decontamination is off)."""
    return field(default_factory=list, kw_only=True, metadata={"path": True, "omit_if_empty": True})


def resolve_inputs(rnd) -> dict:
    """The decontamination inputs of a stage (`settings_field`, `files_field`) for round `rnd`."""
    cfg = rnd.recipe.decontaminate
    if cfg.mode == "off":
        return {}
    from posttrain.benchmarks import data_file

    files = [rnd.path(p.path) for p in rnd.recipe.data.eval_prompts]
    # an lm_eval benchmark gives its include_path (its tasks' prompts as lm-eval renders them);
    # lm-eval's own tasks (no include_path) are not checked
    files += [f for f in (data_file(b, rnd.path) for b in rnd.recipe.eval.benchmarks) if f is not None]
    return {"decontaminate": {"mode": cfg.mode, "n": cfg.n}, "eval_prompt_files": list(dict.fromkeys(files))}


def screen(inputs, rows: list[T], texts: Callable[[T], Iterable[str]], source: Callable[[T], str],
           stage: str) -> tuple[list[T], dict[str, int]]:
    """Check every row of a stage's training data against the eval prompts named in its
    inputs. Returns (the rows to train on, contaminated rows per source). Off: (rows, {})."""
    settings = getattr(inputs, "decontaminate", None)
    if not settings or not rows:
        return rows, {}
    index = build_index(prompt_sets(inputs.eval_prompt_files), settings["n"])
    if not len(index):
        return rows, {}
    kept, counts = [], Counter()
    for row in rows:
        if index.check_any(texts(row)) is None:
            kept.append(row)
        else:
            counts[source(row)] += 1
            if settings["mode"] == "warn":
                kept.append(row)
    if counts:
        action = "dropped" if settings["mode"] == "drop" else "kept (decontaminate: warn)"
        log.warning("%s: %d row(s) share a %d-gram with an eval prompt, %s: %s", stage, sum(counts.values()),
                    settings["n"], action, ", ".join(f"{k}: {v}" for k, v in sorted(counts.items())))
    return kept, dict(sorted(counts.items()))


def screen_preferences(inputs, prefs: list, stage: str) -> tuple[list, list, dict[str, int]]:
    """Preference rows (posttrain.data.Preference) checked on the prompt's user turns and every
    response. Returns (rows to train on, contaminated rows removed, contaminated per source)."""
    kept, counts = screen(inputs, prefs, lambda p: [*user_texts(p.prompt), p.chosen, p.rejected, p.edited],
                          lambda p: source_file(p.source), stage)
    ids = {id(p) for p in kept}
    return kept, [p for p in prefs if id(p) not in ids], counts


def source_file(source: str) -> str:
    """The file of a row's "file:row" source."""
    return source.rsplit(":", 1)[0]

"""Which preference pairs a stage trains on: one filter, used by `rm` and `dpo`.

A preference row is a ranking of 2 or 3 responses, best first: [edited,] chosen, rejected
(`data.Preference`; the loader has already refused empty responses, chosen == rejected and
edited == chosen). `rank(row, settings)` turns it into its ordered pairs, keeping those the
stage's `PreferenceFilter` settings accept and counting every other one by reason. `rm`
trains on every kept pair of a ranking; `dpo` on its widest kept pair (best vs worst).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

from pydantic import Field, field_validator

from posttrain.data import STRENGTHS
from posttrain.schema import StrictModel


class PreferenceFilter(StrictModel):
    """The preference settings shared by `rm` and `dpo` (each has its own values)."""

    keep_strengths: list[str] = Field(default_factory=lambda: ["significantly_better", "better"])
    """Strengths whose pairs are trained on (the paper keeps the two strongest); pairs of other
    strengths are dropped and counted."""
    keep_unlabelled: bool = True
    """Keep pairs whose row has no `strength` (data without strength labels)."""
    use_edited: bool = True
    """Rank a row's `edited` response above `chosen` (edited > chosen > rejected)."""

    @field_validator("keep_strengths")
    @classmethod
    def _known_strengths(cls, v: list[str]) -> list[str]:
        bad = [s for s in v if s not in STRENGTHS]
        if bad:
            raise ValueError(f"unknown strength(s) {bad}; known: {list(STRENGTHS)}")
        return v


@dataclass
class Ranking:
    """The responses of one preference row, best first, and the pairs kept for training."""

    id: str
    source: str
    prompt: list[dict]
    responses: list[str]
    """Best first: [edited,] chosen, rejected; only responses in a kept pair."""
    pairs: list[tuple[int, int]]
    """(better, worse) indices into `responses`."""
    strengths: list[str | None]
    """Strength of each pair."""

    def widest_pair(self) -> tuple[str, str]:
        """(better, worse): the kept pair of the best and the worst response, as DPO trains on."""
        better, worse = min(self.pairs, key=lambda p: (p[0], -p[1]))
        return self.responses[better], self.responses[worse]


def same_response(a: str, b: str) -> bool:
    """Two responses that differ only in surrounding whitespace carry no preference."""
    return a.strip() == b.strip()


def rank(pref: Any, settings: PreferenceFilter, *, edited_strength: str | None = None,
         all_pairs: bool = False) -> tuple[Ranking | None, Counter]:
    """Every ordered pair of a preference row that `settings` keeps. Returns (ranking or None
    when no pair is kept, dropped pairs by reason: `strength_<label>`, `unlabelled`,
    `identical_responses`, `edited_unused`).

    `edited_strength`: the strength of pairs involving the edited response (default: the
    row's). `all_pairs`: no strength filter (held-out metrics report every strength).
    """
    drops: Counter = Counter()
    edited = getattr(pref, "edited", None)
    if edited is not None and not settings.use_edited:
        drops["edited_unused"] += 2
    responses = ([edited] if edited is not None and settings.use_edited else []) + [pref.chosen, pref.rejected]
    has_edit = len(responses) == 3
    kept: list[tuple[int, int]] = []
    strengths: list[str | None] = []
    for i in range(len(responses)):
        for j in range(i + 1, len(responses)):
            s = (edited_strength or pref.strength) if has_edit and i == 0 else pref.strength
            if same_response(responses[i], responses[j]):
                drops["identical_responses"] += 1
            elif not all_pairs and s is None and not settings.keep_unlabelled:
                drops["unlabelled"] += 1
            elif not all_pairs and s is not None and s not in settings.keep_strengths:
                drops[f"strength_{s}"] += 1
            else:
                kept.append((i, j))
                strengths.append(s)
    if not kept:
        return None, drops
    kept_responses, kept = keep_paired(responses, kept)
    source = str(getattr(pref, "source", ""))
    return Ranking(id=str(getattr(pref, "id", source)), source=source, prompt=list(pref.prompt),
                   responses=kept_responses, pairs=kept, strengths=strengths), drops


def keep_paired(items: list, pairs: list[tuple[int, int]]) -> tuple[list, list[tuple[int, int]]]:
    """The items that some pair uses, in order, and the pairs re-indexed into that list."""
    used = sorted({k for p in pairs for k in p})
    remap = {old: new for new, old in enumerate(used)}
    return [items[k] for k in used], [(remap[a], remap[b]) for a, b in pairs]

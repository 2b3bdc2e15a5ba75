"""Report 4.2.3's filters as pure functions over rows and per-row model signals.

- **rule-based cleaning** (`rule_violations`): regex rules over the assistant turns, each with
  a count and/or a rate limit (`RuleSpec`): over-used emojis or exclamation marks, an
  apologetic tone.
- **quality**: the reward model's top quantile (`rm_high_quality`) and a judge's score
  (`parse_judge`); a row is dropped only when every enabled signal says low (the report found
  their union recalled high-quality data best).
- **difficulty** and the dedup order (`priority`: quality x difficulty; `percentile_ranks`
  puts RM scores on a quality scale).
- `curate_rows` applies them in the report's order (rules, quality, then dedup among the rows
  left, posttrain.curate.dedup) and gives every dropped row its reasons; `clean_preferences`
  applies the rules to DPO preference rows.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Literal

from posttrain.curate.config import CurateConfig, RuleSpec, RulesConfig
from posttrain.curate.dedup import semantic_dedup


@dataclass
class CurationRow:
    """One dialog to curate. `targets`: which assistant turns sft trains on."""

    id: str
    messages: list[dict]
    kind: str  # "top1" or "sft"
    targets: Literal["last_turn", "all_turns"] = "all_turns"
    raw: dict = field(default_factory=dict)
    """The row as read, written back unchanged when kept."""


def response_text(messages: list[dict], targets: str = "all_turns") -> str:
    """The assistant text a rule checks: the last assistant turn, or every assistant turn."""
    turns = [m["content"] for m in messages if m.get("role") == "assistant"]
    if targets == "last_turn":
        turns = turns[-1:]
    return "\n".join(turns)


def dialog_text(messages: list[dict]) -> str:
    """A whole dialog as plain 'role: content' lines: what is embedded and shown to the judge."""
    return "\n".join(f"{m['role']}: {m['content']}" for m in messages)


_WORD = re.compile(r"\S+")


def rule_violations(text: str, rules: list[RuleSpec]) -> list[dict]:
    """The rules `text` breaks, each as {rule, count, per_100_words, limit}.

    count = number of non-overlapping matches; per_100_words = 100 * count / words, with
    words = whitespace-separated pieces (at least 1, so an empty text gets a finite rate).
    A rule is broken when count > max_count, or when count >= rate_min_count and
    per_100_words > max_per_100_words.
    """
    words = max(1, len(_WORD.findall(text)))
    out = []
    for rule in rules:
        count = len(re.findall(rule.pattern, text, flags=re.IGNORECASE if rule.ignore_case else 0))
        rate = 100.0 * count / words
        broken = []
        if rule.max_count is not None and count > rule.max_count:
            broken.append(f"count {count} > {rule.max_count}")
        if rule.max_per_100_words is not None and count >= rule.rate_min_count and rate > rule.max_per_100_words:
            broken.append(f"{rate:.1f} per 100 words > {rule.max_per_100_words:g}")
        if broken:
            out.append({"rule": rule.name, "count": count, "per_100_words": round(rate, 3),
                        "limit": "; ".join(broken)})
    return out


def quantile_threshold(scores: list[float | None], q: float) -> float | None:
    """The q-quantile of the non-None scores (linear interpolation, numpy's default), or None."""
    import numpy as np

    vals = [s for s in scores if s is not None]
    return float(np.quantile(np.asarray(vals, dtype=np.float64), q)) if vals else None


def rm_high_quality(scores: list[float | None], q: float) -> tuple[list[bool], float | None]:
    """(high, threshold): a row is high quality when its score >= the q-quantile of all scores
    (q = 0.75: the reward model's top quartile, report 4.2.3). An abstained (None) score is not
    high quality."""
    t = quantile_threshold(scores, q)
    return [s is not None and t is not None and s >= t for s in scores], t


def parse_judge(text: str, quality_pattern: str, difficulty_pattern: str) -> tuple[float | None, float | None]:
    """(quality, difficulty) read from the judge's reply by the recipe's regexes (first match,
    first group); None where a pattern does not match."""
    def first(pattern):
        m = re.search(pattern, text, flags=re.IGNORECASE)
        return float(m.group(1)) if m else None

    return first(quality_pattern), first(difficulty_pattern)


def percentile_ranks(scores: list[float | None]) -> list[float | None]:
    """Each score's rank among the non-None scores scaled to (0, 1]: (rank + 1) / n, ties sharing
    the highest rank of their group. Puts RM scores (any scale, negative too) on a quality scale."""
    import bisect

    vals = sorted(s for s in scores if s is not None)
    n = len(vals)
    return [None if s is None else bisect.bisect_right(vals, s) / n for s in scores]


def priority(quality: list[float | None], difficulty: list[float | None]) -> list[float]:
    """The dedup order, quality x difficulty (report 4.2.3); a missing factor counts as 1, so
    with no scores at all every row ties and the data's own order decides."""
    return [(1.0 if q is None else q) * (1.0 if d is None else d) for q, d in zip(quality, difficulty)]


@dataclass
class Scores:
    """Per-row signals from models; None where a signal is off or abstained."""

    rm: list[float | None] | None = None
    judge_quality: list[float | None] | None = None
    judge_difficulty: list[float | None] | None = None
    judge_reply: list[str] | None = None
    embeddings: Any = None


@dataclass
class Decision:
    keep: bool
    reasons: list[dict] = field(default_factory=list)
    """Every reason the row was dropped for; the first is the one it is counted under."""


def rule_text(row: CurationRow, rules: RulesConfig) -> str:
    """What the rules check in `row`: the turns sft trains on, or every assistant turn (`rules.turns`)."""
    return response_text(row.messages, row.targets if rules.turns == "trained" else "all_turns")


def curate_rows(rows: list[CurationRow], cfg: CurateConfig, scores: Scores, *, seed: int = 0
                ) -> tuple[list[Decision], dict]:
    """Apply the enabled filters in the report's order: rules, quality, then dedup among the
    rows left. Returns one Decision per row and a summary (thresholds, counts by reason)."""
    decisions = [Decision(True) for _ in rows]
    summary: dict[str, Any] = {}
    if cfg.rules.enabled:
        _apply_rules(rows, cfg.rules, decisions)
    _apply_quality(cfg, scores, decisions, summary)
    if cfg.dedup.enabled:
        _apply_dedup(rows, cfg, scores, decisions, summary, seed)
    summary.update(_counts(decisions))
    return decisions, summary


def _drop(decision: Decision, reason: dict) -> None:
    decision.keep = False
    decision.reasons.append(reason)


def _apply_rules(rows: list[CurationRow], rules: RulesConfig, decisions: list[Decision]) -> None:
    for row, decision in zip(rows, decisions):
        for v in rule_violations(rule_text(row, rules), rules.rules):
            _drop(decision, {"filter": "rule", **v})


def _apply_quality(cfg: CurateConfig, scores: Scores, decisions: list[Decision], summary: dict) -> None:
    """Drop the rows that no enabled quality signal (RM top quantile, judge) calls high."""
    n = len(decisions)
    rm_high = judge_high = None
    if cfg.rm_quality.enabled:
        if scores.rm is None or len(scores.rm) != n:
            raise ValueError("curate: rm_quality is on but the RM scores are missing")
        rm_high, threshold = rm_high_quality(scores.rm, cfg.rm_quality.quantile)
        summary["rm_threshold"] = threshold
    if cfg.judge.enabled:
        if scores.judge_quality is None or len(scores.judge_quality) != n:
            raise ValueError("curate: judge is on but the judge scores are missing")
        judge_high = [q is not None and q >= cfg.judge.high_quality for q in scores.judge_quality]
        summary["judge_unparsed"] = sum(q is None for q in scores.judge_quality)
    if rm_high is None and judge_high is None:
        return
    for i in range(n):
        votes = [h[i] for h in (rm_high, judge_high) if h is not None]
        if any(votes):  # the union of the two signals (report 4.2.3)
            continue
        reason: dict[str, Any] = {"filter": "quality"}
        if rm_high is not None:
            reason["rm_score"] = scores.rm[i]
            reason["rm_threshold"] = summary["rm_threshold"]
        if judge_high is not None:
            reason["judge_quality"] = scores.judge_quality[i]
            reason["judge_threshold"] = cfg.judge.high_quality
        _drop(decisions[i], reason)


def _apply_dedup(rows: list[CurationRow], cfg: CurateConfig, scores: Scores, decisions: list[Decision],
                 summary: dict, seed: int) -> None:
    """Semantic dedup among the rows still kept, ordered by quality x difficulty."""
    n = len(rows)
    if scores.embeddings is None or len(scores.embeddings) != n:
        raise ValueError("curate: dedup is on but the embeddings are missing")
    alive = [i for i in range(n) if decisions[i].keep]
    quality = (scores.judge_quality if scores.judge_quality is not None
               else percentile_ranks(scores.rm) if scores.rm is not None else [None] * n)
    difficulty = scores.judge_difficulty if scores.judge_difficulty is not None else [None] * n
    prio = priority([quality[i] for i in alive], [difficulty[i] for i in alive])
    result = semantic_dedup(scores.embeddings[alive], prio, cfg.dedup.threshold, cfg.dedup.rows_per_cluster,
                            seed=seed, iterations=cfg.dedup.kmeans_iterations)
    summary["dedup_clusters"] = result.n_clusters
    for j, i in enumerate(alive):
        if not result.keep[j]:
            other = alive[result.duplicate_of[j]]
            _drop(decisions[i], {"filter": "duplicate", "of": rows[other].id,
                                 "similarity": round(result.similarity[j], 4),
                                 "threshold": cfg.dedup.threshold, "priority": prio[j]})


def _counts(decisions: list[Decision]) -> dict:
    """Rows, kept, dropped, and the drops by their first reason."""
    from collections import Counter

    by_reason = Counter(reason_name(d.reasons[0]) for d in decisions if not d.keep)
    kept = sum(d.keep for d in decisions)
    return {"rows": len(decisions), "kept": kept, "dropped": len(decisions) - kept,
            "dropped_by_reason": dict(sorted(by_reason.items()))}


def clean_preferences(prefs, rules: list[RuleSpec]) -> tuple[list, list[dict]]:
    """Preference rows whose chosen (and edited) responses break no rule, and a reason for each
    dropped one. The rejected response may break rules: it is what DPO pushes away from."""
    kept, dropped = [], []
    for p in prefs:
        reasons = [{"filter": "rule", "side": side, **v}
                   for side in ("chosen", "edited") if getattr(p, side)
                   for v in rule_violations(getattr(p, side), rules)]
        if reasons:
            dropped.append({"id": p.id, "kind": "preference", "source": p.source, "reason": reason_name(reasons[0]),
                            "reasons": reasons})
        else:
            kept.append(p)
    return kept, dropped


def reason_name(reason: dict) -> str:
    """The name a drop is counted under: `rule:<name>`, `quality` or `duplicate`."""
    return f"rule:{reason['rule']}" if reason["filter"] == "rule" else reason["filter"]

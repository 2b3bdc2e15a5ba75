"""Data quality control between `sample` and `sft` (Llama 3 report, section 4.2.3).

The paper cleans and prunes each round's SFT data before training:

- **rule-based cleaning**: drop responses with over-used emojis or exclamation marks, or an
  apologetic tone ("I'm sorry", "I apologize"). Here: regex rules, each with a count and/or
  a rate limit (`RuleSpec`), checked on the assistant turns.
- **quality**: the reward model's top quartile is high quality; so is what a model prompted
  as a judge rates high. The report found the two often disagree and their union recalled
  high-quality data best, so a row is dropped only when every enabled signal says low.
- **difficulty**: the judge also rates difficulty; it orders rows for deduplication.
- **semantic deduplication**: embed whole dialogs, cluster them (k-means), sort each
  cluster by quality x difficulty and greedily keep a row only if its cosine similarity to
  every row already kept in its cluster is below a threshold.

Every filter is off unless the recipe turns it on (`curate:` section); the shipped
`general.yaml` carries the paper's settings. Every dropped row gets a reason (the rule or
score, with its value). The math is in pure functions (`rule_violations`,
`rm_high_quality`, `parse_judge`, `priority`, `greedy_dedup`, `semantic_dedup`) tested by hand;
`curate_rows` applies them in order; `run` is the stage.

Clustering and neighbour search use FAISS (`faiss-cpu`): measured on this project's 2-core
machine for 100,000 x 128 normalised vectors and 100 clusters, `faiss.Kmeans` took 2.1 s
against 10.2 s for scikit-learn's MiniBatchKMeans and 30 s for its KMeans; the in-cluster
range search was on par with scikit-learn's radius_neighbors (2.5 s vs 2.2 s). It is
imported only when deduplication runs.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator

from posttrain.schema import BatchSize, Count, StrictModel, Tokens
from posttrain.stage import DataRow, Metrics, StageDef, fmt, path_field

log = logging.getLogger("posttrain")


# ----------------------------------------------------------------------------- config


class RuleSpec(StrictModel):
    """One cleaning rule: a regex counted over a row's assistant turns."""

    name: str
    """Names the rule in drop reasons and counts."""
    pattern: str
    """Python regex; every non-overlapping match counts once."""
    ignore_case: bool = True
    """Match regardless of case."""
    max_count: int | None = Field(None, ge=0)
    """Drop the row when the matches exceed this many (0: any match drops)."""
    max_per_100_words: float | None = Field(None, ge=0)
    """Drop the row when matches per 100 words of the assistant turns exceed this."""
    rate_min_count: int = Field(2, ge=1)
    """The rate limit applies from this many matches on (one '!' in a three-word reply is a
    high rate but not over-use)."""

    @field_validator("pattern")
    @classmethod
    def _compiles(cls, v: str) -> str:
        try:
            re.compile(v)
        except re.error as e:
            raise ValueError(f"not a valid regex: {e}") from None
        return v

    @model_validator(mode="after")
    def _has_a_limit(self) -> "RuleSpec":
        if self.max_count is None and self.max_per_100_words is None:
            raise ValueError(f"rule {self.name!r}: set max_count, max_per_100_words or both")
        return self


class RulesConfig(StrictModel):
    """Rule-based cleaning (report 4.2.3: over-used emojis or exclamation marks, apologetic tone)."""

    enabled: bool = False
    """Apply the rules."""
    rules: list[RuleSpec] = Field(default_factory=list)
    """The rules; `general.yaml` ships the paper's three (emojis, exclamation marks, apologies)."""
    turns: Literal["trained", "all"] = "trained"
    """Which assistant turns are checked: the ones sft trains on (the last turn of a top-1 row,
    every assistant turn of recipe SFT data) or every assistant turn."""


class RMQualityConfig(StrictModel):
    """Quality from the round's reward model: its top quantile counts as high quality."""

    enabled: bool = False
    """Score every row with the round's RM (its last assistant turn given the conversation before)."""
    quantile: float = Field(0.75, ge=0, le=1)
    """Rows scoring at or above this quantile of all rows' scores are high quality (0.75: the
    paper's top quartile)."""
    batch_size: BatchSize = 16
    """Rows per RM forward pass."""


DEFAULT_JUDGE_PROMPT = (
    "Rate the assistant's last answer in the conversation below.\n"
    "Quality (1-5): accuracy, instruction following and tone; for code, whether it finds the "
    "bug and serves the user's intention.\n"
    "Difficulty (1-5): how hard the user's request is.\n"
    "Reply with two lines exactly: 'Quality: N' and 'Difficulty: N'.\n\n{conversation}"
)


class JudgeConfig(StrictModel):
    """Model-as-judge quality and difficulty scores (the paper prompts Llama 3 as the grader)."""

    enabled: bool = False
    """Ask the judge about every row."""
    model: str = "policy"
    """'policy' (the model this round sampled from) or a local model folder: any causal LM."""
    prompt: str = DEFAULT_JUDGE_PROMPT
    """The judge's user message; `{conversation}` is replaced by the row rendered as
    'role: content' lines."""
    quality_pattern: str = r"quality\s*[:=]\s*([0-9]+(?:\.[0-9]+)?)"
    """Regex (case-insensitive) whose first group is the quality score in the judge's reply."""
    difficulty_pattern: str = r"difficulty\s*[:=]\s*([0-9]+(?:\.[0-9]+)?)"
    """Regex (case-insensitive) whose first group is the difficulty score."""
    high_quality: float = 4.0
    """A quality score at or above this is high quality."""
    max_new_tokens: Tokens = 32
    """Longest judge reply."""
    backend: Literal["auto", "vllm", "transformers"] = "auto"
    """Generation backend (posttrain.generation)."""

    @field_validator("quality_pattern", "difficulty_pattern")
    @classmethod
    def _one_group(cls, v: str) -> str:
        try:
            groups = re.compile(v).groups
        except re.error as e:
            raise ValueError(f"not a valid regex: {e}") from None
        if groups < 1:
            raise ValueError("needs a capture group around the number")
        return v

    @field_validator("prompt")
    @classmethod
    def _has_slot(cls, v: str) -> str:
        if "{conversation}" not in v:
            raise ValueError("the judge prompt must contain {conversation}")
        return v


class DedupConfig(StrictModel):
    """Semantic deduplication: embed, cluster, greedy keep under a cosine threshold."""

    enabled: bool = False
    """Deduplicate the rows that passed the other filters."""
    threshold: float = Field(0.95, gt=0, le=1)
    """A row is a duplicate when its cosine similarity to a kept row of its cluster is at or
    above this (the report gives no number; 0.95 on mean-pooled states is conservative)."""
    rows_per_cluster: Count = 1000
    """k-means gets ceil(rows / rows_per_cluster) clusters: bigger clusters find more
    duplicates, at a cost quadratic in the cluster size."""
    embedding_model: str | None = None
    """A local embedding model folder (any transformers AutoModel: mean-pooled last hidden
    state). None: the model named by `embed_with`, so nothing is downloaded."""
    embed_with: Literal["policy", "rm"] = "policy"
    """Without an embedding model: the policy's or the round's reward model's hidden states."""
    max_length: Annotated[Tokens, Field(ge=8)] = 512
    """Tokens of a dialog that are embedded (the rest is cut)."""
    batch_size: BatchSize = 32
    """Dialogs per embedding forward pass."""
    kmeans_iterations: Count = 20
    """k-means iterations."""


class CurateConfig(StrictModel):
    """The `curate` stage (report 4.2.3): rule cleaning, quality, difficulty, semantic dedup."""

    enabled: bool = False
    """Run the stage; sft then trains on its kept rows (unless `dry_run`)."""
    dry_run: bool = False
    """Only report: decide and write the reasons, but sft trains on every row as without curation."""
    rules: RulesConfig = RulesConfig()
    """Rule-based cleaning."""
    rm_quality: RMQualityConfig = RMQualityConfig()
    """Reward-model quality (top quartile)."""
    judge: JudgeConfig = JudgeConfig()
    """Model-as-judge quality and difficulty."""
    dedup: DedupConfig = DedupConfig()
    """Semantic deduplication."""
    preferences: bool = False
    """Also clean this round's DPO preference rows with the rules (a row whose chosen or
    edited response breaks a rule is dropped); dpo then reads the cleaned rows."""
    show_dropped: int = Field(20, ge=0)
    """Dropped rows quoted in the stage's metrics (all are in dropped.jsonl)."""

    @model_validator(mode="after")
    def _something_to_do(self) -> "CurateConfig":
        if self.preferences and not self.rules.enabled:
            raise ValueError("preferences: true cleans preference rows with the rules, but rules.enabled is false")
        if self.enabled and not any(f.enabled for f in (self.rules, self.rm_quality, self.judge, self.dedup)):
            raise ValueError("enabled: true but no filter is on (rules, rm_quality, judge, dedup): "
                             "turn one on, or leave curate off")
        return self


# ----------------------------------------------------------------------------- rows and reasons


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


# ----------------------------------------------------------------------------- semantic dedup


@dataclass
class DedupResult:
    keep: list[bool]
    duplicate_of: list[int | None]
    """For a dropped row: the index of the kept row that made it a duplicate (first found)."""
    similarity: list[float | None]
    """For a dropped row: its cosine similarity to that kept row."""
    clusters: list[int]
    """Each row's cluster."""
    n_clusters: int


def _faiss():
    try:
        import faiss
    except ImportError:
        raise ImportError("curate.dedup needs FAISS: pip install faiss-cpu (requirements/ci.txt pins it)") from None
    return faiss


def normalise(x):
    """Rows scaled to unit L2 norm (float32, C-contiguous): inner product = cosine similarity."""
    import numpy as np

    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"embeddings must be a (rows, dim) matrix, got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError("embeddings contain NaN or infinite values")
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


SEARCH_CHUNK = 2048
"""Rows whose neighbours one FAISS range search returns: bounds the memory of the result lists."""


def greedy_dedup(emb, order: list[int], threshold: float, keep, dup_of, sim) -> None:
    """Greedy keep within one group of rows (`order`: their indices, best first).

    A row is kept when its cosine similarity to every row already kept is below `threshold`;
    otherwise it is dropped and `dup_of`/`sim` name the first kept row at or above it. The
    neighbours at or above the threshold come from FAISS range searches over the group (exact
    inner products), SEARCH_CHUNK rows at a time and only for rows not already blocked by a
    kept one (a blocked row is never kept, so its neighbours do not matter); the loop below
    only walks those neighbour lists.
    emb: (N, D) unit rows; keep/dup_of/sim: length-N lists filled in place.
    """
    import numpy as np

    faiss = _faiss()
    x = np.ascontiguousarray(emb[order])
    index = faiss.IndexFlatIP(x.shape[1])
    index.add(x)
    # range_search keeps inner products > radius; nudge the radius down by float32 rounding so
    # a similarity equal to the threshold counts as "at or above".
    radius = float(np.nextafter(np.float32(threshold), np.float32(-1)))
    m = len(order)
    blocked_by = np.full(m, -1, dtype=np.int64)
    blocked_sim = np.zeros(m, dtype=np.float32)
    for start in range(0, m, SEARCH_CHUNK):
        stop = min(start + SEARCH_CHUNK, m)
        cand = np.flatnonzero(blocked_by[start:stop] < 0) + start
        at = np.full(stop - start, -1, dtype=np.int64)
        at[cand - start] = np.arange(len(cand))
        if len(cand):
            lims, dist, nbr = index.range_search(x[cand], radius)
        for i in range(start, stop):
            row = order[i]
            if blocked_by[i] >= 0:
                keep[row] = False
                dup_of[row] = order[blocked_by[i]]
                sim[row] = float(blocked_sim[i])
                continue
            keep[row] = True
            k = at[i - start]
            js, ds = nbr[lims[k]:lims[k + 1]], dist[lims[k]:lims[k + 1]]
            fresh = (js > i) & (blocked_by[js] < 0)  # later rows not yet blocked
            blocked_by[js[fresh]] = i
            blocked_sim[js[fresh]] = ds[fresh]


def semantic_dedup(emb, prio: list[float], threshold: float, rows_per_cluster: int = 1000, *,
                   seed: int = 0, iterations: int = 20) -> DedupResult:
    """Report 4.2.3's semantic dedup: k-means over unit embeddings (ceil(N / rows_per_cluster)
    clusters, spherical), each cluster sorted by `prio` (highest first, ties by row index),
    then `greedy_dedup` within each cluster. rows_per_cluster >= N is the all-pairs greedy."""
    import numpy as np

    x = normalise(emb)
    n = len(x)
    if len(prio) != n:
        raise ValueError(f"{n} embeddings but {len(prio)} priorities")
    keep: list[bool] = [True] * n
    dup_of: list[int | None] = [None] * n
    sim: list[float | None] = [None] * n
    k = max(1, math.ceil(n / rows_per_cluster)) if n else 0
    if k <= 1:
        labels = np.zeros(n, dtype=np.int64)
    else:
        faiss = _faiss()
        km = faiss.Kmeans(x.shape[1], k, niter=iterations, seed=seed, spherical=True, verbose=False)
        km.train(x)
        labels = km.index.search(x, 1)[1][:, 0].astype(np.int64)
    p = np.asarray(prio, dtype=np.float64)
    order_all = np.lexsort((np.arange(n), -p))  # by priority desc, then index
    for c in range(k):
        members = order_all[labels[order_all] == c]
        if len(members):
            greedy_dedup(x, members.tolist(), threshold, keep, dup_of, sim)
    return DedupResult(keep, dup_of, sim, labels.tolist(), k)


# ----------------------------------------------------------------------------- embeddings


def embed_dialogs(model_dir: str | Path, texts: list[str], *, batch_size: int = 32, max_length: int = 512,
                  device: str = "auto", trust_remote_code: bool = False, on_batch=None):
    """(N, D) float32 unit vectors: the mean of the last hidden state over each text's tokens.

    Works for an embedding model (sentence-transformers folders are mean-pooled BERTs) and for
    a causal LM or reward model folder (AutoModel loads its backbone without the head).
    """
    import numpy as np
    import torch
    from transformers import AutoModel

    from posttrain.modeling import load_tokenizer, pick_device

    device = pick_device(device)
    tok = load_tokenizer(model_dir, trust_remote_code=trust_remote_code)
    tok.padding_side = "right"
    model = AutoModel.from_pretrained(str(model_dir), trust_remote_code=trust_remote_code, dtype=torch.float32)
    model.to(device).eval()
    out = []
    with torch.inference_mode():
        for start in range(0, len(texts), batch_size):
            enc = tok(texts[start:start + batch_size], padding=True, truncation=True, max_length=max_length,
                      return_tensors="pt").to(device)
            hidden = model(**enc).last_hidden_state  # (B, T, D)
            mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)  # (B, D)
            out.append(pooled.float().cpu().numpy())
            if on_batch is not None:
                on_batch(min(start + batch_size, len(texts)))
    del model
    d = out[0].shape[1] if out else 0
    return normalise(np.concatenate(out) if out else np.zeros((0, d), dtype=np.float32))


# ----------------------------------------------------------------------------- applying the filters


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


def curate_rows(rows: list[CurationRow], cfg: CurateConfig, scores: Scores, *, seed: int = 0
                ) -> tuple[list[Decision], dict]:
    """Apply the enabled filters in the report's order: rules, quality, then dedup among the
    rows left. Returns one Decision per row and a summary (thresholds, counts by reason)."""
    from collections import Counter

    n = len(rows)
    decisions = [Decision(True) for _ in rows]
    summary: dict[str, Any] = {}

    def drop(i: int, reason: dict) -> None:
        decisions[i].keep = False
        decisions[i].reasons.append(reason)

    if cfg.rules.enabled:
        for i, row in enumerate(rows):
            text = response_text(row.messages, row.targets if cfg.rules.turns == "trained" else "all_turns")
            for v in rule_violations(text, cfg.rules.rules):
                drop(i, {"filter": "rule", **v})

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
    if rm_high is not None or judge_high is not None:
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
            drop(i, reason)

    if cfg.dedup.enabled:
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
                drop(i, {"filter": "duplicate", "of": rows[other].id, "similarity": round(result.similarity[j], 4),
                         "threshold": cfg.dedup.threshold, "priority": prio[j]})

    by_reason = Counter()
    for d in decisions:
        if not d.keep:
            first = d.reasons[0]
            by_reason[first["filter"] if first["filter"] != "rule" else f"rule:{first['rule']}"] += 1
    summary.update(rows=n, kept=sum(d.keep for d in decisions), dropped=n - sum(d.keep for d in decisions),
                   dropped_by_reason=dict(sorted(by_reason.items())))
    return decisions, summary


# ----------------------------------------------------------------------------- the stage
#
# Inputs: `CurateInputs`. Outputs: `dropped` (dropped.jsonl: one row per dropped row with every reason),
# `report` (report.json: counts and thresholds); unless dry_run also `top1` and `sft` (kept
# rows, TRL `messages` rows) and, with `preferences`, `preferences` (kept preference rows).
# Model signals are cached under work/ (keyed by the rows and the model) so a killed stage
# does not score or embed twice.


def _load_rows(ctx) -> list[CurationRow]:
    from posttrain import data, files

    rows = []
    top1 = ctx.inputs.top1_file
    if top1:
        for raw in files.iter_jsonl(top1):
            rows.append(CurationRow(raw["id"], raw["messages"], "top1", "last_turn", raw))
    sft_targets = ctx.recipe.sft.targets if ctx.recipe is not None else "all_turns"
    for ex in data.load_sft([str(p) for p in ctx.inputs.sft_files]):
        raw = {"id": ex.id, "messages": ex.messages}
        if ex.capability is not None:
            raw["capability"] = ex.capability
        rows.append(CurationRow(ex.id, ex.messages, "sft", sft_targets, raw))
    seen: dict[str, str] = {}
    for r in rows:
        if r.id in seen:
            raise ValueError(f"curate: row id {r.id!r} appears in the {seen[r.id]} rows and again in the {r.kind} rows")
        seen[r.id] = r.kind
    return rows


def _cached(path: Path, key: str, compute):
    """compute() once per key: its JSON-able result is written atomically under work/."""
    from posttrain import files

    if path.is_file():
        got = files.read_json(path)
        if got.get("key") == key:
            return got["value"]
    value = compute()
    files.atomic_write_json(path, {"key": key, "value": value})
    return value


def _rows_key(rows: list[CurationRow], model: str, *parts) -> str:
    """What a cached model signal depends on: the rows, the model's content, the settings."""
    from posttrain.files import hash_json, hash_path

    return hash_json([[r.id, r.messages] for r in rows] + [hash_path(model)] + [str(p) for p in parts])


def _rm_scores(ctx, rows, work: Path) -> list[float | None]:
    from posttrain import reward as reward_api
    from posttrain.reward import RMReward

    cfg: CurateConfig = ctx.config
    path = ctx.inputs.reward_model
    if not path:
        raise ValueError("curate: rm_quality is on but the stage got no reward_model input")

    def compute():
        rm = RMReward(path, batch_size=cfg.rm_quality.batch_size, device=_device(ctx),
                      trust_remote_code=ctx.trust_remote_code)
        with reward_api.active(rm):
            return rm.score([r.messages[:-1] for r in rows], [r.messages[-1]["content"] for r in rows])

    return _cached(work / "rm_scores.json", _rows_key(rows, path), compute)


def _device(ctx) -> str:
    return ctx.recipe.run.device if ctx.recipe is not None else "auto"


def judge_prompt_ids(tokenizer, template: str, rows: list[CurationRow]) -> list[list[int]]:
    from posttrain import chat

    out = []
    for r in rows:
        text = chat.render_prompt(tokenizer, [{"role": "user", "content": template.replace(
            "{conversation}", dialog_text(r.messages))}])
        out.append(tokenizer(text, add_special_tokens=False)["input_ids"])
    return out


def _judge(ctx, rows, work: Path) -> list[str]:
    from posttrain import chat, modeling
    from posttrain.engines import EngineOptions
    from posttrain.generation import generate
    from posttrain.jobs import SamplingSettings

    cfg: JudgeConfig = ctx.config.judge
    model = ctx.inputs.judge_model

    def compute():
        tok = modeling.load_tokenizer(model, trust_remote_code=ctx.trust_remote_code)
        ids = judge_prompt_ids(tok, cfg.prompt, rows)
        settings = SamplingSettings(k=1, temperature=0.0, max_new_tokens=cfg.max_new_tokens, seed=ctx.seed,
                                    stop_token_ids=tuple(chat.end_of_turn_ids(tok)))
        gens = generate(model, ids, settings, backend=cfg.backend, workdir=work,
                        options=EngineOptions(device=_device(ctx), trust_remote_code=ctx.trust_remote_code))
        return [g.texts[0] for g in gens]

    return _cached(work / "judge.json", _rows_key(rows, model, cfg.prompt, cfg.max_new_tokens), compute)


def _embeddings(ctx, rows, work: Path):
    import numpy as np

    from posttrain import files, progress

    cfg: DedupConfig = ctx.config.dedup
    model = ctx.inputs.embedding_model
    key = _rows_key(rows, model, cfg.max_length)
    path, keyfile = work / "embeddings.npy", work / "embeddings.key"
    if path.is_file() and keyfile.is_file() and keyfile.read_text() == key:
        return np.load(path)
    with progress.bar(len(rows), f"round {ctx.round} curate: embedding", unit="row") as bar:
        emb = embed_dialogs(model, [dialog_text(r.messages) for r in rows], batch_size=cfg.batch_size,
                            max_length=cfg.max_length, device=_device(ctx), trust_remote_code=ctx.trust_remote_code,
                            on_batch=lambda done: bar.update(done - bar.n))
    keyfile.unlink(missing_ok=True)  # a key names the array beside it: never an older one
    files.atomic_write_bytes(path, _npy_bytes(emb))
    files.atomic_write_text(keyfile, key)
    return emb


def _npy_bytes(arr) -> bytes:
    import io

    import numpy as np

    buf = io.BytesIO()
    np.save(buf, arr)
    return buf.getvalue()


def model_scores(ctx, rows: list[CurationRow], work: Path) -> Scores:
    """The model signals the enabled filters need (each cached under work/)."""
    cfg: CurateConfig = ctx.config
    scores = Scores()
    if cfg.rm_quality.enabled:
        scores.rm = _rm_scores(ctx, rows, work)
    if cfg.judge.enabled:
        scores.judge_reply = _judge(ctx, rows, work)
        parsed = [parse_judge(t, cfg.judge.quality_pattern, cfg.judge.difficulty_pattern) for t in scores.judge_reply]
        scores.judge_quality = [q for q, _ in parsed]
        scores.judge_difficulty = [d for _, d in parsed]
    if cfg.dedup.enabled:
        survivors = rows
        if cfg.rules.enabled:  # embeddings are only needed for rows the rules keep
            survivors = [r for r in rows if not rule_violations(
                response_text(r.messages, r.targets if cfg.rules.turns == "trained" else "all_turns"),
                cfg.rules.rules)]
        import numpy as np

        emb = _embeddings(ctx, survivors, work)
        full = np.zeros((len(rows), emb.shape[1] if len(emb) else 1), dtype=np.float32)
        at = {r.id: i for i, r in enumerate(survivors)}
        for i, r in enumerate(rows):
            if r.id in at:
                full[i] = emb[at[r.id]]
        scores.embeddings = full
    return scores


def clean_preferences(prefs, rules: list[RuleSpec]) -> tuple[list, list[dict]]:
    """Preference rows whose chosen (and edited) responses break no rule, and a reason for each
    dropped one. The rejected response may break rules: it is what DPO pushes away from."""
    kept, dropped = [], []
    for p in prefs:
        reasons = [{"filter": "rule", "side": side, **v}
                   for side in ("chosen", "edited") if getattr(p, side)
                   for v in rule_violations(getattr(p, side), rules)]
        if reasons:
            dropped.append({"id": p.id, "kind": "preference", "source": p.source, "reason": _reason_name(reasons[0]),
                            "reasons": reasons})
        else:
            kept.append(p)
    return kept, dropped


def _reason_name(reason: dict) -> str:
    return f"rule:{reason['rule']}" if reason["filter"] == "rule" else reason["filter"]


def _preference_row(p) -> dict:
    row = {"id": p.id, "prompt": p.prompt, "chosen": [{"role": "assistant", "content": p.chosen}],
           "rejected": [{"role": "assistant", "content": p.rejected}]}
    if p.edited is not None:
        row["edited"] = [{"role": "assistant", "content": p.edited}]
    if p.strength is not None:
        row["strength"] = p.strength
    if p.capability is not None:
        row["capability"] = p.capability
    return row


def run(ctx):
    from collections import Counter

    from posttrain import data, files
    from posttrain.stage import StageResult
    from posttrain.training import WORK

    cfg: CurateConfig = ctx.config
    out = Path(ctx.out_dir)
    work = out / WORK
    work.mkdir(parents=True, exist_ok=True)
    rows = _load_rows(ctx)
    scores = model_scores(ctx, rows, work)
    decisions, summary = curate_rows(rows, cfg, scores, seed=ctx.seed)

    dropped = []
    for i, (r, d) in enumerate(zip(rows, decisions)):
        if d.keep:
            continue
        entry = {"id": r.id, "kind": r.kind, "reason": _reason_name(d.reasons[0]), "reasons": d.reasons}
        if scores.judge_reply is not None:
            entry["judge_reply"] = scores.judge_reply[i]
        entry["messages"] = r.messages
        dropped.append(entry)
    by_kind = {kind: {"read": sum(r.kind == kind for r in rows),
                      "kept": sum(d.keep for r, d in zip(rows, decisions) if r.kind == kind)}
               for kind in ("top1", "sft")}
    outputs: dict[str, str] = {}
    rel = out.relative_to(ctx.run_dir) if out.is_relative_to(ctx.run_dir) else out

    pref_summary = None
    if cfg.preferences:
        prefs = data.load_preferences([str(p) for p in ctx.inputs.preference_files])
        kept_prefs, dropped_prefs = clean_preferences(prefs, cfg.rules.rules if cfg.rules.enabled else [])
        dropped += dropped_prefs
        pref_summary = {"read": len(prefs), "kept": len(kept_prefs),
                        "dropped_by_reason": dict(Counter(d["reason"] for d in dropped_prefs))}
        if not cfg.dry_run:
            files.write_jsonl(out / "preferences.jsonl", [_preference_row(p) for p in kept_prefs])
            outputs["preferences"] = str(rel / "preferences.jsonl")
    if not cfg.dry_run:
        if ctx.inputs.top1_file:
            files.write_jsonl(out / "top1.jsonl", [r.raw for r, d in zip(rows, decisions) if d.keep and r.kind == "top1"])
            outputs["top1"] = str(rel / "top1.jsonl")
        if ctx.inputs.sft_files:
            files.write_jsonl(out / "sft.jsonl", [r.raw for r, d in zip(rows, decisions) if d.keep and r.kind == "sft"])
            outputs["sft"] = str(rel / "sft.jsonl")
    files.write_jsonl(out / "dropped.jsonl", dropped)
    outputs["dropped"] = str(rel / "dropped.jsonl")
    metrics = {
        **summary,
        "dry_run": cfg.dry_run,
        "by_kind": by_kind,
        "filters": [name for name in ("rules", "rm_quality", "judge", "dedup") if getattr(cfg, name).enabled],
        "preferences": pref_summary,
        "rm_score_mean_kept": _mean([s for s, d in zip(scores.rm or [], decisions) if d.keep and s is not None]),
        "rm_score_mean_dropped": _mean([s for s, d in zip(scores.rm or [], decisions)
                                        if not d.keep and s is not None]),
        "dropped_examples": [{k: v for k, v in d.items() if k != "messages"}
                             | {"response": d["messages"][-1]["content"][:200]}
                             for d in dropped[:cfg.show_dropped] if "messages" in d],
    }
    files.atomic_write_json(out / "report.json", metrics)
    outputs["report"] = str(rel / "report.json")
    log.info("curate: kept %d of %d rows (%s)%s", summary["kept"], summary["rows"],
             ", ".join(f"{k}: {v}" for k, v in summary["dropped_by_reason"].items()) or "nothing dropped",
             " [dry run: sft trains on every row]" if cfg.dry_run else "")
    return StageResult(outputs=outputs, metrics=metrics)


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


@dataclass
class CurateInputs:
    top1_file: str | None = path_field(default=None)
    """This round's top-1 samples (the `sample` stage's `top1`)."""
    sft_files: list[str] = path_field(default_factory=list)
    """The recipe's SFT data (`data.sft`)."""
    reward_model: str | None = path_field(default=None)
    """This round's RM, when `rm_quality` is on (or dedup embeds with it)."""
    judge_model: str | None = path_field(default=None)
    """The judge (`judge.model`: the round's policy or a folder), when `judge` is on."""
    embedding_model: str | None = path_field(default=None)
    """What dedup embeds with: `dedup.embedding_model`, else the policy or the RM."""
    preference_files: list[str] = path_field(default_factory=list)
    """The preference batches this round's dpo reads, when `preferences` is on."""


def _resolve(rnd) -> CurateInputs:
    from posttrain.stage import get

    c: CurateConfig = rnd.recipe.curate
    policy = rm = None
    if (c.judge.enabled and c.judge.model == "policy") or (
            c.dedup.enabled and c.dedup.embedding_model is None and c.dedup.embed_with == "policy"):
        policy = get("sample").resolve(rnd).policy_model  # the model this round sampled from
    if c.rm_quality.enabled or (c.dedup.enabled and c.dedup.embedding_model is None and c.dedup.embed_with == "rm"):
        rm = rnd.output("rm", "model")
    judge = None
    if c.judge.enabled:
        judge = policy if c.judge.model == "policy" else rnd.path(c.judge.model)
    embed = None
    if c.dedup.enabled:
        embed = rnd.path(c.dedup.embedding_model) if c.dedup.embedding_model else (
            policy if c.dedup.embed_with == "policy" else rm)
    return CurateInputs(
        top1_file=rnd.output("sample", "top1"), sft_files=[rnd.path(p) for p in rnd.recipe.data.sft],
        reward_model=rm if c.rm_quality.enabled else None, judge_model=judge, embedding_model=embed,
        preference_files=rnd.preference_files(only_latest=rnd.recipe.dpo.latest_batch_only) if c.preferences else [])


@dataclass(kw_only=True)
class CurateMetrics(Metrics):
    kept: int | None
    dropped: int | None
    dropped_by_reason: dict[str, int] | None
    """Rows dropped, by their first reason (rule:<name>, quality, duplicate)."""
    dry_run: bool | None
    rows: int | None = None
    contaminated: dict[str, int] | None = None


def _headline(m: CurateMetrics) -> list[tuple[str, Any]]:
    # rows kept and dropped, then the drops by their first reason (rule:<name>, quality, duplicate)
    pairs = [("kept", m.kept), ("dropped", m.dropped)]
    pairs += list((m.dropped_by_reason or {}).items())
    if m.dry_run:
        pairs.append(("dry_run", "yes"))
    return pairs


def _data_row(m: CurateMetrics) -> DataRow:
    # kept rows go on to sft ("trained" here: handed on)
    return DataRow("rows (dry run: none removed)" if m.dry_run else "rows", m.rows, f"{fmt(m.kept)} kept",
                   m.dropped_by_reason or {}, None, m.contaminated)


def curated(rnd, name: str, n: int | None = None) -> str | None:
    """The curate stage's output `name` in round `n` when that round curated (and not as a dry
    run), else None: sft and dpo then read the uncurated rows."""
    rec = rnd.record("curate", n)
    if rec is None or name not in rec.outputs:
        return None
    return rnd.output("curate", name, n)


def _settings(recipe) -> dict:
    # SFT rows are judged on the turns sft trains on; the RM and judge run on the run's device
    return {"sft_targets": recipe.sft.targets, "device": recipe.run.device}


STAGE = StageDef(name="curate", inputs=CurateInputs, resolve=_resolve, headline=_headline, required=False,
                 settings=_settings, enabled=lambda recipe: recipe.curate.enabled, metrics=CurateMetrics,
                 data_row=_data_row, status_column="when_run",
                 legend="rows kept, dropped, and dropped by first reason (a column only in runs that curate)")

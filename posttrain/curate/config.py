"""The `curate:` recipe section: which of report 4.2.3's filters run, and their settings.

Every filter is off unless the recipe turns it on; the shipped `general.yaml` carries the
paper's settings. The filters themselves are posttrain.curate.filters and .dedup.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator

from posttrain.schema import BatchSize, Count, StrictModel, Tokens


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

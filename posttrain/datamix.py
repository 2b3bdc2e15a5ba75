"""Data-mix rules for long-context examples (Llama 3 report, section 4.3.4).

The paper extends the context window in pre-training, then finds that post-training on short
data alone loses long-context ability, while too much long data hurts short-context tasks.
Its rule: mix "0.1% of synthetically generated long-context data" into SFT, and keep DPO on
short data only ("using only short context training data in DPO did not negatively impact
long-context performance").

Two pure functions implement that rule; the caller measures lengths (tokens of the whole
rendered example) and decides where the threshold lies:

    mix_long_examples(...)   SFT: keep every short example and at most `long_share` of the
                             final mix as long examples, picked with a seed
    drop_long_examples(...)  DPO: drop every long example

An example is long when its length is strictly greater than `long_threshold_tokens`.
Both return the kept examples in their original order and a `posttrain.data.FilterCounts`
naming every drop, so nothing disappears silently.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from fractions import Fraction
from typing import TypeVar

from posttrain.data import FilterCounts

T = TypeVar("T")

DEFAULT_LONG_SHARE = 0.001
"""The paper's share of long-context examples in the SFT mix (0.1%)."""

DROP_OVER_SHARE = "long_over_share"
DROP_LONG_IN_DPO = "long_in_dpo"


def _exact(share: float) -> Fraction:
    """The share as an exact fraction of its decimal text (0.001 -> 1/1000, not the nearest
    binary float), so cap arithmetic has no rounding surprises at exact boundaries."""
    if isinstance(share, bool) or not isinstance(share, (int, float)) or not math.isfinite(share):
        raise ValueError(f"long_share must be a finite number in [0, 1], got {share!r}")
    if not 0 <= share <= 1:
        raise ValueError(f"long_share must be in [0, 1], got {share}")
    return Fraction(repr(float(share)))


def long_cap(n_short: int, n_long: int, long_share: float) -> int:
    """Most long examples that can join `n_short` short ones without exceeding the share.

        largest L <= n_long with  L / (n_short + L) <= s
        <=>  L * (1 - s) <= s * n_short   <=>  L <= floor(s * n_short / (1 - s))     (s < 1)

    s = 1 allows every long example. Examples: 999 short at 0.1% -> 1 long; 998 short -> 0
    (1 / 999 > 0.001); 1998 short -> 2.
    """
    if n_short < 0 or n_long < 0:
        raise ValueError(f"counts must be >= 0, got n_short={n_short}, n_long={n_long}")
    s = _exact(long_share)
    if s == 1:
        return n_long
    return min(n_long, math.floor(s * n_short / (1 - s)))


def _split_by_length(lengths: Sequence[int], long_threshold_tokens: int, n_examples: int) -> list[bool]:
    if len(lengths) != n_examples:
        raise ValueError(f"{n_examples} examples but {len(lengths)} lengths")
    if long_threshold_tokens < 0:
        raise ValueError(f"long_threshold_tokens must be >= 0, got {long_threshold_tokens}")
    for i, n in enumerate(lengths):
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"lengths[{i}]: expected a token count >= 0, got {n!r}")
    return [n > long_threshold_tokens for n in lengths]


def mix_long_examples(examples: Sequence[T], lengths: Sequence[int], *, long_threshold_tokens: int,
                      long_share: float = DEFAULT_LONG_SHARE, seed: int) -> tuple[list[T], FilterCounts]:
    """The SFT mix: every short example plus at most `long_share` of the result as long ones.

    examples: N items of any type; lengths: N token counts (lengths[i] belongs to examples[i]).
    The long examples kept are `long_cap(n_short, n_long, long_share)` of them drawn without
    replacement with `random.Random(seed)`; the output keeps the input order. Dropped long
    examples are counted under "long_over_share".
    """
    is_long = _split_by_length(lengths, long_threshold_tokens, len(examples))
    long_idx = [i for i, flag in enumerate(is_long) if flag]
    n_short = len(examples) - len(long_idx)
    cap = long_cap(n_short, len(long_idx), long_share)
    chosen = set(random.Random(seed).sample(long_idx, cap))
    kept = [ex for i, ex in enumerate(examples) if not is_long[i] or i in chosen]
    counts = FilterCounts("sft long-context mix")
    counts.keep(len(kept))
    if len(long_idx) > cap:
        counts.drop(DROP_OVER_SHARE, len(long_idx) - cap)
    return kept, counts


def drop_long_examples(examples: Sequence[T], lengths: Sequence[int], *,
                       long_threshold_tokens: int) -> tuple[list[T], FilterCounts]:
    """The DPO rule: keep only short examples (length <= threshold); long ones are counted
    under "long_in_dpo"."""
    is_long = _split_by_length(lengths, long_threshold_tokens, len(examples))
    kept = [ex for ex, flag in zip(examples, is_long) if not flag]
    counts = FilterCounts("dpo short-context only")
    counts.keep(len(kept))
    if len(kept) < len(examples):
        counts.drop(DROP_LONG_IN_DPO, len(examples) - len(kept))
    return kept, counts


def long_share_of(lengths: Sequence[int], long_threshold_tokens: int) -> float:
    """Share of examples longer than the threshold (0.0 for no examples): what a mix holds."""
    is_long = _split_by_length(lengths, long_threshold_tokens, len(lengths))
    return sum(is_long) / len(is_long) if is_long else 0.0


__all__ = ["DEFAULT_LONG_SHARE", "drop_long_examples", "long_cap", "long_share_of", "mix_long_examples"]

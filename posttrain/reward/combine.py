"""A weighted combination of rewards, e.g. an answer checker plus the trained RM as tie-break.

    combined(x) = sum_k w_k * s_k(x)      over the components k that score x

What happens when a component abstains (returns None) on a sample is chosen once, by `abstain`:

- "skip" (default): leave that component out of the sum for that sample (no renormalisation,
  so the scale stays that of the components); the combination abstains only when every
  component abstains.
- "zero": count the abstaining component as 0; the combination never abstains.
- "all": the combination abstains on a sample as soon as any component abstains on it.

Example, a checker that decides and the RM that orders responses the checker ties on:

    WeightedReward([(AnswerChecker(), 1.0), (RMReward("run/round_01/rm/model"), 0.01)])
"""

from __future__ import annotations

from typing import Any, Literal

from posttrain.reward.base import (
    PLAIN_REASON,
    Message,
    Scored,
    checked_verdicts,
    load_reward,
    reward_fingerprint,
    reward_name,
    setup,
    teardown,
)

AbstainPolicy = Literal["skip", "zero", "all"]


def combine_scores(columns: list[list[float | None]], weights: list[float],
                   abstain: AbstainPolicy = "skip") -> list[float | None]:
    """Weighted sum per sample of K components' scores.

    columns: K lists of B scores (None = abstained); weights: K floats. Returns B scores.
    """
    if len(columns) != len(weights):
        raise ValueError(f"{len(columns)} score columns but {len(weights)} weights")
    if abstain not in ("skip", "zero", "all"):
        raise ValueError(f"abstain must be 'skip', 'zero' or 'all', got {abstain!r}")
    n = len(columns[0]) if columns else 0
    out: list[float | None] = []
    for i in range(n):
        parts = [(col[i], w) for col, w in zip(columns, weights)]
        present = [(s, w) for s, w in parts if s is not None]
        if abstain == "all" and len(present) < len(parts):
            out.append(None)
        elif abstain == "skip" and not present:
            out.append(None)
        else:
            out.append(float(sum(w * s for s, w in present)))
    return out


class WeightedReward:
    """sum_k w_k * reward_k, with a declared policy for abstentions (see module docstring).

    components: (reward, weight) pairs; a reward may be an instance, a RewardSpec or a spec dict
    ({"target": "pkg.mod:Name", "kwargs": {...}}), so a recipe can name the whole combination as
    {"target": "posttrain.reward:WeightedReward",
     "kwargs": {"components": [[{"target": ...}, 1.0], [{"target": ...}, 0.01]]}}.
    """

    def __init__(self, components: list[tuple[Any, float]] | list[list[Any]],
                 abstain: AbstainPolicy = "skip", name: str | None = None):
        if not components:
            raise ValueError("WeightedReward needs at least one (reward, weight) component")
        if abstain not in ("skip", "zero", "all"):
            raise ValueError(f"WeightedReward: abstain must be 'skip', 'zero' or 'all', got {abstain!r}")
        self.rewards = []
        self.weights: list[float] = []
        for k, comp in enumerate(components):
            if not isinstance(comp, (tuple, list)) or len(comp) != 2:
                raise ValueError(f"WeightedReward component {k}: expected (reward, weight), got {comp!r}")
            reward, weight = comp
            if isinstance(weight, bool) or not isinstance(weight, (int, float)):
                raise ValueError(f"WeightedReward component {k}: weight must be a number, got {weight!r}")
            self.rewards.append(load_reward(reward))
            self.weights.append(float(weight))
        self.abstain: AbstainPolicy = abstain
        self.name = name or "weighted(" + " + ".join(
            f"{w:g}*{reward_name(r)}" for r, w in zip(self.rewards, self.weights)) + ")"

    def fingerprint(self) -> str:
        parts = " + ".join(f"{w!r}*{reward_fingerprint(r)}" for r, w in zip(self.rewards, self.weights))
        return f"weighted[{self.abstain}]({parts})"

    def setup(self) -> None:
        for r in self.rewards:
            setup(r)

    def teardown(self) -> None:
        for r in self.rewards:
            teardown(r)

    def score(self, prompts: list[list[Message]], responses: list[str]) -> list[Scored]:
        return self._combine([checked_verdicts(r, prompts, responses) for r in self.rewards])

    def score_with_meta(self, prompts: list[list[Message]], responses: list[str],
                        metas: list[dict]) -> list[Scored]:
        """As `score`, passing each prompt row's fields on to the parts that use them."""
        return self._combine([checked_verdicts(r, prompts, responses, metas) for r in self.rewards])

    def _combine(self, columns: list[list[Scored]]) -> list[Scored]:
        """The weighted values, each with its components' reasons ("code_tests=failed; rm=scored"),
        or the one reason when a single component carries one."""
        values = combine_scores([[v.value for v in col] for col in columns], self.weights, self.abstain)
        out = []
        for i, value in enumerate(values):
            parts = [(reward_name(r), col[i]) for r, col in zip(self.rewards, columns)]
            told = [(n, v) for n, v in parts if v.reason != PLAIN_REASON]
            if not told:
                out.append(Scored(value, PLAIN_REASON))
            elif len(told) == 1:
                out.append(Scored(value, told[0][1].reason, told[0][1].detail))
            else:
                out.append(Scored(value, "; ".join(f"{n}={v.reason}" for n, v in told),
                                  "; ".join(f"{n}: {v.detail}" for n, v in told if v.detail)))
        return out

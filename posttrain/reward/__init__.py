"""The reward API: how posttrain scores (prompt, response) pairs, and how users plug in their own.

A reward has a `name` and `score(prompts, responses) -> list[float | None]` (None = abstain),
optionally `setup()` / `teardown()`. Recipes name one by import path:

    reward: {target: "my_pkg.rewards:LengthPenalty", kwargs: {max_words: 200}}

and `load_reward(spec)` builds it (the target must be a reward class, or a function marked
`@reward_factory`; anything else is refused before it is called); Python code may pass an instance instead. Callers score through
`checked_verdicts(reward, prompts, responses)` (a `Scored(value, reason, detail)` per sample) or
`checked_score` (the values alone), which fail loudly, naming the reward, on a wrong number of
scores, NaN/inf or a non-number; an exception inside the reward fails only the samples that cause
it (each scores 0.0, reason "reward_error"), unless every sample raises.

Built in: `RMReward` (the trained reward model) and `WeightedReward` (a weighted sum of rewards,
with a declared policy for abstentions).
"""

from posttrain.reward.base import (
    Reward,
    RewardError,
    RewardInfraError,
    RewardSpec,
    Scored,
    active,
    check_reward_spec,
    check_scores,
    check_verdicts,
    checked_score,
    checked_verdicts,
    load_reward,
    resolve_reward_target,
    reward_factory,
    reward_fingerprint,
    reward_name,
    setup,
    teardown,
)
from posttrain.reward.combine import WeightedReward, combine_scores
from posttrain.reward.rm_reward import RMReward

__all__ = [
    "Reward", "RewardError", "RewardInfraError", "RewardSpec", "RMReward", "Scored", "WeightedReward", "active",
    "check_scores", "check_verdicts", "check_reward_spec", "checked_score", "checked_verdicts", "combine_scores", "load_reward", "resolve_reward_target",
    "reward_factory", "reward_fingerprint", "reward_name", "setup", "teardown",
]

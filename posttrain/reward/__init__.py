"""The reward API: how posttrain scores (prompt, response) pairs, and how users plug in their own.

A reward has a `name` and `score(prompts, responses) -> list[float | None]` (None = abstain),
optionally `setup()` / `teardown()`. Recipes name one by import path:

    reward: {target: "my_pkg.rewards:LengthPenalty", kwargs: {max_words: 200}}

and `load_reward(spec)` builds it (the target must be a reward class, or a function marked
`@reward_factory`; anything else is refused before it is called); Python code may pass an instance instead. Callers score through
`checked_score(reward, prompts, responses)`, which fails loudly, naming the reward, on a wrong
number of scores, NaN/inf, a non-number, or an exception inside the reward.

Built in: `RMReward` (the trained reward model) and `WeightedReward` (a weighted sum of rewards,
with a declared policy for abstentions).
"""

from posttrain.reward.base import (
    Reward,
    RewardError,
    RewardSpec,
    active,
    check_reward_spec,
    check_scores,
    checked_score,
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
    "Reward", "RewardError", "RewardSpec", "RMReward", "WeightedReward", "active", "check_scores",
    "check_reward_spec", "checked_score", "combine_scores", "load_reward", "resolve_reward_target",
    "reward_factory", "reward_fingerprint", "reward_name", "setup", "teardown",
]

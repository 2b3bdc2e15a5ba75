"""AI feedback: a reward judges each pair (`posttrain.annotate.ai:RewardAnnotator`).

Any posttrain reward can judge: the task's checker, a stronger reward model, or a reward that
asks an LLM judge. Both responses are scored with `checked_score` (the prompt row's meta goes
to rewards that use it); the higher score is preferred, and the gap gives the strength:

    gap >= thresholds[0]  significantly_better
    gap >= thresholds[1]  better
    gap >= thresholds[2]  slightly_better
    any other gap > 0     marginally_better

The annotator abstains (the pair is skipped, and counted) when the two scores are equal, or
when the reward abstains on either response: a reward abstains by returning None for a
sample (the reward protocol, posttrain.reward.base), e.g. an LLM judge that cannot decide.
"""

from __future__ import annotations

from typing import Any

from posttrain.annotate.base import Label, Request, strength_of


class RewardAnnotator:
    """A reward as the annotator. `reward`: a reward spec ({target, kwargs}) or object."""

    def __init__(self, reward: Any, thresholds: list[float] | tuple[float, float, float] = (0.5, 0.25, 0.1)):
        from posttrain.reward import load_reward, reward_name

        if len(thresholds) != 3 or list(thresholds) != sorted(thresholds, reverse=True) or min(thresholds) <= 0:
            raise ValueError(f"thresholds: three decreasing positive score gaps, got {list(thresholds)}")
        self.reward = load_reward(reward)
        self.thresholds = tuple(float(t) for t in thresholds)
        self.name = f"ai_feedback({reward_name(self.reward)})"

    def fingerprint(self) -> str:
        from posttrain.reward import reward_fingerprint

        return f"{self.name}:{reward_fingerprint(self.reward)}:{self.thresholds}"

    def annotate(self, requests: list[Request]) -> list[Label | None]:
        from posttrain.reward import active, checked_score

        prompts = [r.prompt for r in requests for _ in (0, 1)]
        texts = [t for r in requests for t in (r.a.text, r.b.text)]
        metas = [r.meta for r in requests for _ in (0, 1)]
        with active(self.reward):
            scores = checked_score(self.reward, prompts, texts, metas)
        out: list[Label | None] = []
        for i, req in enumerate(requests):
            sa, sb = scores[2 * i], scores[2 * i + 1]
            if sa is None or sb is None:
                out.append(Label.for_request(req, None, annotator=self.name, reason="the reward abstained"))
            elif sa == sb:
                out.append(Label.for_request(req, None, annotator=self.name, reason=f"equal scores ({sa:.4g})"))
            else:
                preferred, gap = ("a", sa - sb) if sa > sb else ("b", sb - sa)
                out.append(Label.for_request(req, preferred, strength_of(gap, self.thresholds),
                                             annotator=self.name, reason=f"scores a={sa:.4g} b={sb:.4g}"))
        return out

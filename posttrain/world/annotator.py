"""The embedded world's simulated annotators, as an annotator (recipes name it
`posttrain.annotate.world:WorldAnnotator`, among the other built-in annotators).

They prefer the response with the higher task score (the checker), give a strength from the
score gap, and on a share of pairs whose preferred answer is not already right they write an
edit that fixes it (the reference answer). `simulated_judgement` is the one place this rule
lives: the world build labels its fixed batches with it, and the annotator labels the latest
models' responses with it.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from posttrain.annotate.base import Label, Request, strength_of
from posttrain.world import task

DEFAULT_THRESHOLDS = (0.5, 0.25, 0.1)
"""The world build's strength thresholds (posttrain.world.build.WorldConfig.strength_thresholds)."""


@dataclass(frozen=True)
class Judgement:
    preferred: str  # "a" or "b"
    strength: str
    edited: str | None
    score_preferred: float
    score_other: float


def simulated_judgement(prompt_text: str, text_a: str, text_b: str, edit_draw: float, *,
                        thresholds=DEFAULT_THRESHOLDS, edit_share: float = 0.3) -> Judgement | None:
    """The simulated annotators' label for two usable responses to a task prompt; None on a
    tie (the pair is dropped). `edit_draw` in [0, 1) decides the edit: the preferred answer
    is replaced by the reference when it is not already right and edit_draw < edit_share."""
    sa, sb = task.score(prompt_text, text_a), task.score(prompt_text, text_b)
    if sa == sb:
        return None
    preferred, s_p, s_o = ("a", sa, sb) if sa > sb else ("b", sb, sa)
    edited = task.reference(prompt_text) if s_p < 1.0 and edit_draw < edit_share else None
    return Judgement(preferred, strength_of(s_p - s_o, thresholds), edited, s_p, s_o)


class WorldAnnotator:
    """Simulated annotators for the embedded task, applied to any requests on task prompts.

    Abstains on a prompt that is not a task prompt, and on a tie. `flip_share`: share of
    judgements (drawn per request) whose preference is flipped, as a careless annotator
    would (0 by default, as in the world's fixed batches). Draws are seeded by (seed,
    request id), so a resumed or repeated run labels the same way.
    """

    name = "world"

    def __init__(self, thresholds: list[float] | tuple[float, float, float] = DEFAULT_THRESHOLDS,
                 edit_share: float = 0.3, flip_share: float = 0.0, seed: int = 0):
        if len(thresholds) != 3 or list(thresholds) != sorted(thresholds, reverse=True):
            raise ValueError(f"thresholds: three decreasing score gaps, got {list(thresholds)}")
        if not 0 <= edit_share <= 1 or not 0 <= flip_share <= 1:
            raise ValueError("edit_share and flip_share are shares in [0, 1]")
        self.thresholds = tuple(float(t) for t in thresholds)
        self.edit_share = edit_share
        self.flip_share = flip_share
        self.seed = seed

    def annotate(self, requests: list[Request]) -> list[Label | None]:
        out: list[Label | None] = []
        for req in requests:
            rng = random.Random(f"posttrain-world-annotator-{self.seed}-{req.id}")
            edit_draw, flip_draw = rng.random(), rng.random()
            text = task.last_user_content(req.prompt)
            if text is None or not task.is_task_prompt(text):
                out.append(Label.for_request(req, None, annotator=self.name, reason="not a task prompt"))
                continue
            j = simulated_judgement(text, req.a.text.strip(), req.b.text.strip(), edit_draw,
                                    thresholds=self.thresholds, edit_share=self.edit_share)
            if j is None:
                out.append(Label.for_request(req, None, annotator=self.name, reason="tie"))
                continue
            preferred = j.preferred
            if flip_draw < self.flip_share:
                preferred = "b" if preferred == "a" else "a"
            edited = j.edited
            if edited is not None and edited.strip() == req.response(preferred).text.strip():
                edited = None  # already the reference: nothing to edit
            out.append(Label.for_request(req, preferred, j.strength, edited=edited, annotator=self.name))
        return out

"""Annotation: requests (two responses from two of the latest models) in, labels out.

    from posttrain.annotate import load_annotator, checked_annotate
    annotator = load_annotator({"target": "posttrain.annotate.ai:RewardAnnotator",
                                "kwargs": {"reward": {"target": "posttrain.world.task:TaskReward"}}})

Built in: `world:WorldAnnotator` (the embedded task's simulated annotators), `ai:RewardAnnotator`
(AI feedback: a reward judges the pair), `labelstudio:LabelStudioAnnotator` (people, through a
Label Studio server), `jsonl:ExternalAnnotator` (any other tool, through `posttrain annotate
export/import`). The `annotate` step (posttrain.stages.annotate) runs them each round.
"""

from posttrain.annotate.base import (
    Annotator,
    AnnotatorError,
    AnnotatorSpec,
    Label,
    Request,
    Response,
    annotator_factory,
    check_annotator_spec,
    checked_annotate,
    load_annotator,
    pair_hash,
    resolve_annotator_target,
    strength_of,
)

__all__ = [
    "Annotator", "AnnotatorError", "AnnotatorSpec", "Label", "Request", "Response", "annotator_factory",
    "check_annotator_spec", "checked_annotate", "load_annotator", "pair_hash", "resolve_annotator_target",
    "strength_of",
]


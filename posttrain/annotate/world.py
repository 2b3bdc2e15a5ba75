"""`posttrain.annotate.world:WorldAnnotator`, the name recipes give the embedded world's simulated
annotators. They live with the world (posttrain.world.annotator), which this package must not
import at its top: the world's build labels its fixed batches with the same rule."""

from posttrain.world.annotator import DEFAULT_THRESHOLDS, Judgement, WorldAnnotator, simulated_judgement

__all__ = ["DEFAULT_THRESHOLDS", "Judgement", "WorldAnnotator", "simulated_judgement"]

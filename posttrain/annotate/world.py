"""`posttrain.annotate.world:WorldAnnotator`: the name recipes (recipes/demo.yaml) and the README
give the embedded world's simulated annotators. They live with the world, in
posttrain.world.annotator, whose build labels its fixed batches with the same rule; the world
imports the annotator API (posttrain.annotate.base), and no module of posttrain imports this one.
"""

from posttrain.world.annotator import DEFAULT_THRESHOLDS, Judgement, WorldAnnotator, simulated_judgement

__all__ = ["DEFAULT_THRESHOLDS", "Judgement", "WorldAnnotator", "simulated_judgement"]

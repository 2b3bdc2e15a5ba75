"""The embedded world: a tiny base model, a verifiable synthetic task, simulated annotators.

    from posttrain.world import ensure_world, resolve_world_path, evaluate_task
    world = ensure_world()                        # built once, cached, deterministic per seed
    resolve_world_path("world:preferences/round_03.jsonl")

The task (posttrain.world.task): "Sort these numbers: 7 2 9 4" -> "2 4 7 9", scored with
partial credit; `posttrain.world.task:TaskReward` is its reward for recipes. Nothing heavy is
imported here: the build imports torch/transformers only when it runs.
"""

from posttrain.world.build import (
    WORLD_VERSION,
    World,
    WorldConfig,
    ensure_world,
    evaluate_model,
    evaluate_task,
    resolve_world_path,
)
from posttrain.world.task import TaskReward, reference, score

__all__ = [
    "WORLD_VERSION", "World", "WorldConfig", "ensure_world", "evaluate_model", "evaluate_task",
    "resolve_world_path", "TaskReward", "reference", "score",
]

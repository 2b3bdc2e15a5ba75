"""The contract between the round orchestrator and the stages.

A stage is a function `run(ctx: StageContext) -> StageResult`. The orchestrator resolves
every input from earlier records (never by guessing paths), hashes them, runs the stage in
its own process, and writes the stage's record last. The stage writes only under
`ctx.out_dir`, atomically, and may continue from whatever complete work it finds there.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

STAGES = ("rm", "sample", "sft", "dpo", "average")

MODEL_OUTPUTS: dict[str, tuple[str, ...]] = {"rm": ("model",), "sft": ("model",), "dpo": ("variants",),
                                             "average": ("model",)}
"""Each stage's outputs that are model folders (a path, or a list of paths): the orchestrator
checks each with `modeling.verify_model_folder` before it writes the stage's record."""


@dataclass
class StageContext:
    stage: str
    """One of STAGES."""
    round: int
    """1-based round number."""
    run_dir: Path
    """The run folder; record outputs relative to it."""
    out_dir: Path
    """run_dir/round_NN/<stage>: the stage writes here only."""
    config: Any
    """The stage's own resolved config section (e.g. posttrain.rm.RMConfig) for this round."""
    inputs: dict[str, Any]
    """Named inputs resolved by the orchestrator (absolute paths, lists of paths); see each stage."""
    recipe: Any = None
    """The whole resolved recipe (posttrain.recipe.Recipe) for this round, for shared settings."""
    seed: int = 0
    """The recipe's seed (variants add their index)."""
    trust_remote_code: bool = False
    """Passed to every from_pretrained; off unless the recipe turns it on."""
    formatting_tokens: list[str] | None = None
    """Recipe override of the formatting-token set (token strings); None derives it."""
    report_to: list[str] | str = "none"
    """Where training metrics go ('none', 'tensorboard', 'wandb')."""
    reward: Any = None
    """For `sample` (and eval): a ready reward object following posttrain.reward.Reward."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Anything else a stage needs from the orchestrator (documented by that stage)."""


@dataclass
class StageResult:
    outputs: dict[str, str]
    """Named outputs as paths relative to ctx.run_dir (e.g. {"model": "round_01/rm/model"})."""
    metrics: dict[str, Any] = field(default_factory=dict)
    """JSON-able metrics for the record and the report."""

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


# ----------------------------------------------------------------------------- headline metrics
# One place says which numbers summarise each step: the orchestrator's end-of-stage line and
# `posttrain status` both read them from here, so neither can look for a key no stage writes.


def _get(metrics: dict, *path: str) -> Any:
    for key in path:
        if not isinstance(metrics, dict):
            return None
        metrics = metrics.get(key)
    return metrics


def _variant_mean(metrics: dict, *path: str) -> float | None:
    vals = [_get(v, *path) for v in (metrics.get("variants") or {}).values()]
    vals = [v for v in vals if isinstance(v, (int, float))]
    return sum(vals) / len(vals) if vals else None


def headline(step: str, metrics: dict) -> list[tuple[str, Any]]:
    """The (label, value) pairs that summarise a finished step, most important first.

    rm: held-out ranking accuracy; sample: the mean reward of the kept top-1 (on the recipe's
    reward's own scale, so a checker plus a reward-model tie-break can exceed 1); sft: the
    last logged training loss (mean over variants); dpo: the last logged reward accuracy (the
    share of pairs whose implicit reward ranks chosen first); average: how many models;
    annotate: pairs labelled, abstained (skipped) and edited; eval:
    the held-out task score (the checker) or else the mean reward.
    """
    m = metrics or {}
    if step == "rm":
        out = [("acc", _get(m, "heldout", "accuracy")), ("rankings", m.get("rankings")),
               ("longer", _get(m, "heldout", "prefers_longer"))]  # 0.5: no length bias
    elif step == "sample":
        no_top1 = m.get("prompts_without_top1")  # a list of ids in older records
        out = [("top1", m.get("score_best_mean")), ("prompts", m.get("top1")),
               ("no_top1", len(no_top1) if isinstance(no_top1, list) else no_top1)]
    elif step == "sft":
        out = [("loss", _variant_mean(m, "loss", "last")), ("examples", _get(m, "examples", "kept"))]
    elif step == "dpo":
        out = [("acc", _variant_mean(m, "rewards/accuracies", "last")), ("pairs", m.get("pairs"))]
    elif step == "average":
        out = [("models", m.get("n_inputs"))]
    elif step == "annotate":
        out = [("labelled", m.get("labelled")), ("abstained", m.get("abstained")), ("edited", m.get("edited"))]
    elif step == "eval":
        out = ([("task", m.get("task_score"))] if m.get("task_score") is not None
               else [("reward", m.get("mean_reward"))])
    else:
        out = []
    return [(k, v) for k, v in out if v is not None]


def format_headline(pairs: list[tuple[str, Any]]) -> str:
    return " ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in pairs)

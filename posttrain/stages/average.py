"""The `average` stage: the round's DPO variants averaged into the round's model (Llama 3 §4.1.5).

The averaging itself, checked and streamed, is `posttrain.averaging.average_checkpoints`;
this module is the stage around it: its config, inputs and record.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import Field, model_validator

from posttrain.averaging import AverageError, average_checkpoints, is_lora, normalise_weights, read_checkpoint
from posttrain.schema import StrictModel
from posttrain.stage import Metrics, StageContext, StageDef, StageResult, path_field


class AverageConfig(StrictModel):
    """The `average` stage: weight averaging of the round's DPO variants into the round's model.

    Each variant's weight is its `weight` in `dpo.variants`, as for rm's and sft's variants."""

    max_shard_size: int = Field(2 * 1024**3, gt=0)
    """Largest output shard in bytes; a bigger model is written as several shards plus
    `model.safetensors.index.json` (a single tensor larger than this gets a shard of its own)."""

    @model_validator(mode="before")
    @classmethod
    def _weights_moved(cls, data: Any) -> Any:
        if isinstance(data, dict) and "weights" in data:
            raise ValueError("`average.weights` moved: give each DPO variant its `weight` "
                             "(dpo.variants: [{weight: 3}, {weight: 1}]), as for rm and sft")
        return data


# --------------------------------------------------------------------------------------
# The stage.


def _relative(path: Path, run_dir: Path) -> str:
    return os.path.relpath(Path(path).resolve(), Path(run_dir).resolve())


def run(ctx: StageContext) -> StageResult:
    """Average `ctx.inputs.models` (the round's DPO variants) into `out_dir/model`.

    One plain input is recorded as-is (no copy). `ctx.inputs.base_model`, when given, is the
    base for LoRA inputs whose adapter config does not name a local one.
    """
    config = ctx.config if ctx.config is not None else AverageConfig()
    if not isinstance(config, AverageConfig):
        config = AverageConfig.model_validate(config)
    models = ctx.inputs.models
    if isinstance(models, (str, os.PathLike)) or not models:
        raise AverageError(f"average stage: inputs.models must be a non-empty list of model folders, got {models!r}")
    models = [Path(m) for m in models]
    weights = normalise_weights(ctx.inputs.weights, len(models))
    start = time.perf_counter()
    if len(models) == 1 and not is_lora(models[0]):
        read_checkpoint(models[0])  # the single model is still checked to be a loadable checkpoint
        return StageResult(
            outputs={"model": _relative(models[0], ctx.run_dir)},
            metrics={"n_inputs": 1, "weights": weights, "copied": False,
                     "seconds": round(time.perf_counter() - start, 3)},
        )
    out = Path(ctx.out_dir) / "model"
    stats: dict = {}
    average_checkpoints(models, out, ctx.inputs.weights, max_shard_size=config.max_shard_size,
                        lora_base=ctx.inputs.base_model, stats=stats, trust_remote_code=ctx.trust_remote_code)
    return StageResult(
        outputs={"model": _relative(out, ctx.run_dir)},
        metrics={"n_inputs": len(models), "weights": weights, "tensors": stats["tensors"],
                 "bytes": stats["bytes"], "shards": stats["shards"],
                 "seconds": round(time.perf_counter() - start, 3)},
    )


# ----------------------------------------------------------------------------- the stage


@dataclass
class AverageInputs:
    models: list[str] = path_field()
    """The round's DPO variants."""
    weights: list[float] | None = None
    """One per model (normalised); None: uniform."""
    base_model: str | None = path_field(default=None)
    """The base of LoRA inputs whose adapter config names no local base."""


def _resolve(rnd) -> AverageInputs:
    return AverageInputs(models=rnd.output("dpo", "variants"), weights=[v.weight for v in rnd.recipe.dpo.variants])


@dataclass(kw_only=True)
class AverageMetrics(Metrics):
    n_inputs: int | None


def _headline(m: AverageMetrics) -> list[tuple[str, Any]]:
    return [("models", m.n_inputs)]


STAGE = StageDef(name="average", inputs=AverageInputs, resolve=_resolve, headline=_headline,
                 model_outputs=("model",), metrics=AverageMetrics, round_model="model")

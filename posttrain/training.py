"""What the training stages (rm, sft, dpo) share: settings, trainer arguments, checkpoints.

A checkpoint counts as complete only once its `COMPLETE` marker exists: the marker is
written after the trainer has saved everything (model, optimizer, scheduler, RNG, state,
tokenizer) on every rank, so a run killed while saving never resumes from a half-written
checkpoint.

Under FSDP2 the trainer's checkpoints are sharded (`sharded_fsdp_checkpoints`): each rank
writes its own shards of the model and the optimizer state through torch.distributed.checkpoint
(accelerate's SHARDED_STATE_DICT), and resume reads them back into the shards, so neither
saving nor resuming gathers the model on one rank. The final model is streamed by
`posttrain.gather.save_final_model`.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar, Literal, Mapping, TypedDict

from pydantic import Field, field_validator, model_serializer

from posttrain.files import atomic_write_text
from posttrain.schema import BatchSize, Count, Epochs, StrictModel, Tokens
from posttrain.stage import DataRow, Metrics, fmt

COMPLETE_MARKER = "COMPLETE"
WORK = "work"
"""A training stage keeps its intermediate work (trainer checkpoints, caches) under
`<stage folder>/work`: what resume needs until the stage finishes. The orchestrator deletes
it once the stage's record is written (`remove_work`), unless the recipe sets
`run.keep_checkpoints`."""
VARIANTS = "variants"
"""Every training stage's variants: `<stage folder>/variants/<name>/model` (the variant's
final model) and `.../metrics.json` (written after the model: the variant is finished)."""


class LoraSettings(StrictModel):
    """LoRA (peft). Off by default: full fine-tuning."""

    enabled: bool = False
    """Train LoRA adapters instead of all weights; they are merged before the stage records its output."""
    r: int = Field(16, gt=0)
    """Adapter rank."""
    alpha: int = Field(32, gt=0)
    """LoRA alpha (scale = alpha / r)."""
    dropout: float = Field(0.05, ge=0, lt=1)
    """Dropout on the adapter input."""
    target_modules: list[str] | Literal["all-linear"] = "all-linear"
    """Module names to adapt, or 'all-linear'."""


class LongContextMix(StrictModel):
    """How many long examples the SFT mix keeps (Llama 3 report 4.3.4: about 0.1%)."""

    threshold_tokens: Tokens
    """An example longer than this many tokens counts as long."""
    share: float = Field(0.001, ge=0, le=1)
    """Largest share of the final SFT mix that long examples may make up (seeded draw)."""


class Variant(StrictModel):
    """One run of a stage. Several variants are averaged into the stage's output (model soup)."""

    name: str | None = None
    """Folder name of the variant (default: v0, v1, ...)."""
    seed: int | None = None
    """Seed for this variant (default: the recipe seed + the variant's index)."""
    learning_rate: float | None = Field(None, gt=0)
    """Learning rate for this variant (default: the stage's)."""
    epochs: Epochs | None = None
    """Epochs for this variant (default: the stage's)."""
    data_fraction: float | None = Field(None, gt=0, le=1)
    """Train on this share of the stage's data, drawn with the variant's seed (a data version)."""
    weight: float = Field(1.0, gt=0)
    """Its weight in the average of the stage's variants (normalised over the variants)."""


class TrainingSettings(StrictModel):
    """Hyperparameters shared by the training stages."""

    learning_rate: float = Field(1e-5, gt=0)
    """Peak learning rate (the paper: 1e-5 for SFT and DPO on 405B; small models need more)."""
    epochs: Epochs = 1.0
    """Passes over the stage's data."""
    batch_size: BatchSize = 8
    """Per-device batch size."""
    grad_accum: BatchSize = 1
    """Gradient accumulation steps."""
    warmup_ratio: float = Field(0.0, ge=0, lt=1)
    """Share of steps spent warming the learning rate up."""
    lr_scheduler: str = "linear"
    """transformers scheduler name (linear, cosine, constant, ...)."""
    weight_decay: float = Field(0.0, ge=0)
    """AdamW weight decay."""
    max_grad_norm: float = Field(1.0, gt=0)
    """Gradient clipping norm."""
    max_length: Tokens = 2048
    """Longest tokenized example (prompt + response); longer ones are truncated or reported."""
    gradient_checkpointing: bool = False
    """Trade compute for memory (worth it on big models, noise on tiny ones)."""
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    """`bf16`: mixed precision, bf16 compute (autocast) over fp32 master weights and fp32 optimizer
    state, so a 1e-5 update is not lost to bf16 rounding; `fp32`: fp32 throughout; `auto`: bf16
    on a GPU that has it, fp32 elsewhere (a CPU's bf16 matmuls are slow). The weights are always
    loaded and trained in fp32, and saved so."""
    save_steps: Count = 200
    """Save a resumable checkpoint every this many optimizer steps."""
    logging_steps: Count = 10
    """Log metrics every this many steps."""
    lora: LoraSettings = LoraSettings()
    """LoRA settings."""
    variants: list[Variant] = Field(default_factory=lambda: [Variant()])
    """Runs of this stage (data versions, hyperparameters); with more than one, their weights
    are averaged (each variant's `weight`) into the stage's model: by the stage itself for rm
    and sft, by the `average` stage for dpo (the round's model)."""

    UNDUMPED_DEFAULTS: ClassVar[dict] = {"precision": "auto"}
    """Settings left out of the dump (and so of stage hashes) while at these values: added after
    runs were recorded, at defaults that compute what those runs computed (to float rounding)."""

    @model_serializer(mode="wrap")
    def _no_key_of_a_later_setting_at_its_default(self, handler):
        # These defaults dump (and hash, in stage records) as before the settings existed, so runs
        # recorded earlier are not seen as having other inputs.
        out = handler(self)
        if isinstance(out, dict):
            for key, default in self.UNDUMPED_DEFAULTS.items():
                if key in out and out[key] == default:
                    out.pop(key)
        return out

    @field_validator("variants")
    @classmethod
    def _unique_names(cls, v: list[Variant]) -> list[Variant]:
        names = [variant_name(x, i) for i, x in enumerate(v)]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(f"variant names must be unique; repeated: {repeated}")
        if not v:
            raise ValueError("at least one variant is needed")
        return v


def variant_name(variant: Variant, index: int) -> str:
    return variant.name or f"v{index}"


def mixed_bf16(settings: TrainingSettings) -> bool:
    """Whether a stage trains with bf16 autocast over fp32 master weights (`precision`)."""
    import torch

    if settings.precision == "auto":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return settings.precision == "bf16"


def trainer_common_args(settings: TrainingSettings, variant: Variant, *, output_dir: str | os.PathLike,
                        seed: int, report_to: list[str] | str = "none") -> dict:
    """Keyword arguments every TRL config (RewardConfig, SFTConfig, DPOConfig) takes."""
    import torch

    on_gpu = torch.cuda.is_available()
    return dict(
        output_dir=str(output_dir),
        learning_rate=variant.learning_rate or settings.learning_rate,
        num_train_epochs=variant.epochs or settings.epochs,
        per_device_train_batch_size=settings.batch_size,
        gradient_accumulation_steps=settings.grad_accum,
        # transformers 5 dropped `warmup_ratio`; a float in [0, 1) for warmup_steps is a ratio.
        warmup_steps=settings.warmup_ratio,
        lr_scheduler_type=settings.lr_scheduler,
        weight_decay=settings.weight_decay,
        max_grad_norm=settings.max_grad_norm,
        **_checkpointing_arg(settings.gradient_checkpointing),
        bf16=mixed_bf16(settings),  # autocast over the fp32 weights load_causal_lm_for_training gives
        use_cpu=not on_gpu,
        save_strategy="steps",
        save_steps=settings.save_steps,
        save_total_limit=2,
        logging_steps=settings.logging_steps,
        report_to=report_to,
        seed=seed,
        data_seed=seed,
        dataloader_num_workers=0,
        # The stage's one bar is drawn by the orchestrator from `posttrain.progress` reports.
        disable_tqdm=True,
    )


def _checkpointing_arg(on: bool) -> dict:
    """Activation checkpointing under the name the installed transformers reads: newer
    versions renamed `gradient_checkpointing` to `activation_checkpointing` and warn on the
    old name (TRL's configs set it), so pass the new name when it exists and clear the old."""
    import dataclasses

    from transformers import TrainingArguments

    names = {f.name for f in dataclasses.fields(TrainingArguments)}
    if "activation_checkpointing" in names:
        return {"activation_checkpointing": on, "gradient_checkpointing": None}
    return {"gradient_checkpointing": on}


def stage_callbacks() -> list:
    """The callbacks every training stage adds to its trainer: sharded checkpoints under FSDP2,
    checkpoints marked complete once saved, and step progress for the terminal's bar."""
    from posttrain.progress import trainer_callback

    return [sharded_checkpoints_callback(), complete_marker_callback(), trainer_callback()]


def sharded_fsdp_checkpoints(plugin) -> bool:
    """Make an FSDP2 plugin (accelerate's `FullyShardedDataParallelPlugin`) save the trainer's
    checkpoints sharded; returns whether it changed anything.

    With FULL_STATE_DICT every checkpoint gathers the whole model and the whole optimizer state
    on rank 0 (CPU), which is what does not fit once a model needs sharding. SHARDED_STATE_DICT
    has each rank write its own shards through torch.distributed.checkpoint and read them back
    on resume; the final model does not depend on it (posttrain streams that one itself).
    The state-dict configs are reset with the type: accelerate keeps the FULL ones otherwise
    (`rank0_only`), and torch then refuses the sharded save ("full_state_dict must be True when
    broadcast_from_rank0 is True"). FSDP1 plugins are left as they are.
    """
    if plugin is None or getattr(plugin, "fsdp_version", 1) != 2:
        return False
    if "SHARDED_STATE_DICT" in str(plugin.state_dict_type):
        return False
    plugin.state_dict_config = None
    plugin.optim_state_dict_config = None
    plugin.set_state_dict_type("SHARDED_STATE_DICT")
    return True


def sharded_checkpoints_callback():
    """A TrainerCallback that applies `sharded_fsdp_checkpoints` to the trainer's accelerator
    once the trainer is built (before any checkpoint is saved or resumed), whatever the
    accelerate config says; a run without FSDP2 is left as it is."""
    from transformers import TrainerCallback

    class _ShardedCheckpoints(TrainerCallback):
        def on_init_end(self, args, state, control, **kwargs):
            from accelerate.state import AcceleratorState, is_initialized

            if is_initialized():
                sharded_fsdp_checkpoints(getattr(AcceleratorState(), "fsdp_plugin", None))
            return control

    return _ShardedCheckpoints()


def complete_marker_callback():
    """A TrainerCallback that marks each checkpoint complete once the trainer has saved it on
    every rank (each writes its own RNG state, and under FSDP2 its own shards)."""
    from transformers import TrainerCallback

    from posttrain.distributed import barrier

    class _MarkComplete(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            barrier()  # the trainer calls on_save on every rank once that rank has saved its part
            if state.is_world_process_zero:
                ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
                if ckpt.is_dir():
                    atomic_write_text(ckpt / COMPLETE_MARKER, f"{state.global_step}\n")
            return control

    return _MarkComplete()


def last_complete_checkpoint(output_dir: str | os.PathLike) -> str | None:
    """The newest `checkpoint-N` folder under `output_dir` that carries the COMPLETE marker."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return None
    found = []
    for p in output_dir.iterdir():
        m = re.fullmatch(r"checkpoint-(\d+)", p.name)
        if m and p.is_dir() and (p / COMPLETE_MARKER).exists():
            found.append((int(m.group(1)), p))
    return str(max(found)[1]) if found else None


def peft_config(lora: LoraSettings, task_type: str = "CAUSAL_LM"):
    """A peft LoraConfig from recipe settings, or None when LoRA is off."""
    if not lora.enabled:
        return None
    from peft import LoraConfig

    return LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                      target_modules=lora.target_modules, task_type=task_type)


@dataclass
class VariantRun:
    """One variant of a training stage: where it trains and where its model goes."""

    index: int
    name: str
    variant: Variant
    seed: int
    """The variant's own seed, else the stage's seed plus its index."""
    model_dir: Path
    """`<stage>/variants/<name>/model`."""
    work_dir: Path
    """`<stage>/work/<name>`: its resumable trainer checkpoints."""
    metrics: dict | None = None

    @property
    def done_marker(self) -> Path:
        return self.model_dir.parent / "metrics.json"


def train_variants(out_dir: str | os.PathLike, settings: TrainingSettings, seed: int,
                   train_one: Callable[[VariantRun], dict], *, keep_checkpoints: bool = False) -> list[VariantRun]:
    """Train every variant of a stage that is not finished yet, the one way rm, sft and dpo do.

    `train_one(run)` is called on every rank; it trains, saves the model to `run.model_dir`
    (collectively) and returns the variant's metrics. Rank 0 then writes the variant's
    `metrics.json`, the marker that it is finished; a rerun reads it instead of training
    again, and a variant killed before it resumes from its last complete checkpoint. A
    finished variant's checkpoints are deleted then (its model supersedes them), unless
    `keep_checkpoints`.
    """
    import shutil

    from posttrain.distributed import main_then_wait
    from posttrain.files import atomic_write_json, read_json

    out_dir = Path(out_dir)
    runs = []
    for i, variant in enumerate(settings.variants):
        name = variant_name(variant, i)
        run = VariantRun(index=i, name=name, variant=variant,
                         seed=variant.seed if variant.seed is not None else seed + i,
                         model_dir=out_dir / VARIANTS / name / "model", work_dir=out_dir / WORK / name)
        if run.model_dir.is_dir() and run.done_marker.is_file():
            run.metrics = read_json(run.done_marker)
        else:
            run.metrics = train_one(run)
            main_then_wait(atomic_write_json, run.done_marker, run.metrics)
            if not keep_checkpoints:
                main_then_wait(shutil.rmtree, run.work_dir, ignore_errors=True)
        runs.append(run)
    return runs


def variant_weights(runs: list[VariantRun]) -> list[float]:
    return [r.variant.weight for r in runs]


def average_variants(runs: list[VariantRun], out: str | os.PathLike, **kwargs) -> Path:
    """The stage's model at `out`: the weighted average of its variants, or the one variant's
    model as hard links (no copy). Rank 0 writes, every rank waits."""
    from posttrain.averaging import average_checkpoints
    from posttrain.distributed import barrier, main_then_wait
    from posttrain.files import link_tree

    out = Path(out)
    done = out.is_dir()
    barrier()  # every rank decided before rank 0 writes: all take the same branch
    if done:
        return out
    if len(runs) == 1:
        main_then_wait(link_tree, runs[0].model_dir, out)
    else:
        main_then_wait(average_checkpoints, [r.model_dir for r in runs], out, variant_weights(runs), **kwargs)
    return out


class DataCounts(TypedDict):
    """What a training stage trained on, at the top level of its metrics (one shape for rm,
    sft and dpo, read by the orchestrator's end line, status and the report)."""

    unit: str
    """What a row is: 'examples' (sft), 'pairs' (rm, dpo)."""
    rows_read: int
    """Rows before any filter."""
    rows_trained: int
    """Rows a variant trained on after every filter and its `data_fraction` (the most of any
    variant; `rows_trained_by_variant` has each)."""
    rows_trained_by_variant: dict[str, int]
    dropped: dict[str, int]
    """Rows removed by a filter, by reason (reasons with none left out)."""
    truncated: int
    """Rows kept but cut at max_length."""


@dataclass(kw_only=True)
class TrainingMetrics(Metrics):
    """The typed part of rm's, sft's and dpo's metrics that status and the report read: the
    `DataCounts` every training stage writes, its variants' metrics and contamination. Each
    stage's subclass makes the fields its headline reads required (written every time)."""

    unit: str | None = None
    rows_read: int | None = None
    rows_trained: int | None = None
    rows_trained_by_variant: dict[str, int] | None = None
    dropped: dict[str, int] | None = None
    truncated: int | None = None
    variants: dict[str, dict] | None = None
    """Per variant: what its trainer logged (`loss`, `rewards/accuracies`, each {"last", ...})."""
    contaminated: dict[str, int] | None = None
    """{source file: rows sharing an n-gram with an eval prompt} (posttrain.decontam)."""
    throughput: dict | None = None
    """The training loop's tokens/s and share of peak (posttrain.throughput.combine)."""


def training_data_row(m: TrainingMetrics) -> DataRow | None:
    """A training stage's row of the report's data table: per variant when they differ."""
    if m.rows_trained is None:
        return None
    per_variant = m.rows_trained_by_variant or {}
    trained = fmt(m.rows_trained)
    if len(set(per_variant.values())) > 1:
        trained += " (" + ", ".join(f"{k} {v}" for k, v in per_variant.items()) + ")"
    return DataRow(m.unit or "-", m.rows_read, trained, m.dropped or {}, m.truncated, m.contaminated)


def data_counts(unit: str, *, read: int, dropped: Mapping[str, int], truncated: int,
                trained_by_variant: Mapping[str, int | None]) -> DataCounts:
    trained = {k: int(v) for k, v in trained_by_variant.items() if v is not None}
    return DataCounts(unit=unit, rows_read=int(read), rows_trained=max(trained.values(), default=0),
                      rows_trained_by_variant=trained,
                      dropped={k: int(v) for k, v in sorted(dropped.items()) if v},
                      truncated=int(truncated))


def remove_work(stage_dir: str | os.PathLike) -> int:
    """Delete a finished stage's `work` folder, and the variant models its record does not
    name as outputs (rm's and sft's variants once averaged); returns the bytes freed.

    Only once the stage's record exists: before that, the work is what a killed stage
    resumes from (and the record is what makes the orchestrator skip the stage instead).
    """
    import shutil

    from posttrain.files import read_json
    from posttrain.records import RECORD

    stage_dir = Path(stage_dir)
    if not (stage_dir / RECORD).is_file():
        raise RuntimeError(f"{stage_dir}: no {RECORD} yet; its work folder is still needed to resume")
    record = read_json(stage_dir / RECORD)
    run_dir = stage_dir.parent.parent
    named = [(run_dir / p).resolve() for out in record.get("outputs", {}).values()
             for p in (out["path"] if isinstance(out["path"], list) else [out["path"]])]
    doomed = [stage_dir / WORK]
    doomed += [v for v in sorted((stage_dir / VARIANTS).glob("*"))
               if not any(p == v.resolve() or p.is_relative_to(v.resolve()) for p in named)]
    freed = 0
    for folder in doomed:
        if folder.is_dir():
            freed += sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and not p.is_symlink())
            shutil.rmtree(folder)
    return freed

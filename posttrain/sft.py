"""The `sft` stage: supervised fine-tuning on this round's top-1 samples plus recipe SFT data.

Llama 3 report, section 4.1.3: cross-entropy on target tokens only. Every assistant turn
(its content and its end-of-turn token) is a target; everything else (system, user and tool
turns, the chat headers) is context and gets label -100. The end-of-turn token stays a
target: a model that never sees it as one forgets to stop.

We tokenize ourselves with `chat.encode_conversation` (one rendering, one tokenization, the
masks derived from the template) and hand TRL's SFTTrainer a dataset with `input_ids` and
`labels`; TRL uses such labels as they are (trl/trainer/sft_trainer.py: "A dataset that
already provides a 'labels' column is left as is"). No packing: examples stay separate.

Inputs (`ctx.inputs`): `init_model` (the pre-trained checkpoint by default, as the paper does
each round, or the previous round's model: the orchestrator resolves it from `init`),
`sft_files` (this and, when `cumulative`, earlier rounds' top-1 files plus the recipe's SFT
data). Output: `model` (variants averaged, LoRA merged). Optional
`ctx.extra["trainer_callbacks"]`: extra transformers TrainerCallbacks (tests, tooling).
"""

from __future__ import annotations

import random
from collections import Counter
from pathlib import Path
from typing import Literal

from posttrain import files
from posttrain.stage import StageContext, StageResult
from posttrain.training import (
    LongContextMix,
    TrainingSettings,
    complete_marker_callback,
    last_complete_checkpoint,
    merge_if_peft,
    peft_config,
    trainer_common_args,
    variant_name,
)



class SFTStageConfig(TrainingSettings):
    """The `sft` stage. Named so it does not clash with trl.SFTConfig."""

    init: Literal["base", "previous"] = "base"
    """Start from the pre-trained checkpoint ('base', the paper's choice every round) or from the
    previous round's final model ('previous'). The orchestrator turns this into inputs['init_model']."""
    cumulative: bool = True
    """Train on the top-1 samples of this and all earlier rounds (off: this round's only).
    The orchestrator turns this into inputs['sft_files']."""
    long_context: LongContextMix | None = None
    """Keep all short examples and at most `share` of the mix as long ones (None: keep all)."""


def encode_sft_examples(tokenizer, examples, max_length: int,
                        formatting_tokens: list[str] | None = None) -> tuple[list[dict], Counter]:
    """Rows {input_ids, labels} for SFTTrainer: labels = input_ids on response tokens, -100 elsewhere.

    Examples whose prompt leaves no room for a target within max_length are dropped and
    counted; truncated ones are kept and counted.
    """
    from posttrain import chat

    rows, counts = [], Counter()
    for ex in examples:
        try:
            enc = chat.encode_conversation(tokenizer, ex.messages, max_length, formatting_tokens=formatting_tokens)
        except chat.PromptTooLong:
            counts["dropped_prompt_too_long"] += 1
            continue
        if enc.truncated:
            counts["truncated"] += 1
        counts["kept"] += 1
        rows.append({"input_ids": enc.input_ids, "labels": sft_labels(enc.input_ids, enc.response_mask)})
    return rows, counts


def sft_labels(input_ids: list[int], response_mask: list[int], ignore_index: int = -100) -> list[int]:
    """labels[t] = input_ids[t] where response_mask[t] else ignore_index (the model shifts them)."""
    if len(input_ids) != len(response_mask):
        raise ValueError(f"input_ids has {len(input_ids)} tokens but response_mask {len(response_mask)}")
    return [t if m else ignore_index for t, m in zip(input_ids, response_mask)]



def build_trainer(*, cfg: SFTStageConfig, variant, seed: int, init_model: Path, tokenizer, rows: list[dict],
                  work_dir: Path, trust_remote_code: bool = False, report_to="none", callbacks=()):
    """A TRL SFTTrainer for one variant over pre-tokenized rows {input_ids, labels}."""
    from datasets import Dataset
    from trl import SFTConfig as TRLSFTConfig
    from trl import SFTTrainer

    from posttrain.modeling import load_causal_lm

    if variant.data_fraction is not None:
        n = max(1, round(len(rows) * variant.data_fraction))
        rows = random.Random(seed).sample(rows, n)
    args = TRLSFTConfig(
        **trainer_common_args(cfg, variant, output_dir=work_dir, seed=seed, report_to=report_to),
        max_length=cfg.max_length,  # already truncated by encode_conversation; TRL's cut is a no-op
        packing=False,
        completion_only_loss=False,
        assistant_only_loss=False,
    )
    return SFTTrainer(
        model=load_causal_lm(init_model, trust_remote_code=trust_remote_code),
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
        peft_config=peft_config(cfg.lora),
        callbacks=[complete_marker_callback(), *callbacks],
    )


def train_variant(*, work_dir: Path, **kwargs):
    """Train one SFT variant (arguments as `build_trainer`); resumes from the last complete
    checkpoint in `work_dir`. Returns (trainer, metrics); LoRA is not merged yet."""
    trainer = build_trainer(work_dir=work_dir, **kwargs)
    rows = trainer.train_dataset
    resume = last_complete_checkpoint(work_dir)
    trainer.train(resume_from_checkpoint=resume)
    history = [h for h in trainer.state.log_history if "loss" in h and "train_runtime" not in h]
    losses = [h["loss"] for h in history]
    metrics = {
        "examples": len(rows),
        "target_tokens": sum(sum(1 for t in labels if t != -100) for labels in rows["labels"]),
        "steps": trainer.state.global_step,
        "resumed_from": None if resume is None else Path(resume).name,
        "loss": {"series": losses, "first": losses[0] if losses else None, "last": losses[-1] if losses else None},
    }
    return trainer, metrics


def run(ctx: StageContext) -> StageResult:
    from posttrain import data
    from posttrain.average import average_checkpoints
    from posttrain.modeling import load_tokenizer, save_checkpoint

    cfg: SFTStageConfig = ctx.config
    init_model = Path(ctx.inputs["init_model"])
    sft_files = [str(p) for p in ctx.inputs.get("sft_files") or []]
    if not sft_files:
        raise ValueError("sft: no sft_files given (no top-1 samples and no recipe SFT data)")
    tokenizer = load_tokenizer(init_model, trust_remote_code=ctx.trust_remote_code)

    loaded = data.load_sft(sft_files)
    by_file = Counter(ex.source.rsplit(":", 1)[0] for ex in loaded)
    rows, counts = encode_sft_examples(tokenizer, loaded, cfg.max_length, ctx.formatting_tokens)
    mix = None
    if cfg.long_context is not None:
        from posttrain.datamix import mix_long_examples

        rows, mix = mix_long_examples(rows, [len(r["input_ids"]) for r in rows],
                                      long_threshold_tokens=cfg.long_context.threshold_tokens,
                                      long_share=cfg.long_context.share, seed=ctx.seed)
    if not rows:
        raise ValueError(f"sft: no training examples left (counts: {dict(counts)})")

    variants_dir = ctx.out_dir / "variants"
    final = ctx.out_dir / "model"
    single = len(cfg.variants) == 1
    per_variant, variant_dirs = {}, []
    for i, variant in enumerate(cfg.variants):
        name = variant_name(variant, i)
        out = final if single else variants_dir / name
        variant_dirs.append(out)
        done = ctx.out_dir / "work" / name / "variant_metrics.json"
        if out.exists() and done.exists():  # written after the model: the variant is finished
            per_variant[name] = files.read_json(done)
            continue
        seed = variant.seed if variant.seed is not None else ctx.seed + i
        trainer, metrics = train_variant(
            cfg=cfg, variant=variant, seed=seed, init_model=init_model, tokenizer=tokenizer, rows=rows,
            work_dir=ctx.out_dir / "work" / name, trust_remote_code=ctx.trust_remote_code,
            report_to=ctx.report_to, callbacks=ctx.extra.get("trainer_callbacks", ()),
        )
        save_checkpoint(merge_if_peft(trainer.model), tokenizer, out)
        files.atomic_write_json(done, metrics)
        per_variant[name] = metrics
        del trainer
    if not single:
        average_checkpoints(variant_dirs, final)

    return StageResult(
        outputs={"model": final.relative_to(ctx.run_dir).as_posix()},
        metrics={
            "examples": dict(counts),
            "long_context_mix": mix.summary() if mix is not None else None,
            "examples_by_file": dict(by_file),
            "init": cfg.init,
            "init_model": str(init_model),
            "averaged_variants": len(cfg.variants),
            "variants": per_variant,
        },
    )

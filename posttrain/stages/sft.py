"""The `sft` stage: supervised fine-tuning on this round's top-1 samples plus recipe SFT data.

Llama 3 report, section 4.1.3: cross-entropy on target tokens only. Which assistant turns
are targets (their content and end-of-turn token):

- top-1 rows (this and earlier rounds' samples): the last turn only, the one the policy
  sampled. Earlier assistant turns belong to the prompt: they came with the data, and the
  policy did not write them.
- the recipe's SFT data: every assistant turn (`targets: all_turns`, the default, as TRL's
  `assistant_only_loss` does), or the last one only (`targets: last_turn`, for data whose
  earlier assistant turns are context rather than answers to imitate).

Everything else (system, user and tool turns, the chat headers, earlier assistant turns
that are not targets) is context and gets label -100. The end-of-turn token stays a
target: a model that never sees it as one forgets to stop.

We tokenize ourselves with `chat.encode_conversation` / `chat.encode_example` (one rendering,
one tokenization, the masks derived from the template) and hand TRL's SFTTrainer a dataset with `input_ids` and
`labels`; TRL uses such labels as they are (trl/trainer/sft_trainer.py: "A dataset that
already provides a 'labels' column is left as is").

Packing (`sft.packing`, default on): the examples of each batch (the same examples, in the same
seeded batches, as unpacked) are laid side by side in fewer rows (`posttrain.packing.pack_examples`:
positions restart at 0 for each example, a block mask keeps attention within it), instead of
each padded to the batch's longest. The loss is the same sum over target tokens divided by the
same count as unpacked, the target tokens of the whole optimizer step (every micro-batch and
rank: the Trainer's `num_items_in_batch`), so every step's loss and gradient equal the padded
batch's to float rounding (tests/test_sft.py, 1e-4). Needs attention 'sdpa' or 'eager'; with
another implementation the stage pads instead and says so in its log and record.

Inputs: `SFTInputs`. Output: `model` (variants averaged, LoRA merged). Intermediate work
(checkpoints, variant models before averaging) lies under `work/`.
"""

from __future__ import annotations

import logging
import random
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import model_validator

from posttrain import decontam, throughput
from posttrain.schema import Tokens
from posttrain.stage import StageContext, StageDef, StageResult, path_field, variant_mean
from posttrain.training import (
    LongContextMix,
    TrainingMetrics,
    TrainingSettings,
    VariantRun,
    average_variants,
    data_counts,
    last_complete_checkpoint,
    peft_config,
    stage_callbacks,
    train_variants,
    trainer_common_args,
    training_data_row,
)

log = logging.getLogger(__name__)

Targets = Literal["all_turns", "last_turn"]


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
    targets: Targets = "all_turns"
    """Which assistant turns of the recipe's SFT data (`data.sft`) are trained on: every one
    ('all_turns', as TRL's assistant_only_loss) or the last one ('last_turn'). Top-1 rows from
    sampling always train on their last turn only: the earlier ones are part of the prompt."""
    packing: bool = True
    """Lay each batch's examples side by side in fewer rows (positions restarted, attention kept
    within each example by a block mask) instead of padding each to the batch's longest: the same
    batches and the same loss, fewer padding tokens computed. False: padded rows, one per example."""
    packing_length: Tokens | None = None
    """Most tokens in one packed row; examples are never split, so a longer one gets a row of its
    own. None: the batch's longest example, so no packed row is longer than a padded one."""

    # Packing trains what padded rows train (the same batches and loss, to float rounding): at
    # their defaults these keys stay out of the stage's hash, so runs recorded before them resume.
    UNDUMPED_DEFAULTS: ClassVar[dict] = {**TrainingSettings.UNDUMPED_DEFAULTS, "packing": True,
                                         "packing_length": None}

    @model_validator(mode="after")
    def _packing_length_needs_packing(self):
        if self.packing_length is not None and not self.packing:
            raise ValueError("sft.packing_length is set but sft.packing is false: set packing: true, or drop "
                             "packing_length")
        return self


def encode_sft_examples(tokenizer, examples, max_length: int, formatting_tokens: list[str] | None = None,
                        targets: Targets = "all_turns") -> tuple[list[dict], Counter]:
    """Rows {input_ids, labels} for SFTTrainer: labels = input_ids on target tokens, -100 elsewhere.

    targets: 'all_turns' makes every assistant turn a target; 'last_turn' only the final one
    (the conversation before it, earlier assistant turns included, is the prompt).
    Examples whose prompt leaves no room for a target within max_length are dropped and
    counted; truncated ones are kept and counted.
    """
    from posttrain import chat

    if targets not in ("all_turns", "last_turn"):
        raise ValueError(f"targets must be 'all_turns' or 'last_turn', got {targets!r}")
    rows, counts = [], Counter()
    for ex in examples:
        try:
            if targets == "last_turn":
                *prompt, last = ex.messages
                if last.get("role") != "assistant":
                    raise ValueError(f"{ex.source or ex.id}: the conversation does not end with an assistant turn")
                enc = chat.encode_example(tokenizer, prompt, last["content"], max_length,
                                          formatting_tokens=formatting_tokens)
            else:
                enc = chat.encode_conversation(tokenizer, ex.messages, max_length, formatting_tokens=formatting_tokens)
        except chat.PromptTooLong:
            counts["dropped_prompt_too_long"] += 1
            continue
        if enc.truncated:
            counts["truncated"] += 1
        counts["kept"] += 1
        rows.append({"input_ids": enc.input_ids, "labels": sft_labels(enc.input_ids, enc.response_mask)})
    return rows, counts


def training_rows(tokenizer, top1: list, recipe_data: list, cfg: SFTStageConfig,
                  formatting_tokens: list[str] | None = None) -> tuple[list[dict], Counter]:
    """The stage's rows: top-1 rows with their last (sampled) turn as the only target, then the
    recipe's SFT data with the turns `cfg.targets` names."""
    rows, counts = encode_sft_examples(tokenizer, top1, cfg.max_length, formatting_tokens, "last_turn")
    more, more_counts = encode_sft_examples(tokenizer, recipe_data, cfg.max_length, formatting_tokens, cfg.targets)
    counts.update(more_counts)
    return rows + more, counts


def screen_examples(inputs, examples: list) -> tuple[list, dict[str, int]]:
    """SFT rows checked for eval prompts (posttrain.decontam): their user turns and assistant
    responses (every one: `targets: all_turns` trains on them all)."""
    return decontam.screen(inputs, examples,
                           lambda ex: [m.get("content") for m in ex.messages if m.get("role") in ("user", "assistant")],
                           lambda ex: decontam.source_file(ex.source), "sft")


def sft_labels(input_ids: list[int], response_mask: list[int], ignore_index: int = -100) -> list[int]:
    """labels[t] = input_ids[t] where response_mask[t] else ignore_index (the model shifts them)."""
    if len(input_ids) != len(response_mask):
        raise ValueError(f"input_ids has {len(input_ids)} tokens but response_mask {len(response_mask)}")
    return [t if m else ignore_index for t, m in zip(input_ids, response_mask)]



class PackedCollator:
    """A batch of examples {input_ids, labels} as packed rows (`packing.pack_examples`), counting
    what it packed: examples, rows, and real and padded tokens."""

    def __init__(self, pad_token_id: int, packing_length: int | None = None):
        self.pad_token_id, self.packing_length = pad_token_id, packing_length
        self.examples = self.rows = self.tokens = self.padded_tokens = 0

    def __call__(self, examples: list[dict]) -> dict:
        from posttrain.packing import pack_examples

        batch = pack_examples(examples, self.pad_token_id, self.packing_length)
        segments = batch["segment_ids"]
        self.examples += len(examples)
        self.rows += segments.shape[0]
        self.tokens += int((segments >= 0).sum())
        self.padded_tokens += segments.numel()
        return batch

    def summary(self) -> dict:
        """Examples per packed row and the share of computed tokens that were padding, over the
        batches this process collated (after a resume: the resumed part only)."""
        return {"examples": self.examples, "rows": self.rows,
                "examples_per_row": self.examples / self.rows if self.rows else None,
                "padding_share": 1 - self.tokens / self.padded_tokens if self.padded_tokens else None}


def use_packing(cfg: SFTStageConfig, model) -> bool:
    """Whether this model trains on packed rows: `cfg.packing`, and its attention takes a block mask."""
    from posttrain.packing import supports_block_mask

    if not cfg.packing:
        return False
    if supports_block_mask(model):
        return True
    log.warning("sft: packing: true, but attention %r takes no block mask ('sdpa' and 'eager' do); "
                "training on padded rows instead", getattr(model.config, "_attn_implementation", None))
    return False


def build_trainer(*, cfg: SFTStageConfig, variant, seed: int, init_model: Path, tokenizer, rows: list[dict],
                  work_dir: Path, trust_remote_code: bool = False, report_to="none", callbacks=()):
    """A TRL SFTTrainer for one variant over pre-tokenized rows {input_ids, labels}; its batches
    are packed (`PackedCollator`, the trainer's `data_collator`) when `use_packing` says so."""
    from datasets import Dataset
    from trl import SFTConfig as TRLSFTConfig
    from trl import SFTTrainer

    from posttrain.modeling import load_causal_lm_for_training

    if variant.data_fraction is not None:
        n = max(1, round(len(rows) * variant.data_fraction))
        rows = random.Random(seed).sample(rows, n)
    args = TRLSFTConfig(
        **trainer_common_args(cfg, variant, output_dir=work_dir, seed=seed, report_to=report_to),
        max_length=cfg.max_length,  # already truncated by encode_conversation; TRL's cut is a no-op
        packing=False,  # TRL's packing regroups examples across batches; ours packs within each batch
        completion_only_loss=False,
        assistant_only_loss=False,
    )
    model = load_causal_lm_for_training(init_model, trust_remote_code=trust_remote_code)
    collator = None
    if use_packing(cfg, model):
        from posttrain import trl_compat

        trl_compat.check_private_api()  # the packed loss corrects TRL's token count (trl_compat)
        collator = PackedCollator(tokenizer.pad_token_id, cfg.packing_length)
    return _exact_sft_trainer_class(SFTTrainer)(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
        data_collator=collator,
        peft_config=peft_config(cfg.lora),
        callbacks=[*stage_callbacks(), *callbacks],
    )


def _without_targets(row: dict) -> dict:
    """An example at weight 0 (a rank's empty slot in the last step): no target token."""
    return {**row, "labels": [-100] * len(row["labels"])}


def _exact_sft_trainer_class(base):
    class ExactSFTTrainer(base):
        """TRL's SFTTrainer whose W processes see exactly one process's global batches
        (`distributed.exact_train_dataloader`); the token mean is global already (the Trainer's
        `num_items_in_batch` over every rank, `average_tokens_across_devices`). A packed batch
        (`PackedCollator`: it has `segment_ids`) gets its block mask here, on the model's device,
        in the form the model's attention takes; TRL's loss is then computed as for padded rows."""

        def get_train_dataloader(self):
            from posttrain import distributed

            return distributed.exact_train_dataloader(super().get_train_dataloader(), self.accelerator.num_processes,
                                                      _without_targets)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if "segment_ids" not in inputs:
                return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                            num_items_in_batch=num_items_in_batch)
            from posttrain import trl_compat
            from posttrain.packing import block_attention_mask, model_attention_mask

            inputs = dict(inputs)
            segments = inputs.pop("segment_ids")
            param = next(model.parameters())
            inputs["attention_mask"] = model_attention_mask(block_attention_mask(segments.to(param.device)), model,
                                                            param.dtype)
            tokens = None
            if model.training:  # TRL counts training tokens only; every rank gathers, as TRL's own count does
                tokens = int(self.accelerator.gather((segments >= 0).sum().reshape(1)).sum())
            with trl_compat.packed_sft_token_count(self, tokens):
                return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                            num_items_in_batch=num_items_in_batch)

    return ExactSFTTrainer


def train_variant(*, work_dir: Path, **kwargs):
    """Train one SFT variant (arguments as `build_trainer`); resumes from the last complete
    checkpoint in `work_dir`. Returns (trainer, metrics); LoRA is not merged yet."""
    trainer = build_trainer(work_dir=work_dir, **kwargs)
    throughput.attach(trainer)
    rows = trainer.train_dataset
    resume = last_complete_checkpoint(work_dir)
    trainer.train(resume_from_checkpoint=resume)
    history = [h for h in trainer.state.log_history if "loss" in h and "train_runtime" not in h]
    losses = [h["loss"] for h in history]
    packing = trainer.data_collator.summary() if isinstance(trainer.data_collator, PackedCollator) else None
    metrics = {
        "examples": len(rows),
        "target_tokens": sum(sum(1 for t in labels if t != -100) for labels in rows["labels"]),
        "steps": trainer.state.global_step,
        "packed": packing is not None,
        "examples_per_row": packing["examples_per_row"] if packing else 1.0,
        "packing": packing,
        "resumed_from": None if resume is None else Path(resume).name,
        "loss": {"series": losses, "first": losses[0] if losses else None, "last": losses[-1] if losses else None},
        "throughput": throughput.summary(trainer),
    }
    return trainer, metrics


def run(ctx: StageContext) -> StageResult:
    from posttrain import data
    from posttrain.gather import save_final_model
    from posttrain.modeling import load_tokenizer

    cfg: SFTStageConfig = ctx.config
    init_model = Path(ctx.inputs.init_model)
    top1_files = [str(p) for p in ctx.inputs.top1_files]
    sft_files = [str(p) for p in ctx.inputs.sft_files]
    if not top1_files and not sft_files:
        raise ValueError("sft: no top1_files and no sft_files given (no top-1 samples and no recipe SFT data)")
    tokenizer = load_tokenizer(init_model, trust_remote_code=ctx.trust_remote_code)

    top1 = data.load_sft(top1_files) if top1_files else []
    recipe_data = data.load_sft(sft_files) if sft_files else []
    n_read = len(top1) + len(recipe_data)
    top1, dirty = screen_examples(ctx.inputs, top1)
    recipe_data, dirty_data = screen_examples(ctx.inputs, recipe_data)
    contaminated = {**dirty, **dirty_data}
    by_file = Counter(ex.source.rsplit(":", 1)[0] for ex in top1 + recipe_data)
    rows, counts = training_rows(tokenizer, top1, recipe_data, cfg, ctx.formatting_tokens)
    mix = None
    if cfg.long_context is not None:
        from posttrain.datamix import mix_long_examples

        rows, mix = mix_long_examples(rows, [len(r["input_ids"]) for r in rows],
                                      long_threshold_tokens=cfg.long_context.threshold_tokens,
                                      long_share=cfg.long_context.share, seed=ctx.seed)
    if not rows:
        raise ValueError(f"sft: no training examples left (counts: {dict(counts)})")

    def train_one(run: VariantRun) -> dict:
        trainer, metrics = train_variant(
            cfg=cfg, variant=run.variant, seed=run.seed, init_model=init_model, tokenizer=tokenizer, rows=rows,
            work_dir=run.work_dir, trust_remote_code=ctx.trust_remote_code,
            report_to=ctx.report_to, callbacks=ctx.callbacks,
        )
        # Collective: the weights are gathered, LoRA merged, rank 0 writes and every rank waits.
        save_final_model(trainer, tokenizer, run.model_dir)
        return metrics

    runs = train_variants(ctx.out_dir, cfg, ctx.seed, train_one, keep_checkpoints=ctx.keep_checkpoints)
    per_variant = {r.name: r.metrics for r in runs}
    final = average_variants(runs, ctx.out_dir / "model")

    dropped = {"prompt_too_long": counts["dropped_prompt_too_long"],
               "contaminated": n_read - len(top1) - len(recipe_data)}
    if mix is not None:
        dropped.update(mix.summary()["dropped_by_reason"])
    return StageResult(
        outputs={"model": final.relative_to(ctx.run_dir).as_posix()},
        metrics={
            **data_counts("examples", read=n_read, dropped=dropped,
                          truncated=counts["truncated"],
                          trained_by_variant={k: v.get("examples") for k, v in per_variant.items()}),
            "examples": dict(counts),
            "examples_by_kind": {"top1": len(top1), "sft_data": len(recipe_data)},
            "targets": {"top1": "last_turn", "sft_data": cfg.targets},
            "long_context_mix": mix.summary() if mix is not None else None,
            "examples_by_file": dict(by_file),
            "contaminated": contaminated,
            "init": cfg.init,
            "init_model": str(init_model),
            "averaged_variants": len(cfg.variants),
            "variants": per_variant,
            "throughput": throughput.combine([v.get("throughput") for v in per_variant.values()]),
        },
    )


# ----------------------------------------------------------------------------- the stage


@dataclass
class SFTInputs:
    init_model: str = path_field()
    """The pre-trained checkpoint (the paper's way, every round), or the previous round's
    model (`sft.init: previous`)."""
    top1_files: list[str] = path_field(default_factory=list)
    """This round's top-1 samples and, when `sft.cumulative`, earlier rounds'."""
    sft_files: list[str] = path_field(default_factory=list)
    """The recipe's SFT data."""
    decontaminate: dict | None = decontam.settings_field()
    eval_prompt_files: list[str] = decontam.files_field()


def _resolve(rnd) -> SFTInputs:
    from posttrain.stages.curate import curated

    r = rnd.recipe
    rounds = range(1, rnd.n + 1) if r.sft.cumulative else [rnd.n]
    # A round that curated (posttrain.stages.curate) hands on its kept rows instead.
    top1 = [curated(rnd, "top1", m) or rnd.output("sample", "top1", m) for m in rounds]
    sft_files = curated(rnd, "sft")
    init = rnd.previous_model() if r.sft.init == "previous" else None
    return SFTInputs(init_model=init or rnd.path(r.models.base), top1_files=top1,
                     sft_files=[sft_files] if sft_files else [rnd.path(p) for p in r.data.sft],
                     **decontam.resolve_inputs(rnd))


@dataclass(kw_only=True)
class SFTMetrics(TrainingMetrics):
    rows_trained: int | None
    variants: dict[str, dict] | None


def _headline(m: SFTMetrics) -> list[tuple[str, Any]]:
    # the last logged training loss (mean over variants); examples trained on
    return [("loss", variant_mean(m, "loss", "last")), ("examples", m.rows_trained), *throughput.headline(m.raw)]


STAGE = StageDef(name="sft", inputs=SFTInputs, resolve=_resolve, headline=_headline, model_outputs=("model",),
                 launcher=True, metrics=SFTMetrics, data_row=training_data_row, legend="loss: last training loss")

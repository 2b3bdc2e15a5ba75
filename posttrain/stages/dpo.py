"""The `dpo` stage: direct preference optimisation on top of this round's SFT model.

Llama 3 report, section 4.1.4: DPO (beta 0.1) from the round's SFT model, which is also the
reference, on the latest preference batch (`significantly_better`/`better` only), with two
changes to plain DPO:

- formatting tokens (chat headers, role names, end-of-turn tokens) are masked out of the
  log-probabilities of chosen and rejected: they are common to both sides, so their
  gradients conflict and cause tail repetition or abrupt termination;
- an NLL term (coefficient 0.2) on the chosen response keeps its log-probability from
  falling. It keeps the formatting tokens as targets by default, so the model keeps
  learning to stop (`mask_formatting_in_nll` masks them there too).

TRL's DPOTrainer derives every log-probability from one `completion_mask`, so masking
tokens out of the DPO term would also mask them out of the NLL term. `MaskedDPOTrainer`
(built by `masked_dpo_trainer_class`) therefore replaces the loss: the collator carries a
second mask, `dpo_mask`, and the loss uses `completion_mask` for the NLL term and
`dpo_mask` for the DPO term. The math is in the pure functions below.

By default (`packed`) a pair is one row, `prompt | chosen | rejected`, under a block attention
mask (`pack_pairs`, posttrain.packing): the prompt is computed once for both responses and every
log-prob equals the separate rows' (tests/test_dpo.py, to 1e-4), for the policy and the reference
pass. Attention implementations that take no custom 4D mask fall back to separate rows.
TRL's private methods are overridden in posttrain.trl_compat only.

Reference log-probs are computed once per (model, pair, mask) and kept in a cache on disk
(`RefLogpCache`) whose file key names the model's content hash, dtype and masking, and
whose row key hashes the pair's tokens and its DPO mask: variants of one stage share it,
and a changed mask can never reuse numbers computed under another one (TRL's own cache is
keyed by dataset fingerprint and model, not by the collator).

Inputs: `DPOInputs`. Outputs: `variants` (list of model folders, relative to the run folder;
the `average` stage averages them).
"""

from __future__ import annotations

import logging
import random
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator

from posttrain import decontam, distributed, files, throughput
from posttrain.packing import block_attention_mask, model_attention_mask, supports_block_mask
from posttrain.preferences import PreferenceFilter, rank
from posttrain.schema import BatchSize, Tokens
from posttrain.stage import StageContext, StageDef, StageResult, path_field, variant_mean
from posttrain.training import (
    WORK,
    TrainingMetrics,
    TrainingSettings,
    VariantRun,
    data_counts,
    last_complete_checkpoint,
    peft_config,
    stage_callbacks,
    train_variants,
    trainer_common_args,
    training_data_row,
)


log = logging.getLogger(__name__)
REF_CACHE_VERSION = 1
# Logged by the trainer at every logging step; the record keeps each as a series.
TRAINING_SERIES = ("loss", "rewards/accuracies", "rewards/margins", "rewards/chosen", "rewards/rejected",
                   "logps/chosen", "logps/rejected", "nll")


class DPOStageConfig(TrainingSettings, PreferenceFilter):
    """The `dpo` stage. Named so it does not clash with trl.DPOConfig."""

    beta: float = Field(0.1, gt=0)
    """DPO temperature beta (the paper: 0.1)."""
    nll_coef: float = Field(0.2, ge=0)
    """Weight of the NLL term on the chosen response (the paper: 0.2; 0 turns it off)."""
    mask_formatting: bool = True
    """Mask formatting tokens out of the DPO log-probabilities of chosen and rejected."""
    mask_formatting_in_nll: bool = False
    """Also mask formatting tokens out of the NLL term (off: the model keeps learning to stop)."""
    max_context_tokens: Tokens | None = None
    """Drop pairs whose prompt + longer response exceeds this many tokens (the paper's DPO
    sees short-context data only, 4.3.4); None keeps every pair that fits max_length."""
    latest_batch_only: bool = True
    """Pairs from the latest round's preference batch only (the paper); False: every batch so far."""
    pairs_from_preferences: bool = True
    """Build pairs from the preference files (filtered by `keep_strengths`, `keep_unlabelled`,
    `use_edited`: posttrain.preferences)."""
    on_policy_pairs: bool = False
    """Add on-policy pairs from the `sample` stage: the reward's best vs worst of the K samples."""
    min_score_gap: float = Field(0.0, ge=0)
    """On-policy pairs need score(best) - score(worst) above this gap (strictly; ties never make a pair)."""
    on_policy_require_finished: bool = True
    """Drop on-policy pairs whose best response never reached an end-of-turn token."""
    precompute_ref: bool = True
    """Compute reference log-probs once (cached on disk) instead of running a live reference model."""
    ref_batch_size: BatchSize | None = None
    """Batch size for the reference pass (default: batch_size)."""
    packed: bool = True
    """Chosen and rejected in one row after one shared prompt, under a block attention mask
    (`pack_pairs`), for the policy and the reference pass; the same log-probs as separate rows with
    the prompt computed once. Needs attention 'sdpa' or 'eager': with any other implementation the
    stage falls back to separate rows and says so in its log and metrics. False: separate rows."""

    @model_validator(mode="after")
    def _check(self):
        if not (self.pairs_from_preferences or self.on_policy_pairs):
            raise ValueError("pairs_from_preferences and on_policy_pairs are both off: DPO would have no data")
        return self


# ----------------------------------------------------------------------------------------------
# Math (pure functions). Shapes: B pairs, T = sequence length - 1 (next-token positions).


def masked_logp_sum(per_token_logps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """log pi(y | x) restricted to masked tokens: sum_t mask[b, t] * logp[b, t].

    per_token_logps: (N, T) log-prob of each next-token label; mask: (N, T) 0/1. Returns (N,).
    """
    return (per_token_logps * mask.to(per_token_logps.dtype)).sum(dim=1)


def dpo_sigmoid_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor,
                     ref_chosen: torch.Tensor, ref_rejected: torch.Tensor, beta: float) -> torch.Tensor:
    """Per-pair DPO loss (Rafailov et al. 2023, eq. 7).

        L = -log sigma(beta * [(log pi(y_c|x) - log ref(y_c|x)) - (log pi(y_r|x) - log ref(y_r|x))])

    All inputs (B,) sequence log-prob sums; returns (B,).
    """
    margin = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)
    return -F.logsigmoid(beta * margin)


def token_mean_nll(per_token_logps: torch.Tensor, mask: torch.Tensor, global_tokens: torch.Tensor | None = None,
                   world_size: int = 1) -> torch.Tensor:
    """Token-mean cross-entropy over the masked tokens of a batch: -sum(mask * logp) / sum(mask).

    per_token_logps: (B, T); mask: (B, T) 0/1. Returns a scalar (0 when nothing is masked in).
    Matches TRL's "sft" loss term (mean over all chosen tokens of the batch, not per sequence).

    Over W data-parallel ranks the batch is split, and DDP/FSDP average the ranks' gradients.
    The mean over the whole batch's tokens is then, with N = sum(mask) over every rank
    (`global_tokens`, an all-reduce) and `world_size` W, this rank's share

        W * -sum(mask_r * logp_r) / N,   whose average over ranks is  -sum_r sum(mask_r * logp_r) / N.

    Each rank dividing by its own token count instead would weight a token of a rank with few
    tokens more than one of a rank with many.
    """
    mask = mask.to(per_token_logps.dtype)
    total = mask.sum() if global_tokens is None else global_tokens.to(per_token_logps.dtype)
    return -(per_token_logps * mask).sum() * world_size / total.clamp(min=1.0)


def counted_pairs(dpo_mask: torch.Tensor) -> torch.Tensor:
    """(B,) 1.0 for each pair of a (2B, T) batch that has DPO tokens, 0.0 for a zero-weight row."""
    return (dpo_mask.chunk(2, dim=0)[0].sum(dim=-1) > 0).float()


def dpo_objective(per_token_logps: torch.Tensor, dpo_mask: torch.Tensor, nll_mask: torch.Tensor, ref_chosen: torch.Tensor, ref_rejected: torch.Tensor,
                  beta: float, nll_coef: float, dpo_weight: float = 1.0, nll_global_tokens: torch.Tensor | None = None,
                  world_size: int = 1, global_pairs: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """The stage's loss: dpo_weight * mean DPO loss under `dpo_mask` + nll_coef * NLL of chosen under `nll_mask`.

    per_token_logps: (2B, T), rows [chosen_1..chosen_B, rejected_1..rejected_B], zero outside the
    response tokens; dpo_mask, nll_mask: (2B, T) 0/1 subsets of the response tokens (only the
    chosen half of nll_mask is used); ref_chosen, ref_rejected: (B,) reference sums under dpo_mask.
    Under data parallelism, `nll_global_tokens` (the chosen NLL tokens of every rank) and
    `world_size` make the NLL a mean over the global batch (see `token_mean_nll`); the DPO term
    is a mean over pairs: with `global_pairs` (the pairs of every rank that have DPO tokens; a
    zero-weight row has none) it is W * sum_r / global_pairs in the same way.
    """
    logps = masked_logp_sum(per_token_logps, dpo_mask)  # (2B,)
    chosen, rejected = logps.chunk(2, dim=0)
    dpo = dpo_sigmoid_loss(chosen, rejected, ref_chosen, ref_rejected, beta)  # (B,)
    chosen_tok, _ = per_token_logps.chunk(2, dim=0)
    chosen_nll_mask, _ = nll_mask.chunk(2, dim=0)
    nll = token_mean_nll(chosen_tok, chosen_nll_mask, nll_global_tokens, world_size)
    if global_pairs is None:
        dpo_term = dpo.mean()
    else:
        dpo_term = ((dpo * counted_pairs(dpo_mask).to(dpo.dtype)).sum() * world_size
                    / global_pairs.to(dpo.dtype).clamp(min=1.0))
    loss = dpo_weight * dpo_term + (nll_coef * nll if nll_coef > 0 else 0.0)
    return {"loss": loss, "dpo": dpo_term, "nll": nll, "chosen_logps": chosen, "rejected_logps": rejected}


# ----------------------------------------------------------------------------------------------
# Pairs


@dataclass
class Pair:
    prompt: list[dict]
    chosen: str
    rejected: str
    source: str
    """"preferences" or "on_policy"."""
    origin: str
    """Where it came from ("file:row") for error messages."""


def preference_pairs(prefs, cfg: DPOStageConfig) -> tuple[list[Pair], Counter]:
    """DPO pairs from normalised preference rows: each row's widest kept pair (the edited or
    chosen response vs the rejected one; posttrain.preferences.rank), with a count per reason
    for every row."""
    pairs, counts = [], Counter()
    for p in prefs:
        ranking, drops = rank(p, cfg)
        if ranking is None:
            counts[f"preferences/dropped_{next(iter(drops))}"] += 1
            continue
        chosen, rejected = ranking.widest_pair()
        if cfg.use_edited and p.edited is not None and chosen == p.edited:
            counts["preferences/edited_as_chosen"] += 1
        counts["preferences/kept"] += 1
        pairs.append(Pair(p.prompt, chosen, rejected, "preferences", p.source))
    return pairs, counts


def on_policy_pairs(samples_dir: str | Path, cfg: DPOStageConfig) -> tuple[list[Pair], Counter]:
    """The reward's best vs worst of each prompt's K samples (posttrain.samples rows).

    A pair needs two scored, distinct responses with score(best) - score(worst) > min_score_gap.
    """
    from posttrain.preferences import same_response
    from posttrain.samples import iter_rows

    pairs, counts = [], Counter()
    for where, row in iter_rows(samples_dir):
        best, worst = row.best, row.worst
        if best is None or worst is None:
            counts["on_policy/dropped_no_best"] += 1
            continue
        s_best, s_worst = row.scores[best], row.scores[worst]
        if s_best is None or s_worst is None:
            counts["on_policy/dropped_unscored"] += 1
            continue
        if best == worst or same_response(row.responses[best], row.responses[worst]):
            counts["on_policy/dropped_identical"] += 1
            continue
        if not s_best - s_worst > cfg.min_score_gap:
            counts["on_policy/dropped_small_gap"] += 1
            continue
        if cfg.on_policy_require_finished and not row.finished[best]:
            counts["on_policy/dropped_unfinished_best"] += 1
            continue
        counts["on_policy/kept"] += 1
        pairs.append(Pair(row.prompt, row.responses[best], row.responses[worst], "on_policy", where))
    return pairs, counts


def encode_pair(tokenizer, pair: Pair, max_length: int, mask_formatting: bool,
                formatting_tokens: list[str] | None = None) -> dict | None:
    """Token ids and masks of one pair, or None when the prompt leaves no room within max_length.

    Returns prompt_ids, chosen_ids, rejected_ids and, per side, `*_loss_mask` (response tokens,
    formatting included: the NLL term's targets) and `*_dpo_mask` (response tokens minus
    formatting tokens when `mask_formatting`: the DPO term's); `truncated` when max_length
    cut a response (`encode_pairs` counts and removes it).
    """
    from posttrain import chat

    row = {}
    prompt_ids = None
    truncated = False
    for side, text in (("chosen", pair.chosen), ("rejected", pair.rejected)):
        try:
            enc = chat.encode_example(tokenizer, pair.prompt, text, max_length,
                                      formatting_tokens=formatting_tokens)
        except chat.PromptTooLong:
            return None
        truncated = truncated or enc.truncated
        n_prompt = enc.prompt_length
        ids = list(enc.input_ids)
        if prompt_ids is None:
            prompt_ids = ids[:n_prompt]
        elif ids[:n_prompt] != prompt_ids:
            raise ValueError(f"{pair.origin}: chosen and rejected encode the prompt differently")
        loss_mask = [int(m) for m in enc.response_mask[n_prompt:]]
        fmt = [int(m) for m in enc.formatting_mask[n_prompt:]]
        if not any(loss_mask):
            return None
        row[f"{side}_ids"] = ids[n_prompt:]
        row[f"{side}_loss_mask"] = loss_mask
        row[f"{side}_dpo_mask"] = [m * (1 - f) if mask_formatting else m for m, f in zip(loss_mask, fmt)]
    row["prompt_ids"] = prompt_ids
    if not any(row["chosen_dpo_mask"]) or not any(row["rejected_dpo_mask"]):
        return None
    row["uid"] = pair_uid(row)
    row["truncated"] = truncated
    return row


def pair_uid(row: dict) -> str:
    """Hash of everything a reference log-prob sum depends on: the tokens and the DPO mask."""
    keys = ("prompt_ids", "chosen_ids", "rejected_ids", "chosen_dpo_mask", "rejected_dpo_mask")
    return files.hash_json({k: row[k] for k in keys})


def _without_targets(row: dict) -> dict:
    """A pair at weight 0 (a rank's empty slot in the last step, see distributed.ZeroWeight): no
    DPO token, no NLL token."""
    masks = ("chosen_loss_mask", "rejected_loss_mask", "chosen_dpo_mask", "rejected_dpo_mask")
    return {**row, **{k: [0] * len(row[k]) for k in masks}}


@dataclass
class PairCollator:
    """Pads tokenized pairs into one batch of 2B rows: [chosen_1..chosen_B, rejected_1..rejected_B].

    Emits input_ids, attention_mask, completion_mask (response tokens: the NLL term's targets),
    dpo_mask (the DPO term's tokens) and the reference sums when the rows carry them. Right padding.
    """

    pad_token_id: int

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        seqs, attn, comp, dpo = [], [], [], []
        for side in ("chosen", "rejected"):
            for ex in examples:
                n = len(ex["prompt_ids"])
                seqs.append(list(ex["prompt_ids"]) + list(ex[f"{side}_ids"]))
                attn.append([1] * len(seqs[-1]))
                comp.append([0] * n + list(ex[f"{side}_loss_mask"]))
                dpo.append([0] * n + list(ex[f"{side}_dpo_mask"]))
        width = max(len(s) for s in seqs)

        def padded(rows, value):
            return torch.tensor([r + [value] * (width - len(r)) for r in rows], dtype=torch.long)

        out = {"input_ids": padded(seqs, self.pad_token_id), "attention_mask": padded(attn, 0),
               "completion_mask": padded(comp, 0), "dpo_mask": padded(dpo, 0)}
        if "ref_chosen_logps" in examples[0]:
            out["ref_chosen_logps"] = torch.tensor([float(ex["ref_chosen_logps"]) for ex in examples])
            out["ref_rejected_logps"] = torch.tensor([float(ex["ref_rejected_logps"]) for ex in examples])
        return out


def pack_pairs(examples: list[dict], pad_token_id: int) -> dict[str, torch.Tensor]:
    """B pairs as B packed rows: the prompt once, then chosen, then rejected (posttrain.packing).

    A row is `prompt[:-1] | prompt[-1] chosen | prompt[-1] rejected`: the prompt's last token opens
    each response's segment (one duplicated token per response), so the log-prob of every response
    token, its first included, is a next-token prediction inside its own segment. Segment 0 (the
    rest of the prompt) is visible to both responses; each response segment's position ids start
    at P - 1, where that token sits in a row of its own, so every log-prob equals the separate row's.

    Returns input_ids, position_ids, segment_ids, shift_labels [B, L] (shift_labels[b, t] = the
    token predicted at t, -100 where nothing is scored) and, aligned with those prediction
    positions, completion_targets and dpo_targets [2B, L] (rows chosen_1..chosen_B,
    rejected_1..rejected_B, as PairCollator's rows): the NLL term's and the DPO term's tokens.
    """
    B = len(examples)
    L = max(len(ex["prompt_ids"]) + len(ex["chosen_ids"]) + len(ex["rejected_ids"]) + 1 for ex in examples)
    input_ids = torch.full((B, L), pad_token_id, dtype=torch.long)
    position_ids = torch.zeros((B, L), dtype=torch.long)
    segment_ids = torch.full((B, L), -1, dtype=torch.long)
    shift_labels = torch.full((B, L), -100, dtype=torch.long)
    completion = torch.zeros((2 * B, L), dtype=torch.long)
    dpo_targets = torch.zeros((2 * B, L), dtype=torch.long)
    for b, ex in enumerate(examples):
        prompt = list(ex["prompt_ids"])
        P = len(prompt)
        if P == 0:
            raise ValueError("pack_pairs: a pair with an empty prompt cannot be packed")
        input_ids[b, :P - 1] = torch.tensor(prompt[:-1], dtype=torch.long)
        position_ids[b, :P - 1] = torch.arange(P - 1)
        segment_ids[b, :P - 1] = 0
        start = P - 1
        for k, side in enumerate(("chosen", "rejected")):
            resp = list(ex[f"{side}_ids"])
            n = len(resp)
            seg = slice(start, start + n + 1)
            input_ids[b, seg] = torch.tensor([prompt[-1]] + resp, dtype=torch.long)
            position_ids[b, seg] = torch.arange(P - 1, P + n)
            segment_ids[b, seg] = k + 1
            pred = slice(start, start + n)  # the positions that predict resp[0..n-1]
            shift_labels[b, pred] = torch.tensor(resp, dtype=torch.long)
            completion[k * B + b, pred] = torch.tensor(list(ex[f"{side}_loss_mask"]), dtype=torch.long)
            dpo_targets[k * B + b, pred] = torch.tensor(list(ex[f"{side}_dpo_mask"]), dtype=torch.long)
            start += n + 1
    return {"input_ids": input_ids, "position_ids": position_ids, "segment_ids": segment_ids,
            "shift_labels": shift_labels, "completion_targets": completion, "dpo_targets": dpo_targets}


@dataclass
class PackedPairCollator:
    """Pads tokenized pairs into B packed rows (`pack_pairs`), with the reference sums when the rows carry them.

    The trainer recognises a packed batch by its `segment_ids` and builds the block attention mask
    on the model's device, in the form its attention implementation takes.
    """

    pad_token_id: int

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        out = pack_pairs(examples, self.pad_token_id)
        if "ref_chosen_logps" in examples[0]:
            out["ref_chosen_logps"] = torch.tensor([float(ex["ref_chosen_logps"]) for ex in examples])
            out["ref_rejected_logps"] = torch.tensor([float(ex["ref_rejected_logps"]) for ex in examples])
        return out


# ----------------------------------------------------------------------------------------------
# Reference log-prob cache


def ref_cache_key(model_hash: str, dtype: str, mask_formatting: bool, formatting_ids) -> str:
    """File key of a reference cache: the model's content, its dtype and the masking rule."""
    return files.hash_json({"version": REF_CACHE_VERSION, "model": model_hash, "dtype": dtype,
                            "mask_formatting": mask_formatting,
                            "formatting_ids": sorted(int(i) for i in formatting_ids)})


class RefLogpCache:
    """Reference log-prob sums on disk: {pair uid: [chosen, rejected]} in `<dir>/<key>.json`.

    The file key covers model, dtype and masking; each row's uid covers its tokens and DPO mask.
    Written atomically; a process that finds the file reuses every row it holds.
    """

    def __init__(self, cache_dir: str | Path, key: str):
        self.path = Path(cache_dir) / f"ref_logps-{key[:32]}.json"
        self.key = key
        self.rows: dict[str, list[float]] = {}
        if self.path.exists():
            data = files.read_json(self.path)
            if data.get("key") != key:
                raise ValueError(f"{self.path}: cache key {data.get('key')!r} does not match {key!r}")
            self.rows = data["rows"]
        self.hits = 0
        self.computed = 0

    def missing(self, uids: list[str]) -> list[int]:
        return [i for i, u in enumerate(uids) if u not in self.rows]

    def add(self, uids: list[str], chosen: list[float], rejected: list[float]) -> None:
        for u, c, r in zip(uids, chosen, rejected, strict=True):
            self.rows[u] = [float(c), float(r)]
        self.computed += len(uids)

    def save(self) -> None:
        files.atomic_write_json(self.path, {"key": self.key, "rows": self.rows})


# ----------------------------------------------------------------------------------------------
# Trainer

_TRAINER_CLASS = None


def masked_dpo_trainer_class():
    """trl.DPOTrainer with separate DPO / NLL masks, packed rows and an on-disk reference cache (built lazily).

    Built on posttrain.trl_compat.dpo_trainer_base, which holds every override of TRL's private
    methods (and checks them against the tested TRL version); this class implements its public hooks.
    """
    global _TRAINER_CLASS
    if _TRAINER_CLASS is not None:
        return _TRAINER_CLASS
    from torch.utils.data import DataLoader

    from posttrain.trl_compat import dpo_trainer_base

    class MaskedDPOTrainer(dpo_trainer_base()):
        """DPOTrainer whose loss takes the DPO term over the DPO mask and the NLL term over the
        completion mask (or the DPO mask when `mask_formatting_in_nll`), on separate rows
        (PairCollator) or packed ones (PackedPairCollator), with reference log-probs from our
        cache. Only the loss types ["sigmoid"] and ["sigmoid", "sft"] are supported, with TRL's meaning.
        """

        signature_columns = ("prompt_ids", "chosen_ids", "rejected_ids", "chosen_loss_mask", "rejected_loss_mask",
                             "chosen_dpo_mask", "rejected_dpo_mask", "ref_chosen_logps", "ref_rejected_logps")

        def __init__(self, *args, ref_cache: RefLogpCache | None = None, mask_formatting_in_nll: bool = False,
                     **kwargs):
            self._ref_cache = ref_cache
            self._mask_formatting_in_nll = mask_formatting_in_nll
            targs = kwargs["args"]
            if list(targs.loss_type) not in (["sigmoid"], ["sigmoid", "sft"]):
                raise ValueError(f"MaskedDPOTrainer supports loss_type ['sigmoid'] or ['sigmoid', 'sft'], "
                                 f"got {targs.loss_type}")
            if targs.precompute_ref_log_probs and ref_cache is None:
                raise ValueError("precompute_ref_log_probs needs a ref_cache")
            super().__init__(*args, **kwargs)

        def _per_token_logps(self, model, inputs):
            labels = inputs["input_ids"].masked_fill(inputs["completion_mask"] == 0, -100)
            out = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], labels=labels,
                        fused_lm_head=True, use_cache=False)
            t = inputs["completion_mask"].size(1) - 1
            return out.log_probs[:, -t:], out  # (2B, T), zero where the label is -100

        def _packed_per_token_logps(self, model, inputs):
            """Log-probs of packed rows (`pack_pairs`): [B, L] at the prediction positions, zero elsewhere."""
            param = next(model.parameters())
            visible = block_attention_mask(inputs["segment_ids"].to(param.device))
            mask = model_attention_mask(visible, model, param.dtype)
            out = model(input_ids=inputs["input_ids"], attention_mask=mask, position_ids=inputs["position_ids"],
                        shift_labels=inputs["shift_labels"], fused_lm_head=True, use_cache=False)
            return out.log_probs  # [B, L]

        def _response_logps(self, model, inputs):
            """(per-token log-probs, NLL-term mask, DPO-term mask), each [2B, T], rows chosen_1..chosen_B,
            rejected_1..rejected_B, for either batch layout (PairCollator's or PackedPairCollator's)."""
            if "segment_ids" in inputs:
                per_row = self._packed_per_token_logps(model, inputs)  # [B, L]: both responses in one row
                return (torch.cat([per_row, per_row], dim=0), inputs["completion_targets"],
                        inputs["dpo_targets"])
            per_tok, _ = self._per_token_logps(model, inputs)
            return per_tok, inputs["completion_mask"][:, 1:], inputs["dpo_mask"][:, 1:]

        def compute_ref_log_probs(self, model, inputs):
            with self.reference_context():
                ref_tok, _, dpo_mask = self._response_logps(model, inputs)
            return masked_logp_sum(ref_tok, dpo_mask).chunk(2, dim=0)

        def precompute_reference(self, dataset, batch_size):
            cache = self._ref_cache
            uids = dataset["uid"]
            missing = cache.missing(uids)
            cache.hits += len(uids) - len(missing)
            if missing:
                todo = dataset.select(missing)
                loader = self.accelerator.prepare(DataLoader(todo, batch_size=batch_size,
                                                             collate_fn=self.data_collator, shuffle=False))
                model = self.reference_model_for_precompute()
                chosen, rejected = [], []
                for batch in loader:
                    c, r = self.compute_ref_log_probs(model, batch)
                    c, r = self.accelerator.gather_for_metrics((c, r))
                    chosen.append(c.float().cpu())
                    rejected.append(r.float().cpu())
                cache.add([uids[i] for i in missing], torch.cat(chosen).tolist(), torch.cat(rejected).tolist())
                if self.accelerator.is_main_process:
                    cache.save()
                self.accelerator.wait_for_everyone()
            ref = [cache.rows[u] for u in uids]
            dataset = dataset.add_column("ref_chosen_logps", [r[0] for r in ref])
            return dataset.add_column("ref_rejected_logps", [r[1] for r in ref])

        def get_train_dataloader(self):
            return distributed.exact_train_dataloader(super().get_train_dataloader(), self.accelerator.num_processes,
                                                      _without_targets)

        def loss(self, model, inputs):
            per_tok, completion, dpo_mask = self._response_logps(model, inputs)
            nll_mask = dpo_mask if self._mask_formatting_in_nll else completion
            if self.uses_precomputed_reference:
                ref_c, ref_r = inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]
            else:
                ref_c, ref_r = self.compute_ref_log_probs(self.ref_model or self.model, inputs)
            nll_coef = self.loss_weights[1] if len(self.loss_types) == 2 else 0.0
            chosen_nll_mask, _ = nll_mask.chunk(2, dim=0)
            world = self.accelerator.num_processes
            global_tokens = global_pairs = None
            counted = counted_pairs(dpo_mask)
            if world > 1:  # the ranks' shares of the global batch's means
                global_tokens = self.accelerator.reduce(chosen_nll_mask.sum().float(), "sum")
                global_pairs = self.accelerator.reduce(counted.sum(), "sum")
            res = dpo_objective(per_tok, dpo_mask, nll_mask, ref_c, ref_r, beta=self.beta,
                                nll_coef=nll_coef, dpo_weight=self.loss_weights[0],
                                nll_global_tokens=global_tokens, world_size=world, global_pairs=global_pairs)
            loss = res["loss"]
            chosen_rewards = self.beta * (res["chosen_logps"] - ref_c).detach()
            rejected_rewards = self.beta * (res["rejected_logps"] - ref_r).detach()

            def mean(x):
                if world == 1 or x.dim() == 0:  # a scalar is already this rank's share of the global mean
                    return self.accelerator.gather(x).mean().item()
                # per pair: the ranks may hold different numbers of pairs (the last step)
                total = self.accelerator.reduce((x.float() * counted).sum(), "sum")
                return (total / global_pairs.clamp(min=1.0)).item()

            self.record_metric("rewards/chosen", mean(chosen_rewards))
            self.record_metric("rewards/rejected", mean(rejected_rewards))
            self.record_metric("rewards/accuracies", mean((chosen_rewards > rejected_rewards).float()))
            self.record_metric("rewards/margins", mean(chosen_rewards - rejected_rewards))
            self.record_metric("logps/chosen", mean(res["chosen_logps"].detach()))
            self.record_metric("logps/rejected", mean(res["rejected_logps"].detach()))
            self.record_metric("nll", mean(res["nll"].detach()))  # the global token mean (see token_mean_nll)
            self.record_metric("dpo_loss", mean(res["dpo"].detach()))
            return loss

    _TRAINER_CLASS = MaskedDPOTrainer
    return MaskedDPOTrainer


# ----------------------------------------------------------------------------------------------
# The stage


def build_pairs(cfg: DPOStageConfig, preference_files: list, samples_dir) -> tuple[list[Pair], dict]:
    from posttrain import data

    pairs, counts = [], Counter()
    if cfg.pairs_from_preferences and preference_files:
        prefs = data.load_preferences([str(p) for p in preference_files])
        counts["preferences/read"] += len(prefs)
        got, c = preference_pairs(prefs, cfg)
        pairs += got
        counts.update(c)
    if cfg.on_policy_pairs:
        if samples_dir is None:
            raise ValueError("dpo: on_policy_pairs is on but the stage got no `samples` input")
        got, c = on_policy_pairs(samples_dir, cfg)
        pairs += got
        counts.update(c)
    return pairs, dict(sorted(counts.items()))


def screen_pairs(inputs, pairs: list[Pair]) -> tuple[list[Pair], dict[str, int]]:
    """DPO pairs checked for eval prompts (posttrain.decontam): the prompt's user turns and both
    responses (an edited response is the chosen one here); per source file."""
    return decontam.screen(inputs, pairs, lambda p: [*decontam.user_texts(p.prompt), p.chosen, p.rejected],
                           lambda p: decontam.source_file(p.origin), "dpo")


def encode_pairs(tokenizer, pairs: list[Pair], cfg: DPOStageConfig,
                 formatting_tokens: list[str] | None = None) -> tuple[list[dict], Counter]:
    rows, counts = [], Counter()
    for p in pairs:
        row = encode_pair(tokenizer, p, cfg.max_length, cfg.mask_formatting, formatting_tokens)
        if row is None:
            counts[f"{p.source}/dropped_too_long"] += 1
            continue
        if row.pop("truncated"):
            counts[f"{p.source}/truncated"] += 1
        row["source"] = p.source
        rows.append(row)
    return rows, counts



def _series(log_history: list[dict]) -> dict[str, Any]:
    """Per-logging-step series of the training metrics, plus first and last values."""
    out = {}
    for key in TRAINING_SERIES:
        vals = [h[key] for h in log_history if key in h and "train_runtime" not in h]
        if vals:
            out[key] = {"series": vals, "first": vals[0], "last": vals[-1]}
    return out


def use_packed_rows(cfg: DPOStageConfig, model) -> bool:
    """Whether this model trains on packed rows: `cfg.packed`, and its attention takes a block mask."""
    if not cfg.packed:
        return False
    if supports_block_mask(model):
        return True
    impl = getattr(model.config, "_attn_implementation", None)
    log.warning("dpo: packed: true, but attention %r takes no block mask ('sdpa' and 'eager' do); "
                "training on separate chosen/rejected rows instead", impl)
    return False


def train_variant(*, cfg: DPOStageConfig, variant, seed: int, sft_model: Path, tokenizer, rows: list[dict],
                  work_dir: Path, ref_cache: RefLogpCache | None, trust_remote_code: bool = False,
                  report_to="none", callbacks=()):
    """Train one DPO variant; resumes from the last complete checkpoint in `work_dir`.

    Returns (trainer, metrics). The trained model is `trainer.model` (LoRA not yet merged).
    """
    from datasets import Dataset
    from trl import DPOConfig

    from posttrain.modeling import load_causal_lm_for_training

    if variant.data_fraction is not None:
        n = max(1, round(len(rows) * variant.data_fraction))
        rows = random.Random(seed).sample(rows, n)
    dataset = Dataset.from_list([{k: v for k, v in r.items() if k != "source"} for r in rows])
    common = trainer_common_args(cfg, variant, output_dir=work_dir, seed=seed, report_to=report_to)
    args = DPOConfig(
        **common,
        beta=cfg.beta,
        loss_type=["sigmoid", "sft"] if cfg.nll_coef > 0 else ["sigmoid"],
        loss_weights=[1.0, cfg.nll_coef] if cfg.nll_coef > 0 else [1.0],
        precompute_ref_log_probs=cfg.precompute_ref,
        precompute_ref_batch_size=cfg.ref_batch_size or cfg.batch_size,
        max_length=None,  # encode_pair truncated already
    )
    # Loaded after the arguments and on the CPU: the trainer places the weights (ZeRO-3 partitions
    # them while loading, FSDP shards them), so no rank holds a whole model on its device first.
    model = load_causal_lm_for_training(sft_model, trust_remote_code=trust_remote_code)
    lora = peft_config(cfg.lora)
    ref_model = None
    if not cfg.precompute_ref and lora is None:
        ref_model = load_causal_lm_for_training(sft_model, trust_remote_code=trust_remote_code).eval()
    packed = use_packed_rows(cfg, model)
    collator = (PackedPairCollator if packed else PairCollator)(tokenizer.pad_token_id)
    trainer_cls = masked_dpo_trainer_class()
    trainer = trainer_cls(
        model=model, ref_model=ref_model, args=args, train_dataset=dataset, processing_class=tokenizer,
        data_collator=collator, peft_config=lora,
        callbacks=[*stage_callbacks(), *callbacks],
        ref_cache=ref_cache if cfg.precompute_ref else None,
        mask_formatting_in_nll=cfg.mask_formatting_in_nll,
    )
    # Precomputed reference log-probs were computed while the trainer was built, outside the loop;
    # a live reference runs a forward on every batch.
    throughput.attach(trainer, reference_params=0 if cfg.precompute_ref else throughput.live_reference_params(trainer))
    resume = last_complete_checkpoint(work_dir)
    trainer.train(resume_from_checkpoint=resume)
    metrics = {"pairs": len(rows), "steps": trainer.state.global_step, "packed": packed,
               "resumed_from": None if resume is None else Path(resume).name,
               **_series(trainer.state.log_history), "throughput": throughput.summary(trainer)}
    return trainer, metrics


def run(ctx: StageContext) -> StageResult:
    from posttrain import chat
    from posttrain.gather import save_final_model
    from posttrain.modeling import load_tokenizer

    cfg: DPOStageConfig = ctx.config
    sft_model = Path(ctx.inputs.sft_model)
    tokenizer = load_tokenizer(sft_model, trust_remote_code=ctx.trust_remote_code)
    fmt_ids = chat.formatting_token_ids(tokenizer, ctx.formatting_tokens)

    pairs, counts = build_pairs(cfg, ctx.inputs.preference_files, ctx.inputs.samples)
    pairs_read = len(pairs) + sum(v for k, v in counts.items() if "/dropped_" in k)
    n_built = len(pairs)
    pairs, contaminated = screen_pairs(ctx.inputs, pairs)
    long_dropped: dict[str, int] = {}
    rows, enc_counts = encode_pairs(tokenizer, pairs, cfg, ctx.formatting_tokens)
    for k, v in enc_counts.items():
        counts[k] = counts.get(k, 0) + v
    if cfg.max_context_tokens is not None:
        from posttrain.datamix import drop_long_examples

        lengths = [len(r["prompt_ids"]) + max(len(r["chosen_ids"]), len(r["rejected_ids"])) for r in rows]
        rows, long_counts = drop_long_examples(rows, lengths, long_threshold_tokens=cfg.max_context_tokens)
        long_dropped = long_counts.summary()["dropped_by_reason"]
        for reason, n in long_dropped.items():
            counts[reason] = counts.get(reason, 0) + n
    if not rows:
        raise ValueError(f"dpo: no training pairs left (counts: {counts})")
    by_source = dict(Counter(r["source"] for r in rows))

    ref_cache = None
    if cfg.precompute_ref:
        import torch

        from posttrain.training import mixed_bf16

        key = ref_cache_key(files.hash_path(sft_model), str(torch.bfloat16 if mixed_bf16(cfg) else torch.float32),
                            cfg.mask_formatting, fmt_ids)
        ref_cache = RefLogpCache(ctx.out_dir / WORK / "ref_cache", key)

    def train_one(run: VariantRun) -> dict:
        trainer, metrics = train_variant(
            cfg=cfg, variant=run.variant, seed=run.seed, sft_model=sft_model, tokenizer=tokenizer, rows=rows,
            work_dir=run.work_dir, ref_cache=ref_cache, trust_remote_code=ctx.trust_remote_code,
            report_to=ctx.report_to, callbacks=ctx.callbacks,
        )
        # Collective: the weights are gathered, LoRA merged, rank 0 writes and every rank waits.
        save_final_model(trainer, tokenizer, run.model_dir)
        return metrics

    runs = train_variants(ctx.out_dir, cfg, ctx.seed, train_one, keep_checkpoints=ctx.keep_checkpoints)
    per_variant = {r.name: r.metrics for r in runs}
    outputs = [r.model_dir.relative_to(ctx.run_dir).as_posix() for r in runs]

    result_metrics = {
        "pair_counts": counts,
        "contaminated": contaminated,
        "pairs_by_source": by_source,
        "pairs": len(rows),
        "ref_cache": None if ref_cache is None else {"file": str(ref_cache.path), "hits": ref_cache.hits,
                                                     "computed": ref_cache.computed},
        "variants": per_variant,
        "throughput": throughput.combine([v.get("throughput") for v in per_variant.values()]),
        **data_counts("pairs", read=pairs_read, truncated=sum(v for k, v in counts.items() if k.endswith("/truncated")),
                      dropped={**{k.replace("/dropped_", "/"): v for k, v in counts.items() if "/dropped_" in k},
                               **long_dropped, "contaminated": n_built - len(pairs)},
                      trained_by_variant={k: v.get("pairs") for k, v in per_variant.items()}),
    }
    return StageResult(outputs={"variants": outputs}, metrics=result_metrics)


# ----------------------------------------------------------------------------- the stage


@dataclass
class DPOInputs:
    sft_model: str = path_field()
    """This round's SFT model: the policy's start and the reference."""
    preference_files: list[str] = path_field(default_factory=list)
    """The latest preference batch (`dpo.latest_batch_only`), else every batch so far."""
    samples: str | None = path_field(default=None)
    """This round's sample shards (on-policy pairs, `dpo.on_policy_pairs`)."""
    decontaminate: dict | None = decontam.settings_field()
    eval_prompt_files: list[str] = decontam.files_field()


def _resolve(rnd) -> DPOInputs:
    r = rnd.recipe
    from posttrain.stages.curate import curated

    cleaned = curated(rnd, "preferences")  # this round's batch after curate.preferences
    return DPOInputs(sft_model=rnd.output("sft", "model"),
                     preference_files=[cleaned] if cleaned else rnd.preference_files(
                         only_latest=r.dpo.latest_batch_only),
                     samples=rnd.output("sample", "samples"), **decontam.resolve_inputs(rnd))


@dataclass(kw_only=True)
class DPOMetrics(TrainingMetrics):
    pairs: int | None
    variants: dict[str, dict] | None


def _headline(m: DPOMetrics) -> list[tuple[str, Any]]:
    # the last logged reward accuracy (the share of pairs whose implicit reward ranks chosen
    # first, mean over variants); pairs trained on
    return [("acc", variant_mean(m, "rewards/accuracies", "last")), ("pairs", m.pairs), *throughput.headline(m.raw)]


STAGE = StageDef(name="dpo", inputs=DPOInputs, resolve=_resolve, headline=_headline, model_outputs=("variants",),
                 launcher=True, metrics=DPOMetrics, data_row=training_data_row,
                 legend="acc: share of pairs whose implicit reward ranks chosen first")

"""Stage 1, `rm`: train a reward model on top of the pre-trained checkpoint.

The reward model is a sequence classifier with one output. Its loss is Bradley-Terry
(Llama 3 report, section 4.1.2), without the Llama 2 margin unless a recipe asks for it:

    L = -log sigmoid(r(x, y_better) - r(x, y_worse) [- m(strength)])

A ranking holds 2 or 3 responses (edited > chosen > rejected) and every ordered pair of it is a
term. By default only pairs labelled `significantly_better` or `better` are kept.

Two ways to train, chosen by `RMConfig.packing`:

- packed (default, the paper's): one row per ranking, `prompt | resp_a | resp_b | resp_c` with
  the responses in shuffled order. A block attention mask lets each response attend only to the
  prompt and to itself, and each response's position ids continue from the prompt's
  (P .. P+len-1), so every response is scored exactly as in a row of its own
  (`tests/test_rm.py` checks this to 1e-4 in fp32), while the prompt is computed once and the row
  holds about 3.6x fewer tokens than the 3 expanded pairs of a 3-way ranking.
- pairs: TRL's RewardTrainer on the expanded (chosen, rejected) pairs, the baseline.

Inputs: `RMInputs`. Output: `{"model": "round_NN/rm/model"}`.
"""

from __future__ import annotations

import gc
import random
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from pydantic import Field, field_validator, model_validator

from posttrain import decontam, distributed, gather, throughput, training
from posttrain.data import STRENGTHS
from posttrain.packing import block_attention_mask, model_attention_mask
from posttrain.preferences import PreferenceFilter, Ranking, keep_paired, rank
from posttrain.schema import BatchSize, Tokens
from posttrain.stage import Metrics, StageContext, StageDef, StageResult, path_field
from posttrain.stats import mean, pearson


# Llama 2 report, table 28 ("margin small"): the margin grows with the annotated strength.
LLAMA2_MARGINS = {"significantly_better": 1.0, "better": 2.0 / 3.0, "slightly_better": 1.0 / 3.0,
                  "marginally_better": 0.0}


class RMConfig(training.TrainingSettings, PreferenceFilter):
    """The `rm` stage: reward model training (Bradley-Terry on ranked responses)."""

    cumulative: bool = True
    """Train on every preference batch up to this round (the paper); False: the round's batch only."""
    packing: bool = True
    """One row per ranking (prompt once, responses under a block mask: the paper's way); False
    trains TRL's RewardTrainer on expanded (chosen, rejected) pairs (the baseline)."""
    edited_strength: str | None = None
    """Strength given to pairs involving the edited response; None: the row's own strength."""
    margin: bool = False
    """Add the Llama 2 margin m(strength) inside the sigmoid (an ablation; the Llama 3 recipe has none)."""
    margins: dict[str, float] = Field(default_factory=lambda: dict(LLAMA2_MARGINS))
    """Margin per strength, used only when `margin` is on (unlabelled pairs get 0)."""
    max_length: Tokens = 2048
    """Longest prompt + response in tokens; pairs with a longer response are dropped and counted
    (a packed row may be longer: it holds the prompt once plus all kept responses)."""
    eval_batch_size: BatchSize = 16
    """Rankings per forward pass when scoring held-out data."""
    heldout_fraction: float = Field(0.05, ge=0, lt=1)
    """Share of training rankings held out (seeded) when no held-out files are given."""
    min_heldout_accuracy: float = Field(0.55, ge=0, le=1)
    """Stop the round after `rm` when the reward model's held-out accuracy is below this (chance
    is 0.5): a reward model that cannot rank held-out pairs would only rank samples by noise or
    length. 0 turns the check off. With no held-out pairs there is nothing to check."""

    @field_validator("edited_strength")
    @classmethod
    def _known_edited_strength(cls, v: str | None) -> str | None:
        if v is not None and v not in STRENGTHS:
            raise ValueError(f"unknown strength {v!r}; known: {list(STRENGTHS)}")
        return v

    @model_validator(mode="after")
    def _margins_cover_kept(self):
        if self.margin:
            missing = [s for s in self.keep_strengths if s not in self.margins]
            if missing:
                raise ValueError(f"margin is on but `margins` has no value for {missing}")
        return self


# ----------------------------------------------------------------------------- rankings, pairs


def expand_rankings(prefs: list, cfg: RMConfig, all_pairs: bool = False) -> tuple[list[Ranking], Counter]:
    """Every row's kept pairs (posttrain.preferences.rank), and dropped pairs by reason."""
    rankings, drops = [], Counter()
    for p in prefs:
        r, d = rank(p, cfg, edited_strength=cfg.edited_strength, all_pairs=all_pairs)
        drops.update(d)
        if r is not None:
            rankings.append(r)
    return rankings, drops


def pair_margins(strengths: list[str | None], margins: dict[str, float] | None) -> list[float] | None:
    """m(strength) per pair, or None when the margin is off."""
    if margins is None:
        return None
    return [float(margins.get(s, 0.0)) if s is not None else 0.0 for s in strengths]


# ----------------------------------------------------------------------------- the loss


def bradley_terry_loss(better: torch.Tensor, worse: torch.Tensor, margin: torch.Tensor | None = None,
                       global_pairs: torch.Tensor | None = None, world_size: int = 1) -> torch.Tensor:
    """Bradley-Terry loss over P pairs, mean-reduced.

        L = mean_p  -log sigmoid(r_better[p] - r_worse[p] - m[p])      (m = 0 without margin)

    better, worse: [P] scores; margin: [P] or None (Llama 2 margin; Llama 3 drops it). Returns a scalar.

    A packed batch holds 1 to 3 pairs per ranking, so W data-parallel ranks hold different
    numbers of pairs, and DDP averages their gradients. With `global_pairs` (P summed over the
    ranks) and `world_size` W, this rank returns W * sum_p(...) / P_global, whose average over
    the ranks is the mean over every pair of the global batch.
    """
    diff = better - worse  # [P]
    if margin is not None:
        diff = diff - margin.to(diff.dtype)
    losses = -torch.nn.functional.logsigmoid(diff)  # [P]
    if global_pairs is None:
        return losses.mean()
    return losses.sum() * world_size / global_pairs.to(losses.dtype).clamp(min=1.0)


# ----------------------------------------------------------------------------- tokens, packing


@dataclass
class EncodedRanking:
    prompt_ids: list[int]
    response_ids: list[list[int]]
    """Each response's tokens after the prompt (its end-of-turn token included)."""
    pairs: list[tuple[int, int]]
    strengths: list[str | None]
    source: str = ""


def split_prompt_response(input_ids: list[int], response_mask: list[int]) -> tuple[list[int], list[int]]:
    """(prompt part, response part) of one rendered example: the response starts at its first masked token."""
    try:
        start = response_mask.index(1)
    except ValueError as e:
        raise ValueError("encoded example has no response token") from e
    return list(input_ids[:start]), list(input_ids[start:])


def encode_ranking(tokenizer, ranking: Ranking, max_length: int) -> tuple[EncodedRanking | None, Counter]:
    """Tokenize a ranking with the chat template; drop pairs whose response makes a row longer
    than `max_length` (counted as `too_long`). The prompt must tokenize the same for every response."""
    from posttrain import chat

    drops: Counter = Counter()
    prompt_ids: list[int] | None = None
    responses: list[list[int]] = []
    for text in ranking.responses:
        enc = chat.encode_example(tokenizer, ranking.prompt, text, None)
        p, r = split_prompt_response(enc.input_ids, enc.response_mask)
        if prompt_ids is None:
            prompt_ids = p
        elif p != prompt_ids:
            raise ValueError(f"{ranking.source}: the prompt tokenizes differently with different responses; "
                             "the chat template must render the prompt as a prefix of prompt + response")
        responses.append(r)
    too_long = {k for k, r in enumerate(responses) if len(prompt_ids) + len(r) > max_length}
    pairs, strengths = [], []
    for (a, b), s in zip(ranking.pairs, ranking.strengths):
        if a in too_long or b in too_long:
            drops["too_long"] += 1
        else:
            pairs.append((a, b))
            strengths.append(s)
    if not pairs:
        return None, drops
    response_ids, pairs = keep_paired(responses, pairs)
    return EncodedRanking(prompt_ids=prompt_ids, response_ids=response_ids, pairs=pairs, strengths=strengths,
                          source=ranking.source), drops


def shuffle_responses(enc: EncodedRanking, rng: random.Random) -> EncodedRanking:
    """The same ranking with its responses in a random order (pairs re-indexed), so that the
    best response is not always first in the row."""
    order = list(range(len(enc.response_ids)))
    rng.shuffle(order)
    new_index = {old: new for new, old in enumerate(order)}
    return EncodedRanking(prompt_ids=enc.prompt_ids, response_ids=[enc.response_ids[k] for k in order],
                          pairs=[(new_index[a], new_index[b]) for a, b in enc.pairs],
                          strengths=list(enc.strengths), source=enc.source)


def pack_batch(items: list[EncodedRanking], pad_id: int, margins: dict[str, float] | None = None) -> dict:
    """Right-padded packed rows for a batch of rankings.

    Returns input_ids, position_ids, segment_ids [B, L]; last_index [B, N] (position of each
    response's last token, N = most responses in a row, -1 where a row has fewer); better, worse
    [P] (flat indices into a [B * N] score vector, one per kept pair); margin [P] when margins.
    """
    B = len(items)
    N = max(len(it.response_ids) for it in items)
    L = max(len(it.prompt_ids) + sum(len(r) for r in it.response_ids) for it in items)
    input_ids = torch.full((B, L), pad_id, dtype=torch.long)
    position_ids = torch.zeros((B, L), dtype=torch.long)
    segment_ids = torch.full((B, L), -1, dtype=torch.long)
    last_index = torch.full((B, N), -1, dtype=torch.long)
    better, worse, strengths = [], [], []
    for b, it in enumerate(items):
        P = len(it.prompt_ids)
        input_ids[b, :P] = torch.tensor(it.prompt_ids)
        position_ids[b, :P] = torch.arange(P)
        segment_ids[b, :P] = 0
        start = P
        for k, r in enumerate(it.response_ids):
            n = len(r)
            input_ids[b, start:start + n] = torch.tensor(r)
            position_ids[b, start:start + n] = torch.arange(P, P + n)  # as if right after the prompt
            segment_ids[b, start:start + n] = k + 1
            last_index[b, k] = start + n - 1
            start += n
        better += [b * N + i for i, _ in it.pairs]
        worse += [b * N + j for _, j in it.pairs]
        strengths += it.strengths
    out = dict(input_ids=input_ids, position_ids=position_ids, segment_ids=segment_ids, last_index=last_index,
               better=torch.tensor(better, dtype=torch.long), worse=torch.tensor(worse, dtype=torch.long))
    m = pair_margins(strengths, margins)
    if m is not None:
        out["margin"] = torch.tensor(m, dtype=torch.float32)
    return out


def _unwrapped(model):
    """The model inside a DistributedDataParallel wrapper (its config lives there)."""
    return getattr(model, "module", model)


def score_head(model):
    """The `score` head of a sequence classifier, seen through DDP and PEFT wrappers."""
    inner = _unwrapped(model)
    inner = inner.get_base_model() if hasattr(inner, "get_base_model") else inner
    head = getattr(inner, "score", None)
    if head is None:
        raise TypeError(f"{type(inner).__name__} is not a *ForSequenceClassification model with a `score` head")
    return head


def packed_scores(model, batch: dict) -> torch.Tensor:
    """Scores of every response in packed rows: [B, N] (entries where last_index < 0 are junk).

    The rows go through the model's own forward (through its DDP or FSDP2 wrapper when it has
    one): DDP synchronises gradients only for a forward it ran, and FSDP2 gathers sharded
    weights only around its root's forward. The classifier scores every position ([B, L, 1])
    before pooling at one token per row; a hook on its `score` head keeps those per-position
    scores, and each response's score is read at its last token.
    """
    param = next(model.parameters())
    device = param.device
    visible = block_attention_mask(batch["segment_ids"].to(device))
    mask = model_attention_mask(visible, model, param.dtype)
    per_position = []
    hook = score_head(model).register_forward_hook(lambda module, args, out: per_position.append(out))
    try:
        model(input_ids=batch["input_ids"].to(device), attention_mask=mask,
              position_ids=batch["position_ids"].to(device), use_cache=False)
    finally:
        hook.remove()
    (logits,) = per_position  # [B, L, 1]
    last = batch["last_index"].to(device).clamp(min=0)  # [B, N]
    rows = torch.arange(logits.shape[0], device=device)[:, None]  # [B, 1]
    return logits[rows, last].squeeze(-1).float()  # [B, N]


def packed_loss(model, batch: dict, global_pairs: torch.Tensor | None = None,
                world_size: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """(Bradley-Terry loss over every kept pair of the batch, scores [B, N]); under data
    parallelism a rank's share of the global pair mean (see bradley_terry_loss)."""
    scores = packed_scores(model, batch)
    flat = scores.reshape(-1)  # [B * N]
    better, worse = flat[batch["better"].to(flat.device)], flat[batch["worse"].to(flat.device)]
    margin = batch.get("margin")
    loss = bradley_terry_loss(better, worse, None if margin is None else margin.to(flat.device),
                              global_pairs=global_pairs, world_size=world_size)
    return loss, scores


# ----------------------------------------------------------------------------- held-out metrics


def heldout_metrics(scored: list[tuple[list[float], list[tuple[int, int]], list[str | None]]],
                    keep_strengths: list[str]) -> dict:
    """Pairwise accuracy and margins of a reward model on held-out rankings.

    scored: per ranking (scores of its responses, best first; its (better, worse) pairs; their
    strengths). A pair is right when r_better > r_worse (ties count as wrong).
    Returns accuracy and mean_margin over pairs of the kept strengths (and unlabelled ones),
    accuracy_all over every pair, accuracy per strength, and for rankings of 3 responses the
    full-order accuracy (r_0 > r_1 > r_2).
    """
    right_by: dict[str, list[int]] = {}
    kept_right, kept_margin, all_right = [], [], []
    full = []
    for scores, pairs, strengths in scored:
        for (a, b), s in zip(pairs, strengths):
            ok = int(scores[a] > scores[b])
            all_right.append(ok)
            right_by.setdefault(s or "unlabelled", []).append(ok)
            if s is None or s in keep_strengths:
                kept_right.append(ok)
                kept_margin.append(scores[a] - scores[b])
        if len(scores) == 3 and len(pairs) == 3:
            full.append(int(scores[0] > scores[1] > scores[2]))

    return {
        "accuracy": mean(kept_right),
        "mean_margin": mean(kept_margin),
        "accuracy_all": mean(all_right),
        "accuracy_by_strength": {s: mean(v) for s, v in sorted(right_by.items())},
        "pairs_by_strength": {s: len(v) for s, v in sorted(right_by.items())},
        "full_order_accuracy": mean(full),
        "full_order_rankings": len(full),
        "pairs": len(all_right),
    }


@torch.no_grad()
def score_encoded(model, items: list[EncodedRanking], pad_id: int, batch_size: int) -> list[list[float]]:
    """Score every response of every ranking with packed rows (equal to separate rows, see tests)."""
    was_training = model.training
    model.eval()
    out: list[list[float]] = []
    try:
        for i in range(0, len(items), batch_size):
            chunk = items[i:i + batch_size]
            scores = packed_scores(model, pack_batch(chunk, pad_id)).cpu()
            out += [scores[b, :len(it.response_ids)].tolist() for b, it in enumerate(chunk)]
    finally:
        model.train(was_training)
    return out


def evaluate_rankings(model, items: list[EncodedRanking], pad_id: int, cfg: RMConfig) -> dict:
    scores = score_encoded(model, items, pad_id, cfg.eval_batch_size)
    out = heldout_metrics([(s, it.pairs, it.strengths) for s, it in zip(scores, items)], cfg.keep_strengths)
    out.update(length_health([(s, [len(r) for r in it.response_ids], it.pairs, it.strengths)
                              for s, it in zip(scores, items)], cfg.keep_strengths))
    return out


def length_health(scored: list[tuple[list[float], list[int], list[tuple[int, int]], list[str | None]]],
                  keep_strengths: list[str]) -> dict:
    """How much a reward model's judgement follows response length, on held-out rankings.

    scored: per ranking (scores of its responses; their lengths in tokens; its (better, worse)
    pairs; their strengths). Pairs count as in `heldout_metrics`' accuracy (kept strengths and
    unlabelled ones); a pair is right when r_better > r_worse.
    Returns
      accuracy_chosen_shorter: accuracy on the pairs whose better response is the shorter one
        (an RM that ranks by length gets these wrong), over `pairs_chosen_shorter` pairs;
      prefers_longer: over pairs of unequal length, the share where the longer response scores
        higher (0.5: no length preference);
      score_length_correlation: Pearson correlation of score and length over every response
        (None with fewer than two responses or no spread).
    """
    shorter_right, longer_wins = [], []
    all_scores, all_lengths = [], []
    for scores, lengths, pairs, strengths in scored:
        all_scores += list(scores)
        all_lengths += list(lengths)
        for (a, b), s in zip(pairs, strengths):
            if s is not None and s not in keep_strengths:
                continue
            if lengths[a] < lengths[b]:
                shorter_right.append(int(scores[a] > scores[b]))
            if lengths[a] != lengths[b]:
                longer, shorter = (a, b) if lengths[a] > lengths[b] else (b, a)
                longer_wins.append(int(scores[longer] > scores[shorter]))

    return {
        "accuracy_chosen_shorter": mean(shorter_right),
        "pairs_chosen_shorter": len(shorter_right),
        "prefers_longer": mean(longer_wins),
        "score_length_correlation": pearson(all_scores, all_lengths),
    }


class RewardModelTooWeak(RuntimeError):
    """The reward model's held-out accuracy is below `rm.min_heldout_accuracy`."""


def check_heldout_accuracy(heldout: dict, min_accuracy: float) -> None:
    """Raise RewardModelTooWeak when held-out accuracy is below `min_accuracy` (0: never)."""
    acc = heldout.get("accuracy")
    if acc is None or min_accuracy <= 0 or acc >= min_accuracy:
        return
    hints = []
    if heldout.get("prefers_longer") is not None:
        hints.append(f"it scores the longer response higher in {heldout['prefers_longer']:.0%} of pairs")
    if heldout.get("accuracy_chosen_shorter") is not None:
        hints.append(f"its accuracy where the better response is shorter is {heldout['accuracy_chosen_shorter']:.3f}")
    if heldout.get("score_length_correlation") is not None:
        hints.append(f"score and length correlate {heldout['score_length_correlation']:.2f}")
    raise RewardModelTooWeak(
        f"the reward model's held-out accuracy is {acc:.3f} over {heldout.get('pairs')} pairs, below "
        f"rm.min_heldout_accuracy={min_accuracy} (chance is 0.5), so it would rank samples by noise"
        + (f" ({'; '.join(hints)})" if hints else "") + ". The round stops before sampling. "
        "Add preference data or check the held-out data and rm settings; or set rm.min_heldout_accuracy "
        "lower in the recipe to go on with this reward model (the same command then continues without "
        "training it again)."
    )


# ----------------------------------------------------------------------------- training


def split_heldout(items: list, fraction: float, seed: int) -> tuple[list, list]:
    """(train, held-out): a seeded share of `items`, at least one when fraction > 0 and 2+ items."""
    if fraction <= 0 or len(items) < 2:
        return list(items), []
    idx = list(range(len(items)))
    random.Random(seed).shuffle(idx)
    n = min(len(items) - 1, max(1, round(fraction * len(items))))
    held = set(idx[:n])
    return [x for i, x in enumerate(items) if i not in held], [x for i, x in enumerate(items) if i in held]


class _ListDataset(torch.utils.data.Dataset):
    def __init__(self, items):
        self.items = items

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def _without_pairs(item: EncodedRanking) -> EncodedRanking:
    """A ranking at weight 0 (a rank's empty slot in the last step): scored, no pair counts."""
    return EncodedRanking(prompt_ids=item.prompt_ids, response_ids=item.response_ids, pairs=[], strengths=[],
                          source=item.source)


def _packed_trainer_class():
    from transformers import Trainer

    class PackedRewardTrainer(Trainer):
        """A Trainer whose batches are packed rankings and whose loss is Bradley-Terry over all pairs.
        On W processes each optimizer step holds exactly one process's global batch
        (`distributed.exact_train_dataloader`), and the loss is the mean over its pairs."""

        def get_train_dataloader(self):
            return distributed.exact_train_dataloader(super().get_train_dataloader(), self.accelerator.num_processes,
                                                      _without_pairs)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            world = self.accelerator.num_processes
            pairs = None
            if world > 1:
                n = torch.tensor(float(inputs["better"].numel()), device=self.accelerator.device)
                pairs = self.accelerator.reduce(n, "sum")
            loss, scores = packed_loss(model, inputs, global_pairs=pairs, world_size=world)
            return (loss, {"scores": scores}) if return_outputs else loss

    return PackedRewardTrainer


def load_reward_model(path, *, trust_remote_code: bool = False, attn_implementation: str = "sdpa"):
    """A checkpoint as a fp32 sequence classifier with one output, on the CPU (the trainer
    places it): a fresh score head for a causal LM, the trained one for a saved RM."""
    from posttrain.modeling import load_sequence_classifier

    return load_sequence_classifier(path, dtype="float32", device="cpu", trust_remote_code=trust_remote_code,
                                    attn_implementation=attn_implementation)


def train_packed(model, tokenizer, items: list[EncodedRanking], cfg: RMConfig, variant: training.Variant, *,
                 work_dir: Path, seed: int, report_to="none", extra_args: dict | None = None, callbacks=()):
    """Train `model` on packed rankings; resumes from the last COMPLETE checkpoint in `work_dir`.

    `model` may be a function returning the model: it is then called once the trainer's
    arguments exist, so that under ZeRO-3 the weights are partitioned while loading instead of
    being loaded whole on every rank."""
    from transformers import TrainingArguments

    margins = cfg.margins if cfg.margin else None
    pad_id = tokenizer.pad_token_id
    args = TrainingArguments(**training.trainer_common_args(cfg, variant, output_dir=work_dir, seed=seed,
                                                            report_to=report_to),
                             remove_unused_columns=False, label_names=[], **(extra_args or {}))
    trainer = _packed_trainer_class()(
        model=model() if callable(model) and not isinstance(model, torch.nn.Module) else model, args=args, train_dataset=_ListDataset(items), processing_class=tokenizer,
        data_collator=lambda chunk: pack_batch(chunk, pad_id, margins),
        callbacks=[*training.stage_callbacks(), *callbacks],
    )
    throughput.attach(trainer)
    result = trainer.train(resume_from_checkpoint=training.last_complete_checkpoint(work_dir))
    return trainer, result


def pairs_rows(items: list[EncodedRanking], margins: dict[str, float] | None) -> list[dict]:
    """The expanded-pairs dataset for TRL's RewardTrainer, pre-tokenized exactly like the packed rows.

    A `margin` column exists only when the margin is on: TRL applies a margin whenever it sees one.
    """
    rows = []
    for it in items:
        m = pair_margins(it.strengths, margins)
        for p, (a, b) in enumerate(it.pairs):
            row = {"chosen_ids": it.prompt_ids + it.response_ids[a], "rejected_ids": it.prompt_ids + it.response_ids[b]}
            if m is not None:
                row["margin"] = m[p]
            rows.append(row)
    return rows


def train_pairs(model, tokenizer, items: list[EncodedRanking], cfg: RMConfig, variant: training.Variant, *,
                work_dir: Path, seed: int, report_to="none", extra_args: dict | None = None, callbacks=()):
    """Train `model` with TRL's RewardTrainer on expanded pairs (the baseline); resumable.
    `model` may be a function returning the model, called after the arguments (see train_packed)."""
    from datasets import Dataset
    from trl import RewardConfig, RewardTrainer

    pad_id = tokenizer.pad_token_id
    # The HF classifier reads the score at the last token that is not the pad token, so a pad id
    # that also ends responses (pad = eos = end-of-turn) would move the score one token left.
    for it in items:
        if any(r and r[-1] == pad_id for r in it.response_ids):
            raise ValueError(f"{it.source}: a response ends with the pad token id {pad_id}; the pairs path "
                             "(TRL RewardTrainer) would read its score at the wrong token. Give the tokenizer "
                             "a distinct pad token or use packing: true")
    margins = cfg.margins if cfg.margin else None
    args = RewardConfig(**training.trainer_common_args(cfg, variant, output_dir=work_dir, seed=seed,
                                                       report_to=report_to),
                        max_length=None, center_rewards_coefficient=None, **(extra_args or {}))
    if callable(model) and not isinstance(model, torch.nn.Module):
        model = model()
    trainer = RewardTrainer(model=model, args=args, train_dataset=Dataset.from_list(pairs_rows(items, margins)),
                            processing_class=tokenizer, callbacks=[*training.stage_callbacks(), *callbacks],
                            peft_config=training.peft_config(cfg.lora, task_type="SEQ_CLS"))
    throughput.attach(trainer)
    result = trainer.train(resume_from_checkpoint=training.last_complete_checkpoint(work_dir))
    return trainer, result


def _encode_all(tokenizer, rankings: list[Ranking], max_length: int) -> tuple[list[EncodedRanking], Counter]:
    items, drops = [], Counter()
    for r in rankings:
        enc, d = encode_ranking(tokenizer, r, max_length)
        drops.update(d)
        if enc is not None:
            items.append(enc)
    return items, drops


def _free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _evaluate_saved(model_dir: Path, items: list[EncodedRanking], pad_id: int, cfg: RMConfig,
                    trust_remote_code: bool) -> dict:
    from posttrain.modeling import pick_device

    model = load_reward_model(model_dir, trust_remote_code=trust_remote_code).to(pick_device())
    try:
        return evaluate_rankings(model, items, pad_id, cfg)
    finally:
        del model
        _free_memory()


def run(ctx: StageContext) -> StageResult:
    """Train the reward model (each variant), average variants, evaluate on held-out rankings."""
    from transformers import set_seed

    from posttrain import data
    from posttrain.modeling import load_tokenizer

    cfg: RMConfig = ctx.config
    t0 = time.time()
    out_dir = Path(ctx.out_dir)
    base = Path(ctx.inputs.base_model)
    tokenizer = load_tokenizer(base, trust_remote_code=ctx.trust_remote_code)

    prefs = data.load_preferences([Path(p) for p in ctx.inputs.preference_files])
    heldout_files = [Path(p) for p in ctx.inputs.heldout_preference_files]
    prefs, removed, contaminated = decontam.screen_preferences(ctx.inputs, prefs, "rm")
    rankings, drops = expand_rankings(prefs, cfg)
    if removed:  # counted in pairs, the stage's unit
        drops["contaminated"] = sum(len(r.pairs) for r in expand_rankings(removed, cfg)[0])
    items, long_drops = _encode_all(tokenizer, rankings, cfg.max_length)
    drops.update(long_drops)
    if heldout_files:
        held_rankings, held_drops = expand_rankings(data.load_preferences(heldout_files), cfg, all_pairs=True)
        held_items, held_long = _encode_all(tokenizer, held_rankings, cfg.max_length)
        held_drops.update(held_long)
        train_items = items
        heldout_source = "files"
    else:
        # Split after filtering, so the held-out rankings come from the training distribution;
        # per-strength accuracy then covers only the kept strengths (held-out files cover all).
        train_items, held_items = split_heldout(items, cfg.heldout_fraction, ctx.seed)
        heldout_source = f"split({cfg.heldout_fraction})"
        held_drops = Counter()
    if not train_items:
        raise ValueError(f"rm: no training pairs left after filtering {len(prefs)} preference rows "
                         f"(dropped pairs by reason: {dict(drops)})")

    pair_filter = data.FilterCounts("rm pairs")
    pair_filter.keep(sum(len(it.pairs) for it in items))
    for reason, n in drops.items():
        pair_filter.drop(reason, n)
    metrics: dict[str, Any] = {
        "rows": len(prefs), "rankings": len(train_items),
        "pairs": sum(len(it.pairs) for it in train_items),
        "responses_per_ranking": {str(k): v for k, v in sorted(Counter(
            len(it.response_ids) for it in train_items).items())},
        "filter": pair_filter.summary(),
        "heldout": {"source": heldout_source, "rankings": len(held_items),
                    "dropped_pairs": dict(sorted(held_drops.items()))},
        "packing": cfg.packing, "margin": cfg.margin, "variants": {}, "contaminated": contaminated,
    }
    n_var = len(cfg.variants)

    def train_one(run: training.VariantRun) -> dict:
        vitems = train_items
        if run.variant.data_fraction is not None and run.variant.data_fraction < 1:
            vitems = random.Random(run.seed).sample(train_items,
                                                    max(1, round(run.variant.data_fraction * len(train_items))))
        rng = random.Random(run.seed)
        vitems = [shuffle_responses(it, rng) for it in vitems]

        def load_model(seed=run.seed):
            set_seed(seed)  # the fresh score head is drawn here
            model = load_reward_model(base, trust_remote_code=ctx.trust_remote_code)
            model.config.pad_token_id = tokenizer.pad_token_id
            if cfg.packing and cfg.lora.enabled:
                from peft import get_peft_model

                model = get_peft_model(model, training.peft_config(cfg.lora, task_type="SEQ_CLS"))
            return model

        tv = time.time()
        train = train_packed if cfg.packing else train_pairs
        trainer, result = train(load_model, tokenizer, vitems, cfg, run.variant, work_dir=run.work_dir,
                                seed=run.seed, report_to=ctx.report_to, callbacks=ctx.callbacks)
        vm = {"seed": run.seed, "train_loss": result.training_loss, "steps": result.global_step,
              "seconds": round(time.time() - tv, 2), "rankings": len(vitems),
              "pairs": sum(len(it.pairs) for it in vitems), "throughput": throughput.summary(trainer)}
        # Collective: every rank takes part in gathering the weights; rank 0 writes, all wait.
        gather.save_final_model(trainer, tokenizer, run.model_dir,
                                prepare=lambda m: setattr(m.config, "pad_token_id", tokenizer.pad_token_id))
        del trainer
        _free_memory()
        if distributed.is_main() and held_items and n_var > 1:
            vm["heldout"] = _evaluate_saved(run.model_dir, held_items, tokenizer.pad_token_id, cfg,
                                            ctx.trust_remote_code)
        return vm

    runs = training.train_variants(out_dir, cfg, ctx.seed, train_one, keep_checkpoints=ctx.keep_checkpoints)
    metrics["variants"] = {r.name: r.metrics for r in runs}
    metrics["throughput"] = throughput.combine([v.get("throughput") for v in metrics["variants"].values()])
    model = training.average_variants(runs, out_dir / "model")
    # Only rank 0 evaluates; the other ranks' metrics are not recorded.
    if distributed.is_main() and held_items:
        metrics["heldout"].update(_evaluate_saved(model, held_items, tokenizer.pad_token_id, cfg,
                                                  ctx.trust_remote_code))
    distributed.barrier()
    losses = [v["train_loss"] for v in metrics["variants"].values()]
    metrics["train_loss"] = sum(losses) / len(losses) if losses else None
    metrics["seconds"] = round(time.time() - t0, 2)
    held_out_of_training = {} if heldout_files else {"held_out": sum(len(it.pairs) for it in held_items)}
    metrics.update(training.data_counts(
        "pairs", read=pair_filter.total, dropped={**drops, **held_out_of_training}, truncated=0,
        trained_by_variant={k: v.get("pairs") for k, v in metrics["variants"].items()}))
    metrics["heldout"]["min_accuracy"] = cfg.min_heldout_accuracy
    check_heldout_accuracy(metrics["heldout"], cfg.min_heldout_accuracy)  # rank 0 alone has the accuracy
    model_rel = model.resolve().relative_to(Path(ctx.run_dir).resolve())
    return StageResult(outputs={"model": model_rel.as_posix()}, metrics=metrics)


# ----------------------------------------------------------------------------- the stage


@dataclass
class RMInputs:
    base_model: str = path_field()
    """The pre-trained checkpoint the reward model starts from (a fresh score head)."""
    preference_files: list[str] = path_field()
    """Every preference batch up to this round (`rm.cumulative`), else the latest."""
    heldout_preference_files: list[str] = path_field(default_factory=list)
    """Never trained on; empty: a seeded share of the training rankings is held out."""
    decontaminate: dict | None = decontam.settings_field()
    eval_prompt_files: list[str] = decontam.files_field()


def _resolve(rnd) -> RMInputs:
    r = rnd.recipe
    return RMInputs(base_model=rnd.path(r.models.base),
                    preference_files=rnd.preference_files(only_latest=not r.rm.cumulative),
                    heldout_preference_files=[rnd.path(p) for p in r.data.heldout_preferences],
                    **decontam.resolve_inputs(rnd))


@dataclass(kw_only=True)
class RMHeldout(Metrics):
    """The reward model on held-out rankings (`rm_health`, `evaluate_rankings`); absent without any."""

    accuracy: float | None = None
    pairs: int | None = None
    accuracy_chosen_shorter: float | None = None
    pairs_chosen_shorter: int | None = None
    prefers_longer: float | None = None
    score_length_correlation: float | None = None
    min_accuracy: float | None = None


@dataclass(kw_only=True)
class RMMetrics(training.TrainingMetrics):
    rankings: int | None
    heldout: RMHeldout


def _headline(m: RMMetrics) -> list[tuple[str, Any]]:
    # held-out ranking accuracy; rankings trained on; share of held-out pairs where the RM
    # prefers the longer response (0.5: no length bias)
    return [("acc", m.heldout.accuracy), ("rankings", m.rankings), ("longer", m.heldout.prefers_longer),
            *throughput.headline(m.raw)]


def _mentions_rm(value: Any) -> bool:
    """Whether a reward spec's kwargs hold the "@rm" placeholder anywhere."""
    if value == "@rm":
        return True
    if isinstance(value, dict):
        return any(_mentions_rm(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return any(_mentions_rm(v) for v in value)
    return False


def rm_users(recipe) -> list[str]:
    """The recipe keys that use the round's reward model (empty: nothing does)."""
    users = []
    if recipe.reward == "rm":
        users.append("reward")
    elif _mentions_rm(recipe.reward.kwargs):
        users.append("reward.kwargs (\"@rm\")")
    c = recipe.curate
    if c.enabled and c.rm_quality.enabled:
        users.append("curate.rm_quality")
    if c.enabled and c.dedup.enabled and c.dedup.embedding_model is None and c.dedup.embed_with == "rm":
        users.append("curate.dedup.embed_with")
    if recipe.annotate is not None and recipe.annotate.enabled and recipe.annotate.rm_accuracy:
        users.append("annotate.rm_accuracy")
    return users


def has_preference_data(recipe) -> bool:
    """Whether any preference data can reach the stage: the recipe's batches or the annotate step's."""
    return bool(recipe.data.preference_batches) or recipe.annotate is not None


def enabled(recipe) -> bool:
    """The reward model is trained when something uses it or there is preference data to train it
    on (every recipe with preference batches, as always). A loop ranked by a checker alone, with
    no preference data (recipes/real_instruct.yaml), has no `rm` stage."""
    return has_preference_data(recipe) or bool(rm_users(recipe))  # the data first: it decides for every recipe before


def rm_model(rnd) -> str | None:
    """This round's reward model for a stage that may use it; None when the round trains none."""
    return rnd.output("rm", "model") if enabled(rnd.recipe) else None


STAGE = StageDef(name="rm", inputs=RMInputs, resolve=_resolve, headline=_headline, model_outputs=("model",),
                 launcher=True, metrics=RMMetrics, data_row=training.training_data_row,
                 legend="acc: held-out ranking accuracy", enabled=enabled)

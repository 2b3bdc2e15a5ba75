"""Several sequences in one row, under a block attention mask.

Used by the reward model (`rm`: a ranking's responses after one prompt), by `dpo` (chosen and
rejected after one prompt) and by `sft` (whole examples side by side, `pack_examples`). A row holds
segments: 0 = a shared prefix, k >= 1 = the k-th branch, -1 = padding. Each branch attends to the
prefix and to itself (causally), never to another branch, and its position ids continue from the
prefix's, so every branch is computed exactly as in a row of its own while the prefix is computed
once. Rows without a prefix (sft) are independent sequences whose positions restart at 0.

The mask is a custom 4D mask, which only the 'sdpa' and 'eager' attention implementations take;
`supports_block_mask` says whether a model can be fed packed rows.
"""

from __future__ import annotations

import torch

BLOCK_MASK_ATTENTION = ("sdpa", "eager")


def _attn_implementation(model) -> str:
    inner = getattr(model, "module", model)  # DistributedDataParallel keeps the model (and its config) inside
    return getattr(inner.config, "_attn_implementation", None) or "eager"


def supports_block_mask(model) -> bool:
    """Whether the model's attention implementation takes a custom 4D (block) mask."""
    return _attn_implementation(model) in BLOCK_MASK_ATTENTION


def block_attention_mask(segment_ids: torch.Tensor) -> torch.Tensor:
    """Which key each query may attend to in packed rows.

    segment_ids: [B, L] long; 0 = prompt, k >= 1 = the k-th response, -1 = padding.
    Returns bool [B, 1, L, L] (True = attend): causal, and a key is visible if it is in the
    prompt or in the query's own segment. A padding query sees only itself, so no softmax row is
    empty (an all-masked row gives NaN in SDPA).
    """
    B, L = segment_ids.shape
    q = segment_ids[:, :, None]  # [B, L, 1]
    k = segment_ids[:, None, :]  # [B, 1, L]
    causal = torch.ones(L, L, dtype=torch.bool, device=segment_ids.device).tril()  # [L, L]
    visible = ((k == 0) | (k == q)) & (k >= 0) & (q >= 0) & causal  # [B, L, L]
    eye = torch.eye(L, dtype=torch.bool, device=segment_ids.device)
    visible = visible | (eye & (q < 0))
    return visible[:, None]  # [B, 1, L, L]


def model_attention_mask(visible: torch.Tensor, model, dtype: torch.dtype) -> torch.Tensor:
    """The 4D mask in the form the model's attention takes: bool for SDPA, additive float for eager."""
    impl = _attn_implementation(model)
    if impl == "sdpa":
        return visible
    if impl == "eager":
        zero = torch.zeros((), dtype=dtype, device=visible.device)
        return torch.where(visible, zero, torch.finfo(dtype).min)
    raise ValueError(f"packed rows need attn_implementation 'sdpa' or 'eager' (a custom 4D mask); the model uses "
                     f"{impl!r}. Load it with attn_implementation='sdpa', or turn packing off "
                     "(rm.packing: false, dpo.packed: false)")


def first_fit_bins(lengths: list[int], budget: int) -> list[list[int]]:
    """Indices of `lengths` grouped into bins whose lengths sum to at most `budget`.

    First-fit decreasing: the longest first, each into the first open bin with room (ties by
    index, so the grouping is a function of the lengths alone); a length over the budget gets a
    bin of its own. Each bin lists its indices in their original order.
    """
    if budget < 1:
        raise ValueError(f"budget must be at least 1 token, got {budget}")
    bins: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        n = lengths[i]
        for b, free in enumerate(room):
            if n <= free:
                bins[b].append(i)
                room[b] -= n
                break
        else:
            bins.append([i])
            room.append(budget - n)
    return [sorted(b) for b in bins]


def pack_examples(examples: list[dict], pad_token_id: int, budget: int | None = None) -> dict[str, torch.Tensor]:
    """B tokenized examples {input_ids, labels} as R <= B packed rows, right-padded.

    The examples go into rows of at most `budget` tokens (`first_fit_bins`; None: the longest
    example, so no packed row is longer than the padded batch's rows). In a row, example k is
    segment k + 1 with position ids 0 .. n_k - 1, as in a row of its own, and attends only to
    itself (`block_attention_mask`). Its first label becomes -100: in a row of its own nothing
    predicts that token, and here the previous example's last token would. So every example's
    logits and loss terms equal its own row's, and the batch has the same target tokens (the
    Trainer counts `labels[..., 1:]`, which skips exactly those first labels unpacked).

    Returns input_ids, labels, position_ids, segment_ids [R, L] (segment -1 = padding, label
    -100 there; a row holds `segment_ids[r].max()` examples).
    """
    lengths = [len(ex["input_ids"]) for ex in examples]
    if not lengths or min(lengths) == 0:
        raise ValueError("pack_examples needs at least one example and no empty one")
    for ex, n in zip(examples, lengths):
        if len(ex["labels"]) != n:
            raise ValueError(f"an example has {n} input_ids but {len(ex['labels'])} labels")
    bins = first_fit_bins(lengths, budget or max(lengths))
    R, L = len(bins), max(sum(lengths[i] for i in b) for b in bins)
    input_ids = torch.full((R, L), pad_token_id, dtype=torch.long)
    labels = torch.full((R, L), -100, dtype=torch.long)
    position_ids = torch.zeros((R, L), dtype=torch.long)
    segment_ids = torch.full((R, L), -1, dtype=torch.long)
    for r, members in enumerate(bins):
        start = 0
        for k, i in enumerate(members):
            n = lengths[i]
            seg = slice(start, start + n)
            input_ids[r, seg] = torch.tensor(examples[i]["input_ids"], dtype=torch.long)
            labels[r, seg] = torch.tensor(examples[i]["labels"], dtype=torch.long)
            labels[r, start] = -100
            position_ids[r, seg] = torch.arange(n)
            segment_ids[r, seg] = k + 1
            start += n
    return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids, "segment_ids": segment_ids}

"""Several sequences that share a prompt in one row, under a block attention mask.

Used by the reward model (`rm`: a ranking's responses after one prompt) and by `dpo` (chosen and
rejected after one prompt). A row holds segments: 0 = the shared prefix, k >= 1 = the k-th
branch, -1 = padding. Each branch attends to the prefix and to itself (causally), never to another
branch, and its position ids continue from the prefix's, so every branch is computed exactly as
in a row of its own while the prefix is computed once.

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

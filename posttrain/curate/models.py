"""What the curation filters ask of models: dialog embeddings (for dedup) and judge prompts.

Model code (torch, transformers) is imported inside the functions.
"""

from __future__ import annotations

from pathlib import Path

from posttrain.curate.dedup import normalise
from posttrain.curate.filters import CurationRow, dialog_text


def embed_dialogs(model_dir: str | Path, texts: list[str], *, batch_size: int = 32, max_length: int = 512,
                  device: str = "auto", trust_remote_code: bool = False, on_batch=None):
    """(N, D) float32 unit vectors: the mean of the last hidden state over each text's tokens.

    Works for an embedding model (sentence-transformers folders are mean-pooled BERTs) and for
    a causal LM or reward model folder (AutoModel loads its backbone without the head).
    """
    import numpy as np
    import torch
    from transformers import AutoModel

    from posttrain.modeling import load_tokenizer, pick_device

    device = pick_device(device)
    tok = load_tokenizer(model_dir, trust_remote_code=trust_remote_code)
    tok.padding_side = "right"
    model = AutoModel.from_pretrained(str(model_dir), trust_remote_code=trust_remote_code, dtype=torch.float32)
    model.to(device).eval()
    out = []
    with torch.inference_mode():
        for start in range(0, len(texts), batch_size):
            enc = tok(texts[start:start + batch_size], padding=True, truncation=True, max_length=max_length,
                      return_tensors="pt").to(device)
            hidden = model(**enc).last_hidden_state  # (B, T, D)
            mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)  # (B, D)
            out.append(pooled.float().cpu().numpy())
            if on_batch is not None:
                on_batch(min(start + batch_size, len(texts)))
    del model
    d = out[0].shape[1] if out else 0
    return normalise(np.concatenate(out) if out else np.zeros((0, d), dtype=np.float32))


def judge_prompt_ids(tokenizer, template: str, rows: list[CurationRow]) -> list[list[int]]:
    from posttrain import chat

    out = []
    for r in rows:
        text = chat.render_prompt(tokenizer, [{"role": "user", "content": template.replace(
            "{conversation}", dialog_text(r.messages))}])
        out.append(tokenizer(text, add_special_tokens=False)["input_ids"])
    return out

"""Loading and saving models safely: safetensors only, no remote code unless a recipe asks."""

from __future__ import annotations

import os
from pathlib import Path

from posttrain.files import atomic_dir


def pick_device(requested: str = "auto") -> str:
    import torch

    if requested != "auto":
        return requested
    return "cuda" if torch.cuda.is_available() else "cpu"


def pick_dtype(requested: str = "auto", device: str = "cpu"):
    """bf16 on a GPU that supports it, fp32 elsewhere (CPU bf16 matmuls are slow and lossy)."""
    import torch

    if requested != "auto":
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[requested]
    if device.startswith("cuda") and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def load_tokenizer(path: str | os.PathLike, *, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    if tok.pad_token is None:
        # Right-padding with EOS would teach the model to emit EOS forever; prefer a pad token
        # the vocabulary already has, else reuse EOS (masked out of every loss by attention).
        tok.pad_token = tok.eos_token
    return tok


def _check_safetensors(path: Path) -> None:
    if path.is_dir() and not any(path.glob("*.safetensors")) and any(path.glob("*.bin")):
        raise ValueError(
            f"{path} holds only pickled .bin weights; posttrain loads safetensors only. "
            "Convert the checkpoint with `model.save_pretrained(..., safe_serialization=True)`."
        )


def load_causal_lm(path: str | os.PathLike, *, dtype="auto", device: str = "auto",
                   trust_remote_code: bool = False):
    from transformers import AutoModelForCausalLM

    path = Path(path)
    _check_safetensors(path)
    device = pick_device(device)
    model = AutoModelForCausalLM.from_pretrained(
        str(path), dtype=pick_dtype(dtype, device) if isinstance(dtype, str) else dtype,
        trust_remote_code=trust_remote_code, use_safetensors=True,
    )
    return model.to(device)


def load_sequence_classifier(path: str | os.PathLike, *, dtype="auto", device: str = "auto",
                             trust_remote_code: bool = False, num_labels: int = 1,
                             attn_implementation: str | None = None):
    """A reward model: a sequence classifier with one output (a fresh head on a causal LM)."""
    from transformers import AutoModelForSequenceClassification

    path = Path(path)
    _check_safetensors(path)
    device = pick_device(device)
    extra = {"attn_implementation": attn_implementation} if attn_implementation else {}
    model = AutoModelForSequenceClassification.from_pretrained(
        str(path), num_labels=num_labels,
        dtype=pick_dtype(dtype, device) if isinstance(dtype, str) else dtype,
        trust_remote_code=trust_remote_code, use_safetensors=True, **extra,
    )
    if model.config.pad_token_id is None:
        tok_pad = getattr(model.config, "eos_token_id", None)
        model.config.pad_token_id = tok_pad[0] if isinstance(tok_pad, list) else tok_pad
    return model.to(device)


def save_checkpoint(model, tokenizer, out_dir: str | os.PathLike) -> Path:
    """Save model (safetensors) + tokenizer + generation config into `out_dir`, atomically."""
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(str(tmp), safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
    return out_dir

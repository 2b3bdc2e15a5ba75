"""Loading and saving models safely: safetensors only, no remote code unless a recipe asks."""

from __future__ import annotations

import json
import logging
import os
import struct
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
        # A tokenizer without a pad token pads with EOS. Padding is masked out of attention and
        # every loss (labels -100), so the model never learns to emit it from padding.
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
    # from_pretrained loads on the CPU; leave it there when asked, since under FSDP's
    # cpu_ram_efficient_loading the ranks other than 0 hold meta tensors that cannot be copied.
    return model if device == "cpu" else model.to(device)


def load_causal_lm_for_training(path: str | os.PathLike, *, trust_remote_code: bool = False):
    """A causal LM for a trainer: fp32 master weights (a GPU computes in bf16 under the trainer's
    autocast, `TrainingSettings.precision`; AdamW updating bf16 weights would lose most 1e-5
    steps to rounding), still on the CPU, so the trainer places it; under several processes no
    rank first holds the whole model on its device (ZeRO-3 partitions it while loading when the
    trainer's arguments exist before this call; FSDP shards it when the trainer prepares it)."""
    return load_causal_lm(path, dtype="float32", device="cpu", trust_remote_code=trust_remote_code)


def load_sequence_classifier(path: str | os.PathLike, *, dtype="auto", device: str = "auto",
                             trust_remote_code: bool = False, num_labels: int = 1,
                             attn_implementation: str | None = None):
    """A reward model: a sequence classifier with one output (a fresh head on a causal LM)."""
    from transformers import AutoModelForSequenceClassification

    path = Path(path)
    _check_safetensors(path)
    device = pick_device(device)
    extra = {"attn_implementation": attn_implementation} if attn_implementation else {}
    # transformers reports a freshly initialised score head as MISSING weights, with advice to
    # train it: expected here, so its report is silenced and the missing keys checked instead.
    report_log = logging.getLogger("transformers.utils.loading_report")
    level = report_log.level
    report_log.setLevel(logging.ERROR)
    try:
        model, info = AutoModelForSequenceClassification.from_pretrained(
            str(path), num_labels=num_labels,
            dtype=pick_dtype(dtype, device) if isinstance(dtype, str) else dtype,
            trust_remote_code=trust_remote_code, use_safetensors=True, output_loading_info=True, **extra,
        )
    finally:
        report_log.setLevel(level)
    head = {name for name, _ in model.named_parameters() if name.split(".")[0] in ("score", "classifier")}
    unexpected_missing = sorted(set(info.get("missing_keys") or ()) - head)
    if unexpected_missing:
        logging.getLogger("posttrain").warning(
            "%s: the reward model is missing weights besides its score head (newly initialised): %s",
            path, ", ".join(unexpected_missing[:20]))
    if model.config.pad_token_id is None:
        tok_pad = getattr(model.config, "eos_token_id", None)
        model.config.pad_token_id = tok_pad[0] if isinstance(tok_pad, list) else tok_pad
    return model if device == "cpu" else model.to(device)  # see load_causal_lm


def save_checkpoint(model, tokenizer, out_dir: str | os.PathLike) -> Path:
    """Save model (safetensors) + tokenizer + generation config into `out_dir`, atomically.

    Under a process group this is collective: every rank calls it, rank 0 alone writes (the
    model it passes must be the full one; the others may pass None), and every rank returns
    only once the folder is published. A sharded model is gathered first by
    `gather.save_final_model`, which ends here.
    """
    from posttrain import distributed

    out_dir = Path(out_dir)

    def write():
        with atomic_dir(out_dir) as tmp:
            model.save_pretrained(str(tmp), safe_serialization=True)
            if tokenizer is not None:
                tokenizer.save_pretrained(str(tmp))

    distributed.main_then_wait(write)
    return out_dir


class GGUFError(ValueError):
    """A file given to `posttrain import-gguf` that is not a whole, readable GGUF file."""


GGUF_MAGIC = b"GGUF"


def check_gguf_file(path: Path) -> None:
    """Refuse a file that is not GGUF (by its first four bytes) or whose header and tensor
    table do not fit in it (a truncated download), before transformers reads it."""
    import gguf

    with open(path, "rb") as f:
        head = f.read(4)
    if head != GGUF_MAGIC:
        raise GGUFError(f"{path}: not a GGUF file (a GGUF file starts with the bytes 'GGUF'; this one starts "
                        f"with {head!r})")
    try:
        # gguf's reader memory-maps the file and checks every tensor's data lies inside it.
        gguf.GGUFReader(str(path))
    except (ValueError, IndexError, KeyError) as err:
        raise GGUFError(f"{path}: a GGUF file that cannot be read whole (truncated or corrupt: "
                        f"{str(err)[:200]})") from None
def merge_if_peft(model):
    """Merge LoRA adapters into the base weights so later stages get a plain checkpoint."""
    try:
        from peft import PeftModel
    except ImportError:  # peft is a dependency, but a merged model needs no peft
        return model
    if isinstance(model, PeftModel):
        return model.merge_and_unload()
    return model


def import_gguf(gguf_file: str | os.PathLike, out_dir: str | os.PathLike, *, dtype: str = "float32") -> Path:
    """Turn a GGUF file (llama.cpp's format) into a safetensors checkpoint with its tokenizer.

    transformers reads GGUF through the `gguf` package and dequantises every tensor, but a
    model loaded that way refuses `save_pretrained` (its config carries a gguf
    `quantization_config`). So: build the same architecture from the config without that
    entry, copy the dequantised weights in (strict: every tensor must match), and save that.
    Tied embeddings stay tied (`tie_word_embeddings` comes from the GGUF's config).
    The result loads with transformers and vLLM like any checkpoint; the weights carry the
    quantisation's error (a Q4 file gives a model close to, not equal to, the original).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_file = Path(gguf_file)
    if not gguf_file.is_file():
        raise FileNotFoundError(f"{gguf_file}: no such GGUF file")
    try:
        import gguf  # noqa: F401  (transformers' GGUF reader; checked here for a clear message)
    except ImportError as err:
        raise ImportError("reading GGUF files needs the `gguf` package: pip install gguf") from err
    check_gguf_file(gguf_file)
    torch_dtype = pick_dtype(dtype, "cpu")
    folder, name = str(gguf_file.parent), gguf_file.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        quantized = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch_dtype)
    except ValueError as err:  # transformers' word for a GGUF it cannot convert (architecture, tensor type)
        raise GGUFError(f"{gguf_file}: transformers cannot convert this GGUF file: {str(err)[:500]}") from err
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch_dtype
    model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
    model.load_state_dict(quantized.state_dict(), strict=True)
    model.generation_config = quantized.generation_config
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    del quantized
    return save_checkpoint(model, tokenizer, out_dir)


# ----------------------------------------------------------------------------- output checks

class ModelFolderError(ValueError):
    """A model folder a stage produced is incomplete or unreadable; the message says what."""


_MAX_SAFETENSORS_HEADER = 100 << 20


def _check_safetensors_file(path: Path) -> None:
    """The header parses and the file is as long as the header says (a truncated or
    half-written weights file fails here). Reads the header only, never the tensors."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ModelFolderError(f"{path}: not a safetensors file (shorter than its header)")
        (n,) = struct.unpack("<Q", head)
        if n > min(_MAX_SAFETENSORS_HEADER, size - 8):
            raise ModelFolderError(f"{path}: not a safetensors file (header of {n} bytes in a {size}-byte file)")
        try:
            header = json.loads(f.read(n))
        except (ValueError, RecursionError) as e:
            raise ModelFolderError(f"{path}: unreadable safetensors header: {e}") from None
    if not isinstance(header, dict):
        raise ModelFolderError(f"{path}: unreadable safetensors header")
    ends = [v["data_offsets"][1] for k, v in header.items()
            if k != "__metadata__" and isinstance(v, dict) and isinstance(v.get("data_offsets"), list)
            and len(v["data_offsets"]) == 2 and isinstance(v["data_offsets"][1], int)]
    if len(ends) != len([k for k in header if k != "__metadata__"]):
        raise ModelFolderError(f"{path}: unreadable safetensors header (a tensor without data offsets)")
    if not ends:
        raise ModelFolderError(f"{path}: holds no tensors")
    if 8 + n + max(ends) > size:
        raise ModelFolderError(f"{path}: truncated ({size} bytes, the header needs {8 + n + max(ends)})")


def _json_file(path: Path) -> dict:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as e:
        raise ModelFolderError(f"{path}: unreadable: {e}") from None
    if not isinstance(value, dict):
        raise ModelFolderError(f"{path}: expected a JSON object")
    return value


def verify_model_folder(path: str | os.PathLike) -> None:
    """Check, cheaply, that `path` is a complete model folder: a full checkpoint (config.json
    with a model_type, safetensors weights: one file, or every shard its index names) or a
    LoRA adapter (adapter_config.json + adapter_model.safetensors), plus a tokenizer that
    parses. Weights are checked by header and length, never loaded. Raises ModelFolderError
    naming the folder and what is missing; the orchestrator calls this before it writes the
    record of a stage whose outputs are models (StageDef.model_outputs)."""
    folder = Path(path)
    if not folder.is_dir():
        raise ModelFolderError(f"{folder}: the model folder does not exist")
    if (folder / "adapter_config.json").is_file():
        _json_file(folder / "adapter_config.json")
        weights = [folder / "adapter_model.safetensors"]
    elif (folder / "config.json").is_file():
        if not isinstance(_json_file(folder / "config.json").get("model_type"), str):
            raise ModelFolderError(f"{folder / 'config.json'}: no model_type")
        index = folder / "model.safetensors.index.json"
        if index.is_file():
            weight_map = _json_file(index).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise ModelFolderError(f"{index}: no weight_map")
            weights = [folder / name for name in sorted(set(map(str, weight_map.values())))]
        else:
            weights = sorted(folder.glob("*.safetensors"))
    else:
        raise ModelFolderError(f"{folder}: no config.json (nor adapter_config.json): not a model folder")
    if not weights:
        raise ModelFolderError(f"{folder}: no safetensors weights")
    for w in weights:
        if not w.is_file():
            raise ModelFolderError(f"{folder}: weights file {w.name} is missing")
        _check_safetensors_file(w)
    if not (folder / "tokenizer_config.json").is_file():
        raise ModelFolderError(f"{folder}: no tokenizer (tokenizer_config.json is missing)")
    _json_file(folder / "tokenizer_config.json")
    if (folder / "tokenizer.json").is_file():
        from tokenizers import Tokenizer

        try:
            Tokenizer.from_file(str(folder / "tokenizer.json"))
        except Exception as e:  # the Rust parser raises its own exception type; reported, not carried on
            raise ModelFolderError(f"{folder / 'tokenizer.json'}: does not parse: {e}") from None
    elif not any((folder / name).is_file() for name in ("tokenizer.model", "vocab.json", "spiece.model")):
        raise ModelFolderError(f"{folder}: no tokenizer vocabulary (tokenizer.json, tokenizer.model or vocab.json)")


# ----------------------------------------------------------------------------- sequence-classifier scores


def backbone_and_head(model):
    """(transformer body, score head) of a sequence classifier, seen through a PEFT wrapper."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    body = getattr(inner, inner.base_model_prefix, None)
    head = getattr(inner, "score", None)
    if body is None or head is None:
        raise TypeError(f"{type(inner).__name__} is not a *ForSequenceClassification model with a `score` head")
    return body, head


def last_token_scores(model, input_ids, attention_mask):
    """Scores of right-padded separate rows read at each row's last real token: [B]."""
    import torch

    body, head = backbone_and_head(model)
    device = next(model.parameters()).device
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
    hidden = body(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state  # [B, L, H]
    last = attention_mask.long().sum(-1) - 1  # [B]
    return head(hidden[torch.arange(hidden.shape[0], device=device), last]).squeeze(-1).float()  # [B]

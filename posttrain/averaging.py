"""Weight averaging of several checkpoints ("model soup", Llama 3 §4.1.5).

The paper averages models trained with different data versions or hyperparameters at the
RM, SFT and DPO stages. Here that is one function, `average_checkpoints`, which

- checks everything first (tensor names, shapes and dtypes, architectures, vocabularies,
  tokenizers, shards, weights) so that a bad input fails before anything is written;
- then streams: one tensor at a time is read from every input with `safetensors.safe_open`
  (no mmap pages stay resident), accumulated in fp32, cast back to the inputs' dtype and
  written straight into its planned place in an output shard. Peak memory is about two
  copies of the largest tensor, whatever the model size;
- writes into a temporary folder that is renamed into place only when complete
  (`files.atomic_dir`).

LoRA inputs (a folder with peft's `adapter_config.json`) are merged into their base first.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import struct
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from posttrain.files import atomic_dir, read_json

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
CONFIG_FILE = "config.json"
GENERATION_CONFIG_FILE = "generation_config.json"
ADAPTER_CONFIG_FILE = "adapter_config.json"
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "tokenizer.model", "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json",
)
# Keys of config.json that may differ between variants of one model without changing what
# the weights mean (bookkeeping written by whichever library saved the checkpoint).
_CONFIG_KEYS_IGNORED = {"_name_or_path", "transformers_version", "dtype", "torch_dtype", "use_cache"}
_GENERATION_KEYS_IGNORED = {"transformers_version"}

# safetensors dtype names -> torch dtypes. Only the float kinds are averaged.
_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}
_AVERAGED = {"F64", "F32", "F16", "BF16"}
_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
                "U8": 1, "BOOL": 1}
_DTYPE_NAMES = {v: k for k, v in _DTYPES.items()}


class AverageError(ValueError):
    """A checkpoint set that cannot be averaged; the message names the file and the tensor."""


# --------------------------------------------------------------------------------------
# The math: small pure functions.


def normalise_weights(weights: Sequence[float] | None, n: int) -> list[float]:
    """w_i / sum_j w_j, one per input; uniform 1/n when `weights` is None.

    Raises AverageError when the count differs from `n`, a weight is negative or not
    finite, or the sum is not positive.
    """
    if n < 1:
        raise AverageError("nothing to average: no input checkpoints")
    if weights is None:
        return [1.0 / n] * n
    weights = [float(w) for w in weights]
    if len(weights) != n:
        raise AverageError(f"got {len(weights)} weights for {n} input checkpoints; give one weight per input")
    for i, w in enumerate(weights):
        if not math.isfinite(w) or w < 0:
            raise AverageError(f"weight {i} is {w}: weights must be finite and >= 0")
    total = sum(weights)
    if not total > 0:
        raise AverageError(f"weights {weights} sum to {total}; they must sum to a positive number")
    return [w / total for w in weights]


def accumulate(acc: torch.Tensor | None, tensor: torch.Tensor, weight: float,
               acc_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """acc + weight * tensor, in `acc_dtype`; `acc` None starts the sum.

    Over inputs i = 0..n-1 this computes avg = sum_i w_i * t_i (shape of t_i) with the same
    rounding as `sum(w * t.to(acc_dtype) for w, t in zip(weights, tensors))`: one multiply
    and one add per element, each rounded to `acc_dtype`. `tensor` is consumed (scaled in
    place when it is already in `acc_dtype`) so that at most two tensors are alive.
    """
    term = tensor.to(acc_dtype)
    term.mul_(weight)
    if acc is None:
        return term
    acc.add_(term)
    return acc


def plan_shards(sizes: Sequence[tuple[str, int]], max_shard_size: int) -> list[list[str]]:
    """Split (name, nbytes) pairs, in order, into shards of at most `max_shard_size` bytes.

    Greedy: a tensor opens a new shard when it would overflow the current one; a tensor
    larger than the limit gets a shard of its own.
    """
    shards: list[list[str]] = []
    current: list[str] = []
    used = 0
    for name, nbytes in sizes:
        if current and used + nbytes > max_shard_size:
            shards.append(current)
            current, used = [], 0
        current.append(name)
        used += nbytes
    if current:
        shards.append(current)
    return shards


def shard_file_names(n: int) -> list[str]:
    """transformers' names: model.safetensors alone, else model-0000i-of-0000n.safetensors."""
    if n == 1:
        return [SINGLE_FILE]
    return [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]


# --------------------------------------------------------------------------------------
# Reading and checking inputs.


@dataclass
class TensorInfo:
    dtype: str
    """safetensors dtype name (F32, BF16, ...)."""
    shape: tuple[int, ...]
    file: Path
    """The shard that holds it."""

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * _DTYPE_BYTES[self.dtype]


@dataclass
class Checkpoint:
    """One input's safetensors layout, read from its headers (no tensor data)."""

    path: Path
    tensors: dict[str, TensorInfo]
    config: dict
    metadata: dict[str, str] | None


def _safe_open(path: Path):
    from safetensors import safe_open

    return safe_open(str(path), framework="pt", device="cpu")


def _read_header(shard: Path) -> tuple[dict[str, TensorInfo], dict[str, str] | None]:
    from safetensors import SafetensorError

    if not shard.is_file():
        raise AverageError(f"missing shard {shard}")
    try:
        with _safe_open(shard) as f:
            tensors = {}
            for name in f.keys():
                sl = f.get_slice(name)
                dtype = sl.get_dtype()
                if dtype not in _DTYPES:
                    raise AverageError(f"{shard}: tensor {name} has dtype {dtype}, which posttrain cannot average "
                                       "(quantized / fp8 checkpoints carry scales that must be averaged with them)")
                tensors[name] = TensorInfo(dtype, tuple(sl.get_shape()), shard)
            metadata = f.metadata()
    except SafetensorError as e:
        raise AverageError(f"corrupt shard {shard}: {e}") from e
    return tensors, metadata


def _read_json_file(path: Path, what: str) -> Any:
    try:
        return read_json(path)
    except FileNotFoundError as e:
        raise AverageError(f"{path.parent}: missing {what} {path.name}") from e
    except json.JSONDecodeError as e:
        raise AverageError(f"{path}: not valid JSON ({e})") from e


def read_checkpoint(path: Path) -> Checkpoint:
    """The tensor layout (name -> dtype, shape, shard) and config of a saved model folder."""
    path = Path(path)
    if not path.is_dir():
        raise AverageError(f"{path}: not a model folder")
    config = _read_json_file(path / CONFIG_FILE, "config")
    if (path / SINGLE_FILE).is_file():
        tensors, metadata = _read_header(path / SINGLE_FILE)
    elif (path / INDEX_FILE).is_file():
        index = _read_json_file(path / INDEX_FILE, "index")
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise AverageError(f"{path / INDEX_FILE}: no 'weight_map'")
        tensors, metadata = {}, None
        for shard_name in sorted(set(weight_map.values())):
            shard_tensors, shard_meta = _read_header(path / shard_name)
            metadata = metadata or shard_meta
            for name, info in shard_tensors.items():
                if weight_map.get(name) != shard_name:
                    raise AverageError(f"{path / shard_name}: tensor {name} is not listed for this shard in {INDEX_FILE}")
                tensors[name] = info
        missing = sorted(set(weight_map) - set(tensors))
        if missing:
            raise AverageError(f"{path / INDEX_FILE} lists tensor {missing[0]} in {weight_map[missing[0]]}, "
                               f"which does not hold it ({len(missing)} such tensors)")
    elif any(path.glob("*.bin")) or any(path.glob("*.pt")):
        raise AverageError(f"{path} holds only pickled weights; posttrain reads safetensors only "
                           "(save with `save_pretrained(..., safe_serialization=True)`)")
    else:
        raise AverageError(f"{path}: no {SINGLE_FILE} or {INDEX_FILE}")
    _drop_tied_duplicates(tensors, config)
    return Checkpoint(path, tensors, config, metadata)


def _drop_tied_duplicates(tensors: dict[str, TensorInfo], config: dict) -> None:
    """With tied embeddings transformers stores only the input embedding and re-ties the
    output one on load; a checkpoint saved by another tool may still carry `lm_head.weight`.
    Dropping it keeps the output like transformers' own (one copy) and the inputs comparable."""
    # Only an explicit `true`: a config may omit the key when it equals the class default,
    # and dropping an untied head would silently replace it with a fresh one on load.
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else {}
    tied = config.get("tie_word_embeddings", text.get("tie_word_embeddings")) is True
    if tied and "lm_head.weight" in tensors:
        if any(n.endswith("embed_tokens.weight") for n in tensors):
            del tensors["lm_head.weight"]


def _architecture_summary(config: dict) -> dict:
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else {}
    return {
        "architectures": config.get("architectures"),
        "model_type": config.get("model_type"),
        "vocab_size": config.get("vocab_size", text.get("vocab_size")),
    }


def check_compatible(checkpoints: Sequence[Checkpoint]) -> None:
    """Raise AverageError unless every checkpoint has the first one's architecture,
    vocabulary, config, tensor names, shapes and dtypes."""
    first = checkpoints[0]
    a = _architecture_summary(first.config)
    for ck in checkpoints[1:]:
        b = _architecture_summary(ck.config)
        for key in ("architectures", "model_type"):
            if a[key] != b[key]:
                raise AverageError(f"architectures differ: {first.path / CONFIG_FILE} has {key}={a[key]}, "
                                   f"{ck.path / CONFIG_FILE} has {key}={b[key]}")
        if a["vocab_size"] != b["vocab_size"]:
            raise AverageError(f"vocabularies differ: {first.path / CONFIG_FILE} has vocab_size={a['vocab_size']}, "
                               f"{ck.path / CONFIG_FILE} has vocab_size={b['vocab_size']}")
        diff = _dict_diff(first.config, ck.config, _CONFIG_KEYS_IGNORED)
        if diff:
            raise AverageError(f"configs differ: {first.path / CONFIG_FILE} and {ck.path / CONFIG_FILE} "
                               f"disagree on {', '.join(diff)}")
        names_a, names_b = set(first.tensors), set(ck.tensors)
        if names_a != names_b:
            only_a, only_b = sorted(names_a - names_b), sorted(names_b - names_a)
            where = (f"tensor {only_a[0]} is in {first.path} but not in {ck.path}" if only_a
                     else f"tensor {only_b[0]} is in {ck.path} but not in {first.path}")
            raise AverageError(f"tensor names differ: {where} "
                               f"({len(only_a)} only in the first, {len(only_b)} only in the other)")
        for name, ta in first.tensors.items():
            tb = ck.tensors[name]
            if ta.shape != tb.shape:
                raise AverageError(f"tensor shapes differ: {name} is {list(ta.shape)} in {ta.file} "
                                   f"but {list(tb.shape)} in {tb.file}")
            if ta.dtype != tb.dtype:
                raise AverageError(f"tensor dtypes differ: {name} is {ta.dtype} in {ta.file} but {tb.dtype} in {tb.file}")


def _dict_diff(a: dict, b: dict, ignored: set[str]) -> list[str]:
    keys = (set(a) | set(b)) - ignored
    return sorted(k for k in keys if a.get(k, "<absent>") != b.get(k, "<absent>"))


def refuse_custom_code(checkpoints: Sequence[Checkpoint]) -> None:
    """A checkpoint whose config.json has an `auto_map` runs code shipped beside it when it is
    loaded: posttrain does not average it (its code files would not travel with the average)."""
    for ck in checkpoints:
        auto_map = ck.config.get("auto_map") if isinstance(ck.config, dict) else None
        if auto_map:
            names = ", ".join(sorted(auto_map)) if isinstance(auto_map, dict) else str(auto_map)
            raise AverageError(f"{ck.path / CONFIG_FILE}: its auto_map ({names}) names model code shipped with the "
                               "checkpoint, not one of transformers' architectures; posttrain averages only "
                               "those (in a run, `models.trust_remote_code: true` allows it)")


def check_side_files(paths: Sequence[Path]) -> list[str]:
    """Check the generation config and tokenizer files match across inputs; return the
    file names (present in all inputs) to copy from the first."""
    first = paths[0]
    names = [GENERATION_CONFIG_FILE, *TOKENIZER_FILES]
    for p in paths[1:]:
        for name in names:
            fa, fb = first / name, p / name
            if fa.is_file() != fb.is_file():
                has, lacks = (fa, p) if fa.is_file() else (fb, first)
                raise AverageError(f"{has} exists but {lacks} has no {name}"
                                   + (": tokenizers differ" if name != GENERATION_CONFIG_FILE else ""))
            if not fa.is_file() or _same_file_content(fa, fb, name):
                continue
            if name == GENERATION_CONFIG_FILE:
                raise AverageError(f"generation configs differ: {fa} vs {fb}")
            raise AverageError(f"tokenizers differ: {fa} and {fb} are not the same")
    return [n for n in names if (first / n).is_file()]


def _same_file_content(a: Path, b: Path, name: str) -> bool:
    if a.read_bytes() == b.read_bytes():
        return True
    if not name.endswith(".json"):
        return False
    ignored = _GENERATION_KEYS_IGNORED if name == GENERATION_CONFIG_FILE else set()
    ja, jb = _read_json_file(a, name), _read_json_file(b, name)
    if isinstance(ja, dict) and isinstance(jb, dict):
        return not _dict_diff(ja, jb, ignored)
    return ja == jb


def check_non_float(checkpoints: Sequence[Checkpoint]) -> int:
    """Integer and bool tensors cannot be averaged: they must be identical in every input.
    Returns how many there are."""
    first = checkpoints[0]
    names = [n for n, t in first.tensors.items() if t.dtype not in _AVERAGED]
    for name in names:
        ref = _load_tensor(first.tensors[name].file, name)
        for ck in checkpoints[1:]:
            other = _load_tensor(ck.tensors[name].file, name)
            if not torch.equal(ref, other):
                raise AverageError(f"non-float tensor {name} ({first.tensors[name].dtype}) differs between "
                                   f"{first.tensors[name].file} and {ck.tensors[name].file}; "
                                   "integer and bool tensors must be identical in every input")
    return len(names)


def _load_tensor(shard: Path, name: str) -> torch.Tensor:
    from safetensors import SafetensorError

    try:
        with _safe_open(shard) as f:
            return f.get_tensor(name)
    except SafetensorError as e:
        raise AverageError(f"corrupt shard {shard}: cannot read tensor {name}: {e}") from e


# --------------------------------------------------------------------------------------
# Writing: a safetensors file whose header is known before any tensor is computed, so each
# averaged tensor goes straight to disk and nothing accumulates in memory.


def _shard_header(names: Sequence[str], infos: dict[str, TensorInfo], metadata: dict[str, str] | None) -> bytes:
    header: dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = metadata
    offset = 0
    for name in names:
        info = infos[name]
        header[name] = {"dtype": info.dtype, "shape": list(info.shape), "data_offsets": [offset, offset + info.nbytes]}
        offset += info.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # the format pads the header so tensor data starts 8-byte aligned
    return struct.pack("<Q", len(raw)) + raw


def _write_tensor(f, tensor: torch.Tensor) -> None:
    # A uint8 view of the same memory: no copy, and it works for bf16, which numpy lacks.
    f.write(tensor.contiguous().reshape(-1).view(torch.uint8).numpy().data)


# --------------------------------------------------------------------------------------
# LoRA inputs.


def is_lora(path: Path) -> bool:
    return (Path(path) / ADAPTER_CONFIG_FILE).is_file()


def merge_lora(adapter_dir: Path, out_dir: Path, base: Path | None = None) -> Path:
    """Merge a peft LoRA adapter into its base and save a plain checkpoint in `out_dir`.

    The base is `base` when given, else the adapter's `base_model_name_or_path` (a local
    folder: nothing is downloaded). Tokenizer files come from the adapter folder when it
    has them (the trainer saves them there), else from the base.
    """
    adapter_dir = Path(adapter_dir)
    cfg = _read_json_file(adapter_dir / ADAPTER_CONFIG_FILE, "adapter config")
    base_path = Path(base) if base is not None else (
        Path(cfg["base_model_name_or_path"]) if cfg.get("base_model_name_or_path") else None)
    if base_path is None:
        raise AverageError(f"{adapter_dir / ADAPTER_CONFIG_FILE}: no base_model_name_or_path; pass the base explicitly")
    if not base_path.is_dir():
        raise AverageError(f"{adapter_dir}: the LoRA base {base_path} is not a local model folder")
    read_checkpoint(base_path)  # a clear error for a bad base before loading it

    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from posttrain.modeling import merge_if_peft

    cls = AutoModelForSequenceClassification if cfg.get("task_type") == "SEQ_CLS" else AutoModelForCausalLM
    model = cls.from_pretrained(str(base_path), dtype="auto", use_safetensors=True)
    model = merge_if_peft(PeftModel.from_pretrained(model, str(adapter_dir)))
    model.save_pretrained(str(out_dir), safe_serialization=True)
    tok_src = adapter_dir if any((adapter_dir / n).is_file() for n in TOKENIZER_FILES) else base_path
    for name in TOKENIZER_FILES:
        if (tok_src / name).is_file():
            shutil.copy2(tok_src / name, out_dir / name)
    return out_dir


# --------------------------------------------------------------------------------------
# The public function.


def average_checkpoints(inputs: Sequence[Path], out: Path, weights: Sequence[float] | None = None, *,
                        max_shard_size: int = 2 * 1024**3, lora_base: Path | None = None,
                        stats: dict | None = None, trust_remote_code: bool = False) -> Path:
    """Average the weights of `inputs` (same architecture) into the model folder `out`.

    avg[name] = sum_i w_i * t_i[name] with w normalised to sum 1, accumulated in fp32 (fp64
    for fp64 tensors) and written in the inputs' dtype; integer/bool tensors must be equal
    in every input and are copied. config.json, generation_config.json and the tokenizer
    files come from the first input after checking the others match. LoRA adapter folders
    are merged into their base (`lora_base`, else the adapter's own base path) first.

    Everything is checked before anything is written; `out` appears only when complete.
    `stats`, when given, receives the number of tensors and bytes written. A model whose
    config names its own code (`auto_map`) is refused unless `trust_remote_code` (the recipe's
    `models.trust_remote_code`): only transformers' own architectures are averaged blindly.
    """
    if isinstance(inputs, (str, os.PathLike)) or not isinstance(out, (str, os.PathLike)):
        raise TypeError("average_checkpoints(inputs, out, ...): `inputs` is a list of model folders, "
                        "`out` one folder")
    inputs = [Path(p) for p in inputs]
    out = Path(out)
    w = normalise_weights(weights, len(inputs))
    if max_shard_size <= 0:
        raise AverageError(f"max_shard_size must be positive, got {max_shard_size}")
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.lora.", dir=out.parent) as merged_root:
        resolved = []
        for i, p in enumerate(inputs):
            if is_lora(p):
                resolved.append(merge_lora(p, Path(merged_root) / f"input_{i}", lora_base))
            else:
                resolved.append(p)
        checkpoints = [read_checkpoint(p) for p in resolved]
        if not trust_remote_code:
            refuse_custom_code(checkpoints)
        check_compatible(checkpoints)
        side_files = check_side_files(resolved)
        check_non_float(checkpoints)
        _stream_average(checkpoints, w, out, side_files, max_shard_size, stats)
    return out


def _stream_average(checkpoints: Sequence[Checkpoint], weights: list[float], out: Path,
                    side_files: list[str], max_shard_size: int, stats: dict | None) -> None:
    first = checkpoints[0]
    names = sorted(first.tensors)
    plan = plan_shards([(n, first.tensors[n].nbytes) for n in names], max_shard_size)
    files = shard_file_names(len(plan))
    metadata = first.metadata or {"format": "pt"}
    total = 0
    with atomic_dir(out) as tmp:
        for shard_names, file_name in zip(plan, files):
            with open(tmp / file_name, "wb") as f:
                f.write(_shard_header(shard_names, first.tensors, metadata))
                for name in shard_names:
                    tensor = _average_one(checkpoints, name, weights)
                    _write_tensor(f, tensor)
                    total += first.tensors[name].nbytes
                    del tensor
                f.flush()
                os.fsync(f.fileno())
        if len(plan) > 1:
            weight_map = {n: fname for shard_names, fname in zip(plan, files) for n in shard_names}
            _write_json(tmp / INDEX_FILE, {"metadata": {"total_size": total}, "weight_map": weight_map})
        shutil.copy2(first.path / CONFIG_FILE, tmp / CONFIG_FILE)
        for name in side_files:
            shutil.copy2(first.path / name, tmp / name)
    if stats is not None:
        stats.update(tensors=len(names), bytes=total, shards=len(plan))


def _write_json(path: Path, obj: Any) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")


def _average_one(checkpoints: Sequence[Checkpoint], name: str, weights: list[float]) -> torch.Tensor:
    """The averaged tensor `name`, in the inputs' dtype, read input by input."""
    from safetensors import SafetensorError

    info = checkpoints[0].tensors[name]
    if info.dtype not in _AVERAGED:  # checked identical in every input beforehand
        return _read(info.file, name)
    acc_dtype = torch.float64 if info.dtype == "F64" else torch.float32
    acc = None
    for ck, w in zip(checkpoints, weights):
        shard = ck.tensors[name].file
        try:
            tensor = _read(shard, name)
        except SafetensorError as e:
            raise AverageError(f"corrupt shard {shard}: cannot read tensor {name}: {e}") from e
        acc = accumulate(acc, tensor, w, acc_dtype)
        del tensor
    return acc.to(_DTYPES[info.dtype])


def _read(shard: Path, name: str) -> torch.Tensor:
    # A fresh handle per tensor: safe_open maps the whole file, and pages of that mapping
    # written by the in-place accumulation (copy-on-write) would otherwise stay resident
    # until the handle closes, growing memory to the size of the inputs.
    with _safe_open(shard) as f:
        return f.get_tensor(name)

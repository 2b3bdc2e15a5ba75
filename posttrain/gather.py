"""The final model of a training run under a launcher: how weights are gathered and saved.

FSDP2: the model is streamed (`stream_save`): every rank takes part in gathering one tensor's
full value at a time, rank 0 writes it into its planned place in a safetensors shard and
drops it, so no rank ever holds more than the largest tensor in full (the layout is HF's:
`model.safetensors`, or numbered shards and `model.safetensors.index.json`). A LoRA model is
merged the same way, one adapted weight at a time (W + scale * B @ A, peft's rule for plain
LoRA). What cannot be streamed goes through a full state dict on rank 0's CPU, merged there by
peft and saved with save_pretrained: LoRA variants other than plain Linear LoRA (DoRA, conv,
embedding adapters) and models whose transformers class converts weights on load (v5's fused
MoE experts: reverting that needs several tensors at once). ZeRO-3: DeepSpeed's 16-bit gather
on rank 0, unchanged (DeepSpeed is not installed here; that path is untested on this machine).
Rank 0 publishes the folder atomically either way. Single process: a plain save.
"""

from __future__ import annotations

import os
from pathlib import Path

from posttrain.distributed import barrier, is_main
from posttrain.modeling import merge_if_peft, save_checkpoint

STREAM_SHARD_BYTES = 5 * 1024**3
"""Largest safetensors file the streamed save writes (a larger single tensor gets its own)."""


def _plain_class(module):
    """The model class under FSDP2's dynamic `FSDP<Name>` subclass."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch without FSDP2: nothing to look through
        return type(module)
    return next(c for c in type(module).__mro__ if not issubclass(c, FSDPModule))


def is_sharded(module) -> bool:
    """Whether the module's parameters are FSDP2 DTensor shards (a full copy is only rank-wide)."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in module.parameters())


def full_state_dict(module) -> dict:
    """Collective under FSDP2: every rank calls it; rank 0 gets the full tensors on the CPU,
    the other ranks an empty dict. A plain module gives its own state dict (rank 0 only)."""
    if not is_sharded(module):
        return {k: v.detach().cpu() for k, v in module.state_dict().items()} if is_main() else {}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return state if is_main() else {}


def plain_copy(module, state: dict):
    """A CPU model of `module`'s class and config (a PeftModel stays one) holding `state`.

    For a LoRA model the copy is a fresh PeftModel with the same adapter config, so the merge
    that follows is PEFT's own. A missing or extra tensor fails here (a tied one may come once).
    """
    import torch
    from transformers.initialization import no_init_weights

    try:
        from peft import PeftModel, get_peft_model
    except ImportError:
        PeftModel = None
    peft = PeftModel is not None and isinstance(module, PeftModel)
    base = module.get_base_model() if peft else module
    dtype = next((v.dtype for v in state.values() if v.is_floating_point()), torch.float32)
    # Every weight is overwritten from `state`, so skip the random init (minutes on a large model).
    with torch.device("cpu"), no_init_weights():
        copy = _plain_class(base)._from_config(base.config, dtype=dtype)
    copy.tie_weights()  # skipped with the init; a tied head must stay one tensor when saved
    if peft:
        copy = get_peft_model(copy, module.peft_config[module.active_adapter])
    result = copy.load_state_dict(state, strict=False)
    # A gather may list a tied tensor once (DeepSpeed's 16-bit gather does): a key may be missing
    # only when its tensor is one that was loaded under another name.
    tensors = copy.state_dict(keep_vars=True)
    loaded = {tensors[k].data_ptr() for k in tensors if k not in set(result.missing_keys)}
    missing = [k for k in result.missing_keys if tensors[k].data_ptr() not in loaded]
    if missing or result.unexpected_keys:
        raise ValueError(f"the gathered weights do not fit {type(copy).__name__}: missing {missing[:10]}, "
                         f"unexpected {list(result.unexpected_keys)[:10]}")
    return copy


def _deepspeed_zero3(trainer) -> bool:
    plugin = getattr(trainer.accelerator.state, "deepspeed_plugin", None)
    return bool(trainer.is_deepspeed_enabled and plugin is not None and plugin.zero_stage == 3)


# ----------------------------------------------------------------------------- the streamed save


def _full(tensor):
    """The whole value of one tensor: an FSDP2 shard is all-gathered (collective: every rank
    calls it, in the same order); a plain tensor is itself."""
    from torch.distributed.tensor import DTensor

    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor.detach()


class _Source:
    """Where one tensor of the saved (plain, merged) model comes from in the training model:
    `owner`'s attribute `leaf`, plus, for a LoRA-adapted Linear weight, its adapters' factors."""

    def __init__(self, owner, leaf: str, lora=None):
        self.owner, self.leaf, self.lora = owner, leaf, lora  # lora: [(A weight, B weight, scaling, fan_in_fan_out)]

    def value(self):
        """The full tensor (collective). Peft's merge of plain LoRA, one layer at a time:
        W' = W + transpose(B @ A, fan_in_fan_out) * scaling, for each active adapter, in W's dtype."""
        from torch.distributed.tensor import DTensor

        own = getattr(self.owner, self.leaf)
        full = _full(own)
        if self.lora and not isinstance(own, DTensor):
            full = full.clone()  # an unsharded weight is the model's own tensor, not a gathered copy
        for a, b, scaling, fan_in_fan_out in self.lora or ():
            a_full, b_full = _full(a), _full(b)
            delta = b_full @ a_full
            full.add_((delta.T if fan_in_fan_out else delta) * scaling)  # in place, in W's dtype, as peft adds
            del a_full, b_full, delta
        return full

    def meta(self):
        """(dtype, global shape) without gathering anything."""
        t = getattr(self.owner, self.leaf)
        return t.dtype, tuple(t.shape)


def stream_sources(model) -> dict[str, _Source] | None:
    """The tensors of the model `model` saves as (its plain class; a LoRA model merged), in
    state-dict order, tied aliases and `_keys_to_ignore_on_save` left out as save_pretrained
    leaves them out, each with where its value comes from. None when the model cannot be
    streamed (see the module docstring): the caller gathers it whole instead."""
    import torch
    from transformers.initialization import no_init_weights

    from posttrain.trl_compat import weight_conversions

    try:
        from peft import PeftModel
        from peft.tuners.lora import Linear as LoraLinear
        from peft.tuners.tuners_utils import BaseTunerLayer
        from peft.utils import AuxiliaryTrainingWrapper, ModulesToSaveWrapper
    except ImportError:
        PeftModel = LoraLinear = BaseTunerLayer = AuxiliaryTrainingWrapper = ModulesToSaveWrapper = None
    peft = PeftModel is not None and isinstance(model, PeftModel)
    base = model.get_base_model() if peft else model
    if weight_conversions(base):
        return None
    # The saved model's names, order and ties, from a copy of its class that holds no memory.
    with torch.device("meta"), no_init_weights():
        ref = _plain_class(base)._from_config(base.config)
    ref.tie_weights()
    seen, names = set(), []
    params = dict(ref.named_parameters(remove_duplicate=False))
    ignored = set(getattr(ref, "_keys_to_ignore_on_save", None) or ())
    for name in ref.state_dict():
        p = params.get(name)
        if name in ignored or (p is not None and id(p) in seen):
            continue  # a tied alias: save_pretrained keeps the first name only
        if p is not None:
            seen.add(id(p))
        names.append(name)

    class _Unstreamable(Exception):
        pass

    def merged_module(module):
        """The module merge_and_unload leaves in place of `module`."""
        if ModulesToSaveWrapper is not None and isinstance(module, ModulesToSaveWrapper):
            active = [a for a in module.active_adapters if a in module.modules_to_save]
            if len(active) > 1:
                raise _Unstreamable
            return module.modules_to_save[active[0]] if active else module.original_module
        if AuxiliaryTrainingWrapper is not None and isinstance(module, AuxiliaryTrainingWrapper):
            raise _Unstreamable  # trainable tokens and the like: peft merges those
        return module

    sources = {}
    try:
        for name in names:
            path, _, leaf = name.rpartition(".")
            owner = merged_module(base)
            for part in path.split(".") if path else ():
                owner = merged_module(owner.get_submodule(part))
            lora = None
            if BaseTunerLayer is not None and isinstance(owner, BaseTunerLayer):
                if type(owner) is not LoraLinear:
                    raise _Unstreamable  # conv, embedding, quantised LoRA layers: peft merges those
                adapters = [a for a in owner.active_adapters if a in owner.lora_A]
                if owner.merged or any(a in owner.lora_variant or owner.lora_bias[a] for a in adapters):
                    raise _Unstreamable  # DoRA and other variants, LoRA bias: peft merges those
                if leaf == "weight":
                    lora = [(owner.lora_A[a].weight, owner.lora_B[a].weight, owner.scaling[a], owner.fan_in_fan_out)
                            for a in adapters]
                owner = owner.get_base_layer()
            if not isinstance(getattr(owner, leaf, None), torch.Tensor):
                raise ValueError(f"the saved model's tensor {name} has no source in {type(model).__name__}")
            sources[name] = _Source(owner, leaf, lora)
    except _Unstreamable:
        return None
    return sources


def stream_save(model, tokenizer, out_dir: str | os.PathLike, *, sources: dict | None = None, prepare=None,
                max_shard_size: int = STREAM_SHARD_BYTES) -> Path:
    """Collective: every rank calls it. Save `model` (sharded or not) as a plain model folder
    without holding it whole anywhere: tensor by tensor, every rank gathers one full value,
    rank 0 writes it into its place in a safetensors shard (the header is planned from the
    tensors' global shapes before any value exists) and every rank drops it. Shards follow
    HF's names, with `model.safetensors.index.json` when there are several; config.json is
    what save_pretrained writes (dtype, the plain class in `architectures`), plus the
    generation config and the tokenizer. Rank 0 publishes `out_dir` atomically; every rank
    returns once it exists.

    `sources` is `stream_sources(model)` (computed here when None). `prepare(model)` runs on
    rank 0 before the config is written (it may edit the config only: the weights are streamed
    from the model as it is).
    """
    import torch

    with torch.no_grad():  # the gathered values are written, never trained
        return _stream_save(model, tokenizer, Path(out_dir), sources, prepare, max_shard_size)


def _stream_save(model, tokenizer, out_dir: Path, sources, prepare, max_shard_size: int) -> Path:
    import contextlib

    from posttrain.averaging import INDEX_FILE, TensorInfo, _DTYPE_NAMES, _shard_header, _write_json, \
        _write_tensor, plan_shards, shard_file_names
    from posttrain.files import atomic_dir

    sources = stream_sources(model) if sources is None else sources
    if sources is None:
        raise ValueError(f"{type(model).__name__} cannot be streamed (see posttrain.gather); use save_final_model")
    infos = {}
    for name, src in sources.items():
        dtype, shape = src.meta()
        if dtype not in _DTYPE_NAMES:
            raise ValueError(f"tensor {name}: dtype {dtype} has no safetensors name")
        infos[name] = TensorInfo(dtype=_DTYPE_NAMES[dtype], shape=shape, file=Path())
    plan = plan_shards([(n, infos[n].nbytes) for n in sources], max_shard_size)
    files = shard_file_names(len(plan))
    main = is_main()
    with (atomic_dir(out_dir) if main else contextlib.nullcontext()) as tmp:
        for shard_names, file_name in zip(plan, files):
            with (open(tmp / file_name, "wb") if main else contextlib.nullcontext()) as f:
                if main:
                    f.write(_shard_header(shard_names, infos, {"format": "pt"}))
                for name in shard_names:
                    full = sources[name].value()  # collective
                    if main:
                        _write_tensor(f, full.cpu())
                    del full
                if main:
                    f.flush()
                    os.fsync(f.fileno())
        if main:
            if len(plan) > 1:
                weight_map = {n: fname for names, fname in zip(plan, files) for n in names}
                _write_json(tmp / INDEX_FILE, {"metadata": {"total_size": sum(i.nbytes for i in infos.values())},
                                               "weight_map": weight_map})
            _save_config(model, tmp, prepare)
            if tokenizer is not None:
                tokenizer.save_pretrained(str(tmp))
    barrier()
    return out_dir


def _save_config(model, folder: Path, prepare) -> None:
    """config.json and generation_config.json as save_pretrained writes them for the plain,
    merged model: its dtype, and its class (not FSDP2's wrapper, nor peft's) as architecture."""
    import copy

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if prepare is not None:
        prepare(base)
    config = copy.deepcopy(base.config)
    config.dtype = str(base.dtype).split(".")[1]
    config.architectures = [_plain_class(base).__name__]
    config.save_pretrained(str(folder))
    if base.can_generate():
        base.generation_config.save_pretrained(str(folder))


def save_final_model(trainer, tokenizer, out_dir: str | os.PathLike, *, prepare=None) -> Path:
    """Collective: every rank calls it after training. Saves the weights (FSDP2: streamed, one
    tensor at a time, `stream_save`; ZeRO-3 and what cannot be streamed: gathered on rank 0),
    LoRA merged, and rank 0 writes `out_dir` atomically (model + tokenizer); every rank returns
    once it exists.

    `prepare(model)` runs on rank 0 before saving, on the plain merged model (or, streamed, on
    the training model, whose config is the one saved), e.g. to set the pad token id in the
    config; it edits the config only.
    """
    out_dir = Path(out_dir)
    model = trainer.accelerator.unwrap_model(trainer.model)
    if _deepspeed_zero3(trainer):
        # DeepSpeed's own gather (zero3_save_16bit_model must be on in the accelerate config).
        state = trainer.accelerator.get_state_dict(trainer.model_wrapped)
        plain = None if not is_main() else plain_copy(model, state)
    elif is_sharded(model):
        sources = stream_sources(model)
        if sources is not None:
            return stream_save(model, tokenizer, out_dir, sources=sources, prepare=prepare)
        state = full_state_dict(model)  # what cannot be streamed (module docstring)
        plain = None if not is_main() else plain_copy(model, state)
    else:
        plain = model if is_main() else None

    merged = None
    if is_main():
        merged = merge_if_peft(plain)
        if prepare is not None:
            prepare(merged)
    return save_checkpoint(merged, tokenizer, out_dir)  # collective: rank 0 writes, all wait

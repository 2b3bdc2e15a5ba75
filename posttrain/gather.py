"""The final model of a training run under a launcher: how weights are gathered and saved.

The final model is gathered collectively, the trainer's way (FSDP2: a full state dict;
ZeRO-3: DeepSpeed's 16-bit gather), LoRA is merged on rank 0's plain CPU copy, and rank 0
publishes the folder atomically (`save_final_model`). Single process: a plain save.
"""

from __future__ import annotations

import os
from pathlib import Path

from posttrain.distributed import is_main
from posttrain.modeling import merge_if_peft, save_checkpoint


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


def save_final_model(trainer, tokenizer, out_dir: str | os.PathLike, *, prepare=None) -> Path:
    """Collective: every rank calls it after training. Gathers the weights, merges LoRA, and
    rank 0 writes `out_dir` atomically (model + tokenizer); every rank returns once it exists.

    `prepare(model)` runs on rank 0 on the plain, merged model before saving (e.g. to set the
    pad token id in its config).
    """
    out_dir = Path(out_dir)
    model = trainer.accelerator.unwrap_model(trainer.model)
    if _deepspeed_zero3(trainer):
        # DeepSpeed's own gather (zero3_save_16bit_model must be on in the accelerate config).
        state = trainer.accelerator.get_state_dict(trainer.model_wrapped)
        plain = None if not is_main() else plain_copy(model, state)
    elif is_sharded(model):
        state = full_state_dict(model)
        plain = None if not is_main() else plain_copy(model, state)
    else:
        plain = model if is_main() else None

    merged = None
    if is_main():
        merged = merge_if_peft(plain)
        if prepare is not None:
            prepare(merged)
    return save_checkpoint(merged, tokenizer, out_dir)  # collective: rank 0 writes, all wait

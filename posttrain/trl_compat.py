"""Every use posttrain makes of TRL's and transformers' private internals, fenced in one module.

Private methods and module attributes change without notice between releases; an override of a
method that was renamed is silently never called. So:

- `TESTED_VERSIONS` names the trl and transformers versions this code was tested with;
  `check_versions()` warns (`VersionMismatchWarning`) when the installed ones differ, and
  raises when POSTTRAIN_STRICT_VERSIONS=1.
- `PRIVATE_API` lists each private method we override or call, with the parameters we expect;
  `check_private_api()` raises `PrivateAPIChanged` naming the ones that are gone or changed. It
  runs when a trainer class below is first built, so a changed TRL fails at start-up, not as a
  silently wrong loss. `tests/test_trl_compat.py` pins both.

What lives here:

- `dpo_trainer_base()`: trl.DPOTrainer with its private hooks routed to public-named ones that
  posttrain.stages.dpo implements (pre-tokenized rows, the collator's columns, our reference pass and
  our loss), plus helpers over TRL's private state (metrics, the DeepSpeed reference engine, the
  LoRA reference context).
- `packed_sft_token_count(trainer, tokens)`: TRL's SFTTrainer token count kept true for a packed
  batch (posttrain.stages.sft), whose attention mask is 4D.
- `preallocated_cache(model, extra)`: a transformers KV cache whose layers (a subclass of the
  internal `DynamicLayer`) write into preallocated buffers (used by posttrain.engines).
"""

from __future__ import annotations

import contextlib
import inspect
import os
import warnings
from importlib import metadata

TESTED_VERSIONS = {"trl": "1.16.0", "transformers": "5.23.0"}

# "module:Class.method" or "module:function" -> the parameter names we rely on, in order.
PRIVATE_API: dict[str, tuple[str, ...]] = {
    # overridden by dpo_trainer_base
    "trl:DPOTrainer._prepare_dataset": ("self", "dataset", "processing_class", "args", "dataset_name"),
    "trl:DPOTrainer._set_signature_columns_if_needed": ("self",),
    "trl:DPOTrainer._precompute_ref_logps": ("self", "dataset", "name", "batch_size"),
    "trl:DPOTrainer._compute_loss": ("self", "model", "inputs", "return_outputs"),
    "trl:DPOTrainer.compute_ref_log_probs": ("self", "model", "inputs"),
    # called by it
    "trl.trainer.dpo_trainer:hash_module": ("module",),
    "trl.models:prepare_deepspeed": ("model", "accelerator"),
    "trl.models.utils:disable_gradient_checkpointing": ("model", "gradient_checkpointing_kwargs"),
    "trl.trainer.utils:use_adapter": ("model", "adapter_name"),
    # the fused head TRL puts on the policy: packed DPO rows pass pre-shifted `shift_labels` through it
    "trl.trainer.utils:add_fused_lm_head": ("model", "temperature", "cast_lm_head_to_fp32", "outputs"),
    # subclassed by preallocated_cache
    "transformers.cache_utils:DynamicLayer.lazy_initialization": ("self", "key_states", "value_states"),
    "transformers.cache_utils:DynamicLayer.update": ("self", "key_states", "value_states"),
    "transformers.cache_utils:DynamicLayer.batch_repeat_interleave": ("self", "repeats"),
    "transformers.cache_utils:DynamicLayer.batch_select_indices": ("self", "indices"),
    "transformers.cache_utils:Cache.__init__": ("self", "layers", "layer_class_to_replicate", "offloading",
                                                "offload_only_non_sliding"),
    # read by weight_conversions (posttrain.gather's streamed save)
    "transformers.conversion_mapping:get_model_conversion_mapping": ("model", "key_mapping", "hf_quantizer",
                                                                     "add_legacy"),
}
# Source fragments of TRL's own code that our overrides depend on (a rename breaks them silently).
PRIVATE_SOURCE: dict[str, tuple[str, ...]] = {
    # __init__ hashes the model through the module-level name (what `_skipped_model_hash` swaps),
    # runs our reference pass through `_precompute_ref_logps`, and keeps the state our helpers read.
    "trl:DPOTrainer.__init__": ("hash_module(", "self._precompute_ref_logps(", "self.precompute_ref_logps =",
                                "self._metrics =", "self._precompute_engine = None", "add_fused_lm_head("),
    # SFTTrainer counts a batch's tokens as its attention mask's sum (packed_sft_token_count)
    "trl:SFTTrainer.compute_loss": ('self.accelerator.gather_for_metrics(inputs["attention_mask"].sum())',
                                    "self._total_train_tokens += num_tokens_in_batch",
                                    'self._metrics[mode]["num_tokens"] = [self._total_train_tokens]'),
    # the fused forward scores pre-shifted labels when given them
    "trl.trainer.utils:add_fused_lm_head": ("shift_labels", "labels = shift_labels"),
}


class VersionMismatchWarning(UserWarning):
    """The installed trl or transformers is not the version posttrain was tested with."""


class PrivateAPIChanged(RuntimeError):
    """A private TRL / transformers method posttrain overrides or calls is gone or changed."""


def installed_versions() -> dict[str, str]:
    return {name: metadata.version(name) for name in TESTED_VERSIONS}


def check_versions() -> dict[str, tuple[str, str]]:
    """{package: (installed, tested)} for each that differs; warns (raises under POSTTRAIN_STRICT_VERSIONS=1)."""
    installed = installed_versions()
    diff = {k: (installed[k], v) for k, v in TESTED_VERSIONS.items() if installed[k] != v}
    if diff:
        what = ", ".join(f"{k} {got} (tested: {want})" for k, (got, want) in diff.items())
        msg = (f"posttrain overrides private trl/transformers methods tested with other versions: {what}. "
               "Run tests/test_trl_compat.py and tests/test_dpo.py, then update posttrain.trl_compat.TESTED_VERSIONS")
        if os.environ.get("POSTTRAIN_STRICT_VERSIONS") == "1":
            raise PrivateAPIChanged(msg)
        warnings.warn(msg, VersionMismatchWarning, stacklevel=2)
    return diff


def resolve(name: str):
    """The object named "module:attr.attr" (as in PRIVATE_API)."""
    import importlib

    module, _, path = name.partition(":")
    obj = importlib.import_module(module)
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def private_api_problems() -> list[str]:
    """One line per private name that is missing, has other leading parameters, or lost a source fragment."""
    problems = []
    for name, expected in PRIVATE_API.items():
        try:
            obj = resolve(name)
        except (ImportError, AttributeError) as e:
            problems.append(f"{name}: missing ({e})")
            continue
        params = tuple(inspect.signature(obj).parameters)
        if params[:len(expected)] != expected:
            problems.append(f"{name}: parameters {params}, expected {expected} first")
    for name, fragments in PRIVATE_SOURCE.items():
        try:
            source = inspect.getsource(resolve(name))
        except (ImportError, AttributeError, OSError, TypeError) as e:
            problems.append(f"{name}: source not readable ({e})")
            continue
        problems += [f"{name}: no longer contains {f!r}" for f in fragments if f not in source]
    return problems


def check_private_api() -> None:
    problems = private_api_problems()
    if problems:
        raise PrivateAPIChanged("the installed trl/transformers changed private code posttrain relies on "
                                f"(installed {installed_versions()}, tested {TESTED_VERSIONS}):\n  "
                                + "\n  ".join(problems))


@contextlib.contextmanager
def _skipped_model_hash():
    """DPOTrainer.__init__ without its `hash_module` call.

    With precompute_ref_log_probs, TRL hashes every weight (copied to the CPU: minutes and a
    model's size of host memory at 8B) for the key of its own reference cache. Only its
    `_precompute_ref_logps` reads that hash, and dpo_trainer_base replaces that method (our
    cache is keyed by the checkpoint's content hash, posttrain.stages.dpo.ref_cache_key), so the
    module-level name is swapped for a constant while __init__ runs and restored after.
    `PRIVATE_SOURCE` checks that __init__ still calls it by that name.
    """
    import trl.trainer.dpo_trainer as module

    original = module.hash_module
    module.hash_module = lambda m: "not-hashed: posttrain keys its reference cache itself"
    try:
        yield
    finally:
        module.hash_module = original


@contextlib.contextmanager
def packed_sft_token_count(trainer, tokens: int | None):
    """TRL's SFTTrainer.compute_loss, for a packed batch, with its token count kept true.

    TRL adds a training batch's `attention_mask.sum()` (over ranks) to `_total_train_tokens`, the
    `num_tokens` it logs; a packed batch's mask is 4D, whose sum counts visible (query, key) pairs.
    Around the call, the count is restored and `tokens` (the batch's real tokens over every rank)
    added instead; None (not training) leaves it alone, as TRL does.
    """
    before = trainer._total_train_tokens
    yield
    if tokens is not None:
        trainer._total_train_tokens = before + tokens
        trainer._metrics["train"]["num_tokens"] = [trainer._total_train_tokens]


_DPO_BASE = None


def dpo_trainer_base():
    """trl.DPOTrainer whose private hooks call public-named ones (built once, after the API checks).

    A subclass implements:
      - `signature_columns`: the dataset columns its collator needs (kept by the Trainer);
      - `precompute_reference(dataset, batch_size) -> dataset` (with the reference columns added);
      - `loss(model, inputs) -> scalar tensor`.
    Rows reach the collator as they are (no TRL tokenization).
    """
    global _DPO_BASE
    if _DPO_BASE is not None:
        return _DPO_BASE
    check_versions()
    check_private_api()
    from accelerate.utils import is_peft_model
    from trl import DPOTrainer
    from trl.models import prepare_deepspeed
    from trl.models.utils import disable_gradient_checkpointing
    from trl.trainer.utils import use_adapter

    class PosttrainDPOTrainer(DPOTrainer):
        signature_columns: tuple[str, ...] = ()

        def __init__(self, *args, **kwargs):
            with _skipped_model_hash():
                super().__init__(*args, **kwargs)

        # --- TRL's private hooks, routed
        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            return dataset

        def _set_signature_columns_if_needed(self):
            if self._signature_columns is None:
                self._signature_columns = list(self.signature_columns)

        def _precompute_ref_logps(self, dataset, name, batch_size):
            return self.precompute_reference(dataset, batch_size)

        def _compute_loss(self, model, inputs, return_outputs):
            if return_outputs:
                raise NotImplementedError(f"{type(self).__name__} does not return logits")
            return self.loss(model, inputs)

        def precompute_reference(self, dataset, batch_size):
            raise NotImplementedError

        def loss(self, model, inputs):
            raise NotImplementedError

        # --- helpers over TRL's private state
        @property
        def uses_precomputed_reference(self) -> bool:
            return bool(self.precompute_ref_logps)

        def record_metric(self, name: str, value: float) -> None:
            """Logged by TRL at each logging step as the mean of the values recorded since the last."""
            self._metrics["train" if self.model.training else "eval"][name].append(value)

        def reference_model_for_precompute(self):
            """The model the reference pass runs on before `train` prepares the policy.

            As TRL does: with DeepSpeed the parameters are still on the CPU (ZeRO-1/2) or
            partitioned (ZeRO-3) then, and an inference engine places and gathers them (built once).
            """
            if self.ref_model is None and self.is_deepspeed_enabled:
                if self._precompute_engine is None:
                    self._precompute_engine = prepare_deepspeed(self.model, self.accelerator)
                return self._precompute_engine
            return self.ref_model or self.model

        def reference_context(self):
            """No gradients, no gradient checkpointing, autocast, and for LoRA the adapters switched off
            (the reference is then the base model)."""
            import torch

            stack = contextlib.ExitStack()
            stack.enter_context(torch.no_grad())
            stack.enter_context(disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs))
            if self.ref_model is None and is_peft_model(self.model):
                unwrapped = self.accelerator.unwrap_model(self.model)
                stack.enter_context(use_adapter(unwrapped,
                                                adapter_name="ref" if "ref" in unwrapped.peft_config else None))
            stack.enter_context(self.accelerator.autocast())
            return stack

    _DPO_BASE = PosttrainDPOTrainer
    return PosttrainDPOTrainer


def preallocated_cache(model, extra: int):
    """A KV cache whose layers keep keys/values in a buffer with room for `extra` more tokens.

    DynamicCache appends with torch.cat, copying every layer's whole cache at every decode
    step (O(length) memory traffic per token, the largest cost of decoding B*K rows with a
    long shared prompt); here a step writes one slot. None for models with sliding-window or
    other non-full attention layers (they keep DynamicCache).
    """
    import torch
    from transformers.cache_utils import Cache, DynamicLayer

    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    layer_types = getattr(cfg, "layer_types", None) or []
    if getattr(cfg, "sliding_window", None) or any(t != "full_attention" for t in layer_types):
        return None

    class PreallocatedLayer(DynamicLayer):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.buffers = None  # (keys, values): [B, H, capacity, D]
            self.length = 0

        def _views(self):
            self.keys = self.buffers[0][:, :, :self.length]
            self.values = self.buffers[1][:, :, :self.length]

        def update(self, key_states, value_states, *args, **kwargs):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            new = key_states.shape[-2]
            if self.buffers is None or self.length + new > self.buffers[0].shape[-2]:
                grow = new + extra
                self.buffers = tuple(
                    torch.cat([b[:, :, :self.length], b.new_empty(*b.shape[:2], grow, b.shape[-1])], dim=-2)
                    if b is not None else s.new_empty(*s.shape[:2], grow, s.shape[-1])
                    for b, s in zip(self.buffers or (None, None), (key_states, value_states)))
            self.buffers[0][:, :, self.length:self.length + new] = key_states
            self.buffers[1][:, :, self.length:self.length + new] = value_states
            self.length += new
            self._views()
            return self.keys, self.values

        def batch_repeat_interleave(self, repeats: int) -> None:
            if self.buffers is not None:
                self.buffers = tuple(b.repeat_interleave(repeats, dim=0) for b in self.buffers)
                self._views()

        def batch_select_indices(self, indices) -> None:
            if self.buffers is not None:
                self.buffers = tuple(b[indices] for b in self.buffers)
                self._views()

    return Cache(layer_class_to_replicate=PreallocatedLayer)


def weight_conversions(model) -> list:
    """The weight transforms transformers applies to `model`'s checkpoint on load and reverts on
    save (v5 fuses MoE experts, renames some prefixes), the way save_pretrained finds them: the
    ones `from_pretrained` attached, else its class's default mapping (legacy renames and prefix
    changes left out, as save_pretrained leaves them out for a model built from a config). Empty
    for Llama-style models. posttrain.gather streams a model's tensors one at a time only when
    this is empty: a many-to-one conversion needs several tensors at once."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import PrefixChange
    except ImportError:  # a transformers from before load-time conversions: nothing is converted
        return []
    found = getattr(model, "_weight_conversions", None)
    if found is None:
        found = [x for x in get_model_conversion_mapping(model, add_legacy=False) if not isinstance(x, PrefixChange)]
    return list(found or [])

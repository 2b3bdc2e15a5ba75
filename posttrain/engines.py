"""The generation backends, in this process: transformers' shared prefill and vLLM.

posttrain.generation runs them in child processes (posttrain.cluster in Ray actors) on jobs
(posttrain.jobs); `generate_messages` is the plain path for a model already in memory. Only
the standard library and posttrain.jobs are imported at the top (torch, transformers and vLLM
inside the functions): the vLLM child imports this module in its own environment.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable

from posttrain.jobs import Generation, SamplingSettings


@dataclass
class EngineOptions:
    """How the backend runs (not what it samples): device, precision, parallelism."""

    dtype: str = "auto"
    """'auto' (bf16 on a GPU that has it, fp32 elsewhere), 'float32', 'bfloat16', 'float16'."""
    device: str = "auto"
    """transformers backend: 'auto', 'cpu', 'cuda', 'cuda:1', ..."""
    max_batch_sequences: int = 64
    """transformers backend: most sequences (prompts x K) decoded together."""
    tensor_parallel_size: int = 1
    """vLLM: GPUs per engine."""
    engines: int = 1
    """vLLM: engines run side by side on disjoint GPUs, each on a slice of the prompts."""
    gpu_memory_utilization: float = 0.9
    """vLLM: fraction of each GPU's memory the engine may take."""
    enable_prefix_caching: bool = True
    """vLLM: share a prompt's KV pages between its K outputs (and between equal prefixes)."""
    cpu_kv_cache_gib: int = 1
    """vLLM on CPU: memory for the KV cache (VLLM_CPU_KVCACHE_SPACE)."""
    trust_remote_code: bool = False
    distributed_executor_backend: str | None = None
    """vLLM: None (one process, or vLLM's own choice for TP); 'ray' when the engine is a Ray actor
    whose tensor-parallel workers go to its placement group (set by posttrain.cluster)."""

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EngineOptions:
        return cls(**d)


# --------------------------------------------------------------------------------------
# Sampling math (pure functions)
# --------------------------------------------------------------------------------------


def filter_top_p(logits, top_p: float):
    """Set logits outside the top-p nucleus to -inf.

    logits: [A, V]. Sort probabilities descending, p_(1) >= p_(2) >= ...; token (i) is kept
    iff sum_{j<i} p_(j) < top_p, i.e. the mass before it has not yet reached top_p. The most
    likely token is always kept. Returns logits [A, V].
    """
    import torch

    if top_p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = torch.softmax(sorted_logits.float(), dim=-1)
    mass_before = torch.cumsum(probs, dim=-1) - probs  # [A, V]: sum_{j<i} p_(j)
    drop_sorted = mass_before >= top_p
    drop_sorted[:, 0] = False
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def sample_next(logits, temperature: float, top_p: float, generator=None):
    """Next token per row. logits: [A, V] -> token ids [A].

    p = softmax(logits / temperature), restricted to the top-p nucleus and renormalised;
    temperature 0 is argmax.
    """
    import torch

    if temperature == 0:
        return torch.argmax(logits, dim=-1)
    scaled = filter_top_p(logits.float() / temperature, top_p)
    probs = torch.softmax(scaled, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def left_pad(seqs: list[list[int]], pad_id: int):
    """Left-pad token lists. Returns input_ids [B, L], attention_mask [B, L], position_ids [B, L].

    Positions count real tokens only (position = number of real tokens before it), so a
    padded prompt sees the same rotary positions as the unpadded one; pad positions get 0
    (they are masked out anyway).
    """
    import torch

    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        if s:
            ids[i, width - len(s):] = torch.tensor(s, dtype=torch.long)
            mask[i, width - len(s):] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids, mask, positions


# --------------------------------------------------------------------------------------
# transformers backend: shared prefill
# --------------------------------------------------------------------------------------


def shared_prefill_decode(model, prompt_ids: list[list[int]], settings: SamplingSettings, *,
                          pad_id: int, generator=None) -> list[list[list[int]]]:
    """Generate K continuations per prompt, prefilling each prompt once.

    prompt_ids: B token lists (no padding). Returns B lists of K generated token lists, each
    ending with a stop token or cut at max_new_tokens.

    1. Prefill the B prompts together (left padded): one forward over [B, L]; keep only the
       last position's logits [B, V].
    2. Repeat the KV cache, the mask and the logits K times along the batch: [B*K, ...].
       The first token of all K samples comes from the same distribution, so it is drawn K
       times from one set of logits, no recomputation.
    3. Decode [A, 1] per step for the A sequences still running; a sequence that emits a
       stop token is removed from the cache and the batch, so finished sequences cost
       nothing.
    """
    import torch
    from transformers import DynamicCache

    from posttrain.trl_compat import preallocated_cache

    k = settings.k
    device = next(model.parameters()).device
    stop = torch.tensor(sorted(settings.stop_token_ids) or [-1], device=device)
    ids, mask, positions = (t.to(device) for t in left_pad(prompt_ids, pad_id))
    cache = preallocated_cache(model, settings.max_new_tokens) or DynamicCache(config=model.config)
    with torch.inference_mode():
        out = model(input_ids=ids, attention_mask=mask, position_ids=positions,
                    past_key_values=cache, use_cache=True, logits_to_keep=1)
        logits = out.logits[:, -1, :].repeat_interleave(k, dim=0)  # [B*K, V]
        cache = out.past_key_values
        cache.batch_repeat_interleave(k)
        mask = mask.repeat_interleave(k, dim=0)  # [B*K, L]
        next_pos = mask.sum(-1)  # [B*K]: real tokens so far = position of the next token
        active = torch.arange(len(prompt_ids) * k, device=device)  # row -> sequence index
        outputs: list[list[int]] = [[] for _ in range(len(prompt_ids) * k)]
        for step in range(settings.max_new_tokens):
            tok = sample_next(logits, settings.temperature, settings.top_p, generator)  # [A]
            for seq, t in zip(active.tolist(), tok.tolist()):
                outputs[seq].append(t)
            if step == settings.max_new_tokens - 1:
                break
            keep = ~torch.isin(tok, stop)
            if not bool(keep.all()):
                if not bool(keep.any()):
                    break
                rows = keep.nonzero().squeeze(-1)
                cache.batch_select_indices(rows)
                mask, next_pos, tok, active = mask[rows], next_pos[rows], tok[rows], active[rows]
            mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=-1)
            out = model(input_ids=tok[:, None], attention_mask=mask, position_ids=next_pos[:, None],
                        past_key_values=cache, use_cache=True)
            logits = out.logits[:, -1, :]
            next_pos = next_pos + 1
    return [outputs[i * k:(i + 1) * k] for i in range(len(prompt_ids))]


class TransformersGenerator:
    """In-process shared-prefill generation with a transformers causal LM (a thing with a lifetime)."""

    def __init__(self, model_dir: str | os.PathLike | None = None, *, model=None, tokenizer=None,
                 options: EngineOptions | None = None):
        from posttrain import modeling

        self.options = options or EngineOptions()
        if model is None:
            if model_dir is None:
                raise ValueError("TransformersGenerator needs model_dir or model")
            model = modeling.load_causal_lm(model_dir, dtype=self.options.dtype, device=self.options.device,
                                            trust_remote_code=self.options.trust_remote_code)
        if tokenizer is None:
            tokenizer = modeling.load_tokenizer(model_dir, trust_remote_code=self.options.trust_remote_code)
        self.model = model.eval()
        self.tokenizer = tokenizer

    def generate(self, prompt_ids: list[list[int]], settings: SamplingSettings,
                 on_progress: Callable[[int], None] | None = None) -> list[Generation]:
        """`on_progress(n)` is called after each batch with the number of prompts done."""
        import torch

        if any(len(p) == 0 for p in prompt_ids):
            raise ValueError("transformers backend: a prompt has no tokens")
        device = next(self.model.parameters()).device
        generator = torch.Generator(device=device).manual_seed(settings.seed)
        per_batch = max(1, self.options.max_batch_sequences // settings.k)
        # Similar lengths together waste less compute on padding; results go back in order.
        order = sorted(range(len(prompt_ids)), key=lambda i: len(prompt_ids[i]))
        results: list[Generation | None] = [None] * len(prompt_ids)
        stop_ids = set(settings.stop_token_ids)
        pad_id = self.tokenizer.pad_token_id
        if pad_id is None:
            pad_id = 0
        for start in range(0, len(order), per_batch):
            idx = order[start:start + per_batch]
            seqs = shared_prefill_decode(self.model, [prompt_ids[i] for i in idx], settings,
                                         pad_id=pad_id, generator=generator)
            for i, samples in zip(idx, seqs):
                results[i] = Generation.from_token_ids(samples, stop_ids, self._decode)
            if on_progress is not None:
                on_progress(start + len(idx))
        return results  # type: ignore[return-value]

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)


def generate_messages(model, tokenizer, prompts: list[list[dict]], *, n: int = 1,
                       temperature: float = 1.0, greedy: bool = False,
                       max_new_tokens: int = 24, batch_size: int = 256,
                       seed: int = 0) -> list[list[dict]]:
    """`n` responses per prompt with transformers' own `model.generate`, in this process: for
    each prompt a list of {"text", "n_tokens", "finished"}. The plain path, for a model already
    in memory (the embedded world's builder and benchmarks' baselines); stages use
    `generate` (a child process, shared-prefill or vLLM).

    n_tokens counts the end-of-turn token when generated; finished says whether it was.
    Same seed, model and prompts give the same responses (on the same thread count).
    """
    import torch

    from posttrain import chat

    stop_ids = set(chat.end_of_turn_ids(tokenizer))
    stop_ids |= {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    texts = [tokenizer.apply_chat_template(p, add_generation_prompt=True, tokenize=False) for p in prompts]
    model.eval()
    out: list[list[dict]] = []
    prev_side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # generation continues from the last position of each row
    try:
        with torch.random.fork_rng(), torch.no_grad():
            torch.manual_seed(seed)
            for start in range(0, len(texts), batch_size):
                chunk = texts[start:start + batch_size]
                enc = tokenizer(chunk, return_tensors="pt", padding=True, add_special_tokens=False)
                gen = model.generate(
                    **enc, max_new_tokens=max_new_tokens,
                    # Plain softmax sampling: top_k=0 turns off transformers' default top-k
                    # of 50, which would cut the tail the temperature is meant to shape.
                    do_sample=not greedy, temperature=None if greedy else temperature,
                    top_p=None if greedy else 1.0, top_k=None if greedy else 0,
                    num_return_sequences=1 if greedy else n,
                    pad_token_id=tokenizer.pad_token_id,
                    eos_token_id=sorted(stop_ids),
                )
                new = gen[:, enc["input_ids"].shape[1]:].tolist()
                per_prompt = 1 if greedy else n
                for i in range(len(chunk)):
                    rows = []
                    for ids in new[i * per_prompt:(i + 1) * per_prompt]:
                        cut = next((j for j, t in enumerate(ids) if t in stop_ids), None)
                        body = ids if cut is None else ids[:cut]
                        rows.append({
                            "text": tokenizer.decode(body, skip_special_tokens=True),
                            "n_tokens": len(ids) if cut is None else cut + 1,
                            "finished": cut is not None,
                        })
                    out.append(rows * n if greedy else rows)
    finally:
        tokenizer.padding_side = prev_side
    return out


# --------------------------------------------------------------------------------------
# vLLM backend
# --------------------------------------------------------------------------------------


def _vllm_device_is_cpu() -> bool:
    import torch

    return not torch.cuda.is_available()


class VLLMEngine:
    """One vLLM `LLM` engine (a thing with a lifetime). Create it under `if __name__ == "__main__":`."""

    def __init__(self, model_dir: str | os.PathLike, options: EngineOptions | None = None, *,
                 max_model_len: int | None = None, seed: int = 0):
        options = options or EngineOptions()
        on_cpu = _vllm_device_is_cpu()
        if on_cpu:
            # In-process engine core and eager mode: start-up about 14 s instead of about 50 s on CPU.
            os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(options.cpu_kv_cache_gib))
        from vllm import LLM

        kwargs: dict[str, Any] = dict(
            model=str(model_dir), tokenizer=str(model_dir), dtype=_vllm_dtype(options.dtype, on_cpu),
            tensor_parallel_size=options.tensor_parallel_size, seed=seed,
            enable_prefix_caching=options.enable_prefix_caching, trust_remote_code=options.trust_remote_code,
        )
        if options.distributed_executor_backend is not None:
            kwargs["distributed_executor_backend"] = options.distributed_executor_backend
        if max_model_len is not None:
            kwargs["max_model_len"] = max_model_len  # no KV memory reserved for lengths never reached
        if on_cpu:
            kwargs["enforce_eager"] = True
            # vllm-cpu 0.32 crashes ("CPU Generator does not use offset") when a seeded request's
            # prefill is split into chunks, which happens as soon as K prompts' tokens exceed one
            # step's budget (seen with prefix caching off, 16 x 300 tokens). Whole prefills avoid it.
            kwargs["enable_chunked_prefill"] = False
            if max_model_len is not None:
                kwargs["max_num_batched_tokens"] = max(max_model_len, 8192)
        else:
            kwargs["gpu_memory_utilization"] = options.gpu_memory_utilization
        self.llm = LLM(**kwargs)
        self.tokenizer = self.llm.get_tokenizer()

    def generate(self, prompt_ids: list[list[int]], settings: SamplingSettings, *,
                 seed_offset: int = 0) -> list[Generation]:
        """Each prompt is one request with `SamplingParams(n=K)` and its own seed
        (settings.seed + seed_offset + its index), so a prompt's samples do not depend on
        which other prompts share the call or the engine."""
        from vllm import SamplingParams

        # vLLM refuses n > 1 with greedy decoding; the K greedy samples are one sample K times.
        greedy = settings.temperature == 0
        params = [
            SamplingParams(n=1 if greedy else settings.k, temperature=settings.temperature, top_p=settings.top_p,
                           max_tokens=settings.max_new_tokens, stop_token_ids=list(settings.stop_token_ids),
                           seed=settings.seed + seed_offset + i, skip_special_tokens=True)
            for i in range(len(prompt_ids))
        ]
        outs = self.llm.generate([{"prompt_token_ids": list(p)} for p in prompt_ids], params, use_tqdm=False)
        stop_ids = set(settings.stop_token_ids)
        results = []
        for out in outs:
            completions = sorted(out.outputs, key=lambda c: c.index)
            if greedy:
                completions = completions * settings.k
            # Decoded here rather than taking c.text: vLLM's incremental detokenizer holds back a
            # trailing partial UTF-8 character, so texts would differ from the transformers backend's.
            gen = Generation.from_token_ids([list(c.token_ids) for c in completions], stop_ids, self._decode)
            gen.finish_reasons = [str(c.finish_reason) for c in completions]
            results.append(gen)
        return results

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)


def run_vllm(model_dir: str | os.PathLike, prompt_ids: list[list[int]], settings: SamplingSettings,
             options: EngineOptions | None = None, *, seed_offset: int = 0) -> list[Generation]:
    """Load one vLLM engine in this process and generate. Call it under `if __name__ == "__main__":`."""
    engine = VLLMEngine(model_dir, options, max_model_len=max(len(p) for p in prompt_ids) + settings.max_new_tokens,
                        seed=settings.seed)
    return engine.generate(prompt_ids, settings, seed_offset=seed_offset)


def _vllm_dtype(dtype: str, on_cpu: bool) -> str:
    if dtype != "auto":
        return dtype
    # bf16 on CPU is slow and lossy on machines without AMX; vLLM's own "auto" picks it.
    return "float32" if on_cpu else "auto"

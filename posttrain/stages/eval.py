"""The `eval` stage, after every round: the round's final model on held-out prompts.

Metrics (in `round_NN/eval/record.json`):
- `task_score`: mean of the recipe's checker (`eval.checker`) over the responses it scores;
- `mean_reward`: mean reward (the round's RM, or the recipe's reward);
- `win_rate_vs_previous` / `win_rate_vs_initial`: share of prompts where the reward prefers
  this round's response to the previous round's / the initial policy's (ties count half);
- `mean_length` (generated tokens), `eot_rate` (responses that end with the end-of-turn
  token), `empty_rate` (responses that stop with no content);
- `rm_heldout_accuracy`: copied from this round's `rm` record;
- `variants` (with `eval.variants` and two or more DPO variants): each variant's `task_score`
  and `mean_reward` on the same prompts, so the averaged model can be compared with each
  model it averages; `average_minus_best_variant` is the task score (else reward) gap.
- `benchmarks` (with `eval.benchmarks`): per benchmark its numbers, the initial policy's (round
  1), the number of problems and the settings used (posttrain.benchmarks); the responses with
  their verdicts in `benchmarks/<model|initial>/`.
The initial policy's responses are generated once (round 1, output `initial_responses`) and
reused by later rounds while the model, prompts and settings are the same; the previous
round's responses come from its eval record.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from posttrain.benchmarks import data_file, main_metric, user_turn
from posttrain.files import atomic_write_json, hash_json, hash_path, iter_jsonl, read_json, write_jsonl
from posttrain.stage import Metrics, StageContext, StageDef, StageResult, path_field
from posttrain.stats import mean

log = logging.getLogger("posttrain")


def win_rate(ours: list[float | None], theirs: list[float | None]) -> float | None:
    """Share of pairs where ours > theirs, ties counting half; pairs with an abstention skipped."""
    pairs = [(a, b) for a, b in zip(ours, theirs, strict=True) if a is not None and b is not None]
    if not pairs:
        return None
    return sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in pairs) / len(pairs)


def load_eval_prompts(inputs: "EvalInputs", max_prompts: int | None) -> list:
    """The held-out prompts, each holding the conversation the policy sees (system prompts
    applied exactly as in sampling), which is what is rendered and scored."""
    from posttrain.data import load_prompts
    from posttrain.stages.sample import seen_conversation

    prompts = []
    for path in inputs.prompt_files:
        rows = load_prompts([path])
        for p in rows:
            p.capability = inputs.prompt_capabilities.get(path) or p.capability
            cap = inputs.capabilities.get(p.capability) if p.capability else None
            p.messages = seen_conversation(p, (cap or {}).get("system_prompt"))
        prompts.extend(rows)
    return prompts[:max_prompts] if max_prompts else prompts


def generate_responses(ctx: StageContext, model_dir: str | Path, prompts: list, label: str,
                       k: int | None = None, temperature: float | None = None,
                       max_new_tokens: int | None = None) -> list[dict]:
    """One row per (prompt, sample): id, sample index, text, n_tokens, finished. Sampling
    settings default to eval's own (a benchmark passes its own)."""
    from posttrain import chat
    from posttrain.generation import generate
    from posttrain.jobs import SamplingSettings
    from posttrain.modeling import load_tokenizer
    from posttrain.progress import bar
    from posttrain.stages.sample import engine_options

    cfg, r = ctx.config, ctx.recipe
    tok = load_tokenizer(model_dir, trust_remote_code=ctx.trust_remote_code)
    # The template writes BOS itself: the tokenizer must not add a second one.
    ids = [tok(chat.render_prompt(tok, p.messages), add_special_tokens=False)["input_ids"] for p in prompts]
    settings = SamplingSettings(
        k=k or cfg.samples_per_prompt, temperature=cfg.temperature if temperature is None else temperature,
        top_p=1.0, max_new_tokens=max_new_tokens or cfg.max_new_tokens, seed=r.seed, stop_token_ids=tuple(chat.end_of_turn_ids(tok)),
    )
    # The engines run as sampling's do (tensor parallel size, engines, memory, the cluster): a
    # model that needs TP > 1 to sample needs it to be evaluated.
    options = engine_options(r.sample, device=r.run.device, trust_remote_code=ctx.trust_remote_code)
    with bar(len(ids), f"round {ctx.round} eval: {label}", unit="prompt") as shown:
        gens = generate(model_dir, ids, settings, backend=cfg.backend, options=options,
                        vllm_python=r.sample.vllm.python, workdir=ctx.out_dir,
                        on_prompts=lambda done: shown.update(done - shown.n), cluster=r.sample.cluster)
    rows = []
    for p, g in zip(prompts, gens, strict=True):
        for i, (text, n, fin) in enumerate(zip(g.texts, g.n_tokens, g.finished)):
            rows.append({"id": p.id, "sample": i, "text": text, "n_tokens": n, "finished": fin})
    return rows


def _score(score, prompts: list, rows: list[dict]) -> list[float | None]:
    """`score` is what posttrain.cluster.scoring yields: checked scores, here or on the cluster."""
    by_id = {p.id: p for p in prompts}
    convs = [by_id[r["id"]].messages for r in rows]
    metas = [{**by_id[r["id"]].meta, "capability": by_id[r["id"]].capability} for r in rows]
    return score(convs, [r["text"] for r in rows], metas)


def _summaries(rows: list[dict], rewards, checks) -> dict:
    return {
        "mean_reward": mean(rewards),
        "task_score": mean(checks) if checks is not None else None,
        "mean_length": mean([r["n_tokens"] for r in rows]),
        "eot_rate": mean([1.0 if r["finished"] else 0.0 for r in rows]),
        "empty_rate": mean([1.0 if r["finished"] and not r["text"].strip() else 0.0 for r in rows]),
    }


def _responses(ctx: StageContext, path: Path, model_dir: str, prompts: list, label: str,
               cached: str | None = None, benchmark: dict | None = None) -> list[dict]:
    """The model's responses, written to `path`. Reused from `cached` or from `path` itself
    when they came from the same model (by content), settings, prompts and seed. `benchmark`:
    a benchmark's generation settings and data file hash instead of eval's own settings."""
    # benchmarks generate their own responses: adding one must not regenerate these
    identity = {"model": hash_path(model_dir), "eval": ctx.config.model_dump(mode="json", exclude={"benchmarks"}),
                "prompts": [p.id for p in prompts], "seed": ctx.recipe.seed}
    key = hash_json({**identity, "benchmark": benchmark} if benchmark else identity)
    for source in ([Path(cached)] if cached else []) + [path]:
        meta = source.with_suffix(".key.json")
        if source.is_file() and meta.is_file() and read_json(meta).get("key") == key:
            rows = list(iter_jsonl(source))
            if source != path:
                write_jsonl(path, rows)
                atomic_write_json(path.with_suffix(".key.json"), {"key": key})
            return rows
    gen = {k: benchmark[k] for k in ("k", "temperature", "max_new_tokens")} if benchmark else {}
    rows = generate_responses(ctx, model_dir, prompts, label, **gen)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_jsonl(path, rows)
    atomic_write_json(path.with_suffix(".key.json"), {"key": key})
    return rows


def _variant_responses(ctx: StageContext, models: list[str], prompts: list, out: Path) -> dict[str, list[dict]]:
    """Each DPO variant's responses, on the prompts and settings the round's model is evaluated
    with (kept in `variants/<name>.jsonl`, reused on resume), by variant name."""
    found = {}
    for model in models:
        name = Path(model).parent.name  # <dpo>/variants/<name>/model
        found[name] = _responses(ctx, out / "variants" / f"{name}.jsonl", model, prompts, f"DPO variant {name}")
    return found


def run_benchmarks(ctx: StageContext, out: Path) -> dict[str, dict]:
    """`eval.benchmarks` due this round, on the round's model (and the initial policy in round 1):
    per benchmark its numbers, the initial policy's, the number of problems and the settings
    that produced them. Responses, with their per-sample verdicts, go to
    `benchmarks/<model|initial>/<name>.jsonl`."""
    from posttrain.benchmarks import load_problems, score_humaneval, score_instructions
    from posttrain.data import Prompt

    inp: EvalInputs = ctx.inputs
    found = {}
    for spec, path in zip(ctx.config.benchmarks, inp.benchmark_files, strict=True):
        if not spec.runs_in(ctx.round):
            continue
        models = {"model": inp.final_model, **({"initial": inp.initial_model} if ctx.round == 1 else {})}
        if spec.name == "lm_eval":
            found[spec.label] = run_lm_eval(ctx, spec, path, models, out)
            continue
        problems = load_problems(spec, path)
        prompts = [Prompt(id=p.id, messages=[{"role": "user", "content": p.user}]) for p in problems]
        entry = {"problems": len(problems), "settings": {**spec.model_dump(mode="json"), "data_file": path,
                                                         "user_turn": user_turn(spec)}}
        gen = {"k": spec.n, "temperature": spec.temperature, "max_new_tokens": spec.max_new_tokens,
               "data": hash_path(path), "max_problems": spec.max_problems}
        for who, model in models.items():
            target = out / "benchmarks" / who / spec.file_name  # reused on resume while nothing changed
            rows = _responses(ctx, target, model, prompts, f"{spec.label} ({who})", benchmark=gen)
            rows = [{k: r[k] for k in ("id", "sample", "text", "n_tokens", "finished")} for r in rows]
            numbers = (score_humaneval(spec, problems, rows) if spec.name == "humaneval"
                       else score_instructions(spec, problems, rows, path))
            write_jsonl(target, rows)
            entry["numbers" if who == "model" else "initial"] = numbers
        found[spec.label] = entry
    return found


def run_lm_eval(ctx: StageContext, spec, include_path: str | None, models: dict[str, str], out: Path) -> dict:
    """An `lm_eval` benchmark (posttrain.lmeval) on each of `models`: lm-eval's numbers (every
    metric and its stderr), per task its documents, few-shot count and version, and the
    settings (lm-eval's version, model arguments, seeds, chat template, system prompt).
    Results, samples and lm-eval's log go to `benchmarks/<who>/`; the results are reused on
    resume while the model (by content), the task folder, the settings and lm-eval's version
    are the same."""
    from importlib import metadata

    from posttrain import lmeval
    from posttrain.modeling import pick_device, pick_dtype
    from posttrain.progress import bar

    r = ctx.recipe
    python = lmeval.vllm_python(r.sample.vllm.python) if spec.backend == "vllm" else None
    lmeval.require_lm_eval(python)
    system = None
    if spec.capability is not None:
        system = (ctx.inputs.capabilities.get(spec.capability) or {}).get("system_prompt")
    device = pick_device(r.run.device)
    dtype = str(pick_dtype(r.sample.dtype, device)).removeprefix("torch.")
    version = metadata.version("lm_eval")
    stem = Path(spec.file_name).stem
    entry: dict[str, Any] = {}
    for who, model in models.items():
        job = lmeval.job_for(spec, model, include_path, device=device, dtype=dtype, system_prompt=system,
                             trust_remote_code=ctx.trust_remote_code)
        folder = out / "benchmarks" / who
        same = {k: v for k, v in job.items() if k not in ("model_args", "include_path")}
        key = hash_json({"model": hash_path(model), "tasks": hash_path(include_path) if include_path else None,
                         "job": same, "model_args": {k: v for k, v in job["model_args"].items()
                                                      if k not in ("pretrained", "tokenizer")},
                         "lm_eval": version})
        done, meta = folder / f"{stem}.results.json", folder / f"{stem}.key.json"
        if done.is_file() and meta.is_file() and read_json(meta).get("key") == key:
            results = read_json(done)
        else:
            with bar(1, f"round {ctx.round} eval: {spec.label} ({who})", unit="run") as shown:
                results = lmeval.run_job(job, folder, stem, python, samples_file=spec.file_name)
                shown.update(1)
            atomic_write_json(meta, {"key": key})
        entry["numbers" if who == "model" else "initial"] = lmeval.numbers_from_results(results)
        if who == "model":
            entry["tasks"] = lmeval.task_facts(results)
            entry["problems"] = sum(t["documents"] or 0 for t in entry["tasks"].values())
            config = results.get("config") or {}
            entry["settings"] = {
                **spec.model_dump(mode="json"), "include_path": include_path, "lm_eval_version": version,
                "model_args": {k: v for k, v in job["model_args"].items() if k not in ("pretrained", "tokenizer")},
                "device": job["device"], "system_instruction": system,
                "fewshot_as_multiturn": job["fewshot_as_multiturn"],
                "seeds": {k: config.get(k) for k in ("random_seed", "numpy_seed", "torch_seed", "fewshot_seed")},
                "bootstrap_iters": config.get("bootstrap_iters"), "user_turn": user_turn(spec)}
    return entry


def run(ctx: StageContext) -> StageResult:
    """Evaluate the round's final model; see the module docstring for the metrics."""
    from posttrain.cluster import scoring
    from posttrain.reward import load_reward

    inp: EvalInputs = ctx.inputs
    cfg = ctx.config
    prompts = load_eval_prompts(inp, cfg.max_prompts)
    if not prompts:
        raise ValueError("evaluation needs held-out prompts: set data.eval_prompts in the recipe "
                         "(or eval.enabled: false)")
    log.debug("round %d eval: %d held-out prompts", ctx.round, len(prompts))
    out = Path(ctx.out_dir)
    # Responses of this round's model, of the initial policy (generated once, in round 1, and
    # reused while nothing changed) and of the previous round's model (from its eval record).
    rows = _responses(ctx, out / "responses.jsonl", inp.final_model, prompts, "this round's model")
    initial_rows = _responses(ctx, out / "initial_responses.jsonl", inp.initial_model, prompts,
                              "the initial policy", cached=inp.initial_responses)
    prev_rows = list(iter_jsonl(inp.previous_responses)) if inp.previous_responses else None
    if prev_rows is not None and [(x["id"], x["sample"]) for x in prev_rows] != [(x["id"], x["sample"]) for x in rows]:
        prev_rows = None  # evaluated on other prompts: no paired comparison

    variant_rows = _variant_responses(ctx, inp.variant_models, prompts, out)

    cluster = ctx.recipe.sample.cluster
    with scoring(ctx.reward, cluster) as score:  # with a cluster, the RM loads there, not here
        rewards = {"ours": _score(score, prompts, rows), "initial": _score(score, prompts, initial_rows)}
        if prev_rows is not None:
            rewards["previous"] = _score(score, prompts, prev_rows)
        variant_rewards = {name: _score(score, prompts, vrows) for name, vrows in variant_rows.items()}
    checks = checks_initial = None
    variant_checks: dict[str, list] = {}
    if cfg.checker is not None:
        checker = load_reward(cfg.checker.model_dump())
        with scoring(checker, cluster) as check:
            checks, checks_initial = _score(check, prompts, rows), _score(check, prompts, initial_rows)
            variant_checks = {name: _score(check, prompts, vrows) for name, vrows in variant_rows.items()}

    metrics = _summaries(rows, rewards["ours"], checks)
    initial = _summaries(initial_rows, rewards["initial"], checks_initial)
    metrics.update({f"initial_{k}": v for k, v in initial.items()})
    metrics["win_rate_vs_initial"] = win_rate(rewards["ours"], rewards["initial"])
    metrics["win_rate_vs_previous"] = win_rate(rewards["ours"], rewards["previous"]) if "previous" in rewards else None
    metrics["rm_heldout_accuracy"] = inp.rm_heldout_accuracy
    if variant_rows:
        metrics["variants"] = {name: {"task_score": mean(variant_checks[name]) if checks is not None else None,
                                      "mean_reward": mean(variant_rewards[name])} for name in variant_rows}
        key = "task_score" if checks is not None else "mean_reward"
        best = max((v[key] for v in metrics["variants"].values() if v[key] is not None), default=None)
        metrics["average_minus_best_variant"] = (metrics[key] - best if best is not None and metrics[key] is not None
                                                 else None)
    benchmarks = run_benchmarks(ctx, out)
    if benchmarks:
        metrics["benchmarks"] = benchmarks
    metrics["prompts"] = len(prompts)
    metrics["responses"] = len(rows)
    for row, rew, chk in zip(rows, rewards["ours"], checks or [None] * len(rows)):
        row["reward"], row["task_score"] = rew, chk
    write_jsonl(out / "responses.jsonl", rows)
    rel = out.relative_to(ctx.run_dir)
    return StageResult(outputs={"responses": (rel / "responses.jsonl").as_posix(),
                                "initial_responses": (rel / "initial_responses.jsonl").as_posix()},
                       metrics=metrics)


# ----------------------------------------------------------------------------- the stage


@dataclass
class EvalInputs:
    final_model: str = path_field()
    """The round's model (the `average` stage's)."""
    reward_model: str | None = path_field()
    """The round's RM: what `reward: rm` (or "@rm") scores with; None when the round trains none."""
    initial_model: str = path_field()
    """The initial policy, the baseline of `win_rate_vs_initial`."""
    prompt_files: list[str] = path_field()
    initial_responses: str | None = path_field(default=None)
    """Round 1's responses of the initial policy, reused when still valid."""
    previous_responses: str | None = path_field(default=None)
    """The previous round's evaluated responses (for `win_rate_vs_previous`)."""
    capabilities: dict[str, dict] = field(default_factory=dict)
    prompt_capabilities: dict[str, str] = field(default_factory=dict)
    rm_heldout_accuracy: float | None = None
    variant_models: list[str] = path_field(default_factory=list)
    """The round's DPO variants, evaluated beside the averaged model (`eval.variants`)."""
    benchmark_files: list[str | None] = path_field(default_factory=list)
    """The data file of each of `eval.benchmarks`, in order (their content is hashed); an
    lm_eval benchmark's include_path folder (None: lm-eval's own tasks only)."""


def _resolve(rnd) -> EvalInputs:
    from posttrain.stages.rm import rm_model

    r = rnd.recipe
    first, previous = rnd.record("eval", 1), rnd.record("eval", rnd.n - 1) if rnd.n > 1 else None
    return EvalInputs(
        final_model=rnd.output("average", "model"), reward_model=rm_model(rnd),
        initial_model=rnd.initial_policy(), prompt_files=[rnd.path(p.path) for p in r.data.eval_prompts],
        initial_responses=_output_or_none(rnd, first, "initial_responses") if rnd.n > 1 else None,
        previous_responses=_output_or_none(rnd, previous, "responses"),
        capabilities={name: c.model_dump() for name, c in r.capabilities.items()},
        prompt_capabilities={rnd.path(p.path): p.capability for p in r.data.eval_prompts if p.capability},
        rm_heldout_accuracy=_rm_heldout_accuracy(rnd),
        variant_models=_variant_models(rnd),
        benchmark_files=[data_file(b, rnd.path) for b in r.eval.benchmarks])


def _rm_heldout_accuracy(rnd) -> float | None:
    from posttrain.stage import typed_metrics

    rec = rnd.record("rm")
    return typed_metrics("rm", rec.metrics).heldout.accuracy if rec is not None else None


def _variant_models(rnd) -> list[str]:
    if not rnd.recipe.eval.variants or len(rnd.recipe.dpo.variants) < 2 or rnd.record("dpo") is None:
        return []
    return rnd.output("dpo", "variants")


def _output_or_none(rnd, record, name: str) -> str | None:
    if record is None or name not in record.outputs:
        return None
    return rnd.output(record.stage, name, record.round)


@dataclass(kw_only=True)
class EvalMetrics(Metrics):
    """Eval's numbers on the held-out prompts (see the module docstring); `initial_*` are the
    initial policy's."""

    task_score: float | None
    mean_reward: float | None
    win_rate_vs_previous: float | None
    mean_length: float | None = None
    eot_rate: float | None = None
    win_rate_vs_initial: float | None = None
    rm_heldout_accuracy: float | None = None
    initial_task_score: float | None = None
    initial_mean_reward: float | None = None
    initial_eot_rate: float | None = None
    variants: dict[str, dict] | None = None
    """Per DPO variant (`eval.variants`): its task_score and mean_reward."""
    average_minus_best_variant: float | None = None
    benchmarks: dict[str, dict] | None = None
    """Per benchmark label: numbers, initial, problems, settings (`run_benchmarks`)."""


def _headline(m: EvalMetrics) -> list[tuple[str, Any]]:
    # the held-out task score (the checker) or else the mean reward; win rate vs the
    # previous round's model
    first = ("task", m.task_score) if m.task_score is not None else ("reward", m.mean_reward)
    shown = [first, ("win_vs_prev", m.win_rate_vs_previous)]
    for label, b in list((m.benchmarks or {}).items())[:1]:  # the first benchmark's main number
        key = main_metric(label.split(":")[0], b["numbers"])
        shown.append((f"{label.split(':')[0]}:{key}", b["numbers"][key]))
    return shown


def _settings(recipe) -> dict:
    """Evaluation samples with the recipe's seed in every round, with sampling's engines
    (precision, batching, parallelism) on the run's device: all of it changes the responses."""
    from posttrain.stages.sample import engine_options

    engine = dataclasses.asdict(engine_options(recipe.sample, device=recipe.run.device))
    del engine["trust_remote_code"]  # whether a model's own code may run, not what it computes
    return {"seed": recipe.seed, "engine": engine, "vllm_python": recipe.sample.vllm.python}


STAGE = StageDef(name="eval", inputs=EvalInputs, resolve=_resolve, headline=_headline, settings=_settings,
                 uses_reward=True, required=False, enabled=lambda recipe: recipe.eval.enabled, metrics=EvalMetrics,
                 evaluation=True, legend="task: held-out task score (checker), else reward")

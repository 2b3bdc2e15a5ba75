"""Evaluation after every round: the round's final model on held-out prompts.

Metrics (in `round_NN/eval/record.json`):
- `task_score`: mean of the recipe's checker (`eval.checker`) over the responses it scores;
- `mean_reward`: mean reward (the round's RM, or the recipe's reward);
- `win_rate_vs_previous` / `win_rate_vs_initial`: share of prompts where the reward prefers
  this round's response to the previous round's / the initial policy's (ties count half);
- `mean_length` (generated tokens), `eot_rate` (responses that end with the end-of-turn
  token), `empty_rate` (responses that stop with no content);
- `rm_heldout_accuracy`: copied from this round's `rm` record.
The initial policy's responses are generated once (round 1) and reused by later rounds; the
previous round's responses come from its eval record.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from posttrain.files import iter_jsonl, write_jsonl
from posttrain.records import output_path, plan_stage, read_record, stage_dir, write_record

log = logging.getLogger("posttrain")


def win_rate(ours: list[float | None], theirs: list[float | None]) -> float | None:
    """Share of pairs where ours > theirs, ties counting half; pairs with an abstention skipped."""
    pairs = [(a, b) for a, b in zip(ours, theirs, strict=True) if a is not None and b is not None]
    if not pairs:
        return None
    return sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in pairs) / len(pairs)


def _mean(xs) -> float | None:
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def load_eval_prompts(rnd) -> list:
    """The held-out prompts, each holding the conversation the policy sees (system prompts
    applied exactly as in sampling), which is what is rendered and scored."""
    from posttrain.data import load_prompts
    from posttrain.sample import seen_conversation

    r = rnd.recipe
    prompts = []
    for ps in r.data.eval_prompts:
        rows = load_prompts([rnd.path(ps.path)])
        for p in rows:
            if ps.capability:
                p.capability = ps.capability
            cap = r.capabilities.get(p.capability) if p.capability else None
            p.messages = seen_conversation(p, cap.system_prompt if cap else None)
        prompts.extend(rows)
    if r.eval.max_prompts:
        prompts = prompts[: r.eval.max_prompts]
    return prompts


def generate_responses(model_dir: str | Path, prompts: list, rnd, workdir: Path, label: str = "generating"
                       ) -> list[dict]:
    """One row per (prompt, sample): id, sample index, text, n_tokens, finished."""
    from posttrain import chat
    from posttrain.generation import SamplingSettings, generate
    from posttrain.modeling import load_tokenizer
    from posttrain.progress import bar
    from posttrain.sample import engine_options

    r = rnd.recipe
    tok = load_tokenizer(model_dir, trust_remote_code=r.models.trust_remote_code)
    # The template writes BOS itself: the tokenizer must not add a second one.
    ids = [tok(chat.render_prompt(tok, p.messages), add_special_tokens=False)["input_ids"] for p in prompts]
    settings = SamplingSettings(
        k=r.eval.samples_per_prompt, temperature=r.eval.temperature, top_p=1.0,
        max_new_tokens=r.eval.max_new_tokens, seed=r.seed, stop_token_ids=tuple(chat.end_of_turn_ids(tok)),
    )
    # The engines run as sampling's do (tensor parallel size, engines, memory, the cluster): a
    # model that needs TP > 1 to sample needs it to be evaluated.
    options = engine_options(r.sample, device=r.run.device, trust_remote_code=r.models.trust_remote_code)
    with bar(len(ids), f"round {rnd.n} eval: {label}", unit="prompt") as shown:
        gens = generate(model_dir, ids, settings, backend=r.eval.backend, options=options,
                        vllm_python=r.sample.vllm.python, workdir=workdir,
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
        "mean_reward": _mean(rewards),
        "task_score": _mean(checks) if checks is not None else None,
        "mean_length": _mean([r["n_tokens"] for r in rows]),
        "eot_rate": _mean([1.0 if r["finished"] else 0.0 for r in rows]),
        "empty_rate": _mean([1.0 if r["finished"] and not r["text"].strip() else 0.0 for r in rows]),
    }


def evaluate_round(rnd, *, force: bool = False) -> dict:
    """Evaluate round `rnd.n`'s final model and write `round_NN/eval/record.json`."""
    from posttrain.cluster import scoring
    from posttrain.reward import load_reward

    run_dir, n, r = rnd.run_dir, rnd.n, rnd.recipe
    final_model = output_path(run_dir, rnd.records["average"], "model")
    rm_model = output_path(run_dir, rnd.records["rm"], "model")
    prompts = load_eval_prompts(rnd)
    if not prompts:
        raise ValueError("evaluation needs held-out prompts: set data.eval_prompts in the recipe "
                         "(or eval.enabled: false)")
    hashed = {
        "inputs": rnd.hasher.hash_paths({"final_model": str(final_model), "rm_model": str(rm_model),
                                         "prompts": [rnd.path(p.path) for p in r.data.eval_prompts]}),
        "config": r.eval.model_dump(mode="json"),
        "reward": rnd._reward_identity(),
    }
    plan = plan_stage(run_dir, n, "eval", hashed, force=force)
    if plan.action == "skip":
        log.info("round %d eval: finished earlier, skipped", n)
        return plan.record
    started = time.time()
    log.info("round %d eval: starting (%d held-out prompts)", n, len(prompts))
    out = stage_dir(run_dir, n, "eval")
    out.mkdir(parents=True, exist_ok=True)

    # Responses of this round's model; of the initial policy (generated once, in round 1's
    # eval folder); of the previous round's model (from its eval record).
    rows = _cached_or_generate(out / "responses.jsonl", final_model, prompts, rnd, out, "this round's model")
    initial_path = stage_dir(run_dir, 1, "eval") / "initial_responses.jsonl"
    initial_model = rnd.path(r.models.initial_policy or r.models.base)
    initial_rows = _cached_or_generate(initial_path, initial_model, prompts, rnd, out, "the initial policy")
    prev_rows = None
    if n > 1:
        prev = read_record(run_dir, n - 1, "eval")
        if prev is not None:
            prev_rows = list(iter_jsonl(output_path(run_dir, prev, "responses")))
            if [(x["id"], x["sample"]) for x in prev_rows] != [(x["id"], x["sample"]) for x in rows]:
                prev_rows = None  # evaluated on other prompts: no paired comparison

    reward = rnd.build_reward(str(rm_model))
    with scoring(reward, r.sample.cluster) as score:  # with a cluster, the RM loads there, not here
        rewards = {"ours": _score(score, prompts, rows), "initial": _score(score, prompts, initial_rows)}
        if prev_rows is not None:
            rewards["previous"] = _score(score, prompts, prev_rows)
    checks = checks_initial = None
    if r.eval.checker is not None:
        checker = load_reward(r.eval.checker.model_dump())
        with scoring(checker, r.sample.cluster) as check:
            checks, checks_initial = _score(check, prompts, rows), _score(check, prompts, initial_rows)

    metrics = _summaries(rows, rewards["ours"], checks)
    initial = _summaries(initial_rows, rewards["initial"], checks_initial)
    metrics.update({f"initial_{k}": v for k, v in initial.items()})
    metrics["win_rate_vs_initial"] = win_rate(rewards["ours"], rewards["initial"])
    metrics["win_rate_vs_previous"] = win_rate(rewards["ours"], rewards["previous"]) if "previous" in rewards else None
    rm_metrics = rnd.records["rm"].get("metrics", {})
    metrics["rm_heldout_accuracy"] = (rm_metrics.get("heldout") or {}).get("accuracy")
    metrics["prompts"] = len(prompts)
    metrics["responses"] = len(rows)
    for row, rew, chk in zip(rows, rewards["ours"], checks or [None] * len(rows)):
        row["reward"], row["task_score"] = rew, chk
    write_jsonl(out / "responses.jsonl", rows)
    outputs = {"responses": str((out / "responses.jsonl").relative_to(run_dir))}
    record = write_record(run_dir, n, "eval", plan=plan, outputs=outputs, metrics=metrics, started=started)
    shown = " ".join(f"{label}={metrics[k]:.3f}" for k, label in (
        ("task_score", "task"), ("mean_reward", "reward"), ("win_rate_vs_previous", "win_vs_prev"),
        ("eot_rate", "eot")) if isinstance(metrics.get(k), float))
    log.info("round %d eval: done in %.0f s · %s", n, record["timing"]["seconds"], shown)
    return record


def _cached_or_generate(path: Path, model_dir, prompts: list, rnd, workdir: Path, label: str) -> list[dict]:
    """Responses already generated by the same model, settings and prompts are reused."""
    from posttrain.files import atomic_write_json, hash_json, read_json

    key = hash_json({"model": rnd.hasher.hash_paths(str(model_dir)), "eval": rnd.recipe.eval.model_dump(mode="json"),
                     "prompts": [p.id for p in prompts], "seed": rnd.recipe.seed})
    meta = path.with_suffix(".key.json")
    if path.exists() and meta.exists() and read_json(meta).get("key") == key:
        return list(iter_jsonl(path))
    rows = generate_responses(model_dir, prompts, rnd, workdir, label)
    write_jsonl(path, rows)
    atomic_write_json(meta, {"key": key})
    return rows

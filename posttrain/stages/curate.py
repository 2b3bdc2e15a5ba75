"""The `curate` stage: data quality control between `sample` and `sft` (Llama 3 report, section 4.2.3).

The paper cleans and prunes each round's SFT data before training: rule-based cleaning,
quality (RM top quartile and a model as judge, their union), difficulty, and semantic
deduplication. The filters are pure functions in posttrain.curate (`filters`: rules, quality,
`curate_rows`; `dedup`: k-means and greedy keep; `models`: embeddings and judge prompts;
`config`: the recipe section); this module is the stage: it reads the rows, asks the models
for the signals the enabled filters need (each cached under work/, so a killed stage does not
score or embed twice), applies the filters and writes what sft and dpo read.

Inputs: `CurateInputs`. Outputs: `dropped` (dropped.jsonl: one row per dropped row with every
reason), `report` (report.json: counts and thresholds); unless dry_run also `top1` and `sft`
(kept rows, TRL `messages` rows) and, with `preferences`, `preferences` (kept preference rows).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# The curation library's public names, importable from the stage as before the split.
from posttrain.curate.config import (
    DEFAULT_JUDGE_PROMPT,
    CurateConfig,
    DedupConfig,
    JudgeConfig,
    RMQualityConfig,
    RulesConfig,
    RuleSpec,
)
from posttrain.curate.dedup import DedupResult, greedy_dedup, normalise, semantic_dedup
from posttrain.curate.filters import (
    CurationRow,
    Decision,
    Scores,
    clean_preferences,
    curate_rows,
    dialog_text,
    parse_judge,
    percentile_ranks,
    priority,
    quantile_threshold,
    reason_name,
    response_text,
    rm_high_quality,
    rule_text,
    rule_violations,
)
from posttrain.curate.models import embed_dialogs, judge_prompt_ids
from posttrain.stage import DataRow, Metrics, StageDef, fmt, path_field

log = logging.getLogger("posttrain")

__all__ = [
    "DEFAULT_JUDGE_PROMPT", "STAGE", "CurateConfig", "CurateInputs", "CurationRow", "Decision", "DedupConfig",
    "DedupResult", "JudgeConfig", "RMQualityConfig", "RuleSpec", "RulesConfig", "Scores", "clean_preferences",
    "curate_rows", "curated", "dialog_text", "embed_dialogs", "greedy_dedup", "judge_prompt_ids", "model_scores",
    "normalise", "parse_judge", "percentile_ranks", "priority", "quantile_threshold", "response_text",
    "rm_high_quality", "rule_violations", "run", "semantic_dedup",
]


# ----------------------------------------------------------------------------- the rows and their signals


def _load_rows(ctx) -> list[CurationRow]:
    from posttrain import data, files

    rows = []
    top1 = ctx.inputs.top1_file
    if top1:
        for raw in files.iter_jsonl(top1):
            rows.append(CurationRow(raw["id"], raw["messages"], "top1", "last_turn", raw))
    sft_targets = ctx.recipe.sft.targets if ctx.recipe is not None else "all_turns"
    for ex in data.load_sft([str(p) for p in ctx.inputs.sft_files]):
        raw = {"id": ex.id, "messages": ex.messages}
        if ex.capability is not None:
            raw["capability"] = ex.capability
        rows.append(CurationRow(ex.id, ex.messages, "sft", sft_targets, raw))
    seen: dict[str, str] = {}
    for r in rows:
        if r.id in seen:
            raise ValueError(f"curate: row id {r.id!r} appears in the {seen[r.id]} rows and again in the {r.kind} rows")
        seen[r.id] = r.kind
    return rows


def _cached(path: Path, key: str, compute):
    """compute() once per key: its JSON-able result is written atomically under work/."""
    from posttrain import files

    if path.is_file():
        got = files.read_json(path)
        if got.get("key") == key:
            return got["value"]
    value = compute()
    files.atomic_write_json(path, {"key": key, "value": value})
    return value


def _rows_key(rows: list[CurationRow], model: str, *parts) -> str:
    """What a cached model signal depends on: the rows, the model's content, the settings."""
    from posttrain.files import hash_json, hash_path

    return hash_json([[r.id, r.messages] for r in rows] + [hash_path(model)] + [str(p) for p in parts])


def _rm_scores(ctx, rows, work: Path) -> list[float | None]:
    from posttrain import reward as reward_api
    from posttrain.reward import RMReward

    cfg: CurateConfig = ctx.config
    path = ctx.inputs.reward_model
    if not path:
        raise ValueError("curate: rm_quality is on but the stage got no reward_model input")

    def compute():
        rm = RMReward(path, batch_size=cfg.rm_quality.batch_size, device=_device(ctx),
                      trust_remote_code=ctx.trust_remote_code)
        with reward_api.active(rm):
            return rm.score([r.messages[:-1] for r in rows], [r.messages[-1]["content"] for r in rows])

    return _cached(work / "rm_scores.json", _rows_key(rows, path), compute)


def _device(ctx) -> str:
    return ctx.recipe.run.device if ctx.recipe is not None else "auto"


def _judge(ctx, rows, work: Path) -> list[str]:
    from posttrain import chat, modeling
    from posttrain.engines import EngineOptions
    from posttrain.generation import generate
    from posttrain.jobs import SamplingSettings

    cfg: JudgeConfig = ctx.config.judge
    model = ctx.inputs.judge_model

    def compute():
        tok = modeling.load_tokenizer(model, trust_remote_code=ctx.trust_remote_code)
        ids = judge_prompt_ids(tok, cfg.prompt, rows)
        settings = SamplingSettings(k=1, temperature=0.0, max_new_tokens=cfg.max_new_tokens, seed=ctx.seed,
                                    stop_token_ids=tuple(chat.end_of_turn_ids(tok)))
        gens = generate(model, ids, settings, backend=cfg.backend, workdir=work,
                        options=EngineOptions(device=_device(ctx), trust_remote_code=ctx.trust_remote_code))
        return [g.texts[0] for g in gens]

    return _cached(work / "judge.json", _rows_key(rows, model, cfg.prompt, cfg.max_new_tokens), compute)


def _embeddings(ctx, rows, work: Path):
    import numpy as np

    from posttrain import files, progress

    cfg: DedupConfig = ctx.config.dedup
    model = ctx.inputs.embedding_model
    key = _rows_key(rows, model, cfg.max_length)
    path, keyfile = work / "embeddings.npy", work / "embeddings.key"
    if path.is_file() and keyfile.is_file() and keyfile.read_text() == key:
        return np.load(path)
    with progress.bar(len(rows), f"round {ctx.round} curate: embedding", unit="row") as bar:
        emb = embed_dialogs(model, [dialog_text(r.messages) for r in rows], batch_size=cfg.batch_size,
                            max_length=cfg.max_length, device=_device(ctx), trust_remote_code=ctx.trust_remote_code,
                            on_batch=lambda done: bar.update(done - bar.n))
    keyfile.unlink(missing_ok=True)  # a key names the array beside it: never an older one
    files.atomic_write_bytes(path, _npy_bytes(emb))
    files.atomic_write_text(keyfile, key)
    return emb


def _npy_bytes(arr) -> bytes:
    import io

    import numpy as np

    buf = io.BytesIO()
    np.save(buf, arr)
    return buf.getvalue()


def model_scores(ctx, rows: list[CurationRow], work: Path) -> Scores:
    """The model signals the enabled filters need (each cached under work/)."""
    cfg: CurateConfig = ctx.config
    scores = Scores()
    if cfg.rm_quality.enabled:
        scores.rm = _rm_scores(ctx, rows, work)
    if cfg.judge.enabled:
        scores.judge_reply = _judge(ctx, rows, work)
        parsed = [parse_judge(t, cfg.judge.quality_pattern, cfg.judge.difficulty_pattern) for t in scores.judge_reply]
        scores.judge_quality = [q for q, _ in parsed]
        scores.judge_difficulty = [d for _, d in parsed]
    if cfg.dedup.enabled:
        survivors = rows
        if cfg.rules.enabled:  # embeddings are only needed for rows the rules keep
            survivors = [r for r in rows if not rule_violations(rule_text(r, cfg.rules), cfg.rules.rules)]
        import numpy as np

        emb = _embeddings(ctx, survivors, work)
        full = np.zeros((len(rows), emb.shape[1] if len(emb) else 1), dtype=np.float32)
        at = {r.id: i for i, r in enumerate(survivors)}
        for i, r in enumerate(rows):
            if r.id in at:
                full[i] = emb[at[r.id]]
        scores.embeddings = full
    return scores


def _preference_row(p) -> dict:
    row = {"id": p.id, "prompt": p.prompt, "chosen": [{"role": "assistant", "content": p.chosen}],
           "rejected": [{"role": "assistant", "content": p.rejected}]}
    if p.edited is not None:
        row["edited"] = [{"role": "assistant", "content": p.edited}]
    if p.strength is not None:
        row["strength"] = p.strength
    if p.capability is not None:
        row["capability"] = p.capability
    return row


# ----------------------------------------------------------------------------- the stage


def run(ctx):
    from posttrain.stage import StageResult
    from posttrain.training import WORK

    cfg: CurateConfig = ctx.config
    out = Path(ctx.out_dir)
    work = out / WORK
    work.mkdir(parents=True, exist_ok=True)
    rows = _load_rows(ctx)
    scores = model_scores(ctx, rows, work)
    decisions, summary = curate_rows(rows, cfg, scores, seed=ctx.seed)
    dropped = _dropped_rows(rows, decisions, scores)
    rel = out.relative_to(ctx.run_dir) if out.is_relative_to(ctx.run_dir) else out
    outputs: dict[str, str] = {}
    pref_summary = _clean_preference_batch(ctx, out, rel, dropped, outputs) if cfg.preferences else None
    if not cfg.dry_run:
        _write_kept(ctx, out, rel, rows, decisions, outputs)
    _write(out / "dropped.jsonl", dropped, rel, outputs, "dropped")
    metrics = _metrics(cfg, rows, decisions, summary, scores, dropped, pref_summary)
    _write(out / "report.json", metrics, rel, outputs, "report")
    log.info("curate: kept %d of %d rows (%s)%s", summary["kept"], summary["rows"],
             ", ".join(f"{k}: {v}" for k, v in summary["dropped_by_reason"].items()) or "nothing dropped",
             " [dry run: sft trains on every row]" if cfg.dry_run else "")
    return StageResult(outputs=outputs, metrics=metrics)


def _write(path: Path, content, rel: Path, outputs: dict[str, str], name: str) -> None:
    """One output, written atomically (a list as JSONL, a dict as JSON) and recorded under `name`."""
    from posttrain import files

    if isinstance(content, dict):
        files.atomic_write_json(path, content)
    else:
        files.write_jsonl(path, content)
    outputs[name] = str(rel / path.name)


def _dropped_rows(rows: list[CurationRow], decisions: list[Decision], scores: Scores) -> list[dict]:
    """One entry per dropped row: its first reason, every reason, the judge's reply, the dialog."""
    dropped = []
    for i, (r, d) in enumerate(zip(rows, decisions)):
        if d.keep:
            continue
        entry = {"id": r.id, "kind": r.kind, "reason": reason_name(d.reasons[0]), "reasons": d.reasons}
        if scores.judge_reply is not None:
            entry["judge_reply"] = scores.judge_reply[i]
        entry["messages"] = r.messages
        dropped.append(entry)
    return dropped


def _clean_preference_batch(ctx, out: Path, rel: Path, dropped: list[dict], outputs: dict[str, str]) -> dict:
    """`curate.preferences`: the rules over this round's DPO rows; the dropped ones join `dropped`."""
    from collections import Counter

    from posttrain import data

    cfg: CurateConfig = ctx.config
    prefs = data.load_preferences([str(p) for p in ctx.inputs.preference_files])
    kept_prefs, dropped_prefs = clean_preferences(prefs, cfg.rules.rules if cfg.rules.enabled else [])
    dropped += dropped_prefs
    if not cfg.dry_run:
        _write(out / "preferences.jsonl", [_preference_row(p) for p in kept_prefs], rel, outputs, "preferences")
    return {"read": len(prefs), "kept": len(kept_prefs),
            "dropped_by_reason": dict(Counter(d["reason"] for d in dropped_prefs))}


def _write_kept(ctx, out: Path, rel: Path, rows: list[CurationRow], decisions: list[Decision],
                outputs: dict[str, str]) -> None:
    """The kept top-1 and SFT rows, as read: what sft trains on."""
    for kind, present in (("top1", ctx.inputs.top1_file), ("sft", ctx.inputs.sft_files)):
        if present:
            kept = [r.raw for r, d in zip(rows, decisions) if d.keep and r.kind == kind]
            _write(out / f"{kind}.jsonl", kept, rel, outputs, kind)


def _metrics(cfg: CurateConfig, rows, decisions, summary: dict, scores: Scores, dropped: list[dict],
             pref_summary: dict | None) -> dict:
    by_kind = {kind: {"read": sum(r.kind == kind for r in rows),
                      "kept": sum(d.keep for r, d in zip(rows, decisions) if r.kind == kind)}
               for kind in ("top1", "sft")}
    return {
        **summary,
        "dry_run": cfg.dry_run,
        "by_kind": by_kind,
        "filters": [name for name in ("rules", "rm_quality", "judge", "dedup") if getattr(cfg, name).enabled],
        "preferences": pref_summary,
        "rm_score_mean_kept": _mean([s for s, d in zip(scores.rm or [], decisions) if d.keep and s is not None]),
        "rm_score_mean_dropped": _mean([s for s, d in zip(scores.rm or [], decisions)
                                        if not d.keep and s is not None]),
        "dropped_examples": [{k: v for k, v in d.items() if k != "messages"}
                             | {"response": d["messages"][-1]["content"][:200]}
                             for d in dropped[:cfg.show_dropped] if "messages" in d],
    }


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


@dataclass
class CurateInputs:
    top1_file: str | None = path_field(default=None)
    """This round's top-1 samples (the `sample` stage's `top1`)."""
    sft_files: list[str] = path_field(default_factory=list)
    """The recipe's SFT data (`data.sft`)."""
    reward_model: str | None = path_field(default=None)
    """This round's RM, when `rm_quality` is on (or dedup embeds with it)."""
    judge_model: str | None = path_field(default=None)
    """The judge (`judge.model`: the round's policy or a folder), when `judge` is on."""
    embedding_model: str | None = path_field(default=None)
    """What dedup embeds with: `dedup.embedding_model`, else the policy or the RM."""
    preference_files: list[str] = path_field(default_factory=list)
    """The preference batches this round's dpo reads, when `preferences` is on."""


def _resolve(rnd) -> CurateInputs:
    from posttrain.stage import get

    c: CurateConfig = rnd.recipe.curate
    policy = rm = None
    if (c.judge.enabled and c.judge.model == "policy") or (
            c.dedup.enabled and c.dedup.embedding_model is None and c.dedup.embed_with == "policy"):
        policy = get("sample").resolve(rnd).policy_model  # the model this round sampled from
    if c.rm_quality.enabled or (c.dedup.enabled and c.dedup.embedding_model is None and c.dedup.embed_with == "rm"):
        rm = rnd.output("rm", "model")
    judge = None
    if c.judge.enabled:
        judge = policy if c.judge.model == "policy" else rnd.path(c.judge.model)
    embed = None
    if c.dedup.enabled:
        embed = rnd.path(c.dedup.embedding_model) if c.dedup.embedding_model else (
            policy if c.dedup.embed_with == "policy" else rm)
    return CurateInputs(
        top1_file=rnd.output("sample", "top1"), sft_files=[rnd.path(p) for p in rnd.recipe.data.sft],
        reward_model=rm if c.rm_quality.enabled else None, judge_model=judge, embedding_model=embed,
        preference_files=rnd.preference_files(only_latest=rnd.recipe.dpo.latest_batch_only) if c.preferences else [])


@dataclass(kw_only=True)
class CurateMetrics(Metrics):
    kept: int | None
    dropped: int | None
    dropped_by_reason: dict[str, int] | None
    """Rows dropped, by their first reason (rule:<name>, quality, duplicate)."""
    dry_run: bool | None
    rows: int | None = None
    contaminated: dict[str, int] | None = None


def _headline(m: CurateMetrics) -> list[tuple[str, Any]]:
    # rows kept and dropped, then the drops by their first reason (rule:<name>, quality, duplicate)
    pairs = [("kept", m.kept), ("dropped", m.dropped)]
    pairs += list((m.dropped_by_reason or {}).items())
    if m.dry_run:
        pairs.append(("dry_run", "yes"))
    return pairs


def _data_row(m: CurateMetrics) -> DataRow:
    # kept rows go on to sft ("trained" here: handed on)
    return DataRow("rows (dry run: none removed)" if m.dry_run else "rows", m.rows, f"{fmt(m.kept)} kept",
                   m.dropped_by_reason or {}, None, m.contaminated)


def curated(rnd, name: str, n: int | None = None) -> str | None:
    """The curate stage's output `name` in round `n` when that round curated (and not as a dry
    run), else None: sft and dpo then read the uncurated rows."""
    rec = rnd.record("curate", n)
    if rec is None or name not in rec.outputs:
        return None
    return rnd.output("curate", name, n)


def _settings(recipe) -> dict:
    # SFT rows are judged on the turns sft trains on; the RM and judge run on the run's device
    return {"sft_targets": recipe.sft.targets, "device": recipe.run.device}


STAGE = StageDef(name="curate", inputs=CurateInputs, resolve=_resolve, headline=_headline, required=False,
                 settings=_settings, enabled=lambda recipe: recipe.curate.enabled, metrics=CurateMetrics,
                 data_row=_data_row, status_column="when_run",
                 legend="rows kept, dropped, and dropped by first reason (a column only in runs that curate)")

"""The `annotate` step: the next round's preference batch, from the latest models.

Llama 3 report, section 4.2.1: each round collects new preference annotations on responses
sampled from the latest models; for each prompt, two responses from two different models,
labelled with a strength and optionally edited. After the round's model exists:

1. **requests**: for `comparisons` prompts drawn from the pool (`annotate.prompts`), one
   response from each of the two models `annotate.models` names, each with its own sampling
   setup (`annotate.sampling`), written to `requests.jsonl` (one row per comparison, id
   `r<round>-<prompt id>`, with each response's model and sampling settings). Which model
   is response "a" is drawn per request, so position never tells a person which is which.
   Pairs with an unfinished, empty or identical response are not asked (counted). The
   manifest `requests.json` is written last, with a hash of what made the requests; a run
   with other inputs starts the requests (and their labels) again; the earlier labels are
   kept aside (`labels.superseded-<time>.jsonl`), never deleted.
2. **labels**: the annotator (`annotate.annotator`, posttrain.annotate.base) is asked for every
   request not yet labelled; answers are checked (edits too: posttrain.annotate.edits) and
   appended to `labels.jsonl` with their time and source (labels imported with `posttrain
   annotate import` land there too; the latest label of a request counts). While some are
   missing the step ends as *waiting* (`waiting.json`: how many are done, and where to label), not failed: the
   next run asks again and goes on from there.
3. **the batch**: `preferences.jsonl`, TRL's conversational preference rows plus `strength`,
   `edited` (when the annotator edited the preferred response), and where each side came
   from (`chosen_model`, `rejected_model`); abstentions are skipped and counted.

Inputs (`AnnotateInputs`): the two models (folders resolved from records), their names in
the recipe, the prompt pool. `ctx.annotator`: a ready annotator (the orchestrator builds the
recipe's, or passes an object given from Python). Outputs: `requests`, `labels`,
`preferences`. The next rounds find the batch through `annotated_batches` (from records).
"""

from __future__ import annotations

import logging
import os
import random
import shutil
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from posttrain import files, progress
from posttrain.annotate.base import (
    AnnotatorSpec,
    Label,
    Request,
    Response,
    annotator_name,
    attach,
    checked_annotate,
    load_annotator,
    where,
)
from posttrain.data import STRENGTHS
from posttrain.schema import BatchSize, Count, StrictModel, Tokens
from posttrain.stage import (
    WAITING_FILE,
    DataRow,
    Metrics,
    RoundError,
    StageContext,
    StageDef,
    StageResult,
    StageWaiting,
    fmt,
    path_field,
)

log = logging.getLogger(__name__)

MANIFEST_VERSION = 1
REQUESTS, MANIFEST, LABELS, WAITING, BATCH = ("requests.jsonl", "requests.json", "labels.jsonl", WAITING_FILE,
                                              "preferences.jsonl")

MODEL_CHOICE = r"^(round|previous|sft|dpo:\d+)$"


class SamplingSetup(StrictModel):
    """How one model's response is sampled."""

    temperature: float = Field(1.0, ge=0)
    """Softmax temperature; 0 is greedy."""
    top_p: float = Field(1.0, gt=0, le=1)
    """Nucleus sampling."""
    max_new_tokens: Tokens = 256
    """Longest response in tokens, end-of-turn included."""


class AnnotateConfig(StrictModel):
    """The `annotate` step: a preference batch for the next round, from this round's models."""

    prompts: list[str] = Field(min_length=1)
    """The annotation prompt pool: prompt files (rows as for `data.prompts`)."""
    comparisons: Count = 256
    """Comparisons per round: prompts drawn from the pool (all of it when smaller), a new
    draw each round."""
    models: tuple[str, str] = ("round", "previous")
    """The two models compared: `round` (this round's final model), `previous` (the previous
    round's final model; round 1: the initial policy), `sft` (this round's SFT model), `dpo:K`
    (this round's DPO variant K, 0-based, e.g. `[dpo:0, dpo:1]`)."""
    sampling: list[SamplingSetup] = Field(default_factory=lambda: [SamplingSetup()], min_length=1, max_length=2)
    """Sampling setups: one for both models, or one per model (in `models` order)."""
    annotator: AnnotatorSpec
    """Who labels: `{target: posttrain.annotate.world:WorldAnnotator}`, `...ai:RewardAnnotator`
    (kwargs: reward, thresholds), `...labelstudio:LabelStudioAnnotator` (kwargs: url,
    token_env), `...jsonl:ExternalAnnotator`, or your own (posttrain.annotate.base)."""
    enabled: bool = True
    """Run the step in this round. The last round's batch is for a round that does not exist
    yet; turn it off there with an override (`overrides: {"6": {annotate: {enabled: false}}}`)
    unless the run will be continued."""
    max_prompt_length: Tokens = 1024
    """Prompts longer than this (tokens, after the chat template) are not asked (counted)."""
    require_finished: bool = True
    """Only ask about responses that ended with an end-of-turn token."""
    backend: Literal["auto", "vllm", "transformers"] = "auto"
    """Generation backend (posttrain.generation)."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Generation precision."""
    max_batch_sequences: BatchSize = 64
    """transformers backend: most sequences decoded together."""
    rm_accuracy: bool = True
    """Score the labelled batch with this round's reward model (which has not seen it): the
    share of pairs it ranks as the annotators did, `rm_accuracy` in the metrics. A reward
    model that ranks samples well but fails here is over-optimised on the latest policy."""

    @field_validator("models")
    @classmethod
    def _models(cls, v: tuple[str, str]) -> tuple[str, str]:
        import re

        for m in v:
            if not re.fullmatch(MODEL_CHOICE, m):
                raise ValueError(f"{m!r}: expected round, previous, sft or dpo:K")
        if v[0] == v[1]:
            raise ValueError(f"the two models must differ, got {v[0]!r} twice")
        return v

    @model_validator(mode="after")
    def _sampling_per_model(self) -> "AnnotateConfig":
        if len(self.sampling) == 1:
            self.sampling = [self.sampling[0], self.sampling[0]]
        return self


class WaitingForLabels(StageWaiting):
    """The annotate step has asked for labels that are not all there yet: the round waits
    (this is not a failure; run the same command again once people have labelled)."""

    def __init__(self, round: int, info: dict):
        self.round = round
        self.info = info
        super().__init__(f"round {round} annotate: waiting for labels: {waiting_summary(info)}. "
                         "Run the same command again to pick up new labels.")


def waiting_summary(info: dict) -> str:
    """`12/192 labelled, label at http://...` (what `status` and the terminal show)."""
    where = info.get("where")
    if where:
        where = f"label at {where}" if where.startswith(("http://", "https://")) else where
    return f"{info['labelled']}/{info['requests']} labelled" + (f", {where}" if where else "")


# ----------------------------------------------------------------------------- requests


def _draw(pool: list, n: int, seed: int) -> list:
    """`n` prompts of the pool (all when fewer), drawn by seed, kept in pool order."""
    if n >= len(pool):
        return list(pool)
    keep = set(random.Random(f"posttrain-annotate-{seed}").sample(range(len(pool)), n))
    return [p for i, p in enumerate(pool) if i in keep]


def _fingerprint(ctx: StageContext, cfg: AnnotateConfig) -> str:
    return files.hash_json({
        "models": [files.hash_path(ctx.inputs.model_a), files.hash_path(ctx.inputs.model_b)],
        "names": list(ctx.inputs.model_names),
        "pool": [files.hash_path(p) for p in ctx.inputs.prompt_files],
        "sampling": [s.model_dump() for s in cfg.sampling], "comparisons": cfg.comparisons,
        "seed": ctx.seed, "max_prompt_length": cfg.max_prompt_length, "require_finished": cfg.require_finished,
        "version": MANIFEST_VERSION,
    })


def _start_over(out: Path) -> None:
    _superseded_labels(out)
    for name in (REQUESTS, MANIFEST, LABELS, WAITING, BATCH, "labelstudio.json"):
        (out / name).unlink(missing_ok=True)
    shutil.rmtree(out / ".work", ignore_errors=True)


def load_requests(out: Path) -> list[Request]:
    return [Request.from_row(r) for r in files.iter_jsonl(out / REQUESTS)]


def make_requests(ctx: StageContext) -> tuple[list[Request], dict]:
    """This round's requests (generated, or read back when an earlier run made them for the
    same inputs) and the counts of prompts not asked, by reason."""
    cfg: AnnotateConfig = ctx.config
    out = Path(ctx.out_dir)
    fingerprint = _fingerprint(ctx, cfg)
    if (out / MANIFEST).is_file():
        manifest = files.read_json(out / MANIFEST)
        if manifest.get("fingerprint") == fingerprint:
            return load_requests(out), manifest["skipped"]
        log.warning("annotate: %s was made for other inputs; starting the requests and labels again", out / MANIFEST)
        _start_over(out)
    requests, skipped = _generate(ctx, cfg)
    files.write_jsonl(out / REQUESTS, [r.to_row() for r in requests])
    files.atomic_write_json(out / MANIFEST, {"fingerprint": fingerprint, "requests": len(requests),
                                              "skipped": skipped})
    shutil.rmtree(out / ".work", ignore_errors=True)
    return requests, skipped


def _generate(ctx: StageContext, cfg: AnnotateConfig) -> tuple[list[Request], dict]:
    from posttrain import chat, data, modeling
    from posttrain.engines import EngineOptions
    from posttrain.generation import run_jobs
    from posttrain.jobs import Job, SamplingSettings, read_job_result

    pool, seen = [], {}
    for path in ctx.inputs.prompt_files:
        for p in data.load_prompts([path]):
            if p.id in seen:
                raise data.DataError(path, None, "id", f"prompt id {p.id!r} ({p.source}) repeats {seen[p.id]}; "
                                     "ids must be unique across the annotation pool")
            seen[p.id] = p.source
            pool.append(p)
    chosen = _draw(pool, cfg.comparisons, ctx.seed)
    names = list(ctx.inputs.model_names)
    models = [ctx.inputs.model_a, ctx.inputs.model_b]
    skipped = Counter()
    work = Path(ctx.out_dir) / ".work"
    work.mkdir(parents=True, exist_ok=True)
    options = EngineOptions(dtype=cfg.dtype, max_batch_sequences=cfg.max_batch_sequences,
                            trust_remote_code=ctx.trust_remote_code)
    messages = [chat.with_system(p.messages, p.system) for p in chosen]
    # Tokenize with each model's own tokenizer; a prompt too long for either is not asked.
    ids_per_model, fits = [], [True] * len(chosen)
    for model in models:
        tok = modeling.load_tokenizer(model, trust_remote_code=ctx.trust_remote_code)
        ids = [tok(chat.render_prompt(tok, m), add_special_tokens=False)["input_ids"] for m in messages]
        fits = [f and len(i) <= cfg.max_prompt_length for f, i in zip(fits, ids)]
        ids_per_model.append((ids, chat.end_of_turn_ids(tok)))
    skipped["too_long"] = fits.count(False)
    keep = [i for i, f in enumerate(fits) if f]
    gens, settings = [], []
    with progress.bar(2, f"round {ctx.round} annotate: generating", unit="model") as bar:
        for side, (model, (ids, stop), setup) in enumerate(zip(models, ids_per_model, cfg.sampling)):
            sampling = SamplingSettings(k=1, temperature=setup.temperature, top_p=setup.top_p,
                                        max_new_tokens=setup.max_new_tokens, stop_token_ids=tuple(stop),
                                        seed=int(files.hash_json([ctx.seed, side])[:8], 16))
            job = Job([ids[i] for i in keep], sampling, str(work / f"model_{side}.json"))
            backend = run_jobs(model, [job], backend=cfg.backend, options=options, workdir=work)
            gens.append(read_job_result(job.out) if keep else [])
            settings.append({**sampling.to_dict(), "backend": backend})
            bar.update(1)
    requests = []
    for j, i in enumerate(keep):
        p = chosen[i]
        texts = [g[j].texts[0] for g in gens]
        finished = [g[j].finished[0] for g in gens]
        if any(not t.strip() for t in texts):
            skipped["empty"] += 1
            continue
        if cfg.require_finished and not all(finished):
            skipped["unfinished"] += 1
            continue
        if texts[0].strip() == texts[1].strip():
            skipped["identical"] += 1
            continue
        rid = f"r{ctx.round:02d}-{p.id}"
        resp = [Response(text=texts[s], model=names[s], sampling={**settings[s], "model_path": str(models[s]),
                                                                   "n_tokens": gens[s][j].n_tokens[0]})
                for s in (0, 1)]
        if random.Random(f"posttrain-annotate-side-{ctx.seed}-{rid}").random() < 0.5:
            resp.reverse()
        requests.append(Request(id=rid, prompt=messages[i], a=resp[0], b=resp[1],
                                meta={**p.meta, **({"capability": p.capability} if p.capability else {})}))
    return requests, {"pool": len(pool), "drawn": len(chosen), **{k: skipped[k] for k in
                                                                   ("too_long", "empty", "unfinished", "identical")}}


# ----------------------------------------------------------------------------- labels


def _label_of(row: dict) -> Label:
    return Label(request_id=row["id"], pair_sha256=row["pair_sha256"], preferred=row["preferred"],
                 strength=row.get("strength"), edited=row.get("edited"), annotator=row.get("annotator") or "",
                 reason=row.get("reason"))


def label_history(out: Path) -> dict[str, list[dict]]:
    """Every label given for each request, oldest first: the rows of `labels.jsonl` (a
    label's fields plus `labelled_at`, UTC, and `source`, the file or annotator it came from)."""
    path = out / LABELS
    history: dict[str, list[dict]] = {}
    if path.is_file():
        for row in files.iter_jsonl(path):
            history.setdefault(row["id"], []).append(row)
    return history


def read_labels_file(out: Path) -> dict[str, Label]:
    """The label that counts for each request: its latest."""
    return {rid: _label_of(rows[-1]) for rid, rows in label_history(out).items()}


def append_labels(out: Path, labels: list[Label], source: str) -> None:
    """Add `labels` to `labels.jsonl` after every earlier one (nothing is replaced: the
    latest label of a request counts, `posttrain annotate history` shows the others). The
    file is rewritten whole and atomically, so a killed run keeps the previous one."""
    import datetime

    path = out / LABELS
    now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    old = list(files.iter_jsonl(path)) if path.is_file() else []
    files.write_jsonl(path, [*old, *({**label.to_row(), "labelled_at": now, "source": source} for label in labels)])


def _superseded_labels(out: Path) -> None:
    """Labels for requests that are being made again are kept beside them, never deleted."""
    import time

    path = out / LABELS
    if path.is_file() and path.stat().st_size:
        kept = out / f"labels.superseded-{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}.jsonl"
        path.rename(kept)
        log.warning("annotate: the labels of the earlier requests are kept in %s", kept)


def preference_rows(requests: list[Request], labels: dict[str, Label]) -> tuple[list[dict], Counter]:
    """TRL conversational preference rows for the labelled requests, and counts."""
    counts = Counter()
    rows = []
    for req in requests:
        label = labels.get(req.id)
        if label is None:
            counts["waiting"] += 1
            continue
        if label.preferred is None:
            counts["abstained"] += 1
            continue
        chosen, rejected = req.response(label.preferred), req.response("b" if label.preferred == "a" else "a")
        row = {"id": req.id, "prompt": req.prompt,
               "chosen": [{"role": "assistant", "content": chosen.text}],
               "rejected": [{"role": "assistant", "content": rejected.text}],
               "strength": label.strength, "chosen_model": chosen.model, "rejected_model": rejected.model,
               "annotator": label.annotator}
        if req.meta.get("capability"):
            row["capability"] = req.meta["capability"]
        if label.edited is not None and label.edited.strip() != chosen.text.strip():
            row["edited"] = [{"role": "assistant", "content": label.edited}]
            counts["edited"] += 1
        counts["labelled"] += 1
        counts[label.strength] += 1
        counts[f"chosen:{chosen.model}"] += 1
        rows.append(row)
    return rows, counts


def ranking_accuracy(chosen: list[float | None], rejected: list[float | None],
                     strengths: list[str]) -> dict:
    """Share of pairs where score(chosen) > score(rejected), a tie counting half; pairs the
    reward abstained on are left out (counted). Overall and per strength label."""
    def acc(pairs):
        return sum(1.0 if c > r else 0.5 if c == r else 0.0 for c, r in pairs) / len(pairs) if pairs else None

    scored = [(c, r, s) for c, r, s in zip(chosen, rejected, strengths) if c is not None and r is not None]
    return {"pairs": len(scored), "abstained": len(chosen) - len(scored),
            "accuracy": acc([(c, r) for c, r, _ in scored]),
            "by_strength": {s: acc([(c, r) for c, r, t in scored if t == s]) for s in STRENGTHS
                            if any(t == s for *_, t in scored)}}


def next_batch_accuracy(record) -> float | None:
    """From an annotate record (a `records.Record`, or its JSON): the round's RM's accuracy on
    the batch labelled on its own models (`rm_accuracy`, which it never trained on); None when
    not measured."""
    if record is None:
        return None
    m = AnnotateMetrics.read(record.get("metrics") if isinstance(record, dict) else record.metrics)
    value = m.rm_accuracy.accuracy if m.rm_accuracy is not None else None
    return value if isinstance(value, float) else None


def reward_model_accuracy(ctx: StageContext, rows: list[dict]) -> dict:
    """This round's RM on the batch just labelled (chosen vs rejected, edits left out)."""
    from posttrain.reward import RMReward, active, checked_score

    rm = RMReward(ctx.inputs.reward_model, device=ctx.recipe.run.device if ctx.recipe is not None else "auto",
                  trust_remote_code=ctx.trust_remote_code)
    prompts = [r["prompt"] for r in rows]
    with active(rm):
        chosen = checked_score(rm, prompts, [r["chosen"][0]["content"] for r in rows])
        rejected = checked_score(rm, prompts, [r["rejected"][0]["content"] for r in rows])
    return ranking_accuracy(chosen, rejected, [r["strength"] for r in rows])


def _refuse_bad_edits(ctx: StageContext, annotator, labels: list[Label]) -> None:
    """An annotator's edit holding formatting tokens, or too long to train on, fails the step
    naming the annotator and the request (posttrain.annotate.edits)."""
    from posttrain.annotate.base import AnnotatorError
    from posttrain.annotate.edits import edit_check_for

    edited = [label for label in labels if label.edited is not None]
    if not edited:
        return
    check = edit_check_for(ctx.inputs.model_a, *edit_limit(ctx.recipe, ctx.round),
                           trust_remote_code=ctx.trust_remote_code)
    for label in edited:
        why = check.problem(label.edited)
        if why:
            raise AnnotatorError(f"annotator {annotator_name(annotator)!r}, request {label.request_id!r}: "
                                 f"field 'edited' {why}")


# ----------------------------------------------------------------------------- the step


def run(ctx: StageContext) -> StageResult:
    from posttrain import data

    cfg: AnnotateConfig = ctx.config
    out = Path(ctx.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    requests, skipped = make_requests(ctx)
    annotator = ctx.annotator if ctx.annotator is not None else load_annotator(cfg.annotator)
    attach(annotator, out)
    labels = read_labels_file(out)
    pending = [r for r in requests if r.id not in labels]
    if pending:
        answers = checked_annotate(annotator, pending)
        new = {a.request_id: a for a in answers if a is not None}
        _refuse_bad_edits(ctx, annotator, list(new.values()))
        if new:
            labels.update(new)
            append_labels(out, list(new.values()), source=f"annotator:{annotator_name(annotator)}")
    missing = sum(r.id not in labels for r in requests)
    if missing:
        info = {"requests": len(requests), "labelled": len(requests) - missing, "waiting": missing,
                "where": where(annotator), "annotator": getattr(annotator, "name", type(annotator).__name__)}
        files.atomic_write_json(out / WAITING, {**info, "summary": waiting_summary(info)})
        raise WaitingForLabels(ctx.round, info)
    (out / WAITING).unlink(missing_ok=True)
    if not (out / LABELS).exists():
        append_labels(out, [], source="")  # no requests at all: an empty file says so
    rows, counts = preference_rows(requests, labels)
    files.write_jsonl(out / BATCH, rows)
    if rows:
        data.load_preferences([out / BATCH])  # posttrain's own loader must accept the batch
    rm_accuracy = None
    if ctx.inputs.reward_model and rows:
        rm_accuracy = reward_model_accuracy(ctx, rows)
    rel = out.relative_to(ctx.run_dir) if out.is_relative_to(ctx.run_dir) else out
    names = list(ctx.inputs.model_names)
    return StageResult(
        outputs={"requests": str(rel / REQUESTS), "labels": str(rel / LABELS), "preferences": str(rel / BATCH)},
        metrics={
            "requests": len(requests), "labelled": counts["labelled"], "abstained": counts["abstained"],
            "edited": counts["edited"], "skipped": skipped,
            "strengths": {s: counts[s] for s in STRENGTHS},
            "chosen_by_model": {n: counts[f"chosen:{n}"] for n in names},
            "models": dict(zip(names, [str(ctx.inputs.model_a), str(ctx.inputs.model_b)])),
            "annotator": getattr(annotator, "name", type(annotator).__name__),
            "annotators": dict(Counter(labels[r.id].annotator for r in requests if r.id in labels)),
            "rm_accuracy": rm_accuracy,
        },
    )


# ----------------------------------------------------------------------------- the registry


@dataclass
class AnnotateInputs:
    model_a: str = path_field()
    """The first model compared (`annotate.models[0]`, resolved from records)."""
    model_b: str = path_field()
    """The second model compared."""
    prompt_files: list[str] = path_field()
    """The annotation prompt pool."""
    model_names: list[str] = field(default_factory=list)
    """The recipe's names for the two models (`round`, `previous`, `sft`, `dpo:K`)."""
    reward_model: str | None = path_field(default=None)
    """This round's reward model, for `rm_accuracy` (None: not measured)."""


def resolve_model(rnd, name: str) -> str:
    """A model `annotate.models` names, from this round's (or the previous round's) records."""
    if name == "round":
        return rnd.output("average", "model")
    if name == "previous":
        return rnd.previous_model() or rnd.initial_policy()
    if name == "sft":
        return rnd.output("sft", "model")
    variants = rnd.output("dpo", "variants")
    k = int(name.split(":", 1)[1])
    if k >= len(variants):
        raise ValueError(f"annotate.models names {name!r}, but round {rnd.n}'s dpo stage has {len(variants)} "
                         f"variant(s) (dpo:0 to dpo:{len(variants) - 1})")
    return variants[k]


def _resolve(rnd) -> AnnotateInputs:
    cfg: AnnotateConfig = rnd.recipe.annotate
    a, b = cfg.models
    return AnnotateInputs(model_a=resolve_model(rnd, a), model_b=resolve_model(rnd, b),
                          prompt_files=[rnd.path(p) for p in cfg.prompts], model_names=[a, b],
                          reward_model=rnd.output("rm", "model") if cfg.rm_accuracy else None)


def annotated_batches(rnd) -> list[tuple[int, str]]:
    """(round it is for, path) of each batch the annotate step labelled before round `rnd.n`,
    from its record: round m's step labels the batch round m + 1 trains on. A round whose
    recipe annotates but whose step has not finished stops the resolution (waiting for labels,
    or not run); a batch in which every pair was skipped adds nothing."""
    out = []
    for m in range(1, rnd.n):
        if not enabled(rnd.loaded.for_round(m)):
            continue
        rec = rnd.record("annotate", m)
        if rec is None:
            waiting = rnd.run_dir / f"round_{m:02d}" / "annotate" / WAITING
            if waiting.is_file():
                raise WaitingForLabels(m, files.read_json(waiting))
            raise RoundError(f"round {rnd.n} needs the preference batch that round {m}'s annotate step labels, "
                             f"but that step has not finished (run round {m} again)")
        if (AnnotateMetrics.read(rec.metrics).labelled or 0) > 0:
            out.append((m + 1, rnd.output("annotate", "preferences", m)))
    return out


def enabled(recipe) -> bool:
    return recipe.annotate is not None and recipe.annotate.enabled


@dataclass(kw_only=True)
class RMAccuracy(Metrics):
    """This round's RM on the batch it never trained on (`reward_model_accuracy`)."""

    accuracy: float | None = None


@dataclass(kw_only=True)
class AnnotateMetrics(Metrics):
    labelled: int | None
    abstained: int | None
    edited: int | None
    rm_accuracy: RMAccuracy | None
    """None unless `annotate.rm_accuracy`."""
    requests: int | None = None
    skipped: dict[str, int] | None = None
    """Pairs not asked about, by reason, with `pool` (prompts there) and `drawn` (pairs drawn)."""
    contaminated: dict[str, int] | None = None


def _headline(m: AnnotateMetrics) -> list[tuple[str, Any]]:
    # pairs labelled (a judgement), abstained (skipped), and edited
    # and how often this round's RM, which never saw the batch, ranks its pairs as they did
    return [("labelled", m.labelled), ("abstained", m.abstained), ("edited", m.edited),
            ("rm_acc", m.rm_accuracy.accuracy if m.rm_accuracy is not None else None)]


def _data_row(m: AnnotateMetrics) -> DataRow:
    skipped = {k: v for k, v in (m.skipped or {}).items() if k not in ("pool", "drawn")}
    return DataRow("pairs", (m.skipped or {}).get("drawn"), f"{fmt(m.labelled)} labelled ({fmt(m.edited)} edited)",
                   {"abstained": m.abstained, **skipped}, None, m.contaminated)


def _settings(recipe) -> dict:
    # the round's RM scores the labelled batch (rm_accuracy) on the run's device
    return {"device": recipe.run.device} if recipe.annotate is not None and recipe.annotate.rm_accuracy else {}


STAGE = StageDef(name="annotate", inputs=AnnotateInputs, resolve=_resolve, headline=_headline, settings=_settings,
                 uses_annotator=True, enabled=enabled, preference_batches=annotated_batches, metrics=AnnotateMetrics,
                 data_row=_data_row, status_column="when_run",
                 legend="pairs labelled, abstained (skipped), edited; waiting: labels still missing (run again "
                        "once they are in)")


# ----------------------------------------------------------------------------- export / import (posttrain annotate)


def _step_folder(run_dir: str | os.PathLike, round: int) -> Path:
    from posttrain.records import require_run_folder, stage_dir

    folder = stage_dir(require_run_folder(run_dir, recipe=False), round, "annotate")
    if not (folder / "requests.json").is_file():
        raise FileNotFoundError(f"{folder}: round {round} has no annotation requests yet (its annotate step "
                                "makes them after the round's model; run the round first)")
    return folder


def export_requests(run_dir: str | os.PathLike, round: int, out: str | os.PathLike) -> int:
    """Write round `round`'s requests to `out` (JSONL, the format above); returns how many."""
    from posttrain.files import write_jsonl

    folder = _step_folder(run_dir, round)
    return write_jsonl(out, [r.to_row() for r in load_requests(folder)])


def edit_limit(recipe=None, round: int | None = None) -> tuple[int, str]:
    """The most tokens an edit may have, and the recipe key that sets it: the shorter of
    `rm.max_length` and `dpo.max_length` (the edit becomes the best response of both) of
    `recipe`, resolved for `round` (the defaults without one)."""
    if recipe is None:
        from posttrain.stages.dpo import DPOStageConfig
        from posttrain.stages.rm import RMConfig

        rm, dpo, where = RMConfig().max_length, DPOStageConfig().max_length, " (the defaults)"
    else:
        rm, dpo, where = recipe.rm.max_length, recipe.dpo.max_length, "" if round is None else f" of round {round}"
    return (rm, f"rm.max_length{where}") if rm <= dpo else (dpo, f"dpo.max_length{where}")


def import_labels(run_dir: str | os.PathLike, round: int, path: str | os.PathLike, recipe=None, *,
                  trains: int | None = None, trust_remote_code: bool = False) -> dict:
    """Check the labels in `path` against round `round`'s requests (and their edits against
    the policy's tokenizer and the recipe's lengths) and append them to the step's labels: a
    label for a request labelled before becomes the one that counts, the earlier one stays
    in the history. The next `posttrain run` picks them up. Refused once the step has
    finished: its batch is recorded."""
    from posttrain.annotate.jsonl import read_labels
    from posttrain.records import RECORD

    folder = _step_folder(run_dir, round)
    if (folder / RECORD).is_file():
        raise FileExistsError(f"{folder}: round {round}'s annotate step has finished and its batch is recorded; "
                              "labels cannot change under it (run it again with --redo annotate to relabel)")
    from posttrain.annotate.edits import edit_check_for

    requests = load_requests(folder)
    policy = requests[0].a.sampling.get("model_path") if requests else None  # whose responses were labelled
    check = edit_check_for(policy, *edit_limit(recipe, trains), trust_remote_code=trust_remote_code)
    new = read_labels(path, {r.id: r for r in requests}, check)
    earlier = read_labels_file(folder)
    replaced = [label for label in new if label.request_id in earlier]
    changed = sum(earlier[label.request_id].preferred != label.preferred for label in replaced)
    append_labels(folder, new, source=str(Path(path).resolve()))
    return {"imported": len(new), "replaced": len(replaced), "changed": changed,
            "labelled": len(read_labels_file(folder)), "requests": len(requests)}


def format_history(run_dir: str | os.PathLike, round: int) -> str:
    """`posttrain annotate history`: every label of each comparison of round `round`, oldest
    first, who gave it, when and from where; `*` marks the one that counts (the latest)."""
    folder = _step_folder(run_dir, round)
    history = label_history(folder)
    requests = load_requests(folder)
    lines = []
    for req in requests:
        rows = history.get(req.id, [])
        lines.append(f"{req.id}: " + (f"{len(rows)} label(s)" if rows else "not labelled"))
        for i, row in enumerate(rows):
            verdict = (f"{row['preferred']} {row.get('strength')}" if row.get("preferred") is not None
                       else f"abstain ({row.get('reason') or 'no reason given'})")
            mark = "*" if i == len(rows) - 1 else " "
            edited = ", edited" if row.get("edited") else ""
            lines.append(f"  {mark} {row.get('labelled_at') or 'time unknown'}  {row.get('annotator') or '?'}: "
                         f"{verdict}{edited}  [{row.get('source') or 'source unknown'}]")
    labelled = sum(req.id in history for req in requests)
    changed = sum(len({row.get("preferred") for row in history.get(req.id, [])}) > 1 for req in requests)
    lines.append(f"{labelled}/{len(requests)} comparisons labelled; {changed} changed their preferred "
                 "response between labels (* the label that counts: the latest)")
    return "\n".join(lines)

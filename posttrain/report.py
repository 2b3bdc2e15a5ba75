"""`posttrain report RUN_DIR`: a Markdown report and PNG plots from the run's records."""

from __future__ import annotations

from pathlib import Path

from posttrain.benchmarks import is_stderr, settings_text
from posttrain.files import atomic_write_text
from posttrain.records import OutputsDamaged, Record, as_record, check_record, load_record, output_path, recipe_in
from posttrain.samples import iter_rows
from posttrain.stage import fmt as _fmt
from posttrain.stage import get, steps
from posttrain.stages.annotate import next_batch_accuracy
from posttrain.throughput import FORMULA, percent, si
from posttrain.rounds.orchestrator import list_rounds

EVAL_METRICS = [
    ("task_score", "task score (checker)"),
    ("mean_reward", "mean reward"),
    ("win_rate_vs_previous", "win rate vs previous round"),
    ("win_rate_vs_initial", "win rate vs initial policy"),
    ("eot_rate", "ends with end-of-turn"),
    ("mean_length", "mean length (tokens)"),
    ("rm_heldout_accuracy", "RM held-out accuracy"),
]


def collect(run_dir: Path) -> dict[int, dict[str, Record]]:
    """round -> step -> record, for every record present."""
    out: dict[int, dict[str, Record]] = {}
    for n in list_rounds(run_dir):
        recs = {s: load_record(run_dir, n, s) for s in steps()}
        out[n] = {s: r for s, r in recs.items() if r is not None}
    return out


def _metrics(recs: dict, stage: str):
    """Stage `stage`'s typed metrics in one round's records (its JSON or a Record; an empty
    one when the round has no such record). The sections that read a named stage (the eval
    tables, the RM's health, the samples' reasons) read it through its own `Metrics` class,
    also when the registry does not hold that stage (a run without it has empty sections)."""
    import importlib

    rec = as_record(recs.get(stage))
    return importlib.import_module(f"posttrain.stages.{stage}").STAGE.metrics.read(rec.metrics if rec else {})


def sample_score_distributions(run_dir: Path, records: dict[int, dict[str, dict]]) -> dict[int, dict[str, list[float]]]:
    """Per round: per-prompt best, mean and worst reward of the K sampled responses."""
    out = {}
    for n, recs in records.items():
        if "sample" not in recs:
            continue
        best, mean, worst = [], [], []
        damage = check_record(run_dir, recs["sample"], ["samples"])  # verify before trust
        if damage:
            raise OutputsDamaged(run_dir, damage, recipe_in(as_record(recs["sample"]).command))
        for _, row in iter_rows(output_path(run_dir, recs["sample"], "samples")):
            scores = [s for s in row.scores if s is not None]
            if scores:
                best.append(max(scores))
                mean.append(sum(scores) / len(scores))
                worst.append(min(scores))
        out[n] = {"best": best, "mean": mean, "worst": worst}
    return out


def reason_rows(records: dict[int, dict[str, dict]]) -> tuple[list[str], list[list[str]]]:
    """The scoring reasons seen, and per round the share of the sampled responses that scored
    for each reason (the sample stage's `reasons` counts: "passed", "timeout", "wrong", ...)."""
    counts = {n: _metrics(recs, "sample").reasons or {} for n, recs in sorted(records.items())}
    counts = {n: c for n, c in counts.items() if c}
    totals: dict[str, int] = {}
    for c in counts.values():
        for reason, k in c.items():
            totals[reason] = totals.get(reason, 0) + k
    names = sorted(totals, key=lambda r: (-totals[r], r))
    rows = []
    for n, c in counts.items():
        total = sum(c.values())
        rows.append([str(n), str(total), *(f"{c.get(r, 0) / total:.1%}" if total else "-" for r in names)])
    return names, rows


def rm_health_rows(records: dict[int, dict[str, dict]]) -> list[list[str]]:
    """Per round: how well the reward model ranks held-out pairs and the next batch (the pairs
    annotated on this round's models, which it has not seen), and how much it follows length."""
    rows = []
    for n, recs in sorted(records.items()):
        if not recs.get("rm"):
            continue
        h = _metrics(recs, "rm").heldout
        shorter = h.accuracy_chosen_shorter
        rows.append([str(n), _fmt(h.accuracy), _fmt(h.pairs),
                     f"{_fmt(shorter)} ({h.pairs_chosen_shorter or 0} pairs)" if shorter is not None else "-",
                     _fmt(h.prefers_longer), _fmt(h.score_length_correlation),
                     _fmt(_metrics(recs, "sample").score_length_correlation),
                     _fmt(h.min_accuracy),
                     _fmt(next_batch_accuracy(as_record(recs.get("annotate"))))])
    return rows


def variant_rows(records: dict[int, dict[str, dict]]) -> tuple[list[str], list[list[str]]]:
    """The variants' names, and per round that evaluated them: the averaged model's task score
    (else mean reward), each variant's, and the averaged model minus the best variant."""
    evals = {n: _metrics(recs, "eval") for n, recs in sorted(records.items())}
    evals = {n: m for n, m in evals.items() if m.variants}
    names = sorted({v for m in evals.values() for v in m.variants})
    rows = []
    for n, m in evals.items():
        key = "task_score" if m.task_score is not None else "mean_reward"
        rows.append([str(n), _fmt(getattr(m, key)), *(_fmt((m.variants.get(v) or {}).get(key)) for v in names),
                     _fmt(m.average_minus_best_variant)])
    return names, rows


def benchmark_tables(records: dict[int, dict[str, dict]]) -> dict[str, tuple[list[str], list[list]]]:
    """Per benchmark (`eval.benchmarks`): its number names, and a row per round that ran it
    (round 0: the initial policy, from round 1), with the problems and settings."""
    out: dict[str, tuple[list[str], list[list]]] = {}
    for n, recs in sorted(records.items()):
        for label, b in (_metrics(recs, "eval").benchmarks or {}).items():
            keys, rows = out.setdefault(label, (list(b["numbers"]), []))
            how = settings_text(b["settings"])
            if b.get("initial") is not None:
                rows.append([0, *(b["initial"].get(k) for k in keys), b["problems"], how])
            rows.append([n, *(b["numbers"].get(k) for k in keys), b["problems"], how])
    return out


def _data_rows(records: dict[int, dict]) -> list:
    """(round, stage, DataRow) for each record whose stage has a row (`StageDef.data_row`), in
    the registry's order."""
    out = []
    for n, recs in sorted(records.items()):
        for stage in [s for s in steps() if s in recs] + [s for s in recs if s not in steps()]:
            row_of = get(stage).data_row if stage in steps() else None
            row = row_of(_metrics(recs, stage)) if row_of is not None else None
            if row is not None:
                out.append((n, stage, row))
    return out


def data_rows(records: dict[int, dict]) -> list[list[str]]:
    """Per round and stage: what was read, trained on, dropped (and why) and truncated."""
    return [[str(n), stage, str(r.unit), _fmt(r.read), r.trained, _reasons(r.dropped), _fmt(r.truncated)]
            for n, stage, r in _data_rows(records)]


THROUGHPUT_HEADER = ["round", "stage", "device", "tokens (real)", "with padding", "loop seconds", "tokens/s",
                     "tokens per CPU-second", "achieved FLOP/s", "peak FLOP/s", "MFU", "MFU (CPU time)"]


def throughput_rows(records: dict[int, dict]) -> tuple[list[list[str]], list[str]]:
    """Per round and training stage: tokens trained, the loop's time, tokens per second (and per
    CPU-second on a CPU), achieved FLOP/s and its share of the peak (posttrain.throughput); and
    the peaks' sources (or why there is none), once each."""
    rows, sources = [], []
    for n, recs in sorted(records.items()):
        for stage, rec in recs.items():
            t = (as_record(rec).metrics or {}).get("throughput")
            if not isinstance(t, dict):
                continue
            peak = t.get("peak") or {}
            world = t.get("world_size", 1)
            device = f"{t.get('device', '-')}" + (f" x{world}" if world > 1 else "")
            rows.append([str(n), stage, device, _fmt(t.get("tokens")), _fmt(t.get("tokens_with_padding")),
                         f"{t['seconds']:.1f}" if isinstance(t.get("seconds"), (int, float)) else "-",
                         _rate(t.get("tokens_per_second")), _rate(t.get("tokens_per_cpu_second")),
                         si(t.get("flops_per_second"), "FLOP/s"), si(t.get("peak_flops_per_second"), "FLOP/s"),
                         *(percent(t[k]) if isinstance(t.get(k), (int, float)) else "-"
                           for k in ("mfu", "mfu_cpu_time"))])
            note = peak.get("source") or peak.get("reason")
            if note:
                note = f"{peak.get('device', t.get('device'))}: {note}"
                if note not in sources:
                    sources.append(note)
    return rows, sources


def _rate(v) -> str:
    return f"{v:,.1f}" if isinstance(v, (int, float)) else "-"


def contaminated_cells(records: dict[int, dict]) -> list[str]:
    """Per row of `data_rows`: the stage's contaminated rows per source file, or "-"."""
    return [", ".join(f"{Path(k).name} {v}" for k, v in r.contaminated.items()) if r.contaminated else "-"
            for _, _, r in _data_rows(records)]


def _reasons(counts: dict) -> str:
    shown = [f"{k} {v}" for k, v in counts.items() if isinstance(v, int) and v]
    return ", ".join(shown) or "0"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


def _plots(folder: Path, records, dists) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    rounds = [n for n in records if "eval" in records[n]]
    if rounds:
        def series(key):
            pts = [(n, getattr(_metrics(records[n], "eval"), key)) for n in rounds]
            return [(x, y) for x, y in pts if isinstance(y, (int, float))]

        # Three panels, so no two kinds of number share an axis: task score (with the initial
        # policy's level), win rates (around a coin flip's 0.5), and the reward on its own scale.
        fig, (ax, ax_w, ax_r) = plt.subplots(1, 3, figsize=(13, 4.2))
        for k, label in (("task_score", "task score (checker)"), ("eot_rate", "ends with end-of-turn"),
                         ("rm_heldout_accuracy", "RM held-out accuracy")):
            pts = series(k)
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
        pts = [(n, next_batch_accuracy(as_record(records[n].get("annotate")))) for n in rounds]
        pts = [(x, y) for x, y in pts if y is not None]
        if pts:  # the pairs annotated on this round's models, which its RM never saw
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", linestyle="--", label="RM accuracy, next batch")
        base = _metrics(records[rounds[0]], "eval").initial_task_score
        if isinstance(base, (int, float)):
            ax.axhline(base, color="grey", linestyle="--", linewidth=1, label="task score of the initial policy")
        ax.set_ylim(0, 1.02)
        ax.set_ylabel("share (0 to 1)")
        ax.set_title("held-out quality per round")
        if ax.get_legend_handles_labels()[0]:  # a run whose eval has no checker, eot or RM numbers: no legend
            ax.legend(fontsize=7, loc="lower right")
        for k, label in (("win_rate_vs_previous", "vs previous round"), ("win_rate_vs_initial", "vs initial policy")):
            pts = series(k)
            if pts:
                ax_w.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
        ax_w.axhline(0.5, color="grey", linestyle=":", linewidth=1, label="coin flip")
        ax_w.set_ylim(0, 1.02)
        ax_w.set_ylabel("win rate (reward-judged)")
        ax_w.set_title("win rates")
        ax_w.legend(fontsize=7, loc="lower right")
        pts = series("mean_reward")
        if pts:
            ax_r.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", color="tab:orange", label="this round")
            init = _metrics(records[rounds[0]], "eval").initial_mean_reward
            if isinstance(init, (int, float)):
                ax_r.axhline(init, color="grey", linestyle="--", linewidth=1, label="initial policy")
            ax_r.legend(fontsize=7)
        ax_r.set_ylabel("mean reward (the round's reward)")
        ax_r.set_title("mean reward of held-out responses")
        for a in (ax, ax_w, ax_r):
            a.set_xlabel("round")
            a.set_xticks(rounds)
            a.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(folder / "metrics.png", dpi=110)
        plt.close(fig)
        made.append("metrics.png")
    tables = benchmark_tables(records)
    if tables:
        fig, axes = plt.subplots(1, len(tables), figsize=(5.5 * len(tables), 4.2), squeeze=False)
        for ax, (label, (keys, rows)) in zip(axes[0], tables.items()):
            shown = []
            for i, key in enumerate(keys):
                if is_stderr(key):  # drawn as the error bar of its metric
                    continue
                err = keys.index(f"{key}_stderr") if f"{key}_stderr" in keys else None
                pts = [(r[0], r[1 + i], r[1 + err] if err is not None and isinstance(r[1 + err], float) else 0.0)
                       for r in rows if isinstance(r[1 + i], float)]
                if pts:
                    ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts], marker="o",
                                capsize=3, label=key)
                    shown += [p[1] for p in pts]
            ax.set_title(f"{label} (round 0: initial policy)")
            ax.set_xlabel("round")
            if all(0 <= v <= 1 for v in shown):  # accuracies; other numbers (perplexity) keep their own scale
                ax.set_ylim(0, 1)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(folder / "benchmarks.png", dpi=110)
        plt.close(fig)
        made.append("benchmarks.png")
    if dists:
        ns = sorted(dists)
        fig, ax = plt.subplots(figsize=(7, 4.2))
        data, labels = [], []
        for n in ns:
            for kind in ("worst", "mean", "best"):
                data.append(dists[n][kind] or [0.0])
                labels.append(f"{n}\n{kind}")
        ax.boxplot(data, tick_labels=labels, showfliers=False)
        ax.set_title("reward of sampled responses per prompt (worst / mean / best of K), by round")
        ax.set_ylabel("reward (the round's reward)")
        ax.set_xlabel("round and statistic over the K samples of a prompt")
        ax.tick_params(axis="x", labelsize=6)
        ax.grid(alpha=0.3, axis="y")
        fig.tight_layout()
        fig.savefig(folder / "sample_scores.png", dpi=110)
        plt.close(fig)
        made.append("sample_scores.png")
    return made


def _reward_scale(run_dir: Path) -> str | None:
    """A sentence on the scale rewards are on: the run's recipe's reward, named."""
    import yaml

    path = run_dir / "recipe.yaml"
    if not path.is_file():
        return None
    spec = (yaml.safe_load(path.read_text(encoding="utf-8")) or {}).get("reward", "rm")
    if spec == "rm":
        return ("Rewards (mean reward, sampled responses) are the round's reward model's scores: "
                "an unbounded scale, comparable within a round only.")
    target = spec.get("target", "?") if isinstance(spec, dict) else str(spec)
    return (f"Rewards (mean reward, sampled responses) are on the scale of the recipe's reward, `{target}`: "
            f"a weighted sum such as a checker plus 0.01 x the round's reward model can exceed 1.")


def write_report(run_dir: Path) -> Path:
    run_dir = Path(run_dir)
    records = collect(run_dir)
    if not records:
        raise FileNotFoundError(f"{run_dir} holds no rounds: nothing to report")
    folder = run_dir / "report"
    folder.mkdir(parents=True, exist_ok=True)
    dists = sample_score_distributions(run_dir, records)
    plots = _plots(folder, records, dists)

    lines = [f"# posttrain report: {run_dir.name}", ""]
    first_eval = next((n for n in sorted(records) if "eval" in records[n]), None)
    if first_eval is not None:
        m = _metrics(records[first_eval], "eval")
        lines += [f"Initial policy on the held-out prompts: task score {_fmt(m.initial_task_score)}, "
                  f"mean reward {_fmt(m.initial_mean_reward)}, ends with end-of-turn "
                  f"{_fmt(m.initial_eot_rate)}.", ""]
    scale = _reward_scale(run_dir)
    if scale:
        lines += [scale, ""]
    lines += ["## Evaluation per round", "", "| round | " + " | ".join(l for _, l in EVAL_METRICS) + " |",
              "|---|" + "---|" * len(EVAL_METRICS)]
    for n, recs in sorted(records.items()):
        m = _metrics(recs, "eval")
        lines.append(f"| {n} | " + " | ".join(_fmt(getattr(m, k)) for k, _ in EVAL_METRICS) + " |")
    health = rm_health_rows(records)
    if health:
        lines += ["", "## Reward model health", "",
                  "Held-out pairs the reward model ranks right; where the better response is the shorter "
                  "one (a model that ranks by length fails these); how often it scores the longer response "
                  "higher (0.5: no preference); how its scores correlate with length, on held-out responses "
                  "and on the round's samples. Below `rm.min_heldout_accuracy` the round stops. The last "
                  "column ranks the next batch: the pairs annotated on this round's models, which this RM "
                  "never saw (`annotate.rm_accuracy`); falling there while rising held-out means the RM "
                  "no longer knows the policy it ranks.", ""]
        lines += _table(["round", "accuracy", "pairs", "accuracy, better is shorter", "prefers longer",
                         "score~length (held-out)", "score~length (samples)", "min accuracy",
                         "accuracy, next batch"], health)
    for label, (keys, rows) in benchmark_tables(records).items():
        lines += ["", f"## Benchmark: {label}", "",
                  "Round 0 is the initial policy (`eval.benchmarks`; responses and per-sample verdicts in "
                  "each round's `eval/benchmarks/`).", ""]
        lines += _table(["round", *keys, "problems", "settings"], [[_fmt(v) for v in r] for r in rows])
    names, soups = variant_rows(records)
    if soups:
        lines += ["", "## The averaged model and its variants", "",
                  "Task score (else mean reward) of the round's model, the weight average of its DPO variants, "
                  "and of each variant alone, on the same held-out prompts (`eval.variants`).", ""]
        lines += _table(["round", "averaged", *names, "averaged - best variant"], soups)
    counts = data_rows(records)
    if counts:
        lines += ["", "## Data per stage", "",
                  "What each stage read, trained on (per variant when `data_fraction` makes them differ), "
                  "dropped and why, and kept but truncated at max_length.", ""]
        header = ["round", "stage", "unit", "read", "trained", "dropped", "truncated"]
        dirty = contaminated_cells(records)
        if any(c != "-" for c in dirty):  # decontaminate: warn or drop (posttrain.decontam)
            lines[-1] += (" Contaminated: rows sharing an n-gram with an eval prompt, per source file "
                          "(`decontaminate: drop` also drops them, reason `contaminated`).")
            header.append("contaminated")
            counts = [row + [c] for row, c in zip(counts, dirty)]
        lines += _table(header, counts)
    speed, sources = throughput_rows(records)
    if speed:
        lines += ["", "## Training throughput", "",
                  "Real tokens (padding excluded) of every batch the training loop ran, over every process; the "
                  "loop's wall time without model loading, checkpoint saves or the final save; achieved FLOP/s "
                  f"by {FORMULA} (LoRA: the adapters train, the base is frozen; a live DPO reference adds its "
                  "forward), and its share of the peak (MFU): a GPU's bf16 dense datasheet peak, or on a CPU its "
                  "fp32 matmul peak measured once per machine; on a CPU also per CPU-second (the loop's FLOPs per "
                  "CPU-second over the matmul's), which moves less when other work shares the machine.", ""]
        lines += _table(THROUGHPUT_HEADER, speed)
        if sources:
            lines += ["", "Peaks: " + "; ".join(sources)]
    lines += ["", "## Stages", "", "| round | stage | seconds | key metrics |", "|---|---|---|---|"]
    for n, recs in sorted(records.items()):
        for stage, rec in recs.items():
            if get(stage).evaluation:  # its own table above
                continue
            m = rec.metrics  # the first numbers the stage wrote, whatever they are
            keys = [k for k, v in m.items() if isinstance(v, (int, float)) and not isinstance(v, bool)][:6]
            lines.append(f"| {n} | {stage} | {rec.timing.seconds:.0f} | "
                         + ", ".join(f"{k}={_fmt(m[k])}" for k in keys) + " |")
    reasons, shares = reason_rows(records)
    if shares and reasons != ["scored"]:  # a reward that gives no reasons says nothing here
        lines += ["", "## Why sampled responses scored what they did", "",
                  "Share of each round's sampled responses per reason the reward gave (`Scored.reason`: "
                  "tests passed or failed, a timeout, an unparseable answer, an abstention, a reward error). "
                  "Each response's reason and detail are in the sample shards.", ""]
        lines += _table(["round", "responses", *reasons], shares)
    if dists:
        lines += ["", "## Sampled responses", "", "| round | prompts | best (mean) | mean (mean) | worst (mean) |",
                  "|---|---|---|---|---|"]
        for n, d in sorted(dists.items()):
            avg = lambda xs: sum(xs) / len(xs) if xs else None  # noqa: E731
            lines.append(f"| {n} | {len(d['best'])} | {_fmt(avg(d['best']))} | {_fmt(avg(d['mean']))} | "
                         f"{_fmt(avg(d['worst']))} |")
    if plots:
        lines += ["", "## Plots", ""] + [f"![{p}]({p})" for p in plots]
    path = folder / "report.md"
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path

"""Loading and validating data files: every row of every file parsed, every problem collected.

`load_preferences`, `load_sft`, `load_prompts` return the rows or raise one `DataErrors`
listing all problems (duplicate ids across the files included); `validate_file` reports
instead of raising (`posttrain validate-data`), with counts and, given a tokenizer, prompts
over a token limit.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field

from posttrain.data.errors import DataError, DataErrors, raise_if_any
from posttrain.data.read import read_numbered_rows
from posttrain.data.rows import PARSERS, Kind, Preference, Prompt, SFTExample, Row


def _parse_file(path, kind: str) -> tuple[list, list[DataError], int]:
    """Parsed items, every problem, and the number of rows read (readable or not)."""
    if kind not in PARSERS:
        raise ValueError(f"unknown data kind {kind!r} (expected one of {', '.join(PARSERS)})")
    parse = PARSERS[kind]
    rows, errors = read_numbered_rows(path)
    unreadable = len(errors)
    items = []
    for number, data in rows:
        r = Row(str(path), number, data)
        item = parse(r)
        errors.extend(r.errors)
        if item is not None and not r.errors:
            items.append(item)
    errors.sort(key=lambda e: (e.row or 0))
    return items, errors, len(rows) + unreadable


def _load(paths, kind: str) -> list:
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    items, errors = [], []
    for path in paths:
        try:
            got, errs, _ = _parse_file(path, kind)
        except DataErrors as err:
            errors.extend(err.errors)
            continue
        except DataError as err:
            errors.append(err)
            continue
        items.extend(got)
        errors.extend(errs)
    errors.extend(duplicate_ids(items))
    raise_if_any(errors)
    return items


def duplicate_ids(items: list) -> list[DataError]:
    """One error per item whose id an earlier item already has. The one rule for every
    kind, used by the loaders and by `validate_file` alike."""
    seen: dict[str, str] = {}
    errors = []
    for item in items:
        if item.id in seen:
            file, _, row = item.source.rpartition(":")
            errors.append(DataError(file, int(row), "id", f"duplicate id {item.id!r} "
                                    f"(first used at {seen[item.id]})"))
        else:
            seen[item.id] = item.source
    return errors


def load_preferences(paths) -> list[Preference]:
    """Every preference row of `paths` (a path or a list), or DataErrors listing all problems."""
    return _load(paths, "preference")


def load_sft(paths) -> list[SFTExample]:
    """Every SFT row of `paths` (a path or a list), or DataErrors listing all problems."""
    return _load(paths, "sft")


def load_prompts(paths) -> list[Prompt]:
    """Every prompt row of `paths` (a path or a list), or DataErrors listing all problems."""
    return _load(paths, "prompts")


# --------------------------------------------------------------------------- reporting


@dataclass
class ValidationReport:
    file: str
    kind: str
    rows: int  # rows read, readable or not
    problems: list[DataError]
    counts: dict[str, int]  # valid/invalid rows and per-kind breakdowns
    warnings: list[str] = field(default_factory=list)  # worth knowing, not problems (e.g. what abstains here)

    @property
    def ok(self) -> bool:
        return not self.problems


def validate_file(path, kind: Kind, tokenizer=None, max_prompt_tokens: int | None = None
                  ) -> ValidationReport:
    """Check every row of one file; all problems are collected, none raised.

    With a tokenizer and max_prompt_tokens, prompts whose rendering (chat template with the
    generation prompt) is longer than the limit are problems too.
    """
    try:
        items, problems, rows = _parse_file(path, kind)
    except DataError as err:  # the file itself cannot be read
        errs = err.errors if isinstance(err, DataErrors) else [err]
        return ValidationReport(str(path), kind, 0, errs, {"valid": 0, "invalid": 0})
    problems.extend(duplicate_ids(items))
    if rows == 0:
        problems.append(DataError(str(path), None, None, "empty: no rows"))
    counts: Counter = Counter()
    for item in items:
        if kind == "preference":
            counts[f"strength={item.strength}"] += 1
            counts["with_edit"] += item.edited is not None
        if getattr(item, "capability", None):
            counts[f"capability={item.capability}"] += 1
    if tokenizer is not None and max_prompt_tokens is not None:
        from posttrain.chat import render_prompt

        for item in items:
            msgs = item.prompt if kind == "preference" else item.messages
            if kind == "sft":
                msgs = msgs[:-1]
            system = item.system if kind == "prompts" else None
            text = render_prompt(tokenizer, msgs, system=system)
            n = len(tokenizer(text, add_special_tokens=False)["input_ids"])
            if n > max_prompt_tokens:
                file, _, row = item.source.rpartition(":")
                problems.append(DataError(file, int(row), "prompt",
                                          f"{n} tokens, over the limit of {max_prompt_tokens}"))
        problems.sort(key=lambda e: (e.row or 0))
    problems.sort(key=lambda e: (e.row or 0))
    bad_rows = {e.row for e in problems if e.row is not None}
    counts["invalid"] = len(bad_rows)
    counts["valid"] = rows - len(bad_rows)
    warnings = []
    if kind == "prompts" and any(item.meta.get("instruction_id_list") is not None for item in items):
        from posttrain.reward.instructions import instruction_warnings

        warnings = instruction_warnings(items)
    return ValidationReport(str(path), kind, rows, problems, dict(sorted(counts.items())), warnings)


def format_report(report: ValidationReport, max_problems: int | None = 50) -> str:
    """A human-readable report: a summary line, the counts, then the problems (the first
    `max_problems`, and how many more; None lists every one)."""
    status = "OK" if report.ok else f"{len(report.problems)} problem(s)"
    lines = [f"{report.file} ({report.kind}): {report.rows} rows, {status}"]
    lines += [f"  {k}: {v}" for k, v in report.counts.items()]
    lines += [f"  warning: {w}" for w in report.warnings]
    shown = report.problems if max_problems is None else report.problems[:max_problems]
    lines += [f"  {p}" for p in shown]
    if len(shown) < len(report.problems):
        lines.append(f"  ... and {len(report.problems) - len(shown)} more (--all lists every one)")
    return "\n".join(lines)

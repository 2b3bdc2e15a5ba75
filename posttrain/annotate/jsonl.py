"""Requests and labels as plain JSONL, for any annotation tool.

`posttrain annotate export RUN_DIR ROUND requests.jsonl` writes one request per line:

    {"id": "r01-train-0007", "pair_sha256": "9f2c...", "prompt": [{"role": "user", "content": "..."}],
     "response_a": {"text": "...", "model": "round_01/average", "sampling": {...}},
     "response_b": {"text": "...", "model": "previous", "sampling": {...}}, "meta": {...}}

`posttrain annotate import RUN_DIR ROUND labels.jsonl` reads one label per line:

    {"id": "r01-train-0007", "pair_sha256": "9f2c...", "preferred": "a", "strength": "better",
     "edited": "an edited, better version of response a (optional)", "annotator": "alice"}
    {"id": "r01-train-0008", "pair_sha256": "41d0...", "preferred": null, "reason": "both wrong"}

`preferred` is "a", "b", or null (abstain: the pair is skipped); `strength` one of
significantly_better, better, slightly_better, marginally_better (required unless abstaining).
A label is joined to its request by `id` and must repeat the request's `pair_sha256`: a label
for an unknown request, or for a request whose responses changed since the export, is an
error naming the file, row and field, and nothing of that file is imported. So is an `edited`
holding a special or formatting token, or longer than the training that reads it can take
(posttrain.annotate.edits); lines are read with a byte cap, never whole. Imported labels
are appended to the step's labels with their time and file (the latest label of a request
counts; `posttrain annotate history RUN_DIR --round ROUND` shows every one).
"""

from __future__ import annotations

import os
from pathlib import Path

from posttrain.annotate.base import Label, Request, label_problems
from posttrain.annotate.edits import EditCheck
from posttrain.data import DataError, DataErrors, read_numbered_rows

LABEL_FIELDS = ("id", "pair_sha256", "preferred", "strength", "edited", "annotator", "reason")


def read_labels(path: str | os.PathLike, requests: dict[str, Request], edits: EditCheck | None = None) -> list[Label]:
    """The labels of a JSONL file, each checked against `requests` (by id and pair hash) and
    its `edited` against `edits` (posttrain.annotate.edits: no special or formatting tokens,
    at most so many tokens; lines longer than the edit limit allows are not read). Raises
    DataErrors listing every bad row (file, row, field)."""
    if Path(path).suffix.lower() not in (".jsonl", ".ndjson"):
        raise DataError(path, None, None, "labels are JSONL, one label per line (a .jsonl file)")
    rows, errors = read_numbered_rows(path, max_row_bytes=edits.row_bytes if edits else None,
                                      too_long=edits.too_long() if edits else "")
    labels: list[Label] = []
    seen: dict[str, int] = {}
    for n, row in rows:
        def fail(field, message):
            errors.append(DataError(path, n, field, message))

        unknown = sorted(set(row) - set(LABEL_FIELDS))
        if unknown:
            fail(unknown[0], f"unknown field (a label has {', '.join(LABEL_FIELDS)})")
            continue
        rid = row.get("id")
        if not isinstance(rid, str) or not rid:
            fail("id", "missing: the request id this label answers")
            continue
        if rid not in requests:
            fail("id", f"no request {rid!r} in this round's requests (a label for another round or run?)")
            continue
        if rid in seen:
            fail("id", f"request {rid!r} is labelled twice (also on row {seen[rid]})")
            continue
        seen[rid] = n
        if row.get("pair_sha256") != requests[rid].pair_sha256:
            fail("pair_sha256", f"does not match request {rid!r}: its responses changed since the export "
                                "(or the label belongs to another export); export again and relabel it")
            continue
        for key in ("strength", "edited", "annotator", "reason"):
            if row.get(key) is not None and not isinstance(row[key], str):
                fail(key, f"must be a string, got {type(row[key]).__name__}")
        label = Label(request_id=rid, pair_sha256=row["pair_sha256"], preferred=row.get("preferred"),
                      strength=row.get("strength"), edited=row.get("edited"),
                      annotator=row.get("annotator") or "external", reason=row.get("reason"))
        problems = label_problems(label)
        if not problems and label.edited is not None and edits is not None:
            why = edits.problem(label.edited)
            problems = [("edited", why)] if why else []
        for field, message in problems:
            fail(field, message)
        if not problems:
            labels.append(label)
    if errors:
        raise DataErrors(errors)
    return labels


class ExternalAnnotator:
    """Labels come from outside: `posttrain annotate export` the requests, label them in any
    tool, `posttrain annotate import` the labels. Until every request has one, the round waits."""

    name = "external"

    def __init__(self):
        self.folder: Path | None = None

    def attach(self, folder: Path) -> None:
        self.folder = folder

    def annotate(self, requests: list[Request]) -> list[Label | None]:
        return [None] * len(requests)  # labels arrive through `posttrain annotate import`

    def where(self) -> str:
        run_round = _run_and_round(self.folder)
        return (f"export with `posttrain annotate export {run_round} requests.jsonl`, label, then "
                f"`posttrain annotate import {run_round} labels.jsonl` (format: posttrain.annotate.jsonl)")


def _run_and_round(folder: Path | None) -> str:
    if folder is None:
        return "RUN_DIR ROUND"
    round_dir = folder.parent
    return f"{round_dir.parent} {int(round_dir.name.removeprefix('round_'))}"

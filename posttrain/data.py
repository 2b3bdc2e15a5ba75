"""Readers and validators for preference, SFT and prompt rows.

Accepted (TRL's conventions first), in JSONL, Parquet, a JSON array file, or a folder
written by `datasets.Dataset.save_to_disk`:

- preference rows: `prompt` + `chosen` + `rejected` as plain text (standard) or as message
  lists (conversational), or TRL's implicit-prompt form where `chosen`/`rejected` are whole
  conversations that share everything but the last (assistant) turn. Optional `edited`
  (same shape as `chosen`), `strength`, `capability`, `system`, `id`.
- SFT rows: `messages`, or `prompt` + `completion` (text or message lists); optional
  `capability`, `system`, `id`.
- prompt rows: `prompt` (text or messages); optional `capability`, `system`, `id`; every
  other field is kept in `Prompt.meta`. Unit-test fields (`tests`; `test` + `entry_point`;
  `test_list` + `test_setup_code`; `inputs` + `outputs`) are checked as the code reward reads
  them (`posttrain.reward.code.formats`).

Rows are numbered from 1: the line number in a JSONL file (blank lines keep their number),
the row index + 1 in Parquet, JSON arrays and datasets folders. Every problem becomes a
`DataError` naming the file, the row and the field; loaders collect all of them and raise
one `DataErrors`. Unknown extra columns in preference and SFT rows are ignored (public
datasets carry scores, ids and such); they never make a row disappear.
"""

from __future__ import annotations

import json
import os
import stat
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

MAX_ROW_BYTES = 64 << 20
"""One JSONL line (one row) may be at most this long; a longer one is reported, not read."""
STRENGTHS = ("significantly_better", "better", "slightly_better", "marginally_better")
ROLES = ("system", "user", "assistant", "ipython", "tool")
Kind = Literal["preference", "sft", "prompts"]


# ------------------------------------------------------------------------------ errors


class DataError(ValueError):
    """One problem in one row (row None: the whole file; field None: the whole row)."""

    def __init__(self, file: str | os.PathLike, row: int | None, field: str | None, message: str):
        self.file = str(file)
        self.row = row
        self.field = field
        self.message = message
        super().__init__(str(self))

    def __reduce__(self):
        # picklable (errors cross process boundaries between stage workers and the driver)
        return (DataError, (self.file, self.row, self.field, self.message))

    def __str__(self) -> str:
        parts = [self.file]
        if self.row is not None:
            parts.append(f"row {self.row}")
        if self.field is not None:
            parts.append(f"field {self.field!r}")
        return ": ".join(parts + [self.message])


class DataErrors(DataError):
    """Several problems, all reported at once. `errors` holds each DataError."""

    MAX_SHOWN = 50

    def __init__(self, errors: list[DataError]):
        if not errors:
            raise ValueError("DataErrors needs at least one error")
        self.errors = list(errors)
        first = self.errors[0]
        super().__init__(first.file, first.row, first.field, first.message)

    def __reduce__(self):
        return (DataErrors, (self.errors,))

    def __str__(self) -> str:
        if len(self.errors) == 1:
            return DataError.__str__(self.errors[0])
        lines = [DataError.__str__(e) for e in self.errors[: self.MAX_SHOWN]]
        more = len(self.errors) - self.MAX_SHOWN
        if more > 0:
            lines.append(f"... and {more} more")
        return f"{len(self.errors)} problems in the data:\n" + "\n".join(lines)


def _raise_if_any(errors: list[DataError]) -> None:
    if errors:
        raise DataErrors(errors)


# ------------------------------------------------------------------------- dataclasses


@dataclass
class Preference:
    """A ranking of 2 or 3 responses to one prompt: edited > chosen > rejected."""

    id: str
    prompt: list[dict]  # the conversation up to the ranked assistant turn
    chosen: str
    rejected: str
    edited: str | None = None
    strength: str | None = None
    capability: str | None = None
    source: str = ""  # "file:row"


@dataclass
class SFTExample:
    id: str
    messages: list[dict]  # ends with an assistant turn
    capability: str | None = None
    source: str = ""


@dataclass
class Prompt:
    id: str
    messages: list[dict]  # ends before the assistant turn to generate
    capability: str | None = None
    system: str | None = None
    meta: dict = field(default_factory=dict)
    source: str = ""


# ----------------------------------------------------------------------------- reading


def _is_datasets_folder(path: Path) -> bool:
    return (path / "dataset_dict.json").is_file() or (
        (path / "state.json").is_file() and (path / "dataset_info.json").is_file()
    )


def read_numbered_rows(path: str | os.PathLike, *, max_row_bytes: int | None = None,
                       too_long: str = "") -> tuple[list[tuple[int, dict]], list[DataError]]:
    """(row number, row) pairs of a data file, and the rows that could not be read.

    Malformed JSON lines and rows that are not objects become errors; the other rows are
    still returned, so a validator can report every problem in one pass. `max_row_bytes`
    (JSONL only; default MAX_ROW_BYTES) caps one line: a longer one is an error, skipped in
    chunks without being held whole, with `too_long` added to its message.
    """
    path = Path(path)
    name = str(path)
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise DataError(name, None, None, "no such file or folder") from None
    except OSError as err:
        raise DataError(name, None, None, f"cannot read: {err.strerror}") from None
    if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
        # stat, not open: opening a FIFO blocks until a writer comes, /dev/zero never ends
        raise DataError(name, None, None, "not a regular file or folder (a FIFO, device or socket "
                        "cannot be read as data)")
    if stat.S_ISDIR(mode):
        if not _is_datasets_folder(path):
            raise DataError(name, None, None, "a folder, but not one written by datasets' "
                            "save_to_disk (no dataset_info.json/state.json or dataset_dict.json)")
        return _numbered(name, _read_datasets_folder(path))
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        import pyarrow
        import pyarrow.parquet as pq

        try:
            return _numbered(name, pq.read_table(path).to_pylist())
        except (pyarrow.ArrowException, OSError) as err:
            raise DataError(name, None, None, f"not a readable Parquet file: {str(err)[:300]}") from None
    if suffix == ".json" and _starts_with_bracket(path):
        try:
            text = path.read_text(encoding="utf-8-sig")
            rows = json.loads(text)
        except UnicodeDecodeError as err:
            raise DataError(name, None, None, f"not UTF-8 text (byte {err.start})") from None
        except json.JSONDecodeError as err:
            raise DataError(name, None, None, f"malformed JSON: {err.msg} (line {err.lineno})") from None
        except RecursionError:
            raise DataError(name, None, None, "malformed JSON: nested too deep") from None
        return _numbered(name, rows)
    if suffix in (".jsonl", ".ndjson", ".json"):
        return _read_jsonl(path, max_row_bytes, too_long)
    raise DataError(name, None, None, f"unknown file type {suffix!r}: expected .jsonl, .json, "
                    ".parquet or a datasets folder")


def _numbered(name: str, rows: list) -> tuple[list[tuple[int, dict]], list[DataError]]:
    out, errors = [], []
    for i, row in enumerate(rows, start=1):
        if isinstance(row, dict):
            out.append((i, row))
        else:
            errors.append(DataError(name, i, None, f"must be a JSON object, got {type(row).__name__}"))
    return out, errors


def _starts_with_bracket(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n").startswith(b"[")


def _read_jsonl(path: Path, max_row_bytes: int | None = None,
                too_long: str = "") -> tuple[list[tuple[int, dict]], list[DataError]]:
    """Rows of a JSONL file. Lines end at \\n only (str.splitlines would also split inside a
    row at U+2028, U+0085 and other separators that JSON strings may hold raw)."""
    max_row_bytes = max_row_bytes or MAX_ROW_BYTES
    name = str(path)
    out, errors = [], []
    with open(path, "rb") as f:
        i = 0
        while True:
            raw = f.readline(max_row_bytes + 1)
            if not raw:
                break
            i += 1
            if len(raw) > max_row_bytes and not raw.endswith(b"\n"):
                errors.append(DataError(name, i, None, f"longer than {max_row_bytes} bytes; not read{too_long}"))
                while raw and not raw.endswith(b"\n"):  # skip the rest of the line
                    raw = f.readline(max_row_bytes)
                continue
            if i == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]  # a byte-order mark (some editors write one) is not part of row 1
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                errors.append(DataError(name, i, None, f"not UTF-8 text (byte {err.start})"))
                continue
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                errors.append(DataError(name, i, None, f"malformed JSON: {err.msg} (column {err.colno})"))
                continue
            except RecursionError:
                errors.append(DataError(name, i, None, "malformed JSON: nested too deep"))
                continue
            if isinstance(row, dict):
                out.append((i, row))
            else:
                errors.append(DataError(name, i, None, f"must be a JSON object, got {type(row).__name__}"))
    return out, errors


def _read_datasets_folder(path: Path) -> list[dict]:
    from datasets import DatasetDict, load_from_disk

    ds = load_from_disk(str(path))
    if isinstance(ds, DatasetDict):
        if len(ds) != 1:
            raise DataError(str(path), None, None, f"a DatasetDict with splits {sorted(ds)}: "
                            "point at one split's folder instead")
        ds = next(iter(ds.values()))
    return ds.to_list()


def read_rows(path: str | os.PathLike) -> list[dict]:
    """The rows of a JSONL / JSON / Parquet file or a datasets folder. Raises DataErrors
    listing every unreadable row."""
    rows, errors = read_numbered_rows(path)
    _raise_if_any(errors)
    return [row for _, row in rows]


# ------------------------------------------------------------------------- validation


class _Row:
    """Checks on one row; each failed check records a DataError and returns None."""

    def __init__(self, file: str, row: int, data: dict):
        self.file, self.row, self.data = file, row, data
        self.errors: list[DataError] = []

    @property
    def source(self) -> str:
        return f"{self.file}:{self.row}"

    def fail(self, field: str | None, message: str) -> None:
        self.errors.append(DataError(self.file, self.row, field, message))

    def get(self, key: str) -> Any:
        # Parquet and datasets fill absent columns with None: None means absent.
        return self.data.get(key)

    def optional_str(self, key: str, choices: tuple[str, ...] | None = None) -> str | None:
        value = self.get(key)
        if value is None:
            return None
        if not isinstance(value, str):
            self.fail(key, f"must be a string, got {type(value).__name__}")
            return None
        if choices is not None and value not in choices:
            self.fail(key, f"unknown label {value!r} (expected one of {', '.join(choices)})")
            return None
        return value

    def row_id(self) -> str:
        value = self.get("id")
        if value is None:
            return self.source
        if isinstance(value, bool) or not isinstance(value, (str, int)):
            self.fail("id", f"must be a string or an integer, got {type(value).__name__}")
            return self.source
        return str(value)

    def messages(self, key: str, value: Any) -> list[dict] | None:
        """A list of {'role', 'content'} messages, checked; None (and an error) otherwise."""
        if not isinstance(value, list) or not value:
            self.fail(key, "must be a non-empty list of messages")
            return None
        ok = True
        out = []
        for i, m in enumerate(value, start=1):
            if not isinstance(m, dict):
                self.fail(key, f"message {i}: must be an object with 'role' and 'content'")
                ok = False
                continue
            role, content = m.get("role"), m.get("content")
            if role not in ROLES:
                self.fail(key, f"message {i}: unknown role {role!r} (expected one of {', '.join(ROLES)})")
                ok = False
            if not isinstance(content, str):
                self.fail(key, f"message {i}: 'content' must be a string")
                ok = False
            # Parquet/datasets store absent struct fields as None: drop those keys.
            out.append({k: v for k, v in m.items() if v is not None})
        return out if ok else None

    def text_or_messages(self, key: str) -> tuple[str, Any] | None:
        """('text', str) or ('messages', list); None (and an error) otherwise."""
        value = self.get(key)
        if value is None:
            self.fail(key, "missing")
            return None
        if isinstance(value, str):
            if not value.strip():
                self.fail(key, "must be a non-empty string or a list of messages")
                return None
            return "text", value
        if isinstance(value, list):
            msgs = self.messages(key, value)
            return ("messages", msgs) if msgs is not None else None
        self.fail(key, f"must be a non-empty string or a list of messages, got {type(value).__name__}")
        return None

    def prompt_messages(self, key: str = "prompt") -> list[dict] | None:
        got = self.text_or_messages(key)
        if got is None:
            return None
        kind, value = got
        msgs = [{"role": "user", "content": value}] if kind == "text" else value
        if msgs[-1]["role"] == "assistant":
            self.fail(key, "must not end with an assistant turn (the assistant turn to rank or "
                           "generate comes after it)")
            return None
        if all(m["role"] == "system" for m in msgs):
            self.fail(key, "has only system messages: there is nothing to respond to")
            return None
        return msgs

    def apply_system(self, msgs: list[dict]) -> list[dict]:
        system = self.optional_str("system")
        if system is None:
            return msgs
        if msgs and msgs[0]["role"] == "system":
            self.fail("system", "given, but the conversation already starts with a system message")
            return msgs
        return [{"role": "system", "content": system}] + msgs


def _response(r: _Row, key: str, prompt: list[dict] | None, required: bool = True
              ) -> tuple[list[dict] | None, str] | None:
    """The ranked assistant text of `key` and the prompt it answers.

    Text: the prompt is the row's prompt. Messages: `prompt + value` (value alone when the
    row has no prompt: TRL's implicit-prompt form) must end with an assistant turn; the
    conversation before that turn is this response's prompt.
    """
    value = r.get(key)
    if value is None:
        if required:
            r.fail(key, "missing")
        return None
    if isinstance(value, str):
        if not value.strip():
            r.fail(key, "must be a non-empty string or a list of messages")
            return None
        return prompt, value
    if not isinstance(value, list):
        r.fail(key, f"must be a non-empty string or a list of messages, got {type(value).__name__}")
        return None
    msgs = r.messages(key, value)
    if msgs is None:
        return None
    if prompt and msgs[:len(prompt)] == prompt:
        r.fail(key, "repeats the prompt: give the prompt once, in 'prompt' or inside "
                    f"'{key}', not in both (it would be duplicated)")
        return None
    conversation = (prompt or []) + msgs
    last = conversation[-1]
    if last["role"] != "assistant":
        r.fail(key, f"the conversation must end with the assistant turn being ranked, "
                    f"but it ends with a {last['role']!r} turn")
        return None
    if not last["content"].strip():
        r.fail(key, "the ranked assistant turn is empty")
        return None
    return conversation[:-1], last["content"]


def _preference(r: _Row) -> Preference | None:
    has_prompt = r.get("prompt") is not None
    prompt = r.prompt_messages() if has_prompt else None
    # With a bad prompt the responses are still checked, so every problem of the row is
    # reported (against no prompt: a list must then end with an assistant turn by itself).
    chosen = _response(r, "chosen", prompt)
    rejected = _response(r, "rejected", prompt)
    edited = _response(r, "edited", prompt, required=False)
    strength = r.optional_str("strength", STRENGTHS)
    capability = r.optional_str("capability")
    rid = r.row_id()
    if r.errors:
        return None
    base = chosen[0]
    if base is None:  # text responses and no prompt field
        r.fail("prompt", "missing: plain-text chosen/rejected need a 'prompt' field")
        return None
    for key, got in (("rejected", rejected), ("edited", edited)):
        if got is not None and got[0] != base:
            r.fail(key, "the conversation before the ranked turn differs from the one in 'chosen'")
            return None
    if not base or all(m["role"] == "system" for m in base):
        r.fail("chosen", "there is no prompt before the ranked assistant turn")
        return None
    if base[-1]["role"] == "assistant":
        r.fail("chosen", "the turn before the ranked assistant turn is also an assistant turn")
        return None
    if rejected[1].strip() == chosen[1].strip():
        r.fail("rejected", "is identical to 'chosen' (a preference needs two different responses)")
        return None
    if edited is not None and edited[1].strip() == chosen[1].strip():
        r.fail("edited", "is identical to 'chosen' (an edit must change the response)")
        return None
    messages = r.apply_system(base)
    if r.errors:
        return None
    return Preference(id=rid, prompt=messages, chosen=chosen[1], rejected=rejected[1],
                      edited=edited[1] if edited else None, strength=strength,
                      capability=capability, source=r.source)


def _sft(r: _Row) -> SFTExample | None:
    capability = r.optional_str("capability")
    rid = r.row_id()
    if r.get("messages") is not None:
        msgs = r.messages("messages", r.get("messages"))
        if msgs is None:
            return None
        key = "messages"
    elif r.get("prompt") is not None or r.get("completion") is not None:
        prompt = r.prompt_messages()
        completion = r.get("completion")
        key = "completion"
        if completion is None:
            r.fail(key, "missing")
            return None
        if isinstance(completion, str):
            if not completion.strip():
                r.fail(key, "must be a non-empty string or a list of messages")
                return None
            tail = [{"role": "assistant", "content": completion}]
        elif isinstance(completion, list):
            tail = r.messages(key, completion)
        else:
            r.fail(key, f"must be a non-empty string or a list of messages, got {type(completion).__name__}")
            return None
        if prompt is None or tail is None:
            return None
        msgs = prompt + tail
    else:
        r.fail("messages", "missing: expected 'messages', or 'prompt' and 'completion'")
        return None
    if msgs[-1]["role"] != "assistant":
        r.fail(key, f"the conversation must end with an assistant turn, but it ends with a "
                    f"{msgs[-1]['role']!r} turn")
        return None
    if not msgs[-1]["content"].strip():
        r.fail(key, "the final assistant turn is empty")
        return None
    if all(m["role"] in ("system", "assistant") for m in msgs):
        r.fail(key, "has no user turn before the assistant turn")
        return None
    msgs = r.apply_system(msgs)
    if r.errors:
        return None
    return SFTExample(id=rid, messages=msgs, capability=capability, source=r.source)


_PROMPT_FIELDS = {"prompt", "capability", "system", "id"}
# Unit-test fields of the code reward's test forms (posttrain.reward.code.formats.FORM_FIELDS).
_CODE_TEST_FIELDS = ("tests", "test", "entry_point", "test_list", "test_setup_code", "inputs", "outputs")


def _prompt(r: _Row) -> Prompt | None:
    msgs = r.prompt_messages()
    capability = r.optional_str("capability")
    system = r.optional_str("system")
    rid = r.row_id()
    if msgs is None:
        return None
    if system is not None and msgs[0]["role"] == "system":
        r.fail("system", "given, but the prompt already starts with a system message")
    if r.errors:
        return None
    meta = {k: v for k, v in r.data.items() if k not in _PROMPT_FIELDS}
    if any(meta.get(k) is not None for k in _CODE_TEST_FIELDS):
        from posttrain.reward.code.formats import row_problems  # the code reward's own reading of them

        for key, message in row_problems(meta):
            r.fail(key, message)
    if meta.get("instruction_id_list") is not None:
        _check_instructions(r, meta, msgs)
    if r.errors:
        return None
    return Prompt(id=rid, messages=msgs, capability=capability, system=system, meta=meta,
                  source=r.source)


def _check_instructions(r: _Row, meta: dict, msgs: list[dict]) -> None:
    """IFEval-style `instruction_id_list` + `kwargs` (posttrain.reward.instructions): ids the
    checkers know, kwargs they take, none they would draw at random. Warnings (what abstains
    here) are for validate-data's report, not errors."""
    from posttrain.reward.instructions import check_row, prompt_text

    for issue in check_row(meta, prompt_text(msgs))[0]:
        if not issue.warning:
            r.fail(issue.field, issue.message)


_PARSERS = {"preference": _preference, "sft": _sft, "prompts": _prompt}


def _parse_file(path, kind: str) -> tuple[list, list[DataError], int]:
    """Parsed items, every problem, and the number of rows read (readable or not)."""
    if kind not in _PARSERS:
        raise ValueError(f"unknown data kind {kind!r} (expected one of {', '.join(_PARSERS)})")
    parse = _PARSERS[kind]
    rows, errors = read_numbered_rows(path)
    unreadable = len(errors)
    items = []
    for number, data in rows:
        r = _Row(str(path), number, data)
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
    _raise_if_any(errors)
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
        from .chat import render_prompt

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


# ---------------------------------------------------------------------------- filters


class FilterCounts:
    """Counts of what a filter kept and dropped, by reason: filters never drop silently.

    >>> fc = FilterCounts("rm pairs"); fc.keep(); fc.drop("slightly_better", 2)
    >>> fc.summary()
    {'name': 'rm pairs', 'total': 3, 'kept': 1, 'dropped': 2, 'dropped_by_reason': {'slightly_better': 2}}
    """

    def __init__(self, name: str = ""):
        self.name = name
        self.kept = 0
        self.dropped: Counter = Counter()

    def keep(self, n: int = 1) -> None:
        self.kept += n

    def drop(self, reason: str, n: int = 1) -> None:
        self.dropped[reason] += n

    @property
    def total(self) -> int:
        return self.kept + sum(self.dropped.values())

    def summary(self) -> dict:
        return {
            "name": self.name,
            "total": self.total,
            "kept": self.kept,
            "dropped": sum(self.dropped.values()),
            "dropped_by_reason": dict(sorted(self.dropped.items())),
        }

    def __str__(self) -> str:
        reasons = ", ".join(f"{r}: {n}" for r, n in sorted(self.dropped.items())) or "none"
        return f"{self.name or 'filter'}: kept {self.kept} of {self.total} (dropped {reasons})"

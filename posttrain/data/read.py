"""Reading a data file into numbered rows: JSONL, a JSON array, Parquet, or a `datasets` folder.

Rows are numbered from 1: the line number in a JSONL file (blank lines keep their number),
the row index + 1 in Parquet, JSON arrays and datasets folders. Only regular files and folders
are opened (checked by `stat`, so a FIFO or a device never is); JSONL splits on `\\n` only,
and one line is at most `MAX_ROW_BYTES`. What a row must hold is posttrain.data.rows.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

from posttrain.data.errors import DataError, raise_if_any

MAX_ROW_BYTES = 64 << 20
"""One JSONL line (one row) may be at most this long; a longer one is reported, not read."""


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
    raise_if_any(errors)
    return [row for _, row in rows]

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

The package, one job a module (every name below is importable from `posttrain.data`):

    errors.py   DataError, DataErrors
    read.py     a file into numbered rows (formats, size limits, regular files only)
    rows.py     what each kind of row must hold; Preference, SFTExample, Prompt
    load.py     load_preferences / load_sft / load_prompts, validate_file, format_report
    counts.py   FilterCounts
"""

from posttrain.data.counts import FilterCounts
from posttrain.data.errors import DataError, DataErrors
from posttrain.data.load import (
    ValidationReport,
    duplicate_ids,
    format_report,
    load_preferences,
    load_prompts,
    load_sft,
    validate_file,
)
from posttrain.data.read import MAX_ROW_BYTES, read_numbered_rows, read_rows
from posttrain.data.rows import (
    _CODE_TEST_FIELDS,  # the code reward's test fields, which tests compare with its own list
    ROLES,
    STRENGTHS,
    Kind,
    Preference,
    Prompt,
    SFTExample,
)

__all__ = [
    "MAX_ROW_BYTES", "ROLES", "STRENGTHS", "DataError", "DataErrors", "FilterCounts", "Kind", "Preference",
    "Prompt", "SFTExample", "ValidationReport", "duplicate_ids", "format_report", "load_preferences",
    "load_prompts", "load_sft", "read_numbered_rows", "read_rows", "validate_file",
]

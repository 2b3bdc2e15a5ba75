"""Prompt rows with reference fields (unit tests, answers), looked up by prompt.

Shared by the code and math rewards: `score(prompts, responses)` (the plain protocol) finds
each prompt's row in a `prompts_file` by `prompt_key`, a hash of its non-system messages.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from collections.abc import Sequence
from typing import Any

Message = dict[str, Any]


def prompt_key(messages: Sequence[Message]) -> str:
    """A stable key for a prompt conversation, ignoring system messages (the sample stage
    may add a capability system prompt that the prompt file does not have)."""
    kept = [(str(m.get("role")), str(m.get("content"))) for m in messages if m.get("role") != "system"]
    return hashlib.sha256(json.dumps(kept, ensure_ascii=False).encode("utf-8")).hexdigest()


class ReferenceIndex:
    """Prompt rows of a JSONL file, keyed by `prompt_key`, keeping the fields a reward needs.

    A row needs `prompt` (text, or a list of {"role", "content"} messages); every other
    field is kept as meta. Two rows with the same prompt but different references are an
    error (which one would be right?); identical duplicates are fine.
    """

    def __init__(self, path: str | os.PathLike, fields: Sequence[str]):
        self.path = str(path)
        self.fields = tuple(fields)
        self._metas: dict[str, dict] = {}
        self._rows: dict[str, int] = {}
        try:
            mode = os.stat(self.path).st_mode
        except OSError as e:
            raise ValueError(f"{self.path}: cannot read the prompts file: {e.strerror}") from None
        if not stat.S_ISREG(mode):  # a FIFO would hang the open, /dev/zero never end
            raise ValueError(f"{self.path}: the prompts file is not a regular file")
        with open(self.path, encoding="utf-8", newline="\n") as f:
            for row_no, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{self.path}: row {row_no}: not valid JSON: {e}") from e
                except RecursionError:
                    raise ValueError(f"{self.path}: row {row_no}: not valid JSON: nested too deep") from None
                except ValueError as e:  # e.g. an integer past Python's 4300-digit limit
                    raise ValueError(f"{self.path}: row {row_no}: cannot be read: {e}") from None
                if not isinstance(row, dict):
                    raise ValueError(f"{self.path}: row {row_no}: expected a JSON object")
                messages = _row_messages(row, self.path, row_no)
                key = prompt_key(messages)
                meta = {k: row[k] for k in self.fields if k in row}
                if key in self._metas and self._metas[key] != meta:
                    raise ValueError(
                        f"{self.path}: row {row_no}: field 'prompt': same prompt as row {self._rows[key]} "
                        f"but different {'/'.join(self.fields)}")
                self._metas[key] = meta
                self._rows[key] = row_no

    def __len__(self) -> int:
        return len(self._metas)

    def meta_for(self, messages: Sequence[Message]) -> dict:
        """The row's fields for this prompt, or {} when the prompt is not in the file."""
        return self._metas.get(prompt_key(messages), {})


def _row_messages(row: dict, path: str, row_no: int) -> list[Message]:
    prompt = row.get("prompt")
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    if isinstance(prompt, list) and prompt and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in prompt):
        return prompt
    raise ValueError(f"{path}: row {row_no}: field 'prompt': expected text or a list of "
                     "{'role', 'content'} messages")

"""The sample shards: one typed row per prompt, written by `sample` and read by every stage
after it (dpo's on-policy pairs, the report, data quality control), through this module only.

`samples/shard_00000.jsonl`, ... one JSON object per line, the fields of `SampleRow`. A row
read back is checked field by field; a broken one is an error naming the shard, the row and
the field.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from posttrain import files


class SampleRowError(ValueError):
    """A sample-shard row that cannot be used; the message names the shard, row and field."""

    def __init__(self, path, row: int, field_name: str, message: str):
        super().__init__(f"{path}: row {row}: field '{field_name}': {message}")


@dataclass
class SampleRow:
    """One prompt's K samples, their scores and the choice made from them."""

    id: str
    prompt: list[dict]
    """The conversation the policy saw (system prompts applied)."""
    capability: str | None
    responses: list[str]
    n_tokens: list[int]
    finished: list[bool]
    """Whether each response reached an end-of-turn token."""
    scores: list[float | None]
    """The reward of each response (None: the reward abstained)."""
    best: int | None
    """Index of the top-1 kept for SFT (None: no response qualified)."""
    worst: int | None
    prompt_tokens: int = 0
    sampling: dict[str, Any] = field(default_factory=dict)
    """The settings that produced the responses (k, temperature, seed, backend, policy)."""
    reasons: list[str] = field(default_factory=list)
    """Why each response scored what it did (posttrain.reward.Scored.reason: "passed", "timeout",
    "wrong", "scored" for a bare number, ...); empty in shards written before reasons existed."""
    details: list[str] = field(default_factory=list)
    """What a person auditing a verdict reads, per response ("3/5 tests passed; test 2: got 4")."""

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, row: dict, path: str | os.PathLike = "?", line: int = 0) -> SampleRow:
        for key in ("id", "prompt", "responses", "n_tokens", "finished", "scores", "best", "worst"):
            if key not in row:
                raise SampleRowError(path, line, key, "missing")
        k = len(row["responses"])
        for key in ("n_tokens", "finished", "scores"):
            if not isinstance(row[key], list) or len(row[key]) != k:
                raise SampleRowError(path, line, key, f"expected a list of {k} values, one per response")
        for key in ("reasons", "details"):
            value = row.get(key, [])
            if not isinstance(value, list) or value and (len(value) != k or not all(isinstance(v, str) for v in value)):
                raise SampleRowError(path, line, key, f"expected a list of {k} strings, one per response")
        for key in ("best", "worst"):
            idx = row[key]
            if idx is not None and (not isinstance(idx, int) or isinstance(idx, bool) or not 0 <= idx < k):
                raise SampleRowError(path, line, key, f"{idx!r} is not an index into {k} responses")
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{key: value for key, value in row.items() if key in known})


def shard_path(samples_dir: str | os.PathLike, index: int) -> Path:
    return Path(samples_dir) / f"shard_{index:05d}.jsonl"


def write_shard(path: str | os.PathLike, rows: list[SampleRow]) -> None:
    """Written atomically: a shard file exists only when complete."""
    files.write_jsonl(path, [r.to_json() for r in rows])


def read_shard(path: str | os.PathLike) -> list[SampleRow]:
    return [SampleRow.from_json(row, path, i) for i, row in enumerate(files.iter_jsonl(path), start=1)]


def iter_rows(samples_dir: str | os.PathLike) -> Iterator[tuple[str, SampleRow]]:
    """(where, row) for every row of every shard, in order; `where` is "shard:row"."""
    shards = sorted(Path(samples_dir).glob("shard_*.jsonl"))
    if not shards:
        raise FileNotFoundError(f"{samples_dir}: no shard_*.jsonl sample shards")
    for shard in shards:
        for i, row in enumerate(read_shard(shard), start=1):
            yield f"{shard}:{i}", row

"""The job and result-file protocol of generation: what a job asks for and where its answer lands.

A job is a batch of prompts (token ids, chat template applied) with one `SamplingSettings`
and an `out` path. Its result file holds one `Generation` per prompt, in order, written
atomically: an existing file means the job is done. With several engines, engine i of n
writes its slice of a job (`even_slices`) to `part_path(out, i, n)`, and the parts are joined
into `out` (and removed) once all are there (`join_parts`). The local path (child processes,
posttrain.generation) and the Ray path (posttrain.cluster) write the same files the same way,
so a run resumes from either's finished jobs.

Standard library only: the vLLM child, in its own environment, imports this module.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class SamplingSettings:
    """How K responses are drawn for each prompt."""

    k: int = 8
    """Responses per prompt."""
    temperature: float = 1.0
    """Softmax temperature; 0 means greedy (every one of the K responses is the same)."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of tokens whose probability mass reaches top_p."""
    max_new_tokens: int = 256
    """Most tokens generated per response, the stop token included."""
    seed: int = 0
    """Same seed, prompts and backend give the same responses."""
    stop_token_ids: tuple[int, ...] = ()
    """Generation of a response ends when it emits one of these (the end-of-turn tokens)."""

    def __post_init__(self) -> None:
        if self.k < 1:
            raise ValueError(f"SamplingSettings.k must be >= 1, got {self.k}")
        if self.temperature < 0:
            raise ValueError(f"SamplingSettings.temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"SamplingSettings.top_p must be in (0, 1], got {self.top_p}")
        if self.max_new_tokens < 1:
            raise ValueError(f"SamplingSettings.max_new_tokens must be >= 1, got {self.max_new_tokens}")
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["stop_token_ids"] = list(self.stop_token_ids)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SamplingSettings:
        return cls(**{**d, "stop_token_ids": tuple(d.get("stop_token_ids", ()))})


@dataclass
class Generation:
    """The K responses to one prompt."""

    texts: list[str]
    n_tokens: list[int]
    """Generated tokens per response, the stop token included."""
    finished: list[bool]
    """True when the response ended with a stop token (false: cut at max_new_tokens)."""
    finish_reasons: list[str]
    """'stop' or 'length', per response."""
    token_ids: list[list[int]] = field(default_factory=list)
    """Generated token ids per response (stop token included)."""

    @classmethod
    def from_token_ids(cls, seqs: list[list[int]], stop_ids: set[int], decode) -> Generation:
        finished = [bool(s) and s[-1] in stop_ids for s in seqs]
        return cls(
            texts=[decode(s[:-1] if f else s) for s, f in zip(seqs, finished)],
            n_tokens=[len(s) for s in seqs],
            finished=finished,
            finish_reasons=["stop" if f else "length" for f in finished],
            token_ids=[list(s) for s in seqs],
        )


@dataclass
class Job:
    """One batch of prompts sharing sampling settings; its result is written to `out` (JSON)."""

    prompt_ids: list[list[int]]
    settings: SamplingSettings
    out: str
    """Where the list of Generations goes; an existing file means the job is done."""


def read_job_result(path: str | os.PathLike) -> list[Generation]:
    return [Generation(**g) for g in json.loads(Path(path).read_text())["generations"]]


def write_job_result(path: str | os.PathLike, gens: list[Generation], seconds: float) -> None:
    payload = {"generations": [asdict(g) for g in gens], "seconds": seconds}
    tmp = Path(f"{path}.tmp")
    tmp.write_text(json.dumps(payload))
    os.replace(tmp, path)


def part_path(out: str, i: int, n: int) -> str:
    """Where engine i of n writes its slice of the job whose result goes to `out`."""
    return out if n == 1 else f"{out}.part{i}of{n}"


def join_parts(out: str, parts: list[str]) -> None:
    """Join a job's parts, in order, into its result file `out`, then remove them."""
    write_job_result(out, [g for p in parts for g in read_job_result(p)], 0.0)
    for p in parts:
        Path(p).unlink()


def even_slices(n: int, parts: int) -> list[tuple[int, int]]:
    """Contiguous [start, end) slices of range(n) for `parts` workers, sizes differing by at most 1."""
    parts = max(1, min(parts, n))
    base, extra = divmod(n, parts)
    bounds, start = [], 0
    for i in range(parts):
        end = start + base + (1 if i < extra else 0)
        bounds.append((start, end))
        start = end
    return bounds

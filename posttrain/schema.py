"""Base classes for everything a person writes in a recipe: unknown keys are errors, and
every number is finite and bounded.

The bounds are sanity limits, not tuning advice: a value past one is a typo (`k: 100000`,
`max_length: 1e9`, `epochs: 1e6`) that would otherwise surface hours later as an
out-of-memory error or a run that never ends. Each limit is generous next to the Llama 3
report's settings (K 10-30, 128K context, six rounds, a few epochs).
"""

from __future__ import annotations

import typing
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

MAX_ROUNDS = 100
"""Rounds in one recipe (the paper runs six)."""
MAX_SAMPLES = 1024
"""Samples per prompt, K (the paper: 10 to 30)."""
MAX_TOKENS = 1 << 21
"""Any length in tokens: 2,097,152, sixteen times Llama 3.1's 128K context. Lengths are also
checked against the model's `max_position_embeddings` where its config is readable
(`posttrain validate`)."""
MAX_EPOCHS = 1000
"""Passes over a stage's data."""
MAX_BATCH = 1 << 16
"""Rows or sequences in one batch (per process)."""
MAX_COUNT = 10**8
"""Any other count (comparisons, prompts, steps, rows)."""

Tokens = Annotated[int, Field(ge=1, le=MAX_TOKENS)]
"""A length in tokens."""
Samples = Annotated[int, Field(ge=1, le=MAX_SAMPLES)]
"""Samples per prompt."""
Epochs = Annotated[float, Field(gt=0, le=MAX_EPOCHS)]
"""Passes over the data (a fraction is allowed)."""
BatchSize = Annotated[int, Field(ge=1, le=MAX_BATCH)]
"""Rows or sequences per batch."""
Count = Annotated[int, Field(ge=1, le=MAX_COUNT)]
"""A positive count."""
Rounds = Annotated[int, Field(ge=1, le=MAX_ROUNDS)]
"""A round number or a number of rounds."""


def _takes_bool(annotation) -> bool:
    """Whether a field's type admits a bool (then `true` stays a bool, not 1)."""
    if annotation is bool or annotation is typing.Any:
        return True
    return any(_takes_bool(a) for a in typing.get_args(annotation))


class StrictModel(BaseModel):
    """A recipe section. Unknown keys are rejected; every field carries its documentation.
    A number field refuses `true`/`false` (pydantic would turn `k: true` into 1), and every
    float must be finite (`.inf` and `.nan` are refused everywhere)."""

    model_config = ConfigDict(extra="forbid", validate_default=True, use_attribute_docstrings=True,
                              allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_numbers(cls, value, info: ValidationInfo):
        if isinstance(value, bool) and info.field_name is not None:
            field = cls.model_fields.get(info.field_name)
            if field is not None and not _takes_bool(field.annotation):
                raise ValueError(f"expected a number, got {str(value).lower()} (a boolean)")
        return value

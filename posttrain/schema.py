"""Base classes for everything a person writes in a recipe: unknown keys are errors."""

from __future__ import annotations

import typing

from pydantic import BaseModel, ConfigDict, ValidationInfo, field_validator


def _takes_bool(annotation) -> bool:
    """Whether a field's type admits a bool (then `true` stays a bool, not 1)."""
    if annotation is bool or annotation is typing.Any:
        return True
    return any(_takes_bool(a) for a in typing.get_args(annotation))


class StrictModel(BaseModel):
    """A recipe section. Unknown keys are rejected; every field carries its documentation.
    A number field refuses `true`/`false` (pydantic would turn `k: true` into 1)."""

    model_config = ConfigDict(extra="forbid", validate_default=True, use_attribute_docstrings=True)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_numbers(cls, value, info: ValidationInfo):
        if isinstance(value, bool) and info.field_name is not None:
            field = cls.model_fields.get(info.field_name)
            if field is not None and not _takes_bool(field.annotation):
                raise ValueError(f"expected a number, got {str(value).lower()} (a boolean)")
        return value

"""Base classes for everything a person writes in a recipe: unknown keys are errors."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class StrictModel(BaseModel):
    """A recipe section. Unknown keys are rejected; every field carries its documentation."""

    model_config = ConfigDict(extra="forbid", validate_default=True, use_attribute_docstrings=True)

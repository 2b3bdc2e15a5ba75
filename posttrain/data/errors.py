"""The errors of the data readers: `DataError` names the file, the row and the field;
`DataErrors` carries every problem found, so a person fixes a file in one pass. Standard library only."""

from __future__ import annotations

import os


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


def raise_if_any(errors: list[DataError]) -> None:
    if errors:
        raise DataErrors(errors)

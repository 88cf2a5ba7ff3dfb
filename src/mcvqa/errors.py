"""User-facing errors: one line a person can act on, never a traceback.

The CLI catches :class:`McvqaError` and prints ``error: <message>`` with exit code 2. Anything else is a bug
and keeps its traceback.
"""

from __future__ import annotations

from pathlib import Path


class McvqaError(Exception):
    """Base class of errors caused by the user's input or environment."""


class ConfigError(McvqaError):
    """A config field, recipe or override is invalid."""


class DataError(McvqaError):
    """A CSV or one of its rows is invalid. Formats as ``file row N, column c: problem; fix``."""

    def __init__(
        self,
        file: str | Path,
        problem: str,
        *,
        row: int | None = None,
        column: str | None = None,
        fix: str | None = None,
    ) -> None:
        self.file = str(file)
        self.row = row
        self.column = column
        self.problem = problem
        self.fix = fix
        # The path as the user typed it (or as the caller resolved it): with five --probs files a bare
        # "probs.csv" says nothing.
        where = self.file if self.file else "<data>"
        if row is not None:
            where += f" row {row}"
        if column is not None:
            where += f", column {column}" if row is not None else f" column {column}"
        msg = f"{where}: {problem}"
        if fix:
            msg += f"; {fix}"
        super().__init__(msg)


class ImageError(McvqaError):
    """An image cannot be used (missing, unreadable, too large, not an image)."""

    def __init__(self, path: str | Path, problem: str) -> None:
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{path}: {problem}")


class ModelError(McvqaError):
    """A checkpoint cannot be loaded as asked (unsafe format, missing files, missing GPU for 4-bit...)."""

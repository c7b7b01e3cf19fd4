"""Exceptions raypipe raises on purpose.

Every error a user can fix by changing their input derives from :class:`RaypipeError`;
the CLI turns those into a message and exit code 2 instead of a traceback.
"""

from __future__ import annotations

from collections.abc import Iterable


class RaypipeError(Exception):
    """Base class: an error whose message tells the user what to fix."""

    exit_code = 2


class ConfigError(RaypipeError):
    """One or more problems with a config, each with the key path it concerns."""

    def __init__(self, problems: Iterable[str] | str, *, source: str | None = None):
        if isinstance(problems, str):
            problems = [problems]
        self.problems = list(problems)
        self.source = source
        where = f" in {source}" if source else ""
        head = f"{len(self.problems)} problem(s){where}:"
        super().__init__("\n".join([head, *(f"  - {p}" for p in self.problems)]))


class DataError(RaypipeError):
    """Bad training/evaluation data: names the file, and the row where it can."""

    @classmethod
    def at(cls, where: str, rows: list[int], what: str) -> DataError:
        """``rows`` are 0-based positions of the bad rows; the message names the first (1-based)
        and how many more there are."""
        more = f" (and {len(rows) - 1} more row(s))" if len(rows) > 1 else ""
        return cls(f"{where}: row {rows[0] + 1}: {what}{more}")


class CheckpointError(RaypipeError):
    """A checkpoint directory that is missing, incomplete or corrupt."""


class RegistryError(RaypipeError):
    """A model URI that does not resolve, or a registry operation that cannot proceed."""


class MissingExtraError(RaypipeError):
    """An optional dependency is not installed; the message says how to install it."""

    def __init__(self, package: str, extra: str, purpose: str):
        super().__init__(
            f"{purpose} needs the '{package}' package, which is not installed. "
            f"Install it with: pip install 'raypipe[{extra}]'"
        )


class TrainingError(RaypipeError):
    """Training ran and failed (after any retries); the message says what is left behind."""

    exit_code = 1

"""User-facing errors: bad input becomes one line and exit code 2, never a traceback."""

from __future__ import annotations

from typing import Any


class UserError(Exception):
    """A problem with the user's input (data, flags, weights) rather than a bug.

    The CLI prints it as one line and exits with code 2.
    """


class ConfigError(UserError):
    """A config field holds a value that cannot work; names the field, not a command-line flag.

    ``str(e)`` reads ``lr=-1.0: must be a positive number``; the CLI rewrites it with the field's flag
    (``--lr -1.0: must be a positive number``).
    """

    def __init__(self, field: str, value: Any, reason: str):
        super().__init__(f"{field}={value}: {reason}")
        self.field, self.value, self.reason = field, value, reason

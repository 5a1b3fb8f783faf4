"""One error type for everything a user can get wrong.

Every user-facing failure is an :class:`AccelcError` carrying *where* (a key path, a file, a
model, a pass), *what* went wrong and a *hint* on how to fix it.  The CLI prints it as one line,
``error: <where>: <what> (<hint>)``, and exits with status 2.
"""
from __future__ import annotations


class AccelcError(Exception):
    """A user-facing error: ``<where>: <what> (<hint>)``."""

    def __init__(self, where: str, what: str, hint: str | None = None):
        self.where = where
        self.what = what
        self.hint = hint
        super().__init__(str(self))

    def __str__(self) -> str:
        msg = f"{self.where}: {self.what}"
        if self.hint:
            msg += f" ({self.hint})"
        return msg


class NotImplementedYet(AccelcError):
    """A spec section that is valid but whose pass is not implemented yet."""

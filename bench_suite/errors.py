"""Errors of the suite, in one module that imports nothing of the suite.

:class:`UserError` is the one base class of errors a user can fix (a bad option, a missing file, an unknown
name, a corrupt store). The command line turns exactly these into one line ``bench_suite: error: ...`` and
exit status 2, without a traceback; every other exception is a bug and keeps its traceback. Subclasses
exist where a caller needs to tell them apart; each also derives from the built-in exception that describes
it (``KeyError`` for a missing name, ``ValueError`` for a bad value, ``RuntimeError`` for an environment
fault), so ``except ValueError`` keeps working for library users.
"""
from __future__ import annotations

__all__ = [
    "UserError",
    "UnknownMethodError",
    "UnknownProfileError",
    "DataError",
    "TeacherError",
    "ReportError",
    "StoreCorruptError",
    "DataFileError",
    "KernelBuildError",
]


class UserError(Exception):
    """An error the user can fix; the message is one line that says what is wrong and, where it helps, what
    to do. The CLI prints it as ``bench_suite: error: <message>`` and exits with status 2."""


class UnknownMethodError(UserError, KeyError):
    """A method name that no built-in method or plugin registered; the message lists the known names."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it one readable line
        return str(self.args[0]) if self.args else ""


class UnknownProfileError(UserError, ValueError):
    """A backbone profile name that is not registered; the message lists the known ones."""


class DataError(UserError, RuntimeError):
    """The data cannot be found, read or used (missing folder, truncated IDX file, labels out of range)."""


class TeacherError(UserError, RuntimeError):
    """A teacher checkpoint is missing, unreadable or does not fit the requested backbone/dataset."""


class ReportError(UserError, ValueError):
    """A report that cannot be made from the input (unknown x axis, no store, no finished rows, mixed groups,
    unexpected units)."""


class StoreCorruptError(UserError):
    """The results file exists but is not a readable bench_suite SQLite store. The file is left untouched."""


class DataFileError(UserError, ValueError):
    """The paper-results data file is missing, malformed, or names an unknown method/profile."""


class KernelBuildError(UserError, RuntimeError):
    """The C++ kernel could not be compiled or loaded (no compiler, no ninja, a compile error). The message
    says what is missing; ``attention_impl="torch"`` (or ``"auto"``) works without the kernel."""

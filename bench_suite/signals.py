"""The signal policy of the command line: a stopped command says so and exits non-zero, and stays resumable.

SIGINT (Ctrl-C) and SIGTERM (``kill``, a scheduler's time limit) both stop the command the same way: the
handler records the signal and raises ``KeyboardInterrupt`` where the program is. Lightning turns that into
a graceful stop of the fit in progress (``sys.exit(1)``), locks are released by their ``finally`` blocks,
no row is written for an unfinished configuration, and its resumable checkpoint stays where it was last
saved (``--checkpoint-every``). The command then prints one line saying which signal stopped it, what was
finished and how to resume (the same command again), and exits with ``128 + signal number``: **130** for
SIGINT, **143** for SIGTERM. Lightning's own SIGTERM notifier keeps running beside this handler.
"""
from __future__ import annotations

import signal
from typing import Any

__all__ = ["Interrupted", "install", "received", "exit_code", "signal_name", "reset", "stop_message"]

_received: int | None = None
_HANDLED = (signal.SIGINT, signal.SIGTERM)


class Interrupted(KeyboardInterrupt):
    """A command stopped by a signal; ``progress`` says what was finished (one line, for the user)."""

    def __init__(self, progress: str = "") -> None:
        super().__init__(progress)
        self.progress = progress


def stop_message(progress: str = "") -> str:
    """The one line a stopped command prints: which signal, what was finished, how to resume."""
    done = f"{progress}; " if progress else ""
    return (f"bench_suite: stopped by {signal_name()} (exit status {exit_code()}); {done}finished configurations are "
            f"in the store and unfinished ones resume from their last checkpoint: run the same command again")


def _handler(signum: int, frame: Any) -> None:
    global _received
    first = _received is None
    _received = signum
    if first:
        raise KeyboardInterrupt(signal_name(signum))


def _record(signum: int, frame: Any) -> None:
    global _received
    if _received is None:
        _received = signum


def install(defer: bool = False) -> None:
    """Handle SIGINT and SIGTERM as described in the module docstring (main thread only; idempotent).

    Args:
        defer: only record the signal, raise nothing (while the heavy packages import: an exception raised
            inside a half-initialised C extension's import can abort the interpreter, SIGABRT, instead of
            stopping it); the caller checks :func:`received` afterwards and installs the raising handler.
    """
    for sig in _HANDLED:
        try:
            signal.signal(sig, _record if defer else _handler)
        except ValueError:  # not the main thread: leave the defaults
            return


def received() -> int | None:
    """The signal that stopped this process (``None`` if none arrived since :func:`install`)."""
    return _received


def exit_code() -> int:
    """``128 + signal number`` of the received signal (130 for SIGINT, 143 for SIGTERM; 130 if none)."""
    return 128 + int(_received or signal.SIGINT)


def signal_name(signum: int | None = None) -> str:
    """``"SIGINT"`` / ``"SIGTERM"`` for ``signum`` (default: the received one)."""
    return signal.Signals(int(signum or _received or signal.SIGINT)).name


def reset() -> None:
    """Forget a received signal (for tests and long-lived callers)."""
    global _received
    _received = None

"""The user's stop -- Ctrl-C (SIGINT) or SIGTERM -- told apart from a ``KeyboardInterrupt`` a plugin raises.

``install()`` (the ``bench`` command does it at start) replaces both handlers: the first signal marks the stop as the
user's and raises ``KeyboardInterrupt`` (``Terminated`` for SIGTERM) in the main thread; a repeat while the run
cleans up (closing workers, at most seconds) is noted and ignored, so it cannot interrupt the clean-up halfway and
print "Exception ignored" tracebacks. ``by_user()`` is what the in-process runner asks before treating a
``KeyboardInterrupt`` as a stop: one a plugin raises by itself is a failed cell.
"""

from __future__ import annotations

import signal
import sys

_stopping: list[str] = []


class Terminated(KeyboardInterrupt):
    """SIGTERM: stop as for Ctrl-C, exit code 143."""


def _handler(signum, frame):
    name = signal.Signals(signum).name
    if _stopping:
        print(f"{name} again: still stopping (closing workers)...", file=sys.stderr, flush=True)
        return
    _stopping.append(name)
    raise Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()


def install():
    """Install the handlers (main thread only; elsewhere nothing changes); returns a function that restores the
    previous ones."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    _stopping.clear()
    previous = {sig: signal.signal(sig, _handler) for sig in (signal.SIGINT, signal.SIGTERM)}

    def restore() -> None:
        for sig, handler in previous.items():
            signal.signal(sig, handler)

    return restore


def by_user() -> bool:
    return bool(_stopping)

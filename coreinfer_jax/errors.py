"""The project's own error types: bad input a user can fix, reported as one line.

Every error a user's input can cause (a prompt, a setting, a path, a file) is a
`CoreInferError`; the command line prints those as one `error:` line and lets anything else
(a bug, here or in JAX) show its traceback. They subclass ValueError, so callers that catch
ValueError keep working. An interrupt (Ctrl-C, or SIGTERM through `sigterm_interrupts`) is
one line too, once the atomic writers have removed what they had half-written.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Iterator


class CoreInferError(ValueError):
    """Input this project cannot serve, with a message that names the problem."""


class InputError(CoreInferError):
    """A prompt, token ids or a generation setting this model cannot serve."""


class MethodError(CoreInferError):
    """A decoding method's settings that are out of range or do not fit the model."""


class Interrupted(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C's KeyboardInterrupt so that every atomic writer's cleanup runs."""


@contextlib.contextmanager
def sigterm_interrupts() -> Iterator[None]:
    """Within this block SIGTERM raises `Interrupted` (Python's default would end the process
    at once, skipping the cleanup that removes a half-written output); the previous handler
    comes back afterwards. Only the main thread can set a handler: elsewhere this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: object) -> None:
        raise Interrupted(signal.Signals(signum).name)

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def interrupted_line(e: KeyboardInterrupt) -> tuple[str, int]:
    """The one line an interrupted command prints, and its exit status (128 + the signal)."""
    signum = signal.SIGTERM if isinstance(e, Interrupted) else signal.SIGINT
    return f"interrupted ({signum.name}); any partial output was removed", 128 + signum

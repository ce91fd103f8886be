"""Ctrl-C stops a study even when Python drops the KeyboardInterrupt.

A signal's exception is raised wherever the main thread happens to be; inside a finaliser
(`__del__`, a weakref callback) Python prints "Exception ignored in ..." and carries on. A study
of millisecond trials spends a real share of its time in finalisers (caches, tensors), so a
Ctrl-C can be lost and the study runs on. While `noting_interrupts` is active a Ctrl-C is also
remembered, and `stop_if_interrupted` (an Optuna trial callback) raises it again at the next
trial boundary: finished trials are saved, none is left running.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager


@contextmanager
def noting_interrupts() -> Iterator[list[int]]:
    """Within the block, SIGINT raises KeyboardInterrupt as usual and is appended to the yielded
    list. A no-op off the main thread or where someone else installed a SIGINT handler."""
    noted: list[int] = []
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGINT) is not signal.default_int_handler:  # fmt: skip
        yield noted
        return

    def handler(signum, frame):
        noted.append(signum)
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield noted
    finally:
        signal.signal(signal.SIGINT, previous)


def stop_if_interrupted(noted: list[int]) -> Callable[..., None]:
    """An Optuna callback that raises KeyboardInterrupt once a Ctrl-C was noted."""

    def callback(*_) -> None:
        if noted:
            raise KeyboardInterrupt

    return callback

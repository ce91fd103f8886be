"""Ctrl-C stops a study even when Python drops the KeyboardInterrupt.

A signal's exception is raised wherever the main thread happens to be; inside a finaliser
(`__del__`, a weakref callback) Python prints "Exception ignored in ..." and carries on. A study
of millisecond trials spends a real share of its time in finalisers (caches, tensors), so a
Ctrl-C can be lost and the study runs on. While `noting_interrupts` is active a Ctrl-C is also
remembered, and `stop_if_interrupted` (an Optuna trial callback) raises it again at the next
trial boundary: finished trials are saved, none is left running.

SIGTERM (what `kill`, a batch scheduler or `docker stop` sends) is treated the same way where
nothing else handles it, so a study run in the background (where a shell makes it ignore SIGINT)
can still be stopped cleanly instead of dying with a trial left running.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager


@contextmanager
def noting_interrupts() -> Iterator[list[int]]:
    """Within the block, SIGINT (and SIGTERM) raise KeyboardInterrupt and are appended to the
    yielded list. A no-op off the main thread; a signal someone else handles, or that is ignored
    (`nohup`, a background job's SIGINT), is left alone."""
    noted: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield noted
        return

    def handler(signum, frame):
        noted.append(signum)
        raise KeyboardInterrupt

    ours = {signal.SIGINT: signal.default_int_handler, signal.SIGTERM: signal.SIG_DFL}  # the untouched handlers
    previous = {signum: signal.signal(signum, handler)
                for signum, default in ours.items() if signal.getsignal(signum) is default}  # fmt: skip
    try:
        yield noted
    finally:
        for signum, handler_before in previous.items():
            signal.signal(signum, handler_before)


def stop_if_interrupted(noted: list[int]) -> Callable[..., None]:
    """An Optuna callback that raises KeyboardInterrupt once a Ctrl-C (or SIGTERM) was noted."""

    def callback(*_) -> None:
        if noted:
            raise KeyboardInterrupt

    return callback

"""A Ctrl-C that Python drops inside a finaliser still stops the study at the next trial."""

import os
import signal
import sys

import pytest

from heretic_like.interrupts import noting_interrupts, stop_if_interrupted


class SignalsWhileFinalised:
    def __del__(self):
        os.kill(os.getpid(), signal.SIGINT)
        total = 0
        for i in range(10_000):  # the handler runs in here; Python drops what it raises
            total += i


@pytest.fixture
def python_ctrl_c():
    """Python's own Ctrl-C handling, even where the suite was started with SIGINT ignored (a shell
    running it in the background); the handler found is put back after."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def test_a_ctrl_c_swallowed_by_a_finaliser_is_raised_at_the_next_trial_boundary(python_ctrl_c, monkeypatch):
    dropped = []  # what Python reports as "Exception ignored in ..."
    monkeypatch.setattr(sys, "unraisablehook", lambda report: dropped.append(report.exc_type))
    with noting_interrupts() as noted:
        doomed = SignalsWhileFinalised()
        del doomed  # no KeyboardInterrupt escapes a finaliser
        assert noted == [signal.SIGINT]
        with pytest.raises(KeyboardInterrupt):
            stop_if_interrupted(noted)(None, None)
    assert dropped == [KeyboardInterrupt]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored


def test_without_a_ctrl_c_the_callback_does_nothing(python_ctrl_c):
    with noting_interrupts() as noted:
        stop_if_interrupted(noted)(None, None)
    assert noted == []


def test_an_ignored_sigint_stays_ignored():
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)  # `nohup`: the user asked for it
    try:
        with noting_interrupts():
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)


@pytest.fixture
def default_sigterm():
    previous = signal.signal(signal.SIGTERM, signal.SIG_DFL)
    yield
    signal.signal(signal.SIGTERM, previous)


def test_a_sigterm_stops_the_study_like_a_ctrl_c(default_sigterm):
    with noting_interrupts() as noted:
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGTERM)
            for _ in range(1_000_000):  # the handler runs at the next bytecode boundary
                pass
        assert noted == [signal.SIGTERM]
        with pytest.raises(KeyboardInterrupt):
            stop_if_interrupted(noted)(None, None)
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # restored: outside a study it kills


def test_a_sigterm_handled_or_ignored_elsewhere_is_left_alone():
    for theirs in (signal.SIG_IGN, lambda *_: None):
        previous = signal.signal(signal.SIGTERM, theirs)
        try:
            with noting_interrupts():
                assert signal.getsignal(signal.SIGTERM) is theirs
        finally:
            signal.signal(signal.SIGTERM, previous)

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


def test_a_ctrl_c_swallowed_by_a_finaliser_is_raised_at_the_next_trial_boundary(monkeypatch):
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


def test_without_a_ctrl_c_the_callback_does_nothing():
    with noting_interrupts() as noted:
        stop_if_interrupted(noted)(None, None)
    assert noted == []

"""`inferos serve` stops cleanly on SIGTERM at any moment: the signal ends the body of
`stop_on_signal` wherever it is, a second one does not interrupt the shutdown, and the
abort alarm Ray's C++ signal handler arms is disarmed (it made a clean stop exit -6)."""

from __future__ import annotations

import os
import signal
import time

from serving.stop_signal import stop_on_signal


def _restore_default_handlers() -> None:
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.default_int_handler if sig == signal.SIGINT else signal.SIG_DFL)


def test_sigterm_ends_the_body_and_disarms_a_pending_alarm() -> None:
    previous_alarm = signal.signal(signal.SIGALRM, lambda *_: None)
    reached_end = False
    try:
        with stop_on_signal():
            signal.alarm(30)  # what absl's handler arms before it chains to ours
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the signal interrupts this
            reached_end = True
        assert not reached_end
        assert signal.alarm(0) == 0, "the abort alarm is still armed"
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous_alarm)
        _restore_default_handlers()


def test_a_second_signal_while_stopping_does_not_interrupt_the_shutdown() -> None:
    shutdown_finished = False
    try:
        try:
            with stop_on_signal():
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(5)
        finally:
            os.kill(os.getpid(), signal.SIGTERM)  # e.g. Ctrl-C pressed again
            time.sleep(0.05)
            shutdown_finished = True
        assert shutdown_finished
    finally:
        _restore_default_handlers()

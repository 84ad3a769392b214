"""SIGTERM / SIGINT as one clean way out of `inferos serve`, at any moment, exit code 0.

Two things of Ray's stand in the way, both met on a clean clone (a SIGTERM that arrived
while the app was still starting made the process exit -6):
- `ray.init` replaces the SIGTERM handler with one that calls `sys.exit(15)`;
  `deployments.launch.start_ray` puts the caller's handler back.
- Ray's C++ core worker installs absl's failure-signal handler for SIGTERM, which chains to
  the previous handler but first arms a 3 s SIGALRM that abort()s the process, however
  cleanly it is shutting down; the handler here disarms that alarm.
"""

from __future__ import annotations

import logging
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

logger = logging.getLogger(__name__)
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopRequested(Exception):
    """A stop signal arrived; raised in the main thread wherever it was."""


def _raise_stop(signum: int, _frame: FrameType | None) -> None:
    signal.alarm(0)  # absl's abort alarm, if its handler saw the signal first
    raise StopRequested(signal.Signals(signum).name)


def _ignore_while_stopping(signum: int, _frame: FrameType | None) -> None:
    signal.alarm(0)
    logger.warning("%s: already shutting down", signal.Signals(signum).name)


@contextmanager
def stop_on_signal() -> Iterator[None]:
    """Run the body until a stop signal; the exit path after it is not interrupted again
    (shutting down is bounded on its own; a second Ctrl-C would leave processes behind)."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, _raise_stop)
    try:
        yield
    except StopRequested as stop:
        logger.info("%s received: stopping", stop)
    finally:
        for sig in STOP_SIGNALS:
            signal.signal(sig, _ignore_while_stopping)

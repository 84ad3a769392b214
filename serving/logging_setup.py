"""Logging for our own packages inside Ray worker processes, whose root logger only shows
warnings: replicas call `configure_logging()` first thing."""

from __future__ import annotations

import logging
import sys

_PACKAGES = ("serving", "deployments", "policies")
_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def configure_logging(level: int = logging.INFO) -> None:
    for name in _PACKAGES:
        logger = logging.getLogger(name)
        if not logger.handlers:
            handler = logging.StreamHandler(sys.stderr)
            handler.setFormatter(logging.Formatter(_FORMAT))
            logger.addHandler(handler)
            logger.propagate = False
        logger.setLevel(level)

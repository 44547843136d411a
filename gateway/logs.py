"""Logging: plain lines on stderr with levels. Secrets are never passed to a logger."""

from __future__ import annotations

import logging
import sys


def setup(level: str = "info") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # paho and amqtt are chatty at info level; their problems reach us through our own messages.
    for noisy in ("amqtt", "transitions"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # pymodbus logs every failed connect and every garbage frame (with hex dumps); the device's own
    # state-change log says it once.
    logging.getLogger("pymodbus").setLevel(logging.CRITICAL)

"""Logging: structured records to journald under systemd, plain lines on stderr otherwise.

Under systemd, `JOURNAL_STREAM` names the stream stderr is connected to; when it matches,
records go to journald's native socket with their own fields, so that an operator can ask
`journalctl -u edge-gateway DEVICE=pump1` or `EVENT=counter_reset`:

    MESSAGE, PRIORITY, SYSLOG_IDENTIFIER=edge-gateway, LOGGER, CODE_FILE/LINE/FUNC,
    and from a record's `extra`: DEVICE=, EVENT=, SEQ=, COUNTER=

Secrets are never passed to a logger.
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import struct
import sys
from collections.abc import Mapping
from typing import TextIO

JOURNAL_SOCKET = "/run/systemd/journal/socket"
# Fields a record may carry in `extra=`; each becomes an upper-case journal field.
STRUCTURED = ("device", "event", "seq", "counter")
_PRIORITY = {logging.CRITICAL: 2, logging.ERROR: 3, logging.WARNING: 4, logging.INFO: 6, logging.DEBUG: 7}


_HIDDEN = re.compile("[\x00-\x1f\x7f-\x9f\u200b-\u200f\u2028-\u202e\u2066-\u2069\ufeff\ud800-\udfff]")


def visible(text: str) -> str:
    """Text as a message may show it on a terminal: control, bidirectional and invisible characters (and lone
    surrogates) escaped, as `\\x00` or `\\u202e`, so that a value cannot hide in, or rewrite, the line."""
    return _HIDDEN.sub(lambda m: f"\\x{ord(m[0]):02x}" if ord(m[0]) < 0x100 else f"\\u{ord(m[0]):04x}", text)


def quoted(text: str, limit: int = 60) -> str:
    """Text from outside (a payload, a name from the wire) as a log line shows it: in quotes, at most `limit`
    characters and how many there were, every character that could hide in or rewrite the line escaped."""
    cut = text if len(text) <= limit else f"{text[:limit]}… ({len(text)} characters)"
    return visible(json.dumps(cut, ensure_ascii=False))


def fields(device: str | None = None, event: str | None = None, **more: object) -> dict[str, object]:
    """`extra=` for a log call: `log.warning("...", extra=logs.fields(device="pump1", event="reset"))`."""
    return {k: v for k, v in {"device": device, "event": event, **more}.items() if v is not None}


class JournalHandler(logging.Handler):
    """journald's native protocol over its datagram socket (what systemd-python's JournalHandler does)."""

    def __init__(self, path: str = JOURNAL_SOCKET, identifier: str = "edge-gateway") -> None:
        super().__init__()
        self.path = path
        self.identifier = identifier
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = self.format(record)
            entry = {"MESSAGE": message, "PRIORITY": _PRIORITY.get(record.levelno, 6),
                     "SYSLOG_IDENTIFIER": self.identifier, "LOGGER": record.name,
                     "CODE_FILE": record.pathname, "CODE_LINE": record.lineno, "CODE_FUNC": record.funcName}
            for name in STRUCTURED:
                value = getattr(record, name, None)
                if value is not None:
                    entry[name.upper()] = value
            self.sock.sendto(encode(entry), self.path)
        except Exception:  # journald gone or the entry too big: never take the daemon down for a log line
            self.handleError(record)


def encode(entry: Mapping[str, object]) -> bytes:
    """The journal's native datagram: KEY=value lines, or KEY, a 64-bit length and the bytes for multi-line values."""
    out = bytearray()
    for key, value in entry.items():
        data = str(value).encode("utf-8", "replace")
        if b"\n" in data:
            out += key.encode() + b"\n" + struct.pack("<Q", len(data)) + data + b"\n"
        else:
            out += key.encode() + b"=" + data + b"\n"
    return bytes(out)


def under_journald(env: Mapping[str, str] = os.environ, stream: TextIO = sys.stderr) -> bool:
    """True when stderr is the journal stream systemd gave us (not merely inherited by a child)."""
    wanted = env.get("JOURNAL_STREAM", "")
    try:
        st = os.fstat(stream.fileno())
    except (OSError, ValueError, AttributeError):
        return False
    return bool(wanted == f"{st.st_dev}:{st.st_ino}")


def setup(level: str = "info") -> None:
    journal = os.environ.get("EDGE_GATEWAY_JOURNAL_SOCKET", JOURNAL_SOCKET)
    if under_journald() and os.path.exists(journal):
        handler: logging.Handler = JournalHandler(journal)
        handler.setFormatter(logging.Formatter("%(message)s"))  # journald adds time, unit and level
    else:
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
    # asyncua logs its own reconnect attempts (with tracebacks) while the device's state change says it once. Both
    # log some of that at CRITICAL themselves (asyncua each error a server sends: a refused security mode, at every
    # attempt): above it.
    for library in ("pymodbus", "asyncua"):
        logging.getLogger(library).setLevel(logging.CRITICAL + 1)

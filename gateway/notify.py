"""A minimal sd_notify: datagrams to $NOTIFY_SOCKET (READY=1, WATCHDOG=1, STATUS=..., RELOADING=1,
STOPPING=1). Does nothing when the daemon does not run under systemd's notify protocol. And the other way:
a reload (SIGHUP) asked for while the daemon starts is held for it (`hold_hup`)."""

from __future__ import annotations

import logging
import os
import signal
import socket
import time
from collections.abc import Mapping

log = logging.getLogger("edge_gateway.notify")


class Notifier:
    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        env = os.environ if env is None else env
        address = env.get("NOTIFY_SOCKET")
        self._address: str | None = None
        self._sock: socket.socket | None = None
        if address:
            self._address = "\0" + address[1:] if address.startswith("@") else address
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        usec = env.get("WATCHDOG_USEC")
        pid = env.get("WATCHDOG_PID")
        self.watchdog_interval = (int(usec) / 1e6 / 2 if usec and usec.isdigit() and int(usec) > 0
                                  and (not pid or pid == str(os.getpid())) else None)

    @property
    def enabled(self) -> bool:
        return self._sock is not None

    def send(self, *fields: str) -> None:
        if self._sock is None or self._address is None:
            return
        try:
            self._sock.sendto("\n".join(fields).encode(), self._address)
        except OSError as err:  # systemd gone or restarting: not a reason to stop the gateway
            log.debug("sd_notify failed: %s", err)

    def ready(self, status: str) -> None:
        self.send("READY=1", f"STATUS={status}")

    def reloading(self) -> None:
        self.send("RELOADING=1", f"MONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}")

    def stopping(self) -> None:
        self.send("STOPPING=1", "STATUS=stopping: committing and delivering what is in flight")

    def status(self, text: str) -> None:
        self.send(f"STATUS={text}")

    def watchdog(self) -> None:
        self.send("WATCHDOG=1")


HELD_HUP: list[int] = []  # SIGHUPs received before the daemon's own handler (commands/daemon.py reloads then)


def hold_hup() -> None:
    """Python's default for SIGHUP ends the process, and systemd takes that as a clean exit (Restart=on-failure
    leaves it down): while `run` imports, loads models and opens the outbox (a second or more on a small box),
    a SIGHUP is held instead."""
    signal.signal(signal.SIGHUP, lambda signum, frame: HELD_HUP.append(signum))

"""A device's health: its state, logged once per change, and its counts of polls and errors.

A device is `starting`, `ok`, `degraded` (some tags bad) or `error` (reads fail). A change of
state is logged once, keyed on the *kind* of problem rather than its details (`kind`), and once on
recovery. The gateway-wide report that gathers every device's is `gateway/report.py`.
"""

from __future__ import annotations

import logging
import re
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from gateway.logs import fields

log = logging.getLogger("edge_gateway.pipeline.health")

# A device whose state flaps (a sensor sending good and bad messages in turn, a float NaN on every other poll) would
# log a line per change, hundreds a second: beyond FLAP_LINES changes in FLAP_WINDOW one line says so, and the next
# line is when it has held one state for FLAP_WINDOW (`settle`).
FLAP_LINES, FLAP_WINDOW = 10, 60.0

# A failed read is logged again when its kind changes, not its details (a wait, an address, an error position): a PLC
# that answered with an exception code and is now switched off, or no longer answers, is news; the next attempt's
# "not connected, next attempt in 1.4s" is not.
_KINDS = (("cannot connect", "unreachable"), ("not connected", "unreachable"), ("connection lost", "unreachable"),
          ("; reconnecting", "unreachable"), ("no response within", "silent"), ("no answer within", "silent"),
          ("no valid response", "garbled"), ("malformed answer", "garbled"), ("does not match the request", "garbled"))
_EXCEPTION = re.compile(r"\b([A-Z][A-Z_]{3,}) \(code -?\d+\)")


def kind(why: str) -> tuple[str, ...]:
    """What a failed read's words say went wrong, without their details: for a source's own words the kind of failure
    (a Modbus exception by its names), else where (the text before the first colon: an endpoint, a topic)."""
    if (exceptions := _EXCEPTION.findall(why)):
        return tuple(sorted(set(exceptions)))
    return next(((k,) for phrase, k in _KINDS if phrase in why), (why.split(":")[0],))


@dataclass
class DeviceHealth:
    name: str
    tags: tuple[str, ...]
    on_change: Callable[[], None] = lambda: None
    state: str = "starting"  # starting | ok | degraded (some tags bad) | error (reads fail)
    polls: int = 0
    errors: int = 0
    last_sample: float | None = None
    last_error: str | None = None
    bad_tags: list[str] = field(default_factory=list)
    clock: Callable[[], float] = time.monotonic
    _why: str | None = None
    _logged: deque[float] = field(default_factory=lambda: deque(maxlen=FLAP_LINES))  # when the last changes were
    _unlogged: int | None = None  # changes since the device began to flap (None: each is logged)
    _changed_at: float = 0.0
    _said: str | None = None  # why, as the last change said it
    _told: str | None = None  # the state `on_change` was last called for while it flaps

    def failed(self, why: str) -> None:
        """A read failed as a whole."""
        self.errors += 1
        self.last_error = why
        self._set("error", why, kind(why))

    def sampled(self, ts: float, bad: list[str], problem: str | None) -> None:
        """A reading arrived, with these tags bad (and why, when the source said)."""
        self.last_sample = ts
        if bad or problem:
            self.errors += 1
        self.bad_tags = bad
        if problem:
            self.last_error = problem
        why = (f"bad tags: {', '.join(bad)}" + (f" ({problem})" if problem else "")) if bad else problem
        # Logged again only when which tags are bad changes, not when a bad value does.
        self._set("degraded" if why else "ok", why, tuple(bad) or (why or "").split(":")[0])

    def _set(self, state: str, why: str | None, key: Any) -> None:
        old = self.state
        if state == old and (state == "ok" or key == self._why):
            return
        self.state, self._why, self._said = state, key, why
        now = self._changed_at = self.clock()
        if self._unlogged is not None:
            self._unlogged += 1
            return
        if len(self._logged) == FLAP_LINES and now - self._logged[0] < FLAP_WINDOW:
            self._unlogged = 0
            log.warning("device %s: its state changed %d times in %.0fs (now %s%s): further changes are not logged "
                        "until it holds one state for %.0fs; health and status show the current one", self.name,
                        FLAP_LINES + 1, now - self._logged[0], state, f": {why}" if why else "", FLAP_WINDOW,
                        extra=fields(self.name, "device_flapping"))
            self._told = state
            self.on_change()
            return
        self._logged.append(now)
        extra = fields(self.name, f"device_{state}")
        if state == "error":
            log.error("device %s: read failed: %s (tags %s now error)", self.name, why, ", ".join(self.tags),
                      extra=extra)
        elif state == "degraded":
            log.warning("device %s: %s", self.name, why, extra=extra)
        elif old in ("error", "degraded"):
            log.warning("device %s: recovered, all tags ok", self.name, extra=extra)
        else:
            log.info("device %s: first sample read, all tags ok", self.name, extra=extra)
        self.on_change()

    def settle(self) -> None:
        """While a device flaps, the status upstream is told its state at each call (the health loop's), not at each
        change; once it has held one state for FLAP_WINDOW, say where it is, and log changes again."""
        if self._unlogged is None:
            return
        if self.clock() - self._changed_at < FLAP_WINDOW:
            if self.state != self._told:
                self._told = self.state
                self.on_change()
            return
        log.warning("device %s: held one state for %.0fs, after %d more changes: %s%s", self.name, FLAP_WINDOW,
                    self._unlogged, self.state, f": {self._said}" if self._said else "",
                    extra=fields(self.name, "device_settled"))
        self._unlogged = None
        self._logged.clear()
        self.on_change()

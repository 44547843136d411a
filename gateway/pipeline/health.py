"""A device's health: its state, logged once per change, and its counts of polls and errors.

A device is `starting`, `ok`, `degraded` (some tags bad) or `error` (reads fail). A change of
state is logged once, keyed on the *kind* of problem rather than its details, and once on
recovery. The gateway-wide report that gathers every device's is `gateway/report.py`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from gateway.logs import fields

log = logging.getLogger("edge_gateway.pipeline.health")


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
    _why: str | None = None

    def failed(self, why: str) -> None:
        """A read failed as a whole."""
        self.errors += 1
        self.last_error = why
        self._set("error", why, why.split(":")[0])

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
        self.state, self._why = state, key
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

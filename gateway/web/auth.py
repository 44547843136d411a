"""Who may read the page: HTTP Basic against a users file of `name:argon2-hash` lines.

The file is the one `edge-gateway web-user` writes, in the local broker's format (the same
argon2 hashes, through pwdlib). Checking a hash takes ~50 ms and 64 MiB, so it runs in a
thread, one at a time, and a login that passed is remembered (keyed by a keyed hash of the
header, never the password) for `REMEMBER` seconds; the file is re-read when it changes.

A failed login answers 401. Each client (address) is logged once when it starts failing,
not at every attempt; after `MAX_FAILURES` failures within `WINDOW` seconds it gets 429 until
the window has passed, without a hash being checked.

An attempt counts against its client from before its hash is checked (`pending`): failures and
pending together reach `MAX_FAILURES`, and the next gets 429 at once. A client's checks run one at a
time (at most one of its hashes in flight), so that a flood of guesses from one address takes one turn
at the hasher, not all of them, and another user's login is checked after at most one of them.
A user name the file does not hold is checked against a dummy hash made with the same parameters, so
that the answer takes as long as for a known name (it was 1.5 ms against 500 ms: names could be tried).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import logging
import os
import secrets
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field

from gateway.logs import fields

log = logging.getLogger("edge_gateway.web.auth")

REMEMBER = 600.0  # seconds a login that passed is taken without checking its hash again
WINDOW = 60.0
MAX_FAILURES = 5  # per client within WINDOW; then 429 until the window has passed
MAX_CLIENTS = 4096  # failing clients remembered (the oldest are forgotten first)


@dataclass
class Failing:
    times: deque[float] = field(default_factory=deque)
    count: int = 0


class Users:
    """The users file, checked as HTTP Basic credentials."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._hashes: dict[str, str] = {}
        self._mtime: float | None = None
        self._key = secrets.token_bytes(32)
        self._passed: OrderedDict[bytes, tuple[str, float]] = OrderedDict()
        self._failing: OrderedDict[str, Failing] = OrderedDict()
        self._logged: OrderedDict[str, float] = OrderedDict()  # client -> when its failures were last logged
        self._one_at_a_time = asyncio.Semaphore(1)
        self._pending: dict[str, int] = {}  # client -> its attempts admitted and not yet decided
        self._turns: dict[str, asyncio.Lock] = {}  # client -> its turn at the hasher (one check in flight)
        self._hasher: object | None = None
        self._dummy: str | None = None  # the hash an unknown user's password is checked against

    def _load(self) -> None:
        try:
            mtime = os.stat(self.path).st_mtime
        except OSError as err:
            if self._mtime is not None or not self._hashes:
                log.error("web: cannot read the users file %s (%s): nobody can log in", self.path, err.strerror)
            self._hashes, self._mtime = {}, None
            return
        if mtime == self._mtime:
            return
        hashes, garbled = {}, []
        try:
            with open(self.path, "rb") as fh:
                lines = fh.read().splitlines()
        except OSError as err:
            log.error("web: cannot read the users file %s (%s): nobody can log in", self.path, err.strerror)
            lines = []
        for number, raw in enumerate(lines, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:  # edited in another encoding: that line's user cannot log in, the others can
                garbled.append(number)
                continue
            name, sep, hashed = line.strip().partition(":")
            if sep and name and hashed:
                hashes[name] = hashed
        if garbled:  # once per version of the file
            log.error("web: the users file %s has %d line(s) that are not UTF-8 text (line %s): their users cannot "
                      "log in; make them again with edge-gateway web-user", self.path, len(garbled),
                      ", ".join(map(str, garbled[:5])) + (", ..." if len(garbled) > 5 else ""))
        self._hashes, self._mtime = hashes, mtime
        self._passed.clear()

    def known(self, header: str | None) -> str | None:
        """The user, when `header` passed recently: taken without a hash check, even from a blocked client."""
        if header is None:
            return None
        key = hmac.new(self._key, header.encode("utf-8", "surrogateescape"), hashlib.sha256).digest()
        known = self._passed.get(key)
        return known[0] if known is not None and time.monotonic() - known[1] < REMEMBER else None

    def blocked(self, client: str, now: float | None = None) -> float:
        """Seconds until `client` may try again (0: it may); its attempts being checked count as failures."""
        now = time.monotonic() if now is None else now
        f = self._failing.get(client)
        failures = 0
        if f is not None:
            while f.times and f.times[0] <= now - WINDOW:
                f.times.popleft()
            failures = len(f.times)
        if failures + self._pending.get(client, 0) < MAX_FAILURES:
            return 0.0
        if failures >= MAX_FAILURES:
            assert f is not None
            return f.times[0] + WINDOW - now
        return 1.0  # its attempts in flight decide within a second or so

    async def check(self, header: str | None, client: str) -> str | None:
        """The user name when `header` (an Authorization value) holds valid credentials, else None."""
        now = time.monotonic()
        self._load()
        if header is None or not header.startswith("Basic "):
            return None  # no credentials yet: the browser asks; not a failed login
        key = hmac.new(self._key, header.encode("utf-8", "surrogateescape"), hashlib.sha256).digest()
        known = self._passed.get(key)
        if known is not None and now - known[1] < REMEMBER:
            return known[0]
        name, password = _decode(header)
        ok = False
        if name is not None and password is not None:
            # Counted before the first await: the caller's `blocked` and this are one step of the loop, so that
            # 100 guesses sent at once are 5 checked and 95 refused (67 were checked when only failures counted).
            self._pending[client] = self._pending.get(client, 0) + 1
            try:
                turn = self._turns.setdefault(client, asyncio.Lock())
                async with turn:
                    known = self._passed.get(key)  # the same header may have passed while this one waited
                    if known is not None and time.monotonic() - known[1] < REMEMBER:
                        return known[0]
                    async with self._one_at_a_time:
                        ok = await asyncio.to_thread(self._verify, password, self._hashes.get(name))
            finally:
                left = self._pending.pop(client) - 1
                if left:
                    self._pending[client] = left
                elif not turn.locked():
                    self._turns.pop(client, None)
        if ok:
            assert name is not None
            self._passed[key] = (name, now)
            while len(self._passed) > 256:
                self._passed.popitem(last=False)
            if self._failing.pop(client, None) is not None:
                log.info("web: %s logged in from %s after failed attempts", name, client,
                         extra=fields(None, "web_login_ok"))
            return name
        self._failed(client, name, now)
        return None

    def _verify(self, password: str, hashed: str | None) -> bool:
        """Whether `password` matches `hashed`; with None (no such user), False after as long a check."""
        if self._hasher is None:
            from pwdlib.hashers.argon2 import Argon2Hasher  # the hasher `web-user` (and amqtt) use
            self._hasher = Argon2Hasher()
        if self._dummy is None:  # made at the first check of any name, so the first unknown one is not slower
            self._dummy = self._hasher.hash(secrets.token_urlsafe(16))  # type: ignore[attr-defined]
        try:
            ok = bool(self._hasher.verify(password, self._dummy if hashed is None else hashed))  # type: ignore[attr-defined]
        except Exception:  # a malformed hash line in the file is a failed login, not a crash
            return False
        return ok and hashed is not None

    def _failed(self, client: str, name: str | None, now: float) -> None:
        f = self._failing.pop(client, None) or Failing()
        self._failing[client] = f  # most recent last
        while len(self._failing) > MAX_CLIENTS:
            self._failing.popitem(last=False)
        f.times.append(now)
        f.count += 1
        logged = self._logged.get(client)
        if logged is None or now - logged >= 10 * WINDOW:
            self._logged.pop(client, None)
            self._logged[client] = now
            while len(self._logged) > MAX_CLIENTS:
                self._logged.popitem(last=False)
            log.warning("web: failed login%s from %s (%d so far); further failures from it are not logged for %.0f "
                        "minutes, and after %d in %.0fs it must wait", f" as {name!r}" if name else "", client,
                        f.count, 10 * WINDOW / 60, MAX_FAILURES, WINDOW, extra=fields(None, "web_login_failed"))


def _decode(header: str) -> tuple[str | None, str | None]:
    try:
        text = base64.b64decode(header[6:].strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError, ValueError):
        return None, None
    name, sep, password = text.partition(":")
    return (name, password) if sep else (None, None)

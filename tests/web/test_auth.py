"""Logins under a flood of guesses, and unknown user names: outcomes and the hasher's calls are counted, never timed.

A failure used to be recorded only after its hash (~0.5 s here), so 100 guesses sent at once were all let
through to the hasher (67 checked before the limit saw the first failures), queued ahead of every other user's
login; and an unknown user name was answered at once, without a hash, which told names apart.
"""

from __future__ import annotations

import asyncio
import base64
import threading
import time
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("aiohttp")
pytest.importorskip("pwdlib")

from aiohttp.test_utils import TestClient, TestServer  # noqa: E402

from gateway.broker import set_user  # noqa: E402
from gateway.config.schema import WebSection  # noqa: E402
from gateway.web import auth  # noqa: E402


def _basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


class _NoDevices:
    """The least of a running gateway that the routes below read."""
    devices: list = []
    history = None


class CountingVerify:
    """Stands for the hash check: slow enough that guesses sent at once overlap it, and counted."""

    def __init__(self) -> None:
        self.passwords: list[str] = []
        self.lock = threading.Lock()

    def __call__(self, password: str, hashed: str | None) -> bool:
        with self.lock:
            self.passwords.append(password)
        time.sleep(0.05)  # (a thread, as the argon2 check runs: the loop meanwhile takes the other requests)
        return hashed is not None and password == "correct horse battery"

    @classmethod
    def of_alice(cls, tmp_path: Path, monkeypatch: Any) -> tuple[CountingVerify, Path]:
        """A users file holding alice, and the hash check counted for every Users."""
        path = tmp_path / "web-users"
        set_user(str(path), "alice", "correct horse battery")
        verify = cls()
        monkeypatch.setattr(auth.Users, "_verify", lambda self, password, hashed: verify(password, hashed))
        return verify, path


def test_guesses_sent_at_once_are_refused_past_the_limit_before_their_hash(tmp_path, monkeypatch):
    """Through the server's own login middleware: 100 wrong guesses at once from one address are 5 checked (401)
    and 95 refused at once (429), and the hasher sees 5."""
    from gateway.web.server import Site

    verify, path = CountingVerify.of_alice(tmp_path, monkeypatch)
    site = Site(_NoDevices(), WebSection(listen="0.0.0.0:8470", users_file=str(path)))  # type: ignore[arg-type]

    async def main() -> dict[int, int]:
        async with TestClient(TestServer(site.app())) as client:
            async def guess(i: int) -> int:
                async with client.get("/api/v1/devices", headers={"Authorization": _basic("alice", f"guess{i}")}) as r:
                    return r.status
            statuses = await asyncio.gather(*(guess(i) for i in range(100)))
        return {s: statuses.count(s) for s in set(statuses)}

    assert asyncio.run(main()) == {401: auth.MAX_FAILURES, 429: 100 - auth.MAX_FAILURES}
    assert len(verify.passwords) == auth.MAX_FAILURES


async def _attempt(users: auth.Users, header: str, client: str) -> int:
    """What the server's middleware answers (gateway/web/server.py:Site._guard)."""
    if not users.known(header) and users.blocked(client) > 0:
        return 429
    return 200 if await users.check(header, client) is not None else 401


def test_a_flood_from_one_address_takes_one_turn_at_the_hasher_not_every_other_users(tmp_path, monkeypatch):
    verify, path = CountingVerify.of_alice(tmp_path, monkeypatch)
    users = auth.Users(str(path))

    async def main() -> tuple[list[int], int]:
        flood = [asyncio.ensure_future(_attempt(users, _basic("alice", f"guess{i}"), "10.0.0.66")) for i in range(4)]
        await asyncio.sleep(0)  # every guess is admitted and waits its turn
        mine = await _attempt(users, _basic("alice", "correct horse battery"), "10.0.0.7")
        return await asyncio.gather(*flood), mine

    guesses, mine = asyncio.run(main())
    assert mine == 200 and guesses == [401] * 4
    # The right password was the second hash checked: after the guess in flight when it came, not after all four.
    assert verify.passwords.index("correct horse battery") == 1, verify.passwords


def test_one_browser_sending_requests_at_once_with_the_right_password_is_checked_once(tmp_path, monkeypatch):
    verify, path = CountingVerify.of_alice(tmp_path, monkeypatch)
    users = auth.Users(str(path))

    async def main() -> list[int]:
        header = _basic("alice", "correct horse battery")
        return await asyncio.gather(*(_attempt(users, header, "10.0.0.7") for _ in range(4)))

    assert asyncio.run(main()) == [200] * 4
    assert verify.passwords == ["correct horse battery"]  # the others found it passed when their turn came


def test_an_unknown_user_is_checked_against_a_hash_of_the_same_parameters(tmp_path, monkeypatch):
    from pwdlib.hashers.argon2 import Argon2Hasher

    path = tmp_path / "web-users"
    set_user(str(path), "alice", "correct horse battery")
    real = path.read_text().split(":", 1)[1].strip()
    checked: list[str] = []
    original = Argon2Hasher.verify

    def counting(self: Any, password: Any, hashed: Any) -> bool:
        checked.append(hashed if isinstance(hashed, str) else hashed.decode())
        return bool(original(self, password, hashed))

    monkeypatch.setattr(Argon2Hasher, "verify", counting)
    users = auth.Users(str(path))

    async def main() -> tuple[str | None, str | None]:
        return (await users.check(_basic("mallory", "correct horse battery"), "10.0.0.9"),
                await users.check(_basic("alice", "wrong"), "10.0.0.9"))

    assert asyncio.run(main()) == (None, None)
    assert len(checked) == 2 and checked[1] == real
    dummy = checked[0]
    assert dummy != real and dummy.rsplit("$", 2)[0] == real.rsplit("$", 2)[0]  # $argon2id$v=19$m=...,t=...,p=...
    assert users.blocked("10.0.0.9") == 0 and len(users._failing["10.0.0.9"].times) == 2  # both count as failures

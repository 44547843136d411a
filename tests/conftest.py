"""Real parts for the tests: mosquitto and amqtt broker processes, the gateway as a subprocess,
an upstream subscriber. Every process started here is stopped by its fixture.

Two tiers: a test that starts processes (a broker, the gateway, the simulated PLC) is marked
`slow` here, by the fixtures it uses or by its module's `pytestmark`; the rest is the fast,
in-process tier (`./dev test -m "not slow"`), where a test that leaves a task or a thread
behind fails.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from typing import Any

import pytest

from tests.helpers import BrokerProcess, GatewayProcess, Subscriber, TcpGate, mosquitto_available

# Fixtures that start processes: a test using one belongs to the slow tier.
PROCESS_FIXTURES = {"broker", "mosquitto", "gateway", "sim_server"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        # tests/system/ runs the product as a user does (processes): the slow tier, like any test
        # that uses a fixture starting a process
        if PROCESS_FIXTURES & set(getattr(item, "fixturenames", ())) or "system" in item.path.parent.parts[-1:]:
            item.add_marker(pytest.mark.slow)


@pytest.fixture(autouse=True)
def nothing_left_behind(request, monkeypatch):
    """Fast tier: fail a test that leaves an asyncio task or a thread running after it."""
    if request.node.get_closest_marker("slow"):
        yield
        return
    leaked: list[str] = []
    real_run = asyncio.run

    def checked_run(main: Any, **kw: Any) -> Any:
        async def watched() -> Any:
            result = await main
            left = [f"{t.get_name()} ({t.get_coro().__qualname__})" for t in asyncio.all_tasks()
                    if t is not asyncio.current_task()]
            leaked.extend(f"task {name}" for name in left)
            return result
        return real_run(watched(), **kw)
    monkeypatch.setattr(asyncio, "run", checked_run)
    before = set(threading.enumerate())
    yield
    deadline = time.monotonic() + 3.0
    while (threads := [t for t in threading.enumerate() if t not in before and t.is_alive()]) and \
            time.monotonic() < deadline:
        time.sleep(0.02)
    leaked.extend(f"thread {t.name}" for t in threads)
    assert not leaked, f"the test left running: {', '.join(leaked)}"


@pytest.fixture(params=["mosquitto", "amqtt"])
def broker(request, tmp_path):
    """The upstream broker, a real process: Debian's mosquitto and the embedded amqtt."""
    if request.param == "mosquitto" and not mosquitto_available():
        if os.environ.get("CI"):
            pytest.fail("mosquitto is not installed; the test bootstrap should have installed it")
        pytest.skip("mosquitto not installed")
    proc = BrokerProcess(request.param, tmp_path).start()
    yield proc
    proc.kill()


@pytest.fixture
def mosquitto(tmp_path):
    if not mosquitto_available():
        pytest.skip("mosquitto not installed")
    proc = BrokerProcess("mosquitto", tmp_path).start()
    yield proc
    proc.kill()


@pytest.fixture
def gate():
    gates = []

    def make(target_port: int) -> TcpGate:
        g = TcpGate(target_port)
        gates.append(g)
        return g
    yield make
    for g in gates:
        g.close()


@pytest.fixture
def subscribe():
    subs = []

    def make(port: int, **kw) -> Subscriber:
        sub = Subscriber(port, **kw)
        subs.append(sub)
        return sub
    yield make
    for sub in subs:
        sub.close()


@pytest.fixture
def gateway(tmp_path):
    procs = []

    def make(config_text: str) -> GatewayProcess:
        proc = GatewayProcess(tmp_path, config_text)
        procs.append(proc)
        return proc
    yield make
    for proc in procs:
        proc.kill()


@pytest.fixture
def browser():
    """Debian's headless chromium over the DevTools protocol (tests/web_cdp.py), 1280 x 900."""
    from tests.web_cdp import Browser, chromium

    if chromium() is None:
        pytest.skip("Debian's chromium is not installed (./dev test installs it)")
    with Browser(1280, 900) as b:
        yield b

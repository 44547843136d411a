"""The open status page across a reload (slow): a real daemon reloaded by SIGHUP, the page in Debian's headless
chromium over the DevTools protocol (tests/web_cdp.py).

A reload can give a device the model it lacked (which the page itself asks for), remove a device, or change a
device's tags. The page kept the chart-less card of the first (its chart code then threw every second, which
froze every chart and the cards after it while the pill said "live"), and showed a removed device as
"ok · last sample 0 s ago" for ever.
"""

from __future__ import annotations

import signal

import pytest

from tests.helpers import SCORED_PUMP
from tests.system.test_web_api import start_daemon
from tests.web_cdp import Browser

pytest.importorskip("aiohttp")
pytestmark = pytest.mark.slow

# After pump1: `spare`, whose model cannot be had at start (it runs unscored, and its card says to fix the model
# and reload); `morph`, a pump whose tags a reload changes; `gone`, which a reload removes.
BEFORE = SCORED_PUMP + """\
  - {name: spare, source: sim, profile: pump, seed: 4, interval: 1s, model: no-such-model}
  - {name: morph, source: sim, profile: pump, seed: 5, interval: 1s}
  - {name: gone, source: sim, profile: pump, seed: 6, interval: 1s}
"""
AFTER = SCORED_PUMP + """\
  - {name: spare, source: sim, profile: pump, seed: 4, interval: 1s, model: pump-ae}
  - {name: morph, source: sim, profile: flexo_line, seed: 5, interval: 1s}
"""


def card(device: str, selector: str = "") -> str:
    return f"document.querySelector('article[data-device=\"{device}\"] {selector}')"


def points(device: str) -> str:
    return f"Number(({card(device, '.chart')} || {{dataset: {{}}}}).dataset.points || 0)"


def rows(device: str) -> str:
    return f"[...document.querySelectorAll('article[data-device=\"{device}\"] tr')].map(r => r.firstChild.textContent)"


def warnings(browser: Browser) -> list[str]:
    return [str(e["params"]["args"]) for e in browser.events
            if e.get("method") == "Runtime.consoleAPICalled" and e["params"].get("type") in ("warning", "error")]


def test_the_open_page_follows_a_reload_that_adds_a_model_removes_a_device_and_changes_tags(
        tmp_path, mosquitto, gateway, browser):
    proc, base = start_daemon(tmp_path, mosquitto, gateway, devices=BEFORE)
    browser.open(base + "/")
    browser.wait_for("document.querySelectorAll('article.card').length === 4", 20, "four device cards")
    browser.wait_for("document.getElementById('conn').textContent === 'live'", 10, "the live stream")
    browser.wait_for(f"{card('spare', '.model-error')}.textContent.includes('reload')", 10,
                     "spare's card to say its model cannot be used")
    assert browser.evaluate(f"{card('spare', '.chart')} === null")
    assert "bearing_temp_c" in browser.wait_for(rows("morph"), 10, "morph's tag rows")
    browser.wait_for(f"{points('pump1')} >= 2", 20, "pump1's first chart points")

    proc.config.write_text(proc.config.read_text().replace(BEFORE, AFTER))
    assert AFTER in proc.config.read_text()
    proc.proc.send_signal(signal.SIGHUP)

    browser.wait_for("document.querySelectorAll('article.card').length === 3", 20, "the removed device's card to go")
    assert browser.evaluate(f"{card('gone')} === null")
    assert browser.evaluate("[...document.querySelectorAll('article.card')].map(a => a.dataset.device)") == \
        ["pump1", "spare", "morph"]
    browser.wait_for(f"{card('spare', '.chart .legend')} && {card('spare', '.chart .legend')}.textContent"
                     ".startsWith('anomaly score')", 20, "spare's chart, now that it has a model")
    browser.wait_for(f"{card('spare', '.model-error')}.textContent === ''", 10, "spare's model error to clear")
    # Every device stays live after the reload: pump1's chart gains points, spare's gets its first.
    after = browser.evaluate(points("pump1"))
    browser.wait_for(f"{points('pump1')} >= {after} + 3", 20, "pump1's chart to gain points after the reload")
    browser.wait_for(f"{points('spare')} >= 2", 20, "spare's chart to gain points")
    # The flexo line's tags replace the pump's on the same card.
    tags = browser.wait_for(f"{rows('morph')}.includes('line_speed_m_min') && {rows('morph')}", 20,
                            "morph's new tag rows")
    assert "bearing_temp_c" not in tags, tags
    assert browser.errors == [], browser.errors
    assert warnings(browser) == [], warnings(browser)

    # With the daemon gone, nothing arrives any more: "last sample ... ago" counts on by itself.
    assert proc.stop() == 0
    browser.wait_for(f"/last sample ([5-9]|[1-9][0-9]+) s ago/.test({card('pump1', '.dev-head')}.textContent)", 30,
                     "pump1's last sample to age on the page")

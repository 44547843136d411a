"""The status page in a real browser (slow): Debian's headless chromium, driven over the DevTools protocol.

The daemon runs the demo's two machines (a pump scored by the shipped model, a flexo line with
counters, OEE and alarms); the pump's bearings start to wear while the test watches. The page must
load without a console error, show both devices' values, gain chart points, and shade the anomaly
event once the model raises it. Screenshots (desktop and phone width) are kept as artifacts.
"""

from __future__ import annotations

import json
import shutil

import pytest

from tests.helpers import ROOT
from tests.system.test_web_api import demo_devices, start_daemon
from tests.web_cdp import artifacts_dir

pytest.importorskip("aiohttp")
pytestmark = pytest.mark.slow
MODELS = ROOT / "models"
FAULT_AT = 120  # simulated seconds: 6 s of real time, once the page shows the chart


def test_the_page_shows_both_machines_live_and_shades_the_anomaly(tmp_path, mosquitto, gateway, browser):
    # The shipped model, as if commissioned on 7 minutes: the same scorer, and the page says what to expect of it.
    models = tmp_path / "models"
    models.mkdir()
    shutil.copy(MODELS / "pump-ae.tflite", models)
    meta = json.loads((MODELS / "pump-ae.json").read_text())
    meta["false_alarms"]["recording_s"] = 420.0
    (models / "pump-ae.json").write_text(json.dumps(meta))
    proc, base = start_daemon(tmp_path, mosquitto, gateway, devices=demo_devices(FAULT_AT), model_dir=models)
    browser.open(base + "/")
    browser.wait_for("document.querySelectorAll('article.card').length === 2", 20, "both device cards")
    browser.wait_for("document.getElementById('conn').textContent === 'live'", 10, "the live stream")

    # both devices' values: every tag row filled with a number
    for device, tag in (("pump1", "bearing_temp_c"), ("flexo1", "line_speed_m_min")):
        value = browser.wait_for(
            f"""(() => {{ const rows = [...document.querySelectorAll('article[data-device="{device}"] tr')];
                 const row = rows.find(r => r.firstChild.textContent === '{tag}');
                 return row && !isNaN(parseFloat(row.children[1].textContent)) && row.children[1].textContent; }})()""",
            20, f"{device}'s {tag}")
        assert float(value) > 0
    assert browser.evaluate("document.querySelector('article[data-device=\"flexo1\"]').textContent.includes('OEE')") \
        or browser.wait_for("document.querySelector('article[data-device=\"flexo1\"]').textContent.includes('OEE')",
                            10, "the live OEE")

    advice = browser.wait_for("document.querySelector('article[data-device=\"pump1\"] .model-note').textContent", 10,
                              "the note on a model commissioned short")
    assert advice.startswith("model pump-ae was commissioned on 7 min of normal running: too short") and \
        "edge-gateway model train pump-ae --device pump1 -c " in advice, advice

    # the anomaly chart gains points while we watch
    points = "Number(document.querySelector('article[data-device=\"pump1\"] .chart').dataset.points || 0)"
    first = browser.wait_for(points, 15, "the first chart points")
    browser.wait_for(f"{points} >= {first} + 3", 15, "the chart to gain points")

    # the bearing wear (from simulated second FAULT_AT) raises an event: it is drawn shaded, with its top tags
    events = "Number(document.querySelector('article[data-device=\"pump1\"] .chart').dataset.events || 0)"
    browser.wait_for(f"{events} >= 1", 90, "the anomaly event on the chart")
    # The shading is drawn on the chart's (transparent) canvas: count its pixels, red at 18 % alpha.
    pink = """(() => {
        const canvas = document.querySelector('article[data-device="pump1"] .chart canvas');
        const data = canvas.getContext('2d').getImageData(0, 0, canvas.width, canvas.height).data;
        let pink = 0;
        for (let i = 0; i < data.length; i += 4) {
            const [r, g, b, a] = [data[i], data[i + 1], data[i + 2], data[i + 3]];
            if (a > 30 && a < 70 && r > 140 && g < 90 && b < 90) pink++;
        }
        return pink; })()"""
    browser.wait_for(f"{pink} > 500", 20, "the anomaly event to be shaded on the chart")
    note = browser.evaluate("document.querySelector('article[data-device=\"pump1\"] .event-note').textContent")
    assert note.startswith("anomaly event") and "top tags" in note

    out = artifacts_dir()
    browser.pump(1)
    browser.screenshot(out / "web-desktop.png")
    browser.resize(390, 844, mobile=True)
    browser.pump(2)
    assert browser.evaluate("document.documentElement.scrollWidth") <= 390  # nothing wider than a phone
    browser.screenshot(out / "web-phone.png")
    assert browser.errors == [], browser.errors
    assert proc.stop() == 0
    # The page is still open: its live stream ends with the web server, so the ordered drain is not cut short.
    assert "shutdown drain" not in proc.logs(), proc.logs()[-600:]

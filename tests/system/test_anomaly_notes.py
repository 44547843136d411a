"""What the running gateway tells a user whose device has run outside its model for hours, as a user sees it: the
journal line, once, and the note in `edge-gateway status`, with a command that runs as given."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
import time

import pytest

from tests.helpers import ENV, ROOT, gateway_config, wait_until

pytestmark = pytest.mark.slow
pytest.importorskip("ai_edge_litert")

from gateway import datadir  # noqa: E402
from gateway.anomaly.model import load, model_dir  # noqa: E402
from gateway.store.outbox import Outbox  # noqa: E402
from gateway.units import rfc3339  # noqa: E402


def cli(*args):
    return subprocess.run([sys.executable, "-m", "gateway", *args], capture_output=True, text=True, env=ENV, cwd=ROOT,
                          timeout=120)


def test_an_event_open_for_hours_before_a_restart_is_said_once_with_the_command_after_the_warm_up(tmp_path, mosquitto,
                                                                                                   gateway):
    """The gateway was stopped with an anomaly event open for 3 h (as it saves one); the pump still runs far from its
    model (cavitation). Started again, the event goes on, and once the scorer has warmed up (when an event that is over
    would end) the journal and `status` say the device has run outside its model since the event began."""
    data = tmp_path / "data"
    data.mkdir()
    started = time.time() - 3 * 3600
    outbox = Outbox.open(str(data / datadir.OUTBOX))
    outbox.stage_state("pump1", "anomaly", {"model": load("pump-ae", model_dir()).identity, "name": "pump-ae",
                                            "active": True, "started": started, "peak": 40.0, "level": 30.0})
    assert outbox.commit()
    outbox.close()
    gw = gateway(gateway_config(data, mosquitto.port, devices="""
  - {name: pump1, source: sim, profile: pump, seed: 7, interval: 50ms, time_scale: 20, model: pump-ae,
     history: {keep: 1d}, faults: [{fault: cavitation, at: 0s, severity: 1.0, ramp: 0s}]}
"""))
    gw.start()
    said = wait_until(lambda: re.search(r"device pump1: (model pump-ae has not fitted the machine's running for 3\.0 h: "
                                        r"an anomaly event has been open since (\S+); .*)$", gw.logs(), re.M), 60,
                      what="the journal line")
    assert said.group(2) == rfc3339(started)[:19] + "Z"
    assert said.group(1).endswith(f"the device's history holds it: edge-gateway model train pump-ae --device pump1 -c "
                                  f"{gw.config} --from {rfc3339(started - 7200)[:19]}Z takes the 2.0 h before it began "
                                  f"and all of it since")
    command = shlex.split(said.group(1).split("the device's history holds it: ")[1].split(" takes the")[0])
    assert command[:3] == ["edge-gateway", "model", "train"] and command[4:9] == ["--device", "pump1", "-c",
                                                                                  str(gw.config), "--from"]
    result = wait_until(lambda: (r := cli("status", "-c", str(gw.config))).returncode == 0 and "  note    " in r.stdout
                        and r, 30, what="the note in status")
    assert f"  note    {said.group(1)}" in result.stdout.splitlines(), result.stdout
    time.sleep(1.0)  # 20 more windows: said once
    assert gw.logs().count("has not fitted the machine's running") == 1
    assert gw.stop() == 0
    assert "Traceback" not in gw.logs()

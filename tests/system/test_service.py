"""The daemon as a systemd service: notify protocol on a real socket, reload, stop; the unit file verified."""

from __future__ import annotations

import json
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from datetime import datetime

import pytest

from tests.helpers import ENV, ROOT, NotifySocket, gateway_config, wait_until

pytestmark = pytest.mark.slow  # it starts processes: the gateway, brokers, the installer




@pytest.fixture
def notify(tmp_path):
    sock = NotifySocket(tmp_path / "notify.sock")
    yield sock
    sock.close()


def test_notify_ready_watchdog_status_reload_and_stop(mosquitto, gateway, subscribe, notify, tmp_path):
    sub = subscribe(mosquitto.port, topic="edge/lab/test-gw/#")
    config = gateway_config(tmp_path / "data", mosquitto.port)
    gw = gateway(config).start(NOTIFY_SOCKET=notify.path, WATCHDOG_USEC="1000000")
    wait_until(lambda: notify.count("READY=1") == 1, 20, what="READY=1")
    wait_until(lambda: notify.count("WATCHDOG=1") >= 3, 10, what="watchdog pings every half interval")
    wait_until(lambda: [f for f in notify.fields() if re.match(r"STATUS=2/2 devices ok, backlog \d+ msgs, "
                                                                r"upstream connected", f)], 10, what="STATUS")

    # A good new config: a third device; the outbox and seq carry on.
    gw.config.write_text(config + "  - {name: pump2, source: sim, profile: pump, seed: 9, interval: 100ms}\n")
    gw.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: notify.count("READY=1") == 2, 20, what="READY=1 after the reload")
    assert notify.count("RELOADING=1") == 1
    wait_until(lambda: sub.on("/pump2/telemetry"), 20, what="the new device upstream")
    assert "config reloaded: 3 devices" in gw.logs()

    # A bad new config is refused; the running one stays.
    gw.config.write_text(config.replace("profile: pump", "profile: pumpp"))
    gw.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: notify.count("READY=1") == 3, 20, what="READY=1 after the refused reload")
    assert "reload refused, the running config stays:" in gw.logs()
    assert 'devices[0].profile: expected one of pump, flexo_line, got "pumpp"' in gw.logs()
    before = len(sub.on("/pump2/telemetry"))
    wait_until(lambda: len(sub.on("/pump2/telemetry")) > before + 5, 10, what="the old config running on")

    # SIGTERM with the broker gone: STOPPING=1, a clean exit, the outbox kept for the next start.
    mosquitto.kill()
    wait_until(lambda: "lost the connection" in gw.logs(), 10, what="the broker to be gone")
    lost = time.time()
    state = tmp_path / "data" / "state.json"
    wait_until(lambda: (s := json.loads(state.read_text()))["backlog"]["messages"] > 0 and
               datetime.fromisoformat(s["ts"].replace("Z", "+00:00")).timestamp() > lost + 0.5, 10,
               what="a backlog to build up while the broker is gone")
    assert gw.stop() == 0
    assert notify.count("STOPPING=1") == 1
    gw.config.write_text(config)
    out = subprocess.run([sys.executable, "-m", "gateway", "outbox", "--json", "-c", str(gw.config)],
                         capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=30)
    assert json.loads(out.stdout)["messages"] > 0
    seqs = sub.seqs()
    assert seqs == list(range(1, len(seqs) + 1)), "seq went on across both reloads"


def test_no_notify_socket_is_fine(mosquitto, gateway, subscribe, tmp_path):
    sub = subscribe(mosquitto.port, topic="edge/lab/test-gw/#")
    gw = gateway(gateway_config(tmp_path / "data", mosquitto.port)).start()
    wait_until(lambda: len(sub.on("/telemetry")) > 5, 20, what="telemetry without systemd")
    assert gw.stop() == 0


@pytest.mark.skipif(not shutil.which("systemd-analyze"), reason="systemd-analyze not installed")
@pytest.mark.parametrize("name", ["edge-gateway.service", "edge-gateway-broker.service"])
def test_unit_file_verifies_clean_and_scores_well(tmp_path, name):
    exe = shutil.which("edge-gateway") or str(ROOT / ".venv" / "bin" / "edge-gateway")
    unit = (ROOT / "systemd" / name).read_text()
    unit = unit.replace("/opt/edge-gateway/venv/bin/edge-gateway", exe)  # verify checks the binary exists
    (tmp_path / name).write_text(unit)
    verify = subprocess.run(["systemd-analyze", "verify", str(tmp_path / name)],
                            capture_output=True, text=True, timeout=60)
    problems = [line for line in (verify.stdout + verify.stderr).splitlines() if line.strip()]
    assert verify.returncode == 0 and not problems, problems
    security = subprocess.run(["systemd-analyze", "security", "--offline=true",
                               str(ROOT / "systemd" / name)], capture_output=True, text=True,
                              timeout=60)
    score = float(re.search(r"Overall exposure level for \S+: ([\d.]+)", security.stdout).group(1))
    assert score <= 2.5, security.stdout[-2000:]


def test_logs_go_to_journald_with_structured_fields_under_systemd(mosquitto, gateway, tmp_path):
    """With JOURNAL_STREAM naming its stderr, the daemon speaks journald's native protocol."""
    journal = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    journal.bind(str(tmp_path / "journal.sock"))
    journal.settimeout(0.2)
    entries: list[dict] = []

    def receive() -> None:
        while journal.fileno() >= 0:
            try:
                data = journal.recv(65536)
            except socket.timeout:
                continue
            except OSError:
                return
            entries.append(dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line))
    threading.Thread(target=receive, daemon=True).start()
    devices = """
  - name: line1
    source: sim
    profile: flexo_line
    seed: 5
    interval: 100ms
    plc: {counter_bits: 16, start_near_top: true, rate_per_min: 3000}
    counters: [{name: produced, register: produced_raw, bits: 16}]
"""
    gw = gateway(gateway_config(tmp_path / "data", mosquitto.port, devices=devices))
    gw.log.touch()
    st = gw.log.stat()
    gw.start(JOURNAL_STREAM=f"{st.st_dev}:{st.st_ino}", EDGE_GATEWAY_JOURNAL_SOCKET=str(tmp_path / "journal.sock"))
    try:
        wrap = wait_until(lambda: [e for e in entries if e.get("EVENT") == "counter_wrap"], 30, what="a wrap entry")
        assert wrap[0]["DEVICE"] == "line1" and wrap[0]["COUNTER"] == "produced"
        assert wrap[0]["PRIORITY"] == "6" and wrap[0]["SYSLOG_IDENTIFIER"] == "edge-gateway"
        assert wrap[0]["MESSAGE"].startswith("device line1: counter produced wrapped at 16 bits")
        first = [e for e in entries if e.get("EVENT") == "device_ok"]
        assert first and first[0]["DEVICE"] == "line1"
        assert [e for e in entries if e.get("EVENT") == "upstream_connected"]
        assert gw.stop() == 0
        assert gw.logs() == "", "nothing on stderr while journald takes the records"
    finally:
        journal.close()


def test_a_sighup_while_starting_is_a_reload_once_started_not_the_end(gateway, tmp_path):
    """A fuzzing pass: a SIGHUP in the first second (before the loop's handler) ended the daemon, which systemd
    takes as a clean exit (Restart=on-failure: it stayed down)."""
    from gateway.ports import free_port
    from tests.helpers import spawn

    gw = gateway(gateway_config(tmp_path / "data", free_port()))  # no broker: starting is enough here
    # The console script's entry, with a SIGHUP at the worst moment: after the interpreter started, before the
    # config, the models, the outbox and the loop (a timed signal from outside would race this machine's speed).
    gw.proc = spawn([sys.executable, "-c", "import os, signal, sys\n"
                     f"sys.argv = ['edge-gateway', 'run', '-c', {str(gw.config)!r}]\n"
                     "import gateway.entry as entry\nfrom gateway.notify import hold_hup\nhold_hup()\n"
                     "os.kill(os.getpid(), signal.SIGHUP)\n"
                     "sys.exit(entry.main())"], gw.log, env=ENV, cwd=ROOT)
    wait_until(lambda: "config reloaded" in gw.logs(), 30, what="the reload")
    assert "a reload was asked for while starting" in gw.logs()
    assert gw.proc.poll() is None
    assert gw.stop() == 0

"""The commands a user types: the demo, status while the daemon runs, the health topic."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import ENV, ROOT, gateway_config, wait_until

pytestmark = pytest.mark.slow  # it starts processes: the gateway, brokers, the installer


def test_demo_runs_everything_and_stops_by_itself():
    result = subprocess.run([sys.executable, "-m", "gateway", "demo", "--duration", "12", "--plain",
                             "--fault-after", "3"], capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=90)
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "[pump1] state ok" in out and "[flexo1] state ok" in out
    assert "counter produced" in out and "bearing wear injected" in out
    assert "(stops after 12s, or Ctrl-C)" in out and "(Ctrl-C to stop)" not in out
    assert re.search(r"running +1 ", out) and re.search(r"machine_status +[1-4] ", out)  # not 1.00
    summary = out.strip().splitlines()
    demo_over = next(line for line in summary if line.startswith("demo over:"))
    assert "gaps 0, duplicates 0, final gateway status offline" in demo_over
    assert int(demo_over.split()[2]) > 20  # messages received


def test_health_topic_and_local_status(mosquitto, gateway, subscribe, tmp_path):
    sub = subscribe(mosquitto.port, topic="edge/lab/test-gw/health")
    gw = gateway(gateway_config(tmp_path / "data", mosquitto.port)).start()
    health = wait_until(lambda: [h for h in sub.on("/health") if h["upstream"]["acked"] > 0], 20,
                        what="health")[-1]
    assert set(health["backlog"]) == {"messages", "bytes", "oldest_age_s", "uncommitted"}
    assert health["dropped"] == 0 and health["upstream"]["connected"] is True
    assert health["upstream"]["reconnects"] == 0 and health["upstream"]["last_error"] is None
    assert health["devices"]["pump1"]["state"] == "ok" and health["devices"]["pump1"]["polls"] > 0
    status = subprocess.run([sys.executable, "-m", "gateway", "status", "-c", str(gw.config)], capture_output=True,
                            text=True, env=ENV, cwd=ROOT, timeout=30)
    assert status.returncode == 0, status.stderr
    assert "upstream  connected" in status.stdout
    assert "device    pump1" in status.stdout and "counter produced" in status.stdout
    raw = subprocess.run([sys.executable, "-m", "gateway", "status", "--json", "-c", str(gw.config)],
                         capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=30)
    assert json.loads(raw.stdout)["counters"]["line1"]["produced"]["total"] >= 0
    assert json.loads(raw.stdout)["running"] is True
    assert gw.stop() == 0
    # Stopped: status says so and how old its state is, instead of "up 37s" and every device ok.
    after = subprocess.run([sys.executable, "-m", "gateway", "status", "-c", str(gw.config)], capture_output=True,
                           text=True, env=ENV, cwd=ROOT, timeout=30)
    assert after.returncode == 69
    first = after.stdout.splitlines()[0]
    assert first.startswith("gateway test-gw  NOT RUNNING: what follows is its last state, from ") and " ago)" in first
    assert "(up " not in after.stdout and "start it with: sudo systemctl start edge-gateway" in after.stdout
    raw = subprocess.run([sys.executable, "-m", "gateway", "status", "--json", "-c", str(gw.config)],
                         capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=30)
    assert raw.returncode == 69 and json.loads(raw.stdout)["running"] is False


def test_counters_show_set_baseline_and_audit(mosquitto, gateway, tmp_path):
    gw = gateway(gateway_config(tmp_path / "data", mosquitto.port)).start()
    cli = [sys.executable, "-m", "gateway", "counters", "-c", str(gw.config)]

    def run(*args):
        return subprocess.run([*cli, *args], capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=30)
    wait_until(lambda: "line1" in run("show").stdout, 20, what="the counter to be committed")
    refused = run("set", "line1", "produced", "1000", "--reason", "PLC swapped")
    assert refused.returncode == 69 and "stop it first" in refused.stderr
    assert gw.stop() == 0
    assert run("set", "line1", "nope", "5", "--reason", "x").returncode == 64
    assert run("set", "line1", "produced", "1000").returncode == 64  # a reason is required
    for value in ("-5", str(2**53), str(2**63)):  # 2^63 was a traceback; a total near it crashed the daemon's commit
        huge = run("set", "line1", "produced", value, "--reason", "x")
        assert huge.returncode == 64 and f"VALUE {value} is not a total from 0 to {2**53 - 1}" in huge.stderr
    done = run("set", "line1", "produced", "1000", "--reason", "PLC swapped")
    assert done.returncode == 0, done.stderr
    shown = json.loads(run("show", "--json").stdout)
    row = next(r for r in shown if r["name"] == "produced")
    assert row["total"] == 1000 and row["last_raw"] is None  # the next value read is the new baseline
    audit = json.loads(run("audit", "--json").stdout)
    assert audit[-1]["new_total"] == 1000 and audit[-1]["reason"] == "PLC swapped"
    restarted = gateway(gw.config.read_text()).start()
    wait_until(lambda: next(r for r in json.loads(run("show", "--json").stdout)
                            if r["name"] == "produced")["last_raw"] is not None, 20, what="a new baseline")
    assert restarted.stop() == 0
    after = next(r for r in json.loads(run("show", "--json").stdout) if r["name"] == "produced")
    assert after["total"] >= 1000  # counted on from the baseline, no jump from the new PLC's raw value
    assert after["total"] < 1000 + 500  # not 1000 + the new raw value
    # The counter renamed in the config: its row is kept (and its total, should it come back), said as such.
    gw.config.write_text(gw.config.read_text().replace("{name: produced, register: produced_raw",
                                                       "{name: made, register: produced_raw"))
    assert after["configured"] is True
    renamed = {r["name"]: r for r in json.loads(run("show", "--json").stdout)}
    assert renamed["produced"]["configured"] is False and renamed["produced"]["total"] == after["total"]
    assert "produced       total" in run("show").stdout and "(not in the config: kept, not counting)" in run("show").stdout


def test_counters_show_says_which_saved_counter_is_damaged_and_shows_it_as_the_gateway_takes_it_up(tmp_path):
    """Text in a count's column, a blob in the last raw value's: `counters show` was a traceback (text and --json),
    and `counters audit` on an entry with text for its time and a blob for a count."""
    import sqlite3

    from gateway import datadir
    from gateway.counters import CounterRow
    from gateway.store.outbox import Outbox

    config = tmp_path / "gateway.yaml"
    config.write_text(gateway_config(tmp_path / "data", 1883))
    store = Outbox.open(str(tmp_path / "data" / datadir.OUTBOX))
    for name in ("produced", "defects"):
        store.stage_counter("line1", name, CounterRow(5, 100, 10, "2026-11-24/A", 1.79e9))
    assert store.commit()
    store.close()
    db = sqlite3.connect(tmp_path / "data" / datadir.OUTBOX)
    db.execute("UPDATE counters SET last_raw = X'00ff', updated = 'x' WHERE name = 'produced'")
    db.execute("UPDATE counters SET total = 'x' WHERE name = 'defects'")
    db.execute("INSERT INTO counter_audit (at, device, name, old_total, new_total, reason, by_user) "
               "VALUES ('x', 'line1', 'produced', X'00', 1e300, X'ff', 'me')")
    db.commit()
    db.close()
    for args in ([], ["--json"]):  # and the audit
        audit = subprocess.run([sys.executable, "-m", "gateway", "counters", "audit", "-c", str(config), *args],
                               capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=30)
        assert audit.returncode == 0 and "Traceback" not in audit.stderr, audit.stderr
        assert "counter audit entry 1 is damaged: shown with - for what is not a time or a count" in audit.stderr
    assert json.loads(audit.stdout) == [{"at": None, "device": "line1", "name": "produced", "old_total": None,
                                         "new_total": None, "reason": "\ufffd", "by_user": "me"}]
    for args in ([], ["--json"]):
        shown = subprocess.run([sys.executable, "-m", "gateway", "counters", "show", "-c", str(config), *args],
                               capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=30)
        assert shown.returncode == 0 and "Traceback" not in shown.stderr, shown.stderr
        assert "counter line1/defects is damaged (total: 'x'): shown as the gateway takes it up" in shown.stderr
        assert "counter line1/produced is damaged (last_raw: b'\\x00\\xff'; updated: 'x')" in shown.stderr
    rows = {r["name"]: r for r in json.loads(shown.stdout)}
    assert (rows["defects"]["total"], rows["defects"]["last_raw"]) == (0, 5)
    assert (rows["produced"]["total"], rows["produced"]["last_raw"]) == (100, None)


@pytest.mark.parametrize("command,module", [(["demo", "--duration", "1"], "amqtt"),
                                            (["broker-user", "sensor1"], "pwdlib"),
                                            (["broker", "-c", "/nonexistent"], "amqtt")])
def test_a_command_whose_extra_is_not_installed_names_it_and_exits_69(tmp_path, command, module):
    """As on a box installed without --with-local-broker: the module is not importable."""
    absent = tmp_path / "absent"
    absent.mkdir()
    (absent / f"{module}.py").write_text(f"raise ModuleNotFoundError(\"No module named '{module}'\")\n")
    result = subprocess.run([sys.executable, "-m", "gateway", *command], capture_output=True, text=True,
                            env={**ENV, "PYTHONPATH": f"{absent}:{ROOT}"}, cwd=ROOT, timeout=60, stdin=subprocess.DEVNULL)
    assert result.returncode == 69, result.stderr
    assert result.stderr == (f"edge-gateway {command[0]} needs {module}, which is not installed: pip install "
                             "'edge-gateway[broker]' (install.sh --with-local-broker installs it)\n")


@pytest.mark.parametrize("args,expected", [(["--duration", "0"], "--duration 0: expected seconds above 0"),
                                           (["--duration", "nan"], "--duration nan: expected seconds above 0"),
                                           (["--fault-after", "-5"], "--fault-after -5: expected seconds from 0")])
def test_demo_refuses_a_duration_it_cannot_keep(args, expected):
    """A duration of 0 or less started everything and stopped at once with an empty log; nan ran forever."""
    result = subprocess.run([sys.executable, "-m", "gateway", "demo", *args], capture_output=True, text=True, env=ENV,
                            cwd=ROOT, timeout=30)
    assert result.returncode == 64 and expected in result.stderr, result.stderr


def test_status_of_a_state_file_nested_100000_deep_is_no_state_not_a_traceback(tmp_path, capsys):
    from gateway.cli import main
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "state.json").write_text("[" * 100_000 + "]" * 100_000)
    config = tmp_path / "gw.yaml"
    config.write_text(gateway_config(tmp_path / "data", 1883))
    assert main(["status", "-c", str(config)]) == 69
    assert capsys.readouterr().err.startswith(f"no state in {tmp_path}/data/state.json (maximum recursion depth")


@pytest.mark.parametrize("state", ["[]", "null", '{"devices": 5}', '{"gateway_id": "w", "upstream": {}}',
                                   '{"gateway_id": "w", "ts": "t", "uptime_s": 1' + "0" * 400 + "}"])
def test_status_of_a_state_file_it_did_not_write_is_said_not_a_traceback(tmp_path, state, capsys):
    """Damaged, or left by another version: `status` (and `status --json`) said KeyError/TypeError tracebacks."""
    from gateway.cli import main
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "state.json").write_text(state)
    config = tmp_path / "gw.yaml"
    config.write_text(gateway_config(tmp_path / "data", 1883))
    said = f"the state in {tmp_path}/data/state.json is not one this version writes ("
    assert main(["status", "-c", str(config)]) == 69 and capsys.readouterr().err.startswith(said)
    if not state.startswith("{"):  # --json shows any object as it is; a list or null is said the same way
        assert main(["status", "--json", "-c", str(config)]) == 69 and capsys.readouterr().err.startswith(said)


def test_status_of_a_fifo_put_in_place_of_the_state_file_does_not_hang(tmp_path, capsys):
    """An attack pass: `status` waited for ever on a FIFO at data_dir/state.json."""
    import os

    from gateway.cli import main
    (tmp_path / "data").mkdir()
    os.mkfifo(tmp_path / "data" / "state.json")
    config = tmp_path / "gw.yaml"
    config.write_text(gateway_config(tmp_path / "data", 1883))
    assert main(["status", "-c", str(config)]) == 69
    assert capsys.readouterr().err.startswith(f"no state in {tmp_path}/data/state.json")


def test_ctrl_c_stops_the_demo_and_its_gateway_with_one_clean_drain():
    """Ctrl-C reaches the terminal's whole process group. The gateway got it beside the demo's own SIGTERM, and a
    second signal skips the shutdown drain: the demo's last lines said "shutdown drain skipped"."""
    with subprocess.Popen([sys.executable, "-m", "gateway", "demo", "--plain"], stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, env=ENV, cwd=ROOT, start_new_session=True) as demo:
        assert demo.stdout is not None
        lines = []
        for line in demo.stdout:
            lines.append(line)
            if "messages" in line and "received" in line or len(lines) > 200:  # the first view: all is running
                break
        os.killpg(demo.pid, signal.SIGINT)  # as a terminal does
        out = "".join(lines) + demo.stdout.read()
        assert demo.wait(timeout=60) == 0, out
    assert "demo over:" in out and "stopped; 0 messages kept" in out and "drain skipped" not in out, out


@pytest.mark.skipif(os.geteuid() != 0 or not __import__("shutil").which("setpriv"), reason="needs root and setpriv")
def test_a_data_dir_the_user_may_not_read_is_said_as_such_never_a_traceback(tmp_path):
    """A fuzzing pass: an operator without sudo (the data_dir is the service user's, 0750) got a traceback from
    `history stats`, and `outbox` said there was no outbox."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "gateway.db").touch()
    (data / "history.db").touch()
    os.chmod(tmp_path, 0o755)
    os.chown(data, 1000, 1000)
    os.chmod(data, 0o700)
    (tmp_path / "gateway.yaml").write_text(gateway_config(data, 1883).replace("interval: 100ms}",
                                                                              "interval: 100ms, history: {}}", 1))
    without_root = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search,-fowner"]
    for command in (["history", "stats"], ["history", "export", "pump1", "--csv", "-"], ["outbox"], ["counters"]):
        result = subprocess.run([*without_root, sys.executable, "-m", "gateway", *command, "-c",
                                 str(tmp_path / "gateway.yaml")], capture_output=True, text=True, env=ENV, cwd=ROOT,
                                timeout=60)
        assert result.returncode in (69, 73, 77), (command, result.returncode, result.stderr)
        assert "Traceback" not in result.stderr and "ermission denied" in result.stderr, (command, result.stderr)
        assert "no outbox" not in result.stderr


def test_outbox_purge_answered_with_ctrl_d_deletes_nothing_and_says_so(tmp_path):
    """A docs audit: Ctrl-D at the `type 'yes':` prompt ended in an EOFError traceback."""
    import pty
    import time

    from gateway.store.outbox import Outbox

    data = tmp_path / "data"
    data.mkdir()
    store = Outbox.open(str(data / "gateway.db"))
    store.stage("edge/lab/test-gw/pump1/telemetry", {"i": 1}, created=time.time())
    store.commit()
    store.close()
    (tmp_path / "gateway.yaml").write_text(gateway_config(data, 1883))
    main, terminal = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "gateway", "outbox", "purge", "-c", str(tmp_path / "gateway.yaml")],
                            stdin=terminal, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV, cwd=ROOT)
    os.close(terminal)
    try:
        os.write(main, b"\x04")  # Ctrl-D: the end of input, no answer
        out, err = proc.communicate(timeout=30)
    finally:
        os.close(main)
    assert proc.returncode == 0 and "nothing deleted" in out.decode() and "Traceback" not in err.decode(), err


@pytest.mark.parametrize("command", [["check-config"], ["model", "list", "-c"]])
def test_an_output_that_cannot_be_written_is_said_not_a_traceback(tmp_path, command):
    """An attack pass: `check-config FILE > /dev/full` was a traceback (exit 1), `model list > /dev/full` said
    "edge-gateway: : No space left on device" (exit 73, naming no file)."""
    config = tmp_path / "gw.yaml"
    config.write_text(gateway_config(tmp_path / "data", 1883))
    with open("/dev/full", "w") as full:
        result = subprocess.run([sys.executable, "-m", "gateway", *command, str(config)], stdout=full,
                                stderr=subprocess.PIPE, text=True, env=ENV, cwd=ROOT, timeout=60)
    assert result.returncode == 74, result.stderr
    assert result.stderr == f"edge-gateway {command[0]}: cannot write the output: No space left on device\n"


def test_an_argument_that_is_not_utf8_is_a_usage_error():
    """An attack pass: `history export $'\\xff'` and `counters set ... --reason $'\\xff'` were tracebacks (the bytes
    reached SQLite as lone surrogates)."""
    import os

    for args in (["history", "export", b"\xff"], ["counters", "set", "f1", "produced", "5", "--reason", b"caf\xe9"]):
        result = subprocess.run([sys.executable.encode(), b"-m", b"gateway", *[os.fsencode(a) for a in args]],
                                capture_output=True, env=ENV, cwd=ROOT, timeout=60)
        assert result.returncode == 64 and b"is not UTF-8 text" in result.stderr, result.stderr
        assert b"Traceback" not in result.stderr


def test_ctrl_c_in_a_command_is_said_not_a_traceback(tmp_path):
    """An attack pass: Ctrl-C in a command waiting for its input (a FIFO given as the config, a training) was a
    KeyboardInterrupt traceback. It is one line and the shell's 130."""
    fifo = tmp_path / "gw.yaml"
    os.mkfifo(fifo)
    proc = subprocess.Popen([sys.executable, "-m", "gateway", "check-config", str(fifo)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=ENV, cwd=ROOT)
    try:
        # (opening a FIFO waits for a writer: the command is there once the kernel says so)
        wchan = Path(f"/proc/{proc.pid}/wchan")
        wait_until(lambda: wchan.read_text() in ("wait_for_partner", "fifo_open"), 30, what="the open to wait")
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == 130 and err == "edge-gateway check-config: interrupted\n", err

"""Commissioning a model on one's own machine, as a user would, with real parts: a sim pump recorded by the
running gateway (`history:`), `kill -9` while recording, `history export`, `model train` (TensorFlow, few
epochs), `model score` on a recording with a fault, `model list/show`, deploy, and the anomaly event upstream."""

from __future__ import annotations

import csv
import importlib.util
import json
import re
import shlex
import shutil
import subprocess
import sys

import numpy as np
import pytest

from tests.helpers import ENV, ROOT, gateway_config, wait_until

# TensorFlow is found, not imported, here: importing it takes seconds, and collection (also of the fast tier,
# which deselects these tests) would pay them. The `model train` subprocesses import it.
pytestmark = [pytest.mark.slow, pytest.mark.skipif(importlib.util.find_spec("tensorflow") is None,
                                                   reason="needs the [train] extra (TensorFlow)")]
pytest.importorskip("ai_edge_litert")

from gateway import datadir  # noqa: E402
from gateway.anomaly.recording import parse_time, write_csv  # noqa: E402
from sim.pump import TAGS  # noqa: E402
from sim.scenarios import run  # noqa: E402

INTERVAL = 0.05  # 50 ms samples: minutes of recording in seconds of test


def cli(*args, cwd=ROOT, timeout=300):
    return subprocess.run([sys.executable, "-m", "gateway", *args], capture_output=True, text=True, env=ENV,
                          cwd=cwd, timeout=timeout)


def exported(config, device, out):
    result = cli("history", "export", device, "-c", str(config), "--csv", str(out))
    assert result.returncode == 0, result.stderr
    with open(out) as f:
        return list(csv.reader(f))


def replayed(tmp_path):
    """`model score rig` of the rig's shift.csv: its summary, and each row's state (in anomaly or not)."""
    result = cli("model", "score", "rig", "--model-dir", str(tmp_path), "--csv", str(tmp_path / "shift.csv"),
                 "--out", str(tmp_path / "scored.csv"))
    assert result.returncode == 0, result.stderr
    with (tmp_path / "scored.csv").open() as f:
        return result.stderr, np.array([row["state"] == "anomaly" for row in csv.DictReader(f)])


def test_record_export_train_score_deploy(tmp_path, mosquitto, gateway, subscribe):
    recorded = "\n  - {name: pump1, source: sim, profile: pump, seed: 31, interval: 50ms, history: {keep: 1d}}\n"
    gw = gateway(gateway_config(tmp_path / "data", mosquitto.port, devices=recorded)).start()
    wait_until(lambda: (tmp_path / "data" / "history.db").exists(), 20, what="history.db")
    wait_until(lambda: len(exported(gw.config, "pump1", tmp_path / "a.csv")) > 400, 60, what="400 samples recorded")
    before = exported(gw.config, "pump1", tmp_path / "a.csv")
    state = tmp_path / "data" / datadir.STATE
    health = wait_until(lambda: state.exists() and json.loads(state.read_text()).get("history"), 20,
                        what="history in the health report")
    assert health == {"devices": ["pump1"], "dropped": 0, "error": None}
    gw.kill()  # kill -9 while recording: what was committed stays, the file opens again
    after = exported(gw.config, "pump1", tmp_path / "normal.csv")
    assert after[0] == ["time", *TAGS]
    assert after[1:len(before)] == before[1:]
    times = [parse_time(r[0]) for r in after[1:]]  # as times: "…:24Z" comes before "…:24.050Z", not after
    assert times == sorted(set(times))
    result = cli("history", "stats", "-c", str(gw.config))
    assert result.returncode == 0 and "pump1: " in result.stdout

    # Train straight from the recorded history, as `--device` does.
    result = cli("model", "train", "from-history", "--device", "pump1", "-c", str(gw.config), "--epochs", "2",
                 "--out", str(tmp_path / "m2"))
    assert result.returncode == 0, result.stderr
    assert f"{len(after) - 1} rows" in result.stdout and "wrote" in result.stdout
    assert json.loads((tmp_path / "m2" / "from-history.json").read_text())["interval_s"] == pytest.approx(INTERVAL)
    result = cli("model", "train", "x", "--device", "nosuch", "-c", str(gw.config))
    assert result.returncode == 65 and "device nosuch: no recorded samples" in result.stderr

    # Train on the recording, with a constant column and a missing cell added, as real exports have.
    rows = after[1:]
    with open(tmp_path / "normal.csv", "w", newline="") as f:
        w = csv.writer(f, delimiter=";")
        w.writerow(["time", *TAGS, "setpoint"])
        for i, r in enumerate(rows):
            cells = [c.replace(".", ",") for c in r[1:]]
            if i == 50:
                cells[2] = ""
            w.writerow([r[0], *cells, "7"])
    models = tmp_path / "models"
    result = cli("model", "train", "pump-local", "--csv", str(tmp_path / "normal.csv"), "--epochs", "8",
                 "--out", str(models))
    assert result.returncode == 0, result.stderr
    assert "tag setpoint left out: constant in training" in result.stdout
    assert "training: epoch    1/8" in result.stderr  # the progress, on stderr
    assert "threshold" in result.stdout and (models / "pump-local.tflite").exists()
    meta = json.loads((models / "pump-local.json").read_text())
    assert meta["tags"] == list(TAGS) and meta["interval_s"] == pytest.approx(INTERVAL)
    assert (models / "pump-local.tflite").stat().st_size <= 150 * 1024

    # Replay: normal running then cavitation, scored row by row.
    onset = 400
    fault = run(32, 800 * INTERVAL, interval=INTERVAL,
                faults=[{"kind": "cavitation", "severity": 1.0, "at": onset * INTERVAL, "ramp": 0.0}])
    t0 = 1.79e9
    write_csv(tmp_path / "fault.csv", TAGS, [(t0 + i * INTERVAL, r) for i, r in enumerate(fault.tolist())])
    result = cli("model", "score", "pump-local", "--csv", str(tmp_path / "fault.csv"), "--model-dir", str(models),
                 "--out", str(tmp_path / "scored.csv"), "--plot", str(tmp_path / "report.png"))
    assert result.returncode == 0, result.stderr
    assert "windows scored" in result.stderr and "anomaly event(s)" in result.stderr
    assert "false events expected in " in result.stderr and "events seen: 1 " in result.stderr  # one fault, one event
    # Commissioned on seconds: the expectation cannot cover the slow changes since, said beside it.
    assert "too short to show the machine's slow changes: the events they raise are not in that figure" in result.stderr
    assert (tmp_path / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with open(tmp_path / "scored.csv") as f:
        scored = list(csv.DictReader(f))
    assert len(scored) == len(fault)
    state = np.array([r["state"] for r in scored])
    assert (state[:onset] != "anomaly").mean() > 0.95  # normal running is not flagged
    assert (state[onset + 20:] == "anomaly").mean() > 0.9  # the fault is
    assert state[0] == "not_scored" and scored[0]["score"] == ""

    result = cli("model", "list", "--model-dir", str(models))
    assert result.returncode == 0 and "pump-local" in result.stdout and "10 tags" in result.stdout
    result = cli("model", "show", "pump-local", "--model-dir", str(models))
    assert result.returncode == 0 and "threshold" in result.stdout and "Gumbel" in result.stdout
    assert re.search(r"commissioned on \d+ s of normal running: too short to show the machine's slow changes",
                     result.stdout), result.stdout  # seconds of recording, said in seconds

    # Deploy: model_dir, devices[].model, check-config, reload; the event goes upstream.
    up = subscribe(mosquitto.port, topic="edge/lab/test-gw/#")
    deployed = ("\n  - {name: pump1, source: sim, profile: pump, seed: 33, interval: 50ms, model: pump-local,\n"
                "     history: {keep: 1d}, faults: [{fault: cavitation, at: 15s, severity: 1.0, ramp: 0s}]}\n")
    text = gateway_config(tmp_path / "data", mosquitto.port, devices=deployed).replace(
        "health_interval: 1s}", f'health_interval: 1s, model_dir: "{models}"}}')
    gw.config.write_text(text)
    result = cli("check-config", str(gw.config))
    assert result.returncode == 0, result.stderr
    gw.start()
    start = wait_until(lambda: [p for p in up.on("/pump1/anomaly") if p["event"] == "start"], 60,
                       what="an anomaly event upstream")[0]
    assert start["model"] == "pump-local" and start["score"] > start["threshold"]
    # Commissioned on seconds: the journal, health and `status` say what to expect of it and how to train it again
    # from this device's own history, with a command that runs as given.
    said = re.search(r"device pump1: model pump-local was commissioned on \d+ s of normal running: too short to show "
                     r"the machine's slow changes, which raise events within the hour\. Train it again from 2\.0 h or "
                     r"more of normal running: this device's history records them: once it holds 2\.0 h of normal "
                     r"running, run (edge-gateway model train .*)$", gw.logs(), re.M)
    assert said, gw.logs()[-3000:]
    command = shlex.split(said.group(1))
    assert command[3:9] == ["pump-local", "--device", "pump1", "-c", str(gw.config), "--from"], command
    result = cli("status", "-c", str(gw.config))
    assert "  note    model pump-local was commissioned on " in result.stdout, result.stdout
    wait_until(lambda: len(exported(gw.config, "pump1", tmp_path / "b.csv")) > len(after) + 500, 60,
               what="500 samples recorded since the deploy")
    result = cli(*command[1:], "--epochs", "2", "--out", str(tmp_path / "m3"))
    assert result.returncode == 0, result.stderr
    assert json.loads((tmp_path / "m3" / "pump-local.json").read_text())["tags"] == list(TAGS)
    assert gw.stop() == 0


def test_model_list_says_which_models_cannot_be_used(tmp_path):
    models = tmp_path / "models"
    models.mkdir()
    for suffix in (".tflite", ".json"):
        shutil.copy(ROOT / "models" / f"pump-ae{suffix}", models)
    result = cli("model", "list", "--model-dir", str(models))
    assert result.returncode == 0 and "pump-ae" in result.stdout
    (models / "pump-ae.json").write_text("{}")
    result = cli("model", "list", "--model-dir", str(models))
    assert "pump-ae" in result.stdout and "cannot be used" in result.stdout


def test_false_alarms_sets_the_threshold_quietly_and_is_recorded(tmp_path):
    """Seven minutes of steady commissioning, the false alarms in the user's words; TensorFlow says nothing; the
    threshold's out-of-fold factor stays small (the parts of a steady recording score alike)."""
    rows = run(43, 420, valve=(0.8, 0.8))
    write_csv(tmp_path / "normal.csv", TAGS, [(1.79e9 + i, r) for i, r in enumerate(rows.tolist())])
    thresholds, said = {}, {}
    for rate in ("1/week", "20/day"):
        out = tmp_path / rate.replace("/", "-per-")
        result = cli("model", "train", "m", "--csv", str(tmp_path / "normal.csv"), "--epochs", "3",
                     "--false-alarms", rate, "--out", str(out), "--plot", str(out / "held-out.html"))
        assert result.returncode == 0, result.stderr
        # Only our own lines on stderr: the progress bar and the report's path, none of TensorFlow's.
        noise = [line for line in result.stderr.splitlines()
                 if not line.startswith(("training: epoch", "report written to"))]
        assert noise == [], noise
        meta = json.loads((out / "m.json").read_text())
        assert meta["false_alarms"]["asked"] == rate
        assert meta["false_alarms"]["per_second"] == pytest.approx({"1/week": 1 / 604800, "20/day": 20 / 86400}[rate])
        assert "Gumbel" in meta["training"]["threshold_rule"]
        assert meta["false_alarms"]["out_of_fold"]["factor"] < 2 and "record one that covers it" not in result.stdout
        thresholds[rate], said[rate] = meta["threshold"], result.stdout
        assert (out / "held-out.html").read_text().startswith("<!DOCTYPE html>")
    assert thresholds["20/day"] < thresholds["1/week"]
    # Seven minutes cannot vouch for one false event a week: said, with what it would take.
    assert "Record at least 16.8 h of normal running to vouch for it" in said["1/week"]
    assert meta["false_alarms"]["needs_s"] == pytest.approx(86400 / 200, abs=0.1)
    # Nor can they say how long a tag may hold one value: no stuck-sensor check, said so.
    assert meta["flatline_tags"] == [] and "no stuck-sensor check: it needs 60 min" in said["1/week"]
    # Nor show the machine's slow changes (the day's temperature and what follows it): said, with what it would take.
    assert "7 min of normal running cannot show the machine's slow changes" in said["1/week"]
    assert "Record at least 2.0 h of normal running (naming the tags" in said["1/week"]
    result = cli("model", "train", "m", "--csv", str(tmp_path / "normal.csv"), "--false-alarms", "often")
    assert result.returncode == 64 and "--false-alarms 'often'" in result.stderr


def test_two_hours_of_commissioning_are_not_told_to_record_longer_for_slow_changes_or_stuck_sensors(tmp_path):
    """Two hours of normal running, one sample every 10 s: long enough for the machine's slow changes and for the
    stuck-sensor check, so training says neither (seven minutes say both: the test above)."""
    rows = run(45, 7200, interval=10.0, valve=(0.8, 0.8))
    write_csv(tmp_path / "normal.csv", TAGS, [(1.79e9 + 10 * i, r) for i, r in enumerate(rows.tolist())])
    result = cli("model", "train", "m", "--csv", str(tmp_path / "normal.csv"), "--epochs", "3", "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert f"{len(rows)} rows -> {len(rows)} samples every 10 s (120.0 min)" in result.stdout
    assert "slow changes" not in result.stdout and "no stuck-sensor check" not in result.stdout
    assert json.loads((tmp_path / "m.json").read_text())["flatline_tags"]  # the check is on
    result = cli("model", "score", "m", "--csv", str(tmp_path / "normal.csv"), "--model-dir", str(tmp_path))
    assert result.returncode == 0 and "false events expected in 2.00 h" in result.stderr, result.stderr
    assert "too short" not in result.stderr


def test_the_threshold_allows_for_running_the_statistics_never_saw(tmp_path):
    """Scored by statistics fitted on the rest, a part of the recording at another operating point scores far
    higher than on its own: the threshold allows for it (at most 4x) and training says to record that running
    (a steady recording keeps its factor below 2: test_false_alarms_sets_the_threshold_quietly_and_is_recorded)."""
    rows = np.vstack([run(43, 420, valve=(0.8, 0.8))[:280], run(44, 140, valve=(0.62, 0.62))])
    write_csv(tmp_path / "moved.csv", TAGS, [(1.79e9 + i, r) for i, r in enumerate(rows.tolist())])
    result = cli("model", "train", "m", "--csv", str(tmp_path / "moved.csv"), "--epochs", "3", "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr
    meta = json.loads((tmp_path / "m.json").read_text())
    fold = meta["false_alarms"]["out_of_fold"]
    assert fold["folds"] == 3 and len(fold["ratios"]) == 3 and min(fold["ratios"]) >= 1.0
    assert 2 < fold["factor"] <= 4 and max(fold["ratios"]) == fold["ratios"][2]  # the last third moved
    assert f"x {fold['factor']:.3g} for running the statistics never saw" in meta["training"]["threshold_rule"]
    assert "record one that covers it" in result.stdout, result.stdout


def test_a_shift_of_a_few_spreads_in_one_of_several_noisy_tags_at_one_operating_point_is_one_event(tmp_path):
    """A test rig at one operating point: four noisy, unrelated tags, an oil temperature read in whole degrees, and
    a glitch in the commissioning. The level statistic averages a tag's inputs before it takes their size, so a
    shift of three spreads in one tag stands out of the noise; the mean of the inputs' sizes (stop 34's statistic)
    did not see it at all. The shift is one event, for as long as it lasts."""
    rng = np.random.default_rng(8)
    names = ["vibration", "current", "pressure", "flow", "oil_temp"]
    level, spread = [2.0, 11.0, 3.5, 120.0, 45.0], [0.3, 0.2, 0.05, 2.0, 0.2]
    rows = np.asarray(level) + np.asarray(spread) * rng.normal(size=(3000, 5))
    rows[:, 4] = np.round(rows[:, 4])  # read in whole degrees: one value nearly always
    normal = rows[:1200].copy()
    normal[500, 2] = 0.0  # and one poll of the pressure read as 0 while commissioning
    write_csv(tmp_path / "normal.csv", names, [(1.79e9 + i, r) for i, r in enumerate(normal.tolist())])
    rows[1800:2400, 0] += 3 * spread[0]
    write_csv(tmp_path / "shift.csv", names, [(1.79e9 + i, r) for i, r in enumerate(rows.tolist())])
    result = cli("model", "train", "rig", "--csv", str(tmp_path / "normal.csv"), "--epochs", "3", "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr
    # A tag read coarser than it varies, and a glitch: training says what it did. Either, learnt as normal, made
    # the model deaf to the shift (one event of 36 s for 10 minutes; with the glitch, no event at all).
    assert ("note: oil_temp held one value in 98% of the rows (its readings move in steps of 1): its normal range "
            "is hidden below one step, so a step counts as one spread") in result.stdout, result.stdout
    assert ("note: pressure: 1 reading(s) standing alone, far from the readings around them (the first: 0 at "
            "2026-09-21T14:21:40Z), left out of training as missing") in result.stdout, result.stdout
    shown = cli("model", "show", "rig", "--model-dir", str(tmp_path)).stdout  # and so does the model, later
    assert "read coarser than they vary (a step is one spread): oil_temp (1.0)" in shown, shown
    assert "glitches left out of training (readings): pressure (1)" in shown, shown
    summary, state = replayed(tmp_path)
    assert "1 anomaly event(s)" in summary, summary
    assert state[1800:2400].mean() > 0.9 and not state[:1800].any() and not state[2460:].any()


def test_a_shift_in_a_noisy_tag_beside_a_heating_and_a_cycling_tag_is_one_event(tmp_path):
    """Beside four noisy tags, a water temperature heating up all through commissioning (a drift tag: its deviation
    from the baseline runs a steady lag of several spreads) and a tank level cycling every 5 minutes. Their level
    is high in normal running; summed as they were, they set the norm of all tags, and a shift of four spreads in
    one noisy tag raised no event at all. Each tag's level over its own normal level, and their root sum of squares:
    the shift is one event, for as long as it lasts."""
    rng = np.random.default_rng(1)
    names = ["vibration", "current", "pressure", "flow", "water_temp", "tank_level"]
    level, spread = [2.0, 11.0, 3.5, 120.0, 40.0, 1.5], [0.3, 0.2, 0.05, 2.0, 0.03, 0.07]
    rows = np.asarray(level) + np.asarray(spread) * rng.normal(size=(3000, 6))
    seconds = np.arange(3000.0)
    rows[:, 4] += 0.004 * seconds  # heating: 4.8 °C over the 20 minutes of commissioning, and on
    rows[:, 5] += np.sin(2 * np.pi * seconds / 300)
    write_csv(tmp_path / "normal.csv", names, [(1.79e9 + i, r) for i, r in enumerate(rows[:1200].tolist())])
    rows[1800:2400, 0] += 4 * spread[0]
    write_csv(tmp_path / "shift.csv", names, [(1.79e9 + i, r) for i, r in enumerate(rows.tolist())])
    result = cli("model", "train", "rig", "--csv", str(tmp_path / "normal.csv"), "--epochs", "3", "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert "drift tags (fed as deviation from a 60 s baseline): water_temp (detected" in result.stdout, result.stdout
    scale = json.loads((tmp_path / "rig.json").read_text())["stats"]["level_scale"]
    assert min(scale[4], scale[5]) > 2 * max(scale[:4])  # the heating and the cycling tag run high levels
    summary, state = replayed(tmp_path)
    assert "1 anomaly event(s)" in summary, summary
    assert state[1800:2400].mean() > 0.9 and not state[:1800].any() and not state[2460:].any()
    shown = cli("model", "show", "rig", "--model-dir", str(tmp_path)).stdout
    assert "each tag's level over its own normal level, then their root sum of squares" in shown, shown

"""How well the shipped pump model finds faults it never saw, on seeds it never saw.

Every scenario runs the `pump` simulator sampled every second through the daemon's own
scorer (gateway.anomaly.DeviceScorer: ring buffer, int8 invoke, hysteresis). Seeds 5000 and
up: training used 11-16 and the threshold 21-23; seeds 1000-2999 were used
while choosing the event rule (4 windows above), 5000 and up only for the figures reported.

- each fault (bearing wear, cavitation, seal leak, stuck sensor, spike) at three severities,
  onset after 10 minutes of normal running; the progressive faults ramp up over 30 s. Stuck
  sensor and spike rotate over the ten tags; a spike lasts 5 s.
  Detected = an anomaly event starts within 60 s of onset. Top tag right = the first top tag
  is the faulty sensor, or for the physical faults one of the tags the fault moves.
- long normal running: false alarms (event starts) per 24 h.

The float32 twin of the model runs the same scenarios in the same run.

    .venv/bin/python bench/anomaly_eval.py [--runs 8] [--normal-days 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gateway.anomaly import DeviceScorer, Model  # noqa: E402
from sim.pump import TAGS  # noqa: E402
from sim.scenarios import run  # noqa: E402

ONSET, AFTER, LIMIT = 600.0, 300.0, 60.0
SEVERITIES = (0.3, 0.6, 1.0)
EXPECTED = {
    "bearing_wear": {"bearing_temp_c", "vibration_mm_s", "motor_current_a", "motor_rpm"},
    "cavitation": {"suction_pressure_bar", "flow_l_min", "vibration_mm_s", "discharge_pressure_bar"},
    "seal_leak": {"oil_pressure_bar", "discharge_pressure_bar", "flow_l_min", "casing_temp_c"},
}
FAULTS = ("bearing_wear", "cavitation", "seal_leak", "stuck_sensor", "spike")


def scenario(kind: str, severity: float, i: int) -> tuple[dict, set[str]]:
    fault = {"kind": kind, "severity": severity, "at": ONSET, "ramp": 30.0}
    if kind in ("stuck_sensor", "spike"):
        tag = TAGS[i % len(TAGS)]
        fault.update(tag=tag, ramp=0.0)
        if kind == "spike":
            fault["duration"] = 5.0
        return fault, {tag}
    return fault, EXPECTED[kind]


def replay(model: Model, rows: np.ndarray) -> list[tuple[float, object]]:
    scorer = DeviceScorer(model)
    events = []
    for t, row in enumerate(rows, start=1):
        event = scorer.push(float(t), dict(zip(TAGS, row.tolist())))
        if event is not None:
            events.append((float(t), event))
    return events


def evaluate(model: Model, runs: int, normal: list[np.ndarray], cache: dict) -> dict:
    out = {}
    for kind in FAULTS:
        delays, right, right3, total = [], 0, 0, 0
        for severity in SEVERITIES:
            for i in range(runs):
                seed = 5000 + 97 * i + int(severity * 10)
                key = (kind, severity, i)
                if key not in cache:
                    fault, expected = scenario(kind, severity, i)
                    cache[key] = (run(seed, ONSET + AFTER, start_hour=(seed * 7) % 24, faults=[fault]), expected)
                rows, expected = cache[key]
                total += 1
                starts = [(t, e) for t, e in replay(model, rows) if e.kind == "start" and t > ONSET]
                if starts and starts[0][0] - ONSET <= LIMIT:
                    delays.append(starts[0][0] - ONSET)
                    right += starts[0][1].top[0]["tag"] in expected
                    right3 += bool(expected & {t["tag"] for t in starts[0][1].top})
        out[kind] = {"detected": len(delays) / total, "median": statistics.median(delays) if delays else None,
                     "p95": float(np.percentile(delays, 95)) if delays else None,
                     "top_right": right / len(delays) if delays else 0.0,
                     "top3_right": right3 / len(delays) if delays else 0.0, "runs": total}
    alarms = sum(sum(1 for _, e in replay(model, rows) if e.kind == "start") for rows in normal)
    out["false_per_24h"] = alarms / (sum(len(r) for r in normal) / 86400)
    return out


def per_window_us(model: Model, n: int = 3000) -> float:
    rng = np.random.default_rng(1)
    flat = rng.random(model.window * len(model.tags), dtype=np.float32)
    for _ in range(200):
        model.reconstruct(flat)
    start = time.perf_counter()
    for _ in range(n):
        model.reconstruct(flat)
    return (time.perf_counter() - start) / n * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=8, help="runs per fault and severity")
    parser.add_argument("--normal-days", type=float, default=3.0, help="days of normal running for false alarms")
    args = parser.parse_args()
    models = ROOT / "models"
    int8 = Model(models / "pump-ae.tflite", models / "pump-ae.json")
    twin_meta = int8.meta["float_twin"]
    f32 = Model(models / twin_meta["file"], models / "pump-ae.json", verify_hash=False)
    days = max(1, round(args.normal_days))
    normal = [run(6000 + d, 86400 * args.normal_days / days, start_hour=(d * 9) % 24) for d in range(days)]
    cache: dict = {}
    results = {name: evaluate(m, args.runs, normal, cache) for name, m in (("int8", int8), ("float32", f32))}
    print(f"pump-ae on unseen seeds: {args.runs} runs x {len(SEVERITIES)} severities per fault, "
          f"onset at {ONSET:.0f} s, detection window {LIMIT:.0f} s; threshold {int8.threshold:.4f}")
    print(f"{'fault':<14} {'detected':>9} {'median s':>9} {'p95 s':>7} {'top tag':>8} {'in top 3':>9}"
          "   float32 twin: detected, top tag")
    for kind in FAULTS:
        a, b = results["int8"][kind], results["float32"][kind]
        fmt = lambda v: f"{v:.0f}" if v is not None else "-"  # noqa: E731
        print(f"{kind:<14} {a['detected']:>8.0%} {fmt(a['median']):>9} {fmt(a['p95']):>7} {a['top_right']:>7.0%}"
              f" {a['top3_right']:>9.0%}"
              f"   {b['detected']:.0%}, {b['top_right']:.0%}")
    print(f"false alarms per 24 h of normal running ({args.normal_days:g} days): "
          f"int8 {results['int8']['false_per_24h']:.2f}, float32 {results['float32']['false_per_24h']:.2f}")
    print(f"µs per window (one core, invoke + quantize): int8 {per_window_us(int8):.1f}, "
          f"float32 {per_window_us(f32):.1f}")
    print(f"model size: int8 {int8.size / 1024:.0f} KiB, float32 {f32.size / 1024:.0f} KiB")


if __name__ == "__main__":
    main()

"""The anomaly model on the box: µs per window on one core, the gateway's RSS with the model
loaded, and the runtime's import time. Targets: <= 50 µs per window, model <= 150 KiB, gateway RSS <= 60 MB.

Baselines measured in the same run: the bare invoke (quantize, invoke, dequantize) without the
scorer's input transform, per-tag errors and bookkeeping; the same gateway without a model;
importing numpy alone. (The reference LSTM method needed 200-400 MB and 20-50 ms per
inference; that figure is quoted from the issue, not measured here.)

    .venv/bin/python bench/inference.py [--seconds 20]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from startup import bare_python, devices, gateway, rss_mib

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gateway.anomaly.model import DeviceScorer, Model  # noqa: E402
from sim.pump import TAGS  # noqa: E402
from sim.scenarios import run  # noqa: E402


def per_window(model: Model, rows: np.ndarray) -> tuple[float, float]:
    """µs for one scored window through the daemon's DeviceScorer (scale, quantize, invoke, errors)."""
    scorer = DeviceScorer(model)
    samples = [dict(zip(TAGS, r.tolist())) for r in rows]
    for t, s in enumerate(samples[:model.window]):
        scorer.push(t, s)
    scorer.take_latency()
    for t, s in enumerate(samples[model.window:], start=model.window):
        scorer.push(t, s)
    lat = scorer.take_latency()
    return statistics.median(lat), float(np.percentile(lat, 99))


def bare_invoke(model: Model, n: int = 5000) -> float:
    flat = np.random.default_rng(1).standard_normal(model.window * len(model.tags)).astype(np.float32)
    for _ in range(200):
        model.reconstruct(flat)
    start = time.perf_counter()
    for _ in range(n):
        model.reconstruct(flat)
    return (time.perf_counter() - start) / n * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=20.0)
    args = parser.parse_args()
    import os
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})  # one core
    models = ROOT / "models"
    int8 = Model(models / "pump-ae.tflite", models / "pump-ae.json")
    rows = run(9090, min(3 * 3600, args.seconds * 500))
    i_med, i_p99 = per_window(int8, rows)
    bare = bare_invoke(int8)
    rss = {}
    for label, model in (("with", "pump-ae"), ("without", None)):
        with gateway(devices(model)) as (pid, ready):
            time.sleep(args.seconds)
            rss[label] = (rss_mib(pid), ready)
    rt_time, rt_rss = bare_python("numpy, ai_edge_litert.interpreter")
    np_time, np_rss = bare_python("numpy")
    print(f"pump-ae ({int8.window} x {len(int8.tags)} window, stride {int8.stride}), one core, through the daemon's "
          f"scorer (every window of {len(rows) / 3600:.1f} h of simulated running)")
    print(f"  int8 scorer  {i_med:6.1f} µs per window (p99 {i_p99:.1f}), model {int8.size / 1024:.0f} KiB   "
          "(targets <= 50 µs, <= 150 KiB)")
    print(f"  bare invoke  {bare:6.1f} µs per window (same run: quantize, invoke, dequantize only)")
    print(f"gateway RSS after {args.seconds:.0f} s, 10 devices at 1 Hz:")
    print(f"  5 pumps scored by the model   {rss['with'][0]:6.1f} MiB, READY after {rss['with'][1] * 1000:.0f} ms"
          f"   (target <= 60 MB = {60e6 / 2**20:.1f} MiB)")
    print(f"  no model (same run)           {rss['without'][0]:6.1f} MiB, READY after {rss['without'][1] * 1000:.0f} ms")
    print(f"import of the runtime (numpy + ai_edge_litert): {rt_time * 1000:.0f} ms, RSS {rt_rss:.1f} MiB; "
          f"numpy alone {np_time * 1000:.0f} ms, {np_rss:.1f} MiB")


if __name__ == "__main__":
    main()

"""Counter updates per second: one SQLite transaction per sample vs the gateway's batched commit.

Each update is what the daemon does per sample of a line with two counters: advance both
counters (wrap/reset rule), stage their rows and a counters message, and commit. Measured
both ways in the same run, on a real file, with `outbox.sync` normal and full.

    .venv/bin/python bench/counters.py [--samples 20000]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import common  # noqa: F401  (puts the project on sys.path)

from gateway import counters
from gateway.store.outbox import Outbox


def run(path: str, samples: int, batch: int, sync: str) -> float:
    store = Outbox.open(path, sync=sync)
    rows: dict = {}
    raw = 65000
    start = time.perf_counter()
    for i in range(samples):
        raw = (raw + 3) % 65536  # wraps every ~20k samples
        for name in ("produced", "defects"):
            rows[name], _ = counters.advance(rows.get(name), raw if name == "produced" else raw // 100, 16, 0.1,
                                             "2026-11-24/A", time.time())
            store.stage_counter("line1", name, rows[name])
        store.stage("edge/lab/gw/line1/counters", {"ts": "2026-11-24T06:00:00.000Z", "device": "line1", "counters": {
            n: {"total": r.total, "shift": r.shift_total, "shift_id": r.shift_id} for n, r in rows.items()}})
        if (i + 1) % batch == 0:
            store.commit()
    store.commit()
    elapsed = time.perf_counter() - start
    store.close()
    return samples / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=20000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        print(f"counter updates per second ({args.samples} samples, 2 counters each, one counters message each)")
        for sync in ("normal", "full"):
            per_sample = run(os.path.join(tmp, f"a-{sync}.db"), min(args.samples, 5000 if sync == "full" else
                                                                    args.samples), 1, sync)
            batched = run(os.path.join(tmp, f"b-{sync}.db"), args.samples, 100, sync)
            print(f"  sync {sync:<6}  transaction per sample {per_sample:9.0f}/s   batched (100 per commit, "
                  f"as at 1 kHz with commit_interval 100ms) {batched:9.0f}/s   ({batched / per_sample:.1f}x)")


if __name__ == "__main__":
    main()

"""Retrain the shipped pump model through `edge-gateway model train`, as a user would for their own pump.

    pip install -e ".[train]"          # TensorFlow (CPU): for training only, never for the daemon
    python models/train.py             # about 5 minutes on 2 cores; reproducible from its seeds

Data: normal running of the `pump` simulator, sampled every second: two simulated days (seeds
11 and 12, different start hours), written as CSV recordings like `history export` writes them.
The temperatures follow the weather, so they are named drift tags, as an engineer who knows the
machine would name them. The evaluation (bench/anomaly_eval.py) uses seeds 5000 and up.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gateway.anomaly.recording import write_csv  # noqa: E402
from sim.pump import TAGS  # noqa: E402
from sim.scenarios import run  # noqa: E402

SEEDS = (11, 12)
DAYS = 1.0
DRIFT = ("bearing_temp_c", "casing_temp_c", "ambient_temp_c")
T0 = 1_767_225_600.0  # 2026-01-01T00:00:00Z


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "models"), help="directory for pump-ae.tflite/.json")
    parser.add_argument("--days", type=float, default=DAYS, help="simulated days per seed")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        files = []
        for i, seed in enumerate(SEEDS):
            rows = run(seed, args.days * 86400, start_hour=(seed * 5.0) % 24)
            path = Path(tmp) / f"pump-seed{seed}.csv"
            start = T0 + i * 2 * 86400
            write_csv(path, TAGS, [(start + k, r) for k, r in enumerate(rows.tolist())])
            files += ["--csv", path.name]  # named as the metadata keeps them, not by the temporary folder
            print(f"seed {seed}: {len(rows)} samples -> {path.name}", flush=True)
        cmd = [sys.executable, "-m", "gateway", "model", "train", "pump-ae", *files, "--interval", "1s",
               "--drift-tags", ",".join(DRIFT), "--out", str(Path(args.out).resolve())]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, (str(ROOT), os.environ.get("PYTHONPATH"))))}
        sys.exit(subprocess.call(cmd, cwd=tmp, env=env))


if __name__ == "__main__":
    main()

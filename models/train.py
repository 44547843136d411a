"""Train the pump autoencoder and write models/pump-ae.tflite (int8) + pump-ae.json.

    pip install -e ".[train]"          # TensorFlow (CPU): for training only, never for the daemon
    python models/train.py             # about 5 minutes on 2 cores; reproducible from its seeds

Data: normal running of the `pump` simulator, sampled every second, several seeds, start
hours and days of simulated time (operating points change every few minutes; ambient follows
its daily cycle; drift). Min-max scaling per tag from the training data. A dense autoencoder
on 30-sample windows of the ten tags, converted to a full-integer int8 TFLite model with a
representative dataset. The threshold comes from held-out normal running (seeds not used for
training, nor by the evaluation), scored by the int8 model exactly as the daemon scores it.
A float32 twin is written beside it for comparison (bench/anomaly_eval.py).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import random
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gateway.anomaly import Model, score_batch  # noqa: E402  (the daemon's own scoring code)
from sim.pump import TAGS  # noqa: E402
from sim.scenarios import run, windows  # noqa: E402

WINDOW, STRIDE, INTERVAL = 30, 5, 1.0
TRAIN_SEEDS = (11, 12, 13, 14, 15, 16)  # the evaluation uses 1000 and up; the threshold 21..23
THRESHOLD_SEEDS = (21, 22, 23)
DAYS_PER_SEED = 1.0
SEED = 7  # TensorFlow, numpy and Python RNGs


def generate(seeds, days: float) -> list[np.ndarray]:
    runs = []
    for i, seed in enumerate(seeds):
        runs.append(run(seed, days * 86400, interval=INTERVAL, start_hour=(seed * 5.0) % 24))
        print(f"  seed {seed}: {len(runs[-1])} samples", flush=True)
    return runs


def flatline_tags(runs) -> list[str]:
    """Tags that never repeat one value for a whole window in normal running: a repeat means stuck."""
    tags = []
    for j, tag in enumerate(TAGS):
        longest = 0
        for r in runs:
            same = np.concatenate([[False], r[1:, j] == r[:-1, j]])
            run_len = 0
            for flag in same:
                run_len = run_len + 1 if flag else 0
                longest = max(longest, run_len)
        if longest < WINDOW - 1:
            tags.append(tag)
    return tags


def build(tf, inputs: int):
    keras = tf.keras
    model = keras.Sequential([
        keras.layers.Input(shape=(inputs,)),
        keras.layers.Dense(64, activation="relu"),
        keras.layers.Dense(16, activation="relu"),
        keras.layers.Dense(64, activation="relu"),
        keras.layers.Dense(inputs),
    ])
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="mae")
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "models"), help="directory for pump-ae.tflite/.json")
    parser.add_argument("--epochs", type=int, default=25)
    parser.add_argument("--quantile", type=float, default=99.9, help="threshold quantile of held-out errors")
    parser.add_argument("--margin", type=float, default=1.0, help="threshold = quantile x margin")
    args = parser.parse_args()

    os.environ.setdefault("TF_DETERMINISTIC_OPS", "1")
    random.seed(SEED)
    np.random.seed(SEED)
    import tensorflow as tf
    tf.random.set_seed(SEED)
    tf.config.threading.set_intra_op_parallelism_threads(2)

    t0 = time.time()
    print("simulating normal running for training", flush=True)
    train_runs = generate(TRAIN_SEEDS, DAYS_PER_SEED)
    allrows = np.concatenate(train_runs)
    lo, hi = np.nanmin(allrows, axis=0), np.nanmax(allrows, axis=0)
    span = np.where(hi - lo > 1e-6, hi - lo, 1.0)
    scale = lambda x: (x - lo) / span  # noqa: E731
    x = np.concatenate([windows(scale(r), WINDOW, STRIDE) for r in train_runs]).reshape(-1, WINDOW * len(TAGS))
    x = x[np.random.permutation(len(x))].astype(np.float32)
    print(f"{len(x)} training windows of {WINDOW}x{len(TAGS)}", flush=True)

    model = build(tf, WINDOW * len(TAGS))
    model.fit(x, x, epochs=args.epochs, batch_size=256, validation_split=0.1, verbose=2, shuffle=True)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rep = x[:2000]

    def representative():
        for row in rep:
            yield [row[None, :]]

    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = representative
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    converter.inference_input_type = tf.int8
    converter.inference_output_type = tf.int8
    int8 = converter.convert()
    (out / "pump-ae.tflite").write_bytes(int8)
    f32 = tf.lite.TFLiteConverter.from_keras_model(model).convert()
    (out / "pump-ae-f32.tflite").write_bytes(f32)

    meta = {
        "name": "pump-ae",
        "description": "dense autoencoder (300-64-16-64-300, ReLU) on 30 s windows of the pump's ten sensors",
        "tags": list(TAGS),
        "window": WINDOW,
        "stride": STRIDE,
        "interval_s": INTERVAL,
        "scaler": {"kind": "min-max", "min": [float(v) for v in lo], "max": [float(v) for v in lo + span]},
        "threshold": None,
        "events": {"start_after": 4, "end_after": 6},
        "ffill_limit": 5,
        "top_tags": 3,
        "flatline_tags": flatline_tags(train_runs),
        "training": {
            "data": f"sim pump, normal running, {DAYS_PER_SEED:g} simulated day(s) per seed at {INTERVAL:g} s, "
                    f"start hour (seed*5) mod 24",
            "train_seeds": list(TRAIN_SEEDS), "threshold_seeds": list(THRESHOLD_SEEDS), "rng_seed": SEED,
            "windows": int(len(x)), "epochs": args.epochs, "loss": "mae",
            "threshold_rule": f"{args.quantile}th percentile of held-out window scores x {args.margin}",
        },
        "versions": {"tensorflow": tf.__version__, "numpy": np.__version__, "python": platform.python_version()},
    }
    # Quantization parameters and hashes are read back from the files, as the daemon will.
    meta["sha256"] = hashlib.sha256(int8).hexdigest()
    meta["float_twin"] = {"file": "pump-ae-f32.tflite", "sha256": hashlib.sha256(f32).hexdigest()}
    meta_path = out / "pump-ae.json"
    meta["threshold"] = 1.0  # placeholder while scoring the held-out data
    meta_path.write_text(json.dumps(meta, indent=1))
    m = Model(out / "pump-ae.tflite", meta_path)
    meta["input_quantization"] = {"scale": m.in_scale, "zero_point": m.in_zero}
    meta["output_quantization"] = {"scale": m.out_scale, "zero_point": m.out_zero}

    print("scoring held-out normal running with the int8 model", flush=True)
    held = generate(THRESHOLD_SEEDS, DAYS_PER_SEED)
    scores = np.concatenate([score_batch(m, windows(m.scale(r), WINDOW, STRIDE))[0] for r in held])
    q = float(np.percentile(scores, args.quantile))
    meta["threshold"] = round(q * args.margin, 6)
    meta["training"]["heldout"] = {"windows": int(len(scores)), "mean": float(scores.mean()),
                                   "p99": float(np.percentile(scores, 99)), "p99_9": float(np.percentile(scores, 99.9)),
                                   "max": float(scores.max())}
    meta_path.write_text(json.dumps(meta, indent=1) + "\n")
    print(f"threshold {meta['threshold']:.5f} (held-out p99 {meta['training']['heldout']['p99']:.5f}, "
          f"max {scores.max():.5f}); {len(int8)} bytes int8, {len(f32)} bytes float32; "
          f"{time.time() - t0:.0f} s", flush=True)


if __name__ == "__main__":
    main()

"""`edge-gateway model train`: a model for one machine from recordings of its normal running.

The recipe, sized to the data so that ~7 minutes at 1 Hz gives a usable model and longer
recordings give better ones:

1. Each recording is put on the sample grid; a gap up to `ffill_limit` samples is forward-filled
   as the daemon does, and windows across a longer gap are left out.
2. Tags: a tag constant in training is left out (it says nothing about normal noise). A tag
   that *drifts* — trends across a recording (R² of a straight line ≥ 0.5, e.g. a temperature
   heating up), or is named in `drift_tags` — is fed as its deviation from a slow baseline
   (`baseline_s`), every other tag as its level; both are scaled by their normal spread.
3. Windows at stride 1. The last 20 % of each recording (after a gap of one window) is held out.
4. A dense autoencoder, its width sized to the windows, trained with input noise, MAE loss and
   early stopping on the held-out part (best epoch kept), then converted to full-integer int8.
5. Calibration on the held-out part, scored by the int8 model through the daemon's own
   `DeviceScorer` (causal, sample by sample): each tag's normal error (so every tag weighs
   alike), then the threshold = the `quantile` of held-out scores × `margin`, the margin
   widened when the held-out part is short. How it was set is written into the metadata.

TensorFlow is imported here only (the `[train]` extra); the daemon never imports this module.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import random
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from gateway import __version__
from gateway.anomaly import FORMAT, DeviceScorer, Inputs, Model
from gateway.errors import GatewayError
from gateway.recording import DataError, Recording

SEED = 7
HOLDOUT = 0.2  # share of each recording held out for early stopping and calibration
MIN_TRAIN_WINDOWS, MIN_HOLDOUT_WINDOWS = 120, 30
DRIFT_R2 = 0.5


class MissingExtra(GatewayError):
    """Training needs TensorFlow: the `[train]` extra. Exit 69."""


@dataclass
class Options:
    window: int = 10
    stride: int = 1
    interval: float | None = None  # seconds; None: the recordings' median step
    ffill_limit: int = 5
    baseline_s: float = 60.0
    drift_tags: Sequence[str] | None = None  # None: detected
    epochs: int = 200  # at most; early stopping ends sooner
    patience: int = 12
    quantile: float = 99.5
    margin: float = 1.5
    start_after: int = 3
    end_after: int = 5
    seed: int = SEED
    description: str = ""


@dataclass
class Report:
    lines: list[str] = field(default_factory=list)

    def say(self, text: str) -> None:
        self.lines.append(text)


def _tensorflow() -> Any:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("TF_DETERMINISTIC_OPS", "1")
    try:
        import tensorflow as tf
    except ImportError:
        raise MissingExtra("training needs TensorFlow, which is not installed: pip install 'edge-gateway[train]' "
                           "(the daemon itself never needs it)") from None
    return tf


def _ffill(values: np.ndarray, limit: int) -> np.ndarray:
    out = values.copy()
    run = np.zeros(values.shape[1], dtype=np.int64)
    for i in range(1, len(out)):
        bad = np.isnan(out[i])
        run = np.where(bad, run + 1, 0)
        fill = bad & (run <= limit)
        out[i, fill] = out[i - 1, fill]
    return np.asarray(out)


def _trend_r2(y: np.ndarray) -> float:
    ok = ~np.isnan(y)
    if ok.sum() < 10 or np.nanstd(y) == 0:
        return 0.0
    x = np.arange(len(y))[ok].astype(np.float64)
    return float(np.corrcoef(x, y[ok])[0, 1] ** 2)


def _noise(y: np.ndarray) -> float:
    """The white-noise level of a series: the spread of its first differences / sqrt(2)."""
    d = np.diff(y)
    d = d[~np.isnan(d)]
    return float(np.std(d) / math.sqrt(2)) if len(d) else 0.0


def _longest_repeat(y: np.ndarray) -> int:
    longest = run = 0
    for same in (y[1:] == y[:-1]):
        run = run + 1 if same else 0
        longest = max(longest, run)
    return longest


def _windows(inputs: np.ndarray, window: int) -> tuple[np.ndarray, np.ndarray]:
    """Stride-1 windows (n, window*tags) of one recording's inputs, and whether each is whole (no gap)."""
    n = len(inputs) - window + 1
    if n <= 0:
        return np.empty((0, window * inputs.shape[1]), dtype=np.float32), np.empty(0, dtype=bool)
    view = np.lib.stride_tricks.sliding_window_view(inputs, (window, inputs.shape[1]))[:, 0]
    flat = view.reshape(n, -1)
    whole = ~np.isnan(flat).any(axis=1)
    return np.nan_to_num(flat).astype(np.float32), whole


def train(name: str, recordings: Sequence[Recording], out_dir: Path, opts: Options,
          progress: Callable[[int, int, float, float], None] | None = None) -> Report:
    """Train, convert, calibrate and write `out_dir/NAME.tflite` and `NAME.json`; the report says what was done."""
    report = Report()
    tags = list(recordings[0].tags)
    for r in recordings[1:]:
        if r.tags != tags:
            raise DataError(f"{r.source} has columns {', '.join(r.tags)}, but {recordings[0].source} has "
                            f"{', '.join(tags)}: give --tags to pick the same ones from each")
    interval = opts.interval or _interval(recordings)
    window = opts.window
    grids = [r.on_grid(interval, window + opts.ffill_limit + 1)[1] for r in recordings]
    rows = sum(len(g) for g in grids)
    report.say(f"{len(recordings)} recording(s), {sum(len(r) for r in recordings)} rows -> {rows} samples "
               f"every {interval:g} s ({rows * interval / 60:.1f} min)")
    grids = [_ffill(g, opts.ffill_limit) for g in grids]
    allrows = np.concatenate(grids)

    # Tags: constant ones out; drift ones detected or named.
    keep, drift = [], []
    for j, tag in enumerate(tags):
        col = allrows[:, j]
        if np.isnan(col).all():
            report.say(f"tag {tag} left out: no value in the recordings")
            continue
        if np.nanmax(col) - np.nanmin(col) <= 1e-9 * max(1.0, abs(float(np.nanmedian(col)))):
            report.say(f"tag {tag} left out: constant in training ({np.nanmedian(col):g}), so its normal noise is unknown")
            continue
        keep.append(j)
        if opts.drift_tags is not None:
            drift.append(tag in opts.drift_tags)
        else:
            r2 = max(_trend_r2(g[:, j]) for g in grids)
            drift.append(r2 >= DRIFT_R2)
    unknown = [t for t in opts.drift_tags or () if t not in tags]
    if unknown:
        raise DataError(f"--drift-tags names {', '.join(unknown)}, which the recordings do not have "
                        f"(they have {', '.join(tags)})")
    if not keep:
        raise DataError("no tag varies in the recordings: nothing to learn")
    tags = [tags[j] for j in keep]
    grids = [g[:, keep] for g in grids]
    allrows = allrows[:, keep]
    drift_tags = [t for t, d in zip(tags, drift, strict=True) if d]
    report.say(f"{len(tags)} tag(s): {', '.join(tags)}")
    report.say("drift tags (fed as deviation from a {:g} s baseline): {}".format(
        opts.baseline_s, ", ".join(drift_tags) if drift_tags else "none") +
        (" (detected: a trend across a recording)" if opts.drift_tags is None and drift_tags else ""))

    center = np.nanmedian(allrows, axis=0)
    noise = np.array([max(_noise(g[:, j]) for g in grids) for j in range(len(tags))])
    level_spread = np.nanstd(allrows, axis=0)
    deviations = np.concatenate([Inputs(center, np.ones(len(tags)), drift, opts.baseline_s, interval).run(g)
                                 for g in grids]) if drift_tags else allrows - center
    drift_spread = np.nanstd(deviations, axis=0)
    spread = np.where(drift, drift_spread, level_spread)
    floor = np.maximum(noise, 1e-6 * np.maximum(1.0, np.abs(center)))
    spread = np.maximum(spread, floor)
    spread = np.where(spread > 0, spread, 1.0)

    # Windows, split in time: the last part of each recording is held out.
    train_x, hold_x, hold_ranges = [], [], []
    for g in grids:
        x, whole = _windows(Inputs(center, spread, drift, opts.baseline_s, interval).run(g), window)
        cut = int(len(x) * (1 - HOLDOUT))
        train_x.append(x[:max(0, cut - window)][whole[:max(0, cut - window)]])
        hold_x.append(x[cut:][whole[cut:]])
        hold_ranges.append(cut)
    xt, xv = np.concatenate(train_x), np.concatenate(hold_x)
    need_rows = math.ceil((MIN_TRAIN_WINDOWS + MIN_HOLDOUT_WINDOWS) / (1 - HOLDOUT) + 2 * window)
    if len(xt) < MIN_TRAIN_WINDOWS or len(xv) < MIN_HOLDOUT_WINDOWS:
        raise DataError(f"too little normal running to train on: {rows} samples give {len(xt)} training and "
                        f"{len(xv)} held-out windows of {window}; at least {MIN_TRAIN_WINDOWS} and "
                        f"{MIN_HOLDOUT_WINDOWS} are needed, about {need_rows} samples "
                        f"({need_rows * interval / 60:.1f} min at {interval:g} s) without gaps")
    report.say(f"windows of {window} x {len(tags)}, stride 1: {len(xt)} for training, {len(xv)} held out "
               f"(the last {HOLDOUT:.0%} of each recording)")

    tf = _tensorflow()
    random.seed(opts.seed)
    np.random.seed(opts.seed)
    tf.random.set_seed(opts.seed)
    tf.config.threading.set_intra_op_parallelism_threads(2)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    size = window * len(tags)
    hidden, code = _widths(size, len(xt))
    net = _build(tf, size, hidden, code)
    batch = int(min(256, max(16, len(xt) // 40)))
    started = time.monotonic()
    history = net.fit(xt, xt, validation_data=(xv, xv), epochs=opts.epochs, batch_size=batch, shuffle=True,
                      verbose=0, callbacks=[
                          tf.keras.callbacks.EarlyStopping(monitor="val_loss", patience=opts.patience, min_delta=1e-3,
                                                           restore_best_weights=True),
                          _Progress(tf, opts.epochs, progress)])
    losses, val = history.history["loss"], history.history["val_loss"]
    best = int(np.argmin(val))
    report.say(f"dense autoencoder {size}-{hidden}-{code}-{hidden}-{size}: {len(losses)} epoch(s) of at most "
               f"{opts.epochs} (early stopping kept epoch {best + 1}), batch {batch}, "
               f"{time.monotonic() - started:.0f} s; validation error {val[best]:.4f} (training {losses[best]:.4f})")

    rng = np.random.default_rng(opts.seed)
    rep = xt[rng.permutation(len(xt))[:2000]]

    def representative() -> Any:
        for row in rep:
            yield [row[None, :]]

    converter = tf.lite.TFLiteConverter.from_keras_model(net)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = representative
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    converter.inference_input_type = tf.int8
    converter.inference_output_type = tf.int8
    int8 = _quiet(converter.convert)

    flatline = _flatline(tags, grids, window)
    meta: dict[str, Any] = {
        "format": FORMAT, "name": name,
        "description": opts.description or f"dense autoencoder on {window}-sample windows of {len(tags)} tags",
        "tags": tags, "window": window, "stride": opts.stride, "interval_s": interval,
        "inputs": {"center": _floats(center), "spread": _floats(spread), "drift": [bool(d) for d in drift],
                   "baseline_s": opts.baseline_s},
        "error_scale": [1.0] * len(tags), "threshold": 1.0,
        "events": {"start_after": opts.start_after, "end_after": opts.end_after},
        "ffill_limit": opts.ffill_limit, "top_tags": min(3, len(tags)), **flatline,
        "sha256": hashlib.sha256(int8).hexdigest(),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    tflite_path, meta_path = out_dir / f"{name}.tflite", out_dir / f"{name}.json"
    tmp_tflite, tmp_meta = tflite_path.with_suffix(".tflite.tmp"), meta_path.with_suffix(".json.tmp")
    tmp_tflite.write_bytes(int8)
    tmp_meta.write_text(json.dumps(meta))

    # Calibration, through the daemon's own scorer, on the held-out part of each recording.
    per_tag = _held_out_errors(Model(tmp_tflite, tmp_meta), grids, hold_ranges, window)
    error_scale = np.maximum(per_tag.mean(axis=0), 1e-6)
    meta["error_scale"] = _floats(error_scale)
    tmp_meta.write_text(json.dumps(meta))
    model = Model(tmp_tflite, tmp_meta)
    scores = _held_out_errors(model, grids, hold_ranges, window).mean(axis=1)
    q = float(np.percentile(scores, opts.quantile))
    margin = opts.margin * (1.0 + 2.0 / math.sqrt(len(scores) / window))  # fewer independent windows: more margin
    threshold = q * margin
    meta["threshold"] = round(threshold, 6)
    meta["training"] = {
        "recordings": [r.source for r in recordings], "samples": rows, "windows": len(xt),
        "held_out_windows": len(scores), "epochs": len(losses), "best_epoch": best + 1,
        "max_epochs": opts.epochs, "loss": "mae", "widths": [size, hidden, code, hidden, size],
        "validation_error": round(float(val[best]), 6), "rng_seed": opts.seed,
        "threshold_rule": (f"{opts.quantile:g}th percentile of {len(scores)} held-out window scores "
                           f"({q:.4f}) x margin {margin:.3f} (= {opts.margin:g} x (1 + 2/sqrt(held-out windows / "
                           f"window)))"),
        "held_out": {"mean": round(float(scores.mean()), 6), "p99": round(float(np.percentile(scores, 99)), 6),
                     "max": round(float(scores.max()), 6)},
        "drift": "named" if opts.drift_tags is not None else f"detected: trend R² >= {DRIFT_R2} in a recording",
    }
    meta["versions"] = {"edge-gateway": __version__, "tensorflow": tf.__version__, "numpy": np.__version__,
                        "python": platform.python_version()}
    meta["input_quantization"] = {"scale": model.in_scale, "zero_point": model.in_zero}
    meta["output_quantization"] = {"scale": model.out_scale, "zero_point": model.out_zero}
    tmp_meta.write_text(json.dumps(meta, indent=1) + "\n")
    os.replace(tmp_tflite, tflite_path)
    os.replace(tmp_meta, meta_path)
    report.say(f"threshold {threshold:.4f}: {meta['training']['threshold_rule']}")
    report.say(f"wrote {tflite_path} ({len(int8) / 1024:.0f} KiB, int8) and {meta_path}")
    return report


def _interval(recordings: Sequence[Recording]) -> float:
    steps = [s for r in recordings if (s := r.median_interval()) is not None]
    if not steps:
        raise DataError("cannot tell the sample interval from fewer than two rows: give --interval")
    return round(float(np.median(steps)), 6)


def _widths(size: int, windows: int) -> tuple[int, int]:
    """Hidden and code widths: narrower for few windows (fewer weights to fit), never wider than the input."""
    hidden = int(min(64, max(16, size // 2), max(16, windows // 20)))
    code = int(max(4, min(16, hidden // 4)))
    return hidden, code


def _build(tf: Any, size: int, hidden: int, code: int) -> Any:
    keras = tf.keras
    net = keras.Sequential([
        keras.layers.Input(shape=(size,)),
        keras.layers.GaussianNoise(0.1),  # denoising: small sets are not learnt by heart
        keras.layers.Dense(hidden, activation="relu"),
        keras.layers.Dense(code, activation="relu"),
        keras.layers.Dense(hidden, activation="relu"),
        keras.layers.Dense(size),
    ])
    net.compile(optimizer=keras.optimizers.Adam(1e-3), loss="mae")
    return net


def _Progress(tf: Any, epochs: int, progress: Callable[[int, int, float, float], None] | None) -> Any:
    class Progress(tf.keras.callbacks.Callback):  # type: ignore[misc]
        def on_epoch_end(self, epoch: int, logs: dict[str, float] | None = None) -> None:
            if progress is not None:
                logs = logs or {}
                progress(epoch + 1, epochs, float(logs.get("loss", math.nan)), float(logs.get("val_loss", math.nan)))

    return Progress()


def _quiet(call: Callable[[], bytes]) -> bytes:
    """The converter prints pages to fd 1 and 2 (the traced function, MLIR passes, quantization notes): keep
    them off the user's screen and out of the report."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 1)
            os.dup2(null.fileno(), 2)
        return call()
    finally:
        for fd, copy in zip((1, 2), saved, strict=True):
            os.dup2(copy, fd)
            os.close(copy)


def _flatline(tags: list[str], grids: list[np.ndarray], window: int) -> dict[str, Any]:
    """Tags that never hold one exact value long in normal running: a long repeat means a stuck sensor."""
    longest = [max(_longest_repeat(g[:, j]) for g in grids) for j in range(len(tags))]
    eligible = [t for t, n in zip(tags, longest, strict=True) if n < 10]
    after = max(30, window, 3 * max((n for t, n in zip(tags, longest, strict=True) if t in eligible), default=0))
    return {"flatline_tags": eligible, "flatline_after": after}


def _scored(model: Model, grid: np.ndarray, start: int) -> list[np.ndarray]:
    scorer = DeviceScorer(model)
    out = []
    for i, row in enumerate(grid):
        scorer.push(float(i), dict(zip(model.tags, row.tolist(), strict=True)))
        if i >= start and scorer.errors is not None and scorer.since_score == 0:
            out.append(scorer.errors.copy())
    return out


def _held_out_errors(model: Model, grids: list[np.ndarray], cuts: list[int], window: int) -> np.ndarray:
    """Each held-out window's per-tag error, as the daemon computes it (the scorer runs from each recording's
    start, so that drift baselines are warm)."""
    errs = [e for g, cut in zip(grids, cuts, strict=True) for e in _scored(model, g, cut + window - 1)]
    return np.stack(errs)


def _floats(values: np.ndarray) -> list[float]:
    return [float(f"{v:.8g}") for v in values]

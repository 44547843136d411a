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
5. The statistics over `context` samples (see gateway/anomaly/model.py), fitted on all of it: the
   principal subspace of the level tags' inputs (SPE), each tag's normal one-step change (forecast
   residual).
6. Calibration through the daemon's own `DeviceScorer` (causal, sample by sample): each tag's
   normal autoencoder error on the held-out part, each statistic's 99th percentile, then the
   threshold for the false-alarm rate asked for (`false_alarms`, events per second of normal
   running): the maxima of the fused score over blocks of one context are fitted with a Gumbel
   distribution (an extreme-value fit, by moments), and the threshold is its quantile for that
   rate per block, never below the highest score seen. The held-out part is used when it holds
   30 blocks or more, else all of the recording (the autoencoder's share is then in-sample on its
   training part). Scores of rows the statistics were fitted on run lower than the same machine's
   later: each third of each recording is also scored by statistics fitted on the other two
   thirds, and the threshold is multiplied by how much higher those scores run (the mean over the
   folds of their highest score over the highest in-sample one; at most 4, and a factor
   above 2 is said: the recording's parts show different running). A rate below what the
   recording can vouch for (one false event per ten times its length) is said, with the recording
   it would take. How it was set is written into the metadata.

TensorFlow is imported here only (the `[train]` extra); the daemon never imports this module.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import platform
import random
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from gateway import __version__
from gateway.anomaly.model import (
    CALIBRATING,
    COMPONENTS,
    FORMAT,
    INTERVAL_RANGE,
    LEVEL,
    SCALE_LIMIT,
    SLOW_EVIDENCE_S,
    DeviceScorer,
    Inputs,
    Model,
)
from gateway.anomaly.recording import DataError, Recording, format_time
from gateway.errors import GatewayError
from gateway.units import duration_text

SEED = 7
SMALLEST_SPREAD = 1e-11  # a tag varying less than this is constant (what a model's metadata takes: 1e-12 and up)
HOLDOUT = 0.2  # share of each recording held out for early stopping and calibration
MIN_TRAIN_WINDOWS, MIN_HOLDOUT_WINDOWS = 120, 30
DRIFT_R2 = 0.5
WEEK = 7 * 86400.0
VOUCH = 10  # a recording vouches for false-alarm rates down to one per this many times its length
FLATLINE_EVIDENCE_S = 3600.0  # normal running the stuck-sensor check needs to know how long a tag may hold a value
CALIBRATION_BLOCKS = 30  # held-out blocks needed to calibrate on the held-out part alone
FOLDS = 3  # parts of each recording scored out of fold for the threshold
FOLD_SPREAD = 0.1  # a fold's spreads are at least this share of the whole recording's
# A tag's normal level (|mean input| over the context) is taken as at least white noise's 99th percentile: 2.576
# spreads over the root of the context. A tag that hardly moved in commissioning is no more sensitive than that.
LEVEL_FLOOR = 2.576
COARSE_SHARE = 0.9  # a tag that held one value this share of the rows is read too coarsely to show its range
# A glitch: at most GLITCH_SAMPLES readings GLITCH_SPREADS noise levels away from the readings on either side, which
# agree with each other (a poll read as 0, a dropped sensor). Where they are more than GLITCH_SHARE of a tag's
# samples, they are the tag's nature, not glitches.
GLITCH_SAMPLES, GLITCH_SPREADS, GLITCH_SHARE = 3, 10.0, 0.01
# The out-of-fold factor on the threshold: above UNSEEN_WARN training says the parts of the recording show
# different running; it is at most UNSEEN_CAP (a threshold that high would miss real faults).
UNSEEN_WARN, UNSEEN_CAP = 2.0, 4.0
WEIGHTS = {"level": 1.0, "spe": 1.0, "residual": 0.5, "autoencoder": 0.5}


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
    context: int = 30  # samples the statistics look back over
    false_alarms: float = 1 / WEEK  # false events per second of normal running
    cusum_h: float = 1.0
    cusum_cap: float = 2.0
    end_after: int = 10
    subside: float = 0.6  # an event also ends when its score stays below this share of the event's level
    settle: float = 2.0  # then the threshold is held at that level, down to this x the settling score
    seed: int = SEED
    description: str = ""


@dataclass
class Report:
    lines: list[str] = field(default_factory=list)
    held_out: list[tuple[np.ndarray, int]] = field(default_factory=list)  # (grid, first calibration sample)

    def say(self, text: str) -> None:
        self.lines.append(text)


def _tensorflow() -> Any:
    # Set before the import: TensorFlow's C++ logging (oneDNN notices, node_def_util errors) reads them once.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    os.environ.setdefault("ABSL_MIN_LOG_LEVEL", "3")
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
    with _tensorflow_quiet():
        return _train(name, recordings, out_dir, opts, progress)


@contextlib.contextmanager
def _tensorflow_quiet() -> Iterator[None]:
    """TensorFlow's C++ side writes to fd 2 whatever the log level says (oneDNN notices, absl's "log messages
    before InitializeLog", node_def_util errors): fd 2 goes to a file meanwhile, and is shown only if training
    fails. Our own lines (the progress bar) still reach the user: sys.stderr is a copy of the real fd 2."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(2)
    captured = tempfile.TemporaryFile()
    os.dup2(captured.fileno(), 2)
    stderr = sys.stderr
    sys.stderr = os.fdopen(os.dup(saved), "w", buffering=1)
    failed = True
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Keras's UserWarnings are about its own API, not the user's data
            for name in ("tensorflow", "absl", "h5py"):
                logging.getLogger(name).setLevel(logging.ERROR)
            yield
        failed = False
    except DataError:  # the user's data, said in our words: TensorFlow's notices would only bury it
        failed = False
        raise
    finally:
        sys.stderr.flush()
        sys.stderr.close()
        sys.stderr = stderr
        os.dup2(saved, 2)
        os.close(saved)
        if failed:
            captured.seek(0)
            sys.stderr.write(captured.read().decode(errors="replace")[-4000:])
        captured.close()


def _train(name: str, recordings: Sequence[Recording], out_dir: Path, opts: Options,
           progress: Callable[[int, int, float, float], None] | None) -> Report:
    report = Report()
    tags = list(recordings[0].tags)
    for r in recordings[1:]:
        if r.tags != tags:
            raise DataError(f"{r.source} has columns {', '.join(r.tags)}, but {recordings[0].source} has "
                            f"{', '.join(tags)}: give --tags to pick the same ones from each")
    steps = [s for r in recordings if (s := r.median_interval()) is not None]
    interval = opts.interval or _interval(steps)
    if opts.interval and steps and interval < 0.5 * min(steps):
        raise DataError(f"--interval {interval:g}s is finer than the recordings' own step ({min(steps):g} s): most "
                        f"samples would be missing. Give --interval {min(steps):g}s, or leave it out")
    if not INTERVAL_RANGE[0] <= interval <= INTERVAL_RANGE[1]:
        raise DataError(f"a sample every {interval:g} s: a model takes {INTERVAL_RANGE[0]:g} s to "
                        f"{INTERVAL_RANGE[1]:g} s between samples (--interval)")
    window = opts.window
    on_grid = [r.on_grid(interval, window + opts.ffill_limit + 1) for r in recordings]
    grids = [g for _, g in on_grid]
    rows = sum(len(g) for g in grids)
    if max(len(g) for g in grids) < 2 * window:
        spans = [r.times[-1] - r.times[0] for r in recordings if len(r)]
        raise DataError(f"a sample every {interval:g} s gives the longest recording {max(len(g) for g in grids)} "
                        f"sample(s) (it spans {duration_text(max(spans, default=0.0))}): too few to train on. Give "
                        f"longer recordings" + (", or a shorter --interval" if opts.interval else ""))
    report.say(f"{len(recordings)} recording(s), {sum(len(r) for r in recordings)} rows -> {rows} samples "
               f"every {interval:g} s ({rows * interval / 60:.1f} min)")
    glitches = _drop_glitches(tags, on_grid)
    for tag, found in glitches.items():
        report.say(f"note: {tag}: {len(found)} reading(s) standing alone, far from the readings around them (the "
                   f"first: {found[0][1]:g} at {format_time(found[0][0])}), left out of training as missing: a "
                   f"glitch is not normal running. In operation such a reading raises an event")
    grids = [_ffill(g, opts.ffill_limit) for g in grids]
    allrows = np.concatenate(grids)

    # Tags: constant ones out; drift ones detected or named.
    keep, drift = [], []
    for j, tag in enumerate(tags):
        col = allrows[:, j]
        if np.isnan(col).all():
            report.say(f"tag {tag} left out: no value in the recordings")
            continue
        # Relative to the tag's size: a leakage current of 2e-10 A that varies by 10 % is not constant.
        if np.nanmax(col) - np.nanmin(col) <= 1e-9 * abs(float(np.nanmedian(col))) + SMALLEST_SPREAD:
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

    center, spread = _scales(grids, drift, opts.baseline_s, interval)
    wild = [(t, float(np.nanmax(np.abs(allrows[:, j])))) for j, t in enumerate(tags)
            if not (abs(center[j]) <= SCALE_LIMIT and spread[j] <= SCALE_LIMIT)]
    if wild:
        raise DataError(f"{', '.join(f'tag {t} reads up to {top:.3g}' for t, top in wild)}: beyond what a model can "
                        f"scale (centre and spread within {SCALE_LIMIT:g}), and more often than a glitch. Such "
                        f"readings are no measurement: leave those rows out, or the tag (--tags)")
    coarse = _coarse(tags, grids)
    for tag, (held, unit) in coarse.items():
        report.say(f"note: {tag} held one value in {held:.0%} of the rows (its readings move in steps of {unit:.4g}): "
                   f"its normal range is hidden below one step, so a step counts as one spread and a change smaller "
                   f"than a step is not seen. Read it finer, or record running in which it moves")

    # Windows, split in time: the last part of each recording is held out.
    train_x, hold_x, hold_ranges = [], [], []
    for g in grids:
        x, whole = _windows(Inputs(center, spread, drift, opts.baseline_s, interval).run(g), window)
        cut = int(len(x) * (1 - HOLDOUT))
        train_x.append(x[:max(0, cut - window)][whole[:max(0, cut - window)]])
        hold_x.append(x[cut:][whole[cut:]])
        hold_ranges.append(cut)
    xt, xv = np.concatenate(train_x), np.concatenate(hold_x)
    context = max(2, opts.context)
    span = max(window, context)  # the rows one score looks back over
    # What both checks below need, said the same by each (the first said 208 samples, and with 208 the second 300)
    need_rows = max(math.ceil((MIN_TRAIN_WINDOWS + MIN_HOLDOUT_WINDOWS) / (1 - HOLDOUT) + 2 * window),
                    math.ceil((span + MIN_HOLDOUT_WINDOWS) / HOLDOUT))
    if len(xt) < MIN_TRAIN_WINDOWS or len(xv) < MIN_HOLDOUT_WINDOWS:
        raise DataError(f"too little normal running to train on: {rows} samples give {len(xt)} training and "
                        f"{len(xv)} held-out windows of {window}; at least {MIN_TRAIN_WINDOWS} and "
                        f"{MIN_HOLDOUT_WINDOWS} are needed, about {need_rows} samples "
                        f"({need_rows * interval / 60:.1f} min at {interval:g} s) without gaps")
    if opts.false_alarms * span * interval > 0.5:  # the threshold is a quantile of one context's highest score
        raise DataError(f"--false-alarms {rate_text(opts.false_alarms)}: more than one false event in every two "
                        f"contexts ({2 * span * interval:g} s) is no threshold; ask for fewer, e.g. 1/day")
    full = sum(max(0, len(g) - (cut + span - 1)) for g, cut in zip(grids, hold_ranges, strict=True))
    if full < MIN_HOLDOUT_WINDOWS:  # calibration scores the held-out part: each score needs a whole context
        raise DataError(f"too little normal running for a context of {span} samples: the held-out part (the last "
                        f"{HOLDOUT:.0%} of each recording) holds {full} scores; at least {MIN_HOLDOUT_WINDOWS} are "
                        f"needed, about {need_rows} samples ({need_rows * interval / 60:.1f} min at {interval:g} s) "
                        f"without gaps, or a shorter --context")
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

    stuck_check = rows * interval >= FLATLINE_EVIDENCE_S
    flatline = _flatline(tags, grids, window, stuck_check)
    stats = _fit_stats(grids, center, spread, drift, opts.baseline_s, interval, context)
    meta: dict[str, Any] = {
        "format": FORMAT, "name": name,
        "description": opts.description or (f"fused statistics over {context} samples and a dense autoencoder on "
                                             f"{window}-sample windows of {len(tags)} tags"),
        "tags": tags, "window": window, "stride": opts.stride, "interval_s": interval,
        "inputs": {"center": _floats(center), "spread": _floats(spread), "drift": [bool(d) for d in drift],
                   "baseline_s": opts.baseline_s},
        "error_scale": [1.0] * len(tags), "stats": stats, "threshold": CALIBRATING,  # no event while calibrating
        "events": {"rule": "cusum", "h": opts.cusum_h, "cap": opts.cusum_cap, "start_after": 1,
                   "end_after": opts.end_after, "subside": opts.subside, "settle": opts.settle},
        "ffill_limit": opts.ffill_limit, "top_tags": min(3, len(tags)), **flatline,
        "sha256": hashlib.sha256(int8).hexdigest(),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    tflite_path, meta_path = out_dir / f"{name}.tflite", out_dir / f"{name}.json"
    tmp_tflite, tmp_meta = tflite_path.with_suffix(".tflite.tmp"), meta_path.with_suffix(".json.tmp")
    tmp_tflite.write_bytes(int8)
    tmp_meta.write_text(json.dumps(meta))

    # Calibration, through the daemon's own scorer. 1: each tag's normal autoencoder error, held out.
    parts = _parts(Model(tmp_tflite, tmp_meta, calibrating=True), grids, [cut + span - 1 for cut in hold_ranges])
    # A coarse tag's normal error is at least a step, as its spread and its one-step change are.
    floor = np.array([coarse[t][1] if t in coarse else 0.0 for t in tags]) / spread
    meta["error_scale"] = _floats(np.maximum(parts[:, 3, :].mean(axis=0), np.maximum(floor, 1e-6)))
    # 2: each statistic's normal level, on the held-out part when it is long enough, else on all of it.
    held_blocks = len(parts) // span
    on_held_out = held_blocks >= CALIBRATION_BLOCKS
    starts = [cut + span - 1 for cut in hold_ranges] if on_held_out else [span - 1] * len(grids)
    tmp_meta.write_text(json.dumps(meta))
    stats["norms"], stats["level_scale"] = _norms(Model(tmp_tflite, tmp_meta, calibrating=True), grids, starts)
    tmp_meta.write_text(json.dumps(meta))
    # 3: the threshold for the false-alarm rate asked for, from the fused scores' block maxima, times how much
    # higher the score runs on parts of the recording the statistics were not fitted on (running never seen).
    model = Model(tmp_tflite, tmp_meta, calibrating=True)
    blocks = [_scores(model, g, start) for g, start in zip(grids, starts, strict=True)]
    fit = extreme_threshold(blocks, span, interval, opts.false_alarms)
    ratios = _out_of_fold(meta, tmp_tflite, meta_path.with_suffix(".fold.tmp"), grids, drift, opts.baseline_s,
                          interval, context)
    unseen = float(np.mean(ratios)) if ratios else 1.0
    threshold = fit["threshold"] * min(unseen, UNSEEN_CAP)
    meta["threshold"] = round(threshold, 6)
    span_s = rows * interval
    vouched = 1.0 / (VOUCH * span_s)
    meta["false_alarms"] = {
        "per_second": opts.false_alarms, "asked": rate_text(opts.false_alarms), "vouched_down_to": rate_text(vouched),
        "reachable": opts.false_alarms >= vouched, "recording_s": round(span_s, 3),
        "calibration_windows": int(sum(len(b) for b in blocks)),
        "needs_s": round(1.0 / (VOUCH * opts.false_alarms), 1),
        "method": (f"Gumbel fit (by moments) to the maxima of the fused score over {fit['blocks']:.0f} blocks of "
                   f"{span} samples ({'held-out part' if on_held_out else 'all of the recording'}): location "
                   f"{fit['mu']:.4g}, scale {fit['beta']:.4g}; quantile for {fit['p_block']:.3g} per block "
                   f"= {fit['quantile']:.4g}, highest score seen {fit['highest']:.4g}; x {min(unseen, UNSEEN_CAP):.3g} "
                   f"for running the statistics never saw (out of {FOLDS} folds in time, each scored by statistics "
                   f"fitted on the others: its highest score over theirs, mean {unseen:.3g}"
                   f"{f', at most {UNSEEN_CAP:g}' if unseen > UNSEEN_CAP else ''})"),
        "out_of_fold": {"folds": FOLDS, "ratios": [round(r, 4) for r in ratios], "factor": round(min(unseen, UNSEEN_CAP), 4)},
    }
    meta["training"] = {
        "recordings": [r.source for r in recordings], "samples": rows, "windows": len(xt),
        "held_out_windows": len(xv), "epochs": len(losses), "best_epoch": best + 1,
        "max_epochs": opts.epochs, "loss": "mae", "widths": [size, hidden, code, hidden, size],
        "validation_error": round(float(val[best]), 6), "rng_seed": opts.seed,
        "threshold_rule": f"{rate_text(opts.false_alarms)} false events in normal running: "
                          + meta["false_alarms"]["method"],
        "drift": "named" if opts.drift_tags is not None else f"detected: trend R² >= {DRIFT_R2} in a recording",
        "coarse": {tag: round(unit, 9) for tag, (_, unit) in coarse.items()},  # tag: its step, its least spread
        "glitches": {tag: len(found) for tag, found in glitches.items()},  # tag: readings left out as missing
    }
    meta["versions"] = {"edge-gateway": __version__, "tensorflow": tf.__version__, "numpy": np.__version__,
                        "python": platform.python_version()}
    meta["input_quantization"] = {"scale": model.in_scale, "zero_point": model.in_zero}
    meta["output_quantization"] = {"scale": model.out_scale, "zero_point": model.out_zero}
    tmp_meta.write_text(json.dumps(meta, indent=1) + "\n")
    os.replace(tmp_tflite, tflite_path)
    os.replace(tmp_meta, meta_path)
    report.say(f"statistics over {context} samples ({context * interval:g} s): level, SPE off "
               f"{len(stats['components'])} principal component(s), forecast residual, autoencoder")
    report.say(f"threshold {threshold:.4f} for {rate_text(opts.false_alarms)} false events in normal running: "
               f"{meta['false_alarms']['method']}")
    if unseen > UNSEEN_WARN:
        report.say(f"note: scored by statistics fitted on the rest of the recording, its parts score {unseen:.1f}x "
                   f"higher than on their own: the recording shows running that changes from part to part (another "
                   f"operating point, a slow drift). The threshold allows for {min(unseen, UNSEEN_CAP):.1f}x; running "
                   f"the recording did not show will still raise events: record one that covers it")
    if not meta["false_alarms"]["reachable"]:
        report.say(f"note: {duration_text(span_s)} of normal running vouch for about {rate_text(vouched)} false "
                   f"events at most; {rate_text(opts.false_alarms)} is an extrapolation of the fit. Record at "
                   f"least {duration_text(meta['false_alarms']['needs_s'])} of normal running to vouch for it")
    if span_s < SLOW_EVIDENCE_S:
        report.say(f"note: {duration_text(span_s)} of normal running cannot show the machine's slow changes (the day's "
                   f"temperature, the temperatures and pressures that follow it): within the next hour they can leave "
                   f"the range this recording showed and raise events. Record at least {duration_text(SLOW_EVIDENCE_S)} of "
                   f"normal running (naming the tags that follow the weather or the load with --drift-tags shortens "
                   f"those events, it does not prevent them)")
    if not stuck_check:
        report.say(f"note: no stuck-sensor check: it needs {duration_text(FLATLINE_EVIDENCE_S)} of normal running to know "
                   f"how long each tag may hold one value ({duration_text(rows * interval)} given)")
    report.held_out = [(g, start) for g, start in zip(grids, starts, strict=True)]
    report.say(f"wrote {tflite_path} ({len(int8) / 1024:.0f} KiB, int8) and {meta_path}")
    return report


def _scales(grids: list[np.ndarray], drift: Sequence[bool], baseline_s: float,
            interval: float) -> tuple[np.ndarray, np.ndarray]:
    """Each tag's centre (median) and normal spread: of its level, or for a drift tag of its deviation from the
    baseline; never below its white noise, nor, for a tag read coarser than it varies, below one step."""
    grids = [g for g in grids if len(g)]
    allrows = np.concatenate(grids)
    center = np.nanmedian(allrows, axis=0)
    with np.errstate(over="ignore", invalid="ignore"):  # readings of ±1e308: their sums and steps overflow
        noise = np.array([max(_noise(g[:, j]) for g in grids) for j in range(allrows.shape[1])])
        level_spread = np.nanstd(allrows, axis=0)
        deviations = np.concatenate([Inputs(center, np.ones(len(center)), drift, baseline_s, interval).run(g)
                                     for g in grids]) if any(drift) else allrows - center
        spread = np.where(drift, np.nanstd(deviations, axis=0), level_spread)
    spread = np.maximum(spread, np.maximum(noise, np.maximum(1e-6 * np.abs(center), SMALLEST_SPREAD)))
    share, step = _resolution(grids)
    spread = np.where(share >= COARSE_SHARE, np.maximum(spread, step), spread)  # a read step is normal
    # A spread that overflowed (NaN) is beyond any scale, not 1: the caller refuses the tag. Taken as 1, such a tag
    # was trained on as it read, to a loss of inf, and the converter crashed the process (exit 139).
    spread = np.where(np.isnan(spread), np.inf, spread)
    return center, np.where(spread > 0, spread, 1.0)


def _glitches(y: np.ndarray) -> np.ndarray:
    """Where a tag's readings glitch (see GLITCH_SAMPLES): a mask, all False when they are the tag's nature."""
    mask = np.zeros(len(y), dtype=bool)
    steps = np.abs(np.diff(y))
    steps = steps[np.isfinite(steps)]
    moved = steps[steps > 0]
    if not len(moved):
        return mask
    # The noise level from the typical step (robust to the glitches themselves), at least one step of a coarse tag,
    # and at least the spread of the tag's own readings (from their median distance to the median, robust too):
    # a held tag's short moves are far from its typical step of nearly nothing, but not from its readings.
    values = y[np.isfinite(y)]
    spread = 1.4826 * float(np.median(np.abs(values - np.median(values))))
    level = max(1.048 * float(np.median(steps)), float(np.median(moved)), spread)
    for length in range(1, GLITCH_SAMPLES + 1):
        before, after = y[:-length - 1], y[length + 1:]
        middle = (before + after) / 2
        with np.errstate(invalid="ignore"):
            hit = np.abs(after - before) <= 3 * level
            for k in range(length):
                hit &= np.abs(y[1 + k:len(y) - length + k] - middle) > GLITCH_SPREADS * level
        starts = np.nonzero(hit)[0] + 1
        for k in range(length):
            mask[starts + k] = True
    return mask if mask.sum() <= GLITCH_SHARE * len(y) else np.zeros(len(y), dtype=bool)


def _drop_glitches(tags: list[str], on_grid: list[tuple[np.ndarray, np.ndarray]]) -> dict[str, list[tuple[float, float]]]:
    """Glitches become missing values (in place), as the daemon would fill them; per tag that had any, their
    (time, reading). Learnt as normal, one glitch made every spread and norm it touched tens of times too wide."""
    glitches = {}
    for j, tag in enumerate(tags):
        found = []
        for times, g in on_grid:
            mask = _glitches(g[:, j])
            found += [(float(times[i]), float(g[i, j])) for i in np.nonzero(mask)[0]]
            g[mask, j] = np.nan
        if found:
            glitches[tag] = found
    return glitches


def _resolution(grids: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Each tag's share of rows at its most common value, and its typical step (the median of its changes)."""
    share, step = [], []
    for j in range(grids[0].shape[1]):
        col = np.concatenate([g[:, j] for g in grids])
        col = col[~np.isnan(col)]
        steps = np.abs(np.concatenate([np.diff(g[:, j]) for g in grids]))
        steps = steps[np.isfinite(steps) & (steps > 0)]
        share.append(np.unique(col, return_counts=True)[1].max() / len(col) if len(col) else 0.0)
        step.append(float(np.median(steps)) if len(steps) else 0.0)
    return np.asarray(share), np.asarray(step)


def _coarse(tags: list[str], grids: list[np.ndarray]) -> dict[str, tuple[float, float]]:
    """The tags read in steps coarser than their normal variation (a whole-degree register), with the share of
    rows at their most common value and their step: the spread is taken as one step, a smaller shift not seen."""
    share, step = _resolution(grids)
    return {tag: (float(s), float(q)) for tag, s, q in zip(tags, share, step, strict=True)
            if s >= COARSE_SHARE and q > 0}


def _interval(steps: Sequence[float]) -> float:
    """The sample interval: the median of the recordings' own median steps."""
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


def _flatline(tags: list[str], grids: list[np.ndarray], window: int, check: bool) -> dict[str, Any]:
    """Tags that never hold one exact value long in normal running: a long repeat means a stuck sensor. Only
    with `check` (an hour of normal running): a shorter one cannot tell a stuck sensor from a slow tag, a valve at
    rest or a historian that logs a value only when it changes (Cranfield's rig: tags that never repeated in
    its first 7 minutes held one value for 1-10 minutes later, in normal running, on 7 of 13 runs)."""
    longest = [max(_longest_repeat(g[:, j]) for g in grids) for j in range(len(tags))]
    eligible = [t for t, n in zip(tags, longest, strict=True) if n < 10 and check]
    after = max(30, window, 3 * max((n for t, n in zip(tags, longest, strict=True) if t in eligible), default=0))
    return {"flatline_tags": eligible, "flatline_after": after}


def _parts(model: Model, grids: list[np.ndarray], starts: list[int]) -> np.ndarray:
    """(windows, statistics, tags): each scored window's statistics from `start` on, as the daemon computes them
    (the scorer runs from each recording's start, so that drift baselines are warm)."""
    out = []
    for grid, start in zip(grids, starts, strict=True):
        scorer = DeviceScorer(model)
        for i, row in enumerate(grid):
            scorer.push(float(i), dict(zip(model.tags, row.tolist(), strict=True)))
            if i >= start and scorer.parts is not None and scorer.since_score == 0:
                out.append(scorer.parts.copy())
    if not out:  # gaps left no whole context where one was expected
        raise DataError(f"too little normal running without gaps to calibrate on: no whole context of "
                        f"{model.context} samples in the part scored")
    return np.stack(out)


def _scores(model: Model, grid: np.ndarray, start: int, stop: int | None = None) -> np.ndarray:
    """The fused scores of the windows ending at rows `start` to `stop` (the scorer warms up on the rows before)."""
    scorer = DeviceScorer(model)
    out = []
    for i, row in enumerate(grid[:stop]):
        scorer.push(float(i), dict(zip(model.tags, row.tolist(), strict=True)))
        if i >= start and scorer.state.score is not None and scorer.since_score == 0:
            out.append(scorer.state.score)
    return np.asarray(out)


def _norms(model: Model, grids: list[np.ndarray], starts: list[int]) -> tuple[dict[str, float], list[float]]:
    """Each tag's normal level (its |mean input|'s 99th percentile, at least white noise's: `LEVEL_FLOOR`), and each
    statistic's normal level: its 99th percentile, over the tags (the level: the root sum of squares of each tag's
    over its own), over the windows from `starts` on. `model` has no level scale yet."""
    parts = _parts(model, grids, starts)
    level_scale = np.maximum(np.percentile(parts[:, 0, :], 99, axis=0), LEVEL_FLOOR / math.sqrt(model.context))
    totals = parts.sum(axis=2)
    totals[:, 0] = np.sqrt(np.square(parts[:, 0, :] / level_scale).sum(axis=1))
    norms = {c: float(f"{max(float(np.percentile(totals[:, i], 99)), 1e-6):.8g}") for i, c in enumerate(COMPONENTS)}
    return norms, _floats(level_scale)


def _out_of_fold(meta: dict[str, Any], tflite: Path, path: Path, grids: list[np.ndarray], drift: Sequence[bool],
                 baseline_s: float, interval: float, context: int) -> list[float]:
    """How much higher the score runs on running the statistics never saw than on what they were fitted on: each
    recording cut in `FOLDS` parts in time, each part scored by centres, spreads, principal subspace and norms
    fitted on the other parts (the autoencoder is shared); per part, its highest score over the highest score of
    those other parts, at least 1. A fold's spreads are never below `FOLD_SPREAD` x the whole recording's, so that
    a tag that moved in one part only is not scaled by a near-zero spread in the others."""
    span = max(int(meta["window"]), context)
    whole = np.asarray(meta["inputs"]["spread"], dtype=np.float64)
    ratios = []
    try:
        for k in range(FOLDS):
            cuts = [(k * len(g) // FOLDS, (k + 1) * len(g) // FOLDS) for g in grids]
            rest = [piece for g, (a, b) in zip(grids, cuts, strict=True) for piece in (g[:a], g[b:])
                    if len(piece) > span]
            if not rest:
                continue
            center, spread = _scales(rest, drift, baseline_s, interval)
            spread = np.maximum(spread, FOLD_SPREAD * whole)
            stats = _fit_stats(rest, center, spread, drift, baseline_s, interval, context)
            fold = {**meta, "inputs": {**meta["inputs"], "center": _floats(center), "spread": _floats(spread)},
                    "stats": stats, "threshold": 1e12}
            path.write_text(json.dumps(fold))
            stats["norms"], stats["level_scale"] = _norms(Model(tflite, path, calibrating=True), rest, [span - 1] * len(rest))
            path.write_text(json.dumps(fold))
            model = Model(tflite, path, calibrating=True)
            seen = np.concatenate([_scores(model, piece, span - 1) for piece in rest])
            # The scorer warms up on the rows before the part (a context, and five drift baselines' time).
            warm = [max(0, a - span - int(5 * baseline_s / interval)) for a, _ in cuts]
            unseen = np.concatenate([_scores(model, g[lo:b], max(a - lo, span - 1))
                                     for g, (a, b), lo in zip(grids, cuts, warm, strict=True)])
            if len(seen) and len(unseen):
                ratios.append(max(1.0, float(unseen.max()) / max(float(seen.max()), 1e-12)))
    finally:
        path.unlink(missing_ok=True)
    return ratios


def _fit_stats(grids: list[np.ndarray], center: np.ndarray, spread: np.ndarray, drift: Sequence[bool],
               baseline_s: float, interval: float, context: int) -> dict[str, Any]:
    """The projection off the principal subspace (90 % of the variance of the level tags' inputs), and each tag's
    normal |one-step change|."""
    inputs = [Inputs(center, spread, drift, baseline_s, interval).run(g) for g in grids]
    rows = np.concatenate([z[~np.isnan(z).any(axis=1)] for z in inputs])
    tags = rows.shape[1]
    # The subspace of the level tags alone when there are both kinds: a drift tag's deviation (its baseline held
    # in an event) must not spill into the level tags' SPE, where its cap would not hold.
    # Nor a coarse tag's: its few steps would be the smallest variance, off the subspace alone.
    level = ~np.asarray(drift, dtype=bool)
    held, step = _resolution(grids)
    fine = held < COARSE_SHARE
    among = next((np.nonzero(pick)[0] for pick in (level & fine, fine) if pick.any()), np.arange(tags))
    cov = np.atleast_2d(np.cov(rows[:, among].T))
    values, vectors = np.linalg.eigh(cov)
    order = np.argsort(values)[::-1]
    values, vectors = values[order], vectors[:, order]
    share = np.cumsum(values) / max(float(values.sum()), 1e-12)
    q = int(min(len(among), np.searchsorted(share, 0.9) + 1))
    basis = vectors[:, :q]
    off = np.zeros((tags, tags))
    off[np.ix_(among, among)] = np.eye(len(among)) - basis @ basis.T
    steps = np.concatenate([np.abs(np.diff(z, axis=0)) for z in inputs])
    residual = np.maximum(np.nanmean(steps, axis=0), 1e-3)
    # A coarse tag's rare steps are its resolution, not noise: it is noisier only when it moves a step every sample.
    residual = np.where(fine, residual, np.maximum(residual, step / spread))
    return {"context": context, "off_subspace": [_floats(r) for r in off], "components": _floats(values[:q]),
            "residual_scale": _floats(residual), "norms": dict.fromkeys(COMPONENTS, 1.0), "weights": dict(WEIGHTS),
            "level": LEVEL}


def extreme_threshold(scores: Sequence[np.ndarray], block: int, interval: float, rate: float) -> dict[str, float]:
    """The score exceeded by the maximum of a block of `block` windows with probability `rate` x block time: a
    Gumbel fit (by moments) to the block maxima of each recording's scores; never below the highest score."""
    maxima = np.array([s[i:i + block].max() for s in scores for i in range(0, len(s) - block + 1, block)])
    if len(maxima) < 3:
        raise DataError(f"too little normal running to set a threshold: {len(maxima)} blocks of {block} samples, "
                        f"at least 3 are needed")
    beta = max(float(maxima.std()) * math.sqrt(6) / math.pi, 1e-6 * float(maxima.mean()))
    mu = float(maxima.mean()) - 0.5772 * beta
    p = min(0.5, rate * block * interval)
    quantile = mu - beta * math.log(-math.log1p(-p))
    highest = float(max(s.max() for s in scores if len(s)))
    return {"threshold": max(quantile, highest), "quantile": quantile, "highest": highest, "mu": mu, "beta": beta,
            "p_block": p, "blocks": float(len(maxima))}


_YEAR = 365 * 86400.0
UNITS = {**dict.fromkeys(("s", "sec", "secs", "second", "seconds"), 1.0),
         **dict.fromkeys(("m", "min", "mins", "minute", "minutes"), 60.0),
         **dict.fromkeys(("h", "hr", "hrs", "hour", "hours"), 3600.0),
         **dict.fromkeys(("d", "day", "days"), 86400.0), **dict.fromkeys(("w", "wk", "wks", "week", "weeks"), WEEK),
         **dict.fromkeys(("month", "months"), 30 * 86400.0), **dict.fromkeys(("y", "yr", "yrs", "year", "years"), _YEAR)}
# Rates a model can be asked for: one false event a second is every window, and one in a thousand years no
# recording could vouch for (below it the threshold's arithmetic underflows).
RATE_RANGE = (1 / (1000 * _YEAR), 1.0)


def parse_rate(text: str) -> float:
    """'1/week', '2 / days', '0.5/h', '1,5/day' → events per second; ValueError otherwise (an unknown unit, a count
    that is not a number above 0, a rate outside RATE_RANGE)."""
    count, _, unit = text.replace(" ", "").partition("/")
    if "," in count and "." not in count:
        count = count.replace(",", ".")  # a decimal comma
    seconds = UNITS.get(unit.lower())
    try:
        value = float(count)
    except ValueError:
        raise ValueError(text) from None
    if seconds is None or not math.isfinite(value) or value <= 0:
        raise ValueError(text)
    rate = value / seconds
    if not RATE_RANGE[0] <= rate <= RATE_RANGE[1]:
        raise ValueError(text)
    return rate


def rate_text(per_second: float) -> str:
    """Events per second in the largest unit that keeps the count at 1 or more, e.g. '1/week'."""
    for unit, seconds in (("min", 60.0), ("h", 3600.0), ("day", 86400.0), ("week", WEEK), ("year", _YEAR)):
        if per_second * seconds >= 0.999:
            return f"{per_second * seconds:.3g}/{unit}"
    return f"{per_second * _YEAR:.3g}/year"


def _floats(values: np.ndarray) -> list[float]:
    return [float(f"{v:.8g}") for v in values]

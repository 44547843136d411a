"""Anomaly scoring: four statistics of the same inputs, fused, and a sequential event rule.

The model is a `.tflite` file and its metadata `.json` (format 3: tags in order, window, stride,
context, the input transform, each statistic's normal level, threshold, event rule, forward-fill
limit, the file's sha256). Each sample is turned into inputs one tag at a time, causally (`Inputs`):

- a *level* tag is centred and scaled by its commissioning median and spread: a level never seen
  in commissioning is evidence, never adapted away;
- a *drift* tag (one that trends in normal running: a temperature heating up) is fed as its
  deviation from a slow moving baseline. The baseline stands still while the device is in an
  event, so a sustained change stays visible for as long as it lasts.

Every `stride` samples, per tag, over the last `context` inputs (`Stats`):

- *level*: the |mean input| (a sustained shift: averaged first, a shift of a fraction of a noisy tag's
  spread shows; a model trained before stats.level existed keeps the mean |input|);
- *SPE* (Q statistic): how far the window's mean input lies outside the principal subspace of
  commissioning (tags that moved together now move apart: a broken correlation, not a new
  operating point along the old one), as √SPE split over the tags;
- *forecast residual*: the mean |one-step change| against its normal level (a noisier tag);
- *autoencoder*: the int8 TFLite model's reconstruction error over the last `window` inputs,
  divided by each tag's normal error.

Each statistic is divided by its own normal level (its 99th percentile over commissioning) and
weighted; a tag's contribution is the sum, the score the sum over tags (the drift tags' contributions
together are capped: drifting tags cannot raise an alarm alone). An event starts when the cumulative sum
of (score / threshold - 1), floored at 0, reaches `h` (CUSUM: one big window or several modest
ones), and ends when that sum has stayed at 0 for `end_after` windows, so one disturbance is one
event. It also ends when the score has *subsided*: stayed below `subside` x the event's level (the
highest its smoothed score reached) for `end_after` windows. A machine often does not come straight
back to where it was commissioned after a fault (a bearing cools for minutes, a rig settles at
another point); that rest would otherwise hold the event open for as long as it lasts. The threshold
is then held at the level the event subsided to, and comes down as the machine settles (to `settle`
x its smoothed score, never below the model's threshold): what remains of the disturbance raises no
new event, a new one on top of it does. A missing value is forward-filled up to `ffill_limit` samples;
a longer gap leaves windows unscored (said as such, never taken as normal) until the gap has left the
context.

The runtime is `ai_edge_litert` (LiteRT), else `tflite_runtime` (the same Interpreter API).
TensorFlow is never imported here.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import sys
import threading
import time
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np

from gateway.errors import ModelError
from gateway.units import duration_text, finite, instant

FORMAT = 3
REQUIRED = ("format", "tags", "window", "stride", "interval_s", "inputs", "error_scale", "stats", "threshold",
            "sha256")
MODEL_DIRS = (Path(__file__).resolve().parents[2] / "models", Path("/opt/edge-gateway/models"))
DRIFT_CAP = 0.5  # the drift tags together contribute at most this share of the threshold: they cannot raise an
# alarm alone
COMPONENTS = ("level", "spe", "residual", "autoencoder")
INTERVAL_RANGE = (1e-3, 1e7)  # seconds between samples a model may be trained on: 1 ms to 115 days
SCALE_LIMIT = 1e200  # the largest centre or spread of a tag: its inverse and its products stay finite
LEVEL = "abs_mean"  # the level statistic: |mean input| over the context (stats.level)
LEVEL_BEFORE = "mean_abs"  # a model trained before stats.level: the mean |input|, which its norms are of
MAX_CONTEXT = 10_000  # samples the statistics look back over: the scorer keeps them, per device
# Normal running that shows a machine's slow changes (the day's temperature, the temperatures and pressures that follow
# it): below the noise within minutes, beyond a short recording's range within the hour. On the simulated pump at one
# operating point, the hour after 7 min of commissioning raised 1.8 false events/h (54 % of its rows flagged; 1.7/h and
# 14 % with the temperatures named as drift tags), after 30 min 1.0/h, after 2 h none (bench/anomaly_eval.py --after).
SLOW_EVIDENCE_S = 7200.0


class Inputs:
    """Raw tag values → model inputs, one sample at a time; the same code serves training and scoring."""

    def __init__(self, center: Sequence[float] | np.ndarray, spread: Sequence[float] | np.ndarray,
                 drift: Sequence[bool], baseline_s: float,
                 interval: float) -> None:
        self.center = np.asarray(center, dtype=np.float64)
        self.inv_spread = 1.0 / np.asarray(spread, dtype=np.float64)
        self.drift = np.asarray(drift, dtype=bool)
        self.alpha = 1.0 - math.exp(-interval / baseline_s) if baseline_s > 0 else 1.0
        self.baseline = np.full(len(self.center), np.nan)

    @classmethod
    def from_meta(cls, inputs: Mapping[str, Any], interval: float) -> Inputs:
        return cls(inputs["center"], inputs["spread"], inputs["drift"], float(inputs["baseline_s"]), interval)

    def push(self, row: np.ndarray, follow: bool = True) -> np.ndarray:
        """One row of raw values (NaN where missing) → its inputs (NaN where missing); `follow=False` (in an
        event) holds the drift baselines where they are."""
        start = np.isnan(self.baseline) & ~np.isnan(row)
        self.baseline[start] = row[start]
        level = np.where(self.drift, row - self.baseline, row - self.center) * self.inv_spread
        if follow:
            seen = ~np.isnan(row)
            self.baseline[seen] += self.alpha * (row[seen] - self.baseline[seen])
        return cast(np.ndarray, level)

    def run(self, rows: np.ndarray) -> np.ndarray:
        """A whole recording (n, tags) → its inputs, exactly as `push` would give them one by one."""
        return np.stack([self.push(r) for r in rows.astype(np.float64)]) if len(rows) else np.empty((0, len(self.center)))


def interpreter_class() -> Any:
    try:  # LiteRT first: tflite-runtime 2.14 (its last release) needs numpy < 2 and ran 11x slower here
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        try:
            from tflite_runtime.interpreter import Interpreter
        except ImportError:
            raise ModelError("no TFLite runtime installed: pip install 'edge-gateway[anomaly]' "
                             "(ai-edge-litert or tflite-runtime)") from None
    return Interpreter


def _interpreter(data: bytes) -> Any:
    """One thread, the builtin kernels without the default XNNPACK delegate: its packed weights and
    caches cost 0.7 MiB per process, more than the 3 µs per window it saves on a model this small."""
    cls = interpreter_class()
    resolver = getattr(sys.modules[cls.__module__], "OpResolverType", None)
    if resolver is None:  # a runtime without the option
        return cls(model_content=data, num_threads=1)
    return cls(model_content=data, num_threads=1,
               experimental_op_resolver_type=resolver.BUILTIN_WITHOUT_DEFAULT_DELEGATES)


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """Silence fd 2 while the runtime is created, when no other thread could be writing there."""
    if threading.active_count() > 1:
        yield
        return
    saved = os.dup(2)
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def model_dir(configured: str | None = None) -> Path:
    if configured:
        return Path(configured)
    for candidate in MODEL_DIRS:
        if candidate.is_dir():
            return candidate
    return MODEL_DIRS[-1]


class Model:
    """A loaded model; shared by every device that names it (one interpreter, invoked in turn)."""

    def __init__(self, tflite_path: str | Path, meta_path: str | Path, *, verify_hash: bool = True,
                 calibrating: bool = False) -> None:
        """`calibrating`: training's own part-written model, whose threshold is a placeholder no score reaches."""
        tflite_path, meta_path = Path(tflite_path), Path(meta_path)
        self.path = tflite_path
        data = _read(tflite_path)
        if len(data) < 8 or data[4:8] != b"TFL3":
            raise ModelError(f"{tflite_path} is not a TFLite model (no TFL3 identifier)")
        try:
            meta = json.loads(_read(meta_path, "its metadata "))
        except (ValueError, RecursionError) as err:  # RecursionError: arrays nested thousands deep
            raise ModelError(f"its metadata {meta_path} is not valid JSON: {str(err) or type(err).__name__}") from None
        try:  # a "\ud800" escape is valid JSON, and no text: `model show` and `list` failed printing it
            json.dumps(meta, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise ModelError(f"its metadata {meta_path} holds text that is not UTF-8 (an escaped lone surrogate such "
                             f"as \\ud800): not what training writes") from None
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            found = meta.get("format", 1) if isinstance(meta, dict) else type(meta).__name__
            raise ModelError(f"its metadata {meta_path} is format {found}, this gateway reads format {FORMAT}: "
                             f"train it again with `edge-gateway model train`")
        missing = [k for k in REQUIRED if k not in meta]
        if missing:
            raise ModelError(f"its metadata {meta_path} lacks {', '.join(missing)}")
        digest = hashlib.sha256(data).hexdigest()
        if verify_hash and digest != meta["sha256"]:
            raise ModelError(f"{tflite_path.name} does not match its metadata: sha256 {digest[:16]}..., "
                             f"metadata says {str(meta['sha256'])[:16]}... (a model swapped without its .json?)")
        self.meta = meta
        self.identity = digest  # what a saved event state was scored by (`DeviceScorer.resume`)
        try:
            name = meta.get("name")  # printed to a terminal: no control characters, no megabyte
            self.name = name if isinstance(name, str) and name.isprintable() and 0 < len(name) <= 100 \
                else tflite_path.stem
            tags = meta["tags"]
            if not isinstance(tags, list) or not tags or not all(isinstance(t, str) and t for t in tags) \
                    or len(set(tags)) != len(tags):  # ("abc" was read as the tags a, b and c)
                raise ValueError("tags needs to be a list of different names")
            self.tags: list[str] = tags
            self.window, self.stride = _whole(meta, "window", 1, 10_000), _whole(meta, "stride", 1, 10_000)
            self.interval = float(meta["interval_s"])
            self.threshold = float(meta["threshold"])
            inputs = meta["inputs"]
            n = len(self.tags)
            columns = (inputs["center"], inputs["spread"], inputs["drift"], meta["error_scale"])
            if any(np.shape(c) != (n,) for c in columns):  # one flat entry each: [[1], [2]] is two lists
                raise ValueError(f"inputs.center, inputs.spread, inputs.drift and error_scale need one entry per tag "
                                 f"({n} tags)")
            if "level_scale" in meta["stats"] and np.shape(meta["stats"]["level_scale"]) != (n,):  # a 1 MB string
                raise ValueError(f"stats.level_scale needs one number per tag ({n} tags)")  # is not quoted below
            _check_numbers(inputs, meta["error_scale"], meta["stats"])  # spreads, scales and norms above 0, ...
            self.inputs = dict(inputs)
            Inputs.from_meta(inputs, self.interval)  # the transform can be built
            self.drift = np.asarray(inputs["drift"], dtype=bool)
            self.inv_error = (1.0 / np.asarray(meta["error_scale"], dtype=np.float64)).astype(np.float32)
            events, alarms = meta.get("events", {}), meta.get("false_alarms", {})
            if not isinstance(events, dict) or not isinstance(alarms, dict):
                raise ValueError("events and false_alarms need to be objects")
            self.false_alarm_rate = float(alarms.get("per_second", 0.0))  # per second of normal running, calibrated
            self.false_alarms_asked = str(alarms.get("asked", "?"))  # as the user said it: 1/week
            self.commissioned_s = float(alarms.get("recording_s", 0.0))  # normal running it was trained on
            self.cusum_h, self.cusum_cap = float(events.get("h", 1.0)), float(events.get("cap", 4.0))
            self.start_after = _whole(events, "start_after", 1, 10**6, 1, "events.")
            self.end_after = _whole(events, "end_after", 1, 10**6, 10, "events.")
            self.subside = float(events.get("subside", 0.0))  # 0: events end only back below the threshold
            self.settle = float(events.get("settle", 2.0))
            self.stats = Stats.from_meta(meta["stats"], n, self.threshold, self.drift)
            # (ffill_limit 1e18 made `model score` push 1e8 empty samples across a gap: a hang)
            self.ffill_limit = _whole(meta, "ffill_limit", 0, 1000, 5)
            self.top_n = _whole(meta, "top_tags", 1, n, min(3, n))
            self.flatline_tags = set(meta.get("flatline_tags", self.tags))
            self.flatline_after = _whole(meta, "flatline_after", 2, 10**7, self.window)  # samples of one exact value
            if self.stride > self.window:  # (a stride of 1e9 scored nothing, and said nothing)
                raise ValueError(f"stride needs to be at most the window ({self.window}), not {self.stride}")
            if not all(isinstance(t, str) for t in self.flatline_tags):
                raise ValueError("flatline_tags needs to be a list of tag names")
            if not THRESHOLD_RANGE[0] <= self.threshold <= (CALIBRATING if calibrating else THRESHOLD_RANGE[1]):
                # (1e308: never an event; 5e-324: always)
                raise ValueError(f"threshold needs to be from {THRESHOLD_RANGE[0]:g} to {THRESHOLD_RANGE[1]:g}, not "
                                 f"{self.threshold:g}")
            if not INTERVAL_RANGE[0] <= self.interval <= INTERVAL_RANGE[1] \
                    or not 0 < self.cusum_h <= self.cusum_cap < math.inf \
                    or not 0 <= self.subside < 1 or not 1 <= self.settle < math.inf \
                    or not 0 <= self.false_alarm_rate < math.inf or not 0 <= self.commissioned_s < math.inf:
                raise ValueError(f"interval_s needs to be from {INTERVAL_RANGE[0]:g} to {INTERVAL_RANGE[1]:g}, events.h "
                                 f"above 0 and events.cap h or more, events.subside from 0 to below 1, events.settle 1 "
                                 f"or more, false_alarms.per_second and false_alarms.recording_s 0 or more, all finite")
            self.context = self.stats.context
        except (KeyError, TypeError, ValueError, ArithmeticError) as err:  # ArithmeticError: an int of Infinity
            why = f"lacks {err}" if isinstance(err, KeyError) else str(err)
            if len(why) > 300:  # float() quotes the string it could not read, which may be a megabyte
                why = why[:300] + f"... ({len(why)} characters)"
            raise ModelError(f"its metadata {meta_path} is not usable: {why}") from None
        try:
            with _quiet_stderr():
                self.interpreter = _interpreter(data)
                self.interpreter.allocate_tensors()
        except ModelError:
            raise
        except Exception as err:  # the runtime's own error for a corrupt flatbuffer
            raise ModelError(f"{tflite_path} cannot be loaded by the TFLite runtime: {err}") from None
        inp, out = self.interpreter.get_input_details()[0], self.interpreter.get_output_details()[0]
        size = self.window * len(self.tags)
        shape_in, shape_out = [int(v) for v in inp["shape"]], [int(v) for v in out["shape"]]
        if shape_in != [1, size] or shape_out != [1, size]:
            raise ModelError(f"{tflite_path.name} takes {shape_in} and gives {shape_out}, "
                             f"but its metadata says window {self.window} x {len(self.tags)} tags = [1, {size}]")
        self._in, self._out = inp["index"], out["index"]
        self.int8 = inp["dtype"] == np.int8
        self.in_scale, self.in_zero = (float(inp["quantization"][0]), int(inp["quantization"][1]))
        self.out_scale, self.out_zero = (float(out["quantization"][0]), int(out["quantization"][1]))
        if self.int8 and (self.in_scale == 0 or self.out_scale == 0):
            raise ModelError(f"{tflite_path.name} is int8 but has no quantization parameters")
        self.size = len(data)
        # (window*tags, tags): sums each tag's errors over the window, / window, / the tag's normal error.
        self._weights = np.tile(np.diag(self.inv_error / self.window), (self.window, 1)).astype(np.float32)
        self._qbuf = np.empty((1, size), dtype=np.int8 if self.int8 else np.float32)

    @property
    def commissioned_short(self) -> bool:
        """Trained on less normal running than shows the machine's slow changes (`SLOW_EVIDENCE_S`); a model that
        does not say how long (trained before it was recorded) is not taken as short."""
        return 0 < self.commissioned_s < SLOW_EVIDENCE_S

    def short_note(self) -> str | None:
        """What `model show`, health and the journal say of a model commissioned short; None for any other."""
        if not self.commissioned_short:
            return None
        return (f"commissioned on {duration_text(self.commissioned_s)} of normal running: too short to show the "
                f"machine's slow changes, which raise events within the hour")

    def new_inputs(self) -> Inputs:
        return Inputs.from_meta(self.inputs, self.interval)

    def tag_errors(self, flat: np.ndarray) -> np.ndarray:
        """One window of inputs (window*tags floats) → each tag's normalised error (about 1 in normal running)."""
        diff = self.reconstruct(flat)
        np.subtract(diff, flat, out=diff)
        np.abs(diff, out=diff)
        return diff @ self._weights  # mean over the window and division by the normal error, in one product

    def reconstruct(self, flat: np.ndarray) -> np.ndarray:
        """One scaled window (window*tags floats) → its reconstruction, in scaled units."""
        if self.int8:  # quantize with the model's own input scale and zero point (in place: µs count here)
            q = np.multiply(flat, 1.0 / self.in_scale, dtype=np.float32)
            np.add(q, self.in_zero, out=q)
            np.rint(q, out=q)
            np.clip(q, -128, 127, out=q)
            self._qbuf[0] = q
            self.interpreter.set_tensor(self._in, self._qbuf)
            self.interpreter.invoke()
            out = self.interpreter.get_tensor(self._out)[0].astype(np.float32)
            out -= self.out_zero
            out *= self.out_scale
            return cast(np.ndarray, out)
        self._qbuf[0] = flat
        self.interpreter.set_tensor(self._in, self._qbuf)
        self.interpreter.invoke()
        return cast(np.ndarray, self.interpreter.get_tensor(self._out)[0])


class Stats:
    """The statistics over the last `context` inputs, per tag, and their fusion into contributions."""

    def __init__(self, context: int, off_subspace: np.ndarray, residual_scale: np.ndarray, norms: Sequence[float],
                 weights: Sequence[float], drift: np.ndarray, drift_cap: float, level: str = LEVEL,
                 level_scale: np.ndarray | None = None) -> None:
        self.context = context
        self.level = level
        self.mean_first = level == LEVEL  # else LEVEL_BEFORE (a per-window test of a bool, not of a string)
        # Sums over the context, not means: the 1/n is folded into these constants (µs count per window).
        self.off_n = (off_subspace / context).astype(np.float32)  # (tags, tags): I - P P^T, P the principal components
        # Each tag's level over its own normal level (a slow or heating tag's is higher than a noisy one's, so it
        # cannot set everyone's norm), their root sum of squares split over the tags; a model trained before
        # stats.level_scale has none: the levels summed as they are.
        self.per_tag = level_scale is not None
        scale = np.ones(len(residual_scale)) if level_scale is None else np.asarray(level_scale, dtype=np.float64)
        self.inv_level = (1.0 / (scale * context)).astype(np.float32)
        self.inv_residual = (1.0 / (residual_scale * (context - 1))).astype(np.float32)
        self.scale = (np.asarray(weights, dtype=np.float64) / np.asarray(norms, dtype=np.float64)).astype(np.float32)
        self.drift = drift.astype(np.float32) if drift.any() else None
        self.drift_cap = drift_cap  # the most the drift tags together may contribute

    @classmethod
    def from_meta(cls, stats: Mapping[str, Any], tags: int, threshold: float, drift: np.ndarray) -> Stats:
        context = int(stats["context"])
        off = np.asarray(stats["off_subspace"], dtype=np.float64)
        residual = np.asarray(stats["residual_scale"], dtype=np.float64)
        norms = [float(stats["norms"][c]) for c in COMPONENTS]
        weights = [float(stats["weights"][c]) for c in COMPONENTS]
        if not 2 <= context <= MAX_CONTEXT or off.shape != (tags, tags) or residual.shape != (tags,):
            raise ValueError(f"stats need a context from 2 to {MAX_CONTEXT}, a {tags} x {tags} off_subspace and one "
                             f"residual_scale per tag")  # their values: `_check_numbers`, before
        level = stats.get("level", LEVEL_BEFORE)
        if level not in (LEVEL, LEVEL_BEFORE):
            raise ValueError(f"stats.level needs {LEVEL!r} or {LEVEL_BEFORE!r}, not {str(level)[:40]!r}")
        return cls(context, off, residual, norms, weights, drift, DRIFT_CAP * threshold, level,
                   stats.get("level_scale"))  # its shape: `Model`, before its numbers are read

    def components(self, z: np.ndarray, dz: np.ndarray, ae: np.ndarray, parts: np.ndarray) -> np.ndarray:
        """`parts` (4, tags) filled with each statistic's per-tag part, in its own units (`COMPONENTS` order)."""
        total = z.sum(axis=0)
        level = total if self.mean_first else np.abs(z).sum(axis=0)  # level: |mean input| (before: mean |input|)
        np.multiply(level, self.inv_level, out=parts[0])  # over the context, and over the tag's own normal level
        if self.per_tag:  # shares of their root sum of squares, as SPE's: one tag's shift not diluted by the others
            squares = float(parts[0] @ parts[0])  # a dot product: a third of what .sum() costs on a few tags
            np.square(parts[0], out=parts[0])
            parts[0] *= 1.0 / max(squares, 1e-12) ** 0.5
        else:
            np.abs(parts[0], out=parts[0])
        residual = self.off_n @ total  # the window's mean, off the principal subspace
        np.square(residual, out=parts[1])
        parts[1] *= 1.0 / max(float(residual @ residual), 1e-12) ** 0.5  # shares of √SPE: linear in a shift
        np.multiply(dz.sum(axis=0), self.inv_residual, out=parts[2])  # mean |one-step change| / its normal level
        parts[2] -= 1.0
        np.maximum(parts[2], 0.0, out=parts[2])
        parts[3] = ae
        return parts

    def contributions(self, parts: np.ndarray) -> np.ndarray:
        """Each tag's share of the score: the weighted sum of its normalised statistics; the drift tags' together
        scaled down to at most `drift_cap`."""
        out = self.scale @ parts
        if self.drift is not None:
            total = float(out @ self.drift)
            if total > self.drift_cap:
                out *= 1.0 - self.drift * (1.0 - self.drift_cap / total)
        return cast(np.ndarray, out)


THRESHOLD_RANGE = (1e-6, 1e6)  # a score is about 2 in normal running: training writes thresholds far inside this
CALIBRATING = 1e12  # the threshold of training's part-written model: no event while it calibrates


def _whole(meta: Mapping[str, Any], key: str, low: int, high: int, default: int | None = None, where: str = "") -> int:
    """A whole number of the metadata, from `low` to `high` (10.7 and "10" are not: training writes integers)."""
    value = meta[key] if default is None else meta.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        shown = json.dumps(value)[:40] if isinstance(value, (int, float, str, bool)) else type(value).__name__
        raise ValueError(f"{where}{key} needs to be a whole number from {low} to {high}, not {shown}")
    return value


def _check_numbers(inputs: Mapping[str, Any], error_scale: Sequence[float], stats: Mapping[str, Any]) -> None:
    """The metadata's numbers are finite and in ranges where no scale factor overflows float32 (what training
    writes is far inside them): hand-edited or damaged metadata fails here, with the field named."""
    checks = (("inputs.center", inputs["center"], -SCALE_LIMIT, SCALE_LIMIT),
              ("inputs.spread", inputs["spread"], 1e-12, SCALE_LIMIT),
              ("inputs.baseline_s", [inputs["baseline_s"]], 0.0, 1e9), ("error_scale", error_scale, 1e-12, 1e15),
              ("stats.off_subspace", stats["off_subspace"], -1.001, 1.001),  # I - P P^T: entries within +-1
              ("stats.residual_scale", stats["residual_scale"], 1e-12, 1e15),
              ("stats.norms", [stats["norms"][c] for c in COMPONENTS], 1e-9, 1e15),
              ("stats.level_scale", stats.get("level_scale", []), 1e-9, 1e15),
              ("stats.weights", [stats["weights"][c] for c in COMPONENTS], 0.0, 1e3))
    for name, values, low, high in checks:
        a = np.asarray(values, dtype=np.float64)
        if not np.all((a >= low) & (a <= high)):  # NaN fails every comparison
            raise ValueError(f"{name} needs numbers from {low:g} to {high:g}")
    if not any(float(stats["weights"][c]) > 0 for c in COMPONENTS):  # (a score of 0 whatever the machine does)
        raise ValueError("stats.weights needs one above 0")


_loaded: dict[Path, tuple[tuple[tuple[int, int], ...], Model]] = {}


MAX_FILE = 64 << 20  # a model's file larger than this is no model of ours (they are KiB): not read into memory


def _read(path: Path, what: str = "") -> bytes:
    """A model's file, which must be a regular file of at most MAX_FILE bytes: a FIFO froze the daemon's loop at
    a reload, and a link to /dev/zero took 2.8 GB in 4 s."""
    try:
        if not path.is_file():
            raise ModelError(f"{what}{path} is not a regular file" if path.exists() else
                             f"cannot read {what}{path}: No such file or directory")
        if path.stat().st_size > MAX_FILE:
            raise ModelError(f"{what}{path} is larger than {MAX_FILE >> 20} MiB: not a model")
        with path.open("rb") as f:
            return f.read(MAX_FILE + 1)[:MAX_FILE]
    except OSError as err:
        raise ModelError(f"cannot read {what}{path}: {err.strerror}") from None


def load(name: str, directory: Path) -> Model:
    """A model by name, loaded once per version of its files: config validation, start-up and a
    reload that left the files alone all get the same interpreter; a changed file is read anew."""
    paths = (directory / f"{name}.tflite", directory / f"{name}.json")
    try:
        stamp = tuple((p.stat().st_mtime_ns, p.stat().st_size) for p in paths)
    except OSError:
        return Model(*paths)  # raises ModelError naming the missing file
    cached = _loaded.get(paths[0])
    if cached is None or cached[0] != stamp:
        cached = _loaded[paths[0]] = (stamp, Model(*paths))
    return cached[1]


def check_device(model: Model, device_tags: Sequence[str], interval: float) -> list[str]:
    """Why this model cannot score this device; [] when it can."""
    problems = []
    missing = [t for t in model.tags if t not in device_tags]
    if missing:
        problems.append(f"model {model.name} needs tags {', '.join(missing)}, which the device does not have "
                        f"(it has {', '.join(device_tags)})")
    if not math.isclose(interval, model.interval, rel_tol=0.02):
        problems.append(f"model {model.name} was trained on one sample every {model.interval:g}s, but the device "
                        f"gives one every {interval:g}s (its window would span {model.window * interval:g}s, "
                        f"not {model.window * model.interval:g}s)")
    return problems


@dataclass
class Event:
    kind: str  # start | end
    score: float
    top: list[dict[str, Any]]
    threshold: float  # in effect: the model's, or held higher after an event that subsided
    started: float | None = None
    peak: float | None = None
    subsided: bool = False  # an end: the score fell well below the event's level, not yet below the threshold


@dataclass
class ScoreState:
    score: float | None = None  # the last window's score; None before the first window or across a gap
    threshold: float = math.inf  # in effect now: the model's, or held higher while the machine settles after an event
    scored: int = 0
    unscored: int = 0  # windows due but not scored (gap longer than the forward-fill limit)
    active: bool = False  # an anomaly event is open
    why_unscored: str | None = None
    latency_us: list[float] = field(default_factory=list)  # since the health loop last took them
    recent_us: deque[float] = field(default_factory=lambda: deque(maxlen=RECENT_LATENCIES))  # the newest, for readers
    timed: int = 0  # windows timed since the start: a reader of `recent_us` knows how many are new


RECENT_LATENCIES = 256
INPUT_LIMIT = 1e4  # spreads
RAW_LIMIT = 1e250  # a reading beyond is held there: with a spread of 1e-12 or more (`_check_numbers`), no overflow
LEVEL_ALPHA = 0.1  # per window: an event's level follows its score over about 10 windows
SETTLE_ALPHA = 0.05  # per window: a held threshold follows the settling score over about 20 windows


class DeviceScorer:
    """One device's input transform, ring buffers, forward fill, scoring schedule and event rule."""

    def __init__(self, model: Model) -> None:
        self.model = model
        t = len(model.tags)
        self.inputs = model.new_inputs()
        self.span = max(model.window, model.context)  # samples a window needs
        self.buf = np.zeros((self.span, t), dtype=np.float32)  # the last inputs; the autoencoder sees the newest
        self.dbuf = np.zeros((self.span, t), dtype=np.float32)  # |one-step change| of each input
        self.filled = 0  # samples in the buffer since the last unfillable gap
        self.last = np.full(t, np.nan, dtype=np.float64)
        self.missing_run = np.zeros(t, dtype=np.int64)
        self.same_run = np.zeros(t, dtype=np.int64)  # samples in a row that repeat the last raw value exactly
        self._raw = np.full(t, np.nan, dtype=np.float64)
        self.since_score = 0
        self.cusum = 0.0  # sum of (score / threshold - 1), floored at 0
        self.quiet = 0  # windows in a row with the sum at 0, in an event
        self.low = 0  # windows in a row below `subside` x the event's level, in an event
        self.level = 0.0  # the score smoothed: in an event, for its level; after one, for settling
        self.event_level = 0.0  # the highest `level` reached in this event
        self.state = ScoreState(threshold=model.threshold)
        self.errors: np.ndarray | None = None  # the last scored window's contribution per tag
        self.parts: np.ndarray | None = None  # and its statistics (`COMPONENTS` x tags), before fusion
        self._parts = np.empty((len(COMPONENTS), t), dtype=np.float32)
        self._event_start: float | None = None
        self._peak = 0.0

    def push(self, ts: float, values: Mapping[str, float | None]) -> Event | None:
        """Add one sample; return an anomaly event when one starts or ends."""
        m = self.model
        row = np.array([_number(values.get(tag)) for tag in m.tags], dtype=np.float64)
        np.clip(row, -RAW_LIMIT, RAW_LIMIT, out=row)  # (1e308 - center) / spread would overflow: a warning per reading
        bad = ~np.isfinite(row)
        self.missing_run = np.where(bad, self.missing_run + 1, 0)
        self.same_run = np.where(bad, self.same_run, np.where(row == self._raw, self.same_run + 1, 0))
        self._raw = np.where(bad, self._raw, row)
        row = np.where(bad & (self.missing_run <= m.ffill_limit), self.last, row)  # forward fill, within the limit
        row[~np.isfinite(row)] = np.nan
        self.last = row
        previous = self.buf[-1].copy()
        self.buf[:-1] = self.buf[1:]  # shift in place: no new array per sample
        self.dbuf[:-1] = self.dbuf[1:]
        # An input beyond INPUT_LIMIT spreads is held there: far past any threshold, and its statistics stay finite
        # (a reading of 1e30 would overflow them into a NaN score, which no event rule can compare).
        self.buf[-1] = np.clip(self.inputs.push(row, follow=not self.state.active), -INPUT_LIMIT, INPUT_LIMIT)
        gap = np.isnan(row)
        if gap.any():
            self.filled = 0  # this window and the next `span` ones contain a real gap
            self.buf[-1][gap] = 0.0
            names = ", ".join(t for t, g in zip(m.tags, gap, strict=True) if g)
            self.state.why_unscored = f"no value for {names} beyond the forward-fill limit"
        else:
            self.filled = min(self.filled + 1, self.span)
        self.dbuf[-1] = np.abs(self.buf[-1] - previous) if self.filled > 1 else 0.0
        self.since_score += 1
        if self.since_score < m.stride:
            return None
        self.since_score = 0
        if self.filled < self.span:
            self.state.score = None
            self.errors = self.parts = None
            self.state.unscored += 1
            if self.state.why_unscored is None:
                self.state.why_unscored = f"warming up: fewer samples than one context ({self.span})"
            return None
        self.state.why_unscored = None
        start = time.perf_counter()
        ae = m.tag_errors(self.buf[-m.window:].reshape(-1))
        self.parts = m.stats.components(self.buf[-m.context:], self.dbuf[-m.context + 1:], ae, self._parts)
        err = m.stats.contributions(self.parts)
        took = (time.perf_counter() - start) * 1e6
        self.state.latency_us.append(took)
        self.state.recent_us.append(took)
        self.state.timed += 1
        score = float(err.sum())
        self.errors = err
        self.state.score = score
        self.state.scored += 1
        # A live sensor never repeats its value exactly for a whole window: a stuck one does. Its
        # statistics are small (no noise at all), so they alone cannot see it.
        flatlined = [int(i) for i in np.nonzero(self.same_run >= m.flatline_after - 1)[0]
                     if m.tags[i] in m.flatline_tags]
        return self._cusum(ts, score, err, flatlined)

    def top_tags(self, err: np.ndarray, flat: Sequence[int] = ()) -> list[dict[str, Any]]:
        total = float(err.sum()) or 1.0
        order = list(flat) + [int(i) for i in np.argsort(err)[::-1] if i not in flat]
        return [{"tag": self.model.tags[i], "share": round(float(err[i]) / total, 3),
                 **({"flatline": True} if i in flat else {})} for i in order[: self.model.top_n]]

    def _cusum(self, ts: float, score: float, err: np.ndarray, flat: Sequence[int] = ()) -> Event | None:
        """CUSUM on the score against the threshold: a big excess starts an event at once, a modest one after
        a few windows; an event ends when the sum has stayed at 0 for `end_after` windows, or when the score
        has subsided (then the threshold is held until the machine settles)."""
        m, st = self.model, self.state
        if st.active:  # against the model's threshold: the event lasts until the score is back below it
            self._peak = max(self._peak, score)
            self.level += LEVEL_ALPHA * (score - self.level)
            self.event_level = max(self.event_level, self.level)
            excess = max(score / m.threshold - 1.0, m.cusum_h if flat else -math.inf)  # a stuck sensor holds it
            self.cusum = min(m.cusum_cap, max(0.0, self.cusum + excess))
            self.quiet = self.quiet + 1 if self.cusum == 0.0 else 0
            self.low = self.low + 1 if score < m.subside * self.event_level and not flat else 0
            if self.quiet < m.end_after and self.low < m.end_after:
                return None
            subsided = self.quiet < m.end_after
            st.active, self.cusum, self.low, self.level = False, 0.0, 0, score
            st.threshold = max(m.threshold, m.subside * self.event_level) if subsided else m.threshold
            return Event("end", score, self.top_tags(err), st.threshold, started=self._event_start, peak=self._peak,
                         subsided=subsided)
        if st.threshold > m.threshold:  # held after an event that subsided: down as the machine settles
            self.level += SETTLE_ALPHA * (score - self.level)
            st.threshold = max(m.threshold, min(st.threshold, m.settle * self.level))
        excess = max(score / st.threshold - 1.0, m.cusum_h if flat else -math.inf)
        self.cusum = min(m.cusum_cap, max(0.0, self.cusum + excess))
        if self.cusum >= m.cusum_h:
            st.active, self._event_start, self._peak, self.quiet, self.low = True, ts, score, 0, 0
            self.level = self.event_level = score
            return Event("start", score, self.top_tags(err, flat), st.threshold)
        return None

    @property
    def settling(self) -> bool:
        """An event is open, or the threshold is still held after one: state a restart must not forget."""
        return self.state.active or self.state.threshold > self.model.threshold

    @property
    def outside(self) -> bool:
        """The machine runs where its model does not call normal: an event is open, or the threshold is held after one
        while the score (smoothed) is still above the model's threshold. Not while it settles below it, however
        slowly the held threshold comes down."""
        return self.state.active or (self.settling and self.level >= self.model.threshold)

    @property
    def event_started(self) -> float | None:
        """When the event open now, or the one the held threshold follows, started; None when not `settling`."""
        return self._event_start if self.settling else None

    def event_state(self) -> dict[str, Any]:
        """What a restart must not forget, as JSON: an open event (when it started, its peak, level and sum, and
        the drift baselines it holds still), or the threshold held after one and the level it settles on."""
        st = self.state
        return {"model": self.model.identity, "name": self.model.name, "active": st.active, "started": self._event_start,
                "peak": self._peak, "level": self.level, "event_level": self.event_level, "cusum": self.cusum,
                "threshold": st.threshold,
                **({"baseline": _listed(self.inputs.baseline), "raw": _listed(self._raw),
                    "same_run": [int(n) for n in self.same_run]} if st.active else {})}

    def resume(self, record: Mapping[str, Any]) -> str | None:
        """Take up `event_state()` after a restart: an open event stays open (no second start; its end says when it
        started) and a held threshold stays held. Saved with another model, only the open event carries over: the
        new model decides when it ends. Anything else in `record` is ignored. Returns what is damaged in a record
        the scorer never writes (a file edited by hand: `active: "yes"`), which it cannot take up; else None."""
        m, st = self.model, self.state
        active = record.get("active", False)
        if not isinstance(active, bool) or (active and instant(record.get("started")) is None):
            field = "active" if not isinstance(active, bool) else "started"
            return f"{field}: {json.dumps(record.get(field))[:40]}"
        same = record.get("model") == m.identity
        if record.get("active") is True and (started := instant(record.get("started"))) is not None:
            st.active, self._event_start, self.cusum = True, started, m.cusum_h
            if same:
                self.cusum = min(m.cusum_cap, max(0.0, finite(record.get("cusum")) or 0.0))
                self._peak = finite(record.get("peak")) or 0.0
                self.level = finite(record.get("level")) or 0.0
                self.event_level = finite(record.get("event_level")) or self.level
                self.inputs.baseline = _floats(record.get("baseline"), self.inputs.baseline)
                # A sensor stuck before the restart is still stuck after it: its run of one value goes on.
                self._raw = _floats(record.get("raw"), self._raw)
                runs = _floats(record.get("same_run"), self.same_run.astype(np.float64))
                self.same_run = np.where(np.isnan(runs), 0, np.clip(runs, 0, 2**31)).astype(np.int64)
        elif same and (held := finite(record.get("threshold"))) is not None and held > m.threshold:
            st.threshold, self.level = held, finite(record.get("level")) or held / m.settle
            self._event_start = instant(record.get("started"))
        return None

    def take_latency(self) -> list[float]:
        out, self.state.latency_us = self.state.latency_us, []
        return out


def _listed(values: np.ndarray) -> list[float | None]:
    """An array as JSON keeps it (NaN: None), for `_floats` to read back."""
    return [None if math.isnan(v) else float(v) for v in values]


def _floats(saved: object, default: np.ndarray) -> np.ndarray:
    """A saved list of numbers (None: NaN) of `default`'s length as an array, or `default` if it is not one."""
    if not isinstance(saved, list) or len(saved) != len(default):
        return default
    return np.array([math.nan if (v := finite(x)) is None else v for x in saved], dtype=np.float64)


def _number(value: object) -> float:
    try:
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return math.nan

"""Anomaly scoring with an int8 TFLite autoencoder: one ring buffer per device, one invoke per window.

The model is a `.tflite` file and its metadata `.json` (format 2: tags in order, window, stride,
the input transform, each tag's normal error, threshold, event rule, forward-fill limit, the
file's sha256). Each sample is turned into inputs one tag at a time, causally (`Inputs`):

- a *level* tag is centred and scaled by its commissioning median and spread;
- a *drift* tag (temperatures that follow the weather or heat up over a shift) is fed as its
  deviation from a slow moving baseline, so a level never seen in commissioning is not news.

Every `stride` samples the last `window` inputs are quantized with the model's own
scale/zero-point and reconstructed. Each tag's mean absolute error over the window is divided by
that tag's own normal error (measured at training on held-out running), so a noisy tag does not
drown a quiet one; a drift tag's share is capped, so one drifting tag cannot raise an alarm
alone. The score is the mean of these normalised errors (about 1 in normal running); each tag's
share of it names the tags that contribute most. A missing value is forward-filled up to
`ffill_limit` samples; a longer gap leaves the window unscored (said as such, never taken as
normal) until the gap has left the window.

The runtime is `ai_edge_litert` (LiteRT), else `tflite_runtime` (the same Interpreter API).
TensorFlow is never imported here.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np

from gateway.errors import ModelError

FORMAT = 2
REQUIRED = ("format", "tags", "window", "stride", "interval_s", "inputs", "error_scale", "threshold", "sha256")
MODEL_DIRS = (Path(__file__).resolve().parent.parent / "models", Path("/opt/edge-gateway/models"))
DRIFT_CAP = 3.0  # a drift tag's normalised error counts up to this much: it cannot raise an alarm alone


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

    def push(self, row: np.ndarray) -> np.ndarray:
        """One row of raw values (NaN where missing) → its inputs (NaN where missing)."""
        start = np.isnan(self.baseline) & ~np.isnan(row)
        self.baseline[start] = row[start]
        level = np.where(self.drift, row - self.baseline, row - self.center) * self.inv_spread
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

    def __init__(self, tflite_path: str | Path, meta_path: str | Path, *, verify_hash: bool = True) -> None:
        tflite_path, meta_path = Path(tflite_path), Path(meta_path)
        self.path = tflite_path
        try:
            data = tflite_path.read_bytes()
        except OSError as err:
            raise ModelError(f"cannot read {tflite_path}: {err.strerror}") from None
        if len(data) < 8 or data[4:8] != b"TFL3":
            raise ModelError(f"{tflite_path} is not a TFLite model (no TFL3 identifier)")
        try:
            meta = json.loads(meta_path.read_text())
        except OSError as err:
            raise ModelError(f"cannot read its metadata {meta_path}: {err.strerror}") from None
        except (ValueError, RecursionError) as err:  # RecursionError: arrays nested thousands deep
            raise ModelError(f"its metadata {meta_path} is not valid JSON: {str(err) or type(err).__name__}") from None
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
        try:
            self.name = str(meta.get("name", tflite_path.stem))
            self.tags: list[str] = [str(t) for t in meta["tags"]]
            self.window, self.stride = int(meta["window"]), int(meta["stride"])
            self.interval = float(meta["interval_s"])
            self.threshold = float(meta["threshold"])
            inputs = meta["inputs"]
            n = len(self.tags)
            columns = (inputs["center"], inputs["spread"], inputs["drift"], meta["error_scale"])
            if any(len(c) != n for c in columns) or min(map(float, inputs["spread"])) <= 0 \
                    or min(map(float, meta["error_scale"])) <= 0:
                raise ValueError(f"inputs.center, inputs.spread, inputs.drift and error_scale need one entry per tag "
                                 f"({n} tags), spreads and error scales above 0")
            self.inputs = dict(inputs)
            Inputs.from_meta(inputs, self.interval)  # the transform can be built
            self.drift = np.asarray(inputs["drift"], dtype=bool)
            self.inv_error = (1.0 / np.asarray(meta["error_scale"], dtype=np.float64)).astype(np.float32)
            events = meta.get("events", {})
            self.start_after, self.end_after = int(events.get("start_after", 3)), int(events.get("end_after", 6))
            self.ffill_limit = int(meta.get("ffill_limit", 5))
            self.top_n = int(meta.get("top_tags", 3))
            self.flatline_tags = set(meta.get("flatline_tags", self.tags))
            self.flatline_after = int(meta.get("flatline_after", self.window))  # samples of one exact value
            if self.window < 1 or self.stride < 1 or self.interval <= 0 or not math.isfinite(self.threshold) \
                    or self.threshold <= 0:
                raise ValueError("window and stride need to be 1 or more, interval_s and threshold above 0")
        except (KeyError, TypeError, ValueError) as err:
            why = f"lacks {err}" if isinstance(err, KeyError) else str(err)
            raise ModelError(f"its metadata {meta_path} is not usable: {why}") from None
        try:
            with _quiet_stderr():  # LiteRT prints "INFO: Created TensorFlow Lite XNNPACK delegate" on fd 2
                self.interpreter = interpreter_class()(model_content=data, num_threads=1)
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
        self._cap = np.where(self.drift, DRIFT_CAP, np.inf).astype(np.float32) if self.drift.any() else None
        self._qbuf = np.empty((1, size), dtype=np.int8 if self.int8 else np.float32)

    def new_inputs(self) -> Inputs:
        return Inputs.from_meta(self.inputs, self.interval)

    def tag_errors(self, flat: np.ndarray) -> np.ndarray:
        """One window of inputs (window*tags floats) → each tag's normalised error (about 1 in normal running)."""
        diff = self.reconstruct(flat)
        np.subtract(diff, flat, out=diff)
        np.abs(diff, out=diff)
        err = diff @ self._weights  # mean over the window and division by the tag's normal error, in one product
        if self._cap is not None:
            np.minimum(err, self._cap, out=err)
        return cast(np.ndarray, err)

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


_loaded: dict[Path, tuple[tuple[tuple[int, int], ...], Model]] = {}


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
    started: float | None = None
    peak: float | None = None


@dataclass
class ScoreState:
    score: float | None = None  # the last window's score; None before the first window or across a gap
    scored: int = 0
    unscored: int = 0  # windows due but not scored (gap longer than the forward-fill limit)
    active: bool = False  # an anomaly event is open
    why_unscored: str | None = None
    latency_us: list[float] = field(default_factory=list)


class DeviceScorer:
    """One device's input transform, ring buffer, forward fill, scoring schedule and event hysteresis."""

    def __init__(self, model: Model) -> None:
        self.model = model
        w, t = model.window, len(model.tags)
        self.inputs = model.new_inputs()
        self.buf = np.zeros((w, t), dtype=np.float32)
        self.filled = 0  # samples in the buffer since the last unfillable gap
        self.last = np.full(t, np.nan, dtype=np.float64)
        self.missing_run = np.zeros(t, dtype=np.int64)
        self.same_run = np.zeros(t, dtype=np.int64)  # samples in a row that repeat the last raw value exactly
        self._raw = np.full(t, np.nan, dtype=np.float64)
        self.since_score = 0
        self.above = self.below = 0
        self.state = ScoreState()
        self.errors: np.ndarray | None = None  # the last scored window's normalised error per tag
        self._event_start: float | None = None
        self._peak = 0.0

    def push(self, ts: float, values: Mapping[str, float | None]) -> Event | None:
        """Add one sample; return an anomaly event when one starts or ends."""
        m = self.model
        row = np.array([_number(values.get(tag)) for tag in m.tags], dtype=np.float64)
        bad = ~np.isfinite(row)
        self.missing_run = np.where(bad, self.missing_run + 1, 0)
        self.same_run = np.where(bad, self.same_run, np.where(row == self._raw, self.same_run + 1, 0))
        self._raw = np.where(bad, self._raw, row)
        row = np.where(bad & (self.missing_run <= m.ffill_limit), self.last, row)  # forward fill, within the limit
        row[~np.isfinite(row)] = np.nan
        self.last = row
        self.buf[:-1] = self.buf[1:]  # shift in place: no new array per sample
        self.buf[-1] = self.inputs.push(row)
        gap = np.isnan(row)
        if gap.any():
            self.filled = 0  # this window and the next `window` ones contain a real gap
            self.buf[-1][gap] = 0.0
            names = ", ".join(t for t, g in zip(m.tags, gap, strict=True) if g)
            self.state.why_unscored = f"no value for {names} beyond the forward-fill limit"
        else:
            self.filled = min(self.filled + 1, m.window)
        self.since_score += 1
        if self.since_score < m.stride:
            return None
        self.since_score = 0
        if self.filled < m.window:
            self.state.score = None
            self.errors = None
            self.state.unscored += 1
            if self.state.why_unscored is None:
                self.state.why_unscored = "warming up: fewer samples than one window"
            return None
        self.state.why_unscored = None
        start = time.perf_counter()
        err = m.tag_errors(self.buf.reshape(-1))
        self.state.latency_us.append((time.perf_counter() - start) * 1e6)
        score = float(err.mean())
        self.errors = err
        self.state.score = score
        self.state.scored += 1
        # A live sensor never repeats its value exactly for a whole window: a stuck one does. Its
        # reconstruction error is small (no noise to miss), so the autoencoder alone cannot see it.
        flatlined = [int(i) for i in np.nonzero(self.same_run >= m.flatline_after - 1)[0]
                     if m.tags[i] in m.flatline_tags]
        return self._hysteresis(ts, score, err, flatlined)

    def top_tags(self, err: np.ndarray, flat: Sequence[int] = ()) -> list[dict[str, Any]]:
        total = float(err.sum()) or 1.0
        order = list(flat) + [int(i) for i in np.argsort(err)[::-1] if i not in flat]
        return [{"tag": self.model.tags[i], "share": round(float(err[i]) / total, 3),
                 **({"flatline": True} if i in flat else {})} for i in order[: self.model.top_n]]

    def _hysteresis(self, ts: float, score: float, err: np.ndarray, flat: Sequence[int] = ()) -> Event | None:
        m = self.model
        if score > m.threshold or flat:
            self.above, self.below = self.above + 1, 0
            self._peak = max(self._peak, score)
        else:
            self.above, self.below = 0, self.below + 1
        if not self.state.active and self.above >= m.start_after:
            self.state.active, self._event_start, self._peak = True, ts, score
            return Event("start", score, self.top_tags(err, flat))
        if self.state.active and self.below >= m.end_after:
            self.state.active = False
            return Event("end", score, self.top_tags(err), started=self._event_start, peak=self._peak)
        return None

    def take_latency(self) -> list[float]:
        out, self.state.latency_us = self.state.latency_us, []
        return out


def _number(value: object) -> float:
    try:
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return math.nan

"""`edge-gateway model score`: a recording fed through the daemon's own scorer, row by row.

Rows go in time order, one sample each; a row's result uses only that row and the ones before
it, exactly as the daemon would have scored them live. Missing slots between rows (a gap in the
recording) are fed as missing samples, so the windows span the time the model expects.
"""

from __future__ import annotations

import csv
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO

import numpy as np

from gateway.anomaly.model import DeviceScorer, Model
from gateway.anomaly.recording import Recording, format_time
from gateway.units import duration_text

COLUMNS = ("time", "score", "threshold", "state", "top_tags")


@dataclass
class Row:
    ts: float
    score: float | None  # None: no window was scored at this row
    state: str  # normal | anomaly | not_scored
    top_tags: list[str]
    threshold: float  # in effect at this row: the model's, or held higher after an event that subsided
    contributions: np.ndarray | None = None  # each tag's share of the score, when scored at this row


@dataclass
class Summary:
    rows: int = 0
    windows_scored: int = 0
    events: int = 0
    rows_anomaly: int = 0
    rows_not_scored: int = 0

    def expected(self, model: Model) -> str:
        """The false events the model's calibration expects over this span of normal running, beside those seen."""
        span = self.rows * model.interval
        hours = span / 3600
        return (f"false events expected in {hours:.2f} h of normal running at the calibrated "
                f"{model.false_alarms_asked}: {model.false_alarm_rate * span:.2g}; events seen: "
                f"{self.events} (those outside known faults are false)" +
                (f"; commissioned on {duration_text(model.commissioned_s)} of normal running, too short to show the "
                 f"machine's slow changes: the events they raise are not in that figure" if model.commissioned_short
                 else ""))

    def text(self, interval: float) -> str:
        share = self.rows_anomaly / self.rows if self.rows else 0.0
        return (f"{self.rows} rows, {self.windows_scored} windows scored, {self.rows_not_scored} rows not scored; "
                f"{self.events} anomaly event(s), {self.rows_anomaly} rows in anomaly "
                f"({self.rows_anomaly * interval / 60:.1f} min, {share:.1%})")


def replay(model: Model, recording: Recording) -> Iterator[Row]:
    """One `Row` per row of the recording, in time order."""
    rec = recording.select(model.tags)
    scorer = DeviceScorer(model)
    previous: float | None = None
    limit = model.window + model.ffill_limit + 1  # a longer gap resets the window all the same
    empty = dict.fromkeys(model.tags)
    for ts, values in zip(rec.times, rec.values, strict=True):
        if previous is not None:
            missing = min(limit, max(0, round((ts - previous) / model.interval) - 1))
            for k in range(missing):
                scorer.push(previous + (k + 1) * model.interval, empty)
        previous = float(ts)
        scored_before = scorer.state.scored
        scorer.push(float(ts), dict(zip(model.tags, values.tolist(), strict=True)))
        fresh = scorer.state.scored > scored_before
        if scorer.state.active:
            state = "anomaly"
        elif scorer.state.score is None:
            state = "not_scored"
        else:
            state = "normal"
        top: list[str] = []
        if fresh and scorer.errors is not None:
            top = [t["tag"] for t in scorer.top_tags(scorer.errors)]
        yield Row(float(ts), scorer.state.score if fresh else None, state, top, scorer.state.threshold,
                  scorer.errors.copy() if fresh and scorer.errors is not None else None)


def write(model: Model, recording: Recording, out: IO[str], keep: list[Row] | None = None) -> Summary:
    """The per-row CSV (`COLUMNS`) on `out`; the summary for stderr; every row appended to `keep` if given."""
    summary = Summary()
    writer = csv.writer(out)
    writer.writerow(COLUMNS)
    was_active = False
    for row in replay(model, recording):
        summary.rows += 1
        if keep is not None:
            keep.append(row)
        summary.windows_scored += row.score is not None
        summary.rows_anomaly += row.state == "anomaly"
        summary.rows_not_scored += row.state == "not_scored"
        summary.events += row.state == "anomaly" and not was_active
        was_active = row.state == "anomaly"
        writer.writerow([format_time(row.ts), "" if row.score is None else f"{row.score:.6g}", f"{row.threshold:.6g}",
                         row.state, " ".join(row.top_tags)])
    return summary


def states(model: Model, recording: Recording) -> np.ndarray:
    """Whether each row is flagged (state anomaly): for evaluations."""
    return np.array([r.state == "anomaly" for r in replay(model, recording)], dtype=bool)

"""`model score --plot` and `model train --plot`: what the scorer saw, as a picture an engineer can check.

One figure: the score against the threshold over time with the anomaly events shaded, each tag's
contribution to the score (stacked), and the raw values of the tags that contributed most; a
summary beside it. A `.png` is the figure; an `.html` file is self-contained (the figure embedded,
the summary and the events as tables) and opens in any browser. matplotlib (the `[plot]` extra)
is imported here only, and only by these commands; the daemon never imports this module.
"""

from __future__ import annotations

import base64
import datetime as dt
import html
import io
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from gateway.errors import GatewayError

SUFFIXES = (".png", ".html", ".htm")
TOP = 3  # raw tags shown
STACKED = 9  # tags stacked by name in the contributions; beyond, the rest as one
DRAWN = 1e15  # raw readings beyond this size are left out of the picture (and said)


class MissingPlot(GatewayError):
    """A report that cannot be written: no matplotlib, or a file type it does not write."""


def check(path: str) -> None:
    """Raise MissingPlot when `path` cannot be written as a report here."""
    if Path(path).suffix.lower() not in SUFFIXES:
        raise MissingPlot(f"--plot {path}: give a .html or .png file")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise MissingPlot("--plot needs matplotlib: pip install 'edge-gateway[plot]'") from None


def events(rows: Sequence[Any]) -> list[tuple[int, int]]:
    """(first, last) row index of each run of rows in anomaly."""
    out, start = [], None
    for i, row in enumerate(rows):
        if row.state == "anomaly" and start is None:
            start = i
        elif row.state != "anomaly" and start is not None:
            out.append((start, i - 1))
            start = None
    if start is not None:
        out.append((start, len(rows) - 1))
    return out


def write(path: str, model: Any, rows: Sequence[Any], values: np.ndarray, title: str) -> None:
    """Write the report for replayed `rows` (gateway.anomaly.replay.Row) and the recording's raw `values` (rows x tags)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # Tag names are a CSV header's: "p $\\frac{a}$" was a mathtext parse error (a traceback after the scoring or the
    # training), "m$^3$/h" drawn as a superscript. A glyph the font lacks is a box, not a warning on stderr.
    matplotlib.rcParams["text.parse_math"] = False
    warnings.filterwarnings("ignore", category=UserWarning, module="matplotlib")

    tags = list(model.tags)
    times = [dt.datetime.fromtimestamp(r.ts, dt.timezone.utc) for r in rows]
    score = np.array([np.nan if r.score is None else r.score for r in rows])
    contrib = np.full((len(rows), len(tags)), np.nan)
    last = np.zeros(len(tags))
    for i, r in enumerate(rows):  # a row without a fresh window keeps the last window's shares
        if r.contributions is not None:
            last = r.contributions
        contrib[i] = last if r.state != "not_scored" else np.nan
    spans = events(rows)
    in_event = np.array([r.state == "anomaly" for r in rows], dtype=bool)
    weight = np.nansum(contrib[in_event] if in_event.any() else contrib, axis=0)
    top = [int(i) for i in np.argsort(weight)[::-1][:min(TOP, len(tags))]]

    fig, axes = plt.subplots(2 + len(top), 1, figsize=(12, 3 + 2.2 * (1 + len(top))), sharex=True,
                             gridspec_kw={"height_ratios": [2, 2] + [1] * len(top)})
    ax = axes[0]
    ax.plot(times, score, lw=0.8, color="tab:blue", label="score")
    held = np.array([r.threshold for r in rows])
    ax.plot(times, held, color="tab:red", lw=1, ls="--", drawstyle="steps-post",
            label=f"threshold {model.threshold:.3g}" + (" (held higher after an event that subsided)"
                                                        if (held > model.threshold).any() else ""))
    if np.isfinite(score).any() and np.nanmin(score) > 0:
        ax.set_yscale("log")
    ax.set_ylabel("score")
    ax.legend(loc="upper left", fontsize=8)
    ax.set_title(title, fontsize=10)
    ax = axes[1]
    shown = [int(i) for i in np.argsort(weight)[::-1][:STACKED]] if len(tags) > STACKED + 1 else list(range(len(tags)))
    stack, labels = np.nan_to_num(contrib[:, shown]), [tags[j] for j in shown]
    if len(shown) < len(tags):  # 23 tags (or 2000) in one legend say nothing: the largest, and the rest as one
        stack = np.column_stack([stack, np.nan_to_num(np.delete(contrib, shown, axis=1)).sum(axis=1)])
        labels.append(f"{len(tags) - len(shown)} other tags")
    if len(rows):
        ax.stackplot(times, stack.T, labels=labels, linewidth=0)
    ax.set_ylabel("contribution")
    ax.legend(loc="upper left", fontsize=7, ncol=min(5, len(labels)))
    for k, j in enumerate(top):
        a = axes[2 + k]
        raw = np.array(values[:, j], dtype=np.float64)
        wild = ~(np.abs(raw) <= DRAWN)  # a reading of 1e308 is no measurement, and no axis can hold it
        raw[wild] = np.nan
        a.plot(times, raw, lw=0.7, color="black")
        a.set_ylabel(tags[j], fontsize=8)
        if wild.any() and np.isfinite(values[:, j]).any():
            a.set_title(f"{int(wild.sum())} reading(s) beyond +-{DRAWN:g} not drawn", fontsize=7, loc="left")
    for a in axes:
        for first, end in spans:
            a.axvspan(times[first], times[end], color="tab:red", alpha=0.15, lw=0)
    axes[-1].set_xlabel("time (UTC)")
    with warnings.catch_warnings():  # a layout it cannot fit is still a readable figure
        warnings.simplefilter("ignore")
        fig.tight_layout()
    summary = _summary(model, rows, spans, score)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    png = buf.getvalue()
    if Path(path).suffix.lower() == ".png":
        Path(path).write_bytes(png)
        return
    table = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in summary)
    rows_html = "".join(
        f"<tr><td>{times[a]:%Y-%m-%d %H:%M:%S}</td><td>{(rows[b].ts - rows[a].ts) + model.interval:.0f}</td>"
        f"<td>{np.nanmax(score[a:b + 1]) if np.isfinite(score[a:b + 1]).any() else float('nan'):.4g}</td>"
        f"<td>{html.escape(', '.join(tags[j] for j in np.argsort(np.nansum(contrib[a:b + 1], axis=0))[::-1][:3]))}"
        f"</td></tr>" for a, b in spans)
    Path(path).write_text(
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<title>{html.escape(title)}</title><style>body{{font-family:sans-serif;margin:1em}}"
        "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:2px 8px;text-align:left}</style>"
        f"</head><body><h1>{html.escape(title)}</h1><table id=\"summary\">{table}</table>"
        f"<h2>Score, contributions, top tags</h2><img alt=\"score against threshold over time\" "
        f"src=\"data:image/png;base64,{base64.b64encode(png).decode()}\">"
        f"<h2>Events</h2><table id=\"events\"><tr><th>start (UTC)</th><th>duration s</th><th>peak score</th>"
        f"<th>top tags</th></tr>{rows_html}</table></body></html>\n", encoding="utf-8")


def _summary(model: Any, rows: Sequence[Any], spans: list[tuple[int, int]], score: np.ndarray) -> list[tuple[str, str]]:
    n = len(rows)
    flagged = sum(r.state == "anomaly" for r in rows)
    span_s = n * model.interval
    return [
        ("model", f"{model.name}: {len(model.tags)} tags, threshold {model.threshold:.4g}"),
        ("rows", f"{n} ({span_s / 3600:.2f} h), {int(np.isfinite(score).sum())} windows scored"),
        ("events", f"{len(spans)}; {flagged} rows in anomaly ({flagged / max(1, n):.1%})"),
        ("false events expected", f"{model.false_alarm_rate * span_s:.2g} in this span if it was all normal running "
                                  f"({model.false_alarms_asked})"),
        ("highest score", f"{np.nanmax(score):.4g}" if np.isfinite(score).any() else "-"),
    ]

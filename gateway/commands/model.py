"""`edge-gateway model train|score|list|show` and `edge-gateway history export`.

Offline tools for commissioning an anomaly model on one's own machine: record (`history:` on
a device), export, train, replay, deploy. numpy and the TFLite runtime are imported only here
and only when asked for; TensorFlow only by `model train` (gateway/anomaly/training.py).
"""

from __future__ import annotations

import argparse
import errno
import glob
import json
import os
import sqlite3
import sys
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gateway import config as configuration
from gateway.config.schema import NAME
from gateway.errors import EX_CANTCREAT, EX_CONFIG, EX_DATAERR, EX_OK, EX_UNAVAILABLE, EX_USAGE, ModelError
from gateway.files import replacing
from gateway.logs import visible
from gateway.units import parse_duration

if TYPE_CHECKING:
    from gateway.anomaly.recording import Recording


def add_to(sub: Any) -> None:
    model = sub.add_parser("model", help="train, check and list anomaly models (see docs/anomaly.md)")
    model.set_defaults(main=model_command)
    actions = model.add_subparsers(dest="action", required=True, parser_class=type(model))
    train = actions.add_parser("train", help="train a model from CSV recordings or a device's recorded history")
    train.add_argument("name", help="the model's name: NAME.tflite and NAME.json are written")
    train.add_argument("--csv", action="append", default=[], metavar="FILE", help="a recording of normal running; "
                       "repeatable")
    train.add_argument("--device", help="train from this device's recorded history (needs -c)")
    train.add_argument("-c", "--config", default=configuration.DEFAULT_PATH, help="config file (with --device)")
    train.add_argument("--from", dest="start", metavar="TIME", help="with --device: from this time (RFC 3339)")
    train.add_argument("--to", dest="end", metavar="TIME", help="with --device: up to this time (RFC 3339)")
    train.add_argument("--time-column", help="the CSV's time column (default: detected)")
    train.add_argument("--tags", help="the tags to model, comma-separated (default: every numeric column)")
    train.add_argument("--interval", help="time between samples, e.g. 1s (default: the recordings' median)")
    train.add_argument("--out", default=".", metavar="DIR", help="where to write the model (default: here)")
    train.add_argument("--window", type=int, default=10, help="samples per window (default %(default)s)")
    train.add_argument("--drift-tags", metavar="TAGS", help="tags fed as deviation from a slow baseline, "
                       "comma-separated, or 'none' (default: detected, those with a trend)")
    train.add_argument("--baseline", default="60s", help="the drift baseline's time constant (default %(default)s)")
    train.add_argument("--epochs", type=int, default=200, help="at most this many (early stopping ends sooner)")
    train.add_argument("--context", type=int, default=30, help="samples the statistics look back over "
                       "(default %(default)s)")
    train.add_argument("--false-alarms", default="1/week", metavar="RATE", help="false events you accept per time "
                       "of normal running, e.g. 1/week, 2/day, 1/h (default %(default)s)")
    train.add_argument("--plot", metavar="FILE", help="a report of the calibration part: .html or .png "
                       "(needs the [plot] extra)")
    score = actions.add_parser("score", help="replay a CSV recording through a model, row by row, as the daemon "
                               "scores")
    score.add_argument("name")
    score.add_argument("--csv", required=True, metavar="FILE")
    score.add_argument("--time-column", help="the CSV's time column (default: detected)")
    score.add_argument("--model-dir", metavar="DIR", help="default: here if NAME.tflite is here, else the installed "
                       "models")
    score.add_argument("--out", default="-", metavar="FILE", help="per-row CSV (default: stdout)")
    score.add_argument("--plot", metavar="FILE", help="a report: score against threshold, events, each tag's "
                       "contribution, the top tags' values; .html or .png (needs the [plot] extra)")
    for name, text in (("list", "the installed models and whether each can be loaded"),
                       ("show", "one model's metadata")):
        p = actions.add_parser(name, help=text)
        if name == "show":
            p.add_argument("name")
        p.add_argument("--model-dir", metavar="DIR", help="default: the config's gateway.model_dir, else the "
                       "installed models")
        p.add_argument("-c", "--config", default=configuration.DEFAULT_PATH, help="config file, for its model_dir")
        p.add_argument("--json", action="store_true")
    history = sub.add_parser("history", help="export a device's recorded samples (devices[].history)")
    history.set_defaults(main=history_command)
    history.add_argument("action", choices=("export", "stats"))
    history.add_argument("device", nargs="?")
    history.add_argument("-c", "--config", default=configuration.DEFAULT_PATH, help="config file (default %(default)s)")
    history.add_argument("--from", dest="start", metavar="TIME", help="from this time (RFC 3339)")
    history.add_argument("--to", dest="end", metavar="TIME", help="up to this time (RFC 3339)")
    history.add_argument("--csv", metavar="FILE", help="the CSV to write (- for stdout)")


def _fail(message: str, code: int) -> int:
    # (escaped: a column name or a path from the user's file may hold control or bidirectional characters)
    print("edge-gateway: " + "\n".join(visible(line) for line in message.split("\n")), file=sys.stderr)
    return code


def model_command(args: argparse.Namespace) -> int:
    try:
        import numpy  # noqa: F401
    except ImportError:
        return _fail("anomaly models need numpy and a TFLite runtime: pip install 'edge-gateway[anomaly]'",
                     EX_UNAVAILABLE)
    from gateway.anomaly.recording import DataError
    from gateway.anomaly.training import MissingExtra
    try:
        name = getattr(args, "name", None)
        if name is not None and not NAME.fullmatch(name):  # a file name in --out or the model dir, and a config value
            raise _Usage(f"model name {name[:80]!r}: lower-case letters, digits, _ and - only, as "
                         f"devices[].model takes it (e.g. pump-ae)")
        if args.action == "train":
            return _train(args)
        if args.action == "score":
            return _score(args)
        return _list(args) if args.action == "list" else _show(args)
    except DataError as err:
        return _fail(str(err), EX_DATAERR)
    except ModelError as err:
        return _fail(f"model {args.name}: {err}", EX_DATAERR)
    except MissingExtra as err:
        return _fail(str(err), EX_UNAVAILABLE)
    except _Usage as err:
        return _fail(str(err), EX_USAGE)
    except configuration.ConfigError as err:  # --device reads the daemon's config (-c)
        print(err, file=sys.stderr)
        return EX_CONFIG
    except BrokenPipeError:
        raise  # stdout's reader has gone: `cli.main` ends quietly
    except OSError as err:
        if getattr(sys.stdout, "failed", None) is err:
            raise  # standard output that cannot be written (`model list > /dev/full`): `cli.main` says so
        return _fail(f"{err.filename or ''}: {err.strerror}", EX_CANTCREAT)


class _Usage(Exception):
    pass


def _span(start: str | None, end: str | None) -> tuple[float | None, float | None]:
    """--from and --to as times; a span that ends before it begins is a usage error (it could hold nothing)."""
    first, last = _time(start, "--from"), _time(end, "--to")
    if first is not None and last is not None and last < first:
        raise _Usage(f"--to {end} is before --from {start}")
    return first, last


def _time(text: str | None, what: str) -> float | None:
    from gateway.anomaly.recording import parse_time
    if text is None:
        return None
    ts = parse_time(text)
    if ts is None:
        raise _Usage(f"{what} {text!r} is not a time: RFC 3339, e.g. 2026-11-24T06:00:00Z or 2026-11-24")
    return ts


def _csv_list(text: str | None, option: str) -> list[str] | None:
    """`a, b` → ['a', 'b']; None when the option is not given. Naming no tag, or one twice, is a usage error."""
    if text is None:
        return None
    names = [t.strip() for t in text.split(",") if t.strip()]
    if not names:
        raise _Usage(f"{option} {text!r} names no tag: give them comma-separated, e.g. {option} pressure,flow")
    twice = sorted(t for t, n in Counter(names).items() if n > 1)  # linear: a pasted list may be long
    if twice:
        raise _Usage(f"{option} names {', '.join(twice)} more than once")
    return names


def _train(args: argparse.Namespace) -> int:
    import numpy as np

    from gateway.anomaly.model import INTERVAL_RANGE, MAX_CONTEXT
    from gateway.anomaly.recording import DataError, read_csv
    from gateway.anomaly.training import Options, parse_rate, train
    if bool(args.csv) == bool(args.device):
        raise _Usage("give either --csv FILE (repeatable) or --device DEV -c CONFIG")
    interval = None
    if args.interval is not None:
        try:
            interval = parse_duration(args.interval)
        except ValueError:
            interval = 0.0
        if not INTERVAL_RANGE[0] <= interval <= INTERVAL_RANGE[1]:
            raise _Usage(f"--interval {args.interval!r}: expected a duration from {INTERVAL_RANGE[0]:g} s to "
                         f"{INTERVAL_RANGE[1]:g} s, such as 1s or 500ms")
    try:
        baseline = parse_duration(args.baseline)
    except ValueError:
        baseline = 0.0
    if not baseline > 0:
        raise _Usage(f"--baseline {args.baseline!r}: expected a duration above 0, such as 60s or 10m")
    drift = _csv_list(args.drift_tags, "--drift-tags")
    if drift and "none" in drift and len(drift) > 1:
        raise _Usage("--drift-tags none stands alone: it means no tag is a drift tag")
    try:
        rate = parse_rate(args.false_alarms)
    except ValueError:
        raise _Usage(f"--false-alarms {visible(args.false_alarms)!r}: expected a count per time, e.g. 1/week, "
                     "2/day or 0.5/h, between one a second and one in 1000 years") from None
    if args.window < 2 or args.epochs < 1 or not 2 <= args.context <= MAX_CONTEXT:
        raise _Usage(f"--window needs 2 or more, --context 2 to {MAX_CONTEXT}, --epochs 1 or more")
    if args.plot:
        _plot_check(args.plot, made=args.out)
    tags = _csv_list(args.tags, "--tags")
    if args.csv:
        recordings = [read_csv(f, time_column=args.time_column, tags=tags) for f in args.csv]
    else:
        recording, device_interval = _from_history(args.config, args.device, *_span(args.start, args.end))
        recordings = [recording.select(tags) if tags else recording]
        interval = interval or device_interval
    for r in recordings:
        for note in r.notes:
            print(visible(f"{r.source}: {note}"), file=sys.stderr)
        if len(r) == 0:
            raise DataError(f"{r.source}: no rows")
    opts = Options(window=args.window, interval=interval, baseline_s=baseline, epochs=args.epochs,
                   context=args.context, false_alarms=rate, drift_tags=[] if drift == ["none"] else drift)
    try:
        report = train(args.name, recordings, Path(args.out), opts, progress=_progress_bar())
    finally:  # a training that did not end (refused, interrupted, a failure) leaves none of its part-written files
        for tmp in Path(args.out).glob(f"{glob.escape(args.name)}.*tmp"):
            tmp.unlink(missing_ok=True)
    if sys.stderr.isatty():
        print(file=sys.stderr)  # end the bar's line
    print("\n".join(visible(line) for line in report.lines))  # (tag names are the CSV header's)
    if args.plot:
        from gateway.anomaly import replay
        from gateway.anomaly.model import Model
        from gateway.anomaly.recording import Recording
        model = Model(Path(args.out) / f"{args.name}.tflite", Path(args.out) / f"{args.name}.json")
        grid, start = max(report.held_out, key=lambda h: len(h[0]) - h[1])
        t0 = 0.0
        rec = Recording("the calibration part", model.tags, t0 + np.arange(len(grid)) * model.interval, grid)
        rows = list(replay.replay(model, rec))[start:]
        _write_plot(args.plot, model, rows, rec.select(model.tags).values[start:],
                    f"model {model.name}: the calibration part of its training data")
    print(f"to deploy: copy {args.name}.tflite and {args.name}.json into gateway.model_dir, set "
          f"devices[].model: {args.name}, then edge-gateway check-config and systemctl reload edge-gateway")
    return EX_OK


def _progress_bar() -> Any:
    """Redrawn in place on a terminal; a line every 10 epochs in a log. Early stopping ends the bar short."""
    tty = sys.stderr.isatty()

    def show(epoch: int, epochs: int, loss: float, val: float) -> None:
        width = 30
        done = int(width * epoch / epochs)
        line = f"training: epoch {epoch:>4}/{epochs} [{'#' * done}{'.' * (width - done)}] loss {loss:.4f} " \
               f"validation {val:.4f}"
        if tty:
            print("\r" + line, end="", file=sys.stderr, flush=True)
        elif epoch == 1 or epoch % 10 == 0:
            print(line, file=sys.stderr, flush=True)

    return show


def _from_history(config_path: str, device: str, start: float | None, end: float | None
                  ) -> tuple[Recording, float]:
    import numpy as np

    from gateway.anomaly.recording import DataError, Recording
    cfg = configuration.load(config_path)
    dev = next((d for d in cfg.devices if d.name == device), None)
    tags, data, damaged = _export(cfg, device, start, end)
    if not data:
        raise DataError(f"device {device}: no recorded samples{' in that time range' if start or end else ''} "
                        f"(does it have history: in {config_path}?)")
    times = np.array([t for t, _ in data])
    values = np.array([[np.nan if v is None else v for v in vs] for _, vs in data], dtype=np.float64)
    interval = dev.interval if dev is not None else 0.0
    notes = [f"{damaged} damaged series or row(s) left out (not what the gateway writes: a file damaged or edited by "
             f"hand)"] if damaged else []
    return Recording(f"history of {device}", tags, times, values, notes), interval


def _export(cfg: configuration.Config, device: str, start: float | None, end: float | None) -> Any:
    """The device's tags, rows, and how many damaged series or rows were left out (`History.export`)."""
    store, path = _store(cfg)
    try:
        tags, rows = store.export(device, start, end)
        return tags, list(rows), store.damaged
    except sqlite3.Error as err:
        raise _damaged(path, err) from None


def _store(cfg: configuration.Config) -> tuple[Any, Path]:
    """The recorded history, read-only; a DataError when there is none or it cannot be opened."""
    from gateway.anomaly.recording import DataError
    from gateway.store.history import FILE, History
    path = Path(cfg.gateway.data_dir) / FILE
    if not path.exists():
        raise DataError(f"no history recorded yet: {path} does not exist (give a device history: in the config)")
    try:
        return History.open(path, readonly=True), path
    except sqlite3.Error as err:
        raise _damaged(path, err) from None


def _damaged(path: Path, err: sqlite3.Error) -> Exception:
    from gateway.anomaly.recording import DataError
    return DataError(f"cannot read the history {path}: {err}")


def history_command(args: argparse.Namespace) -> int:
    from gateway.anomaly.recording import DataError
    try:
        cfg = configuration.load(args.config)
    except configuration.ConfigError as err:
        print(err, file=sys.stderr)
        return EX_CONFIG
    try:
        store, path = _store(cfg)
        try:
            return _history(args, store, path)
        except sqlite3.Error as err:
            raise _damaged(path, err) from None
    except DataError as err:
        return _fail(str(err), EX_DATAERR)


def _history(args: argparse.Namespace, store: Any, path: Path) -> int:
    from gateway.anomaly.recording import format_time, write_csv
    if args.action == "stats":
        for device, count, first, last in store.devices():
            span = f"{format_time(first)} .. {format_time(last)}" if first is not None and last is not None else "-"
            print(f"{device}: {count} samples, {span}")
        print(f"{path}: {path.stat().st_size / 1024**2:.1f} MiB")
        return EX_OK
    if not args.device or not args.csv:
        return _fail("history export DEVICE --csv FILE [--from TIME] [--to TIME]", EX_USAGE)
    try:
        start, end = _span(args.start, args.end)
    except _Usage as err:
        return _fail(str(err), EX_USAGE)
    tags, rows = store.export(args.device, start, end)
    if not tags and store.damaged:
        return _fail(f"device {args.device}: {path} holds {store.damaged} series of it, all damaged (not what the "
                     f"gateway writes: a file damaged or edited by hand)", EX_DATAERR)
    if not tags:
        known = ", ".join(d for d, *_ in store.devices()) or "none"
        return _fail(f"device {args.device}: nothing recorded (recorded devices: {known})", EX_DATAERR)
    try:
        count = write_csv(args.csv, tags, rows)  # - is standard output (`files.replacing`)
    except BrokenPipeError:
        raise
    except OSError as err:
        return _fail(f"cannot write {args.csv}: {err.strerror}", EX_CANTCREAT)
    print(f"{count} samples of {args.device} ({', '.join(tags)}) written to {args.csv}", file=sys.stderr)
    if store.damaged:
        print(f"{path}: {store.damaged} damaged series or row(s) of {args.device} left out (not what the gateway "
              f"writes: a file damaged or edited by hand)", file=sys.stderr)
    return EX_OK


def _model_dir(args: argparse.Namespace, name: str | None = None) -> Path:
    from gateway.anomaly.model import model_dir
    if getattr(args, "model_dir", None):
        return Path(args.model_dir)
    if name is not None and Path(f"{name}.tflite").exists():
        return Path(".")
    config_path = getattr(args, "config", None)
    if config_path and os.path.exists(config_path):
        try:
            return model_dir(configuration.load(config_path).gateway.model_dir)
        except configuration.ConfigError:
            pass
    return model_dir(None)


def _score(args: argparse.Namespace) -> int:
    from gateway.anomaly import replay
    from gateway.anomaly.model import Model
    from gateway.anomaly.recording import DataError, read_csv
    directory = _model_dir(args, args.name)
    model = Model(directory / f"{args.name}.tflite", directory / f"{args.name}.json")
    # One result per row of the file; only the model's tags are read (another column may hold anything).
    recording = read_csv(args.csv, time_column=args.time_column, tags=model.tags, as_given=True)
    for note in recording.notes:
        print(visible(f"{recording.source}: {note}"), file=sys.stderr)
    if len(recording) == 0:
        raise DataError(f"{recording.source}: no rows")
    step = recording.median_interval()
    if step is not None and not 2 / 3 <= step / model.interval <= 1.5:
        print(f"{recording.source}: note: a row every {step:g} s, but model {model.name} takes a sample every "
              f"{model.interval:g} s: " + (
                  "each row is scored as one of its samples, so the machine's changes look that much faster"
                  if step < model.interval else
                  f"the slots between rows are missing samples, and a gap of more than {model.ffill_limit} leaves "
                  f"the windows over it unscored") +
              f". Give the file a row every {model.interval:g} s, or train a model on this rate", file=sys.stderr)
    if args.plot:
        _plot_check(args.plot)
    rows: list[replay.Row] = []
    try:
        with replacing(args.out) as out:  # a file whole or not at all; - is standard output
            summary = replay.write(model, recording, out, keep=rows)
    except BrokenPipeError:
        raise
    except OSError as err:  # a disk that fills up mid-way names no file: name it
        raise OSError(err.errno, err.strerror, args.out) from None
    print(f"model {model.name} (threshold {model.threshold:.4g}) on {args.csv}: {summary.text(model.interval)}",
          file=sys.stderr)
    print(summary.expected(model), file=sys.stderr)
    if args.plot:
        _write_plot(args.plot, model, rows, recording.select(model.tags).values, f"model {model.name} on {args.csv}")
    return EX_OK


def _plot_check(path: str, made: str | None = None) -> None:
    """Refuse a plot that cannot be written before the work, not after: its folder exists, or is `made` by the
    command (`model train --out DIR` makes DIR)."""
    from gateway.anomaly.report import MissingPlot, check
    try:
        check(path)
    except MissingPlot as err:
        raise _Usage(str(err)) from None
    folder = Path(path).parent
    if not folder.is_dir() and (made is None or folder.resolve() != Path(made).resolve()):
        raise OSError(errno.ENOENT, f"no directory {folder} to write it in", path)
    if Path(path).is_dir():  # (said after an hour's training before)
        raise OSError(errno.EISDIR, "a directory, not a file to write the report to", path)


def _write_plot(path: str, model: Any, rows: list[Any], values: Any, title: str) -> None:
    from gateway.anomaly.report import write
    write(path, model, rows, values, title)
    print(f"report written to {path}", file=sys.stderr)


def _describe(name: str, directory: Path) -> dict[str, Any]:
    from gateway.anomaly.model import Model
    try:
        m = Model(directory / f"{name}.tflite", directory / f"{name}.json")
    except ModelError as err:
        return {"name": name, "ok": False, "problem": str(err)}
    meta = m.meta
    drift = [t for t, d in zip(m.tags, meta["inputs"]["drift"], strict=True) if d]
    return {"name": name, "ok": True, "tags": m.tags, "drift_tags": drift, "window": m.window, "stride": m.stride,
            "interval_s": m.interval, "threshold": m.threshold, "bytes": m.size,
            "events": {"h": m.cusum_h, "end_after": m.end_after}, "context": m.context,
            "level": m.stats.level,
            "level_per_tag": m.stats.per_tag,
            "commissioned_s": m.commissioned_s, "commissioned_short": m.commissioned_short,
            "commissioned_note": m.short_note(),
            "false_alarms": meta.get("false_alarms", {}), "training": _record(meta.get("training")),
            "versions": _record(meta.get("versions")), "sha256": meta["sha256"]}


def _names(value: object) -> str:
    """The recordings training wrote it was trained on: the first few, each cut short (a file name can be anything)."""
    from gateway.anomaly.recording import names_text
    return names_text([str(v) for v in value], most=5) if isinstance(value, list) and value else "?"


def _pairs(value: object) -> str | None:
    """A {tag: figure} that training wrote, as 'tag (figure), ...' (each cut short); None when it is no such thing."""
    if not isinstance(value, dict) or not value:
        return None
    shown = [f"{str(k)[:40]} ({str(v)[:40]})" for k, v in list(value.items())[:20]]
    return ", ".join(shown) + (f", and {len(value) - 20} more" if len(value) > 20 else "")


def _record(value: object) -> dict[str, Any]:
    """What training wrote to describe itself (shown, never used to score): an object, else nothing."""
    return value if isinstance(value, dict) else {}


def _list(args: argparse.Namespace) -> int:
    directory = _model_dir(args)
    names = sorted(p.stem for p in directory.glob("*.json") if (directory / f"{p.stem}.tflite").exists())
    described = [_describe(n, directory) for n in names]
    if args.json:
        print(json.dumps({"model_dir": str(directory), "models": described}, indent=1))
        return EX_OK
    print(f"models in {directory}:" if described else f"no models in {directory}")
    for d in described:
        if d["ok"]:
            print(f"  {d['name']:<20} {len(d['tags'])} tags, window {d['window']} x {d['interval_s']:g} s, "
                  f"threshold {d['threshold']:.4g}, {d['bytes'] / 1024:.0f} KiB")
        else:
            print(f"  {d['name']:<20} cannot be used: {d['problem']}")
    return EX_OK


def _show(args: argparse.Namespace) -> int:
    from gateway.anomaly.model import LEVEL, SLOW_EVIDENCE_S
    from gateway.units import duration_text
    directory = _model_dir(args, args.name)
    if not (directory / f"{args.name}.json").exists():
        raise ModelError(f"no {args.name}.json in {directory}")
    d = _describe(args.name, directory)
    if args.json or not d["ok"]:
        print(json.dumps(d, indent=1))
        return EX_OK if d["ok"] else EX_DATAERR
    t = d["training"]
    lines = [f"model {d['name']} in {directory}",
             f"  tags ({len(d['tags'])}): {', '.join(d['tags'])}",
             f"  drift tags: {', '.join(d['drift_tags']) or 'none'}",
             f"  window {d['window']} samples (statistics over {d['context']}) every {d['interval_s']:g} s, stride "
             f"{d['stride']}; an event starts when the CUSUM of score/threshold - 1 reaches {d['events']['h']:g}, "
             f"ends after {d['events']['end_after']} windows at 0",
             "  level: |mean input| over the statistics' samples" if d["level"] == LEVEL else
             "  level: mean |input| (trained before the level averaged first: train it again to see a shift of a "
             "few spreads in a noisy tag)",
             "  each tag's level over its own normal level, then their root sum of squares" if d["level_per_tag"] else
             "  the tags' levels summed as they are (trained before each was taken over its own normal level: a slow "
             "or heating tag sets the norm of all; train it again to see a shift in a noisy tag beside one)",
             f"  false alarms: {d['false_alarms'].get('asked', '?')} asked, the recording vouches for "
             f"{d['false_alarms'].get('vouched_down_to', '?')}",
             f"  threshold {d['threshold']:.4g}: {t.get('threshold_rule', 'not recorded')}",
             f"  trained on {t.get('samples', '?')} samples from {_names(t.get('recordings'))}; "
             f"{t.get('epochs', '?')} epochs, validation error {t.get('validation_error', '?')}",
             *([f"  {d['commissioned_note']}; record {duration_text(SLOW_EVIDENCE_S)} or more and train it again"]
               if d["commissioned_note"] else []),
             *([f"  read coarser than they vary (a step is one spread): {coarse}"]
               if (coarse := _pairs(t.get("coarse"))) else []),
             *([f"  glitches left out of training (readings): {glitches}"]
               if (glitches := _pairs(t.get("glitches"))) else []),
             f"  {d['bytes'] / 1024:.0f} KiB int8, sha256 {d['sha256'][:16]}..., "
             f"versions {', '.join(f'{k} {v}' for k, v in d['versions'].items())}"]
    print("\n".join(visible(line) for line in lines))  # (tag names are a CSV header's)
    return EX_OK

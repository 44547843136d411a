"""Anomaly detection on labelled recordings of real machines, commissioned and replayed as a user would.

Per recording: a model is trained by `edge-gateway model train` on its first `--commission` rows
(normal running; fewer when a fault starts earlier), and every later row is replayed through
`edge-gateway model score`; a row is flagged when its state is `anomaly`. In the same run, the
same protocol for:

- *previous*: the recipe of an earlier revision (`--previous`, default the commit before the
  current detector), its own `model train`/`model score` from a `git archive` of that revision;
- *trivial*: the sum over tags of the last 60 rows' mean |z| (z from the commissioning rows'
  median and spread), flagged above 1.5 x its 99.5th percentile over the commissioning rows.

Figures per recording and pooled: F1, false (share of normal rows flagged), missed (share of
fault rows not flagged), ROC AUC of the score over all replayed rows (pooled: of score /
threshold), faults with an event starting inside them, false events per hour of normal running,
median detection delay (fault start to its first flagged row).

Data (not shipped: the benchmark takes a path). DIR holds one CSV per recording: a time column,
one column per tag and a 0/1 column `anomaly` (the label). Two public sets are converted here:

- Cranfield's multiphase flow facility (Ruiz-Cárcel, Cao, Mba, Lao, Samuel, "Statistical process
  monitoring of a multiphase flow facility", Control Engineering Practice 42, 2015): a real
  pilot plant (air/water through a riser and two separators), 23-24 tags at 1 Hz, six kinds of
  fault introduced on purpose, 16 runs (`FaultyCase1.mat` to `FaultyCase6.mat` of its
  `CVACaseStudy` release; the fault intervals are the paper's Table 2). The 13 runs with at least
  7 minutes of normal running before their fault are used. Converting needs scipy (`pip install
  scipy`, not a dependency of the project);
- NAB's real-machine series with known causes (numenta/NAB, MIT licence): single tags, every 5 min.
- GECCO Industrial Challenge 2018 (Thüringer Fernwasserversorgung; Zenodo record 3884398, check its
  licence): a drinking-water supply's quality, 9 tags every minute (temperature, chlorine, pH, redox,
  conductivity, turbidity, flows), 139,566 rows with an EVENT label. Most of its 51 events were put
  into the data by the challenge (values no normal row has, in runs of equal length); five are as
  recorded. Cut here into 19 recordings: each event (those less than 480 normal rows apart as one)
  with up to 2,000 normal rows before it and 240 after.

    .venv/bin/python bench/realdata.py --prepare-cranfield DIR_WITH_MAT_FILES --data /tmp/realdata
    git clone --depth 1 https://github.com/numenta/NAB /tmp/NAB
    .venv/bin/python bench/realdata.py --prepare-nab /tmp/NAB --data /tmp/realdata-nab
    .venv/bin/python bench/realdata.py --prepare-gecco 1_gecco2018_water_quality.csv --data /tmp/realdata-gecco
    .venv/bin/python bench/realdata.py --data /tmp/realdata [--commission 420] [--false-alarms 1/week]
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gateway.anomaly.recording import read_csv, write_csv  # noqa: E402

PREVIOUS = "652c981"  # the last commit before each tag's level was taken over its own (stop 37)
NAB = ("machine_temperature_system_failure", "ambient_temperature_system_failure",
       "ec2_request_latency_system_failure", "cpu_utilization_asg_misconfiguration", "rogue_agent_key_hold")
TRIVIAL_WINDOW = 60
LABELS = ("anomaly", "label")


def prepare_nab(nab: Path, out: Path) -> None:
    """NAB's realKnownCause series with their labelled windows, as CSVs with an `anomaly` column."""
    windows = json.loads((nab / "labels" / "combined_windows.json").read_text())
    out.mkdir(parents=True, exist_ok=True)
    for name in NAB:
        with open(nab / "data" / "realKnownCause" / f"{name}.csv") as f:
            rows = list(csv.reader(f))[1:]
        spans = [[_utc(a), _utc(b)] for a, b in windows[f"realKnownCause/{name}.csv"]]
        with open(out / f"nab-{name}.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["time", "value", "anomaly"])
            for t, v in rows:
                ts = _utc(t)
                w.writerow([t.replace(" ", "T") + "Z", v, int(any(a <= ts <= b for a, b in spans))])
        print(f"wrote {out / f'nab-{name}.csv'} ({len(rows)} rows)")


GECCO_TAGS = ("Tp", "Cl", "pH", "Redox", "Leit", "Trueb", "Cl_2", "Fm", "Fm_2")
GECCO_BEFORE, GECCO_AFTER, GECCO_MARGIN = 2000, 240, 60  # normal rows kept before and after an event; left between


def prepare_gecco(raw: Path, out: Path, commission: int) -> None:
    """The GECCO 2018 water-quality CSV cut into recordings: each event (or events less than commission + margin
    normal rows apart) with the normal rows before it (at least `commission`) and after. Its times are local (CEST
    into CET): the rows are a minute apart, so they are stamped in UTC from the first."""
    with open(raw, newline="") as f:
        rows = list(csv.reader(f))
    header, rows = rows[0], rows[1:]
    if header[1:] != ["Time", *GECCO_TAGS, "EVENT"]:
        sys.exit(f"{raw}: not the GECCO 2018 water-quality CSV (columns {header})")
    values = [["" if v in ("", "NA") else v for v in r[2:11]] for r in rows]
    label = np.array([r[11] == "TRUE" for r in rows], dtype=int)
    start = dt.datetime.fromisoformat(rows[0][1]).replace(tzinfo=dt.timezone(dt.timedelta(hours=2)))
    groups: list[list[tuple[int, int]]] = []  # (first row, last row) of each event, both included
    for a, b in segments(label.astype(bool)):
        if groups and a - groups[-1][-1][1] - 1 < commission + GECCO_MARGIN:
            groups[-1].append((a, b))
        else:
            groups.append([(a, b)])
    begins = [max(g[0][0] - GECCO_BEFORE, prev[-1][1] + 1 + GECCO_MARGIN if prev else 0)
              for prev, g in zip([None, *groups[:-1]], groups, strict=True)]
    ends = [min(g[-1][1] + 1 + GECCO_AFTER, nxt) for g, nxt in zip(groups, [*begins[1:], len(rows)], strict=True)]
    out.mkdir(parents=True, exist_ok=True)
    for k, (group, begin, end) in enumerate(zip(groups, begins, ends, strict=True), 1):
        path = out / f"gecco2018-{k:02d}.csv"
        with open(path, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["time", *GECCO_TAGS, "anomaly"])
            for i in range(begin, end):
                stamp = (start + dt.timedelta(minutes=i)).astimezone(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
                w.writerow([stamp, *values[i], label[i]])
        print(f"wrote {path} ({end - begin} rows, {group[0][0] - begin} normal before the first of {len(group)} "
              f"event(s))")


# Cranfield's columns in the order of its .mat files (variable 24, the 2-inch line, only for fault case 6), and
# each run's fault intervals (1-based samples, both ends included) from the paper's Table 2.
CRANFIELD_TAGS = ("PT312_air_pressure", "PT401_riser_bottom_pressure", "PT408_riser_top_pressure",
                  "PT403_top_separator_pressure", "PT501_3phase_separator_pressure", "dP_riser", "dP_VC404",
                  "FT305_air_flow", "FT104_water_flow", "FT407_riser_flow", "LI405_top_separator_level",
                  "FT406_top_separator_flow", "FT407_riser_density", "FT406_top_separator_density",
                  "FT104_water_density", "FT407_riser_temp", "FT406_top_separator_temp", "FT104_water_temp",
                  "LI504_3phase_separator_level", "VC501_valve", "VC302_air_valve", "VC101_water_valve",
                  "PO1_pump_current", "PT417_2inch_line_pressure")
CRANFIELD_FAULTS = {
    "Set1_1": [(1566, 5181)], "Set1_2": [(657, 3777)], "Set1_3": [(691, 3691)],
    "Set2_1": [(2244, 6616)], "Set2_2": [(476, 2656)], "Set2_3": [(331, 2467)],
    "Set3_1": [(1136, 8352)], "Set3_2": [(333, 5871)], "Set3_3": [(596, 9566)],
    "Set4_1": [(953, 6294)], "Set4_2": [(851, 3851)], "Set4_3": [(241, 3241)],
    "Set5_1": [(686, 1172), (1772, 2253)], "Set5_2": [(1633, 2955), (7031, 7553), (8057, 10608)],
    "Set6_1": [(1723, 2800)], "Set6_2": [(1037, 4830)],
}


def prepare_cranfield(src: Path, out: Path, commission: int) -> None:
    """Each faulty run of FaultyCase1-6.mat as a CSV, 1 s apart from an arbitrary start; runs whose first fault
    comes before `commission` samples are left out (they leave nothing to commission on)."""
    try:
        from scipy.io import loadmat
        from scipy.io.matlab import MatReadError
    except ImportError:
        sys.exit("converting the .mat files needs scipy: pip install scipy")
    out.mkdir(parents=True, exist_ok=True)
    start = dt.datetime(2020, 1, 1, tzinfo=dt.timezone.utc)
    for case in range(1, 7):
        path = src / f"FaultyCase{case}.mat"
        if not path.is_file():
            sys.exit(f"{path}: no such file (MAT_DIR holds FaultyCase1.mat to FaultyCase6.mat)")
        try:
            sets = loadmat(path)
        except (OSError, ValueError, MatReadError) as err:  # unreadable, or not a MATLAB file
            sys.exit(f"cannot read {path}: {err}")
        tags = CRANFIELD_TAGS if case == 6 else CRANFIELD_TAGS[:23]
        for run in sorted(k for k in sets if k in CRANFIELD_FAULTS):
            values = np.asarray(sets[run], dtype=float)[:, :len(tags)]
            faults = CRANFIELD_FAULTS[run]
            if faults[0][0] - 1 < commission:
                print(f"{run}: left out, its fault starts after {faults[0][0] - 1} samples")
                continue
            label = np.zeros(len(values), dtype=int)
            for a, b in faults:
                label[a - 1:b] = 1
            path = out / f"cranfield-{run}-fault{case}.csv"
            with open(path, "w", newline="") as f:
                w = csv.writer(f)
                w.writerow(["time", *tags, "anomaly"])
                for i, (row, y) in enumerate(zip(values, label, strict=True)):
                    stamp = (start + dt.timedelta(seconds=i)).strftime("%Y-%m-%dT%H:%M:%SZ")
                    w.writerow([stamp, *(f"{v:.10g}" for v in row), y])
            print(f"wrote {path} ({len(values)} rows, {len(tags)} tags, {len(faults)} fault(s))")


def _utc(text: str) -> float:
    return dt.datetime.fromisoformat(text).replace(tzinfo=dt.timezone.utc).timestamp()


@dataclass
class Result:
    flagged: np.ndarray
    score: np.ndarray  # score / threshold, NaN where not scored
    starts: list[int] = field(default_factory=list)  # rows where an event starts


@dataclass
class Tally:
    tp: int = 0
    fp: int = 0
    fn: int = 0
    tn: int = 0
    faults: int = 0
    found: int = 0
    false_events: int = 0
    normal_s: float = 0.0
    delays: list[float] = field(default_factory=list)
    scores: list[np.ndarray] = field(default_factory=list)
    truths: list[np.ndarray] = field(default_factory=list)

    def add(self, r: Result, truth: np.ndarray, interval: float) -> None:
        f = r.flagged
        self.tp += int((f & truth).sum())
        self.fp += int((f & ~truth).sum())
        self.fn += int((~f & truth).sum())
        self.tn += int((~f & ~truth).sum())
        self.normal_s += float((~truth).sum()) * interval
        self.scores.append(r.score)
        self.truths.append(truth)
        for a, b in segments(truth):
            self.faults += 1
            if any(a <= s <= b for s in r.starts):
                self.found += 1
            hit = np.nonzero(f[a:b + 1])[0]
            if len(hit):
                self.delays.append(float(hit[0]) * interval)
        self.false_events += sum(not truth[s] for s in r.starts)

    def merge(self, o: Tally) -> None:
        for k in ("tp", "fp", "fn", "tn", "faults", "found", "false_events", "normal_s"):
            setattr(self, k, getattr(self, k) + getattr(o, k))
        self.delays += o.delays
        self.scores += o.scores
        self.truths += o.truths

    def line(self) -> str:
        f1 = 2 * self.tp / max(1, 2 * self.tp + self.fp + self.fn)
        far = self.fp / max(1, self.fp + self.tn)
        mar = self.fn / max(1, self.fn + self.tp)
        s, t = np.concatenate(self.scores), np.concatenate(self.truths)
        per_h = self.false_events / max(self.normal_s / 3600, 1e-9)
        delay = f"{statistics.median(self.delays):.0f}" if self.delays else "-"
        return (f"F1 {f1:4.2f}  false {far:6.1%}  missed {mar:6.1%}  AUC {auc(s, t):4.2f}  faults with an event "
                f"{self.found:>2}/{self.faults:<2}  false events/h {per_h:6.3f}  median delay {delay:>6} s")


def segments(truth: np.ndarray) -> list[tuple[int, int]]:
    out, start = [], None
    for i, v in enumerate(truth):
        if v and start is None:
            start = i
        elif not v and start is not None:
            out.append((start, i - 1))
            start = None
    if start is not None:
        out.append((start, len(truth) - 1))
    return out


def auc(score: np.ndarray, truth: np.ndarray) -> float:
    s = np.where(np.isnan(score), -np.inf, score)
    if truth.all() or not truth.any():
        return float("nan")
    order = np.argsort(s, kind="mergesort")
    ranks = np.empty(len(s))
    ranks[order] = np.arange(1, len(s) + 1)
    for v in np.unique(s):  # ties share their mean rank
        tie = s == v
        if tie.sum() > 1:
            ranks[tie] = ranks[tie].mean()
    n1 = truth.sum()
    return float((ranks[truth].sum() - n1 * (n1 + 1) / 2) / (n1 * (len(s) - n1)))


def cli(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(root)}
    result = subprocess.run([sys.executable, "-m", "gateway", *args], cwd=root, env=env, capture_output=True,
                            text=True, timeout=3600)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(args[:2])} in {root} failed ({result.returncode}): {result.stderr[-2000:]}")
    return result


def through_cli(root: Path, commission: Path, replay: Path, work: Path, extra: list[str]) -> Result:
    """Train on `commission`, score `replay`, as a user would, with the code in `root`."""
    cli(root, "model", "train", "m", "--csv", str(commission), "--out", str(work), *extra)
    scored = work / "scored.csv"
    cli(root, "model", "score", "m", "--csv", str(replay), "--model-dir", str(work), "--out", str(scored))
    with open(scored) as f:
        rows = list(csv.DictReader(f))
    flagged = np.array([r["state"] == "anomaly" for r in rows], dtype=bool)
    # The model's own threshold, not the row's (held higher after an event that subsided): AUC ranks the score.
    threshold = float(json.loads((work / "m.json").read_text())["threshold"])
    score = np.array([float(r["score"]) / threshold if r["score"] else np.nan for r in rows])
    score = _hold(score)
    starts = [i for i in range(len(flagged)) if flagged[i] and (i == 0 or not flagged[i - 1])]
    return Result(flagged, score, starts)


def _hold(score: np.ndarray) -> np.ndarray:
    """A row scored by no fresh window keeps the last window's score (stride > 1)."""
    out = score.copy()
    for i in range(1, len(out)):
        if np.isnan(out[i]):
            out[i] = out[i - 1]
    return out


def trivial(train: np.ndarray, rows: np.ndarray) -> Result:
    center = np.nanmedian(train, axis=0)
    spread = np.nanstd(train, axis=0)
    spread = np.where(spread > 0, spread, 1.0)

    def windowed(x: np.ndarray) -> np.ndarray:
        z = np.abs((x - center) / spread)
        z = np.nan_to_num(z)
        c = np.cumsum(np.vstack([np.zeros((1, z.shape[1])), z]), axis=0)
        out = np.full(len(x), np.nan)
        w = TRIVIAL_WINDOW
        if len(x) >= w:
            out[w - 1:] = ((c[w:] - c[:-w]) / w).sum(axis=1)
        return out

    base = windowed(train)
    threshold = 1.5 * float(np.nanpercentile(base, 99.5))
    score = windowed(np.vstack([train, rows]))[len(train):] / threshold
    flagged = np.nan_to_num(score) > 1.0
    starts = [i for i in range(len(flagged)) if flagged[i] and (i == 0 or not flagged[i - 1])]
    return Result(flagged, score, starts)


def previous_tree(rev: str, into: Path) -> Path | None:
    """The code of revision `rev`, extracted from this repository's git history, or None without git."""
    archive = into / "previous.tar"
    try:
        subprocess.run(["git", "archive", "-o", str(archive), rev], cwd=ROOT, check=True, capture_output=True)
    except (OSError, subprocess.CalledProcessError) as err:
        print(f"previous recipe skipped: cannot extract {rev} from git ({err})")
        return None
    tree = into / "previous"
    with tarfile.open(archive) as tar:
        tar.extractall(tree, filter="data")
    return tree


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, metavar="DIR", help="labelled recordings (see the docstring)")
    parser.add_argument("--prepare-nab", metavar="NAB", help="convert a NAB checkout into DIR, then stop")
    parser.add_argument("--prepare-cranfield", metavar="MAT_DIR", help="convert Cranfield's FaultyCase1-6.mat into "
                        "DIR, then stop")
    parser.add_argument("--prepare-gecco", metavar="CSV", help="convert GECCO 2018's water-quality CSV into DIR, "
                        "then stop")
    parser.add_argument("--commission", type=int, default=420, help="rows of normal running to train on "
                        "(default %(default)s: 7 minutes at 1 Hz)")
    parser.add_argument("--false-alarms", default="1/week", help="the new method's operating point")
    parser.add_argument("--previous", default=PREVIOUS, help="git revision of the previous recipe ('' to skip)")
    args = parser.parse_args()
    if args.prepare_nab:
        prepare_nab(Path(args.prepare_nab), Path(args.data))
        return
    if args.prepare_cranfield:
        prepare_cranfield(Path(args.prepare_cranfield), Path(args.data), args.commission)
        return
    if args.prepare_gecco:
        prepare_gecco(Path(args.prepare_gecco), Path(args.data), args.commission)
        return
    files = sorted(Path(args.data).glob("*.csv"))
    if not files:
        sys.exit(f"no recordings (*.csv) in {args.data}")
    methods = ("new", "previous", "trivial")
    pooled = {m: Tally() for m in methods}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        old = previous_tree(args.previous, tmp) if args.previous else None
        for path in files:
            rec = read_csv(path)
            label = next((t for t in rec.tags if t.lower() in LABELS), None)
            if label is None:
                print(f"{path.name}: skipped, no anomaly/label column")
                continue
            truth_all = rec.select([label]).values[:, 0] > 0.5
            tags = [t for t in rec.tags if t != label]
            values = rec.select(tags).values
            first_fault = int(np.argmax(truth_all)) if truth_all.any() else len(truth_all)
            n = min(args.commission, first_fault)
            if n < 200:
                print(f"{path.name}: skipped, only {n} normal rows before the first fault")
                continue
            interval = float(np.median(np.diff(rec.times)))
            commission, replay = tmp / "commission.csv", tmp / "replay.csv"
            write_csv(commission, tags, [(t, r) for t, r in zip(rec.times[:n], values[:n].tolist(), strict=True)])
            write_csv(replay, tags, [(t, r) for t, r in zip(rec.times[n:], values[n:].tolist(), strict=True)])
            truth = truth_all[n:]
            print(f"{path.name}: {len(tags)} tag(s), {len(rec)} rows every {interval:g} s, commissioned on {n}, "
                  f"{len(segments(truth))} fault(s) in the {len(truth)} replayed rows")
            results: dict[str, Result] = {}
            for m in methods:
                work = tmp / m
                work.mkdir(exist_ok=True)
                try:
                    if m == "new":
                        results[m] = through_cli(ROOT, commission, replay, work, ["--false-alarms", args.false_alarms])
                    elif m == "previous" and old is not None:
                        results[m] = through_cli(old, commission, replay, work, [])
                    elif m == "trivial":
                        results[m] = trivial(values[:n], values[n:])
                except RuntimeError as err:
                    print(f"  {m:<9} failed: {err}")
            for m, r in results.items():
                t = Tally()
                t.add(r, truth, interval)
                pooled[m].merge(t)
                print(f"  {m:<9} {t.line()}")
    print("pooled over the recordings:")
    for m in methods:
        if pooled[m].scores:
            print(f"  {m:<9} {pooled[m].line()}")
    print("targets (unseen pump recordings): F1 >= 0.80, false <= 15 %, missed <= 25 %, >= 30 of 34 faults with an "
          "event, <= 1 false event per hour")


if __name__ == "__main__":
    main()

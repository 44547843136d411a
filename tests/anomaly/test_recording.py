"""Recordings as plants export them: CSV edge cases, the sample grid, and `model` errors before any training."""

from __future__ import annotations

import errno
import math
import os
import stat
import subprocess
import sys
import threading

import numpy as np
import pytest

from gateway.anomaly.recording import DataError, format_time, parse_time, read_csv, write_csv
from tests.helpers import ENV, ROOT


def write(tmp_path, text: str, name: str = "rec.csv"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_semicolons_decimal_commas_and_a_named_datetime_column(tmp_path):
    path = write(tmp_path, "datetime;Accelerometer1RMS;Temperature;anomaly\n"
                           "2020-03-09 10:14:33;0,0273;71,4;0\n"
                           "2020-03-09 10:14:34;0,0278;71,5;0\n")
    rec = read_csv(path)
    assert rec.tags == ["Accelerometer1RMS", "Temperature", "anomaly"]
    assert rec.values[0].tolist() == [0.0273, 71.4, 0.0]
    assert rec.times[1] - rec.times[0] == 1.0
    assert format_time(rec.times[0]) == "2020-03-09T10:14:33Z"  # no zone: UTC


def test_missing_cells_unsorted_and_duplicate_times_and_a_text_column(tmp_path):
    path = write(tmp_path, "when,flow,note,pressure\n"
                           "2026-11-24T06:00:02Z,3.0,ok,\n"
                           "2026-11-24T06:00:00Z,1.0,ok,5.0\n"
                           "2026-11-24T06:00:01Z,,ok,5.1\n"
                           "2026-11-24T06:00:02Z,3.5,late,5.2\n"
                           "2026-11-24T06:00:03Z,n/a,ok,5.3\n")
    rec = read_csv(path)
    assert rec.tags == ["flow", "pressure"]  # the time column found by its cells; the text column left out
    assert [format_time(t) for t in rec.times] == [f"2026-11-24T06:00:0{i}Z" for i in range(4)]
    flow = rec.values[:, 0]
    assert flow[0] == 1.0 and math.isnan(flow[1]) and flow[2] == 3.5 and math.isnan(flow[3])  # last of a time wins
    assert "column note left out: not numeric" in rec.notes
    assert "rows put in time order" in rec.notes
    assert any("time given twice" in n for n in rec.notes)
    assert any("flow: 1 cell(s) not a number" in n for n in rec.notes)


def test_epoch_seconds_and_milliseconds_in_a_time_column(tmp_path):
    rec = read_csv(write(tmp_path, "ts,a\n1790000000,1\n1790000001,2\n"))
    assert rec.times.tolist() == [1790000000.0, 1790000001.0]
    rec = read_csv(write(tmp_path, "timestamp,a\n1790000000000,1\n1790000000500,2\n"))
    assert rec.times.tolist() == [1790000000.0, 1790000000.5]


@pytest.mark.parametrize("text,expected", [
    ("", "empty file"),
    ("a,b\n1,2\n3,4\n", "no time column found among a, b: name it with --time-column"),
    ("time,a\n2026-11-24T06:00:00Z,1\nyesterday,2\n", ":3: column time: 'yesterday' is not a time"),
    ("time,a\n2026-11-24T06:00:00Z,1,7\n", ":2: 3 cells, but the header names 2 columns"),
    ("time,a,a\n2026-11-24T06:00:00Z,1,2\n", "column a appears more than once"),
    ("time,label\n2026-11-24T06:00:00Z,on\n", "no numeric column besides the time column time"),
    ("time,a\n2026-11-24T06:00:00Z," + "9" * 10_000_000 + "\n", "not a CSV recording: field larger than field limit"),
    # Times no replay or export could write back (a traceback in `model score` before): epoch microseconds, the
    # year 9999 at -05:00 (10000 in UTC), a damaged epoch cell.
    ("time,a\n1772323200000000,1\n", ":2: column time: '1772323200000000' is not a time (RFC 3339, e.g. "
                                     "2026-03-09T10:14:33Z, or epoch seconds or milliseconds, from the year 1 to 9999"),
    ("time,a\n9999-12-31T23:00:00-05:00,1\n", ":2: column time: '9999-12-31T23:00:00-05:00' is not a time"),
    ("time,a\n1772323200,1\n1e300,2\n", ":3: column time: '1e300' is not a time"),
])
def test_what_cannot_be_read_is_said_with_file_and_line(tmp_path, text, expected):
    with pytest.raises(DataError) as err:
        read_csv(write(tmp_path, text))
    assert expected in str(err.value)
    assert str(tmp_path / "rec.csv") in str(err.value)


@pytest.mark.parametrize("where,lineno,cell", [(899, 901, "'\"0.5,899'"), (998, 1000, "'\"0.5,998'"),
                                              (None, 1, "'\"a,b'")], ids=["row", "last-row", "header"])
def test_a_quote_that_its_line_does_not_close_is_refused_naming_the_line(tmp_path, where, lineno, cell):
    """An attack pass: a cell `"0.5` in row 900 of 999 took every line after it into one cell: 900 rows read, the
    last 99 silently gone; in the last row it was read as 0.5. In the header it took the whole file (no rows); in a
    long file it ended in "field larger than field limit", with no line."""
    stray = '"0.5'
    rows = "".join(f"{1.79e9 + i},{stray if i == where else i},{i}\n" for i in range(999))
    path = write(tmp_path, ("time,\"a,b\n" if where is None else "time,a,b\n") + rows)
    with pytest.raises(DataError) as err:
        read_csv(path)
    assert str(err.value) == (f"{path}:{lineno}: column {'2' if where is None else 'a'}: the cell {cell} opens a quote "
                              f"that this line does not close: expected its closing quote on the same line (a "
                              f"recording holds one row per line)")
    long = write(tmp_path, "time,a\n1790000000,\"1\n" + "1790000001,2\n" * 20_000, "long.csv")
    with pytest.raises(DataError, match=r"long.csv:2: column a: the cell '\"1' opens a quote"):
        read_csv(long)
    quoted = read_csv(write(tmp_path, 'time,"a",b\n1790000000,"1.5","x""y"\n', "quoted.csv"))  # closed: read as ever
    assert quoted.tags == ["a"] and quoted.values.tolist() == [[1.5]]


def test_a_windows_1252_export_splits_only_at_line_ends_and_an_unnamed_index_column_is_no_tag(tmp_path):
    """str.splitlines() broke a line at 0x85 (Windows-1252's "...", read as Latin-1 U+0085): the good row after it
    was refused as line 3. pandas writes its row index as a column without a name: it is no tag."""
    path = tmp_path / "rec.csv"
    path.write_bytes(b",time,a,state\r\n0,2026-11-24T06:00:00Z,1.5,Running\x85\r\n1,2026-11-24T06:00:01Z,2.5,Stop\x0c\r\n")
    rec = read_csv(path)
    assert rec.tags == ["a"] and rec.values[:, 0].tolist() == [1.5, 2.5] and len(rec.times) == 2
    assert "column 1 left out: it has no name" in rec.notes and "column state left out: not numeric" in rec.notes


def test_a_file_without_end_is_refused_not_read_into_memory(tmp_path, monkeypatch):
    from gateway.anomaly import recording
    monkeypatch.setattr(recording, "MAX_BYTES", 1000)  # 512 MiB here: /dev/zero, or a stream, read up to there
    with pytest.raises(DataError, match="larger than 0 MiB, more than this reads at once: give it in parts"):
        read_csv(write(tmp_path, "time,a\n" + "2026-11-24T06:00:00Z,1\n" * 100))


_UNDER_A_LIMIT = """
import resource, sys
from gateway.anomaly.recording import read_csv
size = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmSize:")) << 10
resource.setrlimit(resource.RLIMIT_AS, (size + (64 << 20), resource.RLIM_INFINITY))  # 64 MiB more than now
for path in sys.argv[1:]:
    print(len(read_csv(path, tags=["t1", "t2", "t3"])))
"""


def test_reading_takes_memory_by_the_files_size_not_max_bytes_nor_every_cell_as_a_string(tmp_path):
    """An attack pass: read(MAX_BYTES + 1) allocated 512 MiB for a file of 35 KB (a MemoryError traceback under
    `ulimit -v 600000`), and every cell of every column was kept as a string: 18 times the file's size (1 GB for 53
    MiB), when `tags` picks three of 50. Here 64 MiB above what the process holds reads a file of 10 MB."""
    small = write(tmp_path, "time,t1,t2,t3\n2026-11-24T06:00:00Z,1,2,3\n", "small.csv")
    wide = tmp_path / "wide.csv"
    with wide.open("w") as f:
        f.write("time," + ",".join(f"t{j}" for j in range(50)) + "\n")
        for i in range(25_000):
            f.write(f"{1.79e9 + i}," + ",".join(f"{math.sin(i + j):.5f}" for j in range(50)) + "\n")
    assert 9e6 < wide.stat().st_size < 11e6
    result = subprocess.run([sys.executable, "-c", _UNDER_A_LIMIT, str(small), str(wide)], capture_output=True, text=True,
                            env={**ENV, "OPENBLAS_NUM_THREADS": "1"}, cwd=ROOT, timeout=120)
    assert result.returncode == 0 and result.stdout.split() == ["1", "25000"], result.stderr


def test_running_out_of_memory_is_a_data_error_not_a_traceback(tmp_path, monkeypatch):
    from gateway.anomaly import recording

    def exhausted(raw):
        raise MemoryError
    monkeypatch.setattr(recording, "_decoded", exhausted)
    path = write(tmp_path, "time,a\n2026-11-24T06:00:00Z,1\n")
    with pytest.raises(DataError) as err:
        read_csv(path)
    assert str(err.value) == (f"{path}: too large to read here (out of memory): give it in parts (model train takes "
                              f"--csv more than once)")


def test_a_fifo_no_program_writes_to_is_exit_65_not_a_hang_and_a_device_or_directory_is_refused(tmp_path):
    """An attack pass: `--csv FIFO` blocked in open() for ever, waiting for a writer; /dev/zero was read up to 512 MiB
    before it was refused. A pipe a program writes into (`--csv /dev/stdin`) is read as before."""
    fifo = tmp_path / "fifo.csv"
    os.mkfifo(fifo)
    result = subprocess.run([sys.executable, "-m", "gateway", "model", "train", "m", "--csv", str(fifo), "--out",
                             str(tmp_path)], capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=60)
    assert result.returncode == 65, result.stderr
    assert f"{fifo}: a pipe with nothing written into it (no program had it open to write): expected a CSV file, or a " \
           f"pipe that a program writes a recording into" in result.stderr and "Traceback" not in result.stderr
    for path, kind in (("/dev/zero", "a device"), (tmp_path, "a directory")):
        with pytest.raises(DataError) as err:
            read_csv(path)
        assert str(err.value) == f"{path} is {kind}, not a file: expected a CSV file (or a pipe, such as /dev/stdin)"
    rows = "time,a,b\n" + "".join(f"{1.79e9 + i},{math.sin(i)},{math.cos(i)}\n" for i in range(90))
    result = subprocess.run([sys.executable, "-m", "gateway", "model", "train", "m", "--csv", "/dev/stdin", "--out",
                             str(tmp_path)], input=rows, capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=120)
    assert result.returncode == 65 and "too little normal running to train on: 90 samples" in result.stderr, result.stderr


def test_named_tags_and_time_column(tmp_path):
    path = write(tmp_path, "t;x;y\n2026-11-24 06:00:00;1;2\n2026-11-24 06:00:01;3;4\n")
    assert read_csv(path, time_column="t", tags=["y"]).values.tolist() == [[2.0], [4.0]]
    with pytest.raises(DataError, match="no column z"):
        read_csv(path, tags=["z"])
    with pytest.raises(DataError, match="no time column 'when'"):
        read_csv(path, time_column="when")


def test_not_utf8_bytes_are_read_as_latin1(tmp_path):
    path = tmp_path / "rec.csv"
    path.write_bytes("time;Temp\xe9rature\n2026-11-24 06:00:00;1,5\n".encode("latin-1"))
    assert read_csv(path).tags == ["Temp\xe9rature"]


def test_a_spreadsheets_unicode_text_export_utf16_tabs_and_decimal_commas(tmp_path):
    path = tmp_path / "rec.txt"
    text = "Zeit\tDruck bar\tTemperatur \u00b0C\r\n2026-11-24 06:00:00\t1,25\t71,5\r\n2026-11-24 06:00:01\t1,5\t\r\n"
    path.write_bytes(b"\xff\xfe" + text.encode("utf-16-le"))  # Excel: Save as "Unicode Text (*.txt)"
    rec = read_csv(path, time_column="Zeit")
    assert rec.tags == ["Druck bar", "Temperatur \u00b0C"]
    assert rec.values[:, 0].tolist() == [1.25, 1.5]
    assert rec.values[0, 1] == 71.5 and math.isnan(rec.values[1, 1])


def test_tab_separated_with_decimal_points(tmp_path):
    path = write(tmp_path, "time\tflow\n2026-11-24T06:00:00Z\t3.5\n2026-11-24T06:00:01Z\t4\n")
    rec = read_csv(path)
    assert rec.tags == ["flow"] and rec.values[:, 0].tolist() == [3.5, 4.0]


def test_a_header_of_thousands_of_columns_is_named_in_a_bounded_message(tmp_path):
    header = ",".join(f"t{i}" for i in range(5000))
    path = write(tmp_path, f"time,{header}\n2026-11-24T06:00:00Z,{','.join(['1'] * 5000)}\n")
    with pytest.raises(DataError) as err:
        read_csv(path, tags=["flow"])
    assert str(err.value).endswith("no column flow (it has time, t0, t1, t2, t3, t4, t5, t6, t7, t8, t9, t10, t11, "
                                   "t12, t13, t14, t15, t16, t17, t18 and 4981 more)")


def test_a_header_of_one_20_000_character_name_is_cut_short_in_the_message(tmp_path):
    path = write(tmp_path, "[" * 10000 + "]" * 10000 + "\n")  # JSON nested 10,000 deep, given as a recording
    with pytest.raises(DataError) as err:
        read_csv(path)
    assert str(err.value).endswith(f"no time column found among {'[' * 60}...: name it with --time-column")


def test_the_grid_puts_rows_in_their_slots_and_cuts_long_gaps(tmp_path):
    rows = [(0.0, [1.0]), (1.0, [2.0]), (3.0, [4.0]), (1000.0, [5.0])]
    write_csv(tmp_path / "g.csv", ["a"], [(1.79e9 + t, v) for t, v in rows])
    rec = read_csv(tmp_path / "g.csv")
    times, values = rec.on_grid(1.0, max_gap=5)
    a = values[:, 0]
    assert a[:2].tolist() == [1.0, 2.0] and np.isnan(a[2]) and a[3] == 4.0 and a[-1] == 5.0
    assert np.isnan(a[4:-1]).all()
    assert len(values) == 4 + 6  # 996 missing seconds count as 6: enough to break every window across them
    assert times[-1] == 1.79e9 + 1000.0


@pytest.mark.parametrize("ts", [1796559094.9996, 1796559094.99951, 1796559094.9999996, 1796559094.9994,
                                1796559095.0, 1796559095.0004, 1796559095.02, 1.79e9 - 0.0003])
def test_a_time_half_a_millisecond_before_a_second_is_exported_as_that_second_not_the_one_before(ts):
    """The export gives a sample's time to the millisecond, as a Sparkplug DDATA stamps it (round(ts × 1000)).
    Before, a time within half a millisecond of the next second came out a whole second early
    (12:11:34.9996 as 12:11:34Z): the Sparkplug tests took such a sample, which a DDATA had carried at
    ...:35.000, for one never sent (1796559095000 and 1796554900000 ms, both "lost" on a whole second)."""
    assert round(parse_time(format_time(ts)) * 1000) == round(ts * 1000)


def test_a_time_before_the_year_1000_is_written_with_four_digits_and_reads_back(tmp_path):
    """An attack pass: the year 1 went out as "1-01-01T00:00:00Z" (strftime's %Y), which read_csv refused: an
    export or a replay of such times could not be read back."""
    first = parse_time("0001-01-01T00:00:00Z")
    assert first is not None and format_time(first) == "0001-01-01T00:00:00Z"
    assert format_time(parse_time("0999-12-31T23:59:59.5Z")) == "0999-12-31T23:59:59.500Z"
    write_csv(tmp_path / "old.csv", ["a"], [(first, [1.0]), (first + 1, [2.0])])
    assert read_csv(tmp_path / "old.csv").times.tolist() == [first, first + 1]


def test_an_exported_history_keeps_its_time_order_across_each_second(tmp_path):
    times = [1796559094.0 + 0.0197 + 0.02 * i for i in range(200)]  # 20 ms apart, one a second at .9997
    write_csv(tmp_path / "h.csv", ["a"], [(t, [float(i)]) for i, t in enumerate(times)])
    rec = read_csv(tmp_path / "h.csv")
    assert "rows put in time order" not in rec.notes
    assert [round(t * 1000) for t in rec.times] == [round(t * 1000) for t in times]


def test_export_format_round_trips(tmp_path):
    write_csv(tmp_path / "x.csv", ["a", "b"], [(1.79e9, [1.5, None]), (1.79e9 + 0.25, [2.0, 3.0])])
    text = (tmp_path / "x.csv").read_text().splitlines()
    assert text[0] == "time,a,b"
    assert text[1] == f"{format_time(1.79e9)},1.5,"
    assert text[2].startswith(format_time(1.79e9)[:-1] + ".250Z")
    rec = read_csv(tmp_path / "x.csv")
    assert rec.times[1] - rec.times[0] == pytest.approx(0.25)
    assert parse_time("2026-11-24T06:00:00+01:00") == parse_time("2026-11-24T05:00:00Z")


def test_too_few_rows_is_exit_65_before_any_training(tmp_path):
    write_csv(tmp_path / "short.csv", ["a", "b"],
              [(1.79e9 + i, [math.sin(i), math.cos(i)]) for i in range(90)])
    result = subprocess.run([sys.executable, "-m", "gateway", "model", "train", "m", "--csv",
                             str(tmp_path / "short.csv"), "--out", str(tmp_path)],
                            capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=120)
    assert result.returncode == 65, result.stderr
    assert "too little normal running to train on: 90 samples" in result.stderr
    # (what the context needs too: the first check said 208, and with 208 samples the next said 300)
    assert "about 300 samples (5.0 min at 1 s)" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
    assert not list(tmp_path.glob("m.*"))


@pytest.mark.parametrize("wild,top", [(lambda i: 1e250 if i % 97 == 0 else math.sin(i), "1e+250"),
                                      (lambda i: 1e308 if i % 2 else -1e308, "1e+308")], ids=["1e250", "1e308"])
def test_readings_beyond_what_a_model_can_scale_are_exit_65_naming_the_tag_before_any_training(tmp_path, wild, top):
    """Seven readings of 1e250 in 600 (more than a glitch) made a spread no model can hold: training failed on its
    own temporary metadata, with TensorFlow's notices on stderr. Readings of ±1e308 made a spread that overflowed
    (NaN), taken as 1: trained on as they read, to a loss of inf, and the process crashed (exit 139)."""
    write_csv(tmp_path / "wild.csv", ["a", "b"], [(1.79e9 + i, [wild(i), math.cos(i)]) for i in range(600)])
    result = subprocess.run([sys.executable, "-m", "gateway", "model", "train", "m", "--csv",
                             str(tmp_path / "wild.csv"), "--out", str(tmp_path)],
                            capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=120)
    assert result.returncode == 65, result.stderr
    assert f"tag a reads up to {top}: beyond what a model can scale" in result.stderr
    assert "Traceback" not in result.stderr and "oneDNN" not in result.stderr and ".tmp" not in result.stderr
    assert not list(tmp_path.glob("m.*"))


@pytest.mark.parametrize("args,code,expected", [
    (["train", "m"], 64, "give either --csv FILE (repeatable) or --device DEV -c CONFIG"),
    (["train", "m", "--csv", "/nonexistent.csv"], 65, "cannot read /nonexistent.csv"),
    (["train", "m", "--csv", "x.csv", "--context", "20000"], 64, "--context 2 to 10000"),
    (["train", "m", "--csv", "x.csv", "--tags", ",,"], 64, "--tags ',,' names no tag"),
    (["train", "m", "--csv", "x.csv", "--tags", "a,b,a"], 64, "--tags names a more than once"),
    (["train", "m", "--csv", "x.csv", "--drift-tags", "none,a"], 64, "--drift-tags none stands alone"),
    (["train", "m", "--csv", "x.csv", "--interval", "0s"], 64, "--interval '0s': expected a duration from 0.001 s"),
    (["train", "m", "--csv", "x.csv", "--interval", "1000d"], 64, "to 1e+07 s, such as 1s or 500ms"),
    (["train", "../escaped", "--csv", "x.csv"], 64, "model name '../escaped': lower-case letters, digits, _ and - only"),
    (["train", "", "--csv", "x.csv"], 64, "model name '': lower-case letters"),
    (["score", "a/b", "--csv", "x.csv"], 64, "model name 'a/b': lower-case letters"),
    (["train", "m", "--csv", "x.csv", "--baseline", "0s"], 64, "--baseline '0s': expected a duration above 0"),
    (["train", "m", "--csv", "x.csv", "--plot", "/nonexistent/r.html"], 73,  # before any training, not after
     "/nonexistent/r.html: no directory /nonexistent to write it in"),  # (--out DIR --plot DIR/r.html: DIR is made)
    (["score", "nosuch", "--csv", "x.csv", "--model-dir", "/tmp"], 65, "model nosuch: cannot read /tmp/nosuch.tflite"),
])
def test_model_command_errors(tmp_path, args, code, expected, capsys, monkeypatch):
    from gateway.cli import main  # in this process: each of these ends before any model or recording is used
    monkeypatch.chdir(tmp_path)
    assert main(["model", *args]) == code
    assert expected in capsys.readouterr().err


def test_an_interval_finer_than_the_recording_is_exit_65_before_any_training(tmp_path):
    write_csv(tmp_path / "x.csv", ["a", "b"], [(1.79e9 + i, [math.sin(i), math.cos(i)]) for i in range(600)])
    result = subprocess.run([sys.executable, "-m", "gateway", "model", "train", "m", "--csv", "x.csv",
                             "--interval", "100ms"], capture_output=True, text=True, env=ENV, cwd=tmp_path, timeout=60)
    assert result.returncode == 65, result.stderr
    assert ("--interval 0.1s is finer than the recordings' own step (1 s): most samples would be missing. Give "
            "--interval 1s, or leave it out") in result.stderr
    assert not list(tmp_path.glob("m.*"))


@pytest.mark.parametrize("args,expected", [
    # A context longer than the held-out part (the last 20 %, 120 of 600 rows): a traceback in np.stack before.
    (["--context", "150"], "too little normal running for a context of 150 samples: the held-out part (the last 20% "
                           "of each recording) holds 0 scores; at least 30 are needed, about 900 samples (15.0 min at "
                           "1 s) without gaps, or a shorter --context"),
    # More false events than there are contexts: silently the same threshold as 1/min before, claimed as asked.
    (["--false-alarms", "1/s"], "--false-alarms 60/min: more than one false event in every two contexts (60 s) is no "
                                "threshold; ask for fewer, e.g. 1/day"),
    # An interval that leaves a 10-minute recording a sample or two.
    (["--interval", "4h"], "a sample every 14400 s gives the longest recording 1 sample(s) (it spans 10 min): too few "
                           "to train on. Give longer recordings, or a shorter --interval"),
])
@pytest.mark.slow  # subprocesses of the CLI: the fast tier keeps under a minute
def test_options_the_recording_cannot_serve_are_exit_65_before_any_training(tmp_path, args, expected):
    write_csv(tmp_path / "x.csv", ["a", "b"], [(1.79e9 + i, [math.sin(i), math.cos(i)]) for i in range(600)])
    result = subprocess.run([sys.executable, "-m", "gateway", "model", "train", "m", "--csv", "x.csv", *args],
                            capture_output=True, text=True, env=ENV, cwd=tmp_path, timeout=60)
    assert result.returncode == 65, result.stderr
    assert expected in result.stderr and "Traceback" not in result.stderr
    assert not list(tmp_path.glob("m.*"))


def test_an_export_to_a_device_a_pipe_or_a_link_leaves_it_in_place(tmp_path):
    """`history export --csv PATH` writes a file beside and renames it over the target: whole or not at all. Renamed
    over /dev/full (as root) it replaced the device node with a regular file; over a link, the link."""
    rows = [(1.79e9 + i, [float(i), None]) for i in range(100)]
    with pytest.raises(OSError) as full:
        write_csv("/dev/full", ["a", "b"], rows)
    assert full.value.errno == errno.ENOSPC and stat.S_ISCHR(os.stat("/dev/full").st_mode)
    real, link = tmp_path / "real.csv", tmp_path / "link.csv"
    real.write_text("old\n")
    link.symlink_to(real)
    assert write_csv(link, ["a", "b"], rows) == 100
    assert link.is_symlink() and real.read_text().startswith("time,a,b\n") and len(real.read_text().splitlines()) == 101
    fifo, got = tmp_path / "fifo", []
    os.mkfifo(fifo)
    reader = threading.Thread(target=lambda: got.append(fifo.read_text()))
    reader.start()
    assert write_csv(fifo, ["a", "b"], rows) == 100
    reader.join(10)
    assert stat.S_ISFIFO(os.stat(fifo).st_mode) and len(got[0].splitlines()) == 101
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fifo", "link.csv", "real.csv"]  # no .tmp left


def test_an_export_that_fills_the_disk_leaves_nothing_behind(tmp_path):
    small = tmp_path / "small"
    small.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(small)]).returncode:
        pytest.skip("needs root to mount a small tmpfs")
    try:
        (small / "x.csv").write_text("the last good export\n")
        with pytest.raises(OSError) as full:
            write_csv(small / "x.csv", ["a"], [(1.79e9 + i, [float(i)]) for i in range(10_000)])
        assert full.value.errno == errno.ENOSPC
        assert [p.name for p in small.iterdir()] == ["x.csv"] and (small / "x.csv").read_text() == "the last good export\n"
    finally:
        subprocess.run(["umount", str(small)], check=True)


def test_a_damaged_history_file_is_exit_65_not_a_traceback(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "history.db").write_bytes(b"\x00garbage, not SQLite" * 5000)
    (tmp_path / "gw.yaml").write_text(f'gateway: {{id: w, site: lab, data_dir: "{data}"}}\n'
                                      "upstream: {host: 127.0.0.1}\n"
                                      "devices: [{name: p1, source: sim, profile: pump, history: {}}]\n")
    for args in (["history", "export", "p1", "--csv", "x.csv"], ["model", "train", "m", "--device", "p1"]):
        result = subprocess.run([sys.executable, "-m", "gateway", *args, "-c", str(tmp_path / "gw.yaml")],
                                capture_output=True, text=True, env=ENV, cwd=tmp_path, timeout=60)
        assert result.returncode == 65, result.stderr
        assert "cannot read the history" in result.stderr and "Traceback" not in result.stderr


def test_a_span_that_ends_before_it_begins_is_a_usage_error(tmp_path, capsys):
    """A fuzzing pass: `history export --from 2030... --to 2020...` exited 0 with no row."""
    from gateway import cli

    data = tmp_path / "data"
    data.mkdir()
    (tmp_path / "gw.yaml").write_text(f'gateway: {{id: w, site: lab, data_dir: "{data}"}}\n'
                                      "upstream: {host: 127.0.0.1}\n"
                                      "devices: [{name: p1, source: sim, profile: pump, history: {}}]\n")
    from gateway.store.history import History
    History.open(data / "history.db").close()
    for command in (["history", "export", "p1", "--csv", str(tmp_path / "x.csv")], ["model", "train", "m", "--device", "p1"]):
        code = cli.main([*command, "--from", "2030-01-01", "--to", "2020-01-01", "-c", str(tmp_path / "gw.yaml")])
        assert code == 64 and "--to 2020-01-01 is before --from 2030-01-01" in capsys.readouterr().err, command


def test_model_train_from_a_device_with_a_config_it_cannot_read_is_78_not_a_traceback(tmp_path, capsys):
    """A docs audit: `model train --device` without -c (no /etc config) or with a broken one ended in a traceback,
    exit 1, where run, status and history say it in one line and exit 78."""
    from gateway import cli

    (tmp_path / "bad.yaml").write_text("devices: [\n")
    for config in (str(tmp_path / "missing.yaml"), str(tmp_path / "bad.yaml")):
        assert cli.main(["model", "train", "m", "--device", "p1", "--out", str(tmp_path), "-c", config]) == 78
        err = capsys.readouterr().err
        assert err.startswith(config) and "Traceback" not in err, err


def test_a_column_name_with_control_characters_is_shown_escaped(tmp_path):
    """An attack pass: error messages echoed a column's name as it was: an escape sequence (colouring or clearing
    the terminal) or a right-to-left override rewrote the line the user reads."""
    name = "a\x1b[2J\u202eb"
    (tmp_path / "ctl.csv").write_text("time," + name + ",c\n" + "".join(f"{1.79e9 + i},x,{i}\n" for i in range(100)))
    result = subprocess.run([sys.executable, "-m", "gateway", "model", "train", "m", "--csv", str(tmp_path / "ctl.csv"),
                             "--tags", "nope"], capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=120)
    assert result.returncode == 65 and "a\\x1b[2J\\u202eb" in result.stderr, result.stderr
    assert "\x1b" not in result.stderr and "\u202e" not in result.stderr

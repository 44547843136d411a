"""A seeded config fuzzer: whatever a hand edit, a bad copy or a broken disk does to a config,
`check-config` ends in 0 or 78 with path-named messages — never a traceback, never another code.

It mutates every example (examples/*.yaml and examples/installed/), each also with its commented
keys uncommented (web:, OPC UA security, Sparkplug, coils...) and the files they name present.
The test runs 300 mutations; a larger run, not part of the suite:
    .venv/bin/python tests/test_fuzz.py --seeds 0-9 --mutations 2000
"""

from __future__ import annotations

import io
import logging
import random
import re
import sys
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest

from gateway import cli
from gateway.errors import EX_CONFIG, EX_OK

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml")) + sorted((ROOT / "examples" / "installed").glob("*.yaml"))
MUTATIONS = 300
SCALAR = re.compile(r"(?<=: )[^\s{}\[\],#][^,}\]\n#]*")  # a value after "key: ", block or flow style
LINE = re.compile(r"(?m)(?<=: )[^\s#].*$")  # all of a block-style line after "key: "

ODD_VALUES = [
    "9" * 4400, "-" + "9" * 400, "-1e400", "1e400", ".nan", "-.inf", "0x7fffffffffffffffffff", "1_000",
    "~", "true", "[]", "{}", '""', "''", "'{site.x}'", '"edge/{site.x}/{0}"', '"{gateway_id!r:>99999}"',
    "!!binary aGVsbG8=", "!!float 1e999", "!!python/name:os.system", "&a [*a]", "*nope", "2026-11-24",
    "00:00:60", "-5s", "1e3s", "99999999999d", "0.0000001ms", "12 MiB", "18446744073709551617B",
    "°C", "\u202e", "\x00", "'\\ud800'", '"\\ud800"', "'" + "é" * 300 + "'",
    "[" * 600 + "]" * 600, "{a: " * 600 + "1" + "}" * 600, "[1, [2, [3, {x: [4]}]]]",
]


def mutate(text: str, rng: random.Random) -> bytes:
    """One random edit of the kind configs suffer: an odd value, a cut, a repeat, a bad byte."""
    kind = rng.randrange(8)
    lines = text.splitlines(keepends=True)
    if kind <= 2:  # an odd value in place of a scalar
        spots = list((SCALAR if kind < 2 else LINE).finditer(text))
        spot = rng.choice(spots)
        return (text[:spot.start()] + rng.choice(ODD_VALUES) + text[spot.end():]).encode()
    data = text.encode()
    if kind == 3:  # the file cut anywhere, also inside a UTF-8 character
        return data[:rng.randrange(len(data))]
    if kind == 4:  # a line repeated (a key given twice) or deleted
        i = rng.randrange(len(lines))
        lines[i:i + 1] = [lines[i]] * rng.choice((0, 2))
        return "".join(lines).encode()
    if kind == 5:  # bytes of another encoding or of no text at all
        at = rng.randrange(len(data))
        return data[:at] + rng.choice((b"\xb0C", b"\xff\xfe", b"\x00", b"\xe2\x82", b"\r", b"\t")) + data[at:]
    if kind == 6:  # a line indented differently
        i = rng.randrange(len(lines))
        lines[i] = " " * rng.choice((0, 1, 3, 8)) + lines[i].lstrip(" ")
        return "".join(lines).encode()
    # a whole section replaced by a value of another shape
    keys = [m.start() for m in re.finditer(r"(?m)^[a-z_]+:", text)]
    at = rng.choice(keys)
    end = text.find("\n", at)
    return (text[:text.index(":", at) + 1] + " " + rng.choice(ODD_VALUES) + text[end:]).encode()


COMMENTED_KEY = re.compile(r"^(\s*)# ?(\s*(- )?[a-z_]+:.*)$")  # "#   tls: {...}", "# - name: x"
SECRET = re.compile(r"/etc/edge-gateway/([\w.-]+)")


def uncommented(text: str) -> str:
    """The example with every commented key in force (a key then given twice keeps its last value)."""
    lines = [COMMENTED_KEY.sub(r"\1\2", line) for line in text.splitlines()]
    keys = [line.split(":")[0] for line in lines if re.match(r"^[a-z_]+:", line)]
    return "\n".join(line for line in lines  # `devices: []` gives way to the uncommented devices
                     if not (re.match(r"^[a-z_]+: \[\]$", line) and keys.count(line.split(":")[0]) > 1)) + "\n"


def configs(files: Path) -> list[str]:
    """Each example as it is and uncommented, the files it names (passwords, certificates) in `files`."""
    texts = [path.read_text() for path in EXAMPLES]
    texts += [uncommented(text) for text in texts if COMMENTED_KEY.search(text)]
    files.mkdir(exist_ok=True)
    for text in texts:
        for name in SECRET.findall(text):
            (files / name).write_text("secret\n")
    return [SECRET.sub(f"{files}/\\1", text) for text in texts]


def fuzz(seed: int, mutations: int, tmp: Path, caplog: pytest.LogCaptureFixture | None = None,
         defects: list[str] | None = None) -> dict[int, int]:
    """`mutations` seeded mutations through `check-config`; the exit codes counted. Fails on the first
    defect, or lists every defect in `defects`."""
    rng = random.Random(seed)
    texts = configs(tmp / "files")
    codes: dict[int, int] = {}
    path = tmp / "gateway.yaml"
    for n in range(mutations):
        data = mutate(rng.choice(texts), rng)
        try:
            code = _check(path, data, seed, n, caplog)
        except AssertionError as exc:
            if defects is None:
                raise
            defects.append(str(exc))
            code = -1
        codes[code] = codes.get(code, 0) + 1
    return codes


def _check(path: Path, data: bytes, seed: int, n: int, caplog: pytest.LogCaptureFixture | None) -> int:
    """One mutation through `check-config`: its exit code, or an AssertionError saying the defect."""
    root = logging.getLogger()
    path.write_bytes(data)
    if caplog is not None:
        caplog.clear()
    out, err, logged = io.StringIO(), io.StringIO(), io.StringIO()
    handler = logging.StreamHandler(logged)
    root.addHandler(handler)
    try:
        with redirect_stdout(out), redirect_stderr(err):
            code = cli.main(["check-config", str(path)])
    except BaseException as exc:  # the defect this test exists for (SystemExit: another code)
        raise AssertionError(f"seed {seed} mutation {n}: {type(exc).__name__}: {exc}\n{data!r}") from exc
    finally:
        root.removeHandler(handler)
    assert code in (EX_OK, EX_CONFIG), (seed, n, code, data, err.getvalue())
    text = err.getvalue() + logged.getvalue() + (caplog.text if caplog else "")
    assert "Traceback" not in text, (seed, n, data, text)
    if code == EX_CONFIG:  # every message names the file, and most a line and a YAML path
        messages = [line for line in err.getvalue().splitlines() if line.strip()]
        assert messages and all(str(path) in line or line.startswith("  ") for line in messages), \
            (seed, n, data, err.getvalue())
    return code


@pytest.mark.parametrize("seed", [0, pytest.param(1, marks=pytest.mark.slow), pytest.param(2, marks=pytest.mark.slow)])
def test_fuzzed_configs_end_in_0_or_78_with_messages_never_a_traceback(tmp_path, seed, caplog):
    with caplog.at_level(logging.DEBUG):
        codes = fuzz(seed, MUTATIONS // 3, tmp_path, caplog)
    assert codes.get(EX_CONFIG, 0) > MUTATIONS // 6, codes  # the fuzzer does break configs
    assert codes.get(EX_OK, 0) > 0, codes  # and leaves some valid


def test_the_uncommented_examples_are_valid_but_for_their_files(tmp_path):
    """What the fuzzer starts from: the commented keys in force are a valid config (so its mutations
    reach the checks of web:, OPC UA security, Sparkplug and coils, not only a YAML error)."""
    for text in configs(tmp_path)[len(EXAMPLES):]:
        path = tmp_path / "gateway.yaml"
        path.write_text(text)
        err = io.StringIO()
        with redirect_stderr(err), redirect_stdout(io.StringIO()):
            code = cli.main(["check-config", str(path)])
        assert code == EX_OK, err.getvalue()


def main(argv: list[str]) -> int:
    import argparse
    import tempfile
    import time

    parser = argparse.ArgumentParser(description="a larger run of the config fuzzer")
    parser.add_argument("--seeds", default="0-9", help="e.g. 0-9 or 3")
    parser.add_argument("--mutations", type=int, default=2000, help="per seed")
    args = parser.parse_args(argv)
    lo, _, hi = args.seeds.partition("-")
    logging.getLogger().setLevel(logging.DEBUG)
    total: dict[int, int] = {}
    started = time.monotonic()
    for seed in range(int(lo), int(hi or lo) + 1):
        defects: list[str] = []
        with tempfile.TemporaryDirectory() as tmp:
            codes = fuzz(seed, args.mutations, Path(tmp), defects=defects)
        print(f"seed {seed}: {args.mutations} mutations, exit codes {codes} (-1: a defect)", flush=True)
        for defect in defects:
            print("DEFECT", defect[:3000], flush=True)
        for code, count in codes.items():
            total[code] = total.get(code, 0) + count
    print(f"all: {sum(total.values())} mutations in {time.monotonic() - started:.0f} s, exit codes {total}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main(sys.argv[1:]))

"""A seeded config fuzzer: whatever a hand edit, a bad copy or a broken disk does to a config,
`check-config` ends in 0 or 78 with path-named messages — never a traceback, never another code."""

from __future__ import annotations

import io
import logging
import random
import re
from contextlib import redirect_stderr, redirect_stdout

import pytest
from conftest import ROOT

from gateway import cli
from gateway.errors import EX_CONFIG, EX_OK

EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))
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


def configs() -> list[str]:
    return [path.read_text() for path in EXAMPLES]


@pytest.mark.parametrize("seed", range(3))
def test_fuzzed_configs_end_in_0_or_78_with_messages_never_a_traceback(tmp_path, seed, caplog):
    rng = random.Random(seed)
    texts = configs()
    codes: dict[int, int] = {}
    for n in range(MUTATIONS // 3):
        data = mutate(rng.choice(texts), rng)
        path = tmp_path / "gateway.yaml"
        path.write_bytes(data)
        out, err = io.StringIO(), io.StringIO()
        caplog.clear()
        with redirect_stdout(out), redirect_stderr(err), caplog.at_level(logging.DEBUG):
            try:
                code = cli.main(["check-config", str(path)])
            except Exception as exc:  # the defect this test exists for
                pytest.fail(f"seed {seed} mutation {n}: {type(exc).__name__}: {exc}\n{data[:300]!r}")
        codes[code] = codes.get(code, 0) + 1
        assert code in (EX_OK, EX_CONFIG), (seed, n, code, data[:300], err.getvalue())
        text = err.getvalue() + caplog.text
        assert "Traceback" not in text, (seed, n, data[:300], text)
        if code == EX_CONFIG:  # every message names the file, and most a line and a YAML path
            messages = [line for line in err.getvalue().splitlines() if line.strip()]
            assert messages and all(str(path) in line or line.startswith("  ") for line in messages), \
                (seed, n, data[:300], err.getvalue())
    assert codes.get(EX_CONFIG, 0) > MUTATIONS // 6, codes  # the fuzzer does break configs

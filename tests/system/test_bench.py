"""Every benchmark still runs against today's code (at a tiny size) and prints its same-run baseline.

Nothing here times anything: figures come from running bench/ itself (docs/benchmarks.md). So they
run four at a time (the longest first), each test waiting for its own: the figures of a smoke run
mean nothing, its exit code and its baseline line do.
"""

from __future__ import annotations

import subprocess
import sys
from concurrent.futures import Future, ThreadPoolExecutor

import pytest

from tests.helpers import ENV, ROOT

pytestmark = pytest.mark.slow  # it starts brokers and simulated PLCs

# script, how its baseline is introduced in what it prints, a tiny size
RUNS = [
    ("counters.py", "transaction per sample", "--samples", "300"),
    ("pipeline.py", "baseline:", "--samples", "300"),
    ("pipeline.py", "baseline: json (same run)", "--samples", "300", "--format", "sparkplug_b"),
    ("drain.py", "baseline:", "--messages", "300"),
    ("modbus.py", "baseline:", "--seconds", "1"),
    ("startup.py", "baseline:", "--seconds", "2"),
    ("scale.py", "bare µs", "--seconds", "0.5", "--max-devices", "10"),
    ("latency.py", "sync normal, timer:", "--quick", "--seconds", "1"),
    ("inference.py", "(same run)", "--seconds", "1"),
    ("opcua.py", "baseline: modbus poll", "--seconds", "1"),
    ("fleet.py", "  old  reconnect after the broker is back", "--gateways", "1", "--outage", "2"),
    ("sparkplug_host.py", "baseline: the JSON uplink", "--devices", "2", "--offline", "2"),
    ("anomaly_eval.py", "scored by the plant-wide pump-ae", "--runs", "1", "--normal-hours", "0.1", "--own-hours", "0",
     "--short", "1", "--steady", "0", "--coarse", "0", "--after", "1", "--after-minutes", "7", "--epochs", "3"),
]


LONGEST_FIRST = ("anomaly_eval.py", "sparkplug_host.py", "latency.py", "opcua.py", "scale.py")


def _run(args: tuple[str, ...]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(ROOT / "bench" / args[0]), *args[1:]], capture_output=True, text=True,
                          env=ENV, cwd=ROOT, timeout=240)


@pytest.fixture(scope="module")
def runs():
    """Every run of RUNS started at once on a pool of four: (script, *args) -> its Future."""
    order = sorted(RUNS, key=lambda r: LONGEST_FIRST.index(r[0]) if r[0] in LONGEST_FIRST else len(LONGEST_FIRST))
    with ThreadPoolExecutor(4) as pool:
        futures: dict[tuple[str, ...], Future[subprocess.CompletedProcess[str]]] = {
            (r[0], *r[2:]): pool.submit(_run, (r[0], *r[2:])) for r in order}
        yield futures


@pytest.mark.parametrize("script,baseline,args", [(r[0], r[1], r[2:]) for r in RUNS], ids=[r[0] for r in RUNS])
def test_the_benchmark_runs_and_prints_its_baseline(runs, script, baseline, args):
    result = runs[(script, *args)].result()
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert baseline in result.stdout, result.stdout
    if script == "anomaly_eval.py":  # and its figure for the hour after a short commissioning
        assert "the hour after commissioning" in result.stdout and "commissioned on 7 min, drift tags detected: " \
            in result.stdout, result.stdout

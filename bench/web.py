"""The web window's cost: start-up and RSS with and without `web:`, the daemon's CPU with the page open
and updating, and requests per second of /api/v1/status and /metrics.

Every figure stands beside its baseline from the same run: the daemon without `web:` (start-up,
RSS, CPU); the daemon with `web:` and nobody watching (CPU); a bare aiohttp server answering a
constant JSON document on the same machine (requests/s). Ten simulated devices at 1 Hz (five
pumps scored by the shipped model, five flexo lines), a mosquitto upstream; the page is opened in
Debian's headless chromium (tests/web_cdp.py). Only 127.0.0.1 is contacted.

    .venv/bin/python bench/web.py [--seconds 30] [--runs 3]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

from common import SHIFTS, daemon, mosquitto
from startup import devices, rss_mib

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

from gateway.ports import free_port  # noqa: E402


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@contextmanager
def gateway(upstream: int, web_port: int | None, model: str | None = "pump-ae"):
    """`edge-gateway run` with 10 devices; yields (pid, seconds from exec to READY=1)."""
    web = f'web: {{listen: "127.0.0.1:{web_port}"}}\n' if web_port else ""
    with tempfile.TemporaryDirectory() as tmp, daemon(
            f"gateway: {{id: bench, site: lab, data_dir: {tmp}/data, timezone: Europe/Berlin}}\n"
            f"upstream: {{host: 127.0.0.1, port: {upstream}}}\n{web}{SHIFTS}devices:{devices(model)}\n", tmp) as started:
        yield started


def wait_listening(port: int, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port}")


def cpu_share(pid: int, seconds: float) -> float:
    """The process's CPU time over `seconds` of wall time, in % of one core."""
    before, t0 = cpu_seconds(pid), time.monotonic()
    time.sleep(seconds)
    return 100 * (cpu_seconds(pid) - before) / (time.monotonic() - t0)


async def _rate(url: str, seconds: float, workers: int = 8) -> float:
    import aiohttp

    done = 0
    stop = time.monotonic() + seconds
    async with aiohttp.ClientSession() as session:
        async def worker() -> None:
            nonlocal done
            while time.monotonic() < stop:
                async with session.get(url) as resp:
                    await resp.read()
                    assert resp.status == 200, resp.status
                done += 1
        start = time.monotonic()
        await asyncio.gather(*(worker() for _ in range(workers)))
        return done / (time.monotonic() - start)


def rate(url: str, seconds: float) -> float:
    return asyncio.run(_rate(url, seconds))


BARE = """
import sys
from aiohttp import web
body = open(sys.argv[2], "rb").read()
async def status(request):
    return web.Response(body=body, content_type="application/json")
app = web.Application()
app.router.add_get("/", status)
web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), print=None, access_log=None)
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=30.0, help="CPU measuring time per case")
    parser.add_argument("--runs", type=int, default=3, help="start-ups per case")
    args = parser.parse_args()
    from web_cdp import Browser, chromium

    with mosquitto() as (upstream, _):
        # 1. start-up and RSS, alternating the two cases
        starts: dict[str, list[float]] = {"without web": [], "with web": []}
        rss: dict[str, list[float]] = {"without web": [], "with web": []}
        for _ in range(args.runs):
            for case, port in (("without web", None), ("with web", free_port())):
                with gateway(upstream, port) as (pid, ready):
                    if port:
                        wait_listening(port)
                    time.sleep(3)
                    starts[case].append(ready)
                    rss[case].append(rss_mib(pid))

        # 2. CPU: without web; with web, nobody watching; with the page open in chromium
        cpu: dict[str, float] = {}
        with gateway(upstream, None) as (pid, _):
            time.sleep(5)
            cpu["without web"] = cpu_share(pid, args.seconds)
        port = free_port()
        with gateway(upstream, port) as (pid, _):
            wait_listening(port)
            time.sleep(5)
            cpu["with web, page closed"] = cpu_share(pid, args.seconds)
            if chromium() is not None:
                with Browser() as browser:
                    browser.open(f"http://127.0.0.1:{port}/")
                    browser.wait_for("document.getElementById('conn').textContent === 'live'", 20, "the page")
                    time.sleep(3)
                    cpu["with web, page open"] = cpu_share(pid, args.seconds)
                    rss_open = rss_mib(pid)
            # 3. requests per second
            status = rate(f"http://127.0.0.1:{port}/api/v1/status", 5)
            metrics = rate(f"http://127.0.0.1:{port}/metrics", 5)
            with tempfile.NamedTemporaryFile(suffix=".json") as doc:
                import urllib.request
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v1/status", timeout=10) as resp:
                    doc.write(resp.read())
                doc.flush()
                bare_port = free_port()
                bare = subprocess.Popen([sys.executable, "-c", BARE, str(bare_port), doc.name])
                try:
                    wait_listening(bare_port)
                    bare_rate = rate(f"http://127.0.0.1:{bare_port}/", 5)
                finally:
                    bare.terminate()
                    bare.wait(10)

    med = statistics.median
    print(f"edge-gateway run, 10 simulated devices at 1 Hz (5 scored by pump-ae), mosquitto upstream; "
          f"median of {args.runs} start-ups each")
    print(f"  exec -> READY=1   without web {med(starts['without web']) * 1000:6.0f} ms   "
          f"with web {med(starts['with web']) * 1000:6.0f} ms")
    print(f"  RSS 3 s after     without web {med(rss['without web']):6.1f} MiB  with web {med(rss['with web']):6.1f} MiB")
    print(f"daemon CPU over {args.seconds:.0f} s (% of one core)")
    for case, share in cpu.items():
        print(f"  {case:<24} {share:5.2f} %")
    if "with web, page open" in cpu:
        print(f"  RSS with the page open     {rss_open:6.1f} MiB")
    else:
        print("  (chromium not installed: the page-open case was not measured)")
    print("requests/s, 8 concurrent keep-alive clients on 127.0.0.1, 5 s each (the daemon running its devices)")
    print(f"  /api/v1/status            {status:7.0f}")
    print(f"  /metrics                  {metrics:7.0f}")
    print(f"  baseline: bare aiohttp, the same status document as a constant  {bare_rate:7.0f}")


if __name__ == "__main__":
    main()

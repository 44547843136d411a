"""The Node side of the interop tests: tests/interop's npm packages, and node scripts run as processes.

`./dev test` installs the packages (ensure_npm); run alone, pytest installs them here on first
use with `npm ci`. Only when `node` cannot be had at all are the interop tests skipped.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from tests.helpers import ROOT, spawn, wait_until

INTEROP = ROOT / "tests" / "interop"


def node_packages() -> Path:
    """tests/interop with its node_modules installed (skips the test when node or npm is missing)."""
    if shutil.which("node") is None or shutil.which("npm") is None:
        pytest.skip("node and npm are needed for the interop tests (./dev test installs Debian's nodejs and npm)")
    lock = INTEROP / "package-lock.json"
    modules = INTEROP / "node_modules"
    if not modules.is_dir() or (INTEROP / "package.json").stat().st_mtime > modules.stat().st_mtime or \
            (lock.exists() and lock.stat().st_mtime > modules.stat().st_mtime):
        result = subprocess.run(["npm", "ci" if lock.exists() else "install", "--no-audit", "--no-fund",
                                 "--loglevel=error"], cwd=INTEROP, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, f"npm could not install tests/interop: {result.stderr[-2000:]}"
        modules.touch()
    return INTEROP


def node_script(script: str, args: list[str], log: Path, ready: str = "ready", timeout: float = 60):
    """Start `node tests/interop/SCRIPT ARGS` and wait until it prints `ready` (the process, to stop)."""
    node_packages()
    proc = spawn(["node", str(INTEROP / script), *args], log, "a", cwd=INTEROP)
    try:
        wait_until(lambda: ready in log.read_text() or proc.poll() is not None, timeout, what=f"{script} to be ready")
    except BaseException:
        proc.kill()
        proc.wait(10)
        raise
    if proc.poll() is not None:
        raise AssertionError(f"{script} ended: {log.read_text()[-3000:]}")
    return proc


def stop(proc) -> None:
    proc.kill()
    proc.wait(10)

"""install.sh into a staging tree (DESTDIR): idempotent, never overwrites config, uninstall keeps data."""

from __future__ import annotations

import hashlib
import os
import stat
import subprocess
from pathlib import Path

import pytest

from tests.helpers import ROOT

pytestmark = pytest.mark.slow  # it starts processes: the gateway, brokers, the installer


def install(destdir, *args) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(ROOT / "install.sh"), *args], capture_output=True, text=True,
                          env={**os.environ, "DESTDIR": str(destdir)}, timeout=600)


def tree(root) -> dict[str, tuple]:
    """Every path under root: mode and content hash (or link target)."""
    out = {}
    for dirpath, dirs, files in os.walk(root):
        for name in dirs + files:
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            if stat.S_ISLNK(st.st_mode):
                what = os.readlink(path)
            elif stat.S_ISREG(st.st_mode):
                what = hashlib.sha256(Path(path).read_bytes()).hexdigest()
            else:
                what = "dir"
            out[os.path.relpath(path, root)] = (stat.S_IMODE(st.st_mode), what)
    return out


@pytest.mark.slow
def test_install_twice_gives_the_same_tree_then_uninstall_and_purge(tmp_path):
    stage = tmp_path / "root"
    first = install(stage, "--with-local-broker")
    assert first.returncode == 0, first.stderr
    etc = stage / "etc" / "edge-gateway"
    for name in ("gateway.yaml", "amqtt.yaml", "local-broker.users", "local-gateway.pass"):
        assert stat.S_IMODE((etc / name).stat().st_mode) == 0o640, name
    assert stat.S_IMODE(etc.stat().st_mode) == 0o750
    assert os.readlink(stage / "usr/local/bin/edge-gateway") == "/opt/edge-gateway/venv/bin/edge-gateway"
    units = stage / "etc/systemd/system"
    assert (units / "edge-gateway.service").read_text() == (ROOT / "systemd/edge-gateway.service").read_text()
    assert (units / "edge-gateway-broker.service").exists()
    exe = stage / "opt/edge-gateway/venv/bin/edge-gateway"
    # Inert until the engineer has described the machines: no devices, so it is not started.
    check = subprocess.run([str(exe), "check-config", str(etc / "gateway.yaml")], capture_output=True, text=True)
    assert check.returncode == 78 and "devices: no devices yet" in check.stderr, check.stderr
    assert "edge-gateway.service is enabled but not started" in first.stdout and "no devices yet" in first.stdout
    assert "systemd is not running here; when it is:" in first.stdout
    assert (stage / "opt/edge-gateway/examples/sim-plant.yaml").exists()

    before = tree(stage)
    second = install(stage, "--with-local-broker")
    assert second.returncode == 0, second.stderr
    assert "already this version" in second.stdout and "kept the existing" in second.stdout
    assert tree(stage) == before

    # An engineer's edits survive an upgrade run; a config that passes check-config would be started.
    edited = ("# edited on site\ngateway: {id: line9-gw1, site: plant-a, data_dir: /var/lib/edge-gateway}\n"
              "upstream: {host: mqtt.example.com}\ndevices:\n"
              "  - {name: press1, source: modbus_tcp, host: 192.0.2.10, registers: [{name: rpm, address: 0}]}\n")
    (etc / "gateway.yaml").write_text(edited)
    upgrade = install(stage)
    assert upgrade.returncode == 0
    assert (etc / "gateway.yaml").read_text() == edited
    assert "not started" not in upgrade.stdout

    fresh = install(tmp_path / "other-root", "--dry-run")
    assert fresh.returncode == 0 and "would have installed" in fresh.stdout
    assert "install.sh: installed" not in fresh.stdout and not (tmp_path / "other-root").exists()

    dry = install(stage, "--uninstall", "--dry-run")
    assert dry.returncode == 0 and "would run: rm -rf" in dry.stdout
    assert exe.exists()

    data = stage / "var/lib/edge-gateway"
    data.mkdir(parents=True)
    (data / "gateway.db").write_text("the outbox")
    removed = install(stage, "--uninstall")
    assert removed.returncode == 0, removed.stderr
    assert not (stage / "opt/edge-gateway").exists() and not (units / "edge-gateway.service").exists()
    assert not os.path.lexists(stage / "usr/local/bin/edge-gateway")
    assert (etc / "gateway.yaml").exists() and (data / "gateway.db").exists()
    assert "kept the config" in removed.stdout

    purged = install(stage, "--uninstall", "--purge")
    assert purged.returncode == 0, purged.stderr
    assert not etc.exists() and not data.exists()


def test_install_refuses_unknown_options_and_a_lone_purge(tmp_path):
    bad = install(tmp_path, "--frobnicate")
    assert bad.returncode == 64 and "unknown option --frobnicate" in bad.stderr
    lone = install(tmp_path, "--purge")
    assert lone.returncode == 64 and "--purge goes with --uninstall" in lone.stderr
    assert not any(tmp_path.iterdir())

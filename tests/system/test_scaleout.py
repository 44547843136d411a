"""The systemd template unit for several gateways on one box: it verifies clean and scores as the single one."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_template_differs_from_the_single_unit_only_in_its_instance():
    single = (ROOT / "systemd" / "edge-gateway.service").read_text()
    template = (ROOT / "systemd" / "edge-gateway@.service").read_text()
    body = "\n".join(line for line in template.splitlines() if not line.startswith("#"))
    assert body.replace("/etc/edge-gateway/%i.yaml", "/etc/edge-gateway/gateway.yaml") \
        .replace("StateDirectory=edge-gateway/%i", "StateDirectory=edge-gateway") \
        .replace("Description=edge-gateway %i:", "Description=edge-gateway:") \
        == "\n".join(line for line in single.splitlines() if not line.startswith("#"))


@pytest.mark.slow  # it runs systemd-analyze
@pytest.mark.skipif(not shutil.which("systemd-analyze"), reason="systemd-analyze not installed")
def test_template_unit_verifies_clean_and_scores_well(tmp_path):
    exe = shutil.which("edge-gateway") or str(ROOT / ".venv" / "bin" / "edge-gateway")
    unit = (ROOT / "systemd" / "edge-gateway@.service").read_text()
    (tmp_path / "edge-gateway@.service").write_text(unit.replace("/opt/edge-gateway/venv/bin/edge-gateway", exe))
    (tmp_path / "edge-gateway@hall1.service").symlink_to("edge-gateway@.service")
    verify = subprocess.run(["systemd-analyze", "verify", "./edge-gateway@hall1.service"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=60)
    problems = [line for line in (verify.stdout + verify.stderr).splitlines() if line.strip()]
    assert verify.returncode == 0 and not problems, problems
    security = subprocess.run(["systemd-analyze", "security", "--offline=true", "./edge-gateway@hall1.service"],
                              cwd=tmp_path, capture_output=True, text=True, timeout=60)
    score = float(re.search(r"Overall exposure level for \S+: ([\d.]+)", security.stdout).group(1))
    assert score <= 2.5, security.stdout[-2000:]

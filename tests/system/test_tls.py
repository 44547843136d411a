"""TLS with certificate verification and username/password, against a real mosquitto."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest

from tests.helpers import BrokerProcess, free_port, gateway_config, wait_until

pytestmark = pytest.mark.slow  # it starts processes: the gateway, brokers, the installer

ROOT = "edge/lab/test-gw"
SECRET = "s3cret-Pa55"


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def make_ca(d: Path, name: str) -> None:
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", f"/CN={name}",
            "-keyout", f"{name}.key", "-out", f"{name}.pem", cwd=d)


@pytest.fixture
def tls_broker(tmp_path):
    d = tmp_path / "pki"
    d.mkdir()
    make_ca(d, "test-ca")
    make_ca(d, "other-ca")
    (d / "san.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=localhost", "-keyout", "server.key",
            "-out", "server.csr", cwd=d)
    openssl("x509", "-req", "-in", "server.csr", "-CA", "test-ca.pem", "-CAkey", "test-ca.key", "-CAcreateserial",
            "-days", "2", "-extfile", "san.ext", "-out", "server.pem", cwd=d)
    subprocess.run(["mosquitto_passwd", "-b", "-c", str(d / "passwd"), "line3-gw1", SECRET], check=True, timeout=30)
    subprocess.run(["mosquitto_passwd", "-b", str(d / "passwd"), "historian", "h1st"], check=True, timeout=30)
    tls_port, plain_port = free_port(), free_port()
    conf = (f"allow_anonymous false\npassword_file {d / 'passwd'}\n"
            f"listener {tls_port} 127.0.0.1\ncafile {d / 'test-ca.pem'}\ncertfile {d / 'server.pem'}\n"
            f"keyfile {d / 'server.key'}\n"
            f"listener {plain_port} 127.0.0.1\n")
    broker = BrokerProcess("mosquitto", tmp_path, port=tls_port, extra_conf=conf).start()
    broker.plain_port = plain_port
    broker.pki = d
    yield broker
    broker.kill()


def tls_config(tmp_path: Path, broker, ca: str, password: str) -> str:
    (tmp_path / "upstream.pass").write_text(password + "\n")
    upstream = (f", tls: {{ca_file: {broker.pki / ca}}}, username: line3-gw1, "
                f"password_file: {tmp_path / 'upstream.pass'}")
    return gateway_config(tmp_path / "data", broker.port, upstream=upstream)


def test_wrong_ca_is_refused_clearly_and_retried(tls_broker, gateway, tmp_path):
    gw = gateway(tls_config(tmp_path, tls_broker, "other-ca.pem", SECRET)).start()
    wait_until(lambda: "TLS certificate verification failed" in gw.logs(), 20, what="the TLS error")
    time.sleep(2)
    assert gw.proc.poll() is None, "a TLS failure is retried, not crashed on"
    line = next(x for x in gw.logs().splitlines() if "TLS certificate verification failed" in x)
    assert f"127.0.0.1:{tls_broker.port}" in line and "certificate" in line
    assert gw.logs().count("TLS certificate verification failed") == 1, "logged once, not once per retry"


def test_wrong_password_is_refused_clearly(tls_broker, gateway, tmp_path):
    gw = gateway(tls_config(tmp_path, tls_broker, "test-ca.pem", "wrong")).start()
    wait_until(lambda: "refused the connection" in gw.logs(), 20, what="the auth error")
    assert "Not authorized" in gw.logs() or "Bad user name or password" in gw.logs()
    assert gw.proc.poll() is None


def test_right_ca_and_credentials_deliver_and_never_log_the_secret(tls_broker, gateway, subscribe, tmp_path):
    sub = subscribe(tls_broker.plain_port, topic=f"{ROOT}/#", username="historian", password="h1st")
    gw = gateway(tls_config(tmp_path, tls_broker, "test-ca.pem", SECRET)).start()
    wait_until(lambda: len(sub.on("/telemetry")) >= 5, 20, what="telemetry over TLS")
    assert gw.stop() == 0
    assert SECRET not in gw.logs()

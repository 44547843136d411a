"""The web window's fast tier: the `web:` section's safe defaults, the users file and its login checks.

The page, the API and /metrics against a running daemon are in test_web_daemon.py and
test_web_browser.py (slow).
"""

from __future__ import annotations

import asyncio
import base64
import logging
import os
import stat
import subprocess
import sys

import pytest

from gateway import config
from gateway.errors import ConfigError
from tests.helpers import ENV, ROOT

pytest.importorskip("aiohttp")

BASE = """\
gateway: {id: gw1, site: plant-a, data_dir: /tmp/edge-gw-web-test}
upstream: {host: 127.0.0.1}
devices:
  - {name: pump1, source: sim, profile: pump, seed: 1}
"""


def test_without_a_web_section_there_is_no_web_page():
    assert config.parse(BASE).web is None


def test_the_defaults_listen_on_loopback_without_a_login():
    web = config.parse(BASE + "web: {}\n").web
    assert web is not None
    assert (web.listen, web.users_file, web.tls) == ("127.0.0.1:8470", None, None)
    assert web.address == ("127.0.0.1", 8470)


@pytest.mark.parametrize("listen", ["127.0.0.1:8470", "127.0.0.2:9000", "localhost:8470", "[::1]:8470"])
def test_a_loopback_listen_needs_no_users(listen):
    assert config.parse(BASE + f'web: {{listen: "{listen}"}}\n').web is not None


@pytest.mark.parametrize("listen", ["0.0.0.0:8470", "192.0.2.7:8470", "gateway.local:8470", "[::]:8470"])
def test_a_listen_beyond_loopback_without_users_is_a_config_error_naming_the_line(listen):
    with pytest.raises(ConfigError) as err:
        config.parse(BASE + f'web: {{listen: "{listen}"}}\n', "gateway.yaml")
    text = str(err.value)
    assert "gateway.yaml:5: web.users_file: required when listen is not a loopback address" in text
    assert "edge-gateway web-user" in text


def test_a_listen_beyond_loopback_with_users_is_taken():
    web = config.parse(BASE + 'web: {listen: "0.0.0.0:8470", users_file: /etc/edge-gateway/web-users}\n').web
    assert web is not None and web.users_file == "/etc/edge-gateway/web-users"


@pytest.mark.parametrize("snippet,message", [
    ('web: {listen: "8470"}', 'web.listen: expected HOST:PORT such as "127.0.0.1:8470"'),
    ('web: {listen: "127.0.0.1:99999"}', "web.listen: expected a port from 1 to 65535, got 99999"),
    ("web: {tls: {cert_file: /x.pem}}", "web.tls.key_file: required"),
    ("web: {user_file: /x}", "web.user_file: unknown key"),
])
def test_bad_web_keys_are_named(snippet, message):
    with pytest.raises(ConfigError) as err:
        config.parse(BASE + snippet + "\n", "gateway.yaml")
    assert message in str(err.value)


HOST_64 = "a" * 64


@pytest.mark.parametrize("listen,message", [
    ("gw..plant.local:8470", 'got "gw..plant.local:8470"'),
    (f"{HOST_64}.plant.local:8470", "labels between dots are 1 to 63 characters long"),
    (f"{'a.' * 127}aa:8470", "(253 in all)"),
    ("\u202e:8470", 'got "\\u202e:8470"'),
    ("[1:::2]:8470", "expected HOST:PORT with an IPv6 address in brackets such as [::1]"),
    ("127.0.0.1:\uff18\uff14\uff17\uff10", 'expected HOST:PORT such as "127.0.0.1:8470"'),  # fullwidth 8470
])
def test_a_listen_host_asyncio_cannot_listen_on_is_a_config_error(listen, message):
    """These passed check-config; then the daemon died at start (UnicodeError from the idna codec, exit 70), or
    read fullwidth digits as a port."""
    with pytest.raises(ConfigError) as err:
        config.parse(BASE + f'web: {{listen: "{listen}", users_file: /x}}\n', "gateway.yaml")
    text = str(err.value)
    assert text.startswith("gateway.yaml:5: web.listen: expected HOST:PORT ") and message in text, text


@pytest.mark.parametrize("listen", ["gw.plant.local:8470", "gw.plant.local.:8470", f"{'a' * 63}.local:8470",
                                    "ünï.example:8470", "[::ffff:127.0.0.1]:8470", "127.1:8470"])
def test_a_listen_host_that_can_be_listened_on_is_taken(listen):
    assert config.parse(BASE + f'web: {{listen: "{listen}", users_file: /x}}\n').web is not None


def test_check_config_exits_78_for_a_listen_host_idna_cannot_encode(tmp_path):
    path = tmp_path / "gateway.yaml"
    path.write_text(BASE + 'web: {listen: "gw..plant.local:8470", users_file: /x}\n')
    result = subprocess.run([sys.executable, "-m", "gateway", "check-config", str(path)], capture_output=True,
                            text=True, env=ENV, cwd=ROOT, timeout=60)
    assert result.returncode == 78, result.stderr
    assert f"{path}:5: web.listen: expected HOST:PORT with an IP address or a host name" in result.stderr
    assert 'got "gw..plant.local:8470"' in result.stderr


class _NoDevices:
    """The least of a running gateway that `serve` reads before it listens."""
    devices: list = []
    history = None


def test_a_listen_host_that_cannot_be_encoded_at_start_is_retried_never_fatal(caplog):
    """A config that an older check-config passed: the page is not served (logged, retried like a port in use),
    and the daemon, whose devices do not need the page, keeps running."""
    from gateway.config.schema import WebSection
    from gateway.web import server

    cfg = WebSection(listen="gw..plant.local:8470")

    async def main() -> None:
        task = asyncio.ensure_future(server.serve(_NoDevices(), cfg))  # type: ignore[arg-type]
        for _ in range(200):
            if any("cannot serve" in r.getMessage() for r in caplog.records) or task.done():
                break
            await asyncio.sleep(0.05)
        assert not task.done(), task.exception()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    with caplog.at_level(logging.ERROR, logger="edge_gateway.web"):
        asyncio.run(main())
    assert [r.getMessage() for r in caplog.records] == [
        "web: cannot serve on gw..plant.local:8470: encoding with 'idna' codec failed (UnicodeError: label empty or "
        "too long); retrying every 5s"]


def test_check_config_exits_78_for_a_plant_network_listen_without_users(tmp_path):
    path = tmp_path / "gateway.yaml"
    path.write_text(BASE + 'web: {listen: "0.0.0.0:8470"}\n')
    result = subprocess.run([sys.executable, "-m", "gateway", "check-config", str(path)], capture_output=True,
                            text=True, env=ENV, cwd=ROOT, timeout=60)
    assert result.returncode == 78
    assert f"{path}:5: web.users_file: required when listen is not a loopback address" in result.stderr


def test_check_config_names_a_users_file_that_cannot_be_read(tmp_path):
    path = tmp_path / "gateway.yaml"
    path.write_text(BASE + f'web: {{listen: "0.0.0.0:8470", users_file: "{tmp_path}/nope"}}\n')
    result = subprocess.run([sys.executable, "-m", "gateway", "check-config", str(path)], capture_output=True,
                            text=True, env=ENV, cwd=ROOT, timeout=60)
    assert result.returncode == 78
    assert f'web.users_file: expected a readable file, got "{tmp_path}/nope"' in result.stderr


def test_check_config_names_a_users_or_password_file_that_is_not_utf8(tmp_path):
    """Saved in another encoding they passed check-config; then every page answered 500 with a traceback in the
    journal (the users file), or the uplink retried a decode error forever (the password file)."""
    (tmp_path / "users").write_bytes(b"alice:\xff\xfe garbled\n")
    (tmp_path / "secret").write_bytes(b"p\xe4ssword\n")  # Latin-1
    path = tmp_path / "gateway.yaml"
    path.write_text(BASE.replace("upstream: {host: 127.0.0.1}", f'upstream: {{host: 127.0.0.1, username: gw, '
                                 f'password_file: "{tmp_path}/secret"}}') +
                    f'web: {{listen: "0.0.0.0:8470", users_file: "{tmp_path}/users"}}\n')
    result = subprocess.run([sys.executable, "-m", "gateway", "check-config", str(path)], capture_output=True,
                            text=True, env=ENV, cwd=ROOT, timeout=60)
    assert result.returncode == 78
    assert result.stderr.splitlines() == [
        f'{path}:2: upstream.password_file: expected UTF-8 text in "{tmp_path}/secret", got byte 0xe4 on line 1; '
        "save it as UTF-8",
        f'{path}:5: web.users_file: expected UTF-8 text in "{tmp_path}/users", got byte 0xff on line 1; save it as '
        "UTF-8"]


def test_a_users_file_garbled_after_start_locks_out_its_line_only_and_says_so_once(tmp_path, caplog):
    from gateway.broker import set_user
    from gateway.web import auth

    path = tmp_path / "web-users"
    set_user(str(path), "bob", "correct horse battery")
    path.write_bytes(b"alice:\xff\xfe garbled\n" + path.read_bytes())
    users = auth.Users(str(path))

    async def main() -> None:
        assert await users.check(_basic("bob", "correct horse battery"), "10.0.0.1") == "bob"
        assert await users.check(_basic("alice", "x"), "10.0.0.2") is None

    with caplog.at_level(logging.WARNING, logger="edge_gateway.web"):
        asyncio.run(main())
    garbled = [r.getMessage() for r in caplog.records if "not UTF-8" in r.getMessage()]
    assert garbled == [f"web: the users file {path} has 1 line(s) that are not UTF-8 text (line 1): their users "
                       "cannot log in; make them again with edge-gateway web-user"]


# -- the users file and logins --------------------------------------------------------------------
def _basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def test_web_user_writes_a_hash_never_the_password(tmp_path):
    users = tmp_path / "web-users"
    result = subprocess.run([sys.executable, "-m", "gateway", "web-user", "alice", "--users", str(users)],
                            input="correct horse battery\n", capture_output=True, text=True, env=ENV, cwd=ROOT,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    text = users.read_text()
    assert text.startswith("alice:$argon2") and "correct horse" not in text
    assert users.stat().st_mode & 0o777 == 0o640


def test_user_commands_say_what_they_did_with_the_right_code(tmp_path, capsys, monkeypatch):
    """A fuzzing pass: a bad user name was exit 73 (cannot create) where the docs say 65; web-user's errors said
    'broker-user:'; deleting a user that never was said 'removed' and made an empty users file; `--generate -`
    printed a password for a user it then failed to set, naming its temporary file."""
    import io

    from gateway import cli

    users = tmp_path / "users"
    monkeypatch.setattr(sys, "stdin", io.StringIO("long enough\n"))
    assert cli.main(["web-user", "a:b", "--users", str(users)]) == 65
    assert capsys.readouterr().err.startswith("web-user: user name 'a:b': expected no spaces or colons")
    assert cli.main(["broker-user", "ghost", "--users", str(users), "--delete"]) == 0
    assert "there is no user ghost; nothing changed" in capsys.readouterr().out and not users.exists()
    assert cli.main(["broker-user", "carol", "--users", str(tmp_path / "nowhere" / "users"), "--generate", "-"]) == 73
    out, err = capsys.readouterr()
    assert out == "" and f"cannot write {tmp_path / 'nowhere' / 'users'}: No such file or directory" in err
    assert ".tmp" not in err


@pytest.mark.slow  # subprocesses of the CLI: the fast tier keeps under a minute
def test_a_generated_password_goes_to_standard_output_or_a_pipe_and_a_linked_users_file_stays_linked(tmp_path):
    """`--generate -` prints the password alone (the note goes to stderr); a named pipe is written, not renamed
    over; a users file kept as a symlink (config management) keeps its link, the file it names is rewritten."""
    real, link, fifo = tmp_path / "users.real", tmp_path / "web-users", tmp_path / "secret.fifo"
    real.write_text("")
    link.symlink_to(real)
    web_user = [sys.executable, "-m", "gateway", "web-user"]
    result = subprocess.run(web_user + ["alice", "--users", str(link), "--generate", "-"], capture_output=True,
                            text=True, env=ENV, cwd=ROOT, timeout=60)
    assert result.returncode == 0, result.stderr
    password = result.stdout.strip()
    assert len(password) >= 16 and result.stdout == password + "\n"
    assert result.stderr == f"{link}: user alice set; its password is on standard output\n"
    os.mkfifo(fifo)
    with subprocess.Popen(web_user + ["bob", "--users", str(link), "--generate", str(fifo)], env=ENV, cwd=ROOT,
                          stdout=subprocess.DEVNULL) as writer:
        secret = fifo.read_text().strip()  # blocks until the command opens the pipe, returns when it closes it
        assert writer.wait(timeout=60) == 0
    assert len(secret) >= 16 and stat.S_ISFIFO(os.stat(fifo).st_mode)
    assert link.is_symlink() and real.stat().st_mode & 0o777 == 0o640
    assert [line.split(":")[0] for line in real.read_text().splitlines()] == ["alice", "bob"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["secret.fifo", "users.real", "web-users"]


def test_a_login_passes_with_the_right_password_only_and_failures_are_logged_once_and_limited(tmp_path, caplog):
    from gateway.broker import set_user
    from gateway.web import auth

    path = tmp_path / "web-users"
    set_user(str(path), "alice", "correct horse battery")
    users = auth.Users(str(path))

    async def main() -> None:
        assert await users.check(_basic("alice", "correct horse battery"), "10.0.0.1") == "alice"
        assert await users.check(None, "10.0.0.2") is None  # no credentials yet: not a failure
        assert users.blocked("10.0.0.2") == 0
        for _ in range(auth.MAX_FAILURES):
            assert await users.check(_basic("alice", "wrong"), "10.0.0.2") is None
        assert await users.check(_basic("mallory", "x"), "10.0.0.3") is None
        assert await users.check("Basic !!!not-base64", "10.0.0.4") is None

    with caplog.at_level(logging.WARNING, logger="edge_gateway.web"):
        asyncio.run(main())
    failed = [r.getMessage() for r in caplog.records if "failed login" in r.getMessage()]
    assert len([m for m in failed if "10.0.0.2" in m]) == 1, failed  # once per client, not per attempt
    assert any("10.0.0.3" in m for m in failed) and any("10.0.0.4" in m for m in failed)
    assert all("wrong" not in m and "correct horse" not in m for m in failed)  # nothing secret logged
    assert users.blocked("10.0.0.2") > 0 and users.blocked("10.0.0.3") == 0


def test_units_are_read_from_the_tag_names():
    from gateway.web.view import unit_of

    assert [unit_of(t) for t in ("bearing_temp_c", "flow_l_min", "vibration_mm_s", "motor_current_a",
                                 "machine_status")] == ["°C", "l/min", "mm/s", "A", None]


def test_odd_values_in_the_web_section_are_config_errors_never_a_crash():
    from tests.config.test_fuzz import ODD_VALUES

    for key in ("listen", "users_file", "tls", "tls.cert_file"):
        for odd in ODD_VALUES:
            section = f"{{tls: {{cert_file: {odd}, key_file: /k}}}}" if key == "tls.cert_file" else f"{{{key}: {odd}}}"
            for text in (BASE + f"web: {section}\n", BASE + f"web: {odd}\n"):
                try:
                    config.parse(text, "gateway.yaml")
                except ConfigError as err:
                    assert str(err).startswith("gateway.yaml"), str(err)


@pytest.mark.parametrize("text", ["nan", "1e400", "-inf", "\udcff", "2026-13-45T99:00:00Z", "0001-01-01T00:00:00+14:00x"])
def test_an_absurd_history_time_is_a_400_never_an_exception(text):
    from gateway.web.server import ApiError, _time

    with pytest.raises(ApiError) as err:
        _time(text, "from", 0.0)
    assert err.value.status == 400 and "expected" in str(err.value)


def _self_signed(tmp_path, name: str) -> tuple[str, str]:
    cert, key = tmp_path / f"{name}.pem", tmp_path / f"{name}.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                    "-days", "2", "-subj", f"/CN={name}", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True, timeout=60)
    return str(cert), str(key)


def test_check_config_exits_78_for_a_tls_key_of_another_certificate_or_not_a_certificate(tmp_path):
    """A key of another certificate passed check-config; then the daemon retried serving HTTPS every 5 s for ever
    (KEY_VALUES_MISMATCH)."""
    cert, key = _self_signed(tmp_path, "page")
    _, other = _self_signed(tmp_path, "other")
    (tmp_path / "garbage.pem").write_text("not a certificate\n")
    path = tmp_path / "gateway.yaml"

    def check(cert_file: str, key_file: str) -> subprocess.CompletedProcess[str]:
        path.write_text(BASE + f'web:\n  tls: {{cert_file: "{cert_file}",\n        key_file: "{key_file}"}}\n')
        return subprocess.run([sys.executable, "-m", "gateway", "check-config", str(path)], capture_output=True,
                              text=True, env=ENV, cwd=ROOT, timeout=60)

    result = check(cert, other)
    assert result.returncode == 78
    assert result.stderr.splitlines() == [
        f'{path}:7: web.tls.key_file: expected the private key of the certificate in "{cert}", got "{other}", the key '
        "of another certificate"]
    result = check(str(tmp_path / "garbage.pem"), key)
    assert result.returncode == 78
    assert result.stderr.startswith(f'{path}:6: web.tls.cert_file: expected a PEM certificate, got '
                                    f'"{tmp_path / "garbage.pem"}", from which none could be read')
    assert check(cert, key).returncode == 0


@pytest.mark.parametrize("empty", ["web:", "web: null", "web: ~"])
def test_an_empty_web_section_is_said_once_at_start(tmp_path, caplog, empty):
    """`web:` with nothing under it started no page and said nothing: the page stays off (a null section is no
    section, as for every optional one), and the start says how to turn it on."""
    from gateway.config.preflight import preflight

    path = tmp_path / "gateway.yaml"
    path.write_text(BASE + empty + "\n")
    cfg = config.load(str(path))
    assert cfg.web is None
    with caplog.at_level(logging.WARNING, logger="edge_gateway.config"):
        preflight(cfg, str(path), isolate_models=True)
        preflight(cfg, str(path))  # check-config, a reload: nothing
    assert [r.getMessage() for r in caplog.records] == [
        f"{path}:5: web: is empty, so no status page is served; write `web: {{}}` for the page with its defaults "
        "(127.0.0.1:8470), or remove the key"]
    caplog.clear()
    path.write_text(BASE)
    with caplog.at_level(logging.WARNING, logger="edge_gateway.config"):
        preflight(config.load(str(path)), str(path), isolate_models=True)
    assert caplog.records == []

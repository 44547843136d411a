"""The local MQTT broker (amqtt) for plant sensors, and the embedded stand-in upstream of the demo.

Three ways to run it:
- `edge-gateway broker -c /etc/edge-gateway/amqtt.yaml`: the `edge-gateway-broker.service` unit
  (amqtt's own YAML format; see broker_config/amqtt.yaml), with sd_notify READY=1;
- `local_broker.enabled: true` in gateway.yaml: in the gateway's own process (`start()`);
- `python -m gateway.broker --listen HOST:PORT`: tests and the demo.

A packet larger than `max_message_size` (plus room for its topic) closes the client's connection,
as mosquitto's `max_packet_size` does; amqtt has no such setting, so `start()` puts a bound on the
fixed header it reads. In the service's amqtt.yaml the key is ours and is removed before amqtt
reads the file.

Anonymous clients are refused unless explicitly allowed. Users live in a password file of
`name:argon2-hash` lines, written by `edge-gateway broker-user` (never a plain password).
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import logging
import os
import secrets
import signal
import sys
from typing import Any

import yaml

from gateway.errors import EX_CANTCREAT, EX_CONFIG, EX_DATAERR, EX_OK
from gateway.files import STDOUT, not_text, replacing
from gateway.units import parse_size

log = logging.getLogger("edge_gateway.broker")

ANON = "amqtt.plugins.authentication.AnonymousAuthPlugin"
FILE_AUTH = "amqtt.plugins.authentication.FileAuthPlugin"
DEFAULT_CONFIG = "/etc/edge-gateway/amqtt.yaml"
DEFAULT_USERS = "/etc/edge-gateway/local-broker.users"
MAX_MESSAGE_SIZE = 256 * 1024
TOPIC_ROOM = 65_536 + 16  # an MQTT topic takes up to 65,535 bytes, then the packet id and length fields


class PacketTooLarge(Exception):
    """A client sent a packet beyond the limit: amqtt's reader loop ends and closes its connection."""


def broker_config(listen: str, *, allow_anonymous: bool = False, password_file: str | None = None
                  ) -> dict[str, Any]:
    plugins: dict[str, Any] = {ANON: {"allow_anonymous": allow_anonymous}}
    if password_file:
        plugins[FILE_AUTH] = {"password_file": password_file}
    return {"listeners": {"default": {"type": "tcp", "bind": listen}}, "plugins": plugins}


def check_config(cfg: Any, file: str) -> list[str]:
    """What would make this amqtt config unsafe or unusable; [] when it is fine."""
    problems = []
    if not isinstance(cfg, dict) or not isinstance(cfg.get("listeners"), dict) or not cfg["listeners"]:
        return [f"{file}: listeners: expected at least one listener (e.g. default: {{type: tcp, bind: "
                f"127.0.0.1:1883}})"]
    plugins = cfg.get("plugins") or {}
    if not isinstance(plugins, dict):
        return [f"{file}: plugins: expected a mapping of plugin class to its options"]
    if "max_message_size" in cfg:
        try:
            cfg["max_message_size"] = parse_size(cfg["max_message_size"])
            if not 1024 <= cfg["max_message_size"] <= 256 * 1024**2:
                raise ValueError
        except (TypeError, ValueError):
            problems.append(f"{file}: max_message_size: expected a size from 1KiB to 256MiB such as 256KiB, got "
                            f"{cfg['max_message_size']!r}")
    anon = (plugins.get(ANON) or {}).get("allow_anonymous", True) if ANON in plugins else None
    users = (plugins.get(FILE_AUTH) or {}).get("password_file") if FILE_AUTH in plugins else None
    if anon is None and users is None:
        problems.append(f"{file}: plugins: expected {FILE_AUTH} with a password_file (and {ANON} with "
                        "allow_anonymous: false); without an authentication plugin no client can log in")
    if FILE_AUTH in plugins:
        if not users:
            problems.append(f"{file}: plugins.{FILE_AUTH}.password_file: required")
        elif not os.access(users, os.R_OK):
            problems.append(f"{file}: plugins.{FILE_AUTH}.password_file: cannot read {users} "
                            "(create users with: edge-gateway broker-user NAME)")
        elif why := not_text(users):  # amqtt would stop with a traceback
            problems.append(f"{file}: plugins.{FILE_AUTH}.password_file: {why}, or make its users again with "
                            "edge-gateway broker-user NAME")
    return problems


async def start(listen: str = "127.0.0.1:1883", *, config: dict[str, Any] | None = None,
                max_message_size: int = MAX_MESSAGE_SIZE, **options: Any) -> Any:
    """Start an amqtt broker on HOST:PORT (or from an amqtt config dict); call `await broker.shutdown()`."""
    from amqtt.broker import Broker  # imported here: amqtt is an optional extra

    _bound_packets(max_message_size + TOPIC_ROOM)
    broker = Broker(config if config is not None else broker_config(listen, **options))
    await broker.start()
    return broker


_packet_limit = [MAX_MESSAGE_SIZE + TOPIC_ROOM]


def _bound_packets(limit: int) -> None:
    """Make amqtt refuse packets above `limit` bytes as soon as their fixed header is read.

    amqtt (0.12) reads a packet's whole remaining length, up to 256 MB, into memory before any plugin
    sees it. Its reader loop looks `MQTTFixedHeader` up in its module on every packet, so a subclass
    placed there bounds every connection; raising from it ends that client's reader, which closes
    the connection (what the MQTT specification asks of a server for a packet it will not take).
    """
    from amqtt.mqtt import packet
    from amqtt.mqtt.protocol import handler

    _packet_limit[0] = limit
    if getattr(handler.MQTTFixedHeader, "bounded", False):
        return
    base = packet.MQTTFixedHeader

    class BoundedHeader(base):  # type: ignore[valid-type, misc]
        bounded = True

        @classmethod
        async def from_stream(cls, reader: Any) -> Any:
            header = await super().from_stream(reader)
            if header is not None and header.remaining_length > _packet_limit[0]:
                log.warning("refused a packet of %d bytes (above max_message_size); the client is disconnected",
                            header.remaining_length)
                raise PacketTooLarge(f"a packet of {header.remaining_length} bytes")
            return header

    handler.MQTTFixedHeader = BoundedHeader


async def _serve(config: dict[str, Any], description: str) -> None:
    from gateway.notify import Notifier

    config = dict(config)
    limit = config.pop("max_message_size", MAX_MESSAGE_SIZE)
    broker = await start(config=config, max_message_size=limit)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    log.info("local broker listening: %s", description)
    print(f"amqtt broker listening on {description}", flush=True)
    notifier = Notifier()
    notifier.ready(f"listening on {description}")
    await stop.wait()
    notifier.stopping()
    await broker.shutdown()


def serve_file(path: str) -> int:
    """`edge-gateway broker -c FILE`: 0 after SIGTERM, 78 for a bad config file."""
    try:
        with open(path, "rb") as fh:
            data = fh.read()
        cfg = yaml.safe_load(data.decode("utf-8"))
    except OSError as err:
        print(f"{path}: cannot read the file: {err.strerror}", file=sys.stderr)
        return EX_CONFIG
    except UnicodeDecodeError as err:  # any bytes in the file are a config error, never a traceback
        line = data[:err.start].count(b"\n") + 1
        print(f"{path}:{line}: not UTF-8 text: byte 0x{data[err.start]:02x} at offset {err.start}; save the file as "
              f"UTF-8", file=sys.stderr)
        return EX_CONFIG
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        print(f"{path}{f':{mark.line + 1}' if mark else ''}: not valid YAML: {getattr(err, 'problem', None) or err}",
              file=sys.stderr)
        return EX_CONFIG
    except RecursionError:
        print(f"{path}: not a config: the YAML is nested too deeply", file=sys.stderr)
        return EX_CONFIG
    problems = check_config(cfg, path)
    if problems:
        print("\n".join(problems), file=sys.stderr)
        return EX_CONFIG
    plugins = cfg.get("plugins") or {}
    if ANON in plugins and (plugins[ANON] or {}).get("allow_anonymous", True):
        log.warning("%s allows anonymous clients: any process that reaches the port can publish", path)
    binds = ", ".join(str(v.get("bind")) for v in cfg["listeners"].values() if isinstance(v, dict))
    asyncio.run(_serve(cfg, binds))
    return EX_OK


# -- users -------------------------------------------------------------------------------------
def hash_password(password: str) -> str:
    from pwdlib.hashers.argon2 import Argon2Hasher  # amqtt's own hasher (FileAuthPlugin verifies with it)
    return Argon2Hasher().hash(password)


def set_user(users_file: str, name: str, password: str | None) -> bool:
    """Add, replace (password) or remove (None) a user; the file is rewritten atomically, mode 0640. False: a user
    to remove that was not there (nothing written)."""
    if not name or ":" in name or any(c.isspace() for c in name):
        raise ValueError(f"user name {name!r}: expected no spaces or colons")
    lines, found = [], False
    try:
        with open(users_file, encoding="utf-8", errors="surrogateescape") as fh:  # a garbled line is kept as it is
            for ln in fh:
                if ln.split(":", 1)[0].strip() == name:
                    found = True
                else:
                    lines.append(ln.rstrip("\n"))
        st = os.stat(users_file)
        owner = (st.st_uid, st.st_gid)
    except FileNotFoundError:
        owner = None
    if password is None and not found:
        return False
    if password is not None:
        lines.append(f"{name}:{hash_password(password)}")
    try:
        _write_private(users_file, "".join(f"{ln}\n" for ln in lines), owner)
    except OSError as err:  # (not the temporary file's name: the file the user named)
        raise OSError(err.errno, f"cannot write {users_file}: {err.strerror}") from None
    return True


def _write_private(path: str, text: str, owner: tuple[int, int] | None = None) -> None:
    """`text` into `path`, mode 0640 (and `owner`, as root) before a byte is written (`files.replacing`)."""
    with replacing(path, 0o640, owner, errors="surrogateescape") as out:
        out.write(text)


def user_command(args: argparse.Namespace) -> int:
    """`edge-gateway broker-user NAME`: set a password (asked, from stdin, or generated into a file)."""
    prog = getattr(args, "command", None) or "broker-user"
    try:
        if args.delete:
            removed = set_user(args.users, args.name, None)
            print(f"{args.users}: user {args.name} removed" if removed else
                  f"{args.users}: there is no user {args.name}; nothing changed")
            return EX_OK
        if args.generate:
            password = secrets.token_urlsafe(24)
        elif sys.stdin.isatty():
            password = getpass.getpass(f"password for {args.name}: ")
            if password != getpass.getpass("again: "):
                print("the two passwords differ; nothing changed", file=sys.stderr)
                return EX_DATAERR
        else:
            password = sys.stdin.readline().rstrip("\n")
        if len(password) < 8:
            print("a password needs at least 8 characters; nothing changed", file=sys.stderr)
            return EX_DATAERR
        set_user(args.users, args.name, password)
        if args.generate:  # after the users file took it: a password is never given out for a user not set
            try:
                _write_private(args.generate, password + "\n")
            except OSError as err:
                raise OSError(err.errno, f"user {args.name} is set, but its password cannot be written to "
                                         f"{args.generate}: {err.strerror}; run this again") from None
    except ValueError as err:
        print(f"{prog}: {err}", file=sys.stderr)
        return EX_DATAERR
    except OSError as err:
        print(f"{prog}: {err.strerror or err}", file=sys.stderr)
        return EX_CANTCREAT
    shown = args.generate in STDOUT  # the password is the output: this line goes beside it, to stderr
    where = "on standard output" if shown else f"in {args.generate} (mode 0640)"
    print(f"{args.users}: user {args.name} set" + (f"; its password is {where}" if args.generate else ""),
          file=sys.stderr if shown else sys.stdout)
    return EX_OK


def add_arguments(broker: argparse.ArgumentParser, user: argparse.ArgumentParser) -> None:
    broker.add_argument("-c", "--config", default=DEFAULT_CONFIG, help="amqtt config file (default %(default)s)")
    user.add_argument("name")
    user.add_argument("--users", default=DEFAULT_USERS, help="the broker's password file (default %(default)s)")
    user.add_argument("--generate", metavar="FILE", help="make up a password and write it to FILE (0640; - for "
                                                         "standard output): for the gateway's own login")
    user.add_argument("--delete", action="store_true", help="remove the user")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gateway.broker", description=__doc__.splitlines()[0])
    parser.add_argument("--listen", default="127.0.0.1:1883", help="HOST:PORT (default %(default)s)")
    parser.add_argument("--allow-anonymous", action="store_true", help="accept clients without credentials")
    parser.add_argument("--password-file", help="password file (name:hash lines)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    cfg = broker_config(args.listen, allow_anonymous=args.allow_anonymous, password_file=args.password_file)
    asyncio.run(_serve(cfg, args.listen))
    return EX_OK


if __name__ == "__main__":
    raise SystemExit(main())

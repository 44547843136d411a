"""`edge-gateway broker` (the local MQTT broker for plant sensors) and `edge-gateway broker-user`.

Both need the [broker] extra: amqtt to serve, pwdlib for the password hashes; without it they say
which package is missing and exit 69. The arguments are `gateway.broker`'s own.
"""

from __future__ import annotations

import argparse
import sys

from gateway import broker, logs
from gateway.commands.common import Subparsers
from gateway.errors import EX_UNAVAILABLE, missing


def add_to(sub: Subparsers) -> None:
    serve = sub.add_parser("broker", help="run the local MQTT broker for plant sensors (amqtt)")
    user = sub.add_parser("broker-user", help="add, change or remove a local broker user")
    broker.add_arguments(serve, user)
    serve.set_defaults(main=_serve)
    user.set_defaults(main=_user)


def _serve(args: argparse.Namespace) -> int:
    if not _installed("broker", "amqtt"):
        return EX_UNAVAILABLE
    logs.setup("info")
    return broker.serve_file(args.config)


def _user(args: argparse.Namespace) -> int:
    if not _installed("broker-user", "pwdlib"):
        return EX_UNAVAILABLE
    return broker.user_command(args)


def _installed(command: str, *modules: str) -> bool:
    if absent := missing(*modules):
        print(f"edge-gateway {command} needs {', '.join(absent)}, which is not installed: "
              f"pip install 'edge-gateway[broker]' (install.sh --with-local-broker installs it)", file=sys.stderr)
        return False
    return True

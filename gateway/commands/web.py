"""`edge-gateway web-user NAME`: add, change or remove a user of the web page (`web.users_file`).

The file has the local broker's format (`name:argon2-hash` lines), so `gateway.broker` writes it;
the [web] extra brings the hashing (pwdlib with argon2).
"""

from __future__ import annotations

import argparse
import sys

from gateway.commands.common import Subparsers
from gateway.errors import EX_UNAVAILABLE, missing


def add_to(sub: Subparsers) -> None:
    parser = sub.add_parser("web-user", help="add, change or remove a user of the web page (web.users_file)")
    parser.add_argument("name")
    parser.add_argument("--users", default="/etc/edge-gateway/web-users",
                        help="the web page's users file (default %(default)s)")
    parser.add_argument("--generate", metavar="FILE",
                        help="make up a password and write it to FILE (0640; - for standard output)")
    parser.add_argument("--delete", action="store_true", help="remove the user")
    parser.set_defaults(main=web_user)


def web_user(args: argparse.Namespace) -> int:
    if absent := missing("pwdlib", "argon2"):
        print(f"edge-gateway web-user needs {', '.join(absent)}, which is not installed: "
              "pip install 'edge-gateway[web]' (install.sh --with-web installs it)", file=sys.stderr)
        return EX_UNAVAILABLE
    from gateway import broker

    return broker.user_command(args)

"""The `edge-gateway` command. Exit codes follow sysexits: 0 ok, 64 usage, 69 service
unavailable, 70 internal error (a supervised loop failed: systemd restarts us), 73 cannot
create (data_dir), 78 config error.

Each command owns its arguments and its work, in `gateway/commands/` (`add_to` registers it);
this module only puts them together. Heavy imports stay inside the commands, so that
`edge-gateway run` loads nothing another command needs.
"""

from __future__ import annotations

import argparse

from gateway import __version__
from gateway.commands import broker, counters, daemon, demo, opcua, outbox, sim, status, web
from gateway.commands import model as modelcli
from gateway.commands.common import Parser, Subparsers


def _parser() -> argparse.ArgumentParser:
    parser = Parser(prog="edge-gateway", description="Plant-floor gateway: Modbus/OPC UA/MQTT/sim → exact counters → "
                                                     "durable outbox → upstream MQTT.")
    parser.add_argument("--version", action="version", version=f"edge-gateway {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    for command in (daemon, status, outbox, counters, opcua, sim, broker, web):
        command.add_to(sub)
    _add_model_commands(sub)
    demo.add_to(sub)
    return parser


def _add_model_commands(sub: Subparsers) -> None:
    modelcli.add_arguments(sub)
    sub.choices["model"].set_defaults(main=modelcli.model_command)
    sub.choices["history"].set_defaults(main=modelcli.history_command)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    code: int = args.main(args)
    return code

"""The `edge-gateway` command. Exit codes follow sysexits: 0 ok, 64 usage, 69 service
unavailable, 70 internal error (a supervised loop failed: systemd restarts us), 73 cannot
create (data_dir), 78 config error; 141 (as for SIGPIPE) when stdout's reader has gone, with no message.

Each command owns its arguments and its work, in `gateway/commands/` (`add_to` registers it);
this module only puts them together. Heavy imports stay inside the commands, so that
`edge-gateway run` loads nothing another command needs.
"""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys
from collections.abc import Sequence
from typing import Any

from gateway import __version__
from gateway.commands.common import Parser
from gateway.errors import EX_IOERR, EX_NOPERM, EX_USAGE

EX_PIPE = 128 + signal.SIGPIPE  # what a shell reports for a tool that stopped because its reader went away
EX_INTERRUPTED = 128 + signal.SIGINT  # as a shell reports a command stopped by Ctrl-C

# Each command and the module in gateway/commands/ that owns it, in the order `--help` lists them. Only the
# module of the command given is imported (`edge-gateway run` does not carry every other command's code: 1 MiB
# of the daemon's RSS); an unknown command or none gets them all, for the usage message.
COMMANDS = {"run": "daemon", "check-config": "daemon", "status": "status", "outbox": "outbox", "counters": "counters",
            "opcua": "opcua", "sim": "sim", "broker": "broker", "broker-user": "broker", "web-user": "web",
            "model": "model", "history": "model", "demo": "demo"}


def _parser(command: str | None = None) -> argparse.ArgumentParser:
    parser = Parser(prog="edge-gateway", usage=f"%(prog)s [-h] [--version] {{{','.join(COMMANDS)}}} ...",
                    description="Plant-floor gateway: Modbus/OPC UA/MQTT/sim → exact counters → durable outbox → "
                                "upstream MQTT.")  # the usage names every command, also when one module is loaded
    parser.add_argument("--version", action="version", version=f"edge-gateway {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    modules = [COMMANDS[command]] if command in COMMANDS else dict.fromkeys(COMMANDS.values())
    for name in modules:
        importlib.import_module(f"gateway.commands.{name}").add_to(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    for i, arg in enumerate(argv):  # bytes that are not UTF-8 (their surrogates) fail wherever they are written
        try:
            arg.encode("utf-8")
        except UnicodeEncodeError:
            shown = arg.encode("utf-8", "surrogateescape").decode("ascii", "backslashreplace")[:80]
            print(f"edge-gateway: argument {i + 1} is not UTF-8 text: {shown}", file=sys.stderr)
            return EX_USAGE
    args = _parser(argv[0] if argv else None).parse_args(argv)
    out = _Watched(sys.stdout) if sys.stdout is not None else None
    if out is not None:
        sys.stdout = out
    try:
        code: int = args.main(args)
        if out is not None:
            out.flush()  # here, not at the exit: an output that cannot be written is said below
    except KeyboardInterrupt:  # Ctrl-C in a command (a training, a CSV that never ends): said, not a traceback
        print(f"edge-gateway {argv[0]}: interrupted", file=sys.stderr)
        return EX_INTERRUPTED
    except BrokenPipeError:  # `edge-gateway model score ... | head`: the reader has gone, as it may
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so that the exit's flush is quiet too
        return EX_PIPE
    except PermissionError as err:  # the data_dir is the service user's (0750): an operator without sudo
        where = f"{err.filename}: " if err.filename else ""
        print(f"edge-gateway {argv[0]}: {where}permission denied: run it as root or as the service user "
              "(sudo edge-gateway ..., or sudo -u edge-gateway edge-gateway ...)", file=sys.stderr)
        return EX_NOPERM
    except OSError as err:
        if out is None or out.failed is not err:
            raise
        # `edge-gateway status > /dev/full`, or stdout on a full disk: said, not a traceback
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        print(f"edge-gateway {argv[0]}: cannot write the output: {err.strerror or err}", file=sys.stderr)
        return EX_IOERR
    return code


class _Watched:
    """Standard output, remembering a write that failed: that error is the output's, not a file's."""

    def __init__(self, stream: Any) -> None:
        self._stream = stream
        self.failed: OSError | None = None

    def write(self, text: str) -> int:
        try:
            return int(self._stream.write(text))
        except OSError as err:
            self.failed = err
            raise

    def flush(self) -> None:
        try:
            self._stream.flush()
        except OSError as err:
            self.failed = err
            raise

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)

"""The `edge-gateway` console script and `python -m gateway`: before anything is imported, a SIGHUP sent while
`run` starts is held for the daemon, which reloads once its handler is in place (`commands/daemon.py`).

Python's default for SIGHUP ends the process, and systemd takes that as a clean exit (`Restart=on-failure`
leaves it down). Importing the commands, loading the models and opening the outbox take a second or more on a
small box; a reload asked for in that second was the end of the gateway.
"""

from __future__ import annotations

import signal
import sys

HELD_HUP: list[int] = []  # SIGHUPs received before the daemon's own handler


def hold_hup() -> None:
    signal.signal(signal.SIGHUP, lambda signum, frame: HELD_HUP.append(signum))


def main() -> int:
    if sys.argv[1:2] == ["run"]:
        hold_hup()
    from gateway.cli import main as cli_main
    return cli_main()

"""The `edge-gateway` console script and `python -m gateway`: before the commands are imported, a SIGHUP sent
while `run` starts is held for the daemon (`notify.hold_hup`), which reloads once its handler is in place."""

from __future__ import annotations

import sys


def main() -> int:
    if sys.argv[1:2] == ["run"]:
        from gateway.notify import hold_hup
        hold_hup()
    from gateway.cli import main as cli_main
    return cli_main()

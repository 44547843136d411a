"""`edge-gateway demo`: everything on this machine (see gateway/demo.py); needs the [broker] extra."""

from __future__ import annotations

import argparse
import math
import sys

from gateway.commands.common import Subparsers
from gateway.errors import EX_UNAVAILABLE, EX_USAGE, missing


def add_to(sub: Subparsers) -> None:
    demo = sub.add_parser("demo", help="everything on this machine: simulated plant, broker, gateway, live view")
    demo.add_argument("--duration", type=float, default=None, help="stop after this many seconds (default: Ctrl-C)")
    demo.add_argument("--plain", action="store_true", help="print lines instead of redrawing the screen")
    demo.add_argument("--fault-after", type=float, default=60.0,
                      help="inject bearing wear into the pump after this many seconds (default %(default)s)")
    demo.set_defaults(main=run)


def run(args: argparse.Namespace) -> int:
    if args.duration is not None and not 0 < args.duration < math.inf:
        print(f"edge-gateway demo: --duration {args.duration:g}: expected seconds above 0 (or leave it out: Ctrl-C)",
              file=sys.stderr)
        return EX_USAGE
    if not 0 <= args.fault_after < math.inf:
        print(f"edge-gateway demo: --fault-after {args.fault_after:g}: expected seconds from 0", file=sys.stderr)
        return EX_USAGE
    if absent := missing("amqtt"):
        print(f"edge-gateway demo needs {', '.join(absent)}, which is not installed: "
              f"pip install 'edge-gateway[broker]' (install.sh --with-local-broker installs it)", file=sys.stderr)
        return EX_UNAVAILABLE
    from gateway.demo import demo

    return demo(duration=args.duration, plain=args.plain, fault_after=args.fault_after)

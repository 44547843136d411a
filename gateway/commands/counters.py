"""`edge-gateway counters`: show the totals, set a baseline after a PLC swap (audited), show the audit."""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import sys
import time

from gateway import config as configuration
from gateway import datadir
from gateway.commands.common import Subparsers, config_option, load
from gateway.counters import MAX_TOTAL
from gateway.errors import EX_CONFIG, EX_OK, EX_UNAVAILABLE, EX_USAGE


def add_to(sub: Subparsers) -> None:
    parser = sub.add_parser("counters", help="show counter totals; set a baseline after a PLC swap (audited)")
    parser.add_argument("action", nargs="?", choices=("show", "set", "audit"), default="show")
    parser.add_argument("device", nargs="?")
    parser.add_argument("name", nargs="?")
    parser.add_argument("value", nargs="?", type=int)
    parser.add_argument("--reason", help="set: why (recorded in the audit table)")
    config_option(parser)
    parser.add_argument("--json", action="store_true")
    parser.set_defaults(main=counters)


def counters(args: argparse.Namespace) -> int:
    cfg = load(args.config)
    if cfg is None:
        return EX_CONFIG
    from gateway.store import admin

    path = datadir.path(cfg.gateway.data_dir, datadir.OUTBOX)
    try:
        if args.action == "set":
            return _set_counter(args, cfg, path)
        rows, damaged = admin.counter_audit(path) if args.action == "audit" else admin.counter_rows(path)
    except (OSError, sqlite3.Error) as err:
        print(f"cannot read {path}: {err}", file=sys.stderr)
        return EX_UNAVAILABLE
    shown = ("counter audit {}: shown with - for what is not a time or a count" if args.action == "audit" else
             "counter {}: shown as the gateway takes it up, those fields afresh")
    for note in damaged:
        print(f"{path}: {shown.format(note)}", file=sys.stderr)
    if args.action == "audit":
        keys = ("at", "device", "name", "old_total", "new_total", "reason", "by_user")
    else:
        keys = ("device", "name", "total", "shift", "shift_id", "last_raw", "updated")
    records = [dict(zip(keys, row, strict=True)) for row in rows]
    configured = {(d.name, c.name) for d in cfg.devices for c in d.counters}
    if args.action == "show":  # a counter renamed or taken out keeps its row (its total, if it comes back)
        for r in records:
            r["configured"] = (r["device"], r["name"]) in configured
    if args.json:
        print(json.dumps(records, indent=2))
        return EX_OK
    for r in records:
        at = r.get("at") if args.action == "audit" else r.get("updated")
        when = "-" if at is None else time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(at))
        if args.action == "audit":
            print(f"{when}  {r['device']}/{r['name']}: {_shown(r['old_total'])} -> {_shown(r['new_total'])} by "
                  f"{r['by_user']}: {r['reason']}")
        else:
            print(f"{r['device']:<16} {r['name']:<14} total {r['total']:>12}  shift {r['shift']:>9} "
                  f"({r['shift_id'] or '-'})  last raw {r['last_raw'] if r['last_raw'] is not None else '-'}  "
                  f"updated {when}" + ("" if r["configured"] else "  (not in the config: kept, not counting)"))
    if not records:
        print("no counters yet" if args.action == "show" else "no baseline was ever set")
    return EX_OK


def _shown(count: int | None) -> str:
    return "-" if count is None else str(count)


def _set_counter(args: argparse.Namespace, cfg: configuration.Config, path: str) -> int:
    import getpass

    from gateway.store import admin
    from gateway.store import outbox as store

    if args.device is None or args.name is None or args.value is None or not args.reason:
        print("usage: edge-gateway counters set DEVICE NAME VALUE --reason TEXT", file=sys.stderr)
        return EX_USAGE
    if not 0 <= args.value <= MAX_TOTAL:
        print(f"counters set: VALUE {args.value} is not a total from 0 to {MAX_TOTAL} (2^53 - 1, the most an "
              f"upstream JSON reader holds exactly)", file=sys.stderr)
        return EX_USAGE
    device = next((d for d in cfg.devices if d.name == args.device), None)
    if device is None or args.name not in {c.name for c in device.counters}:
        print(f"{args.config}: no counter {args.name!r} on a device {args.device!r}", file=sys.stderr)
        return EX_USAGE
    held = store.lock(cfg.gateway.data_dir)
    if held is None:
        print("the gateway is running with this data_dir: stop it first (systemctl stop edge-gateway)",
              file=sys.stderr)
        return EX_UNAVAILABLE
    with held:
        if not os.path.exists(path):
            store.Outbox.open(path).close()
        old = admin.set_counter(path, args.device, args.name, args.value, args.reason, getpass.getuser())
    print(f"{args.device}/{args.name}: total {old} -> {args.value}; the next value read from the PLC is the new "
          f"baseline (recorded in the audit: edge-gateway counters audit)")
    return EX_OK

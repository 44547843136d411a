"""`edge-gateway outbox`: inspect, export or purge (with confirmation) the messages waiting for the upstream."""

from __future__ import annotations

import argparse
import json
import sqlite3
import sys

from gateway import datadir
from gateway.commands.common import Subparsers, config_option, load
from gateway.errors import EX_CANTCREAT, EX_CONFIG, EX_OK, EX_UNAVAILABLE, EX_USAGE
from gateway.files import replacing


def add_to(sub: Subparsers) -> None:
    parser = sub.add_parser("outbox", help="inspect, export or purge the messages waiting for the upstream")
    parser.add_argument("action", nargs="?", choices=("stats", "export", "purge"), default="stats")
    parser.add_argument("file", nargs="?", help="export: the JSONL file to write (- for stdout)")
    config_option(parser)
    parser.add_argument("--yes", action="store_true", help="purge without asking")
    parser.add_argument("--json", action="store_true", help="stats as JSON")
    parser.set_defaults(main=outbox)


def outbox(args: argparse.Namespace) -> int:
    cfg = load(args.config)
    if cfg is None:
        return EX_CONFIG
    from gateway.store import admin
    from gateway.store import outbox as store

    path = datadir.path(cfg.gateway.data_dir, datadir.OUTBOX)
    try:
        if args.action == "export":
            if not args.file:
                print("edge-gateway outbox export: name the file to write (or - for stdout)", file=sys.stderr)
                return EX_USAGE
            admin.reader(path).close()  # there is an outbox: an OSError after this is the file's
            try:
                with replacing(args.file) as out:
                    n, damaged = admin.export(path, out)
            except BrokenPipeError:
                raise
            except OSError as err:  # a full disk mid-way names no file: name it
                print(f"cannot write {args.file}: {err.strerror}", file=sys.stderr)
                return EX_CANTCREAT
            print(f"exported {n} messages to {args.file}", file=sys.stderr)
            if damaged:
                print(f"{damaged} of them are not what the gateway writes (the outbox damaged or edited by hand): a "
                      f"payload that is not JSON is given as text in damaged_payload, a time that is not one as null",
                      file=sys.stderr)
            return EX_OK
        info = admin.inspect(path)
    except BrokenPipeError:
        raise  # `outbox export - | head`: `cli.main` ends quietly
    except (OSError, sqlite3.Error) as err:
        print(f"cannot read the outbox {path}: {err}", file=sys.stderr)
        return EX_UNAVAILABLE
    if args.action == "stats":
        if args.json:
            print(json.dumps(info, indent=2))
            return EX_OK
        print(f"outbox {path}")
        seqs = f" (seq {info['first_seq']}..{info['last_seq']})" if info["messages"] else ""
        print(f"  waiting   {info['messages']} messages{seqs}, "
              f"{info['payload_bytes']} payload bytes, {info['file_bytes']} bytes on disk")
        print(f"  oldest    {info['oldest_age_s'] if info['oldest_age_s'] is not None else '-'} s; next seq "
              f"{info['next_seq']}; dropped {info['dropped']}; purged {info['purged']}")
        for topic, n in info["topics"].items():
            print(f"  {n:>9}  {topic}")
        return EX_OK
    # purge
    held = store.lock(cfg.gateway.data_dir)
    if held is None:
        print("the gateway is running with this data_dir: stop it first (systemctl stop edge-gateway)",
              file=sys.stderr)
        return EX_UNAVAILABLE
    with held:
        if not info["messages"]:
            print("the outbox is empty")
            return EX_OK
        if not args.yes:
            if not sys.stdin.isatty():
                print("refusing to purge without confirmation: use --yes", file=sys.stderr)
                return EX_USAGE
            try:
                answer = input(f"delete {info['messages']} messages (seq {info['first_seq']}..{info['last_seq']}) "
                               f"that never reached the upstream? type 'yes': ")
            except EOFError:  # Ctrl-D: no
                answer = ""
                print()
            if answer.strip() != "yes":
                print("nothing deleted")
                return EX_OK
        n = admin.purge(path)
    print(f"purged {n} messages; seq continues from {info['next_seq']}")
    return EX_OK

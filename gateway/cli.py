"""The `edge-gateway` command. Exit codes follow sysexits: 0 ok, 64 usage, 69 service
unavailable, 70 internal error (a supervised loop failed: systemd restarts us), 73 cannot
create (data_dir), 78 config error."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sqlite3
import sys
import time
from typing import Any, NoReturn

from gateway import __version__, logs
from gateway import config as configuration
from gateway.errors import EX_CANTCREAT, EX_CONFIG, EX_OK, EX_SOFTWARE, EX_UNAVAILABLE, EX_USAGE, missing

log = logging.getLogger("edge_gateway")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # usage errors are 64, not argparse's 2
        self.print_usage(sys.stderr)
        self.exit(EX_USAGE, f"{self.prog}: error: {message}\n")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="edge-gateway", description="Plant-floor gateway: Modbus/MQTT/sim → exact counters → "
                                                       "durable outbox → upstream MQTT.")
    parser.add_argument("--version", action="version", version=f"edge-gateway {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    run = sub.add_parser("run", help="run the gateway daemon")
    run.add_argument("-c", "--config", default=configuration.DEFAULT_PATH, help="config file (default %(default)s)")
    check = sub.add_parser("check-config", help="validate a config file and exit (78 when it has problems)")
    check.add_argument("file")
    status = sub.add_parser("status", help="devices, backlog and counters from the local state (no broker needed)")
    status.add_argument("-c", "--config", default=configuration.DEFAULT_PATH, help="config file (default %(default)s)")
    status.add_argument("--json", action="store_true", help="print the raw state as JSON")
    outbox = sub.add_parser("outbox", help="inspect, export or purge the messages waiting for the upstream")
    outbox.add_argument("action", nargs="?", choices=("stats", "export", "purge"), default="stats")
    outbox.add_argument("file", nargs="?", help="export: the JSONL file to write (- for stdout)")
    outbox.add_argument("-c", "--config", default=configuration.DEFAULT_PATH, help="config file (default %(default)s)")
    outbox.add_argument("--yes", action="store_true", help="purge without asking")
    outbox.add_argument("--json", action="store_true", help="stats as JSON")
    counters = sub.add_parser("counters", help="show counter totals; set a baseline after a PLC swap (audited)")
    counters.add_argument("action", nargs="?", choices=("show", "set", "audit"), default="show")
    counters.add_argument("device", nargs="?")
    counters.add_argument("name", nargs="?")
    counters.add_argument("value", nargs="?", type=int)
    counters.add_argument("--reason", help="set: why (recorded in the audit table)")
    counters.add_argument("-c", "--config", default=configuration.DEFAULT_PATH, help="config file (default %(default)s)")
    counters.add_argument("--json", action="store_true")
    simulate = sub.add_parser("sim", help="serve the simulated plant over Modbus TCP/RTU (read-only) and/or MQTT")
    simulate.add_argument("--modbus-tcp", metavar="HOST:PORT", help="e.g. 127.0.0.1:5020")
    simulate.add_argument("--modbus-rtu", metavar="DEVICE", help="serial device, e.g. /dev/ttyUSB0 or a pty")
    simulate.add_argument("--opcua", metavar="HOST:PORT", help="serve the units as an OPC UA server "
                          "(opc.tcp://HOST:PORT/edge-gateway/sim/, nodes ns=2;s=UnitN.tag; the [opcua] extra)")
    simulate.add_argument("--opcua-user", metavar="NAME", help="with --opcua: only this login opens a session")
    simulate.add_argument("--opcua-password-file", metavar="FILE", help="its password")
    simulate.add_argument("--opcua-cert", nargs=2, metavar=("CERT", "KEY"),
                          help="with --opcua: Basic256Sha256 SignAndEncrypt only, with this certificate and key")
    simulate.add_argument("--mqtt", metavar="HOST:PORT", help="also publish every unit's readings as JSON to "
                          "sim/unit{N}/state on this broker, like plant sensors")
    simulate.add_argument("--mqtt-user", help="MQTT user name (e.g. one made with edge-gateway broker-user)")
    simulate.add_argument("--mqtt-password-file", help="file holding that user's password")
    simulate.add_argument("--mqtt-interval", type=float, default=1.0, help="seconds between messages")
    simulate.add_argument("--baudrate", type=int, default=19200)
    simulate.add_argument("--parity", choices=("N", "E", "O"), default="E")
    simulate.add_argument("--stopbits", type=int, choices=(1, 2), default=1)
    simulate.add_argument("--units", default="1=pump:1,2=flexo_line:2,3=pump:3",
                          help="UNIT=PROFILE:SEED,... (default %(default)s)")
    simulate.add_argument("--counter-bits", type=int, choices=(16, 32), default=32, help="flexo raw counter width")
    simulate.add_argument("--start-near-top", action="store_true", help="flexo raw counters start just below the wrap")
    simulate.add_argument("--rate-per-min", type=float, default=120.0, help="flexo pieces per minute at 100 %%")
    simulate.add_argument("--reset-every", type=float, metavar="SECONDS",
                          help="reset the flexo raw counters on this schedule (kill -USR1 resets them now)")
    simulate.add_argument("--fault", action="append", default=[], metavar="UNIT:KIND[:AT[:DURATION[:TAG]]]",
                          help="inject a pump fault, e.g. 1:bearing_wear:60 (seconds); repeatable")
    simulate.add_argument("--exception", action="append", default=[], metavar="UNIT:CODE",
                          help="the PLC answers every request to UNIT with this exception code, e.g. 2:6")
    simulate.add_argument("--truth", metavar="FILE", help="write the flexo lines' true counts here (JSON, every step)")
    simulate.add_argument("--delay", action="append", default=[], metavar="UNIT:SECONDS",
                          help="the PLC answers UNIT this slowly")
    from gateway import broker
    broker.add_arguments(sub.add_parser("broker", help="run the local MQTT broker for plant sensors (amqtt)"),
                         sub.add_parser("broker-user", help="add, change or remove a local broker user"))
    web_user = sub.add_parser("web-user", help="add, change or remove a user of the web page (web.users_file)")
    web_user.add_argument("name")
    web_user.add_argument("--users", default="/etc/edge-gateway/web-users",
                          help="the web page's users file (default %(default)s)")
    web_user.add_argument("--generate", metavar="FILE", help="make up a password and write it to FILE (0640)")
    web_user.add_argument("--delete", action="store_true", help="remove the user")
    from gateway import modelcli
    modelcli.add_arguments(sub)
    demo = sub.add_parser("demo", help="everything on this machine: simulated plant, broker, gateway, live view")
    demo.add_argument("--duration", type=float, default=None, help="stop after this many seconds (default: Ctrl-C)")
    demo.add_argument("--plain", action="store_true", help="print lines instead of redrawing the screen")
    demo.add_argument("--fault-after", type=float, default=60.0,
                      help="inject bearing wear into the pump after this many seconds (default %(default)s)")
    return parser


# Commands that need an extra: [broker] (amqtt, and pwdlib for its password hashes), [web] (the same hashes).
EXTRAS = {"broker": ("amqtt",), "broker-user": ("pwdlib",), "demo": ("amqtt",), "web-user": ("pwdlib", "argon2")}


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "check-config":
        return check_config(args.file)
    if args.command == "run":
        return run(args.config)
    if args.command == "status":
        return status(args.config, args.json)
    if args.command == "outbox":
        return outbox(args)
    if args.command == "counters":
        return counters(args)
    if args.command == "sim":
        return simulate(args)
    needs = EXTRAS.get(args.command)
    if needs is not None and (absent := missing(*needs)):
        print(f"edge-gateway {args.command} needs {', '.join(absent)}, which is not installed: "
              + ("pip install 'edge-gateway[web]' (install.sh --with-web installs it)" if args.command == "web-user"
                 else "pip install 'edge-gateway[broker]' (install.sh --with-local-broker installs it)"),
              file=sys.stderr)
        return EX_UNAVAILABLE
    if args.command in ("broker", "broker-user", "web-user"):
        from gateway import broker
        if args.command in ("broker-user", "web-user"):  # the same name:argon2-hash file format
            return broker.user_command(args)
        logs.setup("info")
        return broker.serve_file(args.config)
    if args.command in ("model", "history"):
        from gateway import modelcli
        return modelcli.model_command(args) if args.command == "model" else modelcli.history_command(args)
    if args.command == "demo":
        from gateway.demo import demo
        return demo(duration=args.duration, plain=args.plain, fault_after=args.fault_after)
    return EX_USAGE


def _load(path: str) -> configuration.Config | None:
    try:
        return configuration.load(path)
    except configuration.ConfigError as err:
        print(err, file=sys.stderr)
        return None


def _prepare(path: str) -> tuple[configuration.Config, configuration.Prepared] | None:
    """The config and what preflight loaded (models); None after printing every problem."""
    cfg = _load(path)
    if cfg is None:
        return None
    try:
        return cfg, configuration.preflight(cfg, path)
    except configuration.ConfigError as err:
        print(err, file=sys.stderr)
        return None


def check_config(path: str) -> int:
    ready = _prepare(path)
    if ready is None:
        return EX_CONFIG
    cfg = ready[0]
    devices = ", ".join(f"{d.name} ({d.source})" for d in cfg.devices) or "none"
    print(f"{path}: ok; gateway {cfg.gateway.id}, topic root {cfg.topic_root}, devices: {devices}")
    return EX_OK


def run(path: str) -> int:
    ready = _prepare(path)
    if ready is None:
        return EX_CONFIG
    cfg, prepared = ready
    logs.setup(cfg.gateway.log_level)
    if any(d.source == "opcua" for d in cfg.devices):
        from gateway.sources.opcua import unknown_nodes  # asyncua only when a device uses it
        problems = asyncio.run(unknown_nodes(cfg))
        if problems:
            print(configuration.ConfigError(path, problems, configuration.load_lines(path)), file=sys.stderr)
            return EX_CONFIG
    return asyncio.run(_serve(cfg, path, prepared))


async def _serve(cfg: configuration.Config, path: str, prepared: configuration.Prepared) -> int:
    """The daemon under its signals: SIGTERM/SIGINT stop (a second one skips the drain), SIGHUP reloads."""
    import signal

    from gateway.app import Gateway, LoopFailed
    from gateway.errors import AlreadyRunning

    loop = asyncio.get_running_loop()
    shutdown, force = asyncio.Event(), asyncio.Event()

    def terminate() -> None:
        (force if shutdown.is_set() else shutdown).set()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, terminate)
    try:
        async with Gateway(cfg, config_path=path, prepared=prepared) as gateway:
            loop.add_signal_handler(signal.SIGHUP, gateway.reload_requested.set)
            await gateway.run(shutdown, force)
    except AlreadyRunning as err:
        log.error("%s", err)
        return EX_UNAVAILABLE
    except (OSError, sqlite3.Error) as err:
        log.error("cannot open the outbox in data_dir %s: %s", cfg.gateway.data_dir, err)
        return EX_CANTCREAT
    except LoopFailed as err:
        log.error("exiting with status %d: %s", EX_SOFTWARE, err)
        return EX_SOFTWARE
    return EX_OK


def status(path: str, as_json: bool) -> int:
    cfg = _load(path)
    if cfg is None:
        return EX_CONFIG
    from gateway.health import STATE_FILE

    state_path = os.path.join(cfg.gateway.data_dir, STATE_FILE)
    try:
        with open(state_path, encoding="utf-8") as fh:
            state = json.load(fh)
    except (OSError, ValueError) as err:
        print(f"no state in {state_path} ({err}); has the gateway run?", file=sys.stderr)
        return EX_UNAVAILABLE
    from gateway.outbox import held

    running = held(cfg.gateway.data_dir)
    age = max(0.0, time.time() - os.path.getmtime(state_path))
    if as_json:
        print(json.dumps({**state, "running": running, "age_s": round(age, 1)}, indent=2))
        return EX_OK if running is not False else EX_UNAVAILABLE
    up = state["upstream"]
    backlog = state["backlog"]
    if running is False:
        print(f"gateway {state['gateway_id']}  NOT RUNNING: what follows is its last state, from {state['ts']} "
              f"({_ago(age)} ago), when it had been up {state['uptime_s']:.0f}s")
    else:
        print(f"gateway {state['gateway_id']}  state at {state['ts']}  (up {state['uptime_s']:.0f}s)")
    print(f"upstream  {'connected' if up['connected'] else 'NOT connected'}; reconnects {up['reconnects']}; "
          f"last ack {up['last_ack'] or '-'}; last error {up['last_error'] or '-'}")
    print(f"backlog   {backlog['messages']} messages, {backlog['bytes']} bytes, oldest {backlog['oldest_age_s']}s; "
          f"dropped {state['dropped']}; store errors {state['store_errors']}")
    for name, dev in state["devices"].items():
        print(f"device    {name:<16} {dev['state']:<9} last sample {dev['last_sample'] or '-'}  "
              f"errors {dev['errors']}  {dev['last_error'] or ''}")
        if a := dev.get("anomaly"):
            score = "-" if a["score"] is None else f"{a['score']:.4f}"
            print(f"  model   {a['model']:<14} {a['state']}  score {score} / threshold {a['threshold']:.4f}  "
                  f"windows {a['windows_scored']} scored, {a['windows_not_scored']} not"
                  + (f" ({a['why_not_scored']})" if a.get("why_not_scored") else ""))
        for counter, c in state.get("counters", {}).get(name, {}).items():
            print(f"  counter {counter:<14} total {c['total']}  shift {c['shift']} ({c['shift_id'] or '-'})")
        for line in _events(dev):
            print(line)
    if running is False:
        print("start it with: sudo systemctl start edge-gateway (why it stopped: journalctl -u edge-gateway)")
        return EX_UNAVAILABLE
    if age > 3 * cfg.gateway.health_interval + 5:
        print(f"note: this state is {_ago(age)} old, but it should be rewritten every "
              f"{cfg.gateway.health_interval:g}s: is the gateway stuck?" if running else
              f"note: this state is {_ago(age)} old (whether the gateway runs cannot be told from here)")
    return EX_OK


def _events(dev: dict[str, Any]) -> list[str]:
    """A device's machine state, alarms and live OEE, as `status` prints them."""
    lines = []
    if machine := dev.get("machine"):
        why = machine.get("reason")
        lines.append(f"  machine {machine['state'] or '-'} since {machine['since'] or '-'}"
                     + (f"  reason {why['code']} {why['text'] or '(no text for this code)'}" if why else ""))
    if (alarms := dev.get("alarms")) is not None:
        lines.append(f"  alarms  active: {', '.join(alarms['active']) or 'none'}"
                     + (f"; unknown (no good reading): {', '.join(alarms['unknown'])}" if alarms["unknown"] else ""))
    if oee := dev.get("oee"):
        def pct(x: float | None) -> str:
            return "-" if x is None else f"{100 * x:.1f}%"
        lines.append(f"  oee     {pct(oee['oee'])} (availability {pct(oee['availability'])}, performance "
                     f"{pct(oee['performance'])}, quality {pct(oee['quality_rate'])}); shift {oee['shift_id']}: "
                     f"{oee['total']} made, {oee['defect']} defects")
    return lines


def _ago(seconds: float) -> str:
    """37s, 5m12s, 3h05m, 2d04h."""
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def _store_path(cfg: configuration.Config) -> str:
    from gateway.app import STORE_FILE
    return os.path.join(cfg.gateway.data_dir, STORE_FILE)


def outbox(args: argparse.Namespace) -> int:
    cfg = _load(args.config)
    if cfg is None:
        return EX_CONFIG
    from gateway import admin
    from gateway import outbox as store

    path = _store_path(cfg)
    try:
        if args.action == "export":
            if not args.file:
                print("edge-gateway outbox export: name the file to write (or - for stdout)", file=sys.stderr)
                return EX_USAGE
            if args.file == "-":
                n = admin.export(path, sys.stdout)
            else:
                with open(args.file, "w", encoding="utf-8") as out:
                    n = admin.export(path, out)
            print(f"exported {n} messages to {args.file}", file=sys.stderr)
            return EX_OK
        info = admin.inspect(path)
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
            answer = input(f"delete {info['messages']} messages (seq {info['first_seq']}..{info['last_seq']}) "
                           f"that never reached the upstream? type 'yes': ")
            if answer.strip() != "yes":
                print("nothing deleted")
                return EX_OK
        n = admin.purge(path)
    print(f"purged {n} messages; seq continues from {info['next_seq']}")
    return EX_OK


def simulate(args: argparse.Namespace) -> int:
    """`edge-gateway sim`: the simulated plant as Modbus PLCs, for testing an install without hardware."""
    from gateway.credentials import read_secret
    from sim.plc import SimPlant, serve

    if not (args.modbus_tcp or args.modbus_rtu or args.mqtt or args.opcua):
        print("edge-gateway sim: give --modbus-tcp HOST:PORT, --modbus-rtu DEVICE, --opcua HOST:PORT and/or "
              "--mqtt HOST:PORT", file=sys.stderr)
        return EX_USAGE
    try:
        units = {}
        for item in args.units.split(","):
            unit, rest = item.split("=")
            profile, seed = rest.split(":")
            units[int(unit)] = (profile, int(seed))
        tcp = mqtt = opcua = None
        if args.opcua:
            host, port = args.opcua.rsplit(":", 1)
            opcua = (host, int(port))
        if args.mqtt:
            host, port = args.mqtt.rsplit(":", 1)
            mqtt = {"host": host, "port": int(port), "username": args.mqtt_user,
                    "password": read_secret(args.mqtt_password_file), "interval": args.mqtt_interval}
        if args.modbus_tcp:
            host, port = args.modbus_tcp.rsplit(":", 1)
            tcp = (host, int(port))
        plant = SimPlant(units, counter_bits=args.counter_bits, counter_near_top=args.start_near_top,
                         base_rate=args.rate_per_min, reset_every=args.reset_every)
        for spec in args.fault:
            unit, kind, *rest = spec.split(":")
            at = float(rest[0]) if rest else None
            duration = float(rest[1]) if len(rest) > 1 else float("inf")
            plant.units[int(unit)].machine.inject(kind, at=at, duration=duration, tag=rest[2] if len(rest) > 2 else None)
        for spec in args.exception:
            unit, code = spec.split(":")
            plant.units[int(unit)].faults.exception = int(code)
        for spec in args.delay:
            unit, seconds = spec.split(":")
            plant.units[int(unit)].faults.delay = float(seconds)
    except (ValueError, KeyError, AttributeError, OSError) as err:
        print(f"edge-gateway sim: bad argument ({err}); see edge-gateway sim --help", file=sys.stderr)
        return EX_USAGE
    logs.setup("warning")
    where = ", ".join(x for x in (f"Modbus TCP {args.modbus_tcp}" if tcp else "",
                                   f"Modbus RTU {args.modbus_rtu} {args.baudrate} 8{args.parity}{args.stopbits}"
                                   if args.modbus_rtu else "",
                                   f"MQTT {args.mqtt} (sim/unitN/state)" if mqtt else "",
                                   f"OPC UA opc.tcp://{args.opcua}/edge-gateway/sim/ (ns=2;s=UnitN.tag)"
                                   if opcua else "") if x)
    print(f"simulated plant on {where}; units: " +
          ", ".join(f"{u}={p}" for u, (p, _) in units.items()), flush=True)
    try:
        asyncio.run(serve(plant, tcp=tcp, rtu=args.modbus_rtu, baudrate=args.baudrate, parity=args.parity,
                          stopbits=args.stopbits, truth_path=args.truth, mqtt=mqtt, opcua=opcua,
                          opcua_login=(args.opcua_user, read_secret(args.opcua_password_file) or "")
                          if args.opcua_user else None, opcua_cert=tuple(args.opcua_cert) if args.opcua_cert else None))
    except KeyboardInterrupt:
        pass
    except OSError as err:
        print(f"edge-gateway sim: cannot serve: {err}", file=sys.stderr)
        return EX_UNAVAILABLE
    return EX_OK


def counters(args: argparse.Namespace) -> int:
    cfg = _load(args.config)
    if cfg is None:
        return EX_CONFIG
    from gateway import admin

    path = _store_path(cfg)
    try:
        if args.action == "set":
            return _set_counter(args, cfg, path)
        rows = admin.counter_audit(path) if args.action == "audit" else admin.counter_rows(path)
    except (OSError, sqlite3.Error) as err:
        print(f"cannot read {path}: {err}", file=sys.stderr)
        return EX_UNAVAILABLE
    if args.action == "audit":
        keys = ("at", "device", "name", "old_total", "new_total", "reason", "by_user")
    else:
        keys = ("device", "name", "total", "shift", "shift_id", "last_raw", "updated")
    records = [dict(zip(keys, row, strict=True)) for row in rows]
    if args.json:
        print(json.dumps(records, indent=2))
        return EX_OK
    for r in records:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r.get("at") or r.get("updated") or 0))
        if args.action == "audit":
            print(f"{when}  {r['device']}/{r['name']}: {r['old_total']} -> {r['new_total']} by {r['by_user']}: "
                  f"{r['reason']}")
        else:
            print(f"{r['device']:<16} {r['name']:<14} total {r['total']:>12}  shift {r['shift']:>9} "
                  f"({r['shift_id'] or '-'})  last raw {r['last_raw'] if r['last_raw'] is not None else '-'}  "
                  f"updated {when}")
    if not records:
        print("no counters yet" if args.action == "show" else "no baseline was ever set")
    return EX_OK


def _set_counter(args: argparse.Namespace, cfg: configuration.Config, path: str) -> int:
    import getpass

    from gateway import admin
    from gateway import outbox as store

    if args.device is None or args.name is None or args.value is None or args.value < 0 or not args.reason:
        print("usage: edge-gateway counters set DEVICE NAME VALUE --reason TEXT", file=sys.stderr)
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

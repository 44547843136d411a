"""`edge-gateway status`: devices, backlog and counters from the local state file (no broker needed)."""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

from gateway import datadir
from gateway.commands.common import Subparsers, config_option, load
from gateway.errors import EX_CONFIG, EX_OK, EX_UNAVAILABLE


def add_to(sub: Subparsers) -> None:
    parser = sub.add_parser("status", help="devices, backlog and counters from the local state (no broker needed)")
    config_option(parser)
    parser.add_argument("--json", action="store_true", help="print the raw state as JSON")
    parser.set_defaults(main=lambda args: status(args.config, args.json))


STATE_LIMIT = 64 << 20


def status(path: str, as_json: bool) -> int:
    cfg = load(path)
    if cfg is None:
        return EX_CONFIG
    state_path = datadir.path(cfg.gateway.data_dir, datadir.STATE)
    try:
        # (not blocking on a FIFO put there, nor reading /dev/zero to the end: the gateway writes a few KiB)
        with os.fdopen(os.open(state_path, os.O_RDONLY | os.O_NONBLOCK), "rb") as fh:
            state = json.loads(fh.read(STATE_LIMIT))
    except (OSError, ValueError, RecursionError) as err:  # RecursionError: JSON nested thousands deep
        print(f"no state in {state_path} ({err}); has the gateway run?", file=sys.stderr)
        return EX_UNAVAILABLE
    from gateway.store.outbox import held

    running = held(cfg.gateway.data_dir)
    age = max(0.0, time.time() - os.path.getmtime(state_path))
    try:
        if as_json:
            if isinstance(state, dict):
                state.pop("seq", None)  # the outbox's seq mark: for the next start (`Outbox.keep_above`), not a status
            print(json.dumps({**state, "running": running, "age_s": round(age, 1)}, indent=2))
            return EX_OK if running is not False else EX_UNAVAILABLE
        return _show(state, running, age, cfg.gateway.health_interval)
    except (KeyError, TypeError, AttributeError, ValueError, OverflowError) as err:  # damaged, or another version's
        print(f"the state in {state_path} is not one this version writes ({type(err).__name__}: {err}); the gateway "
              f"writes it anew every {cfg.gateway.health_interval:g}s while it runs", file=sys.stderr)
        return EX_UNAVAILABLE


def _show(state: dict[str, Any], running: bool | None, age: float, health_interval: float) -> int:
    up = state["upstream"]
    backlog = state["backlog"]
    if running is False:
        print(f"gateway {state['gateway_id']}  NOT RUNNING: what follows is its last state, from {state['ts']} "
              f"({_ago(age)} ago), when it had been up {state['uptime_s']:.0f}s")
    else:
        print(f"gateway {state['gateway_id']}  state at {state['ts']}  (up {state['uptime_s']:.0f}s)")
    print(f"upstream  {'connected' if up['connected'] else 'NOT connected'}; reconnects {up['reconnects']}; "
          f"last ack {up['last_ack'] or '-'}; last error {up['last_error'] or '-'}")
    if stuck := up.get("stuck"):
        print(f"  STUCK   the broker closed the connection {stuck['closes']} times in a row after {stuck['topic']} "
              f"({stuck['bytes']} bytes; the oldest message waiting is seq {stuck['seq']}): a limit on packet size? "
              "Nothing is delivered")
    print(f"backlog   {backlog['messages']} messages, {backlog['bytes']} bytes, oldest {backlog['oldest_age_s']}s; "
          f"dropped {state['dropped']}; store errors {state['store_errors']}")
    if (history := state.get("history")) and history.get("error"):
        print(f"history   NOT recorded: {history['error']}")
    for name, dev in state["devices"].items():
        print(f"device    {name:<16} {dev['state']:<9} last sample {dev['last_sample'] or '-'}  "
              f"errors {dev['errors']}" + (f"  dropped {dev['dropped']}" if dev.get("dropped") else "")
              + f"  {dev['last_error'] or ''}")
        if unusable := dev.get("model_error"):
            print(f"  model   UNUSABLE, not scored: {unusable} (once it is fixed: sudo systemctl reload edge-gateway)")
        if a := dev.get("anomaly"):
            score = "-" if a["score"] is None else f"{a['score']:.4f}"
            print(f"  model   {a['model']:<14} {a['state']}  score {score} / threshold {a['threshold']:.4f}  "
                  f"windows {a['windows_scored']} scored, {a['windows_not_scored']} not"
                  + (f" ({a['why_not_scored']})" if a.get("why_not_scored") else ""))
            if a.get("note"):
                print(f"  note    {a['note']}")
        for counter, c in state.get("counters", {}).get(name, {}).items():
            print(f"  counter {counter:<14} total {c['total']}  shift {c['shift']} ({c['shift_id'] or '-'})")
        for line in _events(dev):
            print(line)
    if running is False:
        print("start it with: sudo systemctl start edge-gateway (why it stopped: journalctl -u edge-gateway)")
        return EX_UNAVAILABLE
    if age > 3 * health_interval + 5:
        print(f"note: this state is {_ago(age)} old, but it should be rewritten every "
              f"{health_interval:g}s: is the gateway stuck?" if running else
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

"""The gateway's health report, its state file and its systemd status line, from every device's health.

The report is what `{root}/health` carries and what `edge-gateway status` reads from the state
file, so an operator sees the same figures with or without a broker. It sits beside the wiring:
it reads the device runners, the outbox and the uplink, and none of them reads it.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

from gateway import datadir
from gateway.counters import MAX_TOTAL
from gateway.units import rfc3339

if TYPE_CHECKING:
    from gateway.pipeline.device import DeviceRunner
    from gateway.store.history import History
    from gateway.store.outbox import Outbox
    from gateway.uplink.mqtt import Uplink

log = logging.getLogger("edge_gateway.report")

def report(gateway_id: str, started: float, outbox: Outbox, uplink: Uplink, devices: Sequence[DeviceRunner],
           now: float | None = None, history: History | None = None) -> dict[str, Any]:
    """The health report: backlog, drops, store errors, upstream, each device, inference latency."""
    now = time.time() if now is None else now
    store, up = outbox.stats, uplink.stats
    latencies = sorted(us for r in devices if r.scoring is not None for us in r.scoring.take_latency())
    health: dict[str, Any] = {
        "ts": rfc3339(now),
        "gateway_id": gateway_id,
        "uptime_s": round(now - started, 1),
        "backlog": {"messages": store.messages, "bytes": store.bytes,
                    "oldest_age_s": round(outbox.oldest_age(), 1), "uncommitted": outbox.pending},
        "dropped": store.dropped,
        "store_errors": store.write_errors,
        "store_error": store.last_error,
        "upstream": {"connected": up.connected, "reconnects": up.reconnects, "published": up.published,
                     "acked": up.acked, "publish_rate": round(uplink.publish_rate(), 2),
                     "last_ack": rfc3339(up.last_ack) if up.last_ack else None, "last_error": up.last_error,
                     "damaged": uplink.format.damaged, "stuck": up.stuck},
        "devices": {r.name: r.health_report() for r in devices},
    }
    if history is not None:
        health["history"] = {"devices": sorted(history.bounds), "dropped": history.dropped, "error": history.failing}
    if latencies:
        health["inference_us"] = {"windows": len(latencies), "mean": round(sum(latencies) / len(latencies), 1),
                                  "p95": round(latencies[int(0.95 * (len(latencies) - 1))], 1),
                                  "max": round(latencies[-1], 1)}
    return health


def write_state(data_dir: str, health: dict[str, Any], devices: Iterable[DeviceRunner],
                seq: dict[str, int] | None = None) -> str | None:
    """The local state file read by `edge-gateway status` (no broker needed): the report plus counters, and the
    outbox's seq (`Outbox.seq_mark`), which the next start checks the outbox against. Returns why it could not be
    written (None: written)."""
    health = {**health, "counters": {r.name: {name: {"total": row.total, "shift": row.shift_total,
                                                     "shift_id": row.shift_id}
                                              for name, row in r.counting.rows.items()} for r in devices}}
    if seq is not None:
        health["seq"] = seq
    path = datadir.path(data_dir, datadir.STATE)
    text = json.dumps(health, indent=1)
    text += " " * (max(2 * len(text), STATE_RESERVE) - len(text))  # room to be rewritten in place (`_overwrite`)
    try:
        with open(path + ".tmp", "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(path + ".tmp", path)
    except OSError as err:  # a full disk must not stop the health loop
        _unlink(path + ".tmp")
        if not _overwrite(path, text.encode()):
            return f"cannot write the state file {path} ({err.strerror}): edge-gateway status shows the last one " \
                   "written"
    return None


STATE_RESERVE = 16 * 1024  # bytes the state file takes at least (JSON, padded with spaces)


def _overwrite(path: str, data: bytes) -> bool:
    """`data` over the file's own blocks, when it fits in them: a full disk has none to give a new file, and
    `status` must not show a state from before it filled. False when it does not fit (nothing written)."""
    try:
        with open(path, "r+b") as fh:
            if len(data) > os.fstat(fh.fileno()).st_size:
                return False
            fh.write(data)  # (the same padded size, or less: the blocks it had)
            fh.truncate()
        return True
    except OSError:
        return False


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def saved_seq(data_dir: str) -> dict[str, int] | None:
    """The seq mark the last state file kept (`write_state`), if it is one."""
    try:
        with open(datadir.path(data_dir, datadir.STATE), encoding="utf-8") as fh:
            mark = json.load(fh).get("seq")
    except (OSError, ValueError, AttributeError, RecursionError):
        return None
    if not isinstance(mark, dict) or not all(type(mark.get(k)) is int and 0 <= mark[k] <= MAX_TOTAL
                                             for k in ("last", "floor")):
        return None
    return {"last": mark["last"], "floor": mark["floor"]}


def status_line(devices: Sequence[DeviceRunner], outbox: Outbox, uplink: Uplink) -> str:
    """One line for systemd's STATUS=: devices ok, backlog, upstream."""
    ok = sum(1 for r in devices if r.health.state == "ok")
    up = uplink.stats
    age = f"{time.time() - up.last_ack:.0f}s ago" if up.last_ack else "never"
    unusable = sum(1 for r in devices if r.model_error is not None)
    return (f"{ok}/{len(devices)} devices ok, " + (f"{unusable} model(s) UNUSABLE, " if unusable else "")
            + f"backlog {outbox.stats.messages} msgs, upstream "
            f"{'connected' if up.connected else 'NOT connected'}, last publish {age}")

"""What the gateway keeps in its `data_dir`, named in one place.

    gateway.db       the outbox: messages not yet acknowledged, counters, shift records (SQLite)
    gateway.lock     held by the running daemon; `status` and the offline tools test it
    state.json       the last health report, for `edge-gateway status` without a broker
    history.db       raw samples of devices with `history:` (SQLite), for commissioning models
    sparkplug.json   the Sparkplug B session (bdSeq), with `upstream.format: sparkplug_b`
    pki/             the OPC UA trust store: trusted/ and rejected/ server certificates
"""

from __future__ import annotations

import os

OUTBOX = "gateway.db"
LOCK = "gateway.lock"
STATE = "state.json"
HISTORY = "history.db"
SPARKPLUG = "sparkplug.json"
PKI = "pki"


def path(data_dir: str, name: str) -> str:
    """The path of one of the files above in `data_dir`."""
    return os.path.join(data_dir, name)

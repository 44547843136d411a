"""Sparkplug B 3.0 as the uplink's format (`upstream.format: sparkplug_b`; docs/upstream.md).

`SparkplugFormat` is a `gateway.uplink.mqtt.Format`: the uplink delivers, this module only says what
goes on the wire. The outbox stays what it is: committed rows in seq order, each a device's
message with its device, kind and time (`outbox.Message`). On the way out they become metrics of
the device (`metrics.py`): telemetry, counters, the anomaly, the machine state, alarms, live OEE
and the last closed shift, each metric with the time of its value.

The session (specification 3.0, chapters 5-6):
- The Will is NDEATH with bdSeq (Int64); bdSeq is the previous CONNECT's plus one (0-255), counted
  only when a CONNECT actually went out, and kept on disk so that it survives a kill -9.
- NBIRTH (seq 0) opens the session; with a primary host, only once its STATE says online. Every
  device that has been read gets a DBIRTH with its latest values; a device not read yet is born
  with its first reading (never with nulls it could have filled).
- A row older than the current NBIRTH goes out as history (`is_historical` on every metric), never
  as live data: after a kill -9, a reconnect, a rebirth or the primary host's return. The backlog
  replays beside live data (`live_first`): live rows at once, history in seq order behind them.
- Live DDATA carries what differs from what this session's host was told (emptied at every birth).
- A device whose every tag is in error gets DDEATH, and DBIRTH again when it reads.
- `seq` runs 0-255 over every node message of a session. Commands: rebirth only; writes refused.

Durability at QoS 0: the specification sends NDATA/DDATA at QoS 0, so no PUBACK says a row
arrived. The uplink closes each batch with `marker()`, one QoS 1 message on its own topic
(`edge-gateway/{group}/{node}/delivered`, outside the Sparkplug namespace); its PUBACK means every
DDATA before it on the same connection was received, and only then are those rows deleted.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Callable, Mapping
from typing import Any

from gateway.config import Config
from gateway.logs import fields, quoted, visible
from gateway.store.outbox import Message
from gateway.tagtypes import TagType
from gateway.uplink.mqtt import Packet, Reaction
from gateway.uplink.sparkplug import metrics
from gateway.uplink.sparkplug import sparkplug_b_pb2 as pb

log = logging.getLogger("edge_gateway.uplink.sparkplug.uplink")

BIRTH_WAIT = 5.0  # seconds the births wait for every device's first reading
REBIRTH_GAP = 1.0  # seconds: births sent this recently answer a rebirth request (`_rebirth`) made before them
REBIRTH_MIN = 0.25  # seconds: and births at most this often, whatever the requests say
MAX_REFUSALS_LOGGED = 100  # kinds of refused commands and STATEs logged (each once); beyond, only counted
HEALTH_METRICS = (("Health/backlog_messages", int(pb.UInt64)), ("Health/dropped", int(pb.UInt64)),
                  ("Health/store_errors", int(pb.UInt64)), ("Health/uptime_s", int(pb.Double)))


class SparkplugFormat:
    # What is committed after the births goes out at once; the backlog from before them follows as history,
    # interleaved (the specification lets historical data follow live data): a long outage's history must
    # not hold back live data.
    live_first = True

    def __init__(self, config: Config, *, state_path: str, scored: Mapping[str, bool],
                 types_of: Callable[[str], Mapping[str, TagType]],
                 standing: Callable[[str], Mapping[str, Any]] = lambda device: {},
                 clock: Callable[[], float] = time.time) -> None:
        sp = config.upstream.sparkplug
        group = sp.group_id if sp is not None and sp.group_id else config.gateway.site
        node = sp.edge_node_id if sp is not None and sp.edge_node_id else config.gateway.id
        self.client_id = config.upstream.client_id or node
        self.online_payload = b""  # the JSON status has no place here: births and deaths say it
        self.topics = metrics.Topics(group, node)
        self.types_of = types_of
        self.standing = standing  # a device's pipeline state (`DeviceRunner.standing`), for what no row told
        self.limits = {d.name: {f"Alarms/{a.name}/Limit": a.limit for a in d.alarms} for d in config.devices}
        self.learning = {d.name for d in config.devices if d.TYPES_AT_CONNECT}  # types that may come after a birth
        self.metrics = metrics.NodeMetrics(HEALTH_METRICS, config.devices,
                                           {d.name: types_of(d.name) for d in config.devices}, scored)
        self.clock = clock
        self.state_path = state_path
        self.bdseq = self._load_bdseq()  # the bdSeq of the last CONNECT sent (None: never)
        self.host = sp.primary_host_id if sp is not None else None
        self.host_online = self.host is None
        self.seq = 0
        self.born_at: float | None = None  # time of this session's NBIRTH; rows older than it are history
        self.born: set[str] = set()  # devices with a DBIRTH in this session
        self.dead: set[str] = set()  # devices whose last reading failed as a whole
        self.last: dict[str, dict[str, tuple[Any, int]]] = {d: {} for d in self.metrics.devices}  # value, ms
        self.told: dict[str, dict[str, Any]] = {d: {} for d in self.metrics.devices}
        self.health: dict[str, tuple[Any, int]] = {}
        self.host_ts = 0  # the newest STATE timestamp seen: an older one is stale and ignored
        self.online_ts = 0  # the host's last online STATE's own timestamp
        self.untyped: dict[str, dict[str, str | None]] = {}  # devices born with tags of no datatype yet: as declared
        self._waiting_since: float | None = None  # when the births began to wait for first readings
        self._refused: set[str] = set()  # the kinds of refused messages logged
        self.refused = 0  # messages refused: commands other than a rebirth, STATEs that are not one
        self.damaged = 0  # outbox rows not sent: not what the gateway writes (`_parsed`), or of a device gone
        self.gone: set[str] = set()  # devices with rows in the outbox that the config no longer has
        self.unheld = 0  # values sent as null: their metric's datatype cannot hold them (`_unheld`)
        self._unheld_said: set[tuple[str | None, str]] = set()
        self.last_rebirth = self.last_rebirth_log = -math.inf  # monotonic times (`_rebirth`)
        self.rebirths_asked = 0

    def take_over(self, old: SparkplugFormat) -> None:
        """A reload's new session: the latest values the old one knew, for the devices and metrics this one
        still has. Its births would otherwise carry nulls where the rows are acknowledged and gone: an alarm
        active since before, an open anomaly event, a counter that has not moved since."""
        for device, known in old.last.items():
            if device in self.last:
                now, before = self.metrics.devices[device], old.metrics.devices[device]
                self.last[device] = {name: vt for name, vt in known.items()
                                     if name in now and now[name].datatype == before[name].datatype}
                if device in old.dead:
                    self.dead.add(device)
        self.health = dict(old.health)

    # -- bdSeq: 0-255, +1 per CONNECT sent, kept across restarts -----------------------------
    def _load_bdseq(self) -> int | None:
        """The bdSeq saved by the last session; None (a new one from 0) when the file is missing or damaged."""
        try:
            with open(self.state_path, encoding="utf-8") as fh:
                return int(json.load(fh)["bdSeq"]) % 256
        except (OSError, ValueError, KeyError, TypeError, ArithmeticError, RecursionError):  # 1e400, nested deep
            return None

    def _next_bdseq(self) -> int:
        return 0 if self.bdseq is None else (self.bdseq + 1) % 256

    def will(self) -> Packet:
        return Packet(self.topics.node_topic("NDEATH"), metrics.death(self._next_bdseq()), 1, False)

    def connect_answered(self) -> None:
        self.bdseq = self._next_bdseq()
        tmp = f"{self.state_path}.tmp"
        with open(tmp, "w", encoding="utf-8") as fh:  # the Will names it: it must survive a kill -9
            json.dump({"bdSeq": self.bdseq}, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.state_path)

    # -- the session's edges ---------------------------------------------------------------
    def subscriptions(self) -> list[tuple[str, int]]:
        subs = [(self.topics.node_topic("NCMD"), 1), (self.topics.device_topic("DCMD", "+"), 1)]
        if self.host is not None:
            subs.append((metrics.Topics.state(self.host), 1))
        return subs

    def session_started(self, newest: Callable[[], list[Message]]) -> list[Packet]:
        """The births, once the primary host (if any) is online and every device has been read (or is
        dead), or BIRTH_WAIT after that: a DBIRTH carries current values, not nulls it could have had."""
        if not self.host_online or self.born_at is not None:
            return []
        now = self.clock()
        if self._waiting_since is None:
            self._waiting_since = now
        for msg in newest():
            if msg.device in self.last and (parsed := self._parsed(msg)) is not None:
                _, failed = self._remember(msg, *parsed, historical=True)
                if msg.kind == "telemetry" and failed:  # its newest reading failed: born when it reads again
                    self.dead.add(msg.device)
        unread = [d for d in self.metrics.devices if not self.last[d] and d not in self.dead]
        if unread and now - self._waiting_since < BIRTH_WAIT:
            return []
        return self._births()

    @property
    def ready(self) -> bool:
        return self.host_online and self.born_at is not None

    def lost(self) -> None:
        self.host_online = self.host is None
        self.born_at = self._waiting_since = None
        self.born.clear()

    def farewell(self) -> Packet:
        """An orderly end sends NDEATH itself (the Will is only for an unannounced one)."""
        return Packet(self.topics.node_topic("NDEATH"), metrics.death(self._next_bdseq() if self.bdseq is None
                                                                       else self.bdseq, _ms(self.clock())), 1)

    def marker(self, last_seq: int) -> Packet:
        return Packet(f"edge-gateway/{self.topics.group}/{self.topics.node}/delivered", str(last_seq).encode(), 1)

    def probe(self, last_seq: int) -> Packet:
        return self.marker(last_seq)

    def _births(self) -> list[Packet]:
        """NBIRTH (seq 0) and, right after it, a DBIRTH for every device not dead, each metric with its latest
        value (tck-id-payloads-dbirth-order)."""
        now = self.clock()
        self.born_at, self.seq = now, 0
        self.born.clear()
        self.told = {d: {} for d in self.metrics.devices}
        node, at = self.metrics.node, _ms(now)
        values = [(node[metrics.BDSEQ], self.bdseq, at), (node[metrics.REBIRTH], False, at),
                  *((node[name], *self.health.get(name, (None, at))) for name, _ in HEALTH_METRICS)]
        packets = [Packet(self.topics.node_topic("NBIRTH"), metrics.payload(at, 0, values, birth=True))]
        packets += [self._dbirth(device) for device in self.metrics.devices if device not in self.dead]
        return packets

    def _dbirth(self, device: str, unread: bool = False) -> Packet:
        """A device's birth: every metric with its latest value and that value's time (null: never had one; every tag
        when `unread`: the device cannot be read now)."""
        types = self.types_of(device)
        self.metrics.retype(device, types)
        if device in self.learning and any(not kind.datatype for kind in types.values()):  # Double until it says
            self.untyped[device] = _datatypes(types)
        else:
            self.untyped.pop(device, None)
        self.born.add(device)
        known, told = self.last[device], self.told[device]
        at = _ms(self.clock())
        limits, standing = self.limits[device], _standing(self.standing(device), at)
        values = []
        for name, m in self.metrics.devices[device].items():
            known_as: tuple[Any, int] = (None, at)
            if unread and name in types:
                pass
            elif name in limits:  # the rule's now, not what a row said before a reload changed it
                known_as = (limits[name], at)
            elif name in known:
                known_as = known[name]
            elif name in standing and metrics.fits(m.datatype, standing[name][0]):
                known_as = standing[name]
            value, ts = known_as
            values.append((m, value, ts))
            told[name] = value
        return Packet(self.topics.device_topic("DBIRTH", device), metrics.payload(at, self._next_seq(), values, birth=True))

    def _next_seq(self) -> int:
        self.seq = (self.seq + 1) % 256
        return self.seq

    # -- data ------------------------------------------------------------------------------------
    def data(self, msg: Message) -> list[Packet]:
        """One stored row as Sparkplug messages (none for what has no metric)."""
        device = msg.device
        if device is not None and device not in self.metrics.devices:
            self._unconfigured(msg, device)
            return []
        if device is None or device not in self.metrics.devices or self.born_at is None:
            return []
        if (parsed := self._parsed(msg)) is None:
            return []
        known = self.metrics.devices[device]
        # A payload's timestamp is when it is published (tck-id-payloads-ddata-timestamp, -ddeath-timestamp); each
        # metric's, the time of its value
        ts, now = _ms(msg.created), _ms(self.clock())
        historical = msg.created < self.born_at  # older than this session's birth: history, whatever it says
        values, failed = self._remember(msg, *parsed, historical=historical)
        packets = []
        if device not in self.born:  # dead: born again by a good reading (a live one carries its values)
            if failed:
                return []
            if msg.kind != "telemetry":
                return self._while_dead(device, values, ts, historical)
            self.dead.discard(device)
            packets.append(self._dbirth(device))
            if not historical:
                return packets
        if historical:
            if values:
                packets.append(Packet(self.topics.device_topic("DDATA", device), metrics.payload(
                    now, self._next_seq(), [(known[n], v, ts) for n, v in values.items()], historical=True)))
            return packets
        if failed:  # the device cannot be read: dead until it reads again
            self.born.discard(device)
            return [Packet(self.topics.device_topic("DDEATH", device), metrics.payload(now, self._next_seq(), []))]
        if device in self.untyped and _datatypes(self.types_of(device)) != self.untyped[device]:
            # born before its source knew its tags' types (an OPC UA server slower than the births): born again
            # with them, so that no value goes out under the Double it was declared (a UInt64 rounded, a Boolean 1.0)
            packets.append(self._dbirth(device))
            return packets
        told = self.told[device]
        changed = [(known[n], v, ts) for n, v in values.items() if n not in told or told[n] != v]
        told.update(values)
        if not changed:
            return []
        return [Packet(self.topics.device_topic("DDATA", device), metrics.payload(now, self._next_seq(), changed))]

    def _while_dead(self, device: str, values: dict[str, Any], ts: int, historical: bool) -> list[Packet]:
        """A row of a dead device that is not a reading: the gateway's own figures (a shift closed while the PLC was
        off, its OEE, a state, a count). A DDATA cannot follow a DDEATH, and a row is deleted once handed over: the
        device is born for it, with its tags null (it cannot be read) and these figures, and dies again. A row that
        tells nothing new sends nothing."""
        told = self.told[device]
        if all(name in told and told[name] == v for name, v in values.items()):
            return []
        packets = [self._dbirth(device, unread=True)]
        if historical and values:  # (the birth carries the newest values; this row's are older)
            known = self.metrics.devices[device]
            packets.append(Packet(self.topics.device_topic("DDATA", device), metrics.payload(
                _ms(self.clock()), self._next_seq(), [(known[n], v, ts) for n, v in values.items()], historical=True)))
        self.born.discard(device)
        packets.append(Packet(self.topics.device_topic("DDEATH", device),
                              metrics.payload(_ms(self.clock()), self._next_seq(), [])))
        return packets

    def _unconfigured(self, msg: Message, device: str) -> None:
        """A row of a device the config no longer has (taken out by a reload while its rows waited): Sparkplug has
        no birth to send it under. Said once per device, counted with the rows that cannot be sent (`damaged`)."""
        if device not in self.gone:
            self.gone.add(device)
            log.warning("device %s is no longer in the config: its rows still in the outbox (from seq %d) cannot be "
                        "sent as Sparkplug without its birth, and are counted in health's upstream.damaged", device,
                        msg.seq, extra=fields(device, "outbox_drop", seq=msg.seq))
        self.damaged += 1

    def _parsed(self, msg: Message) -> tuple[dict[str, Any], bool] | None:
        """The metrics a row sets, and whether it is a reading that failed as a whole; None for a row the gateway
        never writes (its outbox file damaged or edited by hand: not JSON, not the contract's shape, a value its
        metric's datatype cannot carry), which would otherwise fail this row's packets or the next birth, at every
        start. Such a row is sent as nothing: said once, then counted (`damaged`)."""
        assert msg.device is not None
        known = self.metrics.devices[msg.device]
        try:
            body = msg.body
            values = {name: v for name, v in _values(msg.kind, body, _ms(msg.created)).items() if name in known}
            failed = msg.kind == "telemetry" and bool(body.get("quality")) and all(
                tag in body["quality"] for tag in body["values"])
            if all(metrics.fits(known[name].datatype, v) for name, v in values.items()):
                for name in [n for n, v in values.items() if not metrics.holds(known[n].datatype, v)]:
                    self._unheld(msg, name, values[name])
                    values[name] = None
                return values, bool(failed)
        except (ValueError, TypeError, KeyError, AttributeError, RecursionError):
            pass
        if not self.damaged:
            log.error("outbox message %d (%s) is not what the gateway writes (its file damaged or edited by hand): "
                      "not sent as Sparkplug; any more are counted (health: upstream.damaged)", msg.seq, msg.topic,
                      extra=fields(msg.device, "outbox_drop", seq=msg.seq))
        self.damaged += 1
        return None

    def _unheld(self, msg: Message, name: str, value: Any) -> None:
        """A value its metric's datatype cannot hold (a row written before a reload made its register narrower, an
        integer beyond UInt64): sent as null, never wrapped into another number. Said once per metric, counted."""
        self.unheld += 1
        if (msg.device, name) not in self._unheld_said and len(self._unheld_said) < MAX_REFUSALS_LOGGED:
            self._unheld_said.add((msg.device, name))
            datatype = pb.DataType.Name(self.metrics.devices[str(msg.device)][name].datatype)
            log.warning("device %s: %s = %s (outbox message %d) does not fit its metric's datatype, %s: sent as null",
                        msg.device, name, value, msg.seq, datatype, extra=fields(msg.device, "sparkplug_unfit"))

    def _remember(self, msg: Message, values: dict[str, Any], failed: bool, historical: bool
                  ) -> tuple[dict[str, Any], bool]:
        """The row's metrics (`_parsed`): the device's latest values (for births) and whether it is dead follow the
        row unless something newer is known."""
        assert msg.device is not None
        ts = _ms(msg.created)
        last = self.last[msg.device]
        if msg.kind == "telemetry" and not historical:
            (self.dead.add if failed else self.dead.discard)(msg.device)
        if not failed:
            for name, v in values.items():
                if not historical or name not in last or last[name][1] <= ts:
                    last[name] = (v, ts)
        return values, failed

    def live(self, topic: str, payload: bytes, retain: bool, body: Mapping[str, Any] | None) -> list[Packet]:
        """Health becomes NDATA of the node's health metrics; the JSON status has no place here."""
        if getattr(topic, "kind", None) != "health" or body is None or self.born_at is None:
            return []
        at = _ms(self.clock())
        report = {"Health/backlog_messages": body["backlog"]["messages"], "Health/dropped": body["dropped"],
                  "Health/store_errors": body["store_errors"], "Health/uptime_s": body["uptime_s"]}
        self.health = {name: (v, at) for name, v in report.items()}
        node = self.metrics.node
        return [Packet(self.topics.node_topic("NDATA"), metrics.payload(
            at, self._next_seq(), [(node[name], v, at) for name, v in report.items()]))]

    # -- what the host says: its STATE, and commands (rebirth only; the gateway stays read-only) --------
    def received(self, topic: str, payload: bytes) -> Reaction:
        if self.host is not None and topic == metrics.Topics.state(self.host):
            return self._host_state(payload)
        try:
            command = pb.Payload.FromString(payload)
        except Exception:  # protobuf raises DecodeError (and others) on bytes that are not a payload
            self._refuse(topic, "not a Sparkplug B payload")
            return Reaction()
        reaction = Reaction()
        rebirth = False
        for m in command.metrics:
            if m.name == metrics.REBIRTH and m.WhichOneof("value") == "boolean_value" and m.boolean_value \
                    and topic == self.topics.node_topic("NCMD"):
                rebirth = self.host_online  # (born when the primary host is back); once per command, however many
            elif m.name == metrics.REBIRTH:
                self._refuse(topic, "a Rebirth that is not Boolean true on NCMD")
            else:
                self._refuse(topic, f"a write to {quoted(m.name, 80) if m.name else f'alias {m.alias}'}")
        if rebirth:
            reaction.packets = self._rebirth(topic, command.timestamp if command.HasField("timestamp") else None)
        return reaction

    def _rebirth(self, topic: str, stamp: int | None = None) -> list[Packet]:
        """NBIRTH and every DBIRTH, unless births went out less than REBIRTH_GAP ago: those answer any request
        made before them, and a host (or anyone) asking hundreds of times a second must not multiply the node's
        traffic. A request stamped after those births (a host that saw a gap in what followed them) is answered,
        at most every REBIRTH_MIN. Said at most once a minute, with how many were asked for."""
        now = time.monotonic()
        self.rebirths_asked += 1
        if now - self.last_rebirth_log >= 60.0:
            log.info("rebirth requested on %s: sending NBIRTH and every DBIRTH (%d request(s) since the last such "
                     "line; births at most every %gs)", topic, self.rebirths_asked, REBIRTH_GAP,
                     extra=fields(event="sparkplug_rebirth"))
            self.last_rebirth_log, self.rebirths_asked = now, 0
        if now - self.last_rebirth < REBIRTH_GAP:
            later = stamp is not None and self.born_at is not None and stamp > _ms(self.born_at)
            if not later or now - self.last_rebirth < REBIRTH_MIN:
                return []
        self.last_rebirth = now
        return self._births()

    def _host_state(self, data: bytes) -> Reaction:
        """The primary host's STATE ({"online": true|false, "timestamp": ms}): births and data only while online.

        Anything else (not JSON, `online` not a boolean, `timestamp` not a whole number of ms) is refused
        and changes nothing: a bad STATE neither ends the session nor hides the host's next good one."""
        topic = metrics.Topics.state(self.host or "")
        try:
            state = json.loads(data)
        except (ValueError, RecursionError):  # RecursionError: JSON nested thousands deep
            state = None
        online, stamp = state.get("online") if isinstance(state, dict) else None, \
            state.get("timestamp", 0) if isinstance(state, dict) else None
        if not isinstance(online, bool) or isinstance(stamp, bool) or not isinstance(stamp, int) \
                or not 0 <= stamp < 2**63:
            self._refuse(topic, 'a STATE that is not {"online": true|false, "timestamp": ms} JSON', command=False)
            return Reaction()
        if stamp < self.host_ts:  # tck-id-message-flow-edge-node-birth-publish-phid-wait-timestamp
            self._refuse(topic, "a STATE older than the last one (a stale retained message)", command=False)
            return Reaction()
        if not online and stamp < self.online_ts:  # tck-id-operational-behavior-edge-node-termination-host-offline-
            # timestamp: an offline older than the host's last online is its previous session's, arriving late
            self._refuse(topic, "an offline STATE older than the host's last online (its previous session's)",
                         command=False)
            return Reaction()
        if online:
            self.online_ts = stamp  # as the host stamped it: its offline is compared with its own clock
        # Kept no later than this box's clock: a host whose clock ran ahead, then was set right, would otherwise have
        # every later STATE taken as stale, and the node wait for an online that never counts.
        self.host_ts = min(stamp, int(self.clock() * 1000))
        if online == self.host_online:
            return Reaction()
        self.host_online = online
        if not online:  # tck-id-operational-behavior-edge-node-termination-host-offline: NDEATH, disconnect
            log.warning("primary host %s is offline: ending the session, storing until it is back", self.host,
                        extra=fields(event="sparkplug_host_offline"))
            farewell = self.farewell() if self.born_at is not None else None
            return Reaction([farewell] if farewell else [], reconnect=True)
        log.info("primary host %s is online: birth, then the stored messages, those older than it as history",
                 self.host, extra=fields(event="sparkplug_host_online"))
        return Reaction(resend=True)  # the uplink asks for the births, then sends from the oldest row

    def _refuse(self, topic: str, what: str, command: bool = True) -> None:
        """Count a refused message; log each kind once (at most MAX_REFUSALS_LOGGED kinds: names are the
        sender's, and a sender of endless new names must not fill the log or the memory)."""
        self.refused += 1
        topic = visible(topic if len(topic) <= 200 else f"{topic[:180]}…")  # a DCMD's device part is the sender's
        key = f"{topic}: {what}"
        if key in self._refused or len(self._refused) > MAX_REFUSALS_LOGGED:
            return
        self._refused.add(key)
        why = "the gateway is read-only towards its devices" if command else "ignored"
        if len(self._refused) > MAX_REFUSALS_LOGGED:
            log.warning("refused %s on %s: %s; more kinds of refused messages are counted, not logged", what,
                        topic, why, extra=fields(event="sparkplug_refused", refused=self.refused))
        else:
            log.warning("refused %s on %s: %s", what, topic, why, extra=fields(event="sparkplug_refused",
                                                                            refused=self.refused))


def _datatypes(types: Mapping[str, TagType]) -> dict[str, str | None]:
    return {tag: kind.datatype for tag, kind in types.items()}


def _values(kind: str, body: Mapping[str, Any], ts_ms: int) -> dict[str, Any]:
    """The device metrics a stored message sets (names as `metrics.device_metrics` declares them)."""
    values: dict[str, Any] = {}
    if kind == "telemetry":
        values.update(body["values"])
        if "score" in body:
            values["Anomaly/Score"] = body["score"]
    elif kind == "counters":
        for name, c in body["counters"].items():
            values[f"counters/{name}/total"], values[f"counters/{name}/shift"] = c["total"], c["shift"]
    elif kind == "anomaly":
        values["Anomaly/Active"], values["Anomaly/Score"] = body["event"] == "start", body["score"]
    elif kind == "state":
        reason = body.get("reason") or {}
        values.update({"State": body["state"], "State/Reason Code": reason.get("code"),
                       "State/Reason": reason.get("text")})
    elif kind == "alarm":
        prefix = f"Alarms/{body['name']}"
        values.update({f"{prefix}/Active": body["event"] == "start", f"{prefix}/Value": body["value"],
                       f"{prefix}/Limit": body["limit"]})
    elif kind == "oee":
        values.update({"OEE/Availability": body.get("availability"), "OEE/Performance": body.get("performance"),
                       "OEE/Quality": body.get("quality_rate"), "OEE/OEE": body.get("oee")})
    elif kind == "shift":
        values.update({"Shift/Last/ID": body["shift_id"], "Shift/Last/Name": body["shift"],
                       "Shift/Last/Start": ts_ms - round(body["length_s"] * 1000), "Shift/Last/End": ts_ms,
                       "Shift/Last/Partial": body["partial"], "Shift/Last/Total": body.get("total"),
                       "Shift/Last/Good": body.get("good"), "Shift/Last/Defect": body.get("defect"),
                       "Shift/Last/Quality": body.get("quality_rate"),
                       "Shift/Last/Availability": body.get("availability"),
                       "Shift/Last/Performance": body.get("performance"), "Shift/Last/OEE": body.get("oee"),
                       "Shift/Last/Anomaly Minutes": body.get("anomaly_minutes")})
    return values


def _standing(standing: Mapping[str, Any], at: int) -> dict[str, tuple[Any, int]]:
    """The metrics a device's pipeline state (`DeviceRunner.standing`) sets, each with the time it holds since (a
    state that holds since an unknown time: the birth's). A birth takes them where no row told a value: an
    alarm that never started is not active, an anomaly event saved open is still open."""
    values: dict[str, tuple[Any, int]] = {}

    def since(ts: float | None) -> int:
        return _ms(ts) if ts is not None else at

    if (anomaly := standing.get("anomaly")) is not None:
        values["Anomaly/Active"] = (anomaly["active"], since(anomaly["since"]))
    for name, alarm in standing.get("alarms", {}).items():
        values[f"Alarms/{name}/Active"] = (alarm["active"], since(alarm["since"]))
    if (machine := standing.get("machine")) is not None:
        values["State"] = (machine["state"], since(machine["since"]))
    return values


def _ms(ts: float) -> int:
    return round(ts * 1000)

"""The uplink as a Sparkplug B edge node (`upstream.format: sparkplug_b`; docs/upstream.md).

The outbox stays what it is: committed rows in seq order, each a device's JSON message. On the
way out they become Sparkplug: a device's telemetry, counters and anomaly state are DDATA of its
metrics (aliases only, the sample's own timestamp); a device whose every tag is in error gets
DDEATH, and DBIRTH again when it reads. `seq` runs 0-255 over all node messages of a session.

Durability at QoS 0: the specification sends NDATA/DDATA at QoS 0, so no PUBACK says a row
arrived. After each batch of DDATA the uplink publishes one QoS 1 message on its own topic
(`edge-gateway/{group}/{node}/delivered`, outside the Sparkplug namespace); the broker handles
the packets of one connection in order, so its PUBACK for that message means every DDATA before
it on the same TCP connection was received, and only then are those rows deleted. A connection
lost before that PUBACK sends the batch again: duplicates only within one batch (`max_inflight`).
What the broker does with the DDATA after receiving it (a host that is not subscribed at QoS 0
gets nothing) is beyond any edge node, as for every Sparkplug client.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Mapping
from datetime import datetime
from typing import Any

import paho.mqtt.client as mqtt

from gateway.config import Config
from gateway.logs import fields
from gateway.outbox import Message, Outbox
from gateway.sparkplug import metrics
from gateway.sparkplug import sparkplug_b_pb2 as pb
from gateway.tagtypes import TagType
from gateway.uplink import Uplink

log = logging.getLogger("edge_gateway.sparkplug")

HEALTH_METRICS = (("Health/backlog_messages", int(pb.UInt64)), ("Health/dropped", int(pb.UInt64)),
                  ("Health/store_errors", int(pb.UInt64)), ("Health/uptime_s", int(pb.Double)))


class SparkplugUplink(Uplink):
    def __init__(self, config: Config, store: Outbox, *, state_path: str, scored: dict[str, bool],
                 types: Mapping[str, Mapping[str, TagType]]) -> None:
        sp = config.upstream.sparkplug
        group = sp.group_id if sp is not None and sp.group_id else config.gateway.site
        node = sp.edge_node_id if sp is not None and sp.edge_node_id else config.gateway.id
        super().__init__(config.upstream, store, client_id=config.upstream.client_id or node,
                         status_topic="", offline_payload=b"")
        self.topics = metrics.Topics(group, node)
        self.root = config.topic_root
        self.metrics = metrics.NodeMetrics(HEALTH_METRICS, config.devices, types, scored)
        self.state_path = state_path
        self.bdseq = self._load_bdseq()
        self.seq = 0
        self.dead: set[str] = set()  # devices announced dead (DDEATH) in this session
        self.last: dict[str, dict[str, Any]] = {d: {} for d in self.metrics.devices}  # for births
        # What this session's host has been told, per device: DDATA carries what differs from it. Emptied
        # at every birth, so that rows sent again after a reconnect go out whole, never "unchanged".
        self.told: dict[str, dict[str, Any]] = {d: {} for d in self.metrics.devices}
        self._batches: dict[int, list[tuple[int, int]]] = {}
        self._refused: set[str] = set()
        self.host = sp.primary_host_id if sp is not None else None
        self.host_online = self.host is None  # with a primary host: nothing but births until it says online
        self.live_since = 0.0  # rows created before the birth that follows the host's return are historical

    # -- bdSeq: 0-255, one per connect, kept across restarts --------------------------------
    def _load_bdseq(self) -> int:
        try:
            with open(self.state_path, encoding="utf-8") as fh:
                return int(json.load(fh)["bdSeq"]) % 256
        except (OSError, ValueError, KeyError, TypeError):
            return 0

    def _save_bdseq(self, value: int) -> None:
        tmp = f"{self.state_path}.tmp"
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump({"bdSeq": value}, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.state_path)

    # -- the session's edges ---------------------------------------------------------------
    def _will(self, client: mqtt.Client) -> None:
        self.bdseq = (self.bdseq + 1) % 256
        self._save_bdseq(self.bdseq)  # the Will of this connection names it: it must survive a kill -9
        client.will_set(self.topics.node_topic("NDEATH"), metrics.death(self.bdseq), qos=1, retain=False)

    def _session_started(self, client: mqtt.Client) -> None:
        client.subscribe([(self.topics.node_topic("NCMD"), 1), (self.topics.device_topic("DCMD", "+"), 1)])
        if self.host is not None:
            self.host_online = False  # until its STATE (retained) says otherwise on this connection
            client.message_callback_add(metrics.Topics.state(self.host), self._host_state)
            client.subscribe(metrics.Topics.state(self.host), qos=1)
        # One filter for NCMD and DCMD/+ alike ('#' matches the parent level): each command handled once.
        client.message_callback_add(f"{metrics.NAMESPACE}/{self.topics.group}/+/{self.topics.node}/#", self._command)
        self._births(client)

    def _host_state(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._handle_host_state, client, bytes(message.payload))

    def _handle_host_state(self, client: mqtt.Client, data: bytes) -> None:
        """The primary host's STATE ({"online": true|false, "timestamp": ms}): data flows only while online."""
        if client is not self._client:
            return
        try:
            online = json.loads(data).get("online") is True
        except (ValueError, AttributeError):
            self._refuse(metrics.Topics.state(self.host or ""), "a STATE that is not {\"online\": ..., ...} JSON")
            return
        if online == self.host_online:
            return
        self.host_online = online
        if online:  # born again, then the backlog as history, then live
            log.info("primary host %s is online: birth, then %d stored messages as history", self.host,
                     self.store.stats.messages, extra=fields(event="sparkplug_host_online"))
            self._births(client)
            self.live_since = time.time()
            self._forget_inflight()
            self._cursor = 0
            self._wake.set()
        else:
            log.warning("primary host %s is offline: storing until it is back", self.host,
                        extra=fields(event="sparkplug_host_offline"))

    def _births(self, client: mqtt.Client) -> None:
        """NBIRTH (seq 0) and one DBIRTH per device that is not dead, every metric with its current value."""
        now = _ms(time.time())
        self.seq = 0
        self.told = {d: {} for d in self.metrics.devices}
        node = self.metrics.node
        values = [(node[metrics.BDSEQ], self.bdseq), (node[metrics.REBIRTH], False),
                  *((node[name], None) for name, _ in HEALTH_METRICS)]
        client.publish(self.topics.node_topic("NBIRTH"), metrics.payload(now, 0, values, birth=True), qos=0)
        for device in self.metrics.devices:
            if device not in self.dead:
                client.publish(*self._dbirth(device, now), qos=0)

    def _dbirth(self, device: str, ts_ms: int) -> tuple[str, bytes]:
        """A device's birth: every metric, with the last value the uplink has seen (null before any)."""
        known = self.last[device]
        values = [(m, known.get(name)) for name, m in self.metrics.devices[device].items()]
        return self.topics.device_topic("DBIRTH", device), metrics.payload(ts_ms, self._next_seq(), values, birth=True)

    def _next_seq(self) -> int:
        self.seq = (self.seq + 1) % 256
        return self.seq

    def _farewell(self, client: mqtt.Client) -> mqtt.MQTTMessageInfo:
        """An orderly end sends NDEATH itself (the Will is only for an unannounced one)."""
        return client.publish(self.topics.node_topic("NDEATH"), metrics.death(self.bdseq), qos=1)

    def publish_live(self, topic: str, payload: bytes, retain: bool = False) -> bool:
        """Health becomes NDATA of the node's health metrics; the JSON status has no place here (the
        node's birth and death say it)."""
        client = self._client
        if not topic.endswith("/health") or client is None or not self.connected or not self.host_online:
            return False  # with a primary host that is not online: nothing but births
        report = json.loads(payload)
        node = self.metrics.node
        values = [(node["Health/backlog_messages"], report["backlog"]["messages"]), (node["Health/dropped"], report["dropped"]),
                  (node["Health/store_errors"], report["store_errors"]), (node["Health/uptime_s"], report["uptime_s"])]
        client.publish(self.topics.node_topic("NDATA"), metrics.payload(_ms(time.time()), self._next_seq(), values),
                       qos=0)
        return True

    # -- commands: rebirth only; the gateway stays read-only ---------------------------------
    def _command(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        """On paho's thread: handed to the loop's thread."""
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._handle_command, client, message.topic, bytes(message.payload))

    def _handle_command(self, client: mqtt.Client, topic: str, data: bytes) -> None:
        if client is not self._client:
            return
        try:
            command = pb.Payload.FromString(data)
        except Exception:  # protobuf raises DecodeError (and others) on bytes that are not a payload
            self._refuse(topic, "not a Sparkplug B payload")
            return
        for m in command.metrics:
            if m.name == metrics.REBIRTH and m.boolean_value:
                log.info("rebirth requested on %s: sending NBIRTH and every DBIRTH", topic,
                         extra=fields(event="sparkplug_rebirth"))
                self._births(client)
            else:
                self._refuse(topic, f"a write to {m.name or f'alias {m.alias}'}")

    def _refuse(self, topic: str, what: str) -> None:
        key = f"{topic}: {what}"
        if key not in self._refused:
            self._refused.add(key)
            log.warning("refused %s on %s: the gateway is read-only towards its devices", what, topic,
                        extra=fields(event="sparkplug_refused"))

    # -- data ------------------------------------------------------------------------------------
    def _send(self, client: mqtt.Client, batch: list[Message]) -> None:
        if not self.host_online:
            return  # the rows stay in the outbox until the primary host is back
        sent: list[tuple[int, int]] = []
        for msg in batch:
            for topic, payload in self._translate(client, msg, historical=msg.created < self.live_since):
                client.publish(topic, payload, qos=0)
            sent.append((msg.seq, msg.size))
            self.store.hold(msg.seq)
            self._cursor = msg.seq
            self.stats.published += 1
        if sent:  # its PUBACK means the broker has every packet sent before it on this connection
            info = client.publish(f"edge-gateway/{self.topics.group}/{self.topics.node}/delivered",
                                  str(sent[-1][0]).encode(), qos=1)
            if info.rc == mqtt.MQTT_ERR_SUCCESS:
                self._batches[info.mid] = sent
                self._inflight[info.mid] = (sent[-1][0], 0)

    def _on_publish(self, client: mqtt.Client, mid: int, reason: Any, properties: Any) -> None:
        batch = self._batches.pop(mid, None) if client is self._client else None
        if batch is None:
            super()._on_publish(client, mid, reason, properties)
            return
        self._inflight.pop(mid, None)
        for seq, size in batch:
            self.store.ack(seq, size)
            self.stats.acked += 1
            self._acks.append(time.monotonic())
        self.stats.last_ack = time.time()
        self._wake.set()

    def _forget_inflight(self) -> None:
        self._batches.clear()
        super()._forget_inflight()

    def _translate(self, client: mqtt.Client, msg: Message, historical: bool = False) -> list[tuple[str, bytes]]:
        """One outbox row as Sparkplug messages (none for what has no metric)."""
        parts = msg.topic[len(self.root) + 1:].split("/") if msg.topic.startswith(self.root + "/") else []
        if len(parts) != 2 or parts[0] not in self.metrics.devices:
            return []
        device, kind = parts
        doc = json.loads(msg.payload)
        known = self.metrics.devices[device]
        ts = _ms(_time(doc["ts"]))
        values: dict[str, Any] = {}
        if kind == "telemetry":
            bad = doc.get("quality", {})
            if bad and all(tag in bad for tag in doc["values"]):  # the device cannot be read
                if device in self.dead:
                    return []
                self.dead.add(device)
                return [(self.topics.device_topic("DDEATH", device), metrics.payload(ts, self._next_seq(), []))]
            values = dict(doc["values"])
            if "score" in doc:
                values["anomaly/score"] = doc["score"]
        elif kind == "counters":
            for name, c in doc["counters"].items():
                values[f"counters/{name}/total"], values[f"counters/{name}/shift"] = c["total"], c["shift"]
        elif kind == "anomaly":
            values["anomaly/active"] = doc["event"] == "start"
        told = self.told[device]
        changed = [(known[name], v) for name, v in values.items() if name in known and (name not in told or told[name] != v)]
        self.last[device].update(values)
        told.update(values)
        if device in self.dead:  # a good reading: born again, with these values; nothing else while dead
            if kind != "telemetry":
                return []
            self.dead.discard(device)
            return [self._dbirth(device, ts)]
        if not changed:
            return []
        return [(self.topics.device_topic("DDATA", device),
                 metrics.payload(ts, self._next_seq(), changed, historical=historical))]


def _time(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def _ms(ts: float) -> int:
    return round(ts * 1000)

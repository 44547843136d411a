"""The metrics of a Sparkplug edge node and its devices: names, aliases, datatypes, and the payloads.

Every metric has an alias, unique across the node (the node's own metrics first, then each device's
in config order), so that NDATA/DDATA carry aliases only. A device's metrics are its tags (typed by
the one rule, `tagtypes.py`, that also shapes the JSON: Boolean for a bit or coil, the register's
integer type when unscaled, an OPC UA node's DataType, else Double),
each counter's lifetime and shift totals (UInt64), and, with a model, the anomaly score (Double) and
whether an anomaly event is active (Boolean).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from gateway.sparkplug import sparkplug_b_pb2 as pb
from gateway.tagtypes import TagType

NAMESPACE = "spBv1.0"
REBIRTH = "Node Control/Rebirth"
BDSEQ = "bdSeq"


@dataclass(frozen=True)
class Metric:
    name: str
    alias: int
    datatype: int


class Topics:
    """`spBv1.0/{group}/{type}/{node}[/{device}]` and the primary host's STATE topic."""

    def __init__(self, group: str, node: str) -> None:
        self.group, self.node = group, node

    def node_topic(self, kind: str) -> str:  # NBIRTH, NDEATH, NDATA, NCMD
        return f"{NAMESPACE}/{self.group}/{kind}/{self.node}"

    def device_topic(self, kind: str, device: str) -> str:  # DBIRTH, DDEATH, DDATA, DCMD
        return f"{NAMESPACE}/{self.group}/{kind}/{self.node}/{device}"

    @staticmethod
    def state(host: str) -> str:
        return f"{NAMESPACE}/STATE/{host}"


def datatype_of(kind: TagType | None) -> int:
    """The Sparkplug datatype of a tag's type; Double for a number nothing types."""
    return int(pb.DataType.Value(kind.datatype)) if kind is not None and kind.datatype else int(pb.Double)


class NodeMetrics:
    """The aliases of a node and its devices, fixed for the life of a config."""

    def __init__(self, node_metrics: Iterable[tuple[str, int]], devices: Iterable[Any],
                 types: Mapping[str, Mapping[str, TagType]], scored: Mapping[str, bool] | None = None) -> None:
        alias = 0
        self.node: dict[str, Metric] = {}
        for name, datatype in [(BDSEQ, int(pb.UInt64)), (REBIRTH, int(pb.Boolean)), *node_metrics]:
            alias += 1
            self.node[name] = Metric(name, alias, datatype)
        self.devices: dict[str, dict[str, Metric]] = {}
        for device in devices:
            metrics: dict[str, Metric] = {}
            names = [(tag, datatype_of(types.get(device.name, {}).get(tag))) for tag in device.tags]
            for counter in device.counters:
                names += [(f"counters/{counter.name}/total", int(pb.UInt64)),
                          (f"counters/{counter.name}/shift", int(pb.UInt64))]
            if (scored or {}).get(device.name):
                names += [("anomaly/score", int(pb.Double)), ("anomaly/active", int(pb.Boolean))]
            for name, datatype in names:
                alias += 1
                metrics[name] = Metric(name, alias, datatype)
            self.devices[device.name] = metrics


def _set(metric: Any, datatype: int, value: Any) -> None:
    """A metric's value in the field its datatype uses, or `is_null` for no value."""
    if value is None:
        metric.is_null = True
    elif datatype == pb.Boolean:
        metric.boolean_value = bool(value)
    elif datatype in (pb.Int8, pb.Int16, pb.Int32, pb.UInt8, pb.UInt16, pb.UInt32):
        metric.int_value = int(value) & 0xFFFFFFFF  # the specification sends signed ints two's complement
    elif datatype in (pb.Int64, pb.UInt64, pb.DateTime):
        metric.long_value = int(value) & 0xFFFFFFFFFFFFFFFF
    elif datatype == pb.Float:
        metric.float_value = float(value)
    elif datatype == pb.String:
        metric.string_value = str(value)
    else:
        metric.double_value = float(value)


def payload(ts_ms: int, seq: int | None, values: Iterable[tuple[Metric, Any]], *, birth: bool = False,
            historical: bool = False) -> bytes:
    """A Sparkplug B payload: in a birth every metric with its name, alias and datatype; else aliases only."""
    out = pb.Payload()
    out.timestamp = ts_ms
    if seq is not None:
        out.seq = seq
    for metric, value in values:
        m = out.metrics.add()
        if birth:
            m.name = metric.name
            m.datatype = metric.datatype
        m.alias = metric.alias
        if birth or historical:  # in live data the payload's timestamp is every metric's
            m.timestamp = ts_ms
        if historical:
            m.is_historical = True
        _set(m, metric.datatype, value)
    return bytes(out.SerializeToString())


def death(bdseq: int) -> bytes:
    """NDEATH: only the bdSeq of the session it ends (the Will, registered before connecting)."""
    out = pb.Payload()
    m = out.metrics.add()
    m.name, m.datatype, m.long_value = BDSEQ, pb.UInt64, bdseq
    return bytes(out.SerializeToString())

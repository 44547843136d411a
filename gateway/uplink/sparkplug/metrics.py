"""The metrics of a Sparkplug edge node and its devices: names, aliases, datatypes, and the payloads.

Every metric but `Node Control/Rebirth` has an alias, unique across the node (the node's own
metrics first, then each device's in config order), so that NDATA/DDATA carry aliases only; the
rebirth command is addressed by name (tck-id-operational-behavior-data-commands-rebirth-name-aliases).

A device's metrics (docs/upstream.md):
- its tags, typed by the one rule (`tagtypes.py`) that also shapes the JSON: Boolean for a bit or
  coil, the register's integer type when unscaled, an OPC UA node's DataType, else Double;
- `counters/<name>/total` and `counters/<name>/shift` (UInt64);
- with a model, `Anomaly/Active` (Boolean) and `Anomaly/Score` (Double);
- with `oee:`, `State` (String), `State/Reason Code` (Int32) and `State/Reason` (String), and the
  live `OEE/Availability`, `OEE/Performance`, `OEE/Quality`, `OEE/OEE` (Double);
- per alarm rule, `Alarms/<name>/Active` (Boolean), `Alarms/<name>/Value` and `.../Limit` (Double);
- the last closed shift as plain metrics under `Shift/Last/` (a historian stores them as it
  stores any metric; a DataSet would need a host that reads DataSets).

Every metric of NBIRTH, DBIRTH, NDATA and DDATA carries its own timestamp, the time of its value
(tck-id-payloads-name-birth-data-requirement). UInt32 goes in `long_value`, where Eclipse Tahu's
decoders (and Ignition) read it; signed integers up to 32 bits go in `int_value` as two's complement.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from gateway.tagtypes import RANGES, TagType
from gateway.uplink.sparkplug import sparkplug_b_pb2 as pb

NAMESPACE = "spBv1.0"
REBIRTH = "Node Control/Rebirth"
BDSEQ = "bdSeq"
SHIFT_METRICS = (("Shift/Last/ID", "String"), ("Shift/Last/Name", "String"), ("Shift/Last/Start", "DateTime"),
                 ("Shift/Last/End", "DateTime"), ("Shift/Last/Partial", "Boolean"), ("Shift/Last/Total", "UInt64"),
                 ("Shift/Last/Good", "UInt64"), ("Shift/Last/Defect", "UInt64"), ("Shift/Last/Quality", "Double"),
                 ("Shift/Last/Availability", "Double"), ("Shift/Last/Performance", "Double"),
                 ("Shift/Last/OEE", "Double"), ("Shift/Last/Anomaly Minutes", "Double"))
OEE_METRICS = ("OEE/Availability", "OEE/Performance", "OEE/Quality", "OEE/OEE")


@dataclass(frozen=True)
class Metric:
    name: str
    alias: int | None
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
    return dt(kind.datatype) if kind is not None and kind.datatype else int(pb.Double)


def dt(name: str) -> int:
    return int(pb.DataType.Value(name))


def device_metrics(device: Any, types: Mapping[str, TagType], scored: bool) -> list[tuple[str, int]]:
    """A device's metric names and datatypes, in the order of its DBIRTH."""
    names = [(tag, datatype_of(types.get(tag))) for tag in device.tags]
    for counter in device.counters:
        names += [(f"counters/{counter.name}/total", dt("UInt64")), (f"counters/{counter.name}/shift", dt("UInt64"))]
    if scored:
        names += [("Anomaly/Active", dt("Boolean")), ("Anomaly/Score", dt("Double"))]
    if device.oee is not None:
        names += [("State", dt("String")), ("State/Reason Code", dt("Int32")), ("State/Reason", dt("String"))]
        names += [(name, dt("Double")) for name in OEE_METRICS]
    for alarm in device.alarms:
        names += [(f"Alarms/{alarm.name}/Active", dt("Boolean")), (f"Alarms/{alarm.name}/Value", dt("Double")),
                  (f"Alarms/{alarm.name}/Limit", dt("Double"))]
    names += [(name, dt(kind)) for name, kind in SHIFT_METRICS]
    return names


class NodeMetrics:
    """The aliases of a node and its devices, fixed for the life of a config."""

    def __init__(self, node_metrics: Iterable[tuple[str, int]], devices: Iterable[Any],
                 types: Mapping[str, Mapping[str, TagType]], scored: Mapping[str, bool] | None = None) -> None:
        self.node: dict[str, Metric] = {BDSEQ: Metric(BDSEQ, 1, dt("Int64")), REBIRTH: Metric(REBIRTH, None, dt("Boolean"))}
        alias = 1
        for name, datatype in node_metrics:
            alias += 1
            self.node[name] = Metric(name, alias, datatype)
        self.devices: dict[str, dict[str, Metric]] = {}
        for device in devices:
            metrics: dict[str, Metric] = {}
            for name, datatype in device_metrics(device, types.get(device.name, {}), (scored or {}).get(device.name, False)):
                alias += 1
                metrics[name] = Metric(name, alias, datatype)
            self.devices[device.name] = metrics

    def retype(self, device: str, types: Mapping[str, TagType]) -> None:
        """A device's tags with the types its source gives now (an OPC UA node's DataType is learned at
        connect); aliases stay. Called before each DBIRTH, which declares them."""
        metrics = self.devices[device]
        for tag, kind in types.items():
            m = metrics.get(tag)
            if m is not None and kind.datatype:
                metrics[tag] = Metric(m.name, m.alias, datatype_of(kind))


def _set(metric: Any, datatype: int, value: Any) -> None:
    """A metric's value in the field its datatype uses, or `is_null` for no value."""
    if value is None:
        metric.is_null = True
    elif datatype == pb.Boolean:
        metric.boolean_value = bool(value)
    elif datatype in (pb.Int8, pb.Int16, pb.Int32, pb.UInt8, pb.UInt16):
        metric.int_value = int(value) & 0xFFFFFFFF  # the specification sends signed ints two's complement
    elif datatype in (pb.UInt32, pb.Int64, pb.UInt64, pb.DateTime):  # UInt32: where Tahu and Ignition read it
        metric.long_value = int(value) & 0xFFFFFFFFFFFFFFFF
    elif datatype == pb.Float:
        metric.float_value = float(value)
    elif datatype in (pb.String, pb.Text):
        metric.string_value = str(value)
    else:
        metric.double_value = float(value)


def fits(datatype: int, value: Any) -> bool:
    """Whether `_set` can carry `value` in a metric of `datatype`: a string in a string, a finite number (or a
    boolean) in any other, no value in any."""
    if value is None:
        return True
    if datatype in (pb.String, pb.Text):
        return isinstance(value, str)
    return isinstance(value, (int, float)) and math.isfinite(value)


_RANGES = {int(pb.DataType.Value(name)): bounds for name, bounds in RANGES.items()}  # by datatype number: per value


def holds(datatype: int, value: Any) -> bool:
    """Whether an integer or Boolean metric holds `value` as it is: a whole number within its datatype's range (a row
    written before a reload made its tag's register narrower can hold one that is not)."""
    bounds = _RANGES.get(datatype)
    if value is None or bounds is None:
        return True
    return (isinstance(value, int) or float(value).is_integer()) and bounds[0] <= value <= bounds[1]


def payload(ts_ms: int, seq: int | None, values: Iterable[tuple[Metric, Any, int]], *, birth: bool = False,
            historical: bool = False) -> bytes:
    """A Sparkplug B payload of (metric, value, its time in ms): in a birth every metric with its name,
    datatype and alias; else by alias (by name where it has none). Every metric carries its timestamp."""
    out = pb.Payload()
    out.timestamp = ts_ms
    if seq is not None:
        out.seq = seq
    for metric, value, at in values:
        m = out.metrics.add()
        if birth or metric.alias is None:
            m.name = metric.name
        if birth:
            m.datatype = metric.datatype
        if metric.alias is not None:
            m.alias = metric.alias
        m.timestamp = at
        if historical:
            m.is_historical = True
        _set(m, metric.datatype, value)
    return bytes(out.SerializeToString())


def death(bdseq: int, ts_ms: int | None = None) -> bytes:
    """NDEATH: only the bdSeq (Int64) of the session it ends (the Will, registered before connecting)."""
    out = pb.Payload()
    if ts_ms is not None:
        out.timestamp = ts_ms
    m = out.metrics.add()
    m.name, m.datatype, m.long_value = BDSEQ, dt("Int64"), bdseq
    return bytes(out.SerializeToString())

"""The simulated plant as an OPC UA server (asyncua): `edge-gateway sim --opcua HOST:PORT`.

Each unit is an object `Unit{id}` in the namespace `urn:edge-gateway:sim`, with one variable per
tag, its node id `ns=2;s=Unit{id}.{tag}` (the same units, tags and values as over Modbus: the
register map's scale is applied, a bit is a Boolean, an unscaled integer register an integer).
Every step of the plant writes each value with its source timestamp. The variables are
read-only, as the simulated PLCs are.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from typing import Any

from gateway.modbus_map import BIT_TABLES
from gateway.tagtypes import INTEGER_TYPES, of_register
from sim.plc import MAPS, SimPlant

NAMESPACE = "urn:edge-gateway:sim"


def node_id(unit: int, tag: str, ns: int = 2) -> str:
    return f"ns={ns};s=Unit{unit}.{tag}"


async def serve_opcua(plant: SimPlant, host: str, port: int, tick: float = 0.1, user: str | None = None,
                      password: str | None = None, cert: str | None = None, key: str | None = None) -> None:
    """Serve the plant until cancelled (the plant is stepped by its own `run()`); with `user`, only that
    login (and its password) opens a session."""
    from asyncua import Server, ua
    from asyncua.crypto.permission_rules import User, UserRole
    from asyncua.server.user_managers import UserManager

    login = (user, password)

    class OneUser(UserManager):
        def get_user(self, iserver: Any, username: str | None = None, password: str | None = None,
                     certificate: Any = None) -> Any:
            if login[0] is None:
                return User(role=UserRole.User)
            return User(role=UserRole.User, name=username) if (username, password) == login else None

    server = Server(user_manager=OneUser())
    await server.init()
    server.set_endpoint(f"opc.tcp://{host}:{port}/edge-gateway/sim/")
    server.set_server_name("edge-gateway simulated plant")
    if cert and key:  # Basic256Sha256 SignAndEncrypt only
        await server.load_certificate(cert)
        await server.load_private_key(key)
        server.set_security_policy([ua.SecurityPolicyType.Basic256Sha256_SignAndEncrypt])
    else:
        server.set_security_policy([ua.SecurityPolicyType.NoSecurity])
    if user is not None:
        server.set_security_IDs(["Username"])
    idx = await server.register_namespace(NAMESPACE)
    variables: list[tuple[int, Any, Any, Any]] = []  # (unit, tag entry, node, variant type)
    for unit_id, unit in plant.units.items():
        obj = await server.nodes.objects.add_object(ua.NodeId(f"Unit{unit_id}", idx), f"Unit{unit_id}")
        for reg in MAPS[unit.profile]:
            kind = of_register(reg).kind
            vtype = ua.VariantType.Boolean if kind == "bool" else \
                ua.VariantType.Int64 if kind == "int" else ua.VariantType.Double
            initial: Any = False if kind == "bool" else 0 if kind == "int" else 0.0
            node = await obj.add_variable(ua.NodeId(f"Unit{unit_id}.{reg.name}", idx), reg.name,
                                          ua.Variant(initial, vtype))
            variables.append((unit_id, reg, node, vtype))
    async with server:
        while True:
            now = dt.datetime.now(dt.timezone.utc)
            for unit_id, reg, node, vtype in variables:
                value = plant.units[unit_id].last.get(reg.name)
                if value is None or value != value:  # a dropout: bad quality, as a PLC would say
                    dv = ua.DataValue(StatusCode=ua.StatusCode(ua.StatusCodes.BadSensorFailure), SourceTimestamp=now)
                else:
                    dv = ua.DataValue(ua.Variant(_typed(value, reg, vtype), vtype), SourceTimestamp=now,
                                      ServerTimestamp=now)
                await server.write_attribute_value(node.nodeid, dv)
            await asyncio.sleep(tick)


def _typed(value: float, reg: Any, vtype: Any) -> Any:
    from asyncua import ua

    if vtype == ua.VariantType.Boolean:
        return bool(value)
    if vtype == ua.VariantType.Int64:
        return round(value)
    return float(of_register(reg).shape(value) if reg.type in INTEGER_TYPES or reg.table in BIT_TABLES
                 else value)

"""`edge-gateway opcua trust DEVICE`: trust the server certificate an OPC UA device refused (the trust store)."""

from __future__ import annotations

import sys

from gateway import config as configuration
from gateway.commands.common import Subparsers, config_option, load
from gateway.errors import EX_CONFIG, EX_DATAERR, EX_OK, EX_USAGE


def add_to(sub: Subparsers) -> None:
    parser = sub.add_parser("opcua", help="trust the certificate an OPC UA server offered (the trust store)")
    parser.add_argument("action", choices=("trust",))
    parser.add_argument("device", help="the device whose rejected server certificate becomes trusted")
    config_option(parser)
    parser.set_defaults(main=lambda args: opcua_trust(args.config, args.device))


def opcua_trust(path: str, name: str) -> int:
    """Move the server certificates refused for an OPC UA device to its trust store's trusted/."""
    from gateway.sources.opcua_trust import pki_dir, trust

    cfg = load(path)
    if cfg is None:
        return EX_CONFIG
    device = next((d for d in cfg.devices if d.name == name), None)
    if not isinstance(device, configuration.OpcUaDevice):
        names = ", ".join(d.name for d in cfg.devices if isinstance(d, configuration.OpcUaDevice)) or "none"
        print(f"edge-gateway opcua trust: {name} is not an OPC UA device of {path} (those are: {names})",
              file=sys.stderr)
        return EX_USAGE
    if device.security is None or device.security.server_cert_file:
        why = "has no security:" if device.security is None else "pins security.server_cert_file"
        print(f"edge-gateway opcua trust: device {name} {why}; the trust store is not used for it", file=sys.stderr)
        return EX_USAGE
    directory = pki_dir(device, cfg.gateway.data_dir)
    moved = trust(name, directory)
    if not moved:
        print(f"edge-gateway opcua trust: no rejected certificate of device {name} in {directory}/rejected/ "
              "(the gateway writes one there when the server offers a certificate it does not trust)",
              file=sys.stderr)
        return EX_DATAERR
    for where in moved:
        print(f"trusted: {where} (the gateway uses it at its next connection attempt)")
    return EX_OK

"""The OPC UA server certificates the gateway trusts, kept as Ignition and Kepware keep theirs.

`<pki_dir>/trusted/` holds the server certificates (DER or PEM) a session may be opened with;
`<pki_dir>/rejected/` receives, as `DEVICE-<sha256 prefix>.der`, each certificate a server
offered that is not trusted. `pki_dir` is `security.pki_dir`, by default `<data_dir>/pki`.
A certificate pinned with `security.server_cert_file` is trusted for its device without the
store. A rejected certificate is trusted by `edge-gateway opcua trust DEVICE`, which moves it
to `trusted/`, or by moving the file by hand; the next connection attempt then uses it.

Plain files and the standard library only: the CLI uses this without asyncua.
"""

from __future__ import annotations

import base64
import hashlib
import os
import re

from gateway import datadir
from gateway.config import OpcUaDevice


class Untrusted(Exception):
    """The server offered a certificate that is neither pinned nor in `trusted/`."""


def pki_dir(device: OpcUaDevice, data_dir: str) -> str:
    """The folder holding `trusted/` and `rejected/` for this device."""
    security = device.security
    return (security.pki_dir if security is not None and security.pki_dir else None) or datadir.path(data_dir, datadir.PKI)


def fingerprint(der: bytes) -> str:
    return hashlib.sha256(der).hexdigest()


def trusted(der: bytes, directory: str) -> bool:
    """Whether `directory/trusted/` holds this certificate (as DER or PEM)."""
    folder = os.path.join(directory, "trusted")
    try:
        names = os.listdir(folder)
    except OSError:
        return False
    for name in names:
        try:
            with open(os.path.join(folder, name), "rb") as fh:
                data = fh.read()
        except OSError:
            continue
        if der in (data, _pem_body(data)):
            return True
    return False


def reject(der: bytes, device: str, directory: str, subject: str, command: str | None = None) -> str:
    """Write the certificate to `rejected/`; the one message saying how to trust it (`command`: the trust command
    as this daemon's user must type it, with its -c)."""
    folder = os.path.join(directory, "rejected")
    path = os.path.join(folder, f"{device}-{fingerprint(der)[:16]}.der")
    try:
        os.makedirs(folder, mode=0o750, exist_ok=True)
        os.makedirs(os.path.join(directory, "trusted"), mode=0o750, exist_ok=True)  # made by the daemon's user
        if not os.path.exists(path):
            tmp = path + ".tmp"
            with open(tmp, "wb") as fh:
                fh.write(der)
            os.replace(tmp, path)
    except OSError as err:
        return (f"the server's certificate ({subject}, SHA-256 {fingerprint(der)[:16]}…) is not trusted, and it "
                f"could not be written to {path} ({err.strerror}): make {directory} writable by the gateway, or "
                f"put the server's certificate in {os.path.join(directory, 'trusted')}/")
    return (f"the server's certificate ({subject}, SHA-256 {fingerprint(der)[:16]}…) is not trusted; it was written "
            f"to {path}: if it is the right server, trust it with `{command or f'edge-gateway opcua trust {device}'}` or move the "
            f"file to {os.path.join(directory, 'trusted')}/")


def trust(device: str, directory: str) -> list[str]:
    """Move the device's rejected certificates to `trusted/`; the paths they now have."""
    rejected, folder = os.path.join(directory, "rejected"), os.path.join(directory, "trusted")
    try:
        names = sorted(n for n in os.listdir(rejected) if re.fullmatch(rf"{re.escape(device)}-[0-9a-f]{{16}}\.der", n))
    except FileNotFoundError:
        return []
    os.makedirs(folder, mode=0o750, exist_ok=True)
    moved = []
    for name in names:
        os.replace(os.path.join(rejected, name), os.path.join(folder, name))
        moved.append(os.path.join(folder, name))
    return moved


def _pem_body(data: bytes) -> bytes | None:
    match = re.search(rb"-----BEGIN CERTIFICATE-----(.+?)-----END CERTIFICATE-----", data, re.S)
    if match is None:
        return None
    try:
        return base64.b64decode(b"".join(match.group(1).split()))
    except ValueError:
        return None

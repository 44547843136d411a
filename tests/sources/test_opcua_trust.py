"""The OPC UA trust store's files (no server, no asyncua): rejected, trusted by the CLI's move, DER or PEM."""

from __future__ import annotations

import base64

from gateway.sources.opcua_trust import reject, trust, trusted

DER = bytes(range(256)) * 3  # stands for a certificate: the store compares bytes


def test_a_rejected_certificate_is_trusted_once_moved_and_a_pem_copy_counts(tmp_path):
    how = reject(DER, "press1", str(tmp_path), "CN=press1")
    [rejected] = (tmp_path / "rejected").iterdir()
    assert rejected.name.startswith("press1-") and rejected.read_bytes() == DER
    assert f"it was written to {rejected}" in how and "`edge-gateway opcua trust press1`" in how
    assert not trusted(DER, str(tmp_path))
    assert reject(DER, "press1", str(tmp_path), "CN=press1") == how  # the same file, not a second one
    assert trust("press2", str(tmp_path)) == []  # another device's certificate stays rejected
    assert trust("press1", str(tmp_path)) == [str(tmp_path / "trusted" / rejected.name)]
    assert trusted(DER, str(tmp_path)) and not list((tmp_path / "rejected").iterdir())
    pem = b"-----BEGIN CERTIFICATE-----\n" + base64.encodebytes(DER[::-1]) + b"-----END CERTIFICATE-----\n"
    (tmp_path / "trusted" / "other.pem").write_bytes(pem)
    assert trusted(DER[::-1], str(tmp_path))


def test_a_store_that_cannot_be_written_says_what_to_do(tmp_path):
    (tmp_path / "pki").write_text("a file where the folder should be")
    how = reject(DER, "press1", str(tmp_path / "pki"), "CN=press1")
    assert "could not be written to" in how and f"make {tmp_path / 'pki'} writable by the gateway" in how

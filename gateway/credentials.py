"""Secrets are never inline in the config: a `password_file` names a file readable by the service only."""

from __future__ import annotations


def read_secret(path: str | None) -> str | None:
    """The secret in the file at `path` (surrounding whitespace removed), or None when no file is named."""
    if path is None:
        return None
    with open(path, encoding="utf-8") as fh:
        return fh.read().strip()

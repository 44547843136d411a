"""edge-gateway: read the plant, count exactly, store durably, forward upstream."""

__version__ = "0.1.0"

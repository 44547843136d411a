"""Every error the gateway raises on purpose, and what becomes of it.

    GatewayError
     ├── ConfigError       the config file is wrong: every problem listed, exit 78 (reload: refused, old kept)
     ├── SourceError       a read failed: counted and reported for that device only; the loop goes on
     ├── ModelError        an anomaly model cannot be used: check-config 78, a reload refused; at start
     │                     only its device goes unscored
     ├── UplinkError       the upstream cannot be reached: logged once per change, retried with backoff
     └── AlreadyRunning    another gateway holds the data_dir: exit 69

Anything else that escapes a supervised loop is a bug: the daemon logs its traceback and
exits non-zero so that systemd restarts it (see `supervise.py`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

# Exit codes (sysexits), for every command: 0 ok, 64 usage, 65 bad input data, 69 a required service
# or resource unavailable, 70 internal error (systemd restarts the daemon), 73 cannot create a file, 74 the
# output cannot be written (stdout on a full disk),
# 77 permission denied (a command run without the rights to the data_dir), 78 config error (systemd
# does not restart: it will not fix itself).
EX_OK, EX_USAGE, EX_DATAERR, EX_UNAVAILABLE, EX_SOFTWARE, EX_CANTCREAT, EX_IOERR, EX_NOPERM, EX_CONFIG = \
    0, 64, 65, 69, 70, 73, 74, 77, 78


def missing(*modules: str) -> list[str]:
    """Which of these modules cannot be imported (an optional extra not installed)."""
    import importlib

    absent = []
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError:
            absent.append(name)
    return absent


class GatewayError(Exception):
    """Base of the errors the gateway raises on purpose."""


class ConfigError(GatewayError):
    """A config file with one or more problems; `str()` lists them, one per line, with their YAML line."""

    def __init__(self, file: str, problems: Sequence[tuple[str, str]], lines: Mapping[str, int] | None = None
                 ) -> None:
        self.file = file
        self.problems = list(problems)
        self.lines = dict(lines or {})
        super().__init__("\n".join(self.format(path, msg) for path, msg in self.problems))

    def line_of(self, path: str) -> int | None:
        """The YAML line of `path`, or of its nearest enclosing key when it is missing from the file."""
        while path:
            if path in self.lines:
                return self.lines[path]
            cut = max(path.rfind("."), path.rfind("["))
            path = path[:cut] if cut > 0 else ""
        return None

    def format(self, path: str, msg: str) -> str:
        line = self.line_of(path) if path else None
        where = f"{self.file}:{line}" if line else self.file
        return f"{where}: {path}: {msg}" if path else f"{where}: {msg}"


class SourceError(GatewayError):
    """A read failed; `str()` says why in a form fit for the log and health (endpoint and request)."""


class ModelError(GatewayError):
    """An anomaly model that cannot be used with this device; `str()` names the model and the mismatch."""


class UplinkError(GatewayError):
    """The upstream broker cannot be reached or refused us; `str()` names the endpoint and the reason.

    `reached`: whether the broker answered at all (a refusal or a failed handshake), or could not
    be reached (refused, reset, unreachable): the two are retried on different schedules.
    """

    def __init__(self, message: str, reached: bool = True) -> None:
        super().__init__(message)
        self.reached = reached


class AlreadyRunning(GatewayError):
    """Another edge-gateway holds this data_dir."""

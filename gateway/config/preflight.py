"""What running needs beyond a valid file: a device at all, secret files readable, models loadable and
fitting, extras installed.

Only `run`, `check-config` and a reload call `preflight`; `status`, `outbox` and `counters`
read the config without it, so they need neither the secrets nor the TFLite runtime.
Its problems are reported like the schema's, with the file, the line and the YAML path.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from gateway.config.load import document, lines_of
from gateway.config.schema import Config
from gateway.errors import ConfigError, ModelError
from gateway.files import not_text

if TYPE_CHECKING:
    from gateway.anomaly.model import Model

log = logging.getLogger("edge_gateway.config.preflight")


@dataclass
class Prepared:
    """What preflight loaded, for the daemon to use: one model per name, shared by its devices; and, when the
    daemon starts, why a device's model cannot serve it (that device runs without anomaly scoring)."""
    models: dict[str, Model] = field(default_factory=dict)
    unusable: dict[str, str] = field(default_factory=dict)


def preflight(config: Config, file: str, *, isolate_models: bool = False) -> Prepared:
    """Check what the config points at; raise ConfigError listing every problem.

    With `isolate_models` (the daemon's start), a model that cannot serve its device is not a problem of the
    config but of that device: it is left in `Prepared.unusable`, and the other devices run (DESIGN.md,
    guarantee 5). `check-config` and a reload are strict: a reload keeps the running config instead."""
    problems: list[tuple[str, str]] = []
    if not config.devices:  # the config install.sh leaves: inert until the machines are described
        problems.append(("devices", "no devices yet: describe your machines here (templates in the file, every key "
                                    "in docs/configuration.md); the gateway does not run without one"))
    problems += _unreadable(config)
    models, unfit = _models(config)
    unusable = {config.devices[i].name: "; ".join(whys) for i, whys in unfit.items()} if isolate_models else {}
    if not isolate_models:
        problems += [(f"devices[{i}].model", f"device {config.devices[i].name}: {why}")
                     for i, whys in unfit.items() for why in whys]
    if config.upstream.format == "sparkplug_b" and importlib.util.find_spec("google.protobuf") is None:
        problems.append(("upstream.format", "Sparkplug B needs protobuf: pip install 'edge-gateway[sparkplug]' "
                                            "(install.sh --with-sparkplug)"))
    opcua = [(i, d) for i, d in enumerate(config.devices) if d.source == "opcua"]
    if opcua and importlib.util.find_spec("asyncua") is None:
        problems += [(f"devices[{i}].source", f"device {d.name}: OPC UA needs asyncua: pip install "
                                              "'edge-gateway[opcua]' (install.sh --with-opcua)") for i, d in opcua]
    if config.local_broker.enabled and importlib.util.find_spec("amqtt") is None:
        problems.append(("local_broker.enabled", "the embedded broker needs amqtt: "
                                                 "pip install 'edge-gateway[broker]' (install.sh does)"))
    if config.web is not None:
        problems += _web(config)
    elif isolate_models and _web_left_empty(file):  # the daemon's start: said once
        line = lines_of(file).get("web")
        log.warning("%s%s: web: is empty, so no status page is served; write `web: {}` for the page with its "
                    "defaults (127.0.0.1:8470), or remove the key", file, f":{line}" if line else "")
    if problems:
        raise ConfigError(file, problems, lines_of(file))
    return Prepared(models, unusable)


def _web_left_empty(file: str) -> bool:
    """Whether the file says `web:` (or `web: null`) with nothing: the section written, the page still off."""
    doc = document(file)
    return isinstance(doc, dict) and "web" in doc and doc["web"] is None


def _web(config: Config) -> list[tuple[str, str]]:
    """The [web] extra installed, and the users and TLS files readable."""
    web = config.web
    assert web is not None
    needs = ["aiohttp", "prometheus_client"] + (["pwdlib", "argon2"] if web.users_file else [])
    absent = [name for name in needs if importlib.util.find_spec(name) is None]
    problems = [("web", f"the web page needs {', '.join(absent)}: pip install 'edge-gateway[web]' "
                        "(install.sh --with-web)")] if absent else []
    files = [("web.users_file", web.users_file)]
    if web.tls is not None:
        files += [("web.tls.cert_file", web.tls.cert_file), ("web.tls.key_file", web.tls.key_file)]
    unreadable = _files([(path, name) for path, name in files if name is not None])
    if web.tls is not None and not any(path.startswith("web.tls.") for path, _ in unreadable):
        unreadable += _web_tls(web.tls.cert_file, web.tls.key_file)
    return problems + unreadable


def _web_tls(cert: str, key: str) -> list[tuple[str, str]]:
    """The page's certificate and key loaded as the server loads them: a key of another certificate passed, then the
    daemon retried serving HTTPS every 5 s for ever (KEY_VALUES_MISMATCH)."""
    import ssl

    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cafile=cert)
    except ssl.SSLError as err:
        return [("web.tls.cert_file", f'expected a PEM certificate, got "{cert}", from which none could be read '
                                      f"({err.reason or err.__class__.__name__})")]
    try:
        # A passphrase is never asked for (the daemon has no terminal): an encrypted key is refused.
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(cert, key, password=lambda: b"")
    except ssl.SSLError as err:
        if err.reason == "KEY_VALUES_MISMATCH":
            return [("web.tls.key_file", f'expected the private key of the certificate in "{cert}", got "{key}", '
                                         "the key of another certificate")]
        return [("web.tls.key_file", f'expected a PEM private key without a passphrase, got "{key}", from which '
                                     "none could be read")]
    return []


def with_files(err: ConfigError) -> ConfigError:
    """A schema's ConfigError with the files its document names that cannot be read, so that one
    run of check-config reports a bad node id and a missing certificate together."""
    extra = [p for p in _unreadable(document(err.file)) if p not in err.problems]
    if not extra:
        return err
    lines = err.lines or lines_of(err.file)
    merged = ConfigError(err.file, err.problems + extra, lines)
    order = {p: i for i, p in enumerate(merged.problems)}
    return ConfigError(err.file, sorted(merged.problems, key=lambda p: (merged.line_of(p[0]) or 0, order[p])), lines)


def _get(node: Any, key: str) -> Any:
    """`key` of a Config section or of a YAML mapping (None when absent or not a mapping)."""
    if isinstance(node, dict):
        return node.get(key)
    return getattr(node, key, None) if node is not None and not isinstance(node, (str, list, int, float)) else None


def _unreadable(config: Any) -> list[tuple[str, str]]:
    """The files a Config, or a YAML document the schema refused, names that cannot be read."""
    upstream, broker = _get(config, "upstream"), _get(config, "local_broker")
    tls, client = _get(upstream, "tls"), _get(broker, "client")
    files: list[tuple[str, Any]] = [
        ("upstream.password_file", _get(upstream, "password_file")),
        ("local_broker.password_file", _get(broker, "password_file")),
        ("upstream.tls.ca_file", _get(tls, "ca_file")), ("upstream.tls.cert_file", _get(tls, "cert_file")),
        ("upstream.tls.key_file", _get(tls, "key_file")),
        ("local_broker.client.password_file", _get(client, "password_file"))]
    devices = _get(config, "devices")
    for i, device in enumerate(devices if isinstance(devices, (list, tuple)) else ()):
        if _get(device, "source") == "opcua":
            files.append((f"devices[{i}].password_file", _get(device, "password_file")))
            security = _get(device, "security")
            files += [(f"devices[{i}].security.{key}", _get(security, key))
                      for key in ("cert_file", "key_file", "server_cert_file")]
    return _files([(path, name) for path, name in files if isinstance(name, str) and name])


MAX_PASSWORD = 65535


def _files(files: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """Each named file readable; a password or users file (read as text by the gateway) UTF-8 text too."""
    problems = []
    for path, name in files:
        if not (os.path.isfile(name) and os.access(name, os.R_OK)):
            problems.append((path, f'expected a readable file, got "{name}" (missing or not readable)'))
        elif path.endswith("password_file") and path != "local_broker.password_file" and \
                (size := os.path.getsize(name)) > MAX_PASSWORD:  # (that one is the broker's users)
            # (MQTT's longest password: a longer one failed the first CONNECT, exit 70, for ever)
            problems.append((path, f'expected a password of at most {MAX_PASSWORD} bytes, got "{name}" of {size}'))
        elif path.endswith(("password_file", "users_file")) and (why := not_text(name)):
            problems.append((path, why))
    return problems


def _models(config: Config) -> tuple[dict[str, Model], dict[int, list[str]]]:
    """Each configured model loaded once; and, by device index, why its model cannot serve that device."""
    wanted = [(i, d) for i, d in enumerate(config.devices) if d.model is not None]
    if not wanted:
        return {}, {}  # numpy and the runtime are not even imported
    try:
        from gateway.anomaly import model as anomaly  # numpy and the TFLite runtime only when a model is configured
    except ImportError as err:
        why = f"anomaly models need numpy and a TFLite runtime ({err}): pip install 'edge-gateway[anomaly]'"
        return {}, {i: [why] for i, _ in wanted}
    directory = anomaly.model_dir(config.gateway.model_dir)
    loaded: dict[str, Any] = {}
    problems: dict[int, list[str]] = {}
    for i, device in wanted:
        name = device.model
        assert name is not None
        if name not in loaded:
            try:
                loaded[name] = anomaly.load(name, directory)
            except ModelError as err:
                loaded[name] = f"model {name}: {err}"
        model = loaded[name]
        whys = [model] if isinstance(model, str) else \
            anomaly.check_device(model, device.tags, device.interval * (getattr(device, "time_scale", None) or 1.0))
        if whys:
            problems[i] = whys
    return {n: m for n, m in loaded.items() if not isinstance(m, str)}, problems

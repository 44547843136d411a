"""What running needs beyond a valid file: a device at all, secret files readable, models loadable and
fitting, extras installed.

Only `run`, `check-config` and a reload call `preflight`; `status`, `outbox` and `counters`
read the config without it, so they need neither the secrets nor the TFLite runtime.
Its problems are reported like the schema's, with the file, the line and the YAML path.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from gateway.config.load import lines_of
from gateway.config.schema import Config
from gateway.errors import ConfigError, ModelError

if TYPE_CHECKING:
    from gateway.anomaly import Model


@dataclass
class Prepared:
    """What preflight loaded, for the daemon to use: one model per name, shared by its devices."""
    models: dict[str, Model] = field(default_factory=dict)


def preflight(config: Config, file: str) -> Prepared:
    """Check what the config points at; raise ConfigError listing every problem."""
    problems: list[tuple[str, str]] = []
    if not config.devices:  # the config install.sh leaves: inert until the machines are described
        problems.append(("devices", "no devices yet: describe your machines here (templates in the file, every key "
                                    "in docs/configuration.md); the gateway does not run without one"))
    problems += _unreadable(config)
    models, model_problems = _models(config)
    problems += model_problems
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
    if problems:
        raise ConfigError(file, problems, lines_of(file))
    return Prepared(models)


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
    return problems + [(path, f'expected a readable file, got "{name}" (missing or not readable)')
                       for path, name in files if name is not None and not (os.path.isfile(name)
                                                                             and os.access(name, os.R_OK))]


def _unreadable(config: Config) -> list[tuple[str, str]]:
    files: list[tuple[str, str | None]] = [("upstream.password_file", config.upstream.password_file),
                                           ("local_broker.password_file", config.local_broker.password_file)]
    if config.upstream.tls is not None:
        tls = config.upstream.tls
        files += [("upstream.tls.ca_file", tls.ca_file), ("upstream.tls.cert_file", tls.cert_file),
                  ("upstream.tls.key_file", tls.key_file)]
    if config.local_broker.client is not None:
        files.append(("local_broker.client.password_file", config.local_broker.client.password_file))
    for i, device in enumerate(config.devices):
        if device.source == "opcua":
            files.append((f"devices[{i}].password_file", getattr(device, "password_file", None)))
            security = getattr(device, "security", None)
            if security is not None:
                files += [(f"devices[{i}].security.{key}", getattr(security, key))
                          for key in ("cert_file", "key_file", "server_cert_file")]
    return [(path, f'expected a readable file, got "{name}" (missing or not readable)')
            for path, name in files if name is not None and not (os.path.isfile(name) and os.access(name, os.R_OK))]


def _models(config: Config) -> tuple[dict[str, Model], list[tuple[str, str]]]:
    wanted = [(i, d) for i, d in enumerate(config.devices) if d.model is not None]
    if not wanted:
        return {}, []  # numpy and the runtime are not even imported
    try:
        from gateway import anomaly  # numpy and the TFLite runtime only when a model is configured
    except ImportError as err:
        why = f"anomaly models need numpy and a TFLite runtime ({err}): pip install 'edge-gateway[anomaly]'"
        return {}, [(f"devices[{i}].model", f"device {d.name}: {why}") for i, d in wanted]
    directory = anomaly.model_dir(config.gateway.model_dir)
    loaded: dict[str, Any] = {}
    problems: list[tuple[str, str]] = []
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
        problems += [(f"devices[{i}].model", f"device {device.name}: {why}") for why in whys]
    return {n: m for n, m in loaded.items() if not isinstance(m, str)}, problems

"""`edge-gateway run` (the daemon, under its signals) and `edge-gateway check-config FILE`."""

from __future__ import annotations

import asyncio
import logging
import signal
import sqlite3
import sys

from gateway import config as configuration
from gateway import logs
from gateway.commands.common import Subparsers, config_option, prepare
from gateway.errors import EX_CANTCREAT, EX_CONFIG, EX_OK, EX_SOFTWARE, EX_UNAVAILABLE
from gateway.notify import HELD_HUP, hold_hup

log = logging.getLogger("edge_gateway.commands.daemon")


def add_to(sub: Subparsers) -> None:
    run_ = sub.add_parser("run", help="run the gateway daemon")
    config_option(run_)
    run_.set_defaults(main=lambda args: run(args.config))
    check = sub.add_parser("check-config", help="validate a config file and exit (78 when it has problems)")
    check.add_argument("file")
    check.set_defaults(main=lambda args: check_config(args.file))


def check_config(path: str) -> int:
    ready = prepare(path)
    if ready is None:
        return EX_CONFIG
    cfg = ready[0]
    devices = ", ".join(f"{d.name} ({d.source})" for d in cfg.devices) or "none"
    print(f"{path}: ok; gateway {cfg.gateway.id}, topic root {cfg.topic_root}, devices: {devices}")
    return EX_OK


def run(path: str) -> int:
    if signal.getsignal(signal.SIGHUP) is signal.SIG_DFL:  # not started through gateway/entry.py, which holds it
        hold_hup()
    ready = prepare(path, isolate_models=True)  # a model that cannot serve its device stops only its scoring
    if ready is None:
        return EX_CONFIG
    cfg, prepared = ready
    logs.setup(cfg.gateway.log_level)
    if any(d.source == "opcua" for d in cfg.devices):
        from gateway.sources.opcua import unknown_nodes  # asyncua only when a device uses it
        problems = asyncio.run(unknown_nodes(cfg))
        if problems:
            print(configuration.ConfigError(path, problems, configuration.load_lines(path)), file=sys.stderr)
            return EX_CONFIG
    return asyncio.run(_serve(cfg, path, prepared))


async def _serve(cfg: configuration.Config, path: str, prepared: configuration.Prepared) -> int:
    """The daemon under its signals: SIGTERM/SIGINT stop (a second one skips the drain), SIGHUP reloads."""
    from gateway.app import Gateway, LoopFailed
    from gateway.errors import AlreadyRunning

    loop = asyncio.get_running_loop()
    shutdown, force = asyncio.Event(), asyncio.Event()

    def terminate() -> None:
        (force if shutdown.is_set() else shutdown).set()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, terminate)
    try:
        async with Gateway(cfg, config_path=path, prepared=prepared) as gateway:
            loop.add_signal_handler(signal.SIGHUP, gateway.reload_requested.set)
            if HELD_HUP:
                log.info("a reload was asked for while starting: reloading now")
                gateway.reload_requested.set()
            await gateway.run(shutdown, force)
    except AlreadyRunning as err:
        log.error("%s", err)
        return EX_UNAVAILABLE
    except (OSError, sqlite3.Error) as err:
        log.error("cannot open the outbox in data_dir %s: %s", cfg.gateway.data_dir, err)
        return EX_CANTCREAT
    except LoopFailed as err:
        log.error("exiting with status %d: %s", EX_SOFTWARE, err)
        return EX_SOFTWARE
    return EX_OK

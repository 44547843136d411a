"""An embedded MQTT broker (amqtt), for the demo and for tests; also `python -m gateway.broker`.

Anonymous clients are refused unless `allow_anonymous` is set explicitly; the demo
sets it for its own loopback-only stand-in of the upstream broker.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal


def broker_config(listen: str, *, allow_anonymous: bool = False, password_file: str | None = None) -> dict:
    plugins: dict = {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": allow_anonymous}}
    if password_file:
        plugins["amqtt.plugins.authentication.FileAuthPlugin"] = {"password_file": password_file}
    return {"listeners": {"default": {"type": "tcp", "bind": listen}}, "plugins": plugins}


async def start(listen: str, **options):
    """Start an amqtt broker listening on HOST:PORT; returns it (call `await broker.shutdown()`)."""
    from amqtt.broker import Broker  # imported here: amqtt is an optional extra

    broker = Broker(broker_config(listen, **options))
    await broker.start()
    return broker


async def _serve(listen: str, allow_anonymous: bool, password_file: str | None) -> None:
    broker = await start(listen, allow_anonymous=allow_anonymous, password_file=password_file)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"amqtt broker listening on {listen}", flush=True)
    await stop.wait()
    await broker.shutdown()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gateway.broker", description=__doc__)
    parser.add_argument("--listen", default="127.0.0.1:1883", help="HOST:PORT (default %(default)s)")
    parser.add_argument("--allow-anonymous", action="store_true", help="accept clients without credentials")
    parser.add_argument("--password-file", help="amqtt password file (user:hash lines)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    asyncio.run(_serve(args.listen, args.allow_anonymous, args.password_file))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

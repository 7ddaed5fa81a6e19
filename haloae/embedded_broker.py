"""A small MQTT 3.1.1 broker for the demo when no broker is reachable and mosquitto is not
installed (amqtt, pure Python). Loopback only; not for production — use mosquitto there.

    python -m haloae.embedded_broker --port 18830
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal


async def _serve(port: int) -> None:
    from amqtt.broker import Broker

    config = {
        "listeners": {"default": {"type": "tcp", "bind": f"127.0.0.1:{port}"}},
        "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
    }
    broker = Broker(config)
    await broker.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await broker.shutdown()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, default=1883, help="TCP port on 127.0.0.1 (default 1883)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    # amqtt logs every bare TCP probe (the demo's "is a broker there?" check) as an error
    logging.getLogger("amqtt").setLevel(logging.CRITICAL)
    asyncio.run(_serve(args.port))


if __name__ == "__main__":
    main()

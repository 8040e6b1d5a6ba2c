"""The ceiling `make bench` compares phonebind with: a bare `grpc.aio` server
that serves only the standard health service (grpc.health.v1), SERVING, with
no interceptor, no logging and no database.

    python bench/reference_server.py --listen 127.0.0.1:0

prints the address it listens on as its first line of standard output, then
serves until SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import signal

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc


async def serve(listen: str) -> None:
    server = grpc.aio.server()
    # The asyncio flavour of the standard servicer: a plain one would run each
    # call on a thread pool, which is not what a bare aio server does.
    servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    await servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    port = server.add_insecure_port(listen)
    await server.start()
    print(f"{listen.rsplit(':', 1)[0]}:{port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    await server.stop(0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--listen", default="127.0.0.1:0", help="HOST:PORT (default: any port)")
    asyncio.run(serve(parser.parse_args().listen))


if __name__ == "__main__":
    main()

"""What tracing costs a call, measured in the server process itself.

Each call goes through the server's interceptor chain into the servicer and a
store transaction (GetAccount of a registered account, SQLite), as gRPC would
hand it over, but without the transport, whose noise would hide a few
microseconds. The access log is on (written to /dev/null), as in production.

Modes, each in a fresh process, run in turns so that a slower moment of a
shared machine does not fall on one mode alone:

- `off`: no OTEL_* variables (phonebind's default);
- `on`: tracing on, every call sampled and its spans (RPC, transaction)
  made, with a caller's traceparent; spans go through the SDK's batch
  processor to an exporter that drops them, so the export's encoding and
  network time (on the batch thread) are left out;
- `--baseline DIR`: `off` again, with the server package found in DIR (for
  example `git archive main server | tar -x -C DIR`), to compare with the
  code before tracing existed.

    .venv/bin/python bench/tracing_cost.py [--calls 3000] [--rounds 5] [--baseline DIR]

Prints the median and the least CPU microseconds per call of each mode over
the rounds (process CPU time, which other load on the machine barely moves).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

METHOD = "/phonebind.v1.BindingService/GetAccount"
TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


class Context:
    """The part of grpc.aio.ServicerContext the chain uses."""

    def __init__(self, metadata: tuple[tuple[str, str], ...]) -> None:
        self._metadata = metadata

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return self._metadata

    def time_remaining(self) -> None:
        return None

    def set_trailing_metadata(self, _metadata: object) -> None:
        pass

    def cancelled(self) -> bool:
        return False

    async def abort(self, code: object, details: str, _trailers: object = ()) -> None:
        raise RuntimeError(f"the call failed: {code} {details}")

    def peer(self) -> str:
        return "ipv4:127.0.0.1:40000"

    def auth_context(self) -> dict[str, list[bytes]]:
        return {}


def measure(mode: str, calls: int) -> float:
    """Microseconds per call, in this process."""
    from phonebind.v1 import binding_service_pb2 as api
    from phonebind_server import logs
    from phonebind_server.app import create_server
    from phonebind_server.config import load
    from phonebind_server.rpc.binding import BindingServicer
    from phonebind_server.rpc.pagination import PageTokens

    logs.configure("INFO")
    tracing = None
    if mode == "on":
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import (
            BatchSpanProcessor,
            SpanExporter,
            SpanExportResult,
        )

        from phonebind_server.tracing import Tracing

        class Dropped(SpanExporter):
            def export(self, spans: object) -> SpanExportResult:
                return SpanExportResult.SUCCESS

        provider = TracerProvider()
        provider.add_span_processor(BatchSpanProcessor(Dropped()))
        tracing = Tracing(provider)

    async def run() -> float:
        with tempfile.TemporaryDirectory() as directory:
            settings = load(
                {
                    "listen": "127.0.0.1:0",
                    "database_url": f"sqlite:///{directory}/cost.db",
                    "sms_gateway": "log",
                    "dev": True,
                },
                env={},
            )
            extra = {"tracing": tracing} if tracing is not None else {}
            app = await create_server(settings, migrate=True, **extra)
            try:
                servicer = BindingServicer(
                    app.service, PageTokens(settings.keys().index_key), app.store.run
                )
                register = app.chain.handler(
                    "/phonebind.v1.BindingService/RegisterAccount", servicer.RegisterAccount
                )
                await register(
                    api.RegisterAccountRequest(
                        account_id="acct-cost",
                        holder_name="张三",
                        id_number="11010519491231002X",
                        phone="+8613800138000",
                    ),
                    Context(()),
                )
                handler = app.chain.handler(METHOD, servicer.GetAccount)
                request = api.GetAccountRequest(account_id="acct-cost")
                metadata = (("traceparent", TRACEPARENT),) if mode == "on" else ()
                for _ in range(200):  # warm up
                    await handler(request, Context(metadata))
                # CPU time of the whole process (the batch processor's thread
                # included): other work on a shared machine barely moves it.
                started = time.process_time()
                for _ in range(calls):
                    await handler(request, Context(metadata))
                elapsed = time.process_time() - started
            finally:
                await app.stop(grace=0)
        return elapsed / calls * 1e6

    return asyncio.run(run())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--baseline", help="a directory holding an older server/ to compare")
    parser.add_argument("--child", choices=("off", "on"), help=argparse.SUPPRESS)
    options = parser.parse_args()
    if options.child:
        import phonebind_server

        microseconds = measure(options.child, options.calls)
        print(json.dumps({"us": microseconds, "package": phonebind_server.__file__}))
        return 0
    modes = {"off": ("off", None), "on": ("on", None)}
    if options.baseline:
        modes = {
            "before tracing": ("off", os.path.join(options.baseline, "server")),
            **modes,
        }
    results: dict[str, list[float]] = {name: [] for name in modes}
    environment = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    for _ in range(options.rounds):
        for name, (mode, path) in modes.items():
            env = dict(environment)
            if path:
                env["PYTHONPATH"] = path
            answer = subprocess.run(  # noqa: S603 - this script, with our own arguments
                [sys.executable, __file__, "--child", mode, "--calls", str(options.calls)],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,  # the access log
                text=True,
                check=True,
            )
            measured = json.loads(answer.stdout.strip().splitlines()[-1])
            if path and not measured["package"].startswith(path):
                raise SystemExit(f"the baseline ran {measured['package']}, not the code in {path}")
            results[name].append(measured["us"])
    for name, values in results.items():
        spread = ", ".join(f"{value:.1f}" for value in values)
        print(
            f"{name:>15}: median {statistics.median(values):6.1f} µs, least {min(values):6.1f} µs"
            f" CPU per call (rounds: {spread})"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

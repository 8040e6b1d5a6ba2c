"""Where a phonebind server's CPU time goes, by py-spy, under GetAccount or flows.

    .venv/bin/python bench/profile_server.py --backend sqlite --workload get-account
    .venv/bin/python bench/profile_server.py --backend postgresql --workload flow --native

starts a fresh development server (as `make bench` does: INFO log to a file,
file SMS gateway), drives it with h2load (GetAccount on one account) or
phonebind-load (complete flows, closed loop), samples it with `py-spy record`
meanwhile, and prints where the samples fall: by the layer of the innermost
frame that belongs to one (driver, SQL building, store, domain, RPC layer,
logging, metrics, protobuf, gRPC, event loop), and the functions with the most
samples of their own. `--raw PATH` keeps py-spy's collapsed stacks (for a
flame graph: `py-spy record --format speedscope`, or any collapsed-stack tool).
py-spy needs ptrace rights over the server (root, or CAP_SYS_PTRACE).
"""

from __future__ import annotations

import argparse
import collections
import pathlib
import shutil
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import run_bench as bench

# Frames by where they come from, checked from the innermost outwards: a
# sample belongs to the first layer one of its frames is in.
LAYERS = (
    ("access log and logging", ("/logging/", "phonebind_server/logs.py")),
    ("metrics (prometheus_client)", ("prometheus_client/",)),
    ("tracing (OpenTelemetry)", ("opentelemetry/",)),
    ("protobuf", ("google/protobuf/", "_pb2.py")),
    ("database driver (sqlite3, psycopg, pool)", ("sqlite3", "psycopg/", "psycopg_pool/")),
    ("SQL building (peewee)", ("peewee.py", "playhouse/")),
    ("store (repositories, unit of work, engine)", ("phonebind_server/store/",)),
    ("domain (use cases, rules, crypto)", ("phonebind_server/domain/", "hmac.py", "hashlib")),
    ("SMS outbox", ("phonebind_server/sms/",)),
    ("RPC layer (interceptors, servicers, convert)", ("phonebind_server/rpc/",)),
    ("app", ("phonebind_server/",)),
    ("gRPC (grpc.aio, cygrpc)", ("grpc/", "cygrpc", "grpc_")),
    ("asyncio event loop", ("asyncio/", "selectors.py")),
)
OTHER = "other (interpreter, native without Python frames)"
# Innermost native frames of a thread that waits rather than runs (--native
# samples threads blocked in these too: gRPC's pollers, the executor).
WAITING = ("epoll_wait", "epoll_pwait", "poll (", "select (", "pthread_cond_", "sem_wait", "futex")


def layer(frames: list[str]) -> str:
    for frame in reversed(frames):
        for name, marks in LAYERS:
            if any(mark in frame for mark in marks):
                return name
    return OTHER


def read_collapsed(path: pathlib.Path) -> list[tuple[list[str], int]]:
    stacks = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if stack and count.isdigit():
            stacks.append((stack.split(";"), int(count)))
    return stacks


def short(frame: str) -> str:
    """`function (…/site-packages/pkg/mod.py:123)` -> `function (pkg/mod.py)`."""
    name, _, where = frame.partition(" (")
    where = where.rstrip(")").rsplit(":", 1)[0]
    for cut in ("site-packages/", "phonebind/server/", "/lib/python3.11/", "/server/", "/client/"):
        if cut in where:
            where = where.split(cut, 1)[1]
            break
    return f"{name} ({where})" if where else name


def summary(stacks: list[tuple[list[str], int]], top: int = 25) -> dict:
    waiting = sum(count for frames, count in stacks if frames[-1].startswith(WAITING))
    stacks = [(frames, count) for frames, count in stacks if not frames[-1].startswith(WAITING)]
    total = sum(count for _, count in stacks) or 1
    layers: collections.Counter[str] = collections.Counter()
    own: collections.Counter[str] = collections.Counter()
    for frames, count in stacks:
        python = [f for f in frames if not f.startswith(("process ", "thread "))]
        layers[layer(python)] += count
        if python:
            own[short(python[-1])] += count
    return {
        "samples": total,
        "waiting": waiting,
        "layers": [(name, round(100 * n / total, 1)) for name, n in layers.most_common()],
        "functions": [(name, round(100 * n / total, 1)) for name, n in own.most_common(top)],
    }


def render(title: str, result: dict, extra: str = "") -> str:
    out = [
        f"### {title}",
        "",
        f"{result['samples']} samples of running code{extra} "
        f"({result['waiting']} more of threads waiting in epoll/poll/futex, left out).",
        "",
    ]
    out += ["| layer (innermost frame) | share |", "| --- | ---: |"]
    out += [f"| {name} | {share:.1f} % |" for name, share in result["layers"]]
    out += ["", "| function (own samples) | share |", "| --- | ---: |"]
    out += [f"| `{name}` | {share:.1f} % |" for name, share in result["functions"]]
    return "\n".join(out) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", choices=("sqlite", "postgresql"), default="sqlite")
    parser.add_argument("--workload", choices=("get-account", "flow"), default="get-account")
    parser.add_argument("--seconds", type=float, default=20.0, help="profiled seconds")
    parser.add_argument("--rate", type=int, default=200, help="py-spy samples per second")
    parser.add_argument("--native", action="store_true", help="py-spy --native (C frames)")
    parser.add_argument("--database-url", default=bench.DEFAULT_PG)
    parser.add_argument("--raw", help="keep py-spy's collapsed stacks here")
    args = parser.parse_args()
    py_spy = shutil.which("py-spy", path=str(bench.BIN)) or shutil.which("py-spy")
    if not py_spy:
        raise SystemExit("py-spy is missing (pip install py-spy)")

    key = "sqlite" if args.backend == "sqlite" else "postgresql-1"
    config = next(c for c in bench.CONFIGS if c.key == key)
    settings = bench.Settings(args.seconds + 8, 2.0, 16, 8, 4)
    workdir = pathlib.Path(tempfile.mkdtemp(prefix="phonebind-profile-"))
    raw = pathlib.Path(args.raw) if args.raw else workdir / "stacks.txt"
    try:
        with (
            bench.database(config, workdir, args.database_url) as (url, _),
            bench.server(config, url, workdir) as srv,
        ):
            account_id = bench.register_one(srv, workdir)
            body = workdir / "get_account.grpc"
            from phonebind.v1 import binding_service_pb2

            request = binding_service_pb2.GetAccountRequest(account_id=account_id)
            body.write_bytes(bench.grpc_frame(request.SerializeToString()))
            done: dict = {}

            def drive() -> None:
                if args.workload == "get-account":
                    url_ = f"http://127.0.0.1:{srv.port}{bench.GET_ACCOUNT_PATH}"
                    done["load"] = bench.h2load(settings, url_, body)
                else:
                    done["load"] = bench.load(srv, "flow", settings, *srv.code_args())

            driver = threading.Thread(target=drive)
            driver.start()
            time.sleep(settings.warmup + 3)  # warmed up, and flows past their setup
            command = [
                py_spy,
                "record",
                *("--pid", str(srv.process.pid), "--rate", str(args.rate)),
                *("--duration", str(round(args.seconds)), "--format", "raw"),
                *("--output", str(raw)),
            ]
            # Native stacks need the process paused while they are read.
            command.append("--native" if args.native else "--nonblocking")
            subprocess.run(command, check=True, capture_output=True)  # noqa: S603
            driver.join()
    finally:
        stacks = read_collapsed(raw) if raw.exists() else []
        if not args.raw:
            shutil.rmtree(workdir, ignore_errors=True)
    if not stacks:
        raise SystemExit("py-spy recorded nothing")
    load = done.get("load", {})
    rate = load.get("calls_per_s") or load.get("operations", {}).get("per_second")
    title = f"{args.workload} on {args.backend}"
    print(render(title, summary(stacks), f" at {args.rate}/s; load: {rate} per second"))
    return 0


if __name__ == "__main__":
    sys.exit(main())

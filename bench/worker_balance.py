"""How ``uptane director serve --workers N`` spreads new connections over its workers
(issue 12, "Both cores and more machines").

Starts the Director (plain HTTP, or ``--tls``: the operator listener, which needs no
client certificate) over PostgreSQL (a fresh schema), opens ``--connections`` new
keep-alive connections (one after the other, or ``--together``: all at once), one
``GET /health`` on each, holds them open, and reads from the kernel which worker
holds the server end of each (``/proc``). Repeats
``--rounds`` times (all connections closed in between) and prints each round's count
per worker, and ``ratio`` = the fewest any worker got / the most.

    .venv/bin/python bench/worker_balance.py [--workers 2] [--connections 40] [--tls]
"""

from __future__ import annotations

import argparse
import http.client
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from director_throughput import DEFAULT_DB, drop_postgres_schema, fresh_postgres_schema

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from helpers.proc_sockets import connection_owners, stop_group
from proc_cpu import tree_pids

from director.setup import init_director


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--connections", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--tls", action="store_true", help="serve --tls (operator listener)")
    parser.add_argument(
        "--together",
        action="store_true",
        help="open the connections all at once, a thread each (as the check-ins/s lanes)",
    )
    parser.add_argument("--db", default=DEFAULT_DB, help="PostgreSQL URL (a schema is made)")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="worker-balance-"))
    db_url, schema = fresh_postgres_schema(args.db)
    port, operator_port = _free_port(), _free_port()
    command = [sys.executable, "-m", "uptane.cli", "director", "serve", "--dir", str(tmp / "d")]
    command += ["--port", str(port), "--workers", str(args.workers)]
    if args.tls:
        command += ["--tls", "--operator-port", str(operator_port)]
    target = operator_port if args.tls else port
    proc: subprocess.Popen[bytes] | None = None
    try:
        init_director(tmp / "d", db_url=db_url)
        ctx = ssl.create_default_context(cafile=str(tmp / "d" / "tls" / "ca.pem"))

        def connect() -> http.client.HTTPConnection:
            if args.tls:
                return http.client.HTTPSConnection("127.0.0.1", target, context=ctx, timeout=10)
            return http.client.HTTPConnection("127.0.0.1", target, timeout=10)

        log = (tmp / "serve.log").open("wb")
        proc = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        deadline = time.monotonic() + 90
        while True:  # every worker up: as many processes as workers (and the parent)
            if proc.poll() is not None:
                raise SystemExit((tmp / "serve.log").read_text()[-2000:])
            if time.monotonic() > deadline:
                raise SystemExit("the server did not start")
            try:
                c = connect()
                c.request("GET", "/health")
                ok = c.getresponse().status == 200
                c.close()
                if ok and len(list(tree_pids(proc.pid))) > args.workers:
                    break
            except OSError:
                pass
            time.sleep(0.3)
        time.sleep(2.0)  # the last workers' startup
        totals: dict[int, int] = {}
        for r in range(args.rounds):
            conns = [connect() for _ in range(args.connections)]

            def first_request(c: http.client.HTTPConnection) -> None:
                c.request("GET", "/health")
                response = c.getresponse()
                response.read()
                assert response.status == 200

            if args.together:
                with ThreadPoolExecutor(args.connections) as pool:
                    list(pool.map(first_request, conns))
            else:
                for c in conns:
                    first_request(c)
            found = connection_owners(tree_pids(proc.pid), target)
            counts: dict[int, int] = {}
            for c in conns:
                assert c.sock is not None
                pid = found.get(c.sock.getsockname()[1], 0)
                counts[pid] = counts.get(pid, 0) + 1
                totals[pid] = totals.get(pid, 0) + 1
            for c in conns:
                c.close()
            per = sorted(counts.values(), reverse=True)
            print(f"round {r + 1}: {args.connections} connections, per worker {per}")
            time.sleep(0.5)
        per = sorted(totals.values(), reverse=True)
        fewest = per[-1] if len(per) == args.workers else 0
        print(
            f"{'--tls ' if args.tls else ''}--workers {args.workers}: "
            f"{args.rounds * args.connections} connections in all, per worker {per}; "
            f"ratio={fewest / per[0]:.3f} (fewest / most, 1 = even)"
        )
    finally:
        if proc is not None:
            stop_group(proc)
        drop_postgres_schema(db_url, schema)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()

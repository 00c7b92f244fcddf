"""Server CPU per request of the ASGI stacks the Director could run on (issue 12).

A trivial FastAPI endpoint (sync and async handler) served by uvicorn with
h11 on asyncio (the old default), uvicorn with httptools on uvloop (what
``uptane director serve`` uses now) and granian (if installed), each in its
own process, driven over one keep-alive connection by a client in another
process. The figure is the server process tree's CPU time from ``/proc`` per
request; ``ratio`` is against uvicorn h11/asyncio measured in the same run
(below 1: cheaper).

    .venv/bin/python bench/director_http_stacks.py [--requests 3000]
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from proc_cpu import tree_cpu  # bench/ is on sys.path when a bench runs

APP = """
from fastapi import FastAPI
from fastapi.responses import Response

app = FastAPI()


@app.get("/sync")
def sync() -> Response:
    return Response(b"ok", media_type="text/plain")


@app.get("/async")
async def asynchronous() -> Response:
    return Response(b"ok", media_type="text/plain")
"""


def drive(port: int, path: str, n: int) -> None:
    """``n`` sequential GETs on one keep-alive connection (run in a child process)."""
    code = f"""
import http.client, socket
c = http.client.HTTPConnection("127.0.0.1", {port})
c.connect()
c.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
for _ in range({n}):
    c.request("GET", "{path}")
    c.getresponse().read()
"""
    subprocess.run([sys.executable, "-c", code], check=True)


def measure(cmd: list[str], cwd: Path, path: str, n: int) -> float:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [c.replace("PORT", str(port)) for c in cmd]
    proc = subprocess.Popen(
        cmd, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    try:
        for _ in range(300):
            try:
                socket.create_connection(("127.0.0.1", port)).close()
                break
            except OSError:
                time.sleep(0.05)
        drive(port, path, 300)  # warm up
        before = tree_cpu(proc.pid)
        drive(port, path, n)
        return (tree_cpu(proc.pid) - before) / n
    finally:
        os.killpg(proc.pid, 15)
        proc.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=3000)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="http-stacks-"))
    (tmp / "trivial_app.py").write_text(APP)
    py = sys.executable
    uvicorn = [py, "-m", "uvicorn", "trivial_app:app", "--port", "PORT", "--log-level", "warning"]
    stacks = {
        "uvicorn h11/asyncio": [*uvicorn, "--http", "h11", "--loop", "asyncio"],
        "uvicorn httptools/uvloop": [*uvicorn, "--http", "httptools", "--loop", "uvloop"],
    }
    granian = shutil.which("granian", path=os.path.dirname(py))
    if granian:
        stacks["granian (1 worker)"] = [
            granian, "--interface", "asgi", "--port", "PORT", "--workers", "1",
            "--log-level", "warning", "trivial_app:app",
        ]  # fmt: skip
    try:
        for path in ("/sync", "/async"):
            base = None
            for name, cmd in stacks.items():
                cpu = measure(cmd, tmp, path, args.requests)
                base = base or cpu
                print(
                    f"{name:26s} {path:6s} server CPU {cpu * 1000:.3f} ms/request "
                    f"ratio={cpu / base:.2f}"
                )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()

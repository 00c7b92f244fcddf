"""Serving the two mutual-TLS listeners (``serve --tls``), in one process or in N workers.

``serve --tls`` runs the vehicle listener and the operator listener of
``director.tls.listener_configs`` in one uvloop event loop
(``serve_listeners``). With ``--workers N`` (``run_workers``):

- the parent binds both sockets once, then starts N worker processes
  (``python -m director.tls_serve``), each inheriting both listening sockets;
  the kernel hands each new connection to whichever worker accepts it first,
  so one host needs no port per worker and no balancer in front;
- each worker builds its app with ``director.app.app_from_env``, as a plain
  ``--workers N`` worker does: its own database pool, read cache (kept
  current by the database's notifications), ``StaleSigner`` and campaign
  ticker (the vehicle listener's lifespan), and the connection limits of
  ``director.json`` (``DirectorProtocol.configure``), per process;
- SIGTERM or SIGINT (Ctrl-C) to the parent: every worker gets SIGTERM, stops
  accepting, lets the requests in flight finish (uvicorn's graceful shutdown)
  and exits 0; the parent exits 0 only if every worker did;
- a worker that exits without being asked (killed, crashed, failed to start,
  e.g. the database unreachable): the parent stops the others and exits 1
  with a one-line message. It does not restart workers: the process manager
  above it (systemd ``Restart=on-failure``, Kubernetes) restarts the whole
  service, and a crash loop shows as a failed service, not as a healthy parent;
- a worker whose parent is gone (killed with SIGKILL) notices within
  ``PARENT_CHECK_SECONDS`` and stops as on SIGTERM;
- every accepted connection counts against ``max_connections`` from accept to close,
  its TLS handshake included, and the handshake is bounded by ``header_timeout``
  (``director.tls_accept.HandshakeBoundLoop``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import uvicorn
import uvloop

from director.tls_accept import HandshakeBoundLoop
from uptane.errors import ConfigError

PARENT_CHECK_SECONDS = 1.0  # a worker checks this often that its parent still runs
STOP_SECONDS = 30.0  # workers still running this long after SIGTERM are killed
BACKLOG = 2048  # uvicorn's default
DIR_ENV = "UPTANE_DIRECTOR_DIR"
DB_ENV = "UPTANE_DIRECTOR_DB"
# exit codes of a worker asked to stop: 0, or the signal itself when it came before
# the worker installed its handlers (still importing at startup)
_STOPPED = frozenset({0, -signal.SIGTERM, -signal.SIGINT})


class _Server(uvicorn.Server):
    """A uvicorn server that leaves signals to ``serve_listeners`` (which stops every
    server of the process on the first signal; uvicorn's own handler would stop only
    the server that installed it last, and re-raise the signal after shutdown)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def serve_listeners(
    configs: Sequence[uvicorn.Config],
    sockets: Sequence[socket.socket] | None = None,
    parent: int | None = None,
) -> bool:
    """Serve every config in one uvloop event loop, on ``sockets`` (one each) if given,
    until SIGTERM/SIGINT (a second SIGINT cuts connections in flight) or until ``parent``
    is no longer this process's parent. True if every server started and stopped because
    it was asked to; False if one failed or stopped on its own (the others are then
    stopped too)."""
    servers = [_Server(c) for c in configs]
    asked = False

    def stop(force: bool = False) -> None:
        for s in servers:
            s.should_exit = True
            s.force_exit = s.force_exit or force

    async def main() -> bool:
        nonlocal asked
        loop = asyncio.get_running_loop()
        interrupts = 0

        def on_signal(sig: int) -> None:
            nonlocal asked, interrupts
            asked = True
            interrupts += sig == signal.SIGINT
            stop(force=interrupts > 1)

        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, on_signal, sig)
        tasks = [
            asyncio.ensure_future(s.serve(sockets=None if sockets is None else [sockets[i]]))
            for i, s in enumerate(servers)
        ]

        async def watch_parent() -> None:
            nonlocal asked
            while os.getppid() == parent:
                await asyncio.sleep(PARENT_CHECK_SECONDS)
            asked = True
            stop()

        watcher = asyncio.ensure_future(watch_parent()) if parent is not None else None
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        stop()  # one server ended: the others end too
        results = await asyncio.gather(*tasks, return_exceptions=True)
        if watcher is not None:
            watcher.cancel()
        for config, result in zip(configs, results, strict=True):
            if isinstance(result, BaseException):  # e.g. the TLS key does not fit the cert
                text = " ".join(str(result).split()) or type(result).__name__
                print(f"listener on port {config.port}: {text}", file=sys.stderr)
        return all(s.started for s in servers) and not any(
            isinstance(r, BaseException) for r in results
        )

    served = uvloop.run(main(), loop_factory=HandshakeBoundLoop)
    return served and asked


@contextlib.contextmanager
def vehicle_listener(
    app: Any, directory: Path, host: str = "127.0.0.1", revocations: Any = "app"
) -> Iterator[str]:
    """The vehicle listener alone, in a thread on a free port (tests, ``World(tls=True)``):
    ``app`` behind ``ListenerGate(VEHICLE)``, client certificates from the Director CA
    required, revoked ones refused (``revocations`` as for ``listener_configs``); yields
    ``https://host:port``."""
    import threading

    from director.server import DirectorProtocol
    from director.tls import listener_configs, tls_paths

    ca, cert, key = tls_paths(directory)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, 0))
    (config,) = listener_configs(
        app,
        host=host,
        port=sock.getsockname()[1],
        operator_port=0,
        cert=cert,
        key=key,
        ca=ca,
        revocations=revocations,
        http=DirectorProtocol,
        loop="director.tls_accept:HandshakeBoundLoop",
        log_level="warning",
    )[:1]
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        while not server.started:
            if not thread.is_alive():
                raise RuntimeError("TLS listener thread exited before it started")
            threading.Event().wait(0.01)
        yield f"https://{host}:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port`` (SO_REUSEADDR), for the workers to share."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(BACKLOG)
    except OSError as e:
        sock.close()
        raise ConfigError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    return sock


def exit_text(code: int) -> str:
    """``exited with code 3`` or ``was killed by SIGKILL``."""
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


def run_workers(
    workers: int,
    *,
    directory: Path,
    db_url: str | None,
    host: str,
    port: int,
    operator_port: int,
    cert: Path,
    key: Path,
    ca: Path,
    keep_alive: float,
    log_level: str = "info",
) -> str | None:
    """Bind both listeners, run ``workers`` worker processes on them until SIGTERM/SIGINT
    or until one exits; None when every worker stopped cleanly on request, otherwise what
    went wrong (one line)."""
    socks = [bind(host, port), bind(host, operator_port)]
    env = dict(os.environ, **{DIR_ENV: str(Path(directory).resolve())})
    if db_url:
        env[DB_ENV] = db_url
    command = [
        sys.executable,
        "-m",
        "director.tls_serve",
        *("--vehicle-fd", str(socks[0].fileno()), "--operator-fd", str(socks[1].fileno())),
        *("--host", host, "--port", str(port), "--operator-port", str(operator_port)),
        *("--cert", str(cert), "--key", str(key), "--ca", str(ca)),
        *("--keep-alive", str(keep_alive), "--log-level", log_level),
    ]
    stopping = False

    def on_signal(sig: int, frame: Any) -> None:
        nonlocal stopping
        stopping = True

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    procs: list[subprocess.Popen[bytes]] = []
    failure: str | None = None
    try:
        for _ in range(workers):
            if stopping:
                break
            procs.append(subprocess.Popen(command, pass_fds=[s.fileno() for s in socks], env=env))
        for s in socks:
            s.close()  # the workers hold them now
        while not stopping and failure is None:
            for p in procs:
                code = p.poll()
                if code is not None and not (stopping and code in _STOPPED):
                    failure = f"worker {p.pid} {exit_text(code)} while serving; stopped the others"
                    break
            else:
                time.sleep(0.1)
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_SECONDS
        for p in procs:
            try:
                p.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
                failure = failure or f"worker {p.pid} did not stop in {STOP_SECONDS:.0f} s"
        if failure is None:
            bad = [p for p in procs if p.returncode not in _STOPPED]
            if bad:
                failure = f"worker {bad[0].pid} {exit_text(bad[0].returncode)} while stopping"
        return failure
    finally:
        for s in socks:
            s.close()
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def worker_main(argv: Sequence[str] | None = None) -> int:
    """One worker process of ``run_workers``: the app of ``app_from_env`` behind both
    listeners, on the inherited sockets. 0 when stopped by a signal or by its parent's end."""
    parser = argparse.ArgumentParser(prog="python -m director.tls_serve")
    parser.add_argument("--vehicle-fd", type=int, required=True)
    parser.add_argument("--operator-fd", type=int, required=True)
    parser.add_argument("--host", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--operator-port", type=int, required=True)
    parser.add_argument("--cert", type=Path, required=True)
    parser.add_argument("--key", type=Path, required=True)
    parser.add_argument("--ca", type=Path, required=True)
    parser.add_argument("--keep-alive", type=float, required=True)
    parser.add_argument("--log-level", default="info")
    args = parser.parse_args(argv)
    parent = os.getppid()
    sockets = [socket.socket(fileno=args.vehicle_fd), socket.socket(fileno=args.operator_fd)]
    from director.app import app_from_env
    from director.db_url import database_error_text
    from director.server import DirectorProtocol
    from director.tls import listener_configs
    from uptane.cli import error_text

    try:
        app = app_from_env()  # also DirectorProtocol.configure(the connection limits)
    except Exception as e:
        text = database_error_text(e) or error_text(e)
        if text is None:
            raise
        print(f"director worker {os.getpid()}: {text}", file=sys.stderr)
        return 1
    configs = listener_configs(
        app,
        host=args.host,
        port=args.port,
        operator_port=args.operator_port,
        cert=args.cert,
        key=args.key,
        ca=args.ca,
        http=DirectorProtocol,
        timeout_keep_alive=args.keep_alive,
        log_level=args.log_level,
        access_log=False,
    )
    return 0 if serve_listeners(configs, sockets, parent=parent) else 1


if __name__ == "__main__":
    sys.exit(worker_main())

"""``serve --workers N``: N worker processes on one host, plain HTTP or mutual TLS
(issue 12, "Both cores and more machines").

The parent binds every listening socket before any worker starts (a port taken is
one line, and nothing starts), then runs N worker processes (``python -m
director.workers``), each serving the app of ``director.app.app_from_env`` (its own
database pool, read cache, ``StaleSigner``, campaign ticker and connection limits)
on the sockets it was handed (``director.tls_serve.serve_listeners``).

Where SO_REUSEPORT exists (Linux), each worker gets its OWN listening socket per
listener, all bound to the same address with SO_REUSEPORT: the kernel spreads new
connections over the sockets by a hash of the connection's addresses and ports, so
each worker gets about 1/N of them. On one socket shared by every worker (the
fallback elsewhere) the kernel wakes whichever worker waits in ``accept`` and, on
Linux, one busy worker may take most connections: a worker at its ``max_connections``
then refuses connections the other could serve, and keep-alive clients may all land
on one core. The kernel admits a socket to a SO_REUSEPORT group only from the same
user; the parent first binds the address without SO_REUSEPORT, so it never joins a
group another server already listens with.

Process management (same for both modes):

- SIGTERM or SIGINT (Ctrl-C) to the parent: every worker gets SIGTERM, stops
  accepting, lets the requests in flight finish (uvicorn's graceful shutdown) and
  exits 0; the parent exits 0 only if every worker did;
- a worker that exits without being asked (killed, crashed, failed to start, e.g.
  the database unreachable): the parent stops the others and exits 1 with a
  one-line message. It does not restart workers: the process manager above it
  (systemd ``Restart=on-failure``, Kubernetes) restarts the whole service, and a
  crash loop shows as a failed service, not as a healthy parent;
- a worker whose parent is gone (killed with SIGKILL) notices within
  ``PARENT_CHECK_SECONDS`` and stops as on SIGTERM.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from uptane.errors import ConfigError

STOP_SECONDS = 30.0  # workers still running this long after SIGTERM are killed
BACKLOG = 2048  # uvicorn's default
DIR_ENV = "UPTANE_DIRECTOR_DIR"
DB_ENV = "UPTANE_DIRECTOR_DB"
# exit codes of a worker asked to stop: 0, or the signal itself when it came before
# the worker installed its handlers (still importing at startup)
_STOPPED = frozenset({0, -signal.SIGTERM, -signal.SIGINT})


def reuseport_available() -> bool:
    """Whether each worker can have its own listening socket on one port, the kernel
    spreading connections over them (SO_REUSEPORT on Linux; elsewhere the option may
    exist without the spreading, e.g. on the BSDs the last socket bound takes all)."""
    return sys.platform.startswith("linux") and hasattr(socket, "SO_REUSEPORT")


def _socket(host: str) -> socket.socket:
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    return sock


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port`` (SO_REUSEADDR), for the workers to share."""
    sock = _socket(host)
    try:
        sock.bind((host, port))
        sock.listen(BACKLOG)
    except OSError as e:
        sock.close()
        raise ConfigError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    return sock


def bind_group(host: str, port: int, count: int) -> list[socket.socket]:
    """``count`` listening sockets on ``host:port`` with SO_REUSEPORT, one per worker
    (``port`` 0: the port the first one got). The address is first bound without
    SO_REUSEPORT, so a port where anything listens (even another SO_REUSEPORT group
    of this user, which would otherwise be joined and share the connections) is a
    ``ConfigError`` and nothing is left bound."""
    probe = _socket(host)
    try:
        probe.bind((host, port))
        port = probe.getsockname()[1]
    except OSError as e:
        raise ConfigError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    finally:
        probe.close()
    socks: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = _socket(host)
            socks.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind((host, port))
            sock.listen(BACKLOG)
    except OSError as e:
        for s in socks:
            s.close()
        raise ConfigError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    return socks


def listen(host: str, ports: Sequence[int], workers: int) -> list[list[socket.socket]]:
    """For each worker, its listening socket of each of ``ports``: its own (SO_REUSEPORT,
    ``reuseport_available``) or one per port shared by every worker."""
    per_port: list[list[socket.socket]] = []
    try:
        for port in ports:
            if reuseport_available():
                per_port.append(bind_group(host, port, workers))
            else:
                per_port.append([bind(host, port)] * workers)
    except ConfigError:
        for group in per_port:
            for s in group:
                s.close()
        raise
    return [[group[i] for group in per_port] for i in range(workers)]


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
    ports: Sequence[int],
    options: Sequence[str],
) -> str | None:
    """Bind ``ports`` on ``host`` (``listen``), run ``workers`` worker processes
    (``worker_main`` with ``options`` and the sockets' descriptors) until SIGTERM/SIGINT
    or until one exits; None when every worker stopped cleanly on request, otherwise
    what went wrong (one line). ``ConfigError`` if a port cannot be bound."""
    sockets = listen(host, ports, workers)
    env = dict(os.environ, **{DIR_ENV: str(Path(directory).resolve())})
    if db_url:
        env[DB_ENV] = db_url
    stopping = False

    def on_signal(sig: int, frame: Any) -> None:
        nonlocal stopping
        stopping = True

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    procs: list[subprocess.Popen[bytes]] = []
    failure: str | None = None
    try:
        for socks in sockets:
            if stopping:
                break
            fds = [s.fileno() for s in socks]
            command = [sys.executable, "-m", "director.workers", *options]
            command += ["--host", host, "--fds", ",".join(map(str, fds))]
            procs.append(subprocess.Popen(command, pass_fds=fds, env=env))
        for socks in sockets:
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
        for socks in sockets:
            for s in socks:
                s.close()
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def worker_main(argv: Sequence[str] | None = None) -> int:
    """One worker process of ``run_workers``: the app of ``app_from_env`` on the
    inherited sockets, plain HTTP (one socket) or both TLS listeners (``--tls``: the
    vehicle's, then the operator's). 0 when stopped by a signal or by its parent's end."""
    parser = argparse.ArgumentParser(prog="python -m director.workers")
    parser.add_argument("--fds", required=True, help="the listening sockets, comma-separated")
    parser.add_argument("--host", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--tls", action="store_true")
    parser.add_argument("--operator-port", type=int)
    parser.add_argument("--cert", type=Path)
    parser.add_argument("--key", type=Path)
    parser.add_argument("--ca", type=Path)
    parser.add_argument("--keep-alive", type=float, required=True)
    parser.add_argument("--log-level", default="info")
    args = parser.parse_args(argv)
    parent = os.getppid()
    sockets = [socket.socket(fileno=int(fd)) for fd in args.fds.split(",")]
    import uvicorn

    from director.app import app_from_env
    from director.db_url import database_error_text
    from director.server import DirectorProtocol
    from director.tls import listener_configs
    from director.tls_serve import serve_listeners
    from uptane.cli import error_text

    try:
        app = app_from_env()  # also DirectorProtocol.configure(the connection limits)
    except Exception as e:
        text = database_error_text(e) or error_text(e)
        if text is None:
            raise
        print(f"director worker {os.getpid()}: {text}", file=sys.stderr)
        return 1
    options: dict[str, Any] = {
        "http": DirectorProtocol,
        "timeout_keep_alive": args.keep_alive,
        "log_level": args.log_level,
        "access_log": False,
    }
    if args.tls:
        configs = listener_configs(
            app,
            host=args.host,
            port=args.port,
            operator_port=args.operator_port,
            cert=args.cert,
            key=args.key,
            ca=args.ca,
            **options,
        )
    else:
        configs = [uvicorn.Config(app, host=args.host, port=args.port, **options)]
    return 0 if serve_listeners(configs, sockets, parent=parent) else 1


if __name__ == "__main__":
    sys.exit(worker_main())

"""HTTP serving of an Image repository (DESIGN 1, 6).

A read-only ASGI app (starlette) that serves ``DIR/metadata/...`` under
``/metadata/`` and the hash-prefixed images in ``DIR/targets/...`` under
``/targets/``, which is what a python-tuf ngclient ``Updater`` with
``prefix_targets_with_hash`` asks for. Nothing else is reachable: the path
must be plain segments (no ``..``, no hidden files such as in-progress atomic
writes, no backslashes) and must resolve to a regular file inside its
directory, so symlinks cannot lead out either. Anything else is a 404.
"""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Final

import uvicorn
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp

from image_repo.layout import METADATA_DIR, TARGETS_DIR

DEFAULT_HOST: Final = "127.0.0.1"
DEFAULT_PORT: Final = 8001
MAX_FILE_SIZE: Final = 256 * 1024 * 1024


def safe_file(base: Path, relpath: str) -> Path | None:
    """The regular file ``relpath`` names inside ``base``, or None.

    ``base`` must be resolved. Refuses empty, ``.``/``..`` and hidden segments,
    backslashes and NUL, and anything that resolves outside ``base``.
    """
    if not relpath or "\\" in relpath or "\x00" in relpath:
        return None
    if any(not seg or seg.startswith(".") for seg in relpath.split("/")):
        return None
    try:
        path = (base / relpath).resolve(strict=True)
    except (OSError, RuntimeError):
        return None
    if not path.is_relative_to(base) or not path.is_file():
        return None
    return path


def _read(path: Path) -> bytes | None:
    """Read a file as one snapshot: length and bytes come from the same open."""
    try:
        with path.open("rb") as f:
            if os.fstat(f.fileno()).st_size > MAX_FILE_SIZE:
                return None
            return f.read()
    except OSError:
        return None


def create_app(repo_dir: str | os.PathLike[str]) -> Starlette:
    """The ASGI app serving repository ``repo_dir`` (GET and HEAD only)."""
    root = Path(repo_dir).resolve()
    bases = {"metadata": root / METADATA_DIR, "targets": root / TARGETS_DIR}
    media = {"metadata": "application/json", "targets": "application/octet-stream"}

    def handler(kind: str) -> Callable[[Request], Awaitable[Response]]:
        base = bases[kind].resolve()

        async def serve_file(request: Request) -> Response:
            path = safe_file(base, request.path_params["path"])
            data = None if path is None else await run_in_threadpool(_read, path)
            if data is None:
                return PlainTextResponse("not found", status_code=404)
            headers = {"Cache-Control": "no-cache"} if kind == "metadata" else {}
            # Response sets content-length from the bytes actually sent.
            return Response(data, media_type=media[kind], headers=headers)

        return serve_file

    routes = [
        Route(f"/{kind}/{{path:path}}", handler(kind), methods=["GET", "HEAD"]) for kind in bases
    ]
    return Starlette(routes=routes)


def serve(
    repo_dir: str | os.PathLike[str], host: str = DEFAULT_HOST, port: int = DEFAULT_PORT
) -> None:
    """Serve ``repo_dir`` with uvicorn until interrupted (loopback by default)."""
    uvicorn.run(create_app(repo_dir), host=host, port=port, log_level="info")


@contextmanager
def serve_in_thread(
    repo_dir: str | os.PathLike[str], host: str = DEFAULT_HOST, port: int = 0
) -> Iterator[str]:
    """Serve ``repo_dir`` from a background thread; yields the base URL.

    ``port=0`` picks a free port. For the demo, the simulator and tests.
    """
    with running_app(create_app(repo_dir), host, port) as url:
        yield url


@contextmanager
def running_app(app: ASGIApp, host: str = DEFAULT_HOST, port: int = 0) -> Iterator[str]:
    """Run any ASGI ``app`` under uvicorn in a thread; yields ``http://host:port``."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    bound_port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        while not server.started:
            if not thread.is_alive():
                raise RuntimeError("server thread exited before it started")
            threading.Event().wait(0.01)
        yield f"http://{host}:{bound_port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()

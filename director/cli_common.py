"""Options and helpers shared by the Director's command modules (``director.cli``,
``director.fleet_cli``), kept apart so that either can be imported first.

Nothing heavy is imported here: ``--help`` stays quick.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click

from director.db_url import SUPPORTED_DATABASES, check_db_url, database_error_text

if TYPE_CHECKING:
    from director.config import DirectorConfig

F = TypeVar("F", bound=Callable[..., Any])
DIR_ENV = "UPTANE_DIRECTOR_DIR"


class _DirCommand(click.Command):
    """A command whose first argument DIR may also be given as ``--dir DIR``."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        args = list(args)
        for i, arg in enumerate(args):
            if arg == "--":
                break
            if arg == "--dir" and i + 1 < len(args):
                value = args[i + 1]
                del args[i : i + 2]
                args.insert(0, value)
                break
            if arg.startswith("--dir="):
                del args[i]
                args.insert(0, arg[len("--dir=") :])
                break
        return super().parse_args(ctx, args)


def _dir_option(f: F) -> F:
    """DIR, the Director directory (first argument; ``--dir DIR`` is accepted too)."""
    return click.argument(
        "directory",
        metavar="DIR",
        type=click.Path(file_okay=False, path_type=Path),
        envvar=DIR_ENV,
    )(f)


def _db_option(f: F) -> F:
    return click.option(
        "--db",
        "db_url",
        default=None,
        metavar="URL",
        help=f"Database URL ({SUPPORTED_DATABASES}; default: from director.json).",
    )(f)


def _load(directory: Path, db_url: str | None) -> DirectorConfig:
    from director.config import DirectorConfig

    config = DirectorConfig.load(directory)
    if db_url:
        check_db_url(db_url)
        config.db_url = db_url
    return config


def _open(directory: Path, db_url: str | None) -> Any:
    """The ``Director`` of DIR, with database errors naming the URL."""
    from director.service import Director

    config = _load(directory, db_url)
    try:
        return Director.from_config(config)
    except Exception as e:
        text = database_error_text(e, config.db_url)
        if text is None:
            raise
        raise click.ClickException(text) from None


def _jsonable(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


def is_loopback(host: str) -> bool:
    """Whether every address ``host`` names is a loopback address (127/8, ::1)."""
    import ipaddress
    import socket

    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None)
    except OSError:
        return False
    return bool(infos) and all(ipaddress.ip_address(i[4][0]).is_loopback for i in infos)


def check_plain_http(host: str, insecure: bool) -> None:
    """Refuse plain HTTP on an address other hosts can reach, unless asked (issue 12).

    Without TLS any client reads any vehicle's metadata, and the operator
    token and issued certificate keys cross the network in clear: plain HTTP
    is for the demo and tests on loopback.
    """
    if not insecure and not is_loopback(host):
        raise click.ClickException(
            f"plain HTTP on {host} would let anyone on the network read every vehicle's "
            "metadata and the operator token: use --tls, bind 127.0.0.1, or pass "
            "--insecure-plain-http"
        )

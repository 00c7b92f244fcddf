"""Database URLs of the Director: what is supported, and operator mistakes as one line."""

from __future__ import annotations

import sys

from uptane.cli import one_line

SUPPORTED_DATABASES = "sqlite:///PATH or postgresql+psycopg://USER@HOST/DB"


def _hide_password(url: str) -> str:
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return url


def database_error_text(e: BaseException, url: str | None = None) -> str | None:
    """One line for a database URL or connection problem, None if ``e`` is not one."""
    sa_exc = sys.modules.get("sqlalchemy.exc")
    where = f" {_hide_password(url)}" if url else ""
    if sa_exc is not None:
        if isinstance(e, sa_exc.NoSuchModuleError):  # an ArgumentError too
            return f"unsupported database{where}: use {SUPPORTED_DATABASES}"
        if isinstance(e, sa_exc.ArgumentError):
            return f"invalid database URL{where}: {one_line(str(e))}; use {SUPPORTED_DATABASES}"
        if isinstance(e, sa_exc.DBAPIError | sa_exc.OperationalError):
            orig = getattr(e, "orig", None) or e
            first = str(orig).strip().splitlines()[0] if str(orig).strip() else type(e).__name__
            return (
                f"cannot use the database{where}: {first} (is it running? the URL is --db "
                "or db_url in director.json)"
            )
    if isinstance(e, ModuleNotFoundError):
        return (
            f"no driver for the database{where} (module {e.name} is not installed); "
            f"use {SUPPORTED_DATABASES}"
        )
    return None


def check_db_url(url: str) -> None:
    """Raise ``ConfigError`` unless ``url`` parses and its driver is installed (no connection)."""
    from director.db import make_engine
    from uptane.errors import ConfigError

    try:
        make_engine(url).dispose()
    except Exception as e:
        text = database_error_text(e, url)
        if text is None:
            raise
        raise ConfigError(text) from None

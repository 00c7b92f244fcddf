"""The ``uptane`` console script, and the one-line error style its parts share.

Each part of the project (image repository, Director, ECU simulator, demo)
registers a click group under the ``uptane.commands`` entry point group in
``pyproject.toml``; this module only collects them, so the core library never
imports the parts that build on it. ``uptane --help`` lists the parts without
importing them (their one-line summaries are below), so it starts fast.

Every part's group is a ``PartGroup``: an operator mistake (a typed project
error, an unreadable or unwritable path) becomes one line ``Error: ...`` and
exit status 1, never a traceback.
"""

from __future__ import annotations

import logging
from importlib.metadata import entry_points
from typing import Any

import click

#: One-line summaries for ``uptane --help``; a part not listed here is loaded to get its own.
PART_SUMMARIES: dict[str, str] = {
    "demo": "Update a simulated vehicle end to end, then attack it.",
    "director": "The Director repository: inventory, assignments, per-vehicle metadata.",
    "ecu": "Run a primary or a secondary ECU on a CAN bus.",
    "image-repo": "Manage an Uptane Image repository (offline keys, suppliers).",
    "sim": "Run a fleet of simulated vehicles through updates and faults.",
}


def os_error_text(e: OSError) -> str:
    """An ``OSError`` as one line naming the path: ``cannot write x: Permission denied``."""
    what = e.strerror or str(e) or type(e).__name__
    if e.filename is not None:
        return f"{e.filename}: {what}"
    return what


def one_line(text: str) -> str:
    """``text`` on one line (wasmtime and database drivers write multi-line messages)."""
    return " ".join(part.strip() for part in str(text).splitlines() if part.strip())


def check_listen(host: str, port: int) -> None:
    """Raise a one-line ``ClickException`` if a server could not listen on ``host:port``."""
    import socket

    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((host, port))
    except OSError as e:
        raise click.ClickException(
            f"cannot listen on {host}:{port}: {e.strerror or e} (choose another --port or --host)"
        ) from None


def error_text(e: BaseException) -> str | None:
    """The message for an operator mistake, or None if ``e`` is a bug (let it raise)."""
    from uptane.errors import UptaneError  # imports tuf: only when an error happens

    if isinstance(e, UptaneError):
        return one_line(str(e))
    if isinstance(e, OSError):
        return one_line(os_error_text(e))
    return None


class UsageLine(click.ClickException):
    """A command-line mistake as one line naming the option, with the exit status 2."""

    exit_code = 2

    def __init__(self, error: click.UsageError) -> None:
        hint = f" (see '{error.ctx.command_path} --help')" if error.ctx is not None else ""
        super().__init__(one_line(error.format_message()) + hint)


class PartGroup(click.Group):
    """A part's click group: operator mistakes become ``Error: ...`` and exit 1.

    Subclasses extend ``error_text`` for errors of their own libraries.
    """

    def error_text(self, e: BaseException) -> str | None:
        return error_text(e)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except click.UsageError as e:
            raise UsageLine(e) from None
        except (click.exceptions.ClickException, click.exceptions.Exit, click.Abort):
            raise
        except Exception as e:
            text = self.error_text(e)
            if text is None:
                raise
            raise click.ClickException(text) from None


class _PartsGroup(PartGroup):
    """A group whose sub-commands are loaded from entry points on demand."""

    def _entries(self) -> dict[str, Any]:
        return {ep.name: ep for ep in entry_points(group="uptane.commands")}

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(set(super().list_commands(ctx)) | set(self._entries()))

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        cmd = super().get_command(ctx, cmd_name)
        if cmd is not None:
            return cmd
        ep = self._entries().get(cmd_name)
        if ep is None:
            return None
        loaded = ep.load()
        if not isinstance(loaded, click.Command):
            raise click.ClickException(f"entry point {cmd_name!r} is not a click command")
        return loaded

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        """List the parts without importing the ones whose summary is known."""
        rows = []
        for name in self.list_commands(ctx):
            summary = PART_SUMMARIES.get(name)
            if summary is None:
                cmd = self.get_command(ctx, name)
                if cmd is None or cmd.hidden:
                    continue
                summary = cmd.get_short_help_str(limit=formatter.width)
            rows.append((name, summary))
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)


@click.group(cls=_PartsGroup)
@click.option("-v", "--verbose", count=True, help="More logging (-v info, -vv debug).")
def cli(verbose: int) -> None:
    """Uptane software updates for vehicles whose ECU logic is WebAssembly.

    Start with `uptane demo`; the README's "Running the parts" and docs/
    describe each part.
    """
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")


def main() -> None:
    """Console entry point: operator mistakes become a one-line message."""
    try:
        # standalone_mode=False returns what ``ctx.exit(code)`` asked for
        rc = cli(standalone_mode=False)
    except click.exceptions.Abort:
        raise SystemExit(1) from None
    except click.ClickException as e:
        e.show()
        raise SystemExit(e.exit_code) from None
    except SystemExit:
        raise
    except Exception as e:
        text = error_text(e)
        if text is None:
            raise
        click.echo(f"Error: {text}", err=True)
        raise SystemExit(1) from None
    raise SystemExit(rc if isinstance(rc, int) else 0)


if __name__ == "__main__":
    main()

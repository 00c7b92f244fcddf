"""The ``uptane`` console script.

Each part of the project (image repository, Director, ECU simulator, demo)
registers a click group under the ``uptane.commands`` entry point group in
``pyproject.toml``; this module only collects them, so the core library never
imports the parts that build on it.
"""

from __future__ import annotations

import logging
from importlib.metadata import entry_points

import click

from uptane.errors import UptaneError


class _PartsGroup(click.Group):
    """A group whose sub-commands are loaded from entry points on demand."""

    def _entries(self) -> dict[str, object]:
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
        loaded = ep.load()  # type: ignore[attr-defined]
        if not isinstance(loaded, click.Command):
            raise click.ClickException(f"entry point {cmd_name!r} is not a click command")
        return loaded


@click.group(cls=_PartsGroup)
@click.option("-v", "--verbose", count=True, help="More logging (-v info, -vv debug).")
def cli(verbose: int) -> None:
    """Uptane software updates for vehicles whose ECU logic is WebAssembly."""
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")


def main() -> None:
    """Console entry point: typed project errors become a one-line message."""
    try:
        # standalone_mode=False returns what ``ctx.exit(code)`` asked for
        rc = cli(standalone_mode=False)
    except click.exceptions.Abort:
        raise SystemExit(1) from None
    except click.ClickException as e:
        e.show()
        raise SystemExit(e.exit_code) from None
    except UptaneError as e:
        click.echo(f"error: {e}", err=True)
        raise SystemExit(1) from None
    except SystemExit:
        raise
    raise SystemExit(rc if isinstance(rc, int) else 0)


if __name__ == "__main__":
    main()

"""``uptane director campaign|quarantine|attributes|health|audit``: fleet rollout control.

Issue 14. Like the other Director commands these open the database named in
``DIR/director.json`` (or ``--db``) directly. Campaign documents are JSON or
YAML files (``director.campaign_spec``). Refusals are one-line errors
(``uptane.cli.main`` prints typed errors; ``click.ClickException`` here).
"""

from __future__ import annotations

import getpass
import json
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from director.campaign_file import read_campaign_file
from director.cli_common import _db_option, _dir_option, _DirCommand, _jsonable, _load

if TYPE_CHECKING:
    from director.campaigns import CampaignInfo
    from director.service import Director


class _FleetGroup(click.Group):
    """A group of Director commands: DIR first, ``--dir DIR`` accepted too."""

    command_class = _DirCommand


@contextmanager
def _director(directory: Path, db_url: str | None) -> Iterator[Director]:
    from director.service import Director

    director = Director.from_config(_load(directory, db_url))
    try:
        yield director
    finally:
        director.close()


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "operator"


def _by_option(f: Callable[..., Any]) -> Callable[..., Any]:
    return click.option(
        "--by", "actor", default=None, help="Who does this (audit log; default: your user)."
    )(f)


def _print(c: CampaignInfo, as_json: bool) -> None:
    if as_json:
        out = _jsonable(asdict(c))
        out["totals"] = c.totals()
        click.echo(json.dumps(out, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    images = ", ".join(f"{hw}={img}" for hw, img in sorted(c.images.items()))
    click.echo(f"campaign {c.name}: {c.status}, phase {c.phase_name} since {c.phase_started_at}")
    click.echo(f"images: {images}; target group: {c.group_size} vehicles")
    if c.halt_reason:
        click.echo(f"halted: {c.halt_reason}")
    table = Table("phase", "target", "assigned", "installed", "install failures", "rollbacks")
    table.add_column("health failures")
    table.add_column("deferred")
    table.add_column("declined")
    for p in c.progress:
        mark = "> " if p.index == c.phase else "  "
        table.add_row(
            mark + p.name,
            *(
                str(v)
                for v in (
                    p.target,
                    p.assigned,
                    p.installed,
                    p.install_failures,
                    p.rollbacks,
                    p.health_failures,
                    p.deferred,
                    p.declined,
                )
            ),
        )
    Console(file=sys.stdout, width=None if sys.stdout.isatty() else 200).print(table)


@click.group("campaign", cls=_FleetGroup)
def campaign_cli() -> None:
    """Phased rollouts with automatic halt: create, list, show, pause, resume, abort."""


@campaign_cli.command("create")
@_dir_option
@_db_option
@_by_option
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def create_cmd(
    directory: Path, db_url: str | None, actor: str | None, file: Path, as_json: bool
) -> None:
    """Create a campaign from FILE (JSON or YAML) and start its first phase."""
    doc = read_campaign_file(file)
    with _director(directory, db_url) as director:
        c = director.create_campaign(doc, actor=actor or _user())
    _print(c, as_json)


@campaign_cli.command("list")
@_dir_option
@_db_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def list_cmd(directory: Path, db_url: str | None, as_json: bool) -> None:
    """Every campaign: status, phase, counts."""
    with _director(directory, db_url) as director:
        campaigns = director.list_campaigns()
    if as_json:
        click.echo(json.dumps([_jsonable(asdict(c)) for c in campaigns], indent=2))
        return
    for c in campaigns:
        t = c.totals()
        click.echo(
            f"{c.name}: {c.status}, phase {c.phase + 1}/{len(c.phases)} ({c.phase_name}), "
            f"{t['assigned']} assigned, {t['installed']} installed, "
            f"{t['install_failures']} install failures, {t['rollbacks']} rollbacks, "
            f"{t['health_failures']} health failures, {t['deferred']} deferred, "
            f"{t['declined']} declined"
        )


@campaign_cli.command("show")
@_dir_option
@_db_option
@click.argument("name")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def show_cmd(directory: Path, db_url: str | None, name: str, as_json: bool) -> None:
    """One campaign with its progress per phase."""
    with _director(directory, db_url) as director:
        c = director.campaign(name)
    _print(c, as_json)


def _control(action: str) -> click.Command:
    @_dir_option
    @_db_option
    @_by_option
    @click.argument("name")
    def cmd(directory: Path, db_url: str | None, actor: str | None, name: str) -> None:
        with _director(directory, db_url) as director:
            c = getattr(director, f"{action}_campaign")(name, actor=actor or _user())
        click.echo(f"campaign {c.name}: {c.status}")

    cmd.__doc__ = {
        "pause": "Stop advancing and assigning until resumed.",
        "resume": "Resume a paused campaign (its phase runs its full duration again).",
        "abort": "End a campaign, withdrawing its assignments not installed yet.",
    }[action]
    return click.command(action, cls=_DirCommand)(cmd)


for _action in ("pause", "resume", "abort"):
    campaign_cli.add_command(_control(_action))


@campaign_cli.command("tick")
@_dir_option
@_db_option
def tick_cmd(directory: Path, db_url: str | None) -> None:
    """Advance or halt campaigns now (the server does this periodically)."""
    with _director(directory, db_url) as director:
        changed = director.tick()
    for c in changed:
        click.echo(f"campaign {c.name}: {c.status}, phase {c.phase_name}")


@click.group("quarantine", cls=_FleetGroup)
def quarantine_cli() -> None:
    """Vehicles held back from rollouts: list and release."""


@quarantine_cli.command("list")
@_dir_option
@_db_option
@click.option("--all", "include_released", is_flag=True, help="Released ones too.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def quarantine_list_cmd(
    directory: Path, db_url: str | None, include_released: bool, as_json: bool
) -> None:
    """Quarantined vehicles with the reason."""
    with _director(directory, db_url) as director:
        entries = director.list_quarantined(include_released=include_released)
    if as_json:
        click.echo(json.dumps([_jsonable(asdict(q)) for q in entries], indent=2))
        return
    for q in entries:
        released = f" (released {q.released_at} by {q.released_by})" if q.released_at else ""
        click.echo(f"{q.vin}: {q.reason} since {q.since}: {q.detail}{released}")


@quarantine_cli.command("release")
@_dir_option
@_db_option
@_by_option
@click.argument("vin")
@click.option("--note", default="", help="Why (audit log).")
def quarantine_release_cmd(
    directory: Path, db_url: str | None, actor: str | None, vin: str, note: str
) -> None:
    """Release VIN from quarantine (written to the audit log)."""
    with _director(directory, db_url) as director:
        q = director.release_quarantine(vin, actor=actor or _user(), note=note)
    click.echo(f"released {q.vin} ({q.reason}) by {q.released_by}")


@click.command("attributes", cls=_DirCommand)
@_dir_option
@_db_option
@click.argument("vin")
@click.argument("pairs", nargs=-1, metavar="NAME=VALUE...")
def attributes_cmd(directory: Path, db_url: str | None, vin: str, pairs: tuple[str, ...]) -> None:
    """Set vehicle attributes campaign targets filter on (NAME= removes one)."""
    attrs: dict[str, str | None] = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep:
            raise click.BadParameter(f"{pair!r}: expected NAME=VALUE")
        attrs[name] = value or None
    with _director(directory, db_url) as director:
        result = director.set_vehicle_attributes(vin, attrs)
    click.echo(" ".join(f"{k}={v}" for k, v in sorted(result.items())) or "(no attributes)")


@click.command("health", cls=_DirCommand)
@_dir_option
@_db_option
@click.argument("vin")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def health_cmd(directory: Path, db_url: str | None, vin: str, as_json: bool) -> None:
    """The health each ECU of VIN last put in its signed report."""
    with _director(directory, db_url) as director:
        health = director.ecu_health(vin)
    if as_json:
        click.echo(json.dumps(_jsonable(health), indent=2))
        return
    for serial, h in sorted(health.items()):
        counts = ", ".join(
            f"{what} {k}={v}"
            for what, key in (("denied", "capability_denials"), ("rollbacks", "rollbacks"))
            for k, v in sorted(h[key].items())
        )
        click.echo(
            f"{serial}: {h['status']} running {h['payload'] or 'nothing'}, traps {h['traps']}"
            + (f", {counts}" if counts else "")
        )


@click.command("audit", cls=_DirCommand)
@_dir_option
@_db_option
@click.option("--limit", type=click.IntRange(1, 1000), default=50, show_default=True)
@click.option(
    "--only",
    type=click.Choice(["fleet", "checks"]),
    default=None,
    help="fleet: campaigns and quarantine; checks: counter resets and certificates.",
)
def audit_cmd(directory: Path, db_url: str | None, limit: int, only: str | None) -> None:
    """The latest operator actions, newest first: campaigns and quarantine
    (``GET /api/audit/fleet``), counter resets and vehicle certificates issued or
    revoked (``GET /api/audit``), in one list."""
    lines: list[tuple[Any, int, str]] = []  # (when, order within its log, line)
    with _director(directory, db_url) as director:
        if only != "checks":
            for i, e in enumerate(director.fleet_audit_log(limit)):
                text = f"{e['actor']} {e['action']} {e['subject']}: {e['detail']}"
                lines.append((e["at"], -i, text))
        if only != "fleet":
            for i, a in enumerate(director.audit_log(limit)):
                subject = "/".join(p for p in (a.vin, a.ecu_serial) if p) or "-"
                lines.append((a.at, -i, f"{a.actor} {a.action} {subject}: {dict(a.detail)}"))
    lines.sort(key=lambda line: (line[0], line[1]), reverse=True)
    for at, _, text in lines[:limit]:
        click.echo(f"{at.isoformat()} {text}")


COMMANDS: tuple[click.Command, ...] = (
    campaign_cli,
    quarantine_cli,
    attributes_cmd,
    health_cmd,
    audit_cmd,
)

"""``uptane demo``: the whole system on one machine, in well under a minute.

The demo's modules (servers, ECUs, scenarios) are imported when it runs, so
``--help`` is quick.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import click

if TYPE_CHECKING:
    from rich.console import Console

    from ecus.sim.scenarios import Scenario

#: Output width when not on a terminal (CI, pipes): the tables fit in it.
WIDTH = 100


class DemoFailed(click.ClickException):
    """An expected outcome did not happen (exit status 1)."""

    exit_code = 1


def scenario(name: str) -> Scenario:
    """The scenario called ``name`` (``ecus.sim.scenarios.scenario``)."""
    from ecus.sim.scenarios import scenario as lookup

    return lookup(name)


def _console() -> Console:
    from rich.console import Console

    console = Console(highlight=False)
    if not console.is_terminal:  # CI, pipes: the tables fit in WIDTH columns
        console = Console(highlight=False, width=WIDTH)
    return console


def _scenario_names(value: str | None) -> tuple[str, ...] | None:
    if value is None:
        return None
    names = tuple(n.strip() for n in value.split(",") if n.strip())
    if not names:
        raise click.BadParameter("give at least one scenario name", param_hint="--scenarios")
    unknown = []
    for name in names:
        try:
            scenario(name)
        except (KeyError, ValueError):
            unknown.append(name)
    if unknown:
        raise click.BadParameter(
            f"unknown scenario(s): {', '.join(unknown)} (see --list-scenarios)",
            param_hint="--scenarios",
        )
    return names


def print_scenarios(console: Console) -> None:
    from rich.table import Table

    from ecus.sim.scenarios import SCENARIOS

    table = Table(title="scenarios (uptane demo --scenarios a,b,c)")
    table.add_column("name", no_wrap=True)
    table.add_column("attack reported", no_wrap=True)
    table.add_column("what happens")
    table.add_column("defeated by")
    for sc in SCENARIOS:
        table.add_row(sc.name, sc.attack or "(fault)", sc.title, sc.defeated_by)
    console.print(table)
    console.print("power-cut-<point> works for any slot write point, e.g. power-cut-start-trial.")


@click.command("demo")
@click.option(
    "--secondaries",
    type=click.IntRange(min=3),
    default=3,
    show_default=True,
    help="Secondary ECUs on the vehicle's CAN bus (at least 3; up to 6 get different "
    "hardware ids, more repeat them).",
)
@click.option("--fd/--classic", default=False, help="CAN FD or classic CAN (default: classic).")
@click.option("--paced", is_flag=True, help="Paced bus: every CAN frame sleeps to its wire time.")
@click.option(
    "--dir",
    "directory",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Create keys, repositories, database and ECU state here (an empty or new "
    "directory) and keep it.",
)
@click.option("--keep", is_flag=True, help="Keep the temporary directory (printed at the end).")
@click.option(
    "--scenarios",
    "scenarios",
    default=None,
    metavar="A,B,C",
    help="Play only these attack/fault scenarios, in this order (default: all).",
)
@click.option("--no-attacks", is_flag=True, help="Skip the attack and fault scenarios.")
@click.option("--list-scenarios", is_flag=True, help="List the scenarios and exit.")
@click.option(
    "--cycles",
    "max_cycles",
    type=click.IntRange(min=1),
    default=5,
    show_default=True,
    help="Most update cycles to wait for each version.",
)
@click.option(
    "--campaign",
    "campaign_demo",
    is_flag=True,
    help="Instead: a small fleet gets a bad v2 through a phased campaign; the canary "
    "catches it and the campaign halts with the rest of the fleet untouched (issue 14).",
)
def cli(
    secondaries: int,
    fd: bool,
    paced: bool,
    directory: Path | None,
    keep: bool,
    scenarios: str | None,
    no_attacks: bool,
    list_scenarios: bool,
    max_cycles: int,
    campaign_demo: bool,
) -> None:
    """Update a simulated vehicle end to end, then attack it.

    Creates keys and both repositories in a temporary directory (or --dir),
    starts the Image repository and the Director as real servers on
    127.0.0.1 (SQLite), publishes version 1 of a WASM app per ECU type and
    registers a vehicle: a primary and --secondaries secondaries on one
    virtual CAN bus. Runs update cycles until every ECU reports v1, then
    publishes and assigns v2 and updates again (the modules' tick output
    shows the new behaviour), then plays the attack and fault scenarios and
    shows each one blocked. Exits 0 only if every expected outcome happened.

    The servers' URLs and the directory are printed; the servers stop at exit.
    """
    from demo.main import DemoOptions, run_demo

    console = _console()
    if campaign_demo:  # ecus.sim.campaign_run
        from ecus.sim.campaign_run import demo_campaign

        base = Path(tempfile.mkdtemp(prefix="uptane-demo-campaign-"))
        try:
            outcome = demo_campaign(console, base)
        finally:
            shutil.rmtree(base, ignore_errors=True)
        if not outcome.ok:
            raise DemoFailed("the campaign did not halt at the canary with the fleet untouched")
        console.print(
            "[bold green]The canary caught the bad payload; the campaign halted[/bold green]"
        )
        return
    if list_scenarios:
        print_scenarios(console)
        return
    if no_attacks and scenarios is not None:
        raise click.UsageError("--scenarios and --no-attacks exclude each other")
    names = () if no_attacks else _scenario_names(scenarios)
    if directory is not None:
        if directory.exists() and any(directory.iterdir()):
            raise click.BadParameter(
                f"{directory} is not empty (the demo creates new keys and repositories)",
                param_hint="--dir",
            )
        directory.mkdir(parents=True, exist_ok=True)
        base, keep = directory.resolve(), True
    else:
        base = Path(tempfile.mkdtemp(prefix="uptane-demo-"))
    options = DemoOptions(
        secondaries=secondaries,
        fd=fd,
        paced=paced,
        keep=keep,
        scenarios=names,
        max_cycles=max_cycles,
    )
    try:
        report = run_demo(options, console, base)
    except Exception as e:
        console.print_exception(max_frames=5)
        raise DemoFailed(f"the demo stopped: {type(e).__name__}: {e}") from e
    finally:
        if not keep:
            shutil.rmtree(base, ignore_errors=True)
    if not report.ok:
        lines = "\n".join(f"  - {f.what}: {f.detail}" for f in report.failures)
        raise DemoFailed(f"{len(report.failures)} expected outcome(s) did not happen:\n{lines}")
    console.print(
        f"[bold green]All {len(report.expectations)} expected outcomes happened[/bold green] "
        f"in {report.seconds:.1f} s."
    )

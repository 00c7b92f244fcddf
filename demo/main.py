"""The vehicle demo: one vehicle through v1, v2 and a series of attacks and faults.

``run_demo`` builds a ``World`` (keys, an Image repository and a Director as
real servers on 127.0.0.1 with SQLite) in a directory, registers one vehicle
(a primary and N >= 3 secondaries of different hardware ids on one virtual
CAN bus), publishes version 1 of the blink WASM app for every ECU type and
runs update cycles until every secondary reports it; then version 2 (the
modules' tick output shows the new behaviour); then plays the simulator's
scenarios (``ecus.sim.scenarios``), each of which must be blocked and
recovered from. It shows progress with rich and returns a ``DemoReport``
whose ``expectations`` say what happened as expected and what did not.
"""

from __future__ import annotations

import contextlib
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.panel import Panel
from rich.table import Table

from demo.apps import CALIBRATION_KIB, demo_app
from demo.display import CycleDisplay, bus_line, closing_table, expectations_table, stage_line
from ecus.sim.runner import NOISY_LOGGERS, quiet_logs, quiet_power_cuts
from ecus.sim.scenarios import SCENARIOS, Scenario, ScenarioOutcome, run_scenario, scenario
from ecus.sim.world import (
    PRIMARY_HW,
    TOKEN,
    SimVehicle,
    VehicleOutcome,
    World,
    hardware_ids_for,
    image_name,
)
from ecus.transport.accounting import BusAccounting
from image_repo.delta import add_delta_between

DEFAULT_VIN = "UPTANEDEMO0000001"
TICKS = tuple(range(6))


@dataclass(frozen=True)
class DemoOptions:
    """What ``uptane demo`` was asked to do."""

    secondaries: int = 3
    fd: bool = False
    paced: bool = False
    keep: bool = False
    scenarios: tuple[str, ...] | None = None  # None: every scenario
    max_cycles: int = 5
    vin: str = DEFAULT_VIN

    def __post_init__(self) -> None:
        if self.secondaries < 3:
            raise ValueError("the demo needs at least three secondaries")
        if self.max_cycles < 1:
            raise ValueError("max_cycles must be positive")

    def chosen(self) -> list[Scenario]:
        """The scenarios to play (``KeyError`` for an unknown name)."""
        if self.scenarios is None:
            return list(SCENARIOS)
        return [scenario(name) for name in self.scenarios]


@dataclass(frozen=True)
class Expectation:
    """One outcome the demo expects, and whether it happened."""

    what: str
    ok: bool
    detail: str = ""


@dataclass(frozen=True)
class EcuRow:
    """One line of the closing table."""

    serial: str
    hardware_id: str
    installed: str | None
    release: int | None
    last_result: str
    attacks: tuple[str, ...]


@dataclass
class DemoReport:
    """What the demo did: URLs, expectations, scenario outcomes, the final ECU states."""

    directory: Path
    vin: str
    image_url: str = ""
    director_url: str = ""
    expectations: list[Expectation] = field(default_factory=list)
    scenarios: list[tuple[Scenario, ScenarioOutcome | None]] = field(default_factory=list)
    ecus: list[EcuRow] = field(default_factory=list)
    ticks: dict[str, dict[int, list[int | None]]] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return bool(self.expectations) and all(e.ok for e in self.expectations)

    @property
    def failures(self) -> list[Expectation]:
        return [e for e in self.expectations if not e.ok]

    def expect(self, what: str, ok: bool, detail: str = "") -> Expectation:
        e = Expectation(what, ok, detail)
        self.expectations.append(e)
        return e


# --- the demo ---------------------------------------------------------------------------


class Demo:
    """The demo's steps on one ``World`` and one vehicle (``run_demo`` runs them)."""

    def __init__(self, options: DemoOptions, console: Console, directory: Path) -> None:
        self.options = options
        self.console = console
        self.report = DemoReport(directory=directory, vin=options.vin)
        self.hardware_ids = hardware_ids_for(options.secondaries)
        self.world: World | None = None
        self.vehicle: SimVehicle | None = None
        self.accounting: BusAccounting | None = None
        self.last: VehicleOutcome | None = None

    def say(self, text: str) -> None:
        self.console.print(text, highlight=False)

    def step(self, title: str) -> None:
        self.console.rule(f"[bold]{escape(title)}")

    # --- setup -----------------------------------------------------------------------

    def setup(self, stack: contextlib.ExitStack) -> tuple[World, SimVehicle]:
        self.step("Repositories and servers")
        start = time.monotonic()
        world = stack.enter_context(World(self.report.directory))
        self.world = world
        self.report.image_url, self.report.director_url = world.image_url, world.director_url
        config = world.director_config
        info = Table.grid(padding=(0, 2))
        info.add_row("directory", str(self.report.directory))
        info.add_row("Image repository", f"{world.image_url}/metadata/1.root.json")
        info.add_row("Director", f"{world.director_url}/openapi.json")
        info.add_row(
            "operator API",
            f"curl -H 'Authorization: Bearer {TOKEN}' "
            f"{world.director_url}/api/vehicles/{self.options.vin}",
        )
        info.add_row("Director database", config.db_url)
        self.console.print(info)
        self.say(
            f"keys, both repositories and both servers ready in {time.monotonic() - start:.2f} s"
        )

        self.step("Vehicle")
        start = time.monotonic()
        vehicle = world.add_vehicle(
            self.options.vin, self.hardware_ids, fd=self.options.fd, paced=self.options.paced
        )
        self.vehicle = vehicle
        accounting = BusAccounting(vehicle.bus.timing)
        accounting.observe(vehicle.bus.open())
        stack.callback(accounting.close)
        self.accounting = accounting
        table = Table(title=f"vehicle {vehicle.vin}")
        table.add_column("ECU")
        table.add_column("hardware id")
        table.add_column("CAN ids (req/resp)")
        table.add_row(vehicle.primary_serial, PRIMARY_HW, "primary")
        for serial, sec in vehicle.secondaries.items():
            ids = f"0x{sec.config.request_id:03x}/0x{sec.config.response_id:03x}"
            table.add_row(serial, sec.hardware_id, ids)
        self.console.print(table)
        bus = "CAN FD (2 Mbit/s data phase)" if self.options.fd else "classic CAN (500 kbit/s)"
        pacing = ", paced to the wire time" if self.options.paced else ""
        self.say(
            f"registered with the Director; {len(vehicle.secondaries)} secondaries on one virtual "
            f"{bus} bus{pacing} ({time.monotonic() - start:.2f} s)"
        )
        return world, vehicle

    # --- updates -----------------------------------------------------------------------

    def cycle(self, label: str) -> VehicleOutcome:
        assert self.vehicle is not None and self.accounting is not None
        display = CycleDisplay(self.console, self.vehicle)
        with display.cycle(label), self.accounting.transfer() as transfer:
            outcome = self.vehicle.cycle()
        self.last = outcome
        self.say(f"  {stage_line(outcome.cycle, outcome.seconds)}")
        self.say(f"  {bus_line(transfer.stats)}")
        if outcome.cycle.updates:
            self.say(f"  updates: {', '.join(sorted(outcome.cycle.updates))}")
        for issue in outcome.cycle.issues:
            self.say(f"  [yellow]issue[/yellow] {escape(str(issue))}")
        for serial, error in outcome.errors.items():
            self.say(
                f"  [red]{escape(serial)}[/red]: {escape(type(error).__name__)}: {escape(str(error))}"
            )
        return outcome

    def update_to(self, version: int) -> bool:
        """Publish and assign ``version``; cycle until every secondary reports it."""
        world, vehicle = self.world, self.vehicle
        assert world is not None and vehicle is not None
        self.step(f"Version {version}")
        hws = sorted(set(self.hardware_ids))
        # the demo's builds carry a calibration table: a realistic size for a CAN transfer
        published = world.publish(version, hws, data=demo_app(version))
        for name, target in published.items():
            self.say(
                f"published {name} ({target.length} bytes: the app and its "
                f"{CALIBRATION_KIB} KiB calibration table)"
            )
        if version > 1:  # and v{n-1} -> v{n} as signed deltas (docs/deltas.md)
            for hw in hws:
                line = add_delta_between(
                    world.image_repo, image_name(hw, version), image_name(hw, version - 1)
                )
                self.say(line)
        count = world.assign_version(version, hws, [vehicle.vin])
        self.say(f"the Director assigned v{version} to {count} ECUs by hardware id")
        for n in range(1, self.options.max_cycles + 1):
            outcome = self.cycle(f"update cycle {n} (v{version})")
            done = [
                e.installed == image_name(e.hardware_id, version) for e in outcome.ecus.values()
            ]
            self.say(f"  {sum(done)}/{len(done)} secondaries on v{version}")
            sizes = [
                (u.delta.offer.length, u.target.length)
                for u in outcome.cycle.updates.values()
                if u.delta
            ]
            if sizes:
                self.say(
                    f"  sent as deltas: {', '.join(f'{d} B instead of {f} B' for d, f in sizes)}"
                )
            if all(done) and len(done) == len(vehicle.secondaries):
                self.report.expect(f"every secondary on v{version}", True, f"after {n} cycle(s)")
                return True
        self.report.expect(
            f"every secondary on v{version}",
            False,
            f"not after {self.options.max_cycles} cycles",
        )
        return False

    def ticks(self, version: int) -> dict[str, list[int | None]]:
        assert self.vehicle is not None
        out = {s: [self.vehicle.tick(s, t) for t in TICKS] for s in self.vehicle.secondaries}
        for serial, values in out.items():
            self.report.ticks.setdefault(serial, {})[version] = values
        return out

    def show_behaviour(
        self, before: dict[str, list[int | None]], after: dict[str, list[int | None]]
    ) -> None:
        table = Table(title="the module's tick(t) output, t = " + ", ".join(map(str, TICKS)))
        table.add_column("ECU")
        table.add_column("v1 (before)")
        table.add_column("v2 (after)")
        table.add_column("changed")
        changed = []
        for serial in before:
            differs = before[serial] != after[serial]
            changed.append(differs)
            table.add_row(
                serial,
                " ".join(map(str, before[serial])),
                " ".join(map(str, after[serial])),
                "yes" if differs else "NO",
            )
        self.console.print(table)
        self.report.expect(
            "v2 changed the modules' behaviour",
            bool(changed) and all(changed),
            "v1 tick(t) = t; v2 tick(t) = 2t + sensor 0",
        )

    # --- scenarios ------------------------------------------------------------------------

    def scenarios(self, chosen: Sequence[Scenario]) -> None:
        world, vehicle = self.world, self.vehicle
        assert world is not None and vehicle is not None
        self.step(f"Attacks and faults ({len(chosen)} scenarios)")
        for index, sc in enumerate(chosen, 1):
            start = time.monotonic()
            with self.console.status(f"[{index}/{len(chosen)}] {sc.name}: {sc.title}"):
                try:
                    outcome: ScenarioOutcome | None = run_scenario(world, vehicle, sc)
                    crash = ""
                except Exception as e:  # a broken scenario is a failed expectation
                    outcome, crash = None, f"{type(e).__name__}: {e}"
            elapsed = time.monotonic() - start
            self.report.scenarios.append((sc, outcome))
            ok, short, verdict = _verdict(sc, outcome, crash)
            mark = "[red]FAILED[/red]"
            if ok:
                mark = "[green]BLOCKED[/green]" if sc.attack else "[green]HANDLED[/green]"
            self.say(
                f"[{index}/{len(chosen)}] {mark} {escape(sc.name)} ({elapsed:.1f} s): {escape(verdict)}"
            )
            self.say(f"      [dim]defeated by: {escape(sc.defeated_by)}[/dim]")
            self.report.expect(f"scenario {sc.name} blocked and recovered", ok, short)
        table = Table(title="attacks and faults (each one's defence: in its line above)")
        table.add_column("scenario", no_wrap=True)
        table.add_column("blocked", no_wrap=True)
        table.add_column("detected")
        table.add_column("slots unchanged", no_wrap=True)
        table.add_column("recovered", no_wrap=True)
        for sc, outcome in self.report.scenarios:
            if outcome is None:
                table.add_row(sc.name, "crashed", "", "", "")
                continue
            table.add_row(
                sc.name,
                "yes" if outcome.blocked else "NO",
                detected_text(outcome),
                "yes" if outcome.slots_unchanged else "no",
                "yes" if outcome.recovered else "NO",
            )
        self.console.print(table)

    # --- closing -------------------------------------------------------------------------

    def settle(self) -> None:
        """Final cycles: every ECU reports, the Director has nothing pending."""
        world, vehicle = self.world, self.vehicle
        assert world is not None and vehicle is not None
        self.step("Final state")
        pending: list[str] = []
        outcome = None
        for n in range(1, 3):
            outcome = self.cycle(f"final cycle {n}")
            pending = [a.ecu_serial for a in world.director.vehicle_status(vehicle.vin).pending]
            if outcome.ok and not pending and outcome.cycle.updates == {}:
                break
        assert outcome is not None
        reachable = all(e.last_result != "unreachable" for e in outcome.ecus.values())
        on_v2 = all((e.release_counter or 0) >= 2 for e in outcome.ecus.values())
        self.report.expect(
            "every ECU runs its assigned image (v2 or later), nothing pending",
            outcome.ok and reachable and on_v2 and not pending,
            f"pending: {', '.join(pending) or 'none'}",
        )
        self.report.ecus = self.rows(outcome)

    def rows(self, outcome: VehicleOutcome) -> list[EcuRow]:
        world, vehicle = self.world, self.vehicle
        assert world is not None and vehicle is not None
        status = world.director.vehicle_status(vehicle.vin)
        attacks: dict[str, Counter[str]] = {}
        for a in status.attacks:
            attacks.setdefault(a.ecu_serial, Counter())[a.attack] += 1
        primary = next((e for e in status.ecus if e.primary), None)
        rows = [
            EcuRow(
                vehicle.primary_serial,
                PRIMARY_HW,
                None,
                None,
                (primary.last_result or "-") if primary is not None else "-",
                _attack_list(attacks.get(vehicle.primary_serial)),
            )
        ]
        for serial, e in outcome.ecus.items():
            seen = attacks.get(serial, Counter()) + Counter(e.attacks)
            rows.append(
                EcuRow(
                    serial,
                    e.hardware_id,
                    e.installed,
                    e.release_counter,
                    e.last_result,
                    _attack_list(seen),
                )
            )
        return rows


def _attack_list(counts: Counter[str] | None) -> tuple[str, ...]:
    if not counts:
        return ()
    return tuple(f"{name} x{n}" if n > 1 else name for name, n in sorted(counts.items()))


def detected_text(outcome: ScenarioOutcome) -> str:
    """The attacks a scenario's outcome names, the same in its line and in the table."""
    return ", ".join(outcome.detected) or "none (a fault)"


def _verdict(sc: Scenario, outcome: ScenarioOutcome | None, crash: str) -> tuple[bool, str, str]:
    """(as expected?, a short summary, the whole story) of one scenario."""
    if outcome is None:
        text = f"the scenario crashed: {crash}"
        return False, text, text
    problems = []
    if not outcome.blocked:
        problems.append("NOT blocked")
    if not outcome.recovered:
        problems.append("did NOT recover")
    if sc.attack is not None and sc.attack not in outcome.detected:
        problems.append(f"{sc.attack} not detected")
    short = f"detected: {detected_text(outcome)}"
    text = short
    if outcome.error:
        text += f"; error: {outcome.error}"
    if outcome.detail:
        text += f"; {outcome.detail}"
    if problems:
        short = "; ".join(problems) + "; " + short
        text = "; ".join(problems) + "; " + text
    return not problems, short, text


def run_demo(options: DemoOptions, console: Console, directory: Path) -> DemoReport:
    """Run the whole demo in ``directory`` (must be empty); servers stop on return."""
    start = time.monotonic()
    chosen = options.chosen()
    demo = Demo(options, console, directory)
    report = demo.report
    with contextlib.ExitStack() as stack:
        stack.enter_context(quiet_logs())
        stack.enter_context(quiet_power_cuts())
        demo.setup(stack)
        # the servers' start configured uvicorn's loggers: quiet them again (a scenario
        # breaks connections on purpose; its outcome is reported, not a traceback)
        stack.enter_context(quiet_logs((*NOISY_LOGGERS, "uvicorn.error")))
        if demo.update_to(1):
            before = demo.ticks(1)
            if demo.update_to(2):
                demo.show_behaviour(before, demo.ticks(2))
                if chosen:
                    demo.scenarios(chosen)
                demo.settle()
        if not report.ecus and demo.last is not None:
            report.ecus = demo.rows(demo.last)
        report.seconds = time.monotonic() - start
        console.print(closing_table(report))
        console.print(expectations_table(report))
        kept = "kept" if options.keep else "removed at exit; --keep keeps it"
        urls = (
            f"Image repository {report.image_url}  Director {report.director_url}  "
            f"(servers stop now)\ndirectory {report.directory} ({kept})"
        )
        console.print(Panel(urls, title="where things were", expand=False))
    return report

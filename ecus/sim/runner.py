"""Fleet runs: N vehicles against one Director and one Image repository (DESIGN 9).

``run_fleet`` builds a ``World``, adds ``vehicles`` vehicles of a primary and
``secondaries`` secondaries each, publishes version 1 of the demo app for
every hardware id, assigns it by hardware id and runs update cycles (one
round = one cycle of every vehicle that has not converged yet, in a thread
pool of ``workers``) until every ECU reports it or ``max_cycles`` rounds
passed; then optionally the same for ``update_to``. A ``fault`` is injected
on a fraction of the vehicles before the first round (``server-restart``:
the Director and Image repository restart once a release is published and
assigned, before the first round of its rollout), so a run shows that the
fleet still converges. The ``FleetReport`` has the timings (world setup,
per vehicle cycle p50/p95/max, total), ECUs updated / total, failures and
the attacks detected.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import random
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ecus.secondary.slots import PowerCut
from ecus.sim.fleet_faults import (
    DELAY_FRAME_SECONDS,
    FAULTS,
    FAULTY_INSTALL_TIMEOUT,
    FAULTY_TIMEOUT,
    POWER_CUT_POINTS,
    InjectedFault,
    PlannedFault,
)
from ecus.sim.http import trickle, truncated
from ecus.sim.world import (
    SimVehicle,
    VehicleOutcome,
    World,
    WorldView,
    hardware_ids_for,
    image_name,
)
from ecus.transport.faults import FrameFault

Log = Callable[[str], None]


@dataclass(frozen=True)
class FleetConfig:
    """What ``run_fleet`` builds and runs."""

    vehicles: int = 20
    secondaries: int = 4
    fd: bool = False
    paced: bool = False
    max_cycles: int = 5
    update_to: int | None = None
    workers: int = 1
    concurrency: int = 8
    fault: str | None = None
    fault_fraction: float = 0.25
    seed: int = 1
    tls: bool = False  # the Director over mutual TLS, a client certificate per vehicle

    def __post_init__(self) -> None:
        if self.vehicles < 1 or self.secondaries < 1:
            raise ValueError("a fleet needs at least one vehicle with one secondary")
        if self.max_cycles < 1 or self.workers < 1 or self.concurrency < 1:
            raise ValueError("max_cycles, workers and concurrency must be positive")
        if self.update_to is not None and self.update_to < 2:
            raise ValueError("update_to must be a version above 1")
        if self.fault is not None and self.fault not in FAULTS:
            raise ValueError(f"unknown fault {self.fault!r}; known: {', '.join(FAULTS)}")
        if not 0.0 < self.fault_fraction <= 1.0:
            raise ValueError("fault_fraction must be in (0, 1]")


@dataclass
class PhaseReport:
    """One version rolled out to the fleet."""

    version: int
    rounds: int = 0
    seconds: float = 0.0
    cycle_seconds: list[float] = field(default_factory=list)
    updated: int = 0
    total: int = 0
    failed_cycles: int = 0
    troubled_cycles: int = 0

    @property
    def converged(self) -> bool:
        return self.updated == self.total


@dataclass
class EcuState:
    vin: str
    serial: str
    hardware_id: str
    installed: str | None
    release_counter: int | None
    last_result: str
    attacks: tuple[str, ...]


@dataclass
class FleetReport:
    """Everything a fleet run measured and found."""

    config: FleetConfig
    directory: str
    image_url: str = ""
    director_url: str = ""
    setup_seconds: float = 0.0
    vehicles_seconds: float = 0.0
    total_seconds: float = 0.0
    phases: list[PhaseReport] = field(default_factory=list)
    ecus: list[EcuState] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    attacks: dict[str, int] = field(default_factory=dict)
    faults: list[InjectedFault] = field(default_factory=list)

    @property
    def target_version(self) -> int:
        return self.phases[-1].version if self.phases else 1

    @property
    def not_updated(self) -> list[EcuState]:
        want = self.target_version
        return [e for e in self.ecus if e.release_counter != want]

    @property
    def ok(self) -> bool:
        return bool(self.ecus) and not self.not_updated

    def cycle_seconds(self) -> list[float]:
        return [s for p in self.phases for s in p.cycle_seconds]

    def to_dict(self) -> dict[str, Any]:
        cycles = self.cycle_seconds()
        return {
            "ok": self.ok,
            "config": asdict(self.config),
            "directory": self.directory,
            "image_url": self.image_url,
            "director_url": self.director_url,
            "timings": {
                "world_setup": round(self.setup_seconds, 4),
                "vehicles_setup": round(self.vehicles_seconds, 4),
                "total": round(self.total_seconds, 4),
                "cycles": len(cycles),
                "cycle_p50": round(percentile(cycles, 50), 4),
                "cycle_p95": round(percentile(cycles, 95), 4),
                "cycle_max": round(max(cycles, default=0.0), 4),
            },
            "phases": [
                {
                    "version": p.version,
                    "rounds": p.rounds,
                    "seconds": round(p.seconds, 4),
                    "updated": p.updated,
                    "total": p.total,
                    "failed_cycles": p.failed_cycles,
                    "cycles_with_issues": p.troubled_cycles,
                    "converged": p.converged,
                }
                for p in self.phases
            ],
            "ecus_updated": len(self.ecus) - len(self.not_updated),
            "ecus_total": len(self.ecus),
            "target_version": self.target_version,
            "failures": list(self.failures),
            "attacks": dict(self.attacks),
            "faults": [asdict(f) for f in self.faults],
            "ecus": [asdict(e) for e in self.ecus],
        }


def percentile(values: Sequence[float], pct: float) -> float:
    """Nearest-rank percentile (0.0 for no values)."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = max(1, math.ceil(pct / 100 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def vin_for(index: int) -> str:
    return f"SIMVIN{index:011d}"


def on_version(vehicle: SimVehicle, outcome: VehicleOutcome, version: int) -> bool:
    """Does every secondary of ``vehicle`` run ``blink_v{version}``?"""
    return all(
        e.installed == image_name(e.hardware_id, version) and e.release_counter == version
        for e in outcome.ecus.values()
    ) and len(outcome.ecus) == len(vehicle.secondaries)


@contextlib.contextmanager
def quiet_power_cuts() -> Iterator[None]:
    """Do not print a traceback when a simulated power cut kills an endpoint thread."""
    previous = threading.excepthook

    def hook(args: threading.ExceptHookArgs) -> None:
        if args.exc_type is not None and issubclass(args.exc_type, PowerCut):
            return
        previous(args)

    threading.excepthook = hook
    try:
        yield
    finally:
        threading.excepthook = previous


NOISY_LOGGERS = ("isotp", "can", "ecus", "director", "image_repo", "uvicorn", "httpx", "urllib3")


@contextlib.contextmanager
def quiet_logs(loggers: Sequence[str] = NOISY_LOGGERS) -> Iterator[None]:
    """Silence expected warnings (timeouts, refused manifests) of a fleet run.

    Only when logging is at its default (WARNING or above, i.e. no ``-v``):
    the run reports failures and attacks itself.
    """
    if logging.getLogger().getEffectiveLevel() < logging.WARNING:
        yield
        return
    saved = {name: logging.getLogger(name).level for name in loggers}
    for name in loggers:
        logging.getLogger(name).setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for name, level in saved.items():
            logging.getLogger(name).setLevel(level)


class _Watchdog:
    """Power comes back: reboot any secondary whose endpoint died of a power cut."""

    def __init__(self, vehicles: Sequence[SimVehicle], interval: float = 0.05) -> None:
        self.vehicles = vehicles
        self.interval = interval
        self.reboots = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sim-power", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            for vehicle in self.vehicles:
                for serial, sec in vehicle.secondaries.items():
                    if sec.endpoint is not None and not sec.endpoint.serving:
                        vehicle.boot(serial)
                        self.reboots += 1

    def __enter__(self) -> _Watchdog:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


class FleetRun:
    """A fleet run in steps (``run_fleet`` runs them all).

    ``indices`` (default: all) are the vehicles this run builds and cycles; a
    shard of a multi-process run (``ecus.sim.shards``) owns some of them and
    works against a ``WorldView`` of the coordinator's Director and Image repository.
    """

    def __init__(
        self,
        config: FleetConfig,
        directory: Path,
        log: Log | None = None,
        *,
        indices: Sequence[int] | None = None,
    ) -> None:
        self.config = config
        self.directory = directory
        self.log = log or (lambda _msg: None)
        self.report = FleetReport(config=config, directory=str(directory))
        self.world: WorldView | None = None
        self.indices = list(range(config.vehicles)) if indices is None else list(indices)
        self.vehicles: list[SimVehicle] = []
        self.hardware_ids = hardware_ids_for(config.secondaries)
        self._attacks: Counter[str] = Counter()
        self._last: dict[str, VehicleOutcome] = {}
        self._bus_off: list[SimVehicle] = []
        self._lock = threading.Lock()

    # --- setup ---------------------------------------------------------------

    def setup(self, stack: contextlib.ExitStack) -> World:
        start = time.monotonic()
        world = stack.enter_context(World(self.directory, tls=self.config.tls))
        self.world = world
        self.report.image_url, self.report.director_url = world.image_url, world.director_url
        self.report.setup_seconds = time.monotonic() - start
        self.log(
            f"world up in {self.report.setup_seconds:.2f}s: image {world.image_url}, director {world.director_url}"
        )
        self.add_vehicles(world)
        self.log(
            f"{len(self.vehicles)} vehicles x {self.config.secondaries} secondaries "
            f"in {self.report.vehicles_seconds:.2f}s"
        )
        return world

    def add_vehicles(self, world: WorldView) -> None:
        """Build (and register with the Director) this run's vehicles."""
        self.world = world
        start = time.monotonic()
        with ThreadPoolExecutor(self.config.concurrency) as pool:
            self.vehicles = list(
                pool.map(
                    lambda i: world.add_vehicle(
                        vin_for(i + 1),
                        self.hardware_ids,
                        fd=self.config.fd,
                        paced=self.config.paced,
                    ),
                    self.indices,
                )
            )
        self.report.vehicles_seconds = time.monotonic() - start

    # --- faults --------------------------------------------------------------

    def plan_faults(self) -> list[PlannedFault]:
        """Choose the vehicles ``config.fault`` strikes, and how (seeded, whole fleet)."""
        fault = self.config.fault
        if fault is None or fault == "server-restart":  # see announce()
            return []
        rng = random.Random(self.config.seed)
        vins = [vin_for(i + 1) for i in range(self.config.vehicles)]
        count = max(1, math.ceil(self.config.fault_fraction * len(vins)))
        plan = []
        for vin in rng.sample(vins, count):
            if fault in ("drop-frame", "delay-frame"):
                plan.append(PlannedFault(vin, fault, nth=rng.randint(1, 12)))
            elif fault == "corrupt-frame":
                nth, byte, bit = rng.randint(1, 12), rng.randint(1, 7), rng.randint(0, 7)
                plan.append(PlannedFault(vin, fault, nth=nth, byte=byte, bit=bit))
            elif fault == "power-cut":
                plan.append(PlannedFault(vin, fault, point=rng.choice(POWER_CUT_POINTS)))
            else:
                plan.append(PlannedFault(vin, fault))
        return plan

    def first_secondary(self, vin: str) -> str:
        return f"{vin}-{self.hardware_ids[0]}-1"

    def apply_faults(self, plan: Sequence[PlannedFault], *, server: bool = True) -> None:
        """Arm the planned faults on this run's vehicles (and on the servers, if ``server``)."""
        mine = {v.vin: v for v in self.vehicles}
        for planned in plan:
            vehicle = mine.get(planned.vin)
            if vehicle is not None:
                self._arm_vehicle(vehicle, planned)
            if server and planned.on_server:
                self._arm_server(planned)

    def _arm_vehicle(self, vehicle: SimVehicle, planned: PlannedFault) -> None:
        for s in vehicle.secondaries.values():
            if s.client is not None:
                s.client.timeout = FAULTY_TIMEOUT
                s.client.install_timeout = FAULTY_INSTALL_TIMEOUT
        sec = vehicle.secondaries[self.first_secondary(vehicle.vin)]
        fault = planned.fault
        if fault == "drop-frame":
            sec.faults.add(FrameFault("drop", nth=planned.nth, direction="tx"))
        elif fault == "corrupt-frame":
            sec.faults.add(
                FrameFault(
                    "corrupt", nth=planned.nth, direction="tx", byte=planned.byte, bit=planned.bit
                )
            )
        elif fault == "delay-frame":
            sec.faults.add(
                FrameFault("delay", nth=planned.nth, direction="tx", delay=DELAY_FRAME_SECONDS)
            )
        elif fault == "bus-off":
            sec.faults.go_bus_off()
            self._bus_off.append(vehicle)
        elif fault == "power-cut":
            sec.power_cut_at = planned.point

    def _arm_server(self, planned: PlannedFault) -> None:
        world = self.world
        assert isinstance(world, World)
        path = f"/vehicles/{planned.vin}/metadata/timestamp.json"
        board = world.director_board
        if planned.fault == "slow-http":
            board.overrides[path] = _once(board.overrides, path, trickle(b" " * 4096))
        else:
            board.overrides[path] = _once(
                board.overrides, path, functools.partial(_truncated_metadata, world, planned.vin)
            )

    def record_faults(self, plan: Sequence[PlannedFault]) -> list[InjectedFault]:
        injected = [p.injected(self.first_secondary(p.vin)) for p in plan]
        self.report.faults.extend(injected)
        if injected:
            self.log(f"fault {self.config.fault} injected on {len(injected)} vehicle(s)")
        return injected

    def inject_faults(self) -> list[InjectedFault]:
        """Arm ``config.fault`` on the first secondary of a fraction of the vehicles."""
        plan = self.plan_faults()
        self.apply_faults(plan)
        return self.record_faults(plan)

    # --- cycles --------------------------------------------------------------

    def _cycle(self, vehicle: SimVehicle) -> VehicleOutcome:
        outcome = vehicle.cycle()
        with self._lock:
            self._attacks.update(outcome.attacks)
            self._last[vehicle.vin] = outcome
        return outcome

    def announce(self, version: int) -> None:
        """Publish and assign ``version`` by hardware id (the coordinator's part)."""
        world = self.world
        assert isinstance(world, World)
        hws = sorted(set(self.hardware_ids))
        world.publish(version, hws)
        assigned = world.assign_version(version, hws)
        self.log(f"v{version}: published for {len(hws)} hardware ids, assigned to {assigned} ECUs")
        if self.config.fault == "server-restart":
            self.restart_servers(version)

    def rollout(self, version: int) -> PhaseReport:
        """Publish and assign ``version`` by hardware id; cycle until every ECU has it."""
        start = time.monotonic()
        self.announce(version)
        phase = self.cycle_phase(version)
        phase.seconds = time.monotonic() - start
        self.report.phases.append(phase)
        return phase

    def cycle_phase(self, version: int) -> PhaseReport:
        """Cycle this run's vehicles in rounds until every ECU runs ``version``."""
        phase = PhaseReport(version, total=len(self.vehicles) * self.config.secondaries)
        start = time.monotonic()
        remaining = list(self.vehicles)
        with ThreadPoolExecutor(self.config.concurrency) as pool:
            while remaining and phase.rounds < self.config.max_cycles:
                phase.rounds += 1
                outcomes = list(pool.map(self._cycle, remaining))
                for vehicle in self._bus_off:
                    for sec in vehicle.secondaries.values():
                        sec.faults.clear_bus_off()
                self._bus_off.clear()
                still = []
                for vehicle, outcome in zip(remaining, outcomes, strict=True):
                    phase.cycle_seconds.append(outcome.seconds)
                    if not outcome.ok:
                        phase.failed_cycles += 1
                    if not outcome.ok or outcome.cycle.issues or outcome.errors:
                        phase.troubled_cycles += 1
                        self.report.failures.append(_failure(version, phase.rounds, outcome))
                    if not on_version(vehicle, outcome, version):
                        still.append(vehicle)
                remaining = still
                done = len(self.vehicles) - len(remaining)
                failed = sum(not o.ok for o in outcomes)
                troubled = sum(bool(o.cycle.issues or o.errors) for o in outcomes)
                self.log(
                    f"v{version} round {phase.rounds}: {done}/{len(self.vehicles)} vehicles on "
                    f"v{version}, {failed} failed cycle(s), {troubled} with issues"
                )
        phase.seconds = time.monotonic() - start
        phase.updated = sum(
            e.release_counter == version
            for v in self.vehicles
            for e in self._last[v.vin].ecus.values()
        )
        return phase

    def restart_servers(self, version: int) -> InjectedFault:
        """Restart the Director and Image repository (same storage) before a rollout."""
        assert isinstance(self.world, World)
        self.world.restart_servers()
        fault = InjectedFault(
            vin="*",
            ecu_serial="director+image",
            fault="server-restart",
            detail=f"Director and Image repository restarted after v{version} was "
            "published and assigned",
        )
        self.report.faults.append(fault)
        self.log(f"v{version}: {fault.detail}")
        return fault

    def finish(self) -> FleetReport:
        self.report.ecus = [
            EcuState(
                vin=v.vin,
                serial=e.serial,
                hardware_id=e.hardware_id,
                installed=e.installed,
                release_counter=e.release_counter,
                last_result=e.last_result,
                attacks=e.attacks,
            )
            for v in self.vehicles
            for e in self._last[v.vin].ecus.values()
        ]
        self.report.attacks = dict(sorted(self._attacks.items()))
        for e in self.report.not_updated:
            self.report.failures.append(
                f"{e.serial}: on {e.installed or 'nothing'}, not v{self.report.target_version}"
            )
        return self.report


def _once(overrides: dict[str, Any], path: str, make: Callable[[], Any]) -> Callable[[], Any]:
    """An override that answers one request, then lets the real app answer."""

    def respond() -> Any:
        overrides.pop(path, None)
        return make()

    return respond


def _truncated_metadata(world: World, vin: str) -> Any:
    """The vehicle's real Director timestamp, announced whole but broken off halfway."""
    data = world.director.metadata(vin, "timestamp.json")
    return truncated(data, len(data) // 2)()


def _failure(version: int, rnd: int, outcome: VehicleOutcome) -> str:
    issues = [str(i) for i in outcome.cycle.issues] or [
        f"{serial}: {type(e).__name__}: {e}" for serial, e in outcome.errors.items()
    ]
    return f"v{version} round {rnd} {outcome.vin}: " + "; ".join(issues or ["cycle failed"])


def run_fleet(
    config: FleetConfig, directory: Path, log: Log | None = None, *, cleanup: Path | None = None
) -> FleetReport:
    """Build the fleet in ``directory``, roll out v1 (and ``update_to``), report.

    With ``config.workers`` above 1 the vehicles are sharded across that many
    worker processes (``ecus.sim.shards``; they remove ``cleanup`` should this
    process be killed); otherwise they run in this one.
    """
    if config.workers > 1 and config.vehicles > 1:
        from ecus.sim.shards import run_sharded

        return run_sharded(config, directory, log, cleanup=cleanup)
    start = time.monotonic()
    run = FleetRun(config, directory, log)
    with contextlib.ExitStack() as stack:
        stack.enter_context(quiet_power_cuts())
        stack.enter_context(quiet_logs())
        run.setup(stack)
        if config.fault == "power-cut":
            stack.enter_context(_Watchdog(run.vehicles))
        run.inject_faults()
        run.rollout(1)
        if config.update_to is not None:
            run.rollout(config.update_to)
        report = run.finish()
    report.total_seconds = time.monotonic() - start
    return report

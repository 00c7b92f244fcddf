"""Fleet runs sharded across worker processes, one Director and Image repository (DESIGN 9).

The coordinator (the ``uptane sim`` process) runs the World: Director and
Image repository servers on loopback, publishing and assigning each release.
Each worker process builds its share of the vehicles (every vehicle with its
own virtual CAN bus, driven by the worker's one CAN scheduler thread),
registers them through the Director's operator API and cycles them; the
coordinator merges the shards' phases, ECU states, failures and attacks into
one ``FleetReport``.

Workers are started with ``spawn`` (no threads inherited half-way through a
fork). A worker whose coordinator disappears (killed, even with SIGKILL) sees
its command pipe close, removes the run's temporary directory and exits.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import multiprocessing.connection
import shutil
import time
import traceback
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ecus.sim.fleet_faults import PlannedFault
from ecus.sim.runner import (
    EcuState,
    FleetConfig,
    FleetReport,
    FleetRun,
    Log,
    PhaseReport,
    _Watchdog,
    quiet_logs,
    quiet_power_cuts,
)
from ecus.sim.world import World, WorldAddress, WorldView

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ShardSpec:
    """One worker's share of a fleet run."""

    index: int
    config: FleetConfig
    address: WorldAddress
    indices: tuple[int, ...]
    plan: tuple[PlannedFault, ...]
    cleanup: str | None  # the run directory to remove if the coordinator dies


class ShardFailed(RuntimeError):
    """A worker process failed or exited before answering."""


# what the command pipe raises once the coordinator has gone
_GONE = (EOFError, BrokenPipeError, ConnectionResetError)


def _serve(conn: multiprocessing.connection.Connection, spec: ShardSpec) -> None:
    """Worker process: build the shard's vehicles, then answer the coordinator's commands."""
    orphaned = False
    with contextlib.ExitStack() as stack:
        stack.enter_context(quiet_power_cuts())
        stack.enter_context(quiet_logs())
        view = WorldView.connect(spec.address)
        stack.callback(view.close)
        run = FleetRun(spec.config, Path(spec.address.directory), indices=spec.indices)
        try:
            run.add_vehicles(view)
            run.apply_faults(spec.plan, server=False)
            if spec.config.fault == "power-cut":
                stack.enter_context(_Watchdog(run.vehicles))
            conn.send(("ready", run.report.vehicles_seconds))
            while True:
                try:
                    command, arg = conn.recv()
                except _GONE:
                    orphaned = True
                    break
                if command == "rollout":
                    failures = len(run.report.failures)
                    phase = run.cycle_phase(int(arg))
                    conn.send(("phase", (asdict(phase), run.report.failures[failures:])))
                elif command == "finish":
                    report = run.finish()
                    conn.send(("finish", ([asdict(e) for e in report.ecus], dict(run._attacks))))
                else:  # "close"
                    break
        except _GONE:  # the pipe broke under a send: the coordinator is gone
            orphaned = True
        except Exception:
            try:
                conn.send(("error", traceback.format_exc()))
            except _GONE:
                orphaned = True
    if orphaned and spec.cleanup is not None:
        shutil.rmtree(spec.cleanup, ignore_errors=True)


def _worker(conn: multiprocessing.connection.Connection, spec: ShardSpec) -> None:
    try:
        _serve(conn, spec)
    finally:
        conn.close()


class _Shards:
    """The coordinator's handles on its worker processes."""

    def __init__(self, specs: list[ShardSpec]) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.conns: list[multiprocessing.connection.Connection] = []
        self.procs: list[Any] = []
        for spec in specs:
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_worker, args=(child, spec), name=f"sim-shard-{spec.index}")
            proc.daemon = True
            proc.start()
            child.close()
            self.conns.append(parent)
            self.procs.append(proc)

    def ask_all(self, command: str | None, arg: Any = None) -> list[Any]:
        if command is not None:
            for conn in self.conns:
                conn.send((command, arg))
        answers = []
        for i, conn in enumerate(self.conns):
            try:
                kind, value = conn.recv()
            except (EOFError, OSError) as e:
                raise ShardFailed(f"worker {i} exited (code {self.procs[i].exitcode})") from e
            if kind == "error":
                raise ShardFailed(f"worker {i} failed:\n{value}")
            answers.append(value)
        return answers

    def close(self) -> None:
        for conn in self.conns:
            with contextlib.suppress(OSError, BrokenPipeError):
                conn.send(("close", None))
        for proc in self.procs:
            proc.join(timeout=30)
            if proc.is_alive():
                proc.terminate()
                proc.join(timeout=5)
        for conn in self.conns:
            conn.close()


def _merge_phase(version: int, parts: list[tuple[dict[str, Any], list[str]]]) -> PhaseReport:
    phase = PhaseReport(version)
    for data, _ in parts:
        phase.rounds = max(phase.rounds, data["rounds"])
        phase.cycle_seconds.extend(data["cycle_seconds"])
        phase.updated += data["updated"]
        phase.total += data["total"]
        phase.failed_cycles += data["failed_cycles"]
        phase.troubled_cycles += data["troubled_cycles"]
    return phase


def run_sharded(
    config: FleetConfig, directory: Path, log: Log | None = None, *, cleanup: Path | None = None
) -> FleetReport:
    """``run_fleet`` over ``config.workers`` processes; ``cleanup`` is removed if we die."""
    say = log or (lambda _msg: None)
    start = time.monotonic()
    workers = min(config.workers, config.vehicles)
    run = FleetRun(config, directory, say, indices=())
    with contextlib.ExitStack() as stack:
        stack.enter_context(quiet_logs())
        world = stack.enter_context(World(directory, tls=config.tls))
        run.world = world
        run.report.image_url, run.report.director_url = world.image_url, world.director_url
        run.report.setup_seconds = time.monotonic() - start
        say(
            f"world up in {run.report.setup_seconds:.2f}s: image {world.image_url}, "
            f"director {world.director_url}"
        )
        plan = run.plan_faults()
        specs = [
            ShardSpec(
                index=k,
                config=config,
                address=world.address(),
                indices=tuple(range(k, config.vehicles, workers)),
                plan=tuple(plan),
                cleanup=None if cleanup is None else str(cleanup),
            )
            for k in range(workers)
        ]
        started = time.monotonic()
        shards = _Shards(specs)
        stack.callback(shards.close)
        shards.ask_all(None)  # every shard's "ready"
        run.report.vehicles_seconds = time.monotonic() - started
        say(
            f"{config.vehicles} vehicles x {config.secondaries} secondaries in "
            f"{workers} worker processes in {run.report.vehicles_seconds:.2f}s"
        )
        run.apply_faults(plan)  # the server-side ones
        run.record_faults(plan)
        versions = [1] + ([config.update_to] if config.update_to is not None else [])
        for version in versions:
            phase_start = time.monotonic()
            run.announce(version)
            parts = shards.ask_all("rollout", version)
            phase = _merge_phase(version, parts)
            phase.seconds = time.monotonic() - phase_start
            for _, failures in parts:
                run.report.failures.extend(failures)
            run.report.phases.append(phase)
            say(
                f"v{version}: {phase.updated}/{phase.total} ECUs in {phase.seconds:.2f}s, "
                f"{phase.rounds} round(s), {phase.failed_cycles} failed cycle(s)"
            )
        attacks: Counter[str] = Counter()
        ecus: list[EcuState] = []
        for shard_ecus, shard_attacks in shards.ask_all("finish"):
            ecus.extend(EcuState(**{**e, "attacks": tuple(e["attacks"])}) for e in shard_ecus)
            attacks.update(shard_attacks)
        order = {f"SIMVIN{i + 1:011d}": i for i in range(config.vehicles)}
        ecus.sort(key=lambda e: (order.get(e.vin, 0), e.serial))
        run.report.ecus = ecus
        run.report.attacks = dict(sorted(attacks.items()))
        for e in run.report.not_updated:
            run.report.failures.append(
                f"{e.serial}: on {e.installed or 'nothing'}, not v{run.report.target_version}"
            )
    run.report.total_seconds = time.monotonic() - start
    return run.report

"""What the vehicle demo shows: progress of a cycle, stage and bus lines, the closing tables.

``demo.main`` runs the demo's steps; this module only renders them with rich.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import urllib3
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    SpinnerColumn,
    Task,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table
from rich.text import Text

from ecus.primary import CycleResult
from ecus.primary.fetch import PolicyFetcher
from ecus.sim.world import SimVehicle
from ecus.transport.accounting import BusStats

if TYPE_CHECKING:
    from demo.main import DemoReport

STAGES = ("reports", "manifest", "director", "image", "match", "der", "download", "commit")
_BLOB = re.compile(r"^[0-9a-f]{64}\.")


class _ProgressFetcher(PolicyFetcher):
    """The primary's fetcher, reporting image download progress to a callback."""

    def __init__(self, base: PolicyFetcher, on_chunk: Callable[[str, int, int], None]) -> None:
        super().__init__(base.policy)
        self.on_chunk = on_chunk

    def _chunks(self, response: urllib3.response.BaseHTTPResponse) -> Iterator[bytes]:
        url = getattr(response, "url", None) or ""
        path = url.split("?", 1)[0]
        if "/targets/" not in path:
            yield from super()._chunks(response)
            return
        directory, _, blob = path.partition("/targets/")[2].rpartition("/")
        name = f"{directory}/{_BLOB.sub('', blob)}" if directory else _BLOB.sub("", blob)
        total = int(response.headers.get("content-length") or 0)
        received = 0
        for chunk in super()._chunks(response):
            received += len(chunk)
            self.on_chunk(name, received, total)
            yield chunk


class _BytesColumn(DownloadColumn):
    """Bytes done/total, for the tasks that count bytes (not the cycle's spinner)."""

    def render(self, task: Task) -> Text:
        return super().render(task) if task.fields.get("bytes") else Text("")


class CycleDisplay:
    """Rich progress for one update cycle: a spinner, download bars, CAN transfer bars."""

    def __init__(self, console: Console, vehicle: SimVehicle) -> None:
        self.console = console
        self.vehicle = vehicle
        self.progress = Progress(
            SpinnerColumn(),
            TextColumn("{task.description}"),
            BarColumn(),
            _BytesColumn(),
            TimeElapsedColumn(),
            console=console,
        )
        self._downloads: dict[str, TaskID] = {}
        self._transfers: dict[str, TaskID] = {}

    def on_download(self, name: str, received: int, total: int) -> None:
        task = self._downloads.get(name)
        if task is None:
            task = self.progress.add_task(f"download {name}", total=total or None, bytes=True)
            self._downloads[name] = task
        self.progress.update(task, completed=received, total=total or received)

    def on_transfer(self, serial: str, offset: int, length: int) -> None:
        task = self._transfers.get(serial)
        if task is None:
            task = self.progress.add_task(f"CAN  -> {serial}", total=length, bytes=True)
            self._transfers[serial] = task
        self.progress.update(task, completed=offset, total=length)

    @contextlib.contextmanager
    def cycle(self, label: str) -> Iterator[None]:
        self._downloads.clear()
        self._transfers.clear()
        primary = self.vehicle.primary
        fetcher = primary.fetcher
        primary.fetcher = _ProgressFetcher(fetcher, self.on_download)
        self.vehicle.progress = self.on_transfer
        spinner = self.progress.add_task(label, total=None)
        try:
            with self.progress:
                yield
                self.progress.update(spinner, total=1, completed=1)
        finally:
            primary.fetcher = fetcher
            self.vehicle.progress = None
            for task in list(self.progress.task_ids):
                self.progress.remove_task(task)


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms"


def stage_line(cycle: CycleResult, total: float) -> str:
    """``reports 80 ms > manifest 17 ms > ...`` for one cycle."""
    parts = [f"{s} {_ms(cycle.timings[s])}" for s in STAGES if s in cycle.timings]
    return " > ".join(parts) + f" | cycle {_ms(total)}"


def bus_line(stats: BusStats) -> str:
    return (
        f"CAN: {stats.frames} frames ({stats.consecutive} consecutive, "
        f"{stats.flow_control} flow control), {stats.data_bytes} data bytes, "
        f"{stats.bits} bits, wire time {_ms(stats.wire_time)}"
    )


# --- the closing tables ---------------------------------------------------------------


def short_serial(vin: str, serial: str) -> str:
    """An ECU serial without the VIN prefix the table's title already shows."""
    return serial.removeprefix(f"{vin}-") or serial


def short_image(hardware_id: str, name: str | None) -> str:
    """An image name without the ``apps/<hardware id>/`` its row already shows."""
    if not name:
        return "-"
    return name.removeprefix(f"apps/{hardware_id}/")


def closing_table(report: DemoReport) -> Table:
    """The final state per ECU, at most 100 columns wide, names never cut.

    Serials lose the VIN prefix and image names the ``apps/<hardware id>/``
    prefix (the caption says so); attack lists wrap between names.
    """
    table = Table(
        title=f"vehicle {report.vin}: final state",
        caption=f"ECU = serial after '{report.vin}-'; image = name after 'apps/<hardware id>/'",
    )
    table.add_column("ECU", no_wrap=True)
    table.add_column("hardware id", no_wrap=True)
    table.add_column("release", no_wrap=True)
    table.add_column("image", no_wrap=True)
    table.add_column("last result", max_width=24)
    table.add_column("attacks detected", max_width=28)
    for row in report.ecus:
        table.add_row(
            short_serial(report.vin, row.serial),
            row.hardware_id,
            "-" if row.release is None else f"v{row.release}",
            short_image(row.hardware_id, row.installed),
            row.last_result,
            ", ".join(row.attacks) or "none",
        )
    return table


def expectations_table(report: DemoReport) -> Table:
    table = Table(title="expected outcomes")
    table.add_column("")
    table.add_column("expectation", no_wrap=True)
    table.add_column("detail")
    for e in report.expectations:
        table.add_row(
            "[green]ok[/green]" if e.ok else "[red]FAIL[/red]", escape(e.what), escape(e.detail)
        )
    return table

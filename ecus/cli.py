"""``uptane ecu``: run a primary or a secondary ECU on a CAN bus (DESIGN 2, 4).

``keygen`` writes an ECU key pair; ``primary CONFIG`` runs update cycles
(``ecus.primary.config`` format plus an optional ``"can"`` section, see
``ecus.secondary.config``); ``secondary CONFIG`` answers the primary over
ISO-TP until Ctrl-C. Any python-can interface works (``socketcan``,
``virtual``, ...).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import click

from ecus.primary import CycleResult, Primary
from ecus.primary.can_config import PrimaryCan, load_primary
from ecus.primary.can_link import CanSecondaryClient
from ecus.primary.config import PrimaryConfig
from ecus.secondary import Secondary
from ecus.secondary.config import SecondaryConfig
from ecus.transport.isotp import CanBusConfig, CanNode, IsoTpConfig
from uptane.errors import UptaneError
from uptane.keys import generate_ed25519
from uptane.repository import utc_now

#: One exchange over ISO-TP (a chunk of an image at 500 kbit/s fits easily).
LINK_TIMEOUT = 10.0


@contextlib.contextmanager
def _one_line_errors() -> Iterator[None]:
    """Typed project errors and OS errors become ``Error: ...`` with exit 1."""
    try:
        yield
    except UptaneError as e:
        raise click.ClickException(str(e)) from None
    except OSError as e:
        raise click.ClickException(f"{type(e).__name__}: {e}") from None


@click.group()
def cli() -> None:
    """Run ECUs on a CAN bus (real hardware, vcan or python-can's virtual bus)."""


@cli.command()
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@click.argument("name")
def keygen(directory: Path, name: str) -> None:
    """Write an ed25519 ECU key as DIRECTORY/NAME.pem + NAME.pub.json.

    Prints the public key file, for ``uptane director register --ecu SERIAL,HW,FILE``.
    """
    with _one_line_errors():
        generate_ed25519(directory, name)
    click.echo(str((directory / f"{name}.pub.json").resolve()))


def _bus_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    options = [
        click.option(
            "--interface",
            default=None,
            help="python-can interface: socketcan, udp_multicast (across processes), "
            "virtual (in this process only)",
        ),
        click.option("--channel", default=None, help="CAN channel (can0, vcan0, a virtual name)"),
        click.option("--fd/--classic", default=None, help="CAN FD (64-byte frames) or classic"),
        click.option("--bitrate", type=int, default=None, help="nominal bit rate"),
        click.option("--data-bitrate", type=int, default=None, help="CAN FD data bit rate"),
        click.option(
            "--bus-option",
            "options",
            multiple=True,
            metavar="KEY=VALUE",
            help="python-can interface option, e.g. port=43113 for udp_multicast (repeatable)",
        ),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def _override(bus: CanBusConfig, **given: Any) -> CanBusConfig:
    options = dict(bus.options)
    for item in given.pop("options", ()) or ():
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{item!r} is not KEY=VALUE", param_hint="--bus-option")
        options[key] = int(value) if value.lstrip("-").isdigit() else value
    changed = {k: v for k, v in given.items() if v is not None}
    return replace(bus, options=options, **changed)


def summarize(
    number: int, result: CycleResult, outcomes: dict[str, BaseException | Any]
) -> tuple[bool, str]:
    """Whether a cycle succeeded, and one line saying what it did."""
    failed = [s for s, o in outcomes.items() if isinstance(o, BaseException)]
    ok = result.ok and not failed
    timings = " ".join(f"{k}={v * 1000:.0f}ms" for k, v in result.timings.items())
    parts = [f"cycle {number}: {'ok' if ok else 'FAILED'}", timings]
    if result.error is not None:
        parts.append(f"error={result.stage}: {type(result.error).__name__}: {result.error}")
    if result.updates:
        updates = []
        for serial, update in result.updates.items():
            outcome = outcomes.get(serial)
            if isinstance(outcome, BaseException):
                status = f"failed ({type(outcome).__name__}: {outcome})"
            elif outcome is None:
                status = "not installed"
            else:
                status = "installed" if outcome.installed is not None else "sent"
            updates.append(f"{serial}->{update.target.name} {status}")
        parts.append("updates: " + ", ".join(updates))
    else:
        parts.append("updates: none")
    issues = [str(i) for i in result.issues if i.error is not result.error]
    if issues:
        parts.append("issues: " + "; ".join(issues))
    parts.append("attacks: " + (", ".join(result.attacks) or "none"))
    return ok, "  ".join(p for p in parts if p)


def run_cycles(
    config: PrimaryConfig,
    can_setup: PrimaryCan,
    *,
    once: bool,
    interval: float,
    echo: Callable[[str], None] = click.echo,
    stop: threading.Event | None = None,
) -> bool:
    """Run update cycles over CAN; return whether the last one succeeded."""
    stop = stop or threading.Event()
    with contextlib.ExitStack() as stack:
        node = stack.enter_context(CanNode.open(can_setup.bus))
        clients = []
        for entry in config.secondaries:
            request_id, response_id = can_setup.ids[entry.serial]
            link = stack.enter_context(
                node.link(
                    IsoTpConfig(request_id, response_id, fd=can_setup.bus.fd, timeout=LINK_TIMEOUT)
                )
            )
            clients.append(CanSecondaryClient(link, entry.serial, clock=utc_now))
        primary = Primary(config, clients, clock=utc_now)
        number, ok = 0, False
        while True:
            number += 1
            result = primary.run_cycle()
            outcomes: dict[str, BaseException | Any] = {}
            if result.ok and result.updates:
                outcomes.update(primary.distribute(result))
            ok, line = summarize(number, result, outcomes)
            echo(line)
            if once or stop.wait(interval):
                return ok


@cli.command()
@click.argument("config", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--once", is_flag=True, help="Run one cycle; exit 1 if it failed.")
@click.option(
    "--interval", type=float, default=60.0, show_default=True, help="Seconds between cycles."
)
@_bus_options
def primary(config: Path, once: bool, interval: float, **bus: Any) -> None:
    """Run the primary ECU of CONFIG: update cycles until Ctrl-C."""
    with _one_line_errors():
        primary_config, can_setup = load_primary(config)
        can_setup = replace(can_setup, bus=_override(can_setup.bus, **bus))
        try:
            ok = run_cycles(primary_config, can_setup, once=once, interval=interval)
        except KeyboardInterrupt:
            click.echo("stopped")
            return
    if once and not ok:
        raise click.exceptions.Exit(1)


def serve_secondary(
    config: SecondaryConfig,
    stop: threading.Event,
    *,
    on_ready: Callable[[Secondary], None] | None = None,
) -> None:
    """Answer the primary over ISO-TP until ``stop`` is set."""
    ecu = Secondary(
        ecu_serial=config.serial,
        hardware_id=config.hardware_id,
        vin=config.vin,
        signer=config.key.signer(),
        director_root=config.director_root,
        slot_dir=config.slot_dir,
        clock=utc_now,
        max_time_ahead=config.max_time_ahead,
    )
    iso = IsoTpConfig(config.request_id, config.response_id, fd=config.bus.fd, timeout=LINK_TIMEOUT)
    with CanNode.open(config.bus) as node, node.endpoint(iso, ecu.handle) as endpoint:
        endpoint.start()
        if on_ready is not None:
            on_ready(ecu)
        stop.wait()


def describe(ecu: Secondary) -> str:
    """One line on a secondary's installed image and last result."""
    active = ecu.store.active_target()
    installed = "nothing" if active is None else active.name
    return f"{ecu.identity.ecu_serial}: installed {installed}, last result {ecu.report_state.last_result}"


@cli.command()
@click.argument("config", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--max-seconds", type=float, default=None, help="Stop after this many seconds.")
@_bus_options
def secondary(config: Path, max_seconds: float | None, **bus: Any) -> None:
    """Run the secondary ECU of CONFIG until Ctrl-C."""
    stop = threading.Event()
    with _one_line_errors():
        cfg = SecondaryConfig.load(config)
        cfg = replace(cfg, bus=_override(cfg.bus, **bus))

        def ready(ecu: Secondary) -> None:
            click.echo(
                f"{describe(ecu)}; listening on {cfg.bus.interface}:{cfg.bus.channel} "
                f"(request {cfg.request_id:#x}, response {cfg.response_id:#x})"
            )
            if max_seconds is not None:
                timer = threading.Timer(max_seconds, stop.set)
                timer.daemon = True
                timer.start()

        with contextlib.suppress(KeyboardInterrupt):
            serve_secondary(cfg, stop, on_ready=ready)
    click.echo("stopped")


__all__ = ["cli", "run_cycles", "serve_secondary", "summarize"]

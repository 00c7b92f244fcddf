"""``uptane ecu``: run a primary or a secondary ECU on a CAN bus (docs/architecture.md).

``keygen`` writes an ECU key pair; ``primary CONFIG`` runs update cycles and
prints one line per cycle with each ECU's outcome; ``secondary CONFIG``
answers the primary over ISO-TP until Ctrl-C. Any python-can interface works
(``socketcan``, ``virtual``, ...). Both config formats: docs/config.md.
The ECU libraries (tuf, wasmtime, python-can) are imported inside the
commands, so ``--help`` is quick.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from uptane.cli import PartGroup, one_line

if TYPE_CHECKING:
    from ecus.primary import CycleResult
    from ecus.primary.can_config import PrimaryCan
    from ecus.primary.config import PrimaryConfig
    from ecus.primary.policy import InstallPolicy
    from ecus.secondary import Secondary
    from ecus.secondary.config import SecondaryConfig
    from ecus.transport.isotp import CanBusConfig

#: One exchange over ISO-TP (a chunk of an image at 500 kbit/s fits easily).
LINK_TIMEOUT = 10.0

# What a cycle did for one ECU (``EcuOutcome.status``).
INSTALLED = "installed"
UP_TO_DATE = "up to date"
REFUSED = "refused"
UNREACHABLE = "unreachable"
DEFERRED = "deferred"
BAD_REPORT = "bad report"
FAILED = "failed"
#: Outcomes that do not fail ``--once``.
GOOD_OUTCOMES = frozenset({INSTALLED, UP_TO_DATE, DEFERRED})


@click.group(cls=PartGroup)
def cli() -> None:
    """Run ECUs on a CAN bus (real hardware, vcan or python-can's virtual bus).

    `keygen` makes an ECU key, `secondary CONFIG` runs a secondary, `primary
    CONFIG` runs update cycles. Config files: docs/config.md.
    """


@cli.command()
@click.argument("directory", metavar="DIR", type=click.Path(file_okay=False, path_type=Path))
@click.argument("name")
def keygen(directory: Path, name: str) -> None:
    """Write an ed25519 ECU key as DIR/NAME.pem + DIR/NAME.pub.json.

    Prints the public key file: give it to `uptane director register --ecu
    SERIAL,HARDWARE_ID,DIR/NAME.pub.json` and to the ECU's config.
    """
    from uptane.keys import generate_ed25519

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


@dataclass(frozen=True)
class EcuOutcome:
    """What one cycle did for one ECU: a status (``INSTALLED``, ...) and why."""

    serial: str
    status: str
    detail: str = ""

    @property
    def good(self) -> bool:
        return self.status in GOOD_OUTCOMES

    def __str__(self) -> str:
        return f"{self.serial} {self.status}" + (f" {self.detail}" if self.detail else "")


def _error(e: BaseException) -> str:
    return one_line(f"{type(e).__name__}: {e}")


def ecu_outcomes(
    config: PrimaryConfig, result: CycleResult, outcomes: Mapping[str, BaseException | Any]
) -> list[EcuOutcome]:
    """Each ECU's outcome of a cycle, primary first, in config order.

    ``installed`` (runs its new image), ``refused`` (the ECU reported a
    failure instead: the reason is its result code and text), ``unreachable``
    (no report or no answer over the link), ``bad report`` (a report that
    failed verification: the attack it is evidence of), ``failed`` (another
    error sending the update), ``deferred`` (an update this command does not
    send: the primary's own image), ``up to date`` (nothing to do).
    """
    from ecus.primary.policy import UpdateHeldError
    from ecus.primary.verify import _runs
    from uptane.errors import TransportError

    report_issues = {
        i.ecu_serial: i for i in result.issues if i.stage == "reports" and i.ecu_serial
    }
    serials = [config.ecu_serial, *(s.serial for s in config.secondaries)]
    found: list[EcuOutcome] = []
    for serial in serials:
        update = result.updates.get(serial)
        issue = report_issues.get(serial)
        if update is None:
            if issue is not None:
                attack = getattr(issue, "attack", None)
                if isinstance(issue.error, TransportError) or attack in (None, "drop_request"):
                    found.append(EcuOutcome(serial, UNREACHABLE, f"({_error(issue.error)})"))
                else:
                    found.append(
                        EcuOutcome(serial, BAD_REPORT, f"({_error(issue.error)}; attack {attack})")
                    )
            elif result.ok:
                found.append(EcuOutcome(serial, UP_TO_DATE))
            continue
        name = update.target.name
        outcome = outcomes.get(serial)
        if outcome is None:
            why = "primary's own image" if serial == config.ecu_serial else "not sent"
            found.append(EcuOutcome(serial, DEFERRED, f"{name} ({why})"))
        elif isinstance(outcome, UpdateHeldError):  # the install policy: not a failure
            found.append(EcuOutcome(serial, DEFERRED, f"{name} ({outcome.result}: {outcome})"))
        elif isinstance(outcome, TransportError):
            found.append(EcuOutcome(serial, UNREACHABLE, f"{name} ({_error(outcome)})"))
        elif isinstance(outcome, BaseException):
            found.append(EcuOutcome(serial, FAILED, f"{name} ({_error(outcome)})"))
        elif _runs(outcome.installed, update.target):
            found.append(EcuOutcome(serial, INSTALLED, name))
        else:
            reason = outcome.last_result
            if outcome.last_result_text:
                reason += f": {outcome.last_result_text}"
            found.append(EcuOutcome(serial, REFUSED, f"{name} ({one_line(reason)})"))
    return found


def summarize(
    number: int,
    result: CycleResult,
    outcomes: Mapping[str, BaseException | Any],
    config: PrimaryConfig,
) -> tuple[bool, str]:
    """Whether a cycle succeeded, and one line saying what it did for each ECU.

    It failed when verification failed, the Director refused the manifest,
    or any ECU's outcome is not installed / up to date / deferred.
    """
    per_ecu = ecu_outcomes(config, result, outcomes)
    manifest = result.manifest
    accepted = manifest is not None and manifest.accepted
    ok = result.ok and accepted and all(o.good for o in per_ecu)
    timings = " ".join(f"{k}={v * 1000:.0f}ms" for k, v in result.timings.items())
    parts = [f"cycle {number}: {'ok' if ok else 'FAILED'}", timings]
    if manifest is not None:
        if accepted:
            parts.append("manifest: accepted")
        else:
            detail = f": {manifest.detail}" if manifest.detail else ""
            parts.append(one_line(f"manifest: refused ({manifest.reason}{detail})"))
    if result.error is not None:
        parts.append(f"error: {result.stage}: {_error(result.error)}")
    parts.append("ECUs: " + ("; ".join(str(o) for o in per_ecu) or "none"))
    shown = {o.serial for o in per_ecu if not o.good}
    issues = [
        one_line(str(i))
        for i in result.issues
        if i.error is not result.error
        and i.stage not in ("reports", "manifest")
        and i.ecu_serial not in shown
    ]
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
    install_policy: InstallPolicy | None = None,
) -> bool:
    """Run update cycles over CAN, a line each; return whether the last one succeeded."""
    from ecus.primary import Primary
    from ecus.primary.can_link import CanSecondaryClient
    from ecus.transport.isotp import CanNode, IsoTpConfig
    from uptane.repository import utc_now

    stop = stop or threading.Event()
    with contextlib.ExitStack() as stack:
        node = stack.enter_context(CanNode.open(can_setup.bus))
        signer = config.key.signer()  # signs time messages and report receipts (DESIGN 7)
        clients = []
        for entry in config.secondaries:
            request_id, response_id = can_setup.ids[entry.serial]
            link = stack.enter_context(
                node.link(
                    IsoTpConfig(request_id, response_id, fd=can_setup.bus.fd, timeout=LINK_TIMEOUT)
                )
            )
            clients.append(CanSecondaryClient(link, entry.serial, clock=utc_now, signer=signer))
        primary = Primary(config, clients, clock=utc_now)
        primary.install_policy = install_policy
        number, ok = 0, False
        while True:
            number += 1
            result = primary.run_cycle()
            outcomes: dict[str, BaseException | Any] = {}
            if result.ok and result.updates:
                outcomes.update(primary.distribute(result))
            ok, line = summarize(number, result, outcomes, config)
            echo(line)
            if once or stop.wait(interval):
                return ok


_PRIMARY_HELP = """Run the primary ECU of CONFIG: update cycles until Ctrl-C.

\b
CONFIG is a JSON file (relative paths are relative to it; every field:
docs/config.md):
  vin, ecu_serial, hardware_id      this vehicle and the primary ECU
  key                               {"uri": "file2:keys/p1.pem", "public": "keys/p1.pub.json"}
  repository_map                    TAP-4 map (file or inline): Director and Image URLs
  director_root, image_root         trusted root.json files of both repositories
  state_dir                         where the primary keeps its state
  secondaries                       [{"serial", "hardware_id", "public_key": "keys/b1.pub.json"}]
  can (optional)                    {"bus": {...}, "ids": {"B1": {"request_id": "0x600", ...}}}
\b
Each cycle prints one line: ok or FAILED, stage timings, the Director's answer
to the manifest, and each ECU's outcome (installed, up to date, refused with
the ECU's reason, unreachable, bad report, deferred). With --once the exit
status is 1 when the cycle failed, the Director refused the manifest or any
ECU's update did not install.
"""


@cli.command(help=_PRIMARY_HELP, short_help="Run the primary ECU: update cycles.")
@click.argument("config", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--once", is_flag=True, help="Run one cycle; exit 1 if anything in it failed.")
@click.option(
    "--interval", type=float, default=60.0, show_default=True, help="Seconds between cycles."
)
@click.option(
    "--approvals",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help='Install only images approved in this JSON file ({"IMAGE": "approve"|"decline"}); '
    "others are deferred and reported as such.",
)
@click.option("--ask", is_flag=True, help="Ask on the terminal before installing an update.")
@_bus_options
def primary(
    config: Path, once: bool, interval: float, approvals: Path | None, ask: bool, **bus: Any
) -> None:
    from ecus.primary.can_config import load_primary
    from ecus.primary.policy import AllOf, Ask, AskFile

    policies: list[InstallPolicy] = []
    if approvals is not None:
        policies.append(AskFile(approvals))
    if ask:
        policies.append(
            Ask(
                lambda offer: click.confirm(
                    "Install " + ", ".join(f"{s}: {i}" for s, i in sorted(offer.images.items())),
                    default=False,
                )
            )
        )
    primary_config, can_setup = load_primary(config)
    can_setup = replace(can_setup, bus=_override(can_setup.bus, **bus))
    try:
        ok = run_cycles(
            primary_config,
            can_setup,
            once=once,
            interval=interval,
            install_policy=AllOf(*policies) if policies else None,
        )
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
    from ecus.secondary import Secondary
    from ecus.transport.isotp import CanNode, IsoTpConfig
    from uptane.repository import utc_now

    ecu = Secondary(
        ecu_serial=config.serial,
        hardware_id=config.hardware_id,
        vin=config.vin,
        signer=config.key.signer(),
        director_root=config.director_root,
        slot_dir=config.slot_dir,
        clock=utc_now,
        max_time_ahead=config.max_time_ahead,
        delta_memory_limit=config.delta_memory_limit,
        primary_key=config.primary_key,
        ceilings=config.ceilings,
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


_SECONDARY_HELP = """Run the secondary ECU of CONFIG until Ctrl-C.

\b
CONFIG is a JSON file (relative paths are relative to it; every field:
docs/config.md):
  serial, hardware_id, vin          this ECU (as registered with the Director)
  key                               {"uri": "file2:keys/b1.pem", "public": "keys/b1.pub.json"}
  director_root                     the Director's root in DER (DIR/root/1.root.der)
  slot_dir                          where the two WASM slots and the state live
  can (optional)                    {"request_id": "0x600", "response_id": "0x601"}
  bus (optional)                    {"interface": "socketcan", "channel": "can0", "fd": false}
  max_time_ahead_seconds (optional) how far ahead of its clock metadata time may be
"""


@cli.command(help=_SECONDARY_HELP, short_help="Run a secondary ECU until Ctrl-C.")
@click.argument("config", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--max-seconds", type=float, default=None, help="Stop after this many seconds.")
@_bus_options
def secondary(config: Path, max_seconds: float | None, **bus: Any) -> None:
    from ecus.secondary.config import SecondaryConfig

    stop = threading.Event()
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


__all__ = ["EcuOutcome", "cli", "ecu_outcomes", "run_cycles", "serve_secondary", "summarize"]

"""``uptane director``: init keys, register vehicles, assign images, list, serve.

``init`` and ``rotate`` are the only commands that touch the offline root
keys; they sign the Director root chain into ``DIR/root/``. Every other
command opens the database named in ``DIR/director.json`` (or ``--db``),
runs the migrations and imports newer root versions first, so a fresh
directory needs nothing but ``init``.

Every command takes the Director directory DIR as its first argument, like
``uptane image-repo`` (``--dir DIR`` and ``UPTANE_DIRECTOR_DIR`` also work).
Heavy libraries (SQLAlchemy, FastAPI, tuf) are imported inside the commands,
so ``--help`` is quick.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from uptane.cli import PartGroup, check_listen

if TYPE_CHECKING:
    pass

from director.cli_common import (
    _db_option,
    _dir_option,
    _DirCommand,
    _jsonable,
    _load,
    _open,
    check_plain_http,
)
from director.db_url import database_error_text
from director.fleet_cli import COMMANDS as _FLEET_COMMANDS

# director.config's, repeated so that --help imports nothing heavy
DEFAULT_PORT = 8084
ONLINE_ROLES = ("targets", "snapshot", "timestamp")


class _DirectorGroup(PartGroup):
    """Director commands: database mistakes are one line too."""

    command_class = _DirCommand

    def error_text(self, e: BaseException) -> str | None:
        return database_error_text(e) or super().error_text(e)


def last_result_text(result: str | None, text: str | None) -> str:
    """An ECU's last reported result as one cell: ``ok``, ``code: reason`` or ``-``."""
    if not result:
        return "-"
    return f"{result}: {text}" if text and result != "ok" else result


@click.group("director", cls=_DirectorGroup)
def cli() -> None:
    """The Director repository: inventory, assignments, per-vehicle metadata."""


@cli.command("init")
@_dir_option
@click.option("--image-repo-url", default=None, help="Image repository base URL.")
@click.option(
    "--image-repo-root",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    default=None,
    help="The Image repository's trusted root.json (copied into the directory).",
)
@_db_option
@click.option("--port", type=int, default=DEFAULT_PORT, show_default=True)
@click.option("--root-keys", type=click.IntRange(1, 16), default=1, show_default=True)
@click.option("--root-threshold", type=click.IntRange(1, 16), default=1, show_default=True)
@click.option(
    "--show-token", is_flag=True, help="Print the operator token (it is in director.json)."
)
def init_cmd(
    directory: Path,
    image_repo_url: str | None,
    image_repo_root: Path | None,
    db_url: str | None,
    port: int,
    root_keys: int,
    root_threshold: int,
    show_token: bool = False,
) -> None:
    """Create Director keys, root metadata and config in DIR (created if missing).

    --db is checked (URL and driver) before anything is written; without it
    the inventory is SQLite in DIR/director.db.
    """
    from director.config import CONFIG_FILE
    from director.setup import init_director

    config = init_director(
        directory,
        image_repo_url=image_repo_url,
        image_repo_root=image_repo_root,
        db_url=db_url or "",
        port=port,
        root_keys=root_keys,
        root_threshold=root_threshold,
    )
    click.echo(f"Director initialised in {directory} (root v1, database {config.db_url})")
    if show_token:
        click.echo(f"operator token: {config.token}")
    else:
        click.echo(
            f"operator token: in {directory / CONFIG_FILE} (mode 0600; --show-token prints it)"
        )
    click.echo("keep keys/root-*.pem offline; the server only needs the online keys")


@cli.command("rotate")
@_dir_option
@_db_option
@click.argument("role", type=click.Choice(["root", *ONLINE_ROLES]))
def rotate_cmd(directory: Path, db_url: str | None, role: str) -> None:
    """Replace ROLE's key and sign the next root (needs the offline root keys)."""
    config = _load(directory, db_url)
    from director.setup import rotate_key

    version, new = rotate_key(config, role)
    director = _open(directory, db_url)
    try:
        resigned = director.refresh_expiring()
    finally:
        director.close()
    click.echo(
        f"{role} key is now {new.keyid[:12]}; root v{version}; re-signed {resigned} vehicles"
    )


@cli.command("serve")
@_dir_option
@_db_option
@click.option("--host", default=None, help="Bind address (default from config: 127.0.0.1).")
@click.option("--port", type=int, default=None, help="Port (default from config).")
@click.option(
    "--workers",
    type=click.IntRange(1, 64),
    default=1,
    show_default=True,
    help="App processes sharing the database (all state is in the database).",
)
@click.option("--tls", is_flag=True, help="Mutual TLS: vehicles need their client certificate.")
@click.option("--tls-cert", type=click.Path(dir_okay=False, exists=True, path_type=Path))
@click.option("--tls-key", type=click.Path(dir_okay=False, exists=True, path_type=Path))
@click.option(
    "--operator-port", type=int, default=None, help="Operator API listener with --tls (PORT+1)."
)
@click.option(
    "--insecure-plain-http",
    is_flag=True,
    help="Allow plain HTTP on a non-loopback address (unauthenticated vehicles; not for fleets).",
)
def serve_cmd(
    directory: Path,
    db_url: str | None,
    host: str | None,
    port: int | None,
    workers: int,
    tls: bool = False,
    tls_cert: Path | None = None,
    tls_key: Path | None = None,
    operator_port: int | None = None,
    insecure_plain_http: bool = False,
) -> None:
    """Run the Director HTTP server (migrates the database first).

    With --tls (or --tls-cert/--tls-key): the vehicle listener on PORT requires a
    client certificate from the Director CA and serves each vehicle only its own
    resources; the operator API (bearer token) is on --operator-port; with
    --workers N each of N processes serves both (one that dies stops the server,
    exit 1; on Linux each worker has its own listening sockets, SO_REUSEPORT, so the
    kernel spreads connections over them). Without: plain HTTP, any client reads any vehicle's metadata (demo
    and tests only: refused on a non-loopback address unless
    --insecure-plain-http). See docs/director-scale.md."""
    import uvicorn

    from director.app import create_app
    from director.server import DirectorProtocol

    config = _load(directory, db_url)
    DirectorProtocol.configure(config.connection_limits())
    # httptools on uvloop: the least server CPU per request measured (docs/director-scale.md)
    server_options: dict[str, Any] = {
        "http": DirectorProtocol,
        "loop": "uvloop",
        "timeout_keep_alive": config.keep_alive_timeout,
        "log_level": "info",
        "access_log": False,
    }
    bind_host = host or config.host
    bind_port = config.port if port is None else port
    tls = tls or tls_cert is not None or tls_key is not None
    if not tls:
        check_plain_http(bind_host, insecure_plain_http)
    check_listen(bind_host, bind_port)
    if tls:
        from director.tls import server_context, tls_paths

        ca, cert, key = tls_paths(directory, tls_cert, tls_key)
        server_context(cert, key, ca)  # e.g. a key not of the certificate: one line, now
        operator_port = bind_port + 1 if operator_port is None else operator_port
        check_listen(bind_host, operator_port)
        # where and how both TLS listeners serve, in one process or in workers
        listeners: dict[str, Any] = {
            "host": bind_host,
            "port": bind_port,
            "operator_port": operator_port,
            "cert": cert,
            "key": key,
            "ca": ca,
        }
    director = _open(directory, db_url)  # migrate + import roots once, up front
    if workers > 1:
        director.close()
        from director.workers import run_workers

        ports = [bind_port]
        options = ["--port", str(bind_port), "--keep-alive", str(config.keep_alive_timeout)]
        if tls:
            assert operator_port is not None  # set with the TLS paths above
            ports.append(operator_port)
            options += ["--tls", "--operator-port", str(operator_port)]
            options += ["--cert", str(cert), "--key", str(key), "--ca", str(ca)]
            click.echo(
                f"mutual TLS: vehicles on https://{bind_host}:{bind_port} (client certificate "
                f"required), operator API on https://{bind_host}:{operator_port}, "
                f"{workers} worker processes"
            )
        else:
            click.echo(
                f"PLAIN HTTP on http://{bind_host}:{bind_port}: vehicles are NOT authenticated, "
                "any client reads any vehicle's metadata (demo and tests on loopback only; "
                f"--tls for mutual TLS), {workers} worker processes"
            )
        # a port taken since check_listen: ConfigError, one line (the group's handler)
        failure = run_workers(
            workers,
            directory=Path(directory),
            db_url=db_url,
            host=bind_host,
            ports=ports,
            options=options,
        )
        if failure is not None:
            raise click.ClickException(failure)
        return
    app = create_app(
        director,
        config.token,
        max_body=config.max_body,
        body_timeout=config.body_timeout,
        body_budget=config.body_budget,
        ca_directory=Path(directory),
        read_cache_bytes=config.read_cache_bytes,
    )
    try:
        if tls:
            from director.tls import listener_configs
            from director.tls_serve import serve_listeners

            click.echo(
                f"mutual TLS: vehicles on https://{bind_host}:{bind_port} (client certificate "
                f"required), operator API on https://{bind_host}:{operator_port}"
            )
            server_options.pop("loop")
            served = serve_listeners(listener_configs(app, **listeners, **server_options))
            if not served:
                raise click.ClickException("a TLS listener failed or stopped on its own")
        else:
            click.echo(
                f"PLAIN HTTP on http://{bind_host}:{bind_port}: vehicles are NOT authenticated, "
                "any client reads any vehicle's metadata (demo and tests on loopback only; "
                "--tls for mutual TLS)"
            )
            uvicorn.run(app, host=bind_host, port=bind_port, **server_options)
    finally:
        director.close()


@cli.command("register")
@_dir_option
@_db_option
@click.option("--vin", required=True)
@click.option(
    "--ecu",
    "ecus",
    multiple=True,
    required=True,
    metavar="SERIAL,HARDWARE_ID,KEY.pub.json",
    help="One ECU (repeat for each).",
)
@click.option("--primary", required=True, help="Serial of the primary ECU.")
@click.option(
    "--issue-cert",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    metavar="OUT_DIR",
    help="Also write the vehicle's TLS client certificate, key and the Director CA there.",
)
def register_cmd(
    directory: Path,
    db_url: str | None,
    vin: str,
    ecus: tuple[str, ...],
    primary: str,
    issue_cert: Path | None = None,
) -> None:
    """Register a vehicle and its ECUs' public keys.

    Each --ecu is SERIAL,HARDWARE_ID,KEY.pub.json, the public key file that
    `uptane ecu keygen` writes; --primary names one of the serials.
    """
    from director.service import EcuSpec, check_ecu_key
    from uptane.errors import UptaneError

    specs = []
    for entry in ecus:
        parts = entry.split(",")
        if len(parts) != 3:
            raise click.BadParameter(
                f"{entry!r}: expected SERIAL,HARDWARE_ID,KEY.pub.json", param_hint="--ecu"
            )
        serial, hw, keyfile = parts
        try:
            key_dict = json.loads(Path(keyfile).read_text(encoding="utf-8"))
            key = check_ecu_key(key_dict)
        except OSError as e:
            raise click.BadParameter(
                f"cannot read key file {keyfile}: {e.strerror or e}", param_hint="--ecu"
            ) from None
        except ValueError as e:
            raise click.BadParameter(
                f"key file {keyfile} is not JSON: {e}", param_hint="--ecu"
            ) from None
        except UptaneError as e:
            raise click.BadParameter(f"key file {keyfile}: {e}", param_hint="--ecu") from None
        specs.append(EcuSpec(serial, hw, key, primary=serial == primary))
    if primary not in {spec.serial for spec in specs}:
        raise click.BadParameter(
            f"{primary!r} is not one of the --ecu serials", param_hint="--primary"
        )
    director = _open(directory, db_url)
    try:
        status = director.register_vehicle(vin, specs)
        click.echo(f"registered {status.vin} with {len(status.ecus)} ECUs")
        if issue_cert is not None:
            from director.revocation import record_issued
            from director.tls import issue_vehicle_certificate

            issued = issue_vehicle_certificate(directory, status.vin)
            record_issued(director.db, status.vin, issued.certificate, actor="cli")
            cert_file, key_file, ca_file = issued.write(issue_cert, status.vin)
            click.echo(f"client certificate {cert_file}, key {key_file} (mode 0600), CA {ca_file}")
    finally:
        director.close()


@cli.command("revoke-cert")
@_dir_option
@_db_option
@click.option("--vin", required=True, help="The vehicle.")
@click.option(
    "--serial",
    default=None,
    metavar="HEX",
    help="Only this certificate (also one issued before certificates were recorded).",
)
@click.option("--reason", default="revoked by the operator", show_default=True)
def revoke_cert_cmd(
    directory: Path, db_url: str | None, vin: str, serial: str | None, reason: str
) -> None:
    """Revoke the vehicle's TLS client certificates (stolen, decommissioned): every
    server process refuses them within seconds; the Director CA stays."""
    from director.revocation import REFRESH_SECONDS, revoke

    director = _open(directory, db_url)
    try:
        revoked = revoke(director.db, vin, serial=serial, reason=reason, actor="cli")
    finally:
        director.close()
    for r in revoked:
        click.echo(f"revoked certificate {r.serial} of {r.vin}")
    click.echo(f"vehicle listeners refuse it within {REFRESH_SECONDS:.0f} s")


@cli.command("assign")
@_dir_option
@_db_option
@click.argument("image")
@click.option("--ecu", "ecu_serials", multiple=True, help="ECU serial (repeatable).")
@click.option("--hardware-id", default=None, help="Every ECU with this hardware id.")
@click.option("--vin", "vins", multiple=True, help="Only these vehicles (with --hardware-id).")
@click.option(
    "--workers",
    type=click.IntRange(1, 64),
    default=1,
    show_default=True,
    help="Signer processes re-signing each batch while the next is written (PostgreSQL).",
)
def assign_cmd(
    directory: Path,
    db_url: str | None,
    image: str,
    ecu_serials: tuple[str, ...],
    hardware_id: str | None,
    vins: tuple[str, ...],
    workers: int = 1,
) -> None:
    """Assign IMAGE (a target name of the Image repository) to ECUs.

    Give --ecu SERIAL (repeatable) or --hardware-id HW (every ECU with it,
    optionally only in the --vin vehicles). With --workers N (N > 1) the
    vehicles are re-signed by N processes as each batch commits
    (docs/director-scale.md); by default in this process after the rows.
    """
    if bool(ecu_serials) == (hardware_id is not None):
        raise click.UsageError("give --ecu SERIAL (repeatable) or --hardware-id HW, not both")
    if vins and hardware_id is None:
        raise click.BadParameter("--vin only narrows --hardware-id", param_hint="--vin")
    config = _load(directory, db_url)
    director = _open(directory, db_url)
    try:
        if workers > 1:
            from director.metadata_signer import SignerProcesses

            with SignerProcesses(config, workers) as signers:
                infos = director.assign(
                    image,
                    ecu_serials=list(ecu_serials) or None,
                    hardware_id=hardware_id,
                    vins=list(vins) or None,
                    sign=False,
                )
                signed = signers.finish()
        else:
            infos = director.assign(
                image,
                ecu_serials=list(ecu_serials) or None,
                hardware_id=hardware_id,
                vins=list(vins) or None,
            )
            signed = None
    finally:
        director.close()
    for a in infos:
        click.echo(f"{a.vin} {a.ecu_serial}: {a.image} (assignment {a.id})")
    if signed is not None:
        click.echo(f"re-signed {signed} vehicles with {workers} signer processes")


@cli.command("sign-stale")
@_dir_option
@_db_option
@click.option("--workers", type=click.IntRange(1, 64), default=2, show_default=True)
def sign_stale_cmd(directory: Path, db_url: str | None, workers: int) -> None:
    """Re-sign every vehicle whose metadata is stale, with WORKERS processes (PostgreSQL)."""
    from director.metadata_signer import sign_stale_in_processes

    signed = sign_stale_in_processes(_load(directory, db_url), workers)
    click.echo(f"re-signed {signed} vehicles")


@cli.command("list")
@_dir_option
@_db_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def list_cmd(directory: Path, db_url: str | None, as_json: bool) -> None:
    """Vehicles: per ECU installed image, pending assignment, last result, attacks.

    "last result" is what the ECU last reported (ok, or the failure code and
    its reason, e.g. trialFailed: self_test returned 1).
    """
    director = _open(directory, db_url)
    try:
        vehicles = director.list_vehicles()
    finally:
        director.close()
    if as_json:
        click.echo(json.dumps([_jsonable(asdict(v)) for v in vehicles], indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(
        "VIN", "ECU", "hardware", "installed", "pending", "last result", "last seen", "attacks"
    )
    for v in vehicles:
        pending = {a.ecu_serial: a.image for a in v.pending}
        attacks: dict[str, set[str]] = {}
        for at in v.attacks:
            attacks.setdefault(at.ecu_serial, set()).add(at.attack)
        for i, e in enumerate(v.ecus):
            table.add_row(
                v.vin if i == 0 else "",
                e.serial + (" (primary)" if e.primary else ""),
                e.hardware_id,
                (e.installed or {}).get("filename", "-"),
                pending.get(e.serial, "-"),
                last_result_text(e.last_result, e.last_result_text),
                (v.last_seen.isoformat(timespec="seconds") if v.last_seen else "never")
                if i == 0
                else "",
                ", ".join(sorted(attacks.get(e.serial, ()))) or "-",
            )
    Console(file=sys.stdout, width=None if sys.stdout.isatty() else 240).print(table)


@cli.command("reset-counter")
@_dir_option
@_db_option
@click.option("--vin", required=True, help="The vehicle.")
@click.argument("serial")
@click.option("--reason", required=True, help="Why (recorded in the audit log).")
def reset_counter_cmd(
    directory: Path, db_url: str | None, vin: str, serial: str, reason: str
) -> None:
    """Forget ECU SERIAL's report counter (reflashed or jammed ECU), with an audit entry."""
    director = _open(directory, db_url)
    try:
        entry = director.reset_report_counter(vin, serial, reason=reason, actor="cli")
    finally:
        director.close()
    previous = entry.detail.get("previous_counter")
    click.echo(f"{vin} {serial}: report counter reset (was {previous}); audit entry {entry.id}")


@cli.command("import")
@_dir_option
@_db_option
@click.argument("file", type=click.Path(dir_okay=False, exists=True, path_type=Path))
@click.option("--batch", type=click.IntRange(1, 10_000), default=500, show_default=True)
def import_cmd(directory: Path, db_url: str | None, file: Path, batch: int) -> None:
    """Register the vehicles of FILE (.csv or .json) in batches; safe to run again."""
    from director.bulk import load_vehicles

    records = load_vehicles(file)
    director = _open(directory, db_url)
    try:
        result = director.import_vehicles(records, batch=batch)
    finally:
        director.close()
    click.echo(
        f"{result.added} vehicles registered, {result.unchanged} already there, "
        f"{len(result.conflicts)} conflicts"
    )
    for conflict in result.conflicts[:20]:
        click.echo(f"conflict: {conflict}")
    if result.conflicts:
        raise SystemExit(1)


# fleet rollout control (issue 14): campaign, quarantine, attributes
for _command in _FLEET_COMMANDS:
    cli.add_command(_command)

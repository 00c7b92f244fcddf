"""``uptane image-repo``: offline edits and HTTP serving of an Image repository.

A thin wrapper over ``image_repo.repo.ImageRepository``; every refusal is a
one-line ``Error: ...`` and exit status 1, with the repository left
unchanged. The repository modules (tuf, wasmtime, the HTTP server) are
imported inside the commands, so ``--help`` is quick.
"""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from uptane.cli import PartGroup, check_listen

if TYPE_CHECKING:
    from image_repo.repo import ImageRepository
    from image_repo.status import RepoStatus

# image_repo.server's defaults, repeated so that --help needs no import of the server
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8001

_DIR = click.argument("repo_dir", metavar="DIR", type=click.Path(path_type=Path))


def _repo(repo_dir: Path) -> ImageRepository:
    from image_repo.repo import ImageRepository

    return ImageRepository(repo_dir)


def _keyref(path: Path) -> Any:
    from uptane.keys import keyref_from_public_file

    return keyref_from_public_file(path)


@click.group(name="image-repo", cls=PartGroup)
def cli() -> None:
    """Manage an Uptane Image repository (offline keys, supplier delegations).

    Every command takes the repository directory DIR first.
    """


@cli.command()
@_DIR
@click.option(
    "--keys-dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Where to write the keys (default DIR/keys).",
)
@click.option("--root-threshold", type=click.IntRange(min=1), default=2, show_default=True)
@click.option("--targets-threshold", type=click.IntRange(min=1), default=2, show_default=True)
def init(
    repo_dir: Path, keys_dir: Path | None, root_threshold: int, targets_threshold: int
) -> None:
    """Create a repository in DIR: keys and version 1 of every role."""
    from image_repo.repo import ImageRepository

    repo = ImageRepository.init(
        repo_dir,
        keys_dir=keys_dir,
        root_threshold=root_threshold,
        targets_threshold=targets_threshold,
    )
    click.echo(f"initialised image repository in {repo.path}")


_ADD_HELP = """Add or replace the WASM image IMAGE as a target.

\b
The module is checked against what is signed before anything changes: it
must import exactly the host functions its --capability options grant and
export what the secondary calls.
\b
Capabilities (--capability) and the imports they grant, from module "uptane":
  log             log(i32 ptr, i32 len): UTF-8 text in memory to the ECU log
  health          health(i32 code): 0 = healthy, anything else fails a trial
  sensor.read     sensor_read(i32 channel) -> i64: read a sensor
  actuator.write  actuator_write(i32 channel, i64 value) -> i32: 0 written, -1 refused
\b
Exports:
  memory                    one 32-bit memory, at most --memory-pages pages
  self_test() -> i32        0 = pass (run once per trial)
  tick(i64 t) -> i64        the app's output at tick t (--fuel per call)
  version() -> i32          optional: the app's own version
\b
A minimal app (no capability; compile with wat2wasm, or
python -c "import wasmtime,sys; sys.stdout.buffer.write(wasmtime.wat2wasm(open('app.wat').read()))"):
  (module
    (memory (export "memory") 1)
    (func (export "self_test") (result i32) (i32.const 0))
    (func (export "tick") (param $t i64) (result i64) (local.get $t)))
\b
Full ABI: docs/wasm-abi.md.
"""


@cli.command(help=_ADD_HELP, short_help="Add or replace a WASM image as a target.")
@_DIR
@click.argument("image", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "--hardware-id", "hardware_ids", multiple=True, required=True, help="ECU type (repeatable)."
)
@click.option(
    "--release-counter",
    type=click.IntRange(min=0),
    required=True,
    help="Never lower than a counter published before for this name.",
)
@click.option("--name", help="Target name (default: the file's basename).")
@click.option(
    "--capability",
    "capabilities",
    multiple=True,
    type=click.Choice(["log", "health", "sensor.read", "actuator.write"]),
    help="A host function group the module may import (repeatable).",
)
@click.option("--fuel", type=click.IntRange(min=1), help="limits.fuel_per_call (per call).")
@click.option(
    "--memory-pages", type=click.IntRange(min=1), help="limits.memory_pages (64 KiB pages)."
)
@click.option("--role", default="targets", show_default=True, help="Targets role to sign.")
@click.option("--delta-from", metavar="NAME@V", help="Also publish a delta from release V of NAME.")
@click.option(
    "--delta", "delta_auto", is_flag=True, help="Also publish a delta from the previous release."
)
def add(
    repo_dir: Path,
    image: Path,
    hardware_ids: tuple[str, ...],
    release_counter: int,
    name: str | None,
    capabilities: tuple[str, ...],
    fuel: int | None,
    memory_pages: int | None,
    role: str,
    delta_from: str | None,
    delta_auto: bool,
) -> None:
    from image_repo.delta import add_delta_from, describe_delta, parse_release
    from uptane.metadata import Limits

    if delta_from is not None:
        parse_release(delta_from)  # refuse a bad spec before anything is published
    limit_args: dict[str, Any] = {}
    if fuel is not None:
        limit_args["fuel_per_call"] = fuel
    if memory_pages is not None:
        limit_args["memory_pages"] = memory_pages
    target = _repo(repo_dir).add_target_file(
        image,
        name=name,
        hardware_ids=hardware_ids,
        release_counter=release_counter,
        capabilities=capabilities,
        limits=Limits(**limit_args),
        role=role,
    )
    click.echo(
        f"added {target.path} to {role} (release counter {release_counter}, "
        f"sha256 {target.hashes['sha256']})"
    )
    if delta_from is not None or delta_auto:
        click.echo(
            describe_delta(add_delta_from(_repo(repo_dir), target.path, delta_from, role=role))
        )


@cli.command()
@_DIR
@click.argument("name")
@click.option("--role", default="targets", show_default=True)
def remove(repo_dir: Path, name: str, role: str) -> None:
    """Stop publishing target NAME."""
    _repo(repo_dir).remove_target(name, role=role)
    click.echo(f"removed {name} from {role}")


@cli.command()
@_DIR
@click.argument("supplier")
@click.option("--path", "paths", multiple=True, required=True, help="Path pattern (glob).")
@click.option("--hardware-id", "hardware_ids", multiple=True, required=True)
@click.option(
    "--key",
    "keys",
    multiple=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Supplier public key NAME.pub.json (its private part, if held, is NAME.pem).",
)
@click.option("--threshold", type=click.IntRange(min=1), default=1, show_default=True)
def delegate(
    repo_dir: Path,
    supplier: str,
    paths: tuple[str, ...],
    hardware_ids: tuple[str, ...],
    keys: tuple[Path, ...],
    threshold: int,
) -> None:
    """Delegate PATH patterns for hardware ids to role SUPPLIER."""
    refs = [_keyref(k) for k in keys] if keys else None
    made = _repo(repo_dir).delegate(
        supplier, paths=paths, hardware_ids=hardware_ids, keys=refs, threshold=threshold
    )
    click.echo(f"delegated {', '.join(paths)} to {supplier}")
    for ref in made:
        click.echo(f"  key {ref.keyid} ({ref.uri})")


@cli.command()
@_DIR
@click.option(
    "--role", "roles", multiple=True, help="Role to re-sign (default snapshot+timestamp)."
)
@click.option(
    "--expires-in", type=click.IntRange(min=1), help="Days until the new versions expire."
)
def resign(repo_dir: Path, roles: tuple[str, ...], expires_in: int | None) -> None:
    """Re-sign roles with new versions and expiry."""
    done = _repo(repo_dir).resign(
        roles or None, expires_in=timedelta(days=expires_in) if expires_in else None
    )
    click.echo(f"re-signed {', '.join(done)}")


@cli.command(name="rotate-key")
@_DIR
@click.argument("role")
@click.option(
    "--old",
    "old_keyid",
    required=True,
    help="Keyid (or unique prefix) to retire; `status` lists each role's key ids.",
)
@click.option(
    "--new-key",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="New public key NAME.pub.json (default: generate one into the keys dir).",
)
def rotate_key(repo_dir: Path, role: str, old_keyid: str, new_key: Path | None) -> None:
    """Replace a key of ROLE (root: a new root version signed by old and new keys)."""
    ref = _keyref(new_key) if new_key is not None else None
    made = _repo(repo_dir).rotate_key(role, old_keyid, ref)
    click.echo(f"rotated a key of {role}: new key {made.keyid} ({made.uri})")


def _print_status(status: RepoStatus) -> None:
    for r in status.roles:
        where = f" delegated by {r.delegated_by}" if r.delegated_by else ""
        ok = "ok" if r.signed else "UNDER THRESHOLD"
        click.echo(
            f"{r.name:<12} v{r.version:<4} expires {r.expires.isoformat()}  "
            f"{r.valid_signatures}/{r.threshold} signatures {ok}{where}"
        )
        click.echo(f"{'':12} keys {', '.join(r.keyids) or 'none'}")
        if r.paths:
            hw = ", ".join(r.hardware_ids or ("any",))
            click.echo(f"{'':12} paths {', '.join(r.paths)}; hardware ids {hw}")
    click.echo(f"{len(status.targets)} target(s)")
    for t in status.targets:
        hw = ", ".join(t.custom.get("hardware_ids", []))
        click.echo(
            f"  {t.name} [{t.role}] {t.length} bytes, release counter "
            f"{t.custom.get('release_counter')}, hardware ids {hw}"
        )


@cli.command()
@_DIR
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def status(repo_dir: Path, as_json: bool) -> None:
    """Show roles (version, expiry, signatures, key ids) and targets."""
    st = _repo(repo_dir).status()
    if as_json:
        click.echo(json.dumps(st.to_dict(), indent=2, sort_keys=True))
    else:
        _print_status(st)


@cli.command(name="serve")
@_DIR
@click.option("--host", default=DEFAULT_HOST, show_default=True)
@click.option("--port", type=click.IntRange(0, 65535), default=DEFAULT_PORT, show_default=True)
def serve_cmd(repo_dir: Path, host: str, port: int) -> None:
    """Serve DIR/metadata and DIR/targets over HTTP."""
    from image_repo.server import serve

    _repo(repo_dir)  # refuse a directory that is not a repository
    check_listen(host, port)
    serve(repo_dir, host=host, port=port)

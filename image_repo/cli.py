"""``uptane image-repo``: offline edits and HTTP serving of an Image repository.

A thin wrapper over ``image_repo.repo.ImageRepository``; every refusal is a
one-line message and exit status 1, with the repository left unchanged.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

import click

from image_repo.delta import add_delta_from, describe_delta, parse_release
from image_repo.repo import ImageRepository, RepoStatus
from image_repo.server import DEFAULT_HOST, DEFAULT_PORT, serve
from uptane.errors import UptaneError
from uptane.keys import keyref_from_public_file
from uptane.metadata import Limits

P = ParamSpec("P")
R = TypeVar("R")

_DIR = click.argument("repo_dir", metavar="DIR", type=click.Path(path_type=Path))


def _refusals(fn: Callable[P, R]) -> Callable[P, R]:
    """Turn a typed project error into a click error (message, exit status 1)."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return fn(*args, **kwargs)
        except UptaneError as e:
            raise click.ClickException(f"refused ({type(e).__name__}): {e}") from e

    return wrapper


@click.group(name="image-repo")
def cli() -> None:
    """Manage an Uptane Image repository (offline keys, supplier delegations)."""


@cli.command()
@_DIR
@click.option(
    "--keys-dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Where to write the keys (default DIR/keys).",
)
@click.option("--root-threshold", type=click.IntRange(min=1), default=2, show_default=True)
@click.option("--targets-threshold", type=click.IntRange(min=1), default=2, show_default=True)
@_refusals
def init(
    repo_dir: Path, keys_dir: Path | None, root_threshold: int, targets_threshold: int
) -> None:
    """Create a repository in DIR: keys and version 1 of every role."""
    repo = ImageRepository.init(
        repo_dir,
        keys_dir=keys_dir,
        root_threshold=root_threshold,
        targets_threshold=targets_threshold,
    )
    click.echo(f"initialised image repository in {repo.path}")


@cli.command()
@_DIR
@click.argument("image", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--hardware-id", "hardware_ids", multiple=True, required=True)
@click.option("--release-counter", type=click.IntRange(min=0), required=True)
@click.option("--name", help="Target name (default: the file's basename).")
@click.option("--capability", "capabilities", multiple=True)
@click.option("--fuel", type=int, help="limits.fuel_per_call")
@click.option("--memory-pages", type=int, help="limits.memory_pages")
@click.option("--role", default="targets", show_default=True, help="Targets role to sign.")
@click.option("--delta-from", metavar="NAME@V", help="Also publish a delta from release V of NAME.")
@click.option(
    "--delta", "delta_auto", is_flag=True, help="Also publish a delta from the previous release."
)
@_refusals
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
    """Add or replace a WASM image IMAGE as a target."""
    if delta_from is not None:
        parse_release(delta_from)  # refuse a bad spec before anything is published
    limit_args: dict[str, Any] = {}
    if fuel is not None:
        limit_args["fuel_per_call"] = fuel
    if memory_pages is not None:
        limit_args["memory_pages"] = memory_pages
    target = ImageRepository(repo_dir).add_target_file(
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
            describe_delta(
                add_delta_from(ImageRepository(repo_dir), target.path, delta_from, role=role)
            )
        )


@cli.command()
@_DIR
@click.argument("name")
@click.option("--role", default="targets", show_default=True)
@_refusals
def remove(repo_dir: Path, name: str, role: str) -> None:
    """Stop publishing target NAME."""
    ImageRepository(repo_dir).remove_target(name, role=role)
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
@_refusals
def delegate(
    repo_dir: Path,
    supplier: str,
    paths: tuple[str, ...],
    hardware_ids: tuple[str, ...],
    keys: tuple[Path, ...],
    threshold: int,
) -> None:
    """Delegate PATH patterns for hardware ids to role SUPPLIER."""
    refs = [keyref_from_public_file(k) for k in keys] if keys else None
    made = ImageRepository(repo_dir).delegate(
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
@_refusals
def resign(repo_dir: Path, roles: tuple[str, ...], expires_in: int | None) -> None:
    """Re-sign roles with new versions and expiry."""
    done = ImageRepository(repo_dir).resign(
        roles or None, expires_in=timedelta(days=expires_in) if expires_in else None
    )
    click.echo(f"re-signed {', '.join(done)}")


@cli.command(name="rotate-key")
@_DIR
@click.argument("role")
@click.option("--old", "old_keyid", required=True, help="Keyid (or unique prefix) to retire.")
@click.option(
    "--new-key",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="New public key NAME.pub.json (default: generate one into the keys dir).",
)
@_refusals
def rotate_key(repo_dir: Path, role: str, old_keyid: str, new_key: Path | None) -> None:
    """Replace a key of ROLE (root: a new root version signed by old and new keys)."""
    ref = keyref_from_public_file(new_key) if new_key is not None else None
    made = ImageRepository(repo_dir).rotate_key(role, old_keyid, ref)
    click.echo(f"rotated a key of {role}: new key {made.keyid} ({made.uri})")


def _print_status(status: RepoStatus) -> None:
    for r in status.roles:
        where = f" delegated by {r.delegated_by}" if r.delegated_by else ""
        ok = "ok" if r.signed else "UNDER THRESHOLD"
        click.echo(
            f"{r.name:<12} v{r.version:<4} expires {r.expires.isoformat()}  "
            f"{r.valid_signatures}/{r.threshold} signatures {ok}{where}"
        )
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
@_refusals
def status(repo_dir: Path, as_json: bool) -> None:
    """Show roles, versions, expiries and targets."""
    st = ImageRepository(repo_dir).status()
    if as_json:
        click.echo(json.dumps(st.to_dict(), indent=2, sort_keys=True))
    else:
        _print_status(st)


@cli.command(name="serve")
@_DIR
@click.option("--host", default=DEFAULT_HOST, show_default=True)
@click.option("--port", type=click.IntRange(0, 65535), default=DEFAULT_PORT, show_default=True)
@_refusals
def serve_cmd(repo_dir: Path, host: str, port: int) -> None:
    """Serve DIR/metadata and DIR/targets over HTTP."""
    ImageRepository(repo_dir)  # refuse a directory that is not a repository
    serve(repo_dir, host=host, port=port)

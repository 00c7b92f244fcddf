"""Director/Image agreement on targets (Uptane 2.1, 5.4.4.2 step 7; TAP 4 map).

The repository map says which repositories must agree on which target
paths. Uptane needs both the Director and the Image repository to sign off
every image, so a valid map here names exactly those two in every mapping,
with threshold 2. ``match_target`` is the agreement check itself.

``find_image_target`` resolves a target through the Image repository's
delegations the way python-tuf's ngclient does (preorder depth-first,
paths only, terminating delegations end the search) and also returns the
chain of delegations that led to it; ``check_delegated_hardware`` then
requires every delegation on that chain to allow the ECU's hardware
("How to resolve delegations", step 4.1): a supplier's key cannot sign
images for hardware outside its delegation.
"""

from __future__ import annotations

import fnmatch
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final
from urllib.parse import urlsplit

from tuf.api import exceptions as tuf_exc
from tuf.api.metadata import DelegatedRole, SuccinctRoles, TargetFile, Targets

from uptane.errors import (
    ConfigError,
    DelegationViolationError,
    MetadataError,
    TargetMismatchError,
)
from uptane.metadata import (
    ECU_SERIAL,
    HARDWARE_IDS,
    UptaneTarget,
    check_identifier,
    shall_match,
)
from uptane.verification.full import VerifiedRepository

DIRECTOR: Final = "director"
IMAGE: Final = "image"
MAX_MAP_SIZE: Final = 1_000_000
#: Most targets roles one lookup visits: ngclient's ``UpdaterConfig.max_delegations``.
MAX_DELEGATIONS: Final = 32


@dataclass(frozen=True)
class MapEntry:
    """One TAP 4 mapping: target path patterns -> repositories that must agree."""

    paths: tuple[str, ...]
    repositories: tuple[str, ...]
    threshold: int
    terminating: bool

    def matches(self, target_path: str) -> bool:
        return any(fnmatch.fnmatchcase(target_path, p) for p in self.paths)


@dataclass(frozen=True)
class RepositoryMap:
    """A TAP 4 repository map restricted to what Uptane full verification needs."""

    repositories: Mapping[str, tuple[str, ...]]
    mapping: tuple[MapEntry, ...]

    @property
    def director_urls(self) -> tuple[str, ...]:
        return self.repositories[DIRECTOR]

    @property
    def image_urls(self) -> tuple[str, ...]:
        return self.repositories[IMAGE]

    def entry_for(self, target_path: str) -> MapEntry | None:
        """The first mapping whose patterns match ``target_path`` (TAP 4 order)."""
        for entry in self.mapping:
            if entry.matches(target_path):
                return entry
        return None

    def check_covered(self, target_path: str) -> MapEntry:
        """Raise ``TargetMismatchError`` if no mapping covers ``target_path``."""
        entry = self.entry_for(target_path)
        if entry is None:
            raise TargetMismatchError(
                f"no repository mapping covers target {target_path!r}: it cannot be verified"
            )
        return entry

    @classmethod
    def from_bytes(cls, data: bytes) -> RepositoryMap:
        if len(data) > MAX_MAP_SIZE:
            raise ConfigError(f"repository map is over {MAX_MAP_SIZE} bytes")
        try:
            raw = json.loads(data)
        except ValueError as e:
            raise ConfigError(f"repository map is not valid JSON: {e}") from e
        return cls.from_dict(raw)

    @classmethod
    def from_dict(cls, raw: Any) -> RepositoryMap:
        """Parse and validate a map; every problem is a ``ConfigError``."""
        if not isinstance(raw, dict) or set(raw) - {"repositories", "mapping"}:
            raise ConfigError("repository map must be an object with 'repositories' and 'mapping'")
        repos_raw = raw.get("repositories")
        if not isinstance(repos_raw, dict) or set(repos_raw) != {DIRECTOR, IMAGE}:
            raise ConfigError(
                f"repository map 'repositories' must name exactly {DIRECTOR!r} and {IMAGE!r}"
            )
        repositories: dict[str, tuple[str, ...]] = {}
        for name, urls in repos_raw.items():
            if not isinstance(urls, list) or not urls:
                raise ConfigError(f"repository {name!r} must have a non-empty list of URLs")
            for url in urls:
                parts = urlsplit(url) if isinstance(url, str) else None
                if parts is None or parts.scheme not in ("http", "https") or not parts.netloc:
                    raise ConfigError(f"repository {name!r}: {url!r} is not an http(s) URL")
            repositories[name] = tuple(u.rstrip("/") for u in urls)
        mapping_raw = raw.get("mapping")
        if not isinstance(mapping_raw, list) or not mapping_raw:
            raise ConfigError("repository map 'mapping' must be a non-empty list")
        mapping = tuple(_parse_entry(i, e) for i, e in enumerate(mapping_raw))
        return cls(repositories=repositories, mapping=mapping)


def _parse_entry(index: int, raw: Any) -> MapEntry:
    where = f"repository map mapping[{index}]"
    if not isinstance(raw, dict):
        raise ConfigError(f"{where} must be an object")
    paths = raw.get("paths")
    repos = raw.get("repositories")
    threshold = raw.get("threshold", 1)
    terminating = raw.get("terminating", False)
    if not isinstance(paths, list) or not paths or not all(isinstance(p, str) and p for p in paths):
        raise ConfigError(f"{where}: 'paths' must be a non-empty list of patterns")
    if not isinstance(repos, list) or sorted(repos) != sorted([DIRECTOR, IMAGE]):
        raise ConfigError(
            f"{where}: 'repositories' must be [{DIRECTOR!r}, {IMAGE!r}]: Uptane needs "
            "both repositories to agree on every image (5.4.4.2)"
        )
    if isinstance(threshold, bool) or threshold != 2:
        raise ConfigError(f"{where}: 'threshold' must be 2 (Director and Image must agree)")
    if not isinstance(terminating, bool):
        raise ConfigError(f"{where}: 'terminating' must be true or false")
    return MapEntry(
        paths=tuple(paths), repositories=tuple(repos), threshold=2, terminating=terminating
    )


def match_target(director: TargetFile, image: TargetFile | None) -> None:
    """The Image repository must have the Director's target, identically (5.4.4.2 step 7).

    Same name (``image`` is what the Image repository returns for the
    Director's name, through its delegations), same length, every hash the
    Director lists equal to the Image repository's, and equal SHALL-match
    custom fields. Raises ``TargetMismatchError``; ``MetadataError`` when
    either target's ``custom`` is missing or not an object.
    """
    name = director.path
    if image is None:
        raise TargetMismatchError(f"Director target {name!r} is not in the Image repository")
    if image.path != name:
        raise TargetMismatchError(f"Image repository returned {image.path!r} for {name!r}")
    if director.length != image.length:
        raise TargetMismatchError(
            f"{name!r}: Director length {director.length} != Image repository {image.length}"
        )
    for algorithm, digest in director.hashes.items():
        other = image.hashes.get(algorithm)
        if other is None:
            raise TargetMismatchError(
                f"{name!r}: Image repository has no {algorithm} hash to compare with the Director's"
            )
        if other != digest:
            raise TargetMismatchError(
                f"{name!r}: {algorithm} differs between Director and Image repository"
            )
    d_fields = shall_match(director.custom, f"Director target {name!r}")
    i_fields = shall_match(image.custom, f"Image repository target {name!r}")
    if d_fields != i_fields:
        differing = sorted(k for k in d_fields if d_fields[k] != i_fields[k])
        raise TargetMismatchError(
            f"{name!r}: custom fields {differing} differ between Director and Image repository"
        )


# --- delegations of the Image repository ---------------------------------------


@dataclass(frozen=True)
class DelegationStep:
    """One delegation on the way from top-level targets to an image's signer."""

    role: str
    delegation: DelegatedRole | SuccinctRoles

    @property
    def hardware_ids(self) -> tuple[str, ...] | None:
        """Hardware ids the delegation allows (``custom.hardware_ids``); None: any.

        Raises ``MetadataError`` when the field is there but malformed.
        """
        custom = self.delegation.unrecognized_fields.get("custom")
        if custom is None:
            return None
        if not isinstance(custom, Mapping):
            raise MetadataError(f"delegation {self.role!r}: custom must be an object")
        if HARDWARE_IDS not in custom:
            return None
        hw = custom[HARDWARE_IDS]
        if not isinstance(hw, list):
            raise MetadataError(f"delegation {self.role!r}: custom.hardware_ids must be a list")
        return tuple(check_identifier(h, "hardware id") for h in hw)


@dataclass(frozen=True)
class ImageTarget:
    """An Image repository target, the role that signed it and how that role got there.

    ``chain`` runs from the delegation made by top-level targets to the one
    naming ``role``; it is empty when top-level targets lists the image.
    """

    target: TargetFile
    role: str
    chain: tuple[DelegationStep, ...] = ()


def find_image_target(
    image: VerifiedRepository, path: str, *, max_delegations: int = MAX_DELEGATIONS
) -> ImageTarget | None:
    """Look ``path`` up through the verified delegations of ``image`` (5.4.4.2 step 7).

    The same walk as ngclient's ``Updater.get_targetinfo``: preorder
    depth-first from top-level targets, following delegations in listed
    order whose paths match (``DelegatedRole.is_delegated_path``), visiting a
    role once, ending at a terminating delegation (and at succinct ones,
    TAP 15), visiting at most ``max_delegations`` roles. Returns None when no
    role lists ``path``. A role the walk needs that is not in
    ``image.delegated`` raises ``RepositoryError``: it was never verified;
    one whose signatures do not satisfy the delegation the walk followed to
    it (not in ``image.edges``) raises ``UnsignedMetadataError``.
    """
    stack: list[tuple[str, tuple[DelegationStep, ...]]] = [(Targets.type, ())]
    visited: set[str] = set()
    while stack and len(visited) <= max_delegations:
        role, chain = stack.pop()
        if role in visited:
            continue
        targets = image.targets if role == Targets.type else image.delegated.get(role)
        if targets is None:
            raise tuf_exc.RepositoryError(
                f"{image.name}: role {role!r}, delegated for {path!r}, was not verified"
            )
        # the role must satisfy the delegation walked to it, not any delegator's
        delegator = Targets.type if len(chain) < 2 else chain[-2].role
        if chain and (delegator, role) not in image.edges:
            raise tuf_exc.UnsignedMetadataError(
                f"{image.name}: role {role!r} is not signed by the keys {delegator!r} "
                f"delegates it to"
            )
        found = targets.targets.get(path)
        if found is not None:
            return ImageTarget(found, role, chain)
        visited.add(role)
        delegations = targets.delegations
        if delegations is None:
            continue
        children: list[tuple[str, tuple[DelegationStep, ...]]] = []
        if delegations.roles is not None:
            for child in delegations.roles.values():
                if not child.is_delegated_path(path):
                    continue
                children.append((child.name, (*chain, DelegationStep(child.name, child))))
                if child.terminating:
                    stack = []
                    break
        elif delegations.succinct_roles is not None:
            succinct = delegations.succinct_roles
            name = succinct.get_role_for_target(path)
            children.append((name, (*chain, DelegationStep(name, succinct))))
            stack = []  # succinct delegations are terminating
        stack.extend(reversed(children))
    return None


def check_delegated_hardware(
    found: ImageTarget, ecu_hardware_id: str, hardware_ids: tuple[str, ...] | None = None
) -> None:
    """Every delegation that led to an image must allow its hardware (5.4.4.2 step 7).

    Uptane 2.1 "How to resolve delegations", step 4.1: a delegation applies
    to an image only if it includes the image's hardware identifier. Here
    the ECU's hardware id and every hardware id the image lists must be in
    the ``custom.hardware_ids`` of each delegation on ``found.chain`` that
    has one. Unlike the Standard's search, which skips a delegation that
    does not apply and looks further, this refuses: ``found`` is what
    ngclient's path-only walk returned and the primary installs, so a
    mismatch means a role signed outside its delegation. Raises
    ``DelegationViolationError`` (``MetadataError`` for a malformed field).

    ``hardware_ids``: the image's hardware ids when the caller already has
    them validated, e.g. the Director's copy once ``match_target`` proved the
    Image repository's equal (issue 16: one parse per target); otherwise
    they are parsed from ``found.target``.
    """
    if hardware_ids is None:
        hardware_ids = UptaneTarget.from_target_file(found.target).hardware_ids
    wanted = tuple(dict.fromkeys((ecu_hardware_id, *hardware_ids)))
    for step in found.chain:
        allowed = step.hardware_ids
        if allowed is None:
            continue
        outside = [h for h in wanted if h not in allowed]
        if outside:
            raise DelegationViolationError(
                f"{found.target.path!r} is signed by role {found.role!r} through delegation "
                f"{step.role!r}, which allows hardware ids [{', '.join(allowed)}], "
                f"not {', '.join(outside)}"
            )


def match_director_targets(
    director: Targets,
    by_ecu: Mapping[str, UptaneTarget],
    image: VerifiedRepository,
    ecu_hardware_ids: Mapping[str, str],
) -> dict[str, TargetFile]:
    """Match every Director target with the Image repository's (5.4.4.2 step 7).

    ``by_ecu`` is what ``check_director_targets`` parsed from ``director``.
    For each: ``find_image_target`` (the same walk as ngclient's, telling
    which delegations led to the image), ``match_target``, and
    ``check_delegated_hardware`` for the ECU's hardware. Returns the Image
    repository's ``TargetFile`` by target name.

    Each target's Uptane fields are parsed once (issue 16): ``match_target``
    proves the image's SHALL-match fields equal to the Director's, which
    ``UptaneTarget`` validated, and its path equal to the Director's name, so
    of what parsing the image's copy would check only its own ``ecu_serial``
    is left, and that is checked here.
    """
    infos: dict[str, TargetFile] = {}
    for serial, target in by_ecu.items():
        found = find_image_target(image, target.name)
        match_target(director.targets[target.name], None if found is None else found.target)
        assert found is not None  # match_target refused None
        image_serial = found.target.custom.get(ECU_SERIAL)  # a Mapping: match_target checked
        if image_serial is not None:
            check_identifier(image_serial, "ecu_serial")
        check_delegated_hardware(found, ecu_hardware_ids[serial], target.hardware_ids)
        infos[target.name] = found.target
    return infos

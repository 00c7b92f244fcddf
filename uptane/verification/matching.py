"""Director/Image agreement on targets (Uptane 2.1, 5.4.4.2 step 7; TAP 4 map).

The repository map says which repositories must agree on which target
paths. Uptane needs both the Director and the Image repository to sign off
every image, so a valid map here names exactly those two in every mapping,
with threshold 2. ``match_target`` is the agreement check itself.
"""

from __future__ import annotations

import fnmatch
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final
from urllib.parse import urlsplit

from tuf.api.metadata import TargetFile

from uptane.errors import ConfigError, TargetMismatchError
from uptane.metadata import shall_match

DIRECTOR: Final = "director"
IMAGE: Final = "image"
MAX_MAP_SIZE: Final = 1_000_000


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
    custom fields. Raises ``TargetMismatchError``.
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
    d_fields, i_fields = shall_match(director.custom), shall_match(image.custom)
    if d_fields != i_fields:
        differing = sorted(k for k in d_fields if d_fields[k] != i_fields[k])
        raise TargetMismatchError(
            f"{name!r}: custom fields {differing} differ between Director and Image repository"
        )

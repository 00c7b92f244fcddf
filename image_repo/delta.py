"""Signed deltas in the Image repository (docs/deltas.md; Uptane 2.1, 5.3.3).

``add_delta`` publishes, beside a full image, a delta target: a detools
sequential patch (heatshrink-compressed, so an ECU applies it in a few KiB
of memory) from an earlier release of the image, whose ``custom.delta``
names base and result by length and hashes (``uptane.delta``). It is signed
in the same targets role as the image, in one all-or-nothing edit. The base
is any earlier release the repository published (``NAME@RELEASE_COUNTER``),
found in the versioned targets metadata it keeps, or by default the latest
earlier release of the same name.
"""

from __future__ import annotations

import hashlib
import io
import re
from pathlib import Path
from typing import Final

import detools
from tuf.api.metadata import Metadata, TargetFile, Targets

from image_repo.repo import TARGET_HASH_ALGORITHMS, ImageRepository
from uptane.delta import DELTA, DELTA_FORMAT, NAME_HASH, DeltaInfo, ImageRef, delta_name
from uptane.errors import DelegationViolationError, RepositoryEditError
from uptane.metadata import HARDWARE_IDS, RELEASE_COUNTER, build_custom, check_target_path

#: heatshrink window and lookahead (log2): 512 B window, 256 B lookahead. The
#: ECU's decoder memory follows from them (``ecus.secondary.delta``).
HEATSHRINK_WINDOW_SZ2: Final = 9
HEATSHRINK_LOOKAHEAD_SZ2: Final = 8
_SPEC_RE: Final = re.compile(r"^(?P<name>.+)@(?P<counter>[0-9]{1,19})\Z")
_VERSIONED_TARGETS_RE: Final = re.compile(r"^[0-9]+\.(?P<role>[A-Za-z][A-Za-z0-9_-]*)\.json\Z")


def make_delta(base: bytes, result: bytes) -> bytes:
    """A detools sequential, heatshrink-compressed patch turning ``base`` into ``result``."""
    out = io.BytesIO()
    detools.create_patch(
        io.BytesIO(base),
        io.BytesIO(result),
        out,
        compression="heatshrink",
        patch_type="sequential",
        heatshrink_window_sz2=HEATSHRINK_WINDOW_SZ2,
        heatshrink_lookahead_sz2=HEATSHRINK_LOOKAHEAD_SZ2,
    )
    patch = out.getvalue()
    check = io.BytesIO()
    detools.apply_patch(io.BytesIO(base), io.BytesIO(patch), check)
    if check.getvalue() != result:  # pragma: no cover - a detools bug, never seen
        raise RepositoryEditError("the delta does not reproduce the image")
    return patch


def parse_release(spec: str) -> tuple[str, int]:
    """``NAME@RELEASE_COUNTER`` -> (name, counter)."""
    m = _SPEC_RE.match(spec)
    if m is None:
        raise RepositoryEditError(f"--delta-from {spec!r}: expected NAME@RELEASE_COUNTER")
    return check_target_path(m["name"]), int(m["counter"])


def releases(repo: ImageRepository, name: str) -> list[TargetFile]:
    """Every release of ``name`` the repository ever published whose bytes it still holds.

    Read from the versioned targets metadata (consistent snapshots keep
    every version), one entry per distinct sha256, oldest counter first.
    """
    found: dict[str, TargetFile] = {}
    for path in sorted(repo.metadata_dir.glob("*.json")):
        if _VERSIONED_TARGETS_RE.match(path.name) is None:
            continue
        try:
            md = Metadata[Targets].from_bytes(path.read_bytes())
        except Exception:  # not a targets role (root, snapshot): skip
            continue
        if not isinstance(md.signed, Targets):
            continue
        target = md.signed.targets.get(name)
        if target is None or DELTA in (target.custom or {}):
            continue
        if repo.blob_path(target).is_file():
            found.setdefault(target.hashes["sha256"], target)
    return sorted(found.values(), key=lambda t: (_counter(t), t.hashes["sha256"]))


def _counter(target: TargetFile) -> int:
    counter = (target.custom or {}).get(RELEASE_COUNTER)
    return counter if isinstance(counter, int) else -1


def find_release(repo: ImageRepository, name: str, release_counter: int) -> TargetFile:
    """The published release ``release_counter`` of ``name`` (the latest if several)."""
    matches = [t for t in releases(repo, name) if _counter(t) == release_counter]
    if not matches:
        raise RepositoryEditError(
            f"no published release {release_counter} of {name!r} to make a delta from"
        )
    return matches[-1]


def previous_release(repo: ImageRepository, name: str, current: TargetFile) -> TargetFile | None:
    """The latest earlier release of ``name``: highest counter, other bytes than ``current``."""
    older = [
        t
        for t in releases(repo, name)
        if t.hashes["sha256"] != current.hashes["sha256"] and _counter(t) <= _counter(current)
    ]
    return older[-1] if older else None


def _read_blob(repo: ImageRepository, target: TargetFile) -> bytes:
    path: Path = repo.blob_path(target)
    data = path.read_bytes()
    for alg, digest in target.hashes.items():
        if hashlib.new(alg, data).hexdigest() != digest or len(data) != target.length:
            raise RepositoryEditError(f"stored bytes of {target.path!r} do not match its metadata")
    return data


def _ref(target: TargetFile) -> ImageRef:
    return ImageRef(name=target.path, length=target.length, hashes=dict(target.hashes))


def add_delta(
    repo: ImageRepository, name: str, base: TargetFile, *, role: str = Targets.type
) -> TargetFile | None:
    """Publish the delta from ``base`` to the image ``name`` that ``role`` publishes now.

    Returns the delta target, or None when the delta would not be smaller
    than the image (it is then not published). Refuses a base with the same
    bytes as the image and a delta name outside ``role``'s delegation.
    """
    with repo._edit() as edit:
        signing = edit.repo
        delegation = repo._targets_role(signing, role)
        result = signing.targets(role).targets.get(name)
        if result is None:
            raise RepositoryEditError(f"role {role!r} does not publish {name!r}")
        if base.hashes.get(NAME_HASH) == result.hashes.get(NAME_HASH):
            raise RepositoryEditError(f"{name!r}: the delta base is the image itself")
        target_name = delta_name(name, base.hashes[NAME_HASH])
        if delegation is not None and not delegation.is_delegated_path(target_name):
            raise DelegationViolationError(
                f"role {role!r} may not publish the delta name {target_name!r}"
            )
        patch = make_delta(_read_blob(repo, base), _read_blob(repo, result))
        if len(patch) >= result.length:
            return None
        custom = build_custom(
            hardware_ids=result.custom[HARDWARE_IDS],
            release_counter=result.custom[RELEASE_COUNTER],
        )
        custom[DELTA] = DeltaInfo(
            base=_ref(base), result=_ref(result), format=DELTA_FORMAT
        ).to_dict()
        target = TargetFile.from_data(target_name, patch, TARGET_HASH_ALGORITHMS)
        target.unrecognized_fields["custom"] = custom
        with signing.edit_targets(role) as targets:
            targets.targets[target_name] = target
        signing.publish()
        edit.add_blob(target_name, patch)
    return target


def add_delta_from(
    repo: ImageRepository, name: str, spec: str | None, *, role: str = Targets.type
) -> TargetFile | None:
    """``add_delta`` from release ``spec`` (``NAME@V``) or, if None, the previous release."""
    if spec is not None:
        base_name, counter = parse_release(spec)
        return add_delta(repo, name, find_release(repo, base_name, counter), role=role)
    current = repo.targets().get(name)
    if current is None:
        raise RepositoryEditError(f"no published image {name!r}")
    base = previous_release(repo, name, current[1])
    if base is None:
        raise RepositoryEditError(f"{name!r} has no earlier release to make a delta from")
    return add_delta(repo, name, base, role=role)


def describe_delta(target: TargetFile | None) -> str:
    """One line for the CLI about the delta ``add_delta_from`` published (or not)."""
    if target is None:
        return "no delta published: it would not be smaller than the image"
    info = DeltaInfo.from_target_file(target)
    assert info is not None
    return (
        f"added delta {target.path} ({target.length} bytes, "
        f"{100 * target.length / max(info.result.length, 1):.1f}% of the image) "
        f"from {info.base.name} sha256 {info.base.hashes[NAME_HASH][:16]}"
    )


def add_delta_between(
    repo: ImageRepository, name: str, base_name: str, *, role: str = Targets.type
) -> str:
    """Publish the delta from the published image ``base_name`` to ``name``; one line about it."""
    published = repo.targets().get(base_name)
    if published is None:
        raise RepositoryEditError(f"no published image {base_name!r} to make a delta from")
    return describe_delta(add_delta(repo, name, published[1], role=role))

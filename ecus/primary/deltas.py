"""The primary's choice between a full image and a signed delta (docs/deltas.md).

For every ECU with a pending update, ``delta_candidates`` names the delta
from the image the ECU's signed version report (this cycle's, verified with
its key and nonce) says it runs, to the image the Director assigned; the
cycle looks these names up in the Image repository with the images (ngclient,
then the Uptane re-check of every role on their paths), so a warm cycle
finds them in what it verified before. ``select_delta`` then takes the delta
target from that verified repository (delegations must allow the ECU's
hardware, as for images) and downloads it through ngclient like any image
(length cap, every hash). It is used only when its ``custom.delta`` names exactly
the Director's target as result (name, length, every hash: the Director's
signature) and the reported image as base. The full image is downloaded in
any case: ``send_delta`` falls back to it when the ECU refuses the delta
(its active image is not the base after all, or the patch does not apply).
The Director's trust model does not change: it still signs the only thing
an ECU installs, the result's hashes and length.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, TypeVar

from tuf.api.metadata import TargetFile

from uptane.delta import NAME_HASH, DeltaInfo, DeltaOffer, delta_name
from uptane.errors import MetadataError, UnsafeTargetPathError, UptaneError
from uptane.manifest import EcuVersionReport, InstalledImage
from uptane.metadata import UptaneTarget
from uptane.verification.matching import check_delegated_hardware, find_image_target

if TYPE_CHECKING:
    from tuf.ngclient import Updater

    from ecus.primary.can_link import CanSecondaryClient
    from ecus.primary.config import PrimaryConfig
    from ecus.primary.links import EcuUpdate
    from uptane.verification.full import VerifiedRepository

logger = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class DeltaUpdate:
    """A verified, downloaded delta for one ECU: its bytes and what to offer."""

    target_name: str
    path: Path
    offer: DeltaOffer


class _Sync(Protocol):
    config: PrimaryConfig

    def _tuf(self, fn: Callable[[], T]) -> T: ...

    def _download(self, updater: Updater, info: TargetFile) -> Path: ...


def _candidate(
    config: PrimaryConfig, target: UptaneTarget, report: EcuVersionReport | None
) -> str | None:
    """The name of the delta from what ``report`` says the ECU runs to ``target``, or None."""
    installed = report.installed if report is not None else None
    if installed is None or NAME_HASH not in installed.hashes:
        return None
    try:
        name = delta_name(target.name, installed.hashes[NAME_HASH])
    except (MetadataError, UnsafeTargetPathError):
        return None  # no usable delta name (too long): send the image
    if config.repository_map.entry_for(name) is None:
        return None  # the repository map does not say where it could be verified
    return name


def delta_candidates(
    config: PrimaryConfig,
    targets: Mapping[str, UptaneTarget],
    reports: Mapping[str, EcuVersionReport],
) -> frozenset[str]:
    """Delta names to look up with the images: one per ECU whose report names its image's hash."""
    names = set()
    for serial, target in targets.items():
        name = _candidate(config, target, reports.get(serial))
        if name is not None:
            names.add(name)
    return frozenset(names)


def select_delta(
    sync: _Sync,
    updater: Updater,
    image: VerifiedRepository,
    target: UptaneTarget,
    report: EcuVersionReport | None,
    hardware_id: str,
) -> DeltaUpdate | None:
    """The delta to send instead of ``target``'s image, or None (module docstring).

    The delta target comes from ``image``, the Image repository as this cycle
    verified it (``delta_candidates`` were looked up with the images), never
    from a lookup that would refresh ngclient again. Errors of the download
    (hash or length mismatch, endless data) propagate like those of any
    image: the cycle fails closed.
    """
    name = _candidate(sync.config, target, report)
    if name is None:
        return None
    assert report is not None and report.installed is not None  # _candidate checked
    installed = report.installed
    found = find_image_target(image, name)
    if found is None:
        return None
    try:
        check_delegated_hardware(found, hardware_id)
    except UptaneError as e:
        logger.warning("delta target %s is not for this ECU's hardware: %s", name, e)
        return None
    info = found.target
    try:
        delta = DeltaInfo.from_target_file(info)
    except (MetadataError, UnsafeTargetPathError) as e:
        logger.warning("delta target %s is malformed, sending the image: %s", name, e)
        return None
    if (
        delta is None
        or not delta.result.equals(target.name, target.length, target.hashes)
        or not delta.base.same_as(installed.filename, installed.length, installed.hashes)
        or info.length >= target.length
    ):
        logger.warning(
            "delta target %s does not lead from the ECU's image to %s", name, target.name
        )
        return None
    path = sync._download(updater, info)
    base = InstalledImage(
        filename=installed.filename,
        length=installed.length,
        hashes=dict(installed.hashes),
        release_counter=installed.release_counter,
    )
    return DeltaUpdate(
        target_name=name, path=path, offer=DeltaOffer(delta.format, base, info.length)
    )


def send_delta(client: CanSecondaryClient, update: EcuUpdate) -> bool:
    """Send ``update.delta``; False when the ECU refused it (then send the image)."""
    from ecus.primary.can_link import ImageRefusedError

    delta = update.delta
    assert delta is not None
    try:
        client.send_image(
            delta.path, update.installed_image, progress=client.progress, delta=delta.offer
        )
    except ImageRefusedError as e:
        logger.warning("%s refused the delta %s: %s", client.serial, delta.target_name, e)
        return False
    return True

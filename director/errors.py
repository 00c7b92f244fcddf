"""Errors of the Director's operator and metadata APIs (DESIGN 6, 8).

Manifest refusals use ``uptane.errors.ManifestError`` (its ``reason`` is the
machine-readable code the vehicle API returns). Everything else the Director
refuses is a ``DirectorError``: a ``reason`` code plus the HTTP status the
app answers with, so the HTTP layer never has to guess.
"""

from __future__ import annotations

from typing import ClassVar

from uptane.errors import UptaneError


class DirectorError(UptaneError):
    """A request to the Director is refused; ``reason`` says why."""

    reason: ClassVar[str] = "invalid_request"
    status: ClassVar[int] = 422


class InvalidRequestError(DirectorError):
    """The request is well-formed JSON but does not make sense."""


class NotFoundError(DirectorError):
    """No such metadata file."""

    reason: ClassVar[str] = "not_found"
    status: ClassVar[int] = 404


class UnknownVehicleError(DirectorError):
    """No vehicle with this VIN is registered."""

    reason: ClassVar[str] = "unknown_vehicle"
    status: ClassVar[int] = 404


class UnknownEcuSerialError(DirectorError):
    """An assignment names an ECU serial that is not registered."""

    reason: ClassVar[str] = "unknown_ecu"
    status: ClassVar[int] = 404


class NoMatchingEcuError(DirectorError):
    """An assignment by hardware id matched no ECU."""

    reason: ClassVar[str] = "no_matching_ecu"
    status: ClassVar[int] = 404


class AlreadyRegisteredError(DirectorError):
    """The VIN or an ECU serial is registered already."""

    reason: ClassVar[str] = "already_registered"
    status: ClassVar[int] = 409


class UnknownImageError(DirectorError):
    """The Image repository does not list the assigned image (5.2.3)."""

    reason: ClassVar[str] = "unknown_image"
    status: ClassVar[int] = 409


class InvalidImageError(DirectorError):
    """The Image repository's entry for the image lacks valid Uptane fields."""

    reason: ClassVar[str] = "invalid_image_metadata"
    status: ClassVar[int] = 409


class HardwareMismatchError(DirectorError):
    """The image's hardware ids do not include the ECU's (5.4.4.2)."""

    reason: ClassVar[str] = "hardware_id_mismatch"
    status: ClassVar[int] = 409


class ReleaseCounterError(DirectorError):
    """The image's release counter is below what the ECU runs (5.4.4.2)."""

    reason: ClassVar[str] = "release_counter_rollback"
    status: ClassVar[int] = 409


class DuplicateTargetError(DirectorError):
    """Two ECUs of one vehicle would need the same target name.

    TUF targets are keyed by name, so one vehicle's Director targets can list
    an image for only one ECU at a time.
    """

    reason: ClassVar[str] = "duplicate_target"
    status: ClassVar[int] = 409


class ImageRepoUnavailableError(DirectorError):
    """The Image repository could not be refreshed or verified."""

    reason: ClassVar[str] = "image_repo_unavailable"
    status: ClassVar[int] = 502


class NotInitialisedError(DirectorError):
    """The Director has no root metadata or no usable online keys."""

    reason: ClassVar[str] = "not_initialised"
    status: ClassVar[int] = 503

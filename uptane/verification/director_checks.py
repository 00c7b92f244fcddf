"""Uptane checks on Director targets that TUF does not make (Uptane 2.1, 5.4.4.2).

Sans-IO: takes verified ``Targets`` and the vehicle's inventory as the
primary knows it, returns the parsed targets per ECU or raises a typed error.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from tuf.api.metadata import Targets

from uptane.errors import (
    DelegationNotAllowedError,
    DuplicateEcuError,
    HardwareIdMismatchError,
    ReleaseCounterRollbackError,
    UnknownEcuError,
    VehicleIdMismatchError,
)
from uptane.metadata import UptaneTarget, get_vehicle_id


@dataclass(frozen=True)
class DirectorTargets:
    """The Director's instructions for one vehicle, one target per ECU serial."""

    version: int
    by_ecu: Mapping[str, UptaneTarget]


def check_director_targets(
    targets: Targets, *, vin: str, ecu_hardware_ids: Mapping[str, str]
) -> DirectorTargets:
    """Apply the Director-only checks of 5.4.4.2 to verified Director targets.

    ``ecu_hardware_ids`` maps every ECU serial in this vehicle (the primary
    included) to its hardware id. Raises:

    - ``DelegationNotAllowedError``: the Director delegates (Uptane forbids it);
    - ``VehicleIdMismatchError``: ``custom.vin`` names another vehicle, or
      targets are empty and carry no vehicle id (could be anyone's);
    - ``MetadataError``/``UnsafeTargetPathError``: a target's Uptane fields or
      name are malformed (``UptaneTarget.from_target_file``);
    - ``UnknownEcuError``: a target is for an ECU not in this vehicle;
    - ``DuplicateEcuError``: one ECU is named by more than one target;
    - ``HardwareIdMismatchError``: the target is not for this ECU's hardware.
    """
    if targets.delegations is not None:
        raise DelegationNotAllowedError("Director targets metadata must not delegate (5.2.3)")

    vehicle = get_vehicle_id(targets)
    if vehicle is not None and vehicle != vin:
        raise VehicleIdMismatchError(
            f"Director targets are for vehicle {vehicle!r}, this is {vin!r}"
        )
    if not targets.targets and vehicle is None:
        raise VehicleIdMismatchError(
            "empty Director targets carry no vehicle id: they could be another vehicle's"
        )

    by_ecu: dict[str, UptaneTarget] = {}
    for target_file in targets.targets.values():
        target = UptaneTarget.from_target_file(target_file, director=True)
        serial = target.ecu_serial
        assert serial is not None  # director=True requires it
        if serial not in ecu_hardware_ids:
            raise UnknownEcuError(
                f"Director target {target.name!r} is for ECU {serial!r}, not in this vehicle"
            )
        if serial in by_ecu:
            raise DuplicateEcuError(
                f"ECU {serial!r} is named by {by_ecu[serial].name!r} and {target.name!r}"
            )
        check_hardware_id(target, ecu_hardware_ids[serial])
        by_ecu[serial] = target
    return DirectorTargets(version=targets.version, by_ecu=by_ecu)


def check_hardware_id(target: UptaneTarget, hardware_id: str) -> None:
    """The ECU's hardware id must be one the target is built for (5.4.4.2)."""
    if hardware_id not in target.hardware_ids:
        raise HardwareIdMismatchError(
            f"target {target.name!r} is for hardware {list(target.hardware_ids)}, "
            f"ECU {target.ecu_serial!r} is {hardware_id!r}"
        )


def check_release_counter(target: UptaneTarget, installed_counter: int | None) -> None:
    """A target's release counter must not be lower than the installed one (5.4.4.2)."""
    if installed_counter is not None and target.release_counter < installed_counter:
        raise ReleaseCounterRollbackError(
            f"target {target.name!r} for ECU {target.ecu_serial!r} has release counter "
            f"{target.release_counter}, lower than the installed {installed_counter}"
        )

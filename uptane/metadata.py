"""Uptane fields on python-tuf metadata (DESIGN 3; Uptane 2.1, 5.2.3.1).

Both repositories are plain TUF; the Uptane-specific parts live in
``TargetFile.custom`` and, for Director targets with no targets, in
``Targets.unrecognized_fields["custom"]["vin"]``. This module is the only
place that knows their layout: it parses them into frozen dataclasses (raising
``MetadataError`` on anything malformed) and builds them back.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final
from urllib.parse import quote

from tuf.api.metadata import TargetFile, Targets

from uptane.errors import MetadataError, UnsafeTargetPathError

# Host functions a WASM module may be granted (DESIGN 5).
CAP_LOG: Final = "log"
CAP_HEALTH: Final = "health"
CAP_SENSOR_READ: Final = "sensor.read"
CAP_ACTUATOR_WRITE: Final = "actuator.write"
KNOWN_CAPABILITIES: Final = frozenset({CAP_LOG, CAP_HEALTH, CAP_SENSOR_READ, CAP_ACTUATOR_WRITE})

# Custom field names (DESIGN 3).
HARDWARE_IDS: Final = "hardware_ids"
RELEASE_COUNTER: Final = "release_counter"
ECU_SERIAL: Final = "ecu_serial"
CAPABILITIES: Final = "capabilities"
LIMITS: Final = "limits"
VIN: Final = "vin"

# Fields whose Director copy must equal the Image repository's (5.4.4.2 step 7).
SHALL_MATCH_FIELDS: Final = (HARDWARE_IDS, RELEASE_COUNTER, CAPABILITIES, LIMITS)

# WASM pages are 64 KiB; 65536 pages is the whole 32-bit address space.
MAX_MEMORY_PAGES: Final = 65536
MAX_FUEL: Final = 2**62

_IDENT_RE: Final = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}\Z")
MAX_TARGET_PATH: Final = 255  # ECU reports carry names as Filename (UTF8String 1..255)
_CONTROL_RE: Final = re.compile(r"[\x00-\x1f\x7f]")
_PLAIN_SEGMENT_RE: Final = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,127}\Z")


def check_identifier(value: object, what: str) -> str:
    """Return ``value`` if it is a safe identifier (hardware id, serial, VIN)."""
    if not isinstance(value, str) or not _IDENT_RE.match(value):
        raise MetadataError(
            f"{what} must be 1-128 characters of letters, digits and ._:- "
            f"starting with a letter or digit, got {value!r}"
        )
    return value


def check_target_path(path: object) -> str:
    """Return ``path`` if it is a target name this project accepts, else raise.

    TUF target paths are free-form strings, and so are these: spaces, ``%``,
    ``@``, ``~``, ``\\``, a leading ``_`` or ``.`` and any Unicode are fine.
    Names are data, never file names: whoever stores an image uses
    ``target_relpath`` to turn its name into a safe relative path. Refused
    (``UnsafeTargetPathError``): a name that is empty, longer than
    ``MAX_TARGET_PATH`` characters (what an ECU report can carry), holds a
    control character, or has an empty, ``.`` or ``..`` segment between its
    ``/`` separators (``/abs``, ``a//b``, ``a/../b``): ngclient builds
    download URLs by appending the name, and URL dot-segment removal would
    fetch such a name from outside the repository's targets.
    """
    if not isinstance(path, str) or not path or len(path) > MAX_TARGET_PATH:
        raise UnsafeTargetPathError(f"target name must be 1-{MAX_TARGET_PATH} characters")
    if _CONTROL_RE.search(path):
        raise UnsafeTargetPathError(f"target name {path!r} holds a control character")
    for segment in path.split("/"):
        if segment in ("", ".", ".."):
            raise UnsafeTargetPathError(
                f"target name {path!r} has an empty, '.' or '..' segment: "
                "it would not name one file under the repository's targets"
            )
    return path


def check_plain_target_path(path: object) -> str:
    """Return ``path`` if it is a plain target name, the kind this project publishes.

    Stricter than ``check_target_path``, for the Image repository's own
    names (``image_repo``): each ``/``-separated segment starts with a letter
    or digit and uses only letters, digits and ``._+-``, so the name is the
    same in a URL, on any file system and on the bus.
    """
    if isinstance(path, str):
        for segment in path.split("/"):
            if path and not _PLAIN_SEGMENT_RE.match(segment):
                raise UnsafeTargetPathError(
                    f"target name {path!r} is not a plain relative path: segment {segment!r} "
                    "must start with a letter or digit and use only letters, digits and ._+-"
                )
    return check_target_path(path)


# Characters a stored segment keeps as they are; everything else is %XX-escaped.
_SAFE_SEGMENT_CHARS: Final = "+"  # plus quote()'s own: letters, digits, "_.-~"
_MAX_SEGMENT_BYTES: Final = 200


def _safe_segment(segment: str) -> str:
    encoded = quote(segment, safe=_SAFE_SEGMENT_CHARS)
    if encoded.startswith("."):  # no hidden files, no clash with temporary ".name.part" files
        encoded = "%2E" + encoded[1:]
    if len(encoded.encode()) > _MAX_SEGMENT_BYTES:  # quote() never writes "%H": no clash
        encoded = "%H" + hashlib.sha256(segment.encode()).hexdigest()
    return encoded


def target_relpath(path: str) -> str:
    """The relative file path that stores image ``path`` (after ``check_target_path``).

    One-to-one and safe on any POSIX file system: each ``/``-separated
    segment is percent-encoded except letters, digits and ``_.-~+``, a
    leading ``.`` is encoded too, and a segment longer than 200 bytes once
    encoded becomes ``%H`` + its SHA-256. Plain names (``apps/app-1.wasm``)
    map to themselves.
    """
    check_target_path(path)
    return "/".join(_safe_segment(s) for s in path.split("/"))


def _int_field(value: object, what: str, minimum: int, maximum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise MetadataError(f"{what} must be an integer, got {type(value).__name__}")
    if not minimum <= value <= maximum:
        raise MetadataError(f"{what} must be in [{minimum}, {maximum}], got {value}")
    return value


@dataclass(frozen=True)
class Limits:
    """Run-time budget of a WASM module (signed ``limits``, DESIGN 5)."""

    fuel_per_call: int = 1_000_000
    memory_pages: int = 16
    self_test_fuel: int = 5_000_000
    confirm_ticks: int = 10
    actuator_writes_per_tick: int = 4

    def __post_init__(self) -> None:
        _int_field(self.fuel_per_call, "limits.fuel_per_call", 1, MAX_FUEL)
        _int_field(self.memory_pages, "limits.memory_pages", 1, MAX_MEMORY_PAGES)
        _int_field(self.self_test_fuel, "limits.self_test_fuel", 1, MAX_FUEL)
        _int_field(self.confirm_ticks, "limits.confirm_ticks", 0, 1_000_000)
        _int_field(self.actuator_writes_per_tick, "limits.actuator_writes_per_tick", 0, 1_000_000)

    def to_dict(self) -> dict[str, int]:
        return {
            "fuel_per_call": self.fuel_per_call,
            "memory_pages": self.memory_pages,
            "self_test_fuel": self.self_test_fuel,
            "confirm_ticks": self.confirm_ticks,
            "actuator_writes_per_tick": self.actuator_writes_per_tick,
        }

    @classmethod
    def from_dict(cls, data: object) -> Limits:
        if not isinstance(data, Mapping):
            raise MetadataError("limits must be an object")
        unknown = set(data) - _LIMIT_NAMES
        if unknown:
            raise MetadataError(f"unknown limits: {sorted(unknown)}")
        try:
            return cls(**dict(data))
        except TypeError as e:  # pragma: no cover - guarded by the key check
            raise MetadataError(f"invalid limits: {e}") from e


_LIMIT_NAMES: Final = frozenset(Limits().to_dict())


def check_capabilities(values: Iterable[object]) -> tuple[str, ...]:
    """Return capabilities sorted and deduplicated, refusing unknown ones."""
    caps: set[str] = set()
    for value in values:
        if not isinstance(value, str) or value not in KNOWN_CAPABILITIES:
            raise MetadataError(
                f"unknown capability {value!r}; known: {', '.join(sorted(KNOWN_CAPABILITIES))}"
            )
        caps.add(value)
    return tuple(sorted(caps))


@dataclass(frozen=True)
class UptaneTarget:
    """The Uptane view of one ``TargetFile`` (DESIGN 3).

    ``ecu_serial`` is set on Director targets only; ``capabilities`` and
    ``limits`` come from the Image repository and are copied by the Director.
    """

    name: str
    length: int
    hashes: Mapping[str, str]
    hardware_ids: tuple[str, ...]
    release_counter: int
    ecu_serial: str | None = None
    capabilities: tuple[str, ...] = ()
    limits: Limits = field(default_factory=Limits)

    @classmethod
    def from_target_file(cls, target: TargetFile, *, director: bool = False) -> UptaneTarget:
        """Parse and validate the Uptane fields of ``target``.

        ``director=True`` requires ``ecu_serial`` (5.2.3.1.1).
        """
        check_target_path(target.path)
        custom = target.custom
        if not isinstance(custom, Mapping):
            raise MetadataError(f"{target.path}: custom must be an object")
        hw = custom.get(HARDWARE_IDS)
        if not isinstance(hw, list) or not hw:
            raise MetadataError(f"{target.path}: hardware_ids must be a non-empty list")
        hardware_ids = tuple(check_identifier(h, "hardware id") for h in hw)
        if len(set(hardware_ids)) != len(hardware_ids):
            raise MetadataError(f"{target.path}: hardware_ids has duplicates")
        counter = _int_field(custom.get(RELEASE_COUNTER), "release_counter", 0, 2**63 - 1)
        serial = custom.get(ECU_SERIAL)
        if director and serial is None:
            raise MetadataError(f"{target.path}: Director target has no ecu_serial")
        if serial is not None:
            serial = check_identifier(serial, "ecu_serial")
        caps_raw = custom.get(CAPABILITIES, [])
        if not isinstance(caps_raw, list):
            raise MetadataError(f"{target.path}: capabilities must be a list")
        limits_raw = custom.get(LIMITS)
        limits = Limits() if limits_raw is None else Limits.from_dict(limits_raw)
        return cls(
            name=target.path,
            length=target.length,
            hashes=dict(target.hashes),
            hardware_ids=hardware_ids,
            release_counter=counter,
            ecu_serial=serial,
            capabilities=check_capabilities(caps_raw),
            limits=limits,
        )


def build_custom(
    *,
    hardware_ids: Iterable[str],
    release_counter: int,
    capabilities: Iterable[str] = (),
    limits: Limits | None = None,
    ecu_serial: str | None = None,
) -> dict[str, Any]:
    """Return the ``custom`` dict of a target, validated the same way it is parsed."""
    hw = [check_identifier(h, "hardware id") for h in hardware_ids]
    if not hw:
        raise MetadataError("at least one hardware id is required")
    if len(set(hw)) != len(hw):
        raise MetadataError("hardware ids have duplicates")
    custom: dict[str, Any] = {
        HARDWARE_IDS: hw,
        RELEASE_COUNTER: _int_field(release_counter, "release_counter", 0, 2**63 - 1),
        CAPABILITIES: list(check_capabilities(capabilities)),
        LIMITS: (limits or Limits()).to_dict(),
    }
    if ecu_serial is not None:
        custom[ECU_SERIAL] = check_identifier(ecu_serial, "ecu_serial")
    return custom


def shall_match(custom: object, what: str = "target") -> dict[str, Any]:
    """The SHALL-match subset of a target's custom fields, for comparison.

    Raises ``MetadataError`` when ``custom`` is missing or not an object.
    """
    if not isinstance(custom, Mapping):
        raise MetadataError(f"{what}: custom must be an object, got {type(custom).__name__}")
    return {name: custom.get(name) for name in SHALL_MATCH_FIELDS}


def get_vehicle_id(targets: Targets) -> str | None:
    """Return the VIN carried in Director targets (``signed.custom.vin``)."""
    custom = targets.unrecognized_fields.get("custom")
    if custom is None:
        return None
    if not isinstance(custom, Mapping):
        raise MetadataError("targets custom must be an object")
    vin = custom.get(VIN)
    if vin is None:
        return None
    return check_identifier(vin, "vehicle id")


def set_vehicle_id(targets: Targets, vin: str) -> None:
    """Bind Director targets to one vehicle (DESIGN 3)."""
    custom = targets.unrecognized_fields.setdefault("custom", {})
    custom[VIN] = check_identifier(vin, "vehicle id")

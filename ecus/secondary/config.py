"""Configuration of ECUs run from the command line (``uptane ecu``; DESIGN 4).

A secondary is configured by one JSON file; relative paths in it are relative
to that file:

```json
{
  "serial": "ecu-1", "hardware_id": "brake-ctl", "vin": "VIN123",
  "key": {"uri": "file2:ecu-1.pem", "public": "ecu-1.pub.json"},
  "director_root": "director/root/1.root.der",
  "slot_dir": "slots",
  "can": {"request_id": "0x600", "response_id": "0x601"},
  "bus": {"interface": "socketcan", "channel": "can0", "fd": false,
          "bitrate": 500000, "data_bitrate": 2000000},
  "max_time_ahead_seconds": 86400,
  "delta_memory_bytes": 81920,
  "primary_key": "primary.pub.json",
  "ceilings": {"fuel_per_call": 20000000, "self_test_fuel": 100000000,
               "memory_pages": 64, "call_seconds": 1.0}
}
```

``key.uri`` is any securesystemslib signer URI (a relative ``file2:`` path is
resolved against the config file); ``key.public`` is a ``NAME.pub.json`` file
or an inline TUF key dict. ``max_time_ahead_seconds`` may be null (an ECU
without a trustworthy clock). ``primary_key`` (a ``NAME.pub.json`` file or an
inline TUF key dict) is the vehicle primary's public key, provisioned like
the Director root: time messages and report receipts must be signed by it
(DESIGN 7); without it the ECU refuses every time message and keeps its
recorded attacks in every report. ``ceilings`` caps the signed WASM limits
(``ecus.secondary.ceilings.WasmCeilings``; every field optional, defaults
sized for a small ECU). ``delta_memory_bytes`` bounds the memory a delta's decoder may need
(``ecus.secondary.delta``). ``can`` ids are integers or hex strings; the
primary sends requests on ``request_id`` and listens on ``response_id``.

The primary's CAN wiring is read by ``ecus.primary.can_config``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

from securesystemslib.signer import Key

from ecus.secondary.ceilings import WasmCeilings
from ecus.secondary.delta import DEFAULT_DELTA_MEMORY
from ecus.secondary.ecu import DEFAULT_MAX_TIME_AHEAD
from ecus.transport.can_config import (
    DEFAULT_REQUEST_ID,
    DEFAULT_RESPONSE_ID,
    bus_config,
    can_id_pair,
    json_object,
    read_json,
)
from ecus.transport.isotp import CanBusConfig
from uptane.errors import ConfigError, KeyLoadError, MetadataError
from uptane.keys import KeyRef, load_public_key, public_key_from_dict
from uptane.metadata import check_identifier


@dataclass(frozen=True)
class SecondaryConfig:
    """Everything ``uptane ecu secondary`` needs to run one secondary ECU."""

    serial: str
    hardware_id: str
    key: KeyRef
    director_root: bytes
    slot_dir: Path
    request_id: int = DEFAULT_REQUEST_ID
    response_id: int = DEFAULT_RESPONSE_ID
    bus: CanBusConfig = field(default_factory=CanBusConfig)
    vin: str | None = None
    max_time_ahead: timedelta | None = DEFAULT_MAX_TIME_AHEAD
    #: memory a delta's decoder may need (docs/deltas.md)
    delta_memory_limit: int = DEFAULT_DELTA_MEMORY
    primary_key: Key | None = None
    ceilings: WasmCeilings = field(default_factory=WasmCeilings)

    def __post_init__(self) -> None:
        try:
            check_identifier(self.serial, "ECU serial")
            check_identifier(self.hardware_id, "hardware id")
            if self.vin is not None:
                check_identifier(self.vin, "vin")
        except MetadataError as e:
            raise ConfigError(str(e)) from e

    @classmethod
    def load(cls, path: str | Path) -> SecondaryConfig:
        p = Path(path)
        return cls.from_dict(read_json(p, "secondary config"), base_dir=p.parent)

    @classmethod
    def from_dict(cls, raw: Any, *, base_dir: Path) -> SecondaryConfig:
        if not isinstance(raw, dict):
            raise ConfigError("secondary config must be a JSON object")
        known = {
            "serial",
            "hardware_id",
            "vin",
            "key",
            "director_root",
            "slot_dir",
            "can",
            "bus",
            "max_time_ahead_seconds",
            "delta_memory_bytes",
            "primary_key",
            "ceilings",
        }
        unknown = set(raw) - known
        if unknown:
            raise ConfigError(f"unknown secondary config keys: {sorted(unknown)}")
        missing = {"serial", "hardware_id", "key", "director_root", "slot_dir"} - set(raw)
        if missing:
            raise ConfigError(f"secondary config misses {sorted(missing)}")

        def path_of(name: str) -> Path:
            value = raw.get(name)
            if not isinstance(value, str) or not value:
                raise ConfigError(f"'{name}' must be a path")
            return (base_dir / value).resolve()

        try:
            director_root = path_of("director_root").read_bytes()
        except OSError as e:
            raise ConfigError(f"cannot read director_root: {e}") from e
        request_id, response_id = (
            can_id_pair(raw["can"], "can")
            if "can" in raw
            else (DEFAULT_REQUEST_ID, DEFAULT_RESPONSE_ID)
        )
        ahead = raw.get("max_time_ahead_seconds", DEFAULT_MAX_TIME_AHEAD.total_seconds())
        if ahead is not None and (
            isinstance(ahead, bool) or not isinstance(ahead, int | float) or ahead <= 0
        ):
            raise ConfigError("'max_time_ahead_seconds' must be a positive number or null")
        delta_memory = raw.get("delta_memory_bytes", DEFAULT_DELTA_MEMORY)
        if isinstance(delta_memory, bool) or not isinstance(delta_memory, int) or delta_memory < 1:
            raise ConfigError("'delta_memory_bytes' must be a positive integer")
        vin = raw.get("vin")
        primary_key = None
        if raw.get("primary_key") is not None:
            primary_key = _public_key(raw["primary_key"], base_dir, "primary_key")
        return cls(
            serial=raw["serial"],
            hardware_id=raw["hardware_id"],
            key=_key(raw["key"], base_dir),
            director_root=director_root,
            slot_dir=path_of("slot_dir"),
            request_id=request_id,
            response_id=response_id,
            bus=bus_config(raw.get("bus", {})),
            vin=None if vin is None else str(vin),
            max_time_ahead=None if ahead is None else timedelta(seconds=ahead),
            delta_memory_limit=delta_memory,
            primary_key=primary_key,
            ceilings=_ceilings(raw.get("ceilings", {})),
        )


def _ceilings(raw: Any) -> WasmCeilings:
    section = json_object(raw, "ceilings")
    unknown = set(section) - {"fuel_per_call", "self_test_fuel", "memory_pages", "call_seconds"}
    if unknown:
        raise ConfigError(f"unknown ceilings: {sorted(unknown)}")
    try:
        return WasmCeilings(**section)
    except ValueError as e:
        raise ConfigError(str(e)) from e


def _public_key(raw: Any, base_dir: Path, what: str) -> Key:
    try:
        if isinstance(raw, str):
            return load_public_key(base_dir / raw)
        return public_key_from_dict(raw)
    except KeyLoadError as e:
        raise ConfigError(f"{what}: {e}") from e


def _key(raw: Any, base_dir: Path) -> KeyRef:
    section = json_object(raw, "key")
    if set(section) != {"uri", "public"} or not isinstance(section["uri"], str):
        raise ConfigError("'key' needs exactly 'uri' (a signer URI) and 'public'")
    uri: str = section["uri"]
    if uri.startswith("file2:") and not Path(uri[len("file2:") :]).is_absolute():
        uri = f"file2:{(base_dir / uri[len('file2:') :]).resolve()}"
    public = _public_key(section["public"], base_dir, "secondary key")
    return KeyRef(public=public, uri=uri)

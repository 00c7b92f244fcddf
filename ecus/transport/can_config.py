"""CAN settings in JSON config files: CAN ids and python-can bus options (DESIGN 4)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ecus.transport.isotp import CanBusConfig
from uptane.errors import ConfigError

DEFAULT_REQUEST_ID = 0x600
DEFAULT_RESPONSE_ID = 0x601
_BUS_KEYS = {"interface", "channel", "fd", "bitrate", "data_bitrate", "options"}


def default_can_ids(index: int) -> tuple[int, int]:
    """The default (request, response) CAN id pair of the ``index``-th secondary."""
    return DEFAULT_REQUEST_ID + 2 * index, DEFAULT_RESPONSE_ID + 2 * index


def read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot read {what} {path}: {e}") from e


def json_object(raw: Any, name: str) -> Mapping[str, Any]:
    if not isinstance(raw, Mapping):
        raise ConfigError(f"'{name}' must be an object")
    return raw


def can_id(value: Any, name: str) -> int:
    """A CAN identifier from an integer or a string such as ``"0x600"``."""
    if isinstance(value, bool):
        raise ConfigError(f"{name} must be a CAN identifier")
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        try:
            return int(value, 0)
        except ValueError:
            pass
    raise ConfigError(f"{name} must be a CAN identifier (an integer or a hex string)")


def can_id_pair(raw: Any, name: str) -> tuple[int, int]:
    section = json_object(raw, name)
    if set(section) != {"request_id", "response_id"}:
        raise ConfigError(f"'{name}' needs exactly 'request_id' and 'response_id'")
    return (
        can_id(section["request_id"], f"{name}.request_id"),
        can_id(section["response_id"], f"{name}.response_id"),
    )


def bus_config(raw: Any, name: str = "bus") -> CanBusConfig:
    """A ``CanBusConfig`` from a JSON object (every key optional)."""
    section = json_object(raw, name)
    unknown = set(section) - _BUS_KEYS
    if unknown:
        raise ConfigError(f"unknown '{name}' keys: {sorted(unknown)}")
    try:
        return CanBusConfig(**dict(section))
    except TypeError as e:
        raise ConfigError(f"invalid '{name}': {e}") from e

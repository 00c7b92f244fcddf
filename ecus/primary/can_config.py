"""The primary's CAN wiring: the optional ``"can"`` section of its config file (DESIGN 4).

A primary's CAN wiring is an optional ``"can"`` section of its config file
(``ecus.primary.config``), read by ``load_primary``:

```json
"can": {"bus": {"interface": "socketcan", "channel": "can0", "fd": true},
        "ids": {"ecu-1": {"request_id": "0x600", "response_id": "0x601"}}}
```

A secondary not named under ``ids`` gets the default pair
``0x600 + 2*i`` / ``0x601 + 2*i`` (``i`` its index in ``secondaries``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from ecus.primary.config import PrimaryConfig
from ecus.transport.can_config import (
    bus_config,
    can_id_pair,
    default_can_ids,
    json_object,
    read_json,
)
from ecus.transport.isotp import CanBusConfig
from uptane.errors import ConfigError


@dataclass(frozen=True)
class PrimaryCan:
    """Where the primary's secondaries are on the bus."""

    bus: CanBusConfig = field(default_factory=CanBusConfig)
    ids: Mapping[str, tuple[int, int]] = field(default_factory=dict)


def load_primary(path: str | Path) -> tuple[PrimaryConfig, PrimaryCan]:
    """Read a primary config file with its optional ``"can"`` section."""
    p = Path(path)
    raw = read_json(p, "primary config")
    if not isinstance(raw, dict):
        raise ConfigError("primary config must be a JSON object")
    raw = dict(raw)
    can_raw = json_object(raw.pop("can", {}), "can")
    unknown = set(can_raw) - {"bus", "ids"}
    if unknown:
        raise ConfigError(f"unknown 'can' keys: {sorted(unknown)}")
    config = PrimaryConfig.from_dict(raw, base_dir=p.parent)
    explicit = {
        str(serial): can_id_pair(pair, f"can.ids.{serial}")
        for serial, pair in json_object(can_raw.get("ids", {}), "can.ids").items()
    }
    serials = [s.serial for s in config.secondaries]
    stray = set(explicit) - set(serials)
    if stray:
        raise ConfigError(f"'can.ids' names unknown secondaries: {sorted(stray)}")
    ids = {s: explicit.get(s, default_can_ids(i)) for i, s in enumerate(serials)}
    used = [i for pair in ids.values() for i in pair]
    if len(set(used)) != len(used):
        raise ConfigError("CAN ids of the secondaries must all differ")
    return config, PrimaryCan(bus=bus_config(can_raw.get("bus", {}), "can.bus"), ids=ids)

"""What a secondary ECU lends its WASM app: sensors, actuators, a log sink (DESIGN 5)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol


class Peripherals(Protocol):
    """What an ECU lends its WASM app: sensors, actuators and a log sink."""

    def read_sensor(self, channel: int) -> int:
        """Return the current reading of ``channel`` (a signed 64-bit value)."""

    def write_actuator(self, channel: int, value: int) -> None:
        """Drive actuator ``channel`` to ``value``."""

    def log(self, message: str) -> None:
        """Record one log line from the app."""


@dataclass
class SimPeripherals:
    """Deterministic simulated peripherals: fixed sensor values, recorded writes."""

    sensors: dict[int, int] = field(default_factory=dict)
    default_sensor: int = 0
    writes: list[tuple[int, int]] = field(default_factory=list)
    logs: list[str] = field(default_factory=list)

    def read_sensor(self, channel: int) -> int:
        return self.sensors.get(channel, self.default_sensor)

    def write_actuator(self, channel: int, value: int) -> None:
        self.writes.append((channel, value))

    def log(self, message: str) -> None:
        self.logs.append(message)

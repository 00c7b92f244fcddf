"""Faults a fleet run injects: which ones exist, where they strike (DESIGN 9).

``FleetRun.plan_faults`` draws a ``PlannedFault`` per struck vehicle once, for
the whole fleet (so a sharded run strikes the same vehicles as a single
process); the process that owns the vehicle arms it, the coordinator arms the
server-side ones, and the report lists each as an ``InjectedFault``.
"""

from __future__ import annotations

from dataclasses import dataclass

FAULTS = (
    "drop-frame",
    "corrupt-frame",
    "delay-frame",
    "bus-off",
    "power-cut",
    "slow-http",
    "truncated-http",
    "server-restart",
)
# A delayed frame is held longer than ISO-TP's own timeouts (N_Bs, N_Cr: 1 s) but
# shorter than the primary's timeout for a whole answer (FAULTY_TIMEOUT).
DELAY_FRAME_SECONDS = 1.5
# Write points where a power cut may strike during an install (ecus.secondary.slots.WRITE_POINTS).
POWER_CUT_POINTS = ("begin", "chunk", "chunk_state", "finish", "start_trial", "commit")
# On a vehicle with an injected fault the primary gives up on a silent ECU sooner.
FAULTY_TIMEOUT = 2.0
FAULTY_INSTALL_TIMEOUT = 5.0


@dataclass(frozen=True)
class InjectedFault:
    vin: str
    ecu_serial: str
    fault: str
    detail: str


@dataclass(frozen=True)
class PlannedFault:
    """Where ``FleetConfig.fault`` strikes one vehicle (drawn once, for the whole fleet)."""

    vin: str
    fault: str
    nth: int = 0
    byte: int = 0
    bit: int = 0
    point: str = ""

    @property
    def on_server(self) -> bool:
        return self.fault in ("slow-http", "truncated-http")

    def injected(self, first_secondary: str) -> InjectedFault:
        f = self.fault
        if f == "drop-frame":
            detail = f"drop frame {self.nth} sent by the secondary"
        elif f == "corrupt-frame":
            detail = (
                f"flip bit {self.bit} of byte {self.byte} of frame {self.nth} sent by the secondary"
            )
        elif f == "delay-frame":
            detail = f"delay frame {self.nth} sent by the secondary by {DELAY_FRAME_SECONDS} s"
        elif f == "bus-off":
            detail = "secondary controller bus-off for the first round"
        elif f == "power-cut":
            detail = f"power cut at slot write point {self.point!r}"
        elif f == "slow-http":
            detail = "Director timestamp.json trickled once (slow retrieval)"
        else:
            detail = "Director timestamp.json broken off halfway once (truncated HTTP)"
        serial = f"{self.vin}-primary" if self.on_server else first_secondary
        return InjectedFault(self.vin, serial, f, detail)

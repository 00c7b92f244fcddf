"""Health of a secondary's WASM module, for its signed version report (issue 14).

The module reports health through its ``health`` host function; the ECU adds
what the sandbox saw: traps, host calls it denied (by capability) and
rollbacks (by reason). Counts persist in the slot store (one atomic write
per event, never per tick) and go into every ``EcuVersionReport`` as an
``EcuHealth``, signed with the rest of the report, so the Director can tell
a module that passed its trial but went bad afterwards.

Status: ``unknown`` without a running module; ``unhealthy`` when the module's
last health code is not 0 or it failed (trapped, ran out of fuel) since it
was installed; ``degraded`` when the sandbox refused some of its host calls;
``healthy`` otherwise.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ecus.secondary.slots import SlotStore
from ecus.secondary.wasm_host import WasmApp
from uptane.errors import WasmError
from uptane.manifest import EcuHealth

HEALTH_KEY = "health"
MAX_COUNT = 4_294_967_295
# host calls the sandbox refuses at run time, by capability
RATE_LIMITED = "actuator.write"
# trial failure reasons that are the module crashing
TRAP_REASONS = frozenset({"trap", "fuel_exhausted", "memory_limit"})


# names and entries an ECU keeps (the ASN.1 allows more; this keeps reports small)
MAX_NAMES = 8


def _name(text: str) -> str:
    clean = "".join(c if c.isascii() and c.isprintable() else "?" for c in text)
    return clean[:32] or "unknown"


def _bump(counts: dict[str, int], name: str, n: int = 1) -> None:
    name = _name(name)
    if name not in counts and len(counts) >= MAX_NAMES - 1:
        name = "other"
    counts[name] = min(MAX_COUNT, counts.get(name, 0) + n)


@dataclass
class HealthCounters:
    """What the ECU persists: counts, and the image that failed since it was installed."""

    traps: int = 0
    capability_denials: dict[str, int] = field(default_factory=dict)
    rollbacks: dict[str, int] = field(default_factory=dict)
    failed_image: str | None = None

    @classmethod
    def load(cls, store: SlotStore) -> HealthCounters:
        data = store.get_extra(HEALTH_KEY)
        if not isinstance(data, Mapping):
            return cls()

        def counts(value: object) -> dict[str, int]:
            if not isinstance(value, Mapping):
                return {}
            out: dict[str, int] = {}
            for k, v in list(value.items())[:MAX_NAMES]:
                if isinstance(v, int) and not isinstance(v, bool) and v >= 0:
                    out[_name(str(k))] = min(v, MAX_COUNT)
            return out

        traps = data.get("traps", 0)
        failed = data.get("failed_image")
        return cls(
            traps=min(traps, MAX_COUNT) if isinstance(traps, int) and traps >= 0 else 0,
            capability_denials=counts(data.get("capability_denials")),
            rollbacks=counts(data.get("rollbacks")),
            failed_image=failed if isinstance(failed, str) else None,
        )

    def save(self, store: SlotStore) -> None:
        store.set_extra(HEALTH_KEY, self.to_dict())

    def to_dict(self) -> dict[str, Any]:
        return {
            "traps": self.traps,
            "capability_denials": dict(self.capability_denials),
            "rollbacks": dict(self.rollbacks),
            "failed_image": self.failed_image,
        }


def record_failure(store: SlotStore, error: WasmError, image: str | None) -> None:
    """The running module failed (trap, fuel, memory): it is unhealthy until replaced."""
    counters = HealthCounters.load(store)
    if counters.failed_image == image and image is not None:
        return  # a failed module raises its error again on every call: count it once
    counters.traps = min(MAX_COUNT, counters.traps + 1)
    counters.failed_image = image
    counters.save(store)


def record_trial(store: SlotStore, reason: str | None, rate_limited: int) -> None:
    """A trial ended: count its rollback (``reason``) and its refused host calls."""
    counters = HealthCounters.load(store)
    if reason is not None:
        _bump(counters.rollbacks, reason)
        if reason in TRAP_REASONS:
            counters.traps = min(MAX_COUNT, counters.traps + 1)
        if reason == "forbidden_import":  # the module asked for an ungranted capability
            _bump(counters.capability_denials, "import")
    else:
        counters.failed_image = None  # a new image runs
    if rate_limited:
        _bump(counters.capability_denials, RATE_LIMITED, rate_limited)
    counters.save(store)


def record_rollback(store: SlotStore, reason: str) -> None:
    """The ECU went back to its previous image at boot (``reason``)."""
    counters = HealthCounters.load(store)
    _bump(counters.rollbacks, reason)
    counters.save(store)


def current(store: SlotStore, app: WasmApp | None, image: str | None) -> EcuHealth:
    """The ``EcuHealth`` for the next report: persisted counts plus the running module's."""
    counters = HealthCounters.load(store)
    denials = dict(counters.capability_denials)
    if app is not None and app.rate_limit_violations:
        _bump(denials, RATE_LIMITED, app.rate_limit_violations)
    if app is None:
        status, code = "unknown", 0
    else:
        code = max(-(2**31), min(2**31 - 1, app.health))
        if code != 0 or (image is not None and counters.failed_image == image):
            status = "unhealthy"
        elif app.rate_limit_violations:
            status = "degraded"
        else:
            status = "healthy"
    return EcuHealth(
        status=status,
        health_code=code,
        traps=counters.traps,
        capability_denials=denials,
        rollbacks=dict(counters.rollbacks),
    )

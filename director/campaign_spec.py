"""Campaign specifications: images per hardware id, target group, phases and halt rules.

A campaign document (JSON or YAML, ``uptane director campaign create``)::

    name: brake-2
    images: {brake-ecu: brake-2.wasm}          # one image per hardware id (a bundle)
    target: {all: true}                        # or {vins: [...]} or {attributes: {k: v}}
    halt: {health_failures: 0, rollbacks: "5%", install_failures: 2}   # every phase
    rollback: {brake-ecu: brake-1r3.wasm}      # optional: assigned on a halt (see below)
    phases:
      - {name: canary, vehicles: 1, minutes: 30}
      - {percent: 10, minutes: 60, halt: {install_failures: "2%"}}
      - {percent: 100}

Phase sizes are cumulative (``percent: 10`` means 10 % of the target group in
all, counting earlier phases). A halt rule is the most the campaign tolerates:
a count (``2``: halt at the third vehicle) or a rate of the vehicles assigned
so far (``"5%"``: halt when more than 5 % of them). ``rollback`` names, per
hardware id of the bundle, an image to assign to the vehicles that installed
when the campaign halts (the previous release re-published with a higher
release counter). Parsing refuses anything else with ``InvalidRequestError``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from director.errors import InvalidRequestError
from uptane.errors import UptaneError
from uptane.metadata import check_identifier, check_target_path

HALT_RULES = ("health_failures", "rollbacks", "install_failures")
MAX_PHASES = 16
MAX_VINS = 100_000


@dataclass(frozen=True)
class HaltRule:
    """Halt when more than ``count`` vehicles, or more than ``rate`` of those assigned, failed."""

    name: str
    count: int | None = None
    rate: float | None = None

    def violated(self, failures: int, assigned: int) -> bool:
        if self.count is not None:
            return failures > self.count
        assert self.rate is not None
        return assigned > 0 and failures / assigned > self.rate

    def describe(self) -> str:
        return str(self.count) if self.count is not None else f"{self.rate_percent:g}%"

    @property
    def rate_percent(self) -> float:
        return round((self.rate or 0.0) * 100, 6)

    def to_json(self) -> int | str:
        return self.count if self.count is not None else f"{self.rate_percent:g}%"


def parse_rule(name: str, value: object) -> HaltRule:
    """A halt rule from ``2`` (count) or ``"5%"`` (rate)."""
    if name not in HALT_RULES:
        raise InvalidRequestError(f"unknown halt rule {name!r} (known: {', '.join(HALT_RULES)})")
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 0:
            raise InvalidRequestError(f"halt rule {name}: count must not be negative")
        return HaltRule(name, count=value)
    if isinstance(value, str) and value.endswith("%"):
        try:
            percent = float(value[:-1])
        except ValueError:
            percent = math.nan
        if not 0 <= percent <= 100:  # also refuses NaN
            raise InvalidRequestError(f"halt rule {name}: {value!r} is not a rate of 0-100%")
        return HaltRule(name, rate=percent / 100)
    raise InvalidRequestError(f"halt rule {name}: give a count (2) or a rate ('5%'), not {value!r}")


def _rules(doc: object, where: str) -> dict[str, HaltRule]:
    if doc is None:
        return {}
    if not isinstance(doc, Mapping):
        raise InvalidRequestError(f"{where}: halt must be an object of rule: limit")
    return {str(k): parse_rule(str(k), v) for k, v in doc.items()}


@dataclass(frozen=True)
class Phase:
    """One rollout step: how many vehicles in all, for how long, under which halt rules."""

    name: str
    vehicles: int | None
    percent: float | None
    minutes: float
    halt: tuple[HaltRule, ...]

    def size(self, group: int) -> int:
        """Vehicles the campaign reaches by the end of this phase (cumulative)."""
        if self.vehicles is not None:
            return min(self.vehicles, group)
        assert self.percent is not None
        return min(group, math.ceil(group * self.percent / 100))

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "minutes": self.minutes}
        if self.vehicles is not None:
            out["vehicles"] = self.vehicles
        else:
            out["percent"] = self.percent
        out["halt"] = {r.name: r.to_json() for r in self.halt}
        return out


def _phase(doc: object, index: int, default_halt: Mapping[str, HaltRule]) -> Phase:
    where = f"phase {index + 1}"
    if not isinstance(doc, Mapping):
        raise InvalidRequestError(f"{where} must be an object")
    extra = set(doc) - {"name", "vehicles", "percent", "minutes", "halt"}
    if extra:
        raise InvalidRequestError(f"{where}: unknown fields {sorted(extra)}")
    name = doc.get("name", f"phase-{index + 1}")
    if not isinstance(name, str) or not 1 <= len(name) <= 64:
        raise InvalidRequestError(f"{where}: name must be 1-64 characters")
    vehicles, percent = doc.get("vehicles"), doc.get("percent")
    if (vehicles is None) == (percent is None):
        raise InvalidRequestError(f"{where}: give exactly one of vehicles and percent")
    if vehicles is not None and (
        not isinstance(vehicles, int) or isinstance(vehicles, bool) or vehicles < 1
    ):
        raise InvalidRequestError(f"{where}: vehicles must be a positive integer")
    if percent is not None:
        if isinstance(percent, bool) or not isinstance(percent, int | float):
            raise InvalidRequestError(f"{where}: percent must be a number")
        if not 0 < percent <= 100:
            raise InvalidRequestError(f"{where}: percent must be above 0 and at most 100")
    minutes = doc.get("minutes", 0)
    if (
        isinstance(minutes, bool)
        or not isinstance(minutes, int | float)
        or not 0 <= minutes <= 525_600
    ):
        raise InvalidRequestError(f"{where}: minutes must be 0-525600")
    rules = dict(default_halt)
    rules.update(_rules(doc.get("halt"), where))
    return Phase(
        name=name,
        vehicles=vehicles,
        percent=None if percent is None else float(percent),
        minutes=float(minutes),
        halt=tuple(rules[n] for n in HALT_RULES if n in rules),
    )


@dataclass(frozen=True)
class CampaignSpec:
    """What an operator asks for; ``from_dict`` checks every field."""

    name: str
    images: Mapping[str, str]
    target: Mapping[str, Any]
    phases: tuple[Phase, ...]
    rollback: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, doc: object) -> CampaignSpec:
        if not isinstance(doc, Mapping):
            raise InvalidRequestError("a campaign must be an object")
        extra = set(doc) - {"name", "images", "target", "halt", "phases", "rollback"}
        if extra:
            raise InvalidRequestError(f"unknown campaign fields {sorted(extra)}")
        try:
            name = check_identifier(doc.get("name"), "campaign name")
            images = doc.get("images")
            if not isinstance(images, Mapping) or not 1 <= len(images) <= 64:
                raise InvalidRequestError("images must map 1-64 hardware ids to image names")
            for hw, image in images.items():
                check_identifier(hw, "hardware id")
                check_target_path(image)
            rollback = doc.get("rollback", {})
            if not isinstance(rollback, Mapping) or not set(rollback) <= set(images):
                raise InvalidRequestError("rollback must map hardware ids of images to images")
            for image in rollback.values():
                check_target_path(image)
        except InvalidRequestError:
            raise
        except UptaneError as e:
            raise InvalidRequestError(str(e)) from e
        target = _target(doc.get("target", {"all": True}))
        default_halt = _rules(doc.get("halt"), "campaign")
        raw = doc.get("phases")
        if not isinstance(raw, list) or not 1 <= len(raw) <= MAX_PHASES:
            raise InvalidRequestError(f"phases must be a list of 1-{MAX_PHASES} phases")
        phases = tuple(_phase(p, i, default_halt) for i, p in enumerate(raw))
        if len({p.name for p in phases}) != len(phases):
            raise InvalidRequestError("phase names repeat")
        return cls(
            name=name,
            images=dict(images),
            target=target,
            phases=phases,
            rollback=dict(rollback),
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "images": dict(self.images),
            "target": dict(self.target),
            "phases": [p.to_json() for p in self.phases],
            "rollback": dict(self.rollback),
        }


def _target(doc: object) -> dict[str, Any]:
    if not isinstance(doc, Mapping) or len(doc) != 1:
        raise InvalidRequestError("target must be {all: true}, {vins: [...]} or {attributes: {}}")
    ((kind, value),) = doc.items()
    try:
        if kind == "all" and value is True:
            return {"all": True}
        if kind == "vins" and isinstance(value, list) and 1 <= len(value) <= MAX_VINS:
            if len(set(value)) != len(value):
                raise InvalidRequestError("target vins repeat")
            return {"vins": [check_identifier(v, "vin") for v in value]}
        if kind == "attributes" and isinstance(value, Mapping) and 1 <= len(value) <= 16:
            return {"attributes": {check_attribute(k): str(v) for k, v in value.items()}}
    except InvalidRequestError:
        raise
    except UptaneError as e:
        raise InvalidRequestError(str(e)) from e
    raise InvalidRequestError("target must be {all: true}, {vins: [...]} or {attributes: {}}")


def check_attribute(name: object) -> str:
    """A vehicle attribute name: an identifier of at most 64 characters."""
    if not isinstance(name, str) or len(name) > 64:
        raise InvalidRequestError(f"attribute name {name!r} must be at most 64 characters")
    try:
        return check_identifier(name, "attribute name")
    except UptaneError as e:
        raise InvalidRequestError(str(e)) from e

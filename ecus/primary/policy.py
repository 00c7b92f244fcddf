"""Install policy at the vehicle: consent and preconditions before updates are distributed.

Issue 14 (pw_software_update's goal 3: the owner or the vehicle's state may
hold an update back). The primary verifies and downloads as usual; before
``Primary.distribute`` sends anything to a secondary it asks its
``install_policy``:

- ``Automatic()``: install (the default when no policy is set);
- ``Ask(callback)``: the integrator's approval callback (an HMI prompt, a
  fleet app) answers ``True`` (install), ``False`` (decline) or ``None``
  (not yet: defer);
- ``AskFile(path)``: a JSON file the integrator controls,
  ``{"IMAGE": "approve" | "decline"}``; an image not in it is deferred;
- ``Conditions({"parked": is_parked, "battery": battery_ok})``: every
  callable must return True, else the update is deferred naming the unmet
  conditions (a raising callable counts as unmet);
- ``AllOf(p1, p2, ...)``: the first policy that does not install decides.

A held update goes nowhere (no secondary changes) and the primary's next
own report says ``deferred`` or ``declined`` with the reason, so the
Director's campaigns count it (neither is an install failure). The next
cycle asks again.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar, Protocol

from uptane.errors import UptaneError

if TYPE_CHECKING:
    from ecus.primary.cycle import Primary
    from ecus.primary.result import CycleResult

logger = logging.getLogger(__name__)

INSTALL, DEFER, DECLINE = "install", "defer", "decline"


class UpdateHeldError(UptaneError):
    """The vehicle's install policy held the update back (not a failure)."""

    result: ClassVar[str] = "deferred"


class UpdateDeferredError(UpdateHeldError):
    """Not now: approval pending or a precondition unmet; the next cycle asks again."""


class UpdateDeclinedError(UpdateHeldError):
    """The owner (or integrator) declined this update."""

    result: ClassVar[str] = "declined"


@dataclass(frozen=True)
class UpdateOffer:
    """What the policy decides on: the image each ECU would get."""

    vin: str | None
    images: Mapping[str, str]  # ECU serial -> target name
    release_counters: Mapping[str, int]


@dataclass(frozen=True)
class Decision:
    verdict: str  # install | defer | decline
    reason: str = ""


class InstallPolicy(Protocol):
    def decide(self, offer: UpdateOffer) -> Decision: ...


class Automatic:
    """Install every verified update at once."""

    def decide(self, offer: UpdateOffer) -> Decision:
        return Decision(INSTALL)


class Ask:
    """Ask a callback: True installs, False declines, None defers."""

    def __init__(self, callback: Callable[[UpdateOffer], bool | None]) -> None:
        self.callback = callback

    def decide(self, offer: UpdateOffer) -> Decision:
        try:
            answer = self.callback(offer)
        except Exception as e:  # a broken prompt never installs
            return Decision(DEFER, f"approval callback failed: {e}")
        if answer is True:
            return Decision(INSTALL)
        if answer is False:
            return Decision(DECLINE, "declined by the owner")
        return Decision(DEFER, "waiting for the owner's approval")


class AskFile:
    """Approvals in a JSON file the integrator controls: ``{"IMAGE": "approve"|"decline"}``."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def decide(self, offer: UpdateOffer) -> Decision:
        try:
            answers = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            answers = {}
        except (OSError, ValueError) as e:
            return Decision(DEFER, f"approval file unreadable: {e}")
        if not isinstance(answers, Mapping):
            return Decision(DEFER, "approval file is not a JSON object")
        images = sorted(set(offer.images.values()))
        declined = [i for i in images if answers.get(i) == "decline"]
        if declined:
            return Decision(DECLINE, f"declined: {', '.join(declined)}")
        waiting = [i for i in images if answers.get(i) != "approve"]
        if waiting:
            return Decision(DEFER, f"waiting for approval of {', '.join(waiting)}")
        return Decision(INSTALL)


class Conditions:
    """Preconditions the integrator supplies as callables (vehicle parked, battery level...)."""

    def __init__(self, checks: Mapping[str, Callable[[], bool]]) -> None:
        self.checks = dict(checks)

    def decide(self, offer: UpdateOffer) -> Decision:
        unmet = []
        for name, check in self.checks.items():
            try:
                ok = check() is True
            except Exception:  # a failing sensor is an unmet condition
                ok = False
            if not ok:
                unmet.append(name)
        if unmet:
            return Decision(DEFER, f"conditions not met: {', '.join(unmet)}")
        return Decision(INSTALL)


class AllOf:
    """Every policy must install; the first one that does not decides."""

    def __init__(self, *policies: InstallPolicy) -> None:
        self.policies = policies

    def decide(self, offer: UpdateOffer) -> Decision:
        for policy in self.policies:
            decision = policy.decide(offer)
            if decision.verdict != INSTALL:
                return decision
        return Decision(INSTALL)


def hold(primary: Primary, result: CycleResult) -> dict[str, BaseException] | None:
    """Ask the primary's policy about ``result.updates``; None to go ahead.

    When the update is held, the primary's next own report says ``deferred``
    or ``declined`` and every secondary's outcome is the typed error.
    """
    policy: InstallPolicy | None = getattr(primary, "install_policy", None)
    if policy is None or not result.updates:
        return None
    offer = UpdateOffer(
        vin=primary.config.vin,
        images={s: u.target.name for s, u in result.updates.items()},
        release_counters={s: u.target.release_counter for s, u in result.updates.items()},
    )
    decision = policy.decide(offer)
    if decision.verdict == INSTALL:
        return None
    error: UpdateHeldError = (
        UpdateDeclinedError(decision.reason)
        if decision.verdict == DECLINE
        else UpdateDeferredError(decision.reason or "deferred by the install policy")
    )
    state = primary.state.reports()
    state.last_result, state.last_result_text = error.result, str(error)[:512]
    primary.state.save_reports(state)
    logger.info("update held (%s): %s", error.result, error)
    return {serial: error for serial in result.updates}

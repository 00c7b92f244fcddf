"""What a primary keeps in memory between cycles so that nothing is verified twice (issue 16)."""

from __future__ import annotations

from dataclasses import dataclass, field

from tuf.api.metadata import Root, TargetFile, Targets

from uptane.verification.der import DerCache
from uptane.verification.director_checks import (
    DirectorTargets,
)
from uptane.verification.full import (
    VerifiedRepository,
)


@dataclass
class VerificationCache:
    """What a primary keeps in memory between cycles so that nothing is verified twice.

    ``known`` holds, per repository, what the last committed cycle verified
    and, for the Image repository, the target names it looked up: a cycle
    whose timestamp and root equal it stops after the timestamp (5.4.4.2).
    ``root_chains`` maps root chain bytes to the verified chain; ``der`` the
    verified DER envelopes and each Director target's DER; ``counters`` the
    Director release counters of the last trusted Director targets file, by
    its bytes; ``checked`` what the
    Director-only checks and the Director/Image matching found for the very
    objects a warm cycle reuses (they depend on nothing else).
    """

    known: dict[str, tuple[VerifiedRepository, frozenset[str]]] = field(default_factory=dict)
    root_chains: dict[tuple[bytes, ...], tuple[Root, ...]] = field(default_factory=dict)
    der: DerCache = field(default_factory=DerCache)
    counters: tuple[bytes, dict[str, int]] | None = None
    # the Director checks and Director/Image agreement of the very objects of ``known``
    checked: tuple[Targets, VerifiedRepository, DirectorTargets, dict[str, TargetFile]] | None = (
        None
    )

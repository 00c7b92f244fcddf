"""The scenario catalogue: SCENARIOS in the order the demo plays them, and lookup by name."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from ecus.sim.http import endless, trickle, truncated
from ecus.sim.world import SimVehicle, World
from uptane.errors import (
    ATTACK_ARBITRARY_SOFTWARE,
    ATTACK_DROP_REQUEST,
    ATTACK_ENDLESS_DATA,
    ATTACK_FREEZE,
    ATTACK_MIX_AND_MATCH,
    ATTACK_PARTIAL_BUNDLE,
    ATTACK_REPLAYED_REPORT,
    ATTACK_ROLLBACK,
    ATTACK_SLOW_RETRIEVAL,
    ATTACK_SPOOFED_MESSAGE,
    ATTACK_WRONG_ECU,
    ATTACK_WRONG_VEHICLE,
)

from .base import Scenario, ScenarioOutcome
from .bus import _transfer_fault
from .can import (
    _can_report_attack,
    _corrupt_chunk,
    _injected_frames,
    _partial_bundle,
    _replayed,
    _spoofed,
)
from .compromise import (
    _compromised_director,
    _evil_director_target,
    _image_threshold,
    _release_rollback_target,
    _replayed_manifest,
    _swapped,
)
from .faults import _primary_bus_off, _server_restart, power_cut
from .metadata import (
    _freeze_director,
    _freeze_image,
    _mix_and_match,
    _rollback_director,
    _rollback_image,
    _wrong_vehicle,
)
from .network import _download_attack, _drop_request, _endless_metadata
from .secondary import over_limit_image, rogue_report_reader, spoofed_time, stuck_trial


def _scenario(
    name: str,
    attack: str | None,
    title: str,
    defeated_by: str,
    run: Callable[[World, SimVehicle], ScenarioOutcome],
) -> Scenario:
    return Scenario(name, attack, title, defeated_by, run)


SCENARIOS: tuple[Scenario, ...] = (
    _scenario(
        "drop-request-director",
        ATTACK_DROP_REQUEST,
        "The network drops every request to the Director",
        "The cycle fails closed: no trusted state changes; the primary reports the "
        "failed download and retries next cycle",
        _drop_request("director"),
    ),
    _scenario(
        "drop-request-image",
        ATTACK_DROP_REQUEST,
        "The network drops every request to the Image repository",
        "The cycle fails closed: no trusted state changes; the primary reports the "
        "failed download and retries next cycle",
        _drop_request("image"),
    ),
    _scenario(
        "slow-retrieval",
        ATTACK_SLOW_RETRIEVAL,
        "An image arrives one byte every 50 ms",
        "Minimum download rate after a grace period (DownloadPolicy, PolicyFetcher)",
        _download_attack("slow-retrieval", lambda data: trickle(data, piece=1, delay=0.05)),
    ),
    _scenario(
        "freeze-director",
        ATTACK_FREEZE,
        "Director metadata frozen: the vehicle's time passes its expiry",
        "Expiry of Director timestamp/snapshot/targets checked at the primary's clock",
        _freeze_director,
    ),
    _scenario(
        "freeze-image",
        ATTACK_FREEZE,
        "Image repository timestamp frozen past its expiry",
        "Expiry of the Image repository's timestamp checked at the primary's clock",
        _freeze_image,
    ),
    _scenario(
        "rollback-director-metadata",
        ATTACK_ROLLBACK,
        "An older Director timestamp is replayed",
        "TUF version check: a version below the trusted one is refused",
        _rollback_director,
    ),
    _scenario(
        "rollback-image-metadata",
        ATTACK_ROLLBACK,
        "An older Image repository timestamp is replayed",
        "TUF version check: a version below the trusted one is refused",
        _rollback_image,
    ),
    _scenario(
        "rollback-release-counter",
        ATTACK_ROLLBACK,
        "A compromised Director assigns an older release of an installed app",
        "Release counter check against the installed and last assigned release (5.4.4.2)",
        _compromised_director("rollback-release-counter", _release_rollback_target),
    ),
    _scenario(
        "endless-metadata",
        ATTACK_ENDLESS_DATA,
        "The Director timestamp never ends",
        "Length caps on every metadata file (MetadataLimits)",
        _endless_metadata,
    ),
    _scenario(
        "endless-image",
        ATTACK_ENDLESS_DATA,
        "An image download never ends",
        "Downloads are capped at the signed length",
        _download_attack("endless-image", lambda data: endless()),
    ),
    _scenario(
        "mix-and-match",
        ATTACK_MIX_AND_MATCH,
        "Snapshot served with a targets file of another version",
        "Snapshot's version for targets must equal the targets served (TUF 5.6)",
        _mix_and_match,
    ),
    _scenario(
        "arbitrary-software-director",
        ATTACK_ARBITRARY_SOFTWARE,
        "Director compromised alone: its keys sign an image the Image repository lacks",
        "Every Director target must match the Image repository's (length, hashes, custom)",
        _compromised_director("arbitrary-software-director", _evil_director_target),
    ),
    _scenario(
        "arbitrary-software-image-swap",
        ATTACK_ARBITRARY_SOFTWARE,
        "Image repository server compromised: image bytes swapped",
        "Downloaded images are checked against every signed hash",
        _download_attack("arbitrary-software-image-swap", lambda data: _swapped(data)),
    ),
    _scenario(
        "arbitrary-software-image-threshold",
        ATTACK_ARBITRARY_SOFTWARE,
        "Image repository compromised: targets re-signed with one of its threshold keys",
        "TUF signature threshold on Image targets (offline keys, threshold >= 2)",
        _image_threshold,
    ),
    _scenario(
        "wrong-vehicle",
        ATTACK_WRONG_VEHICLE,
        "Director metadata of another vehicle replayed",
        "Director targets must name only this vehicle's ECUs, or carry its VIN when empty",
        _wrong_vehicle,
    ),
    _scenario(
        "replayed-manifest",
        ATTACK_REPLAYED_REPORT,
        "A captured vehicle version manifest is replayed to the Director",
        "The Director requires every ECU report counter to increase (replayed_report)",
        _replayed_manifest,
    ),
    _scenario(
        "can-spoofed-report",
        ATTACK_SPOOFED_MESSAGE,
        "A CAN node answers for a secondary with a report signed by another key",
        "The primary verifies every report with the ECU's registered key",
        _can_report_attack("can-spoofed-report", _spoofed, "forged report"),
    ),
    _scenario(
        "can-replayed-report",
        ATTACK_REPLAYED_REPORT,
        "A CAN node replays a secondary's earlier signed report",
        "Every report must carry the nonce of the primary's request",
        _can_report_attack("can-replayed-report", _replayed, "recorded report"),
    ),
    _scenario(
        "can-corrupted-frames",
        ATTACK_ARBITRARY_SOFTWARE,
        "A frame of image data is altered on the CAN bus mid-transfer",
        "The secondary checks length and every hash before activating; the next "
        "cycle transfers the image again",
        _transfer_fault(
            "can-corrupted-frames", _corrupt_chunk, detail="one bit flipped in an image chunk"
        ),
    ),
    _scenario(
        "can-injected-frames",
        ATTACK_ARBITRARY_SOFTWARE,
        "A rogue CAN node injects its own image chunk mid-transfer",
        "The secondary writes only at the offset it expects and checks length and every "
        "hash before activating; the next cycle transfers the image again",
        _injected_frames,
    ),
    _scenario(
        "partial-bundle",
        ATTACK_PARTIAL_BUNDLE,
        "Partial bundle installation: traffic to one of two updated ECUs is dropped",
        "The primary reports partial_bundle_installation when one ECU of a bundle installed "
        "and another failed; the Director keeps the assignment pending until a manifest "
        "shows it installed, and the next cycle completes the bundle",
        _partial_bundle,
    ),
    _scenario(
        "can-spoofed-time",
        ATTACK_SPOOFED_MESSAGE,
        "A CAN node sends time messages 23.5 h ahead: unsigned, signed by its own key, "
        "and a genuine one replayed",
        "Time messages must be signed by the primary's key and carry a nonce the ECU "
        "issued (each good once); the bound on how far ahead a time may go stays",
        spoofed_time,
    ),
    _scenario(
        "can-rogue-report-reader",
        ATTACK_WRONG_ECU,
        "A CAN node reads a secondary's reports and forges a receipt to erase the attack "
        "it recorded",
        "Attacks are cleared only by a receipt signed by the primary naming a report the "
        "Director accepted",
        rogue_report_reader,
    ),
    _scenario(
        "trial-version-trap",
        None,
        "A signed release passes its self-test and ticks, then traps in version()",
        "Every call into the module is inside the trial: rolled back with a signed "
        "trialFailed report, the next release installs without a reboot",
        stuck_trial,
    ),
    _scenario(
        "over-limit-image",
        None,
        "A signed release asks for 2^62 fuel per call and 4 GiB of memory",
        "ECU ceilings on signed limits: refused at the offer before any byte moves "
        "(limitsExceeded); a wall-clock bound per call (epoch interruption) besides",
        over_limit_image,
    ),
    power_cut("chunk"),
    power_cut("commit"),
    _scenario(
        "bus-off",
        None,
        "The primary's CAN controller goes bus-off mid-transfer",
        "Resumable transfer from the secondary's durable offset; nothing is activated "
        "until complete and verified",
        _transfer_fault(
            "bus-off", _primary_bus_off, detail="primary bus-off during an image chunk"
        ),
    ),
    _scenario(
        "truncated-image",
        None,
        "An image download breaks off halfway (the connection closes early)",
        "The download fails closed (DownloadError); the partial file is not kept and the "
        "next cycle downloads the image again",
        _download_attack("truncated-image", lambda data: truncated(data, len(data) // 2)),
    ),
    _scenario(
        "server-restart",
        None,
        "The Director and Image repository restart between two cycles",
        "All state is persisted (database, repository files): counters, pending "
        "assignments and metadata survive",
        _server_restart,
    ),
)

_BY_NAME = {s.name: s for s in SCENARIOS}


def scenario(name: str) -> Scenario:
    """The scenario called ``name`` (``power-cut-<point>`` for any write point)."""
    found = _BY_NAME.get(name)
    if found is not None:
        return found
    if name.startswith("power-cut-"):
        return power_cut(name.removeprefix("power-cut-").replace("-", "_"))
    raise KeyError(f"no scenario {name!r}; known: {', '.join(_BY_NAME)}")


#: Manifests reporting in-vehicle attacks before the Director quarantines a vehicle, while
#: the harness plays scenarios (``director.quarantine``; the fleet default is 3).
HARNESS_ATTACK_MANIFESTS = 1_000_000


def run_scenario(world: World, vehicle: SimVehicle, name: str | Scenario) -> ScenarioOutcome:
    """Run scenario ``name`` (or a ``Scenario``) on ``vehicle``; the world is usable again after.

    Attacks from inside the vehicle, reported again and again, quarantine it
    (``director.quarantine``): that is the fleet's answer to the scenarios
    before this one, so an operator's release (audited) comes first, and the
    outcome says when this scenario left the vehicle quarantined.
    """
    sc = scenario(name) if isinstance(name, str) else name
    release_quarantine(world, vehicle, f"before scenario {sc.name}")
    # the harness plays attacks in a row on one vehicle: quarantine for repeated
    # attack reports is the fleet's answer (tests/test_campaigns.py), lifted while it plays
    limit = world.director.attack_manifests
    world.director.attack_manifests = HARNESS_ATTACK_MANIFESTS
    try:
        outcome = sc.run(world, vehicle)
    finally:
        world.director.attack_manifests = limit
    if is_quarantined(world, vehicle):
        outcome = dataclasses.replace(
            outcome, detail=f"{outcome.detail}; the Director quarantined the vehicle".lstrip("; ")
        )
    return outcome


def is_quarantined(world: World, vehicle: SimVehicle) -> bool:
    """Is ``vehicle`` in quarantine at the Director (no new assignments)?"""
    return any(q.vin == vehicle.vin for q in world.director.list_quarantined())


def release_quarantine(world: World, vehicle: SimVehicle, note: str) -> bool:
    """Release ``vehicle`` from quarantine as the harness's operator; whether it was held."""
    if not is_quarantined(world, vehicle):
        return False
    world.director.release_quarantine(vehicle.vin, actor="uptane-sim", note=note)
    return True

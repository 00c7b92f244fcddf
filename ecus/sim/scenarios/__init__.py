"""Attack and fault scenarios against simulated vehicles (Uptane 2.1, 4.3; DESIGN 9).

Each ``Scenario`` plays one attacker (in the network, on the CAN bus, or
holding the keys of ONE repository) or one fault against a ``SimVehicle`` of
a ``World`` with real servers, and returns a ``ScenarioOutcome``: whether the
attack was blocked (no slot changed, nothing untrusted installed), the attack
names seen (the primary's result, the ECUs' reports, the Director's
inventory), the typed error, and whether a normal cycle works again once the
attack is undone. Every scenario undoes what it did (overrides, clocks,
faults, servers), so a demo can run them in sequence on one vehicle; an
update that was pending before a scenario is installed by its recovery cycle.

Scenarios that need an update in flight (slow retrieval, swapped image,
transfer faults...) use the vehicle's pending assignments, or publish and
assign a new release of its secondaries' apps when there is none.

``run_scenario(world, vehicle, name)`` runs one by name; ``SCENARIOS`` lists
them all (``power_cut(point)`` builds the power-cut fault for any write point
of ``ecus.secondary.slots.WRITE_POINTS``).

The package has one module per threat family, as ``tests/attacks/`` does:
``network`` (4.3.1-4.3.2), ``metadata`` (4.3.3), ``compromise`` (4.3.4, 5.4.2),
``can`` (the CAN bus) and ``faults``; ``base`` (Scenario, ScenarioOutcome, the
book-keeping of a run), ``updates`` (updates in flight) and ``bus`` (CAN-bus
helpers) are what they share, and ``catalogue`` lists them all.
"""

from __future__ import annotations

# ``x as x``: public names of the former single module that ``__all__`` did not list.
from .base import Scenario, ScenarioOutcome, last_manifest, pending_assignments
from .base import default_error as default_error
from .bus import FAULT_INSTALL_TIMEOUT as FAULT_INSTALL_TIMEOUT
from .bus import FAULT_RETRIES as FAULT_RETRIES
from .bus import FAULT_TIMEOUT as FAULT_TIMEOUT
from .can import ROGUE_BYTES, ROGUE_CHUNK_SIZE, RogueNode, isotp_frames
from .can import ROGUE_WINDOW as ROGUE_WINDOW
from .catalogue import SCENARIOS, run_scenario, scenario
from .faults import power_cut, restart_servers
from .updates import ensure_updates, next_release, publish_release, release_module
from .updates import waiting_updates as waiting_updates

__all__ = [
    "ROGUE_BYTES",
    "ROGUE_CHUNK_SIZE",
    "SCENARIOS",
    "RogueNode",
    "Scenario",
    "ScenarioOutcome",
    "ensure_updates",
    "isotp_frames",
    "last_manifest",
    "next_release",
    "pending_assignments",
    "power_cut",
    "publish_release",
    "release_module",
    "restart_servers",
    "run_scenario",
    "scenario",
]

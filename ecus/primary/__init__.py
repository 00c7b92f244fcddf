"""The primary ECU: full verification, downloads, manifests and its links to secondaries.

Map: ``cycle`` (``Primary``: reports, manifest, the cycle, distribution),
``verify`` (full verification of both repositories and downloads, Uptane 2.1
5.4.4.2), ``download`` (one image, written atomically), ``result`` (``CycleResult`` and friends), ``config``
(``PrimaryConfig``), ``state`` (persisted trusted state and report counters),
``fetch`` (the ngclient fetcher with download policy), ``links`` (the
``SecondaryClient`` protocol, in-memory link) and ``can_link`` (a secondary
over ISO-TP/CAN).
"""

from ecus.primary.config import DownloadPolicy, EcuEntry, MetadataLimits, PrimaryConfig
from ecus.primary.cycle import Primary
from ecus.primary.download import safe_target_path
from ecus.primary.result import CycleIssue, CycleResult, ManifestOutcome

__all__ = [
    "CycleIssue",
    "CycleResult",
    "DownloadPolicy",
    "EcuEntry",
    "ManifestOutcome",
    "MetadataLimits",
    "Primary",
    "PrimaryConfig",
    "safe_target_path",
]

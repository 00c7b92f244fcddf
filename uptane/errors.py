"""One exception hierarchy for uptane-wasm (DESIGN 8).

``UptaneError`` is the root. Errors about bad remote data also derive from
python-tuf's ``RepositoryError`` so that code catching the TUF family catches
them too. Every error that is evidence of an attack names it in ``attack``:
that name is what an ECU puts into its next version report (Uptane 2.1,
5.4.2.1 "attacks detected"), and ``attack_name()`` maps python-tuf's own
exceptions onto the same vocabulary.

Caller bugs are not ``UptaneError``: they raise ``ValueError``/``RuntimeError``.
"""

from __future__ import annotations

from typing import ClassVar, Final

from tuf.api import exceptions as tuf_exc

# Attack names of the Uptane threat model (Uptane 2.1, 4.3.1 - 4.3.4) plus the
# CAN- and vehicle-level ones this project detects. Reports carry these strings.
ATTACK_EAVESDROP: Final = "eavesdrop"
ATTACK_DROP_REQUEST: Final = "drop_request"
ATTACK_SLOW_RETRIEVAL: Final = "slow_retrieval"
ATTACK_FREEZE: Final = "freeze"
ATTACK_PARTIAL_BUNDLE: Final = "partial_bundle_installation"
ATTACK_ROLLBACK: Final = "rollback"
ATTACK_ENDLESS_DATA: Final = "endless_data"
ATTACK_MIX_AND_MATCH: Final = "mix_and_match"
ATTACK_ARBITRARY_SOFTWARE: Final = "arbitrary_software"
ATTACK_WRONG_ECU: Final = "wrong_ecu"
ATTACK_WRONG_VEHICLE: Final = "wrong_vehicle"
ATTACK_REPLAYED_REPORT: Final = "replayed_report"
ATTACK_SPOOFED_MESSAGE: Final = "spoofed_message"
ATTACK_INVALID_METADATA: Final = "invalid_metadata"
ATTACK_REPLAYED_MESSAGE: Final = "replayed_message"

ATTACKS: Final = frozenset(
    {
        ATTACK_EAVESDROP,
        ATTACK_DROP_REQUEST,
        ATTACK_SLOW_RETRIEVAL,
        ATTACK_FREEZE,
        ATTACK_PARTIAL_BUNDLE,
        ATTACK_ROLLBACK,
        ATTACK_ENDLESS_DATA,
        ATTACK_MIX_AND_MATCH,
        ATTACK_ARBITRARY_SOFTWARE,
        ATTACK_WRONG_ECU,
        ATTACK_WRONG_VEHICLE,
        ATTACK_REPLAYED_REPORT,
        ATTACK_SPOOFED_MESSAGE,
        ATTACK_INVALID_METADATA,
        ATTACK_REPLAYED_MESSAGE,
    }
)


class UptaneError(Exception):
    """Root of every error this project raises on purpose."""

    attack: ClassVar[str | None] = None


# --- bad remote data (metadata, images, manifests) ---------------------------


class UptaneRepositoryError(UptaneError, tuf_exc.RepositoryError):
    """Remote metadata or images are invalid in an Uptane-specific way."""

    attack: ClassVar[str | None] = ATTACK_INVALID_METADATA


class MetadataError(UptaneRepositoryError):
    """An Uptane field of TUF metadata is missing or malformed (DESIGN 3)."""


class TargetMismatchError(UptaneRepositoryError):
    """Director and Image repository disagree about a target (5.4.4.2 step 7)."""

    attack: ClassVar[str | None] = ATTACK_ARBITRARY_SOFTWARE


class HardwareIdMismatchError(TargetMismatchError):
    """A target's hardware id does not fit the ECU (5.4.4.2, 5.4.4.1)."""

    attack: ClassVar[str | None] = ATTACK_WRONG_ECU


class ReleaseCounterRollbackError(UptaneRepositoryError):
    """A target's release counter is lower than the installed one (5.4.4.2)."""

    attack: ClassVar[str | None] = ATTACK_ROLLBACK


class UnknownEcuError(UptaneRepositoryError):
    """Director targets name an ECU that is not in this vehicle (5.4.4.2)."""

    attack: ClassVar[str | None] = ATTACK_WRONG_ECU


class DuplicateEcuError(UptaneRepositoryError):
    """Director targets name one ECU more than once (5.4.4.2)."""

    attack: ClassVar[str | None] = ATTACK_PARTIAL_BUNDLE


class DelegationNotAllowedError(UptaneRepositoryError):
    """Director targets carry delegations, which Uptane forbids (5.2.3)."""

    attack: ClassVar[str | None] = ATTACK_INVALID_METADATA


class VehicleIdMismatchError(UptaneRepositoryError):
    """Director metadata was issued for another vehicle."""

    attack: ClassVar[str | None] = ATTACK_WRONG_VEHICLE


class UnsafeTargetPathError(UptaneRepositoryError):
    """A target name would escape its directory or is not a plain relative path."""

    attack: ClassVar[str | None] = ATTACK_ARBITRARY_SOFTWARE


class DelegationViolationError(UptaneRepositoryError):
    """A target is outside its delegation's paths or hardware ids (5.3.3)."""

    attack: ClassVar[str | None] = ATTACK_ARBITRARY_SOFTWARE


class ImageMismatchError(UptaneRepositoryError):
    """Downloaded or received image bytes do not match their metadata."""

    attack: ClassVar[str | None] = ATTACK_ARBITRARY_SOFTWARE


class EndlessDataError(UptaneRepositoryError):
    """More bytes arrived than the metadata allows."""

    attack: ClassVar[str | None] = ATTACK_ENDLESS_DATA


class SlowRetrievalError(UptaneRepositoryError):
    """A download fell below the minimum rate."""

    attack: ClassVar[str | None] = ATTACK_SLOW_RETRIEVAL


class MixAndMatchError(UptaneRepositoryError):
    """A metadata file is newer than the signed index that points at it (4.3.3)."""

    attack: ClassVar[str | None] = ATTACK_MIX_AND_MATCH


class RootRotationError(UptaneRepositoryError, tuf_exc.BadVersionNumberError):
    """``N.root.json`` carries another version than N: a broken root rotation (TUF 5.3.5)."""

    attack: ClassVar[str | None] = ATTACK_INVALID_METADATA


# --- manifests ---------------------------------------------------------------


class ManifestError(UptaneError):
    """A vehicle version manifest or ECU version report is refused (5.4.2)."""

    reason: str = "invalid_manifest"

    def __init__(self, message: str, reason: str | None = None) -> None:
        super().__init__(message)
        if reason is not None:
            self.reason = reason


# --- ECU side ----------------------------------------------------------------


class TransportError(UptaneError):
    """The link to a secondary failed: timeout, bus off, oversized message."""


class TransportTimeout(TransportError):
    """No complete response arrived within the timeout (DESIGN 4)."""


class MessageTooLarge(TransportError):
    """A message exceeds the size limit of the link, on sending or on receipt."""


class BusOffError(TransportError):
    """The CAN controller is bus-off and cannot transmit."""


class FramingError(TransportError):
    """Transport framing broke (e.g. ISO-TP wrong sequence number, invalid frame)."""


class CodecError(UptaneError):
    """Bytes could not be encoded or decoded as the expected ASN.1/DER value."""


class SpoofedMessageError(UptaneError):
    """A bus message that must be signed by the primary is not (DESIGN 7)."""

    attack: ClassVar[str | None] = ATTACK_SPOOFED_MESSAGE


class ReplayedMessageError(UptaneError):
    """A signed bus message does not carry a nonce its receiver issued (a replay)."""

    attack: ClassVar[str | None] = ATTACK_REPLAYED_MESSAGE


class InstallError(UptaneError):
    """An image could not be installed; the previous slot stays active."""


class WasmError(InstallError):
    """A WASM module failed to validate, instantiate or run within its limits.

    ``reason`` is one of ``WASM_REASONS``; the ECU reports it when it rolls back.
    """

    reason: ClassVar[str] = "invalid_module"


class WasmInvalidModuleError(WasmError):
    """The bytes are not a valid WASM binary module, or an import has the wrong type."""

    reason: ClassVar[str] = "invalid_module"


class WasmForbiddenImportError(WasmError):
    """The module imports something its signed capabilities do not grant."""

    reason: ClassVar[str] = "forbidden_import"


class WasmTrapError(WasmError):
    """The module trapped (unreachable, out-of-bounds access, bad host call...)."""

    reason: ClassVar[str] = "trap"


class WasmFuelExhaustedError(WasmError):
    """A call used up its fuel budget (an endless loop, or too much work)."""

    reason: ClassVar[str] = "fuel_exhausted"


class WasmMemoryLimitError(WasmError):
    """The module needs more linear memory than its signed ``memory_pages``."""

    reason: ClassVar[str] = "memory_limit"


class WasmSelfTestFailedError(WasmError):
    """The module's ``self_test`` export returned non-zero."""

    reason: ClassVar[str] = "self_test_failed"


class WasmMissingExportError(WasmError):
    """A required export (memory, self_test, tick) is missing or has the wrong type."""

    reason: ClassVar[str] = "missing_export"


class WasmHealthFailedError(WasmError):
    """The module reported a non-zero health code during its trial."""

    reason: ClassVar[str] = "health_failed"


class WasmTimeoutError(WasmError):
    """A call ran longer than the ECU's wall-clock bound (epoch interruption)."""

    reason: ClassVar[str] = "timeout"


class WasmHostError(WasmError):
    """A host function failed under the module (a peripheral error)."""

    reason: ClassVar[str] = "host_error"


class WasmLimitsExceededError(WasmError):
    """The image's signed limits exceed this ECU's ceilings: refused before transfer."""

    reason: ClassVar[str] = "limits_exceeded"


WASM_REASONS: Final = frozenset(
    cls.reason
    for cls in (
        WasmInvalidModuleError,
        WasmForbiddenImportError,
        WasmTrapError,
        WasmFuelExhaustedError,
        WasmMemoryLimitError,
        WasmSelfTestFailedError,
        WasmMissingExportError,
        WasmHealthFailedError,
        WasmTimeoutError,
        WasmHostError,
        WasmLimitsExceededError,
    )
)


class KeyLoadError(UptaneError):
    """A key or signer could not be loaded or generated."""


class ConfigError(UptaneError):
    """Configuration is missing or invalid; the message says what to fix."""


class StateError(UptaneError):
    """An ECU's persisted state is corrupt or was changed outside it (``ecus.primary.state``).

    No attack name of its own (a report's attack list is a fixed
    enumeration): the cycle that finds it fails closed and says so in the
    ECU's next report (``internalError`` with this message).
    """


class RepositoryEditError(UptaneError):
    """An offline repository edit is refused; nothing was written."""


# --- mapping onto reported attack names -------------------------------------

_TUF_ATTACKS: Final[tuple[tuple[type[Exception], str], ...]] = (
    (tuf_exc.ExpiredMetadataError, ATTACK_FREEZE),
    (tuf_exc.BadVersionNumberError, ATTACK_ROLLBACK),
    (tuf_exc.EqualVersionNumberError, ATTACK_ROLLBACK),
    (tuf_exc.DownloadLengthMismatchError, ATTACK_ENDLESS_DATA),
    (tuf_exc.SlowRetrievalError, ATTACK_SLOW_RETRIEVAL),
    (tuf_exc.LengthOrHashMismatchError, ATTACK_MIX_AND_MATCH),
    (tuf_exc.UnsignedMetadataError, ATTACK_ARBITRARY_SOFTWARE),
    (tuf_exc.RepositoryError, ATTACK_INVALID_METADATA),
    (tuf_exc.DownloadError, ATTACK_DROP_REQUEST),
)


def attack_name(exc: BaseException) -> str | None:
    """Return the attack an exception is evidence of, or None for plain faults."""
    if isinstance(exc, UptaneError):
        return exc.attack
    for exc_type, name in _TUF_ATTACKS:
        if isinstance(exc, exc_type):
            return name
    return None

"""Building one vehicle's Director targets, snapshot and timestamp, without I/O (issue 12).

Uptane 2.1, 5.2 / 5.3.2: each vehicle has its own targets (its pending
assignments, bound to its VIN), snapshot and timestamp, signed with the
online keys; the targets also in DER for secondaries (DESIGN 3). This is the
same content the generic ``uptane.repository.SigningRepository`` produces,
built directly: no re-reading and re-serialising of every role and of the
root per edit (the profile of issue 12 put ~75 % of a vehicle's signing
there). Each document is serialised once, the DER signed part is encoded
once and signed as is, and the signers and key lists come from a
``RoleSigners`` made once per root version.

Versions come from the caller (what is stored), so they strictly increase:
the new version of each role is one above the highest it ever had.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from asn1tools.codecs import ber as ber_codec
from securesystemslib.signer import Signature, Signer
from tuf.api.metadata import Metadata, MetaFile, Root, Snapshot, TargetFile, Targets, Timestamp
from tuf.api.serialization.json import JSONSerializer

from uptane import der_metadata
from uptane.canonical_json import CanonicalJSONSerializer
from uptane.codec import encode
from uptane.metadata import ECU_SERIAL, set_vehicle_id

_JSON = JSONSerializer(compact=True)
_SIGNED_DER = der_metadata.DERSignedSerializer()
# what the JSON signatures cover: tuf's canonical JSON, the same bytes faster (issue 12)
_CANONICAL = CanonicalJSONSerializer()


@dataclass(frozen=True)
class RoleSigners:
    """The online signers of one root version, per role, in keyid order."""

    root_version: int
    targets: tuple[Signer, ...]
    snapshot: tuple[Signer, ...]
    timestamp: tuple[Signer, ...]

    @classmethod
    def of(cls, root_version: int, root: Root, pool: Mapping[str, Signer]) -> RoleSigners:
        def pick(role: str) -> tuple[Signer, ...]:
            return tuple(pool[k] for k in sorted(root.roles[role].keyids) if k in pool)

        return cls(root_version, pick(Targets.type), pick(Snapshot.type), pick(Timestamp.type))


@dataclass(frozen=True)
class PendingTarget:
    """One pending assignment as the vehicle's targets list it (5.2.3)."""

    image: str
    length: int
    hashes: Mapping[str, str]
    custom: Mapping[str, Any]
    ecu_serial: str


@dataclass(frozen=True)
class Versions:
    """The highest version each role of a vehicle had (0: never signed)."""

    targets: int = 0
    snapshot: int = 0
    timestamp: int = 0


@dataclass(frozen=True)
class VehicleFiles:
    """What one signing produced: the files to store and the vehicle's new state."""

    files: dict[str, bytes]
    targets_version: int
    snapshot_version: int
    expires: datetime
    root_version: int  # the root whose online keys signed them


# ``N.targets.json`` / ``N.snapshot.json``: the versioned files a signing stores
_VERSIONED_NAME = re.compile(r"^([1-9][0-9]{0,9})\.((?:targets|snapshot)\.(?:json|der))\Z")


def parsed_version(data: bytes | None) -> int:
    """The ``signed.version`` of a stored JSON metadata file (0: none or unreadable)."""
    if data is None:
        return 0
    try:
        value = json.loads(data)["signed"]["version"]
    except (ValueError, KeyError, TypeError):
        return 0
    return value if isinstance(value, int) else 0


def named_versions(names: Iterable[str]) -> dict[str, int]:
    """The highest ``N`` of a vehicle's stored ``N.targets.json`` / ``N.snapshot.json``, by role.

    Targets and snapshot are stored under versioned names only (the
    unversioned names are served as the highest of them, migration 0008),
    so the names give the versions: no need to read and parse the files
    (issue 12).
    """
    names = tuple(names)
    found: dict[str, int] = {}
    for role in (Targets.type, Snapshot.type):
        latest = latest_versioned(names, f"{role}.json")
        if latest is not None:
            found[role] = latest[0]
    return found


def latest_versioned(names: Iterable[str], filename: str) -> tuple[int, str] | None:
    """The highest ``N`` of the names ``N.<filename>`` among ``names``, and that name.

    ``filename`` is ``targets.json``, ``targets.der`` or ``snapshot.json``:
    what the unversioned name serves (``director.store.ALIASES``). Versions
    are compared as numbers (``10`` is above ``9``).
    """
    best: tuple[int, str] | None = None
    for name in names:
        m = _VERSIONED_NAME.match(name)
        if m is not None and m.group(2) == filename:
            version = int(m.group(1))
            if best is None or version > best[0]:
                best = (version, name)
    return best


def stored_versions(
    files: Mapping[str, bytes], targets_version: int, by_name: Mapping[str, int] | None = None
) -> Versions:
    """The versions of a vehicle's stored targets, snapshot and timestamp (and column).

    ``by_name``: ``named_versions`` of every stored file name of the vehicle
    (targets and snapshot); ``files``: the stored ``timestamp.json``, whose
    version is in its content.
    """
    by_name = by_name or {}
    return Versions(
        max(targets_version, by_name.get("targets", 0)),
        by_name.get("snapshot", 0),
        parsed_version(files.get("timestamp.json")),
    )


class _Memo:
    """``to_dict`` computed once: a document here is never changed once built.

    Its canonical JSON (what the signatures cover), its JSON file and its DER
    are all made from ``to_dict()``; tuf would build the dict for each.
    """

    _memo: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        if self._memo is None:
            self._memo = super().to_dict()  # type: ignore[misc]
        return self._memo


class _Targets(_Memo, Targets):
    pass


class _Snapshot(_Memo, Snapshot):
    pass


class _Timestamp(_Memo, Timestamp):
    pass


def _sign_json(md: Metadata[Any], signers: Sequence[Signer]) -> bytes:
    for signer in signers:
        md.sign(signer, append=True, signed_serializer=_CANONICAL)
    return md.to_bytes(_JSON)


def _sign_der(signed: Targets, signers: Sequence[Signer]) -> bytes:
    """DER ``Metadata`` of ``signed``: its DER encoded once, signed, then wrapped (DESIGN 3).

    Byte for byte what ``der_metadata.to_der_metadata`` gives (ed25519 is
    deterministic; ``tests/test_metadata_signer.py`` compares them).
    """
    data = _SIGNED_DER.serialize(signed)
    return der_metadata.join_envelope(
        data, [_signature_der(signer.sign(data)) for signer in signers]
    )


def _tlv(tag: int, content: bytes) -> bytes:
    return bytes((tag,)) + bytes(ber_codec.encode_length_definite(len(content))) + content


def _signature_der(sig: Signature) -> bytes:
    """DER ``Signature ::= SEQUENCE { keyid VisibleString (SIZE(64)), value OCTET STRING }``.

    Built directly (the ASN.1 compiler's constraint checks cost more than the
    signature): what ``uptane.codec.encode("Signature", ...)`` gives for a
    valid keyid and value, which are checked; anything else goes to the codec
    (which refuses it).
    """
    keyid = sig.keyid.encode("ascii")
    value = bytes.fromhex(sig.signature)
    if len(keyid) != 64 or not keyid.isalnum() or not 1 <= len(value) <= 512:
        return encode("Signature", {"keyid": sig.keyid, "value": value})
    keyid_tag, value_tag = _signature_tags()
    return _tlv(0x30, _tlv(keyid_tag, keyid) + _tlv(value_tag, value))


@functools.cache
def _signature_tags() -> tuple[int, int]:
    """The tags the ASN.1 module gives ``Signature``'s two fields (read from the codec)."""
    sample = encode("Signature", {"keyid": "0" * 64, "value": b"\1"})
    return sample[2], sample[2 + 2 + 64]


def meta_file(version: int, data: bytes) -> MetaFile:
    """What a snapshot/timestamp lists of a file: version, length and SHA-256 (TUF 4.4, 4.5).

    One set of online keys signs every vehicle's metadata, and only the
    targets name the vehicle: with versions alone, another vehicle's newer
    timestamp and snapshot would lead to this vehicle's own targets of the
    version they list and be kept as its rollback floor (a freeze). The
    hashes bind each vehicle's timestamp to its snapshot and its snapshot to
    its targets, whatever the versions.
    """
    return MetaFile(
        version=version, length=len(data), hashes={"sha256": hashlib.sha256(data).hexdigest()}
    )


def build_vehicle_files(
    vin: str,
    pending: Sequence[PendingTarget],
    previous: Versions,
    signers: RoleSigners,
    now: datetime,
    expiry: timedelta,
) -> VehicleFiles:
    """Sign ``vin``'s targets (``pending``), snapshot and timestamp one version up (5.2, 5.3.2)."""
    if not (signers.targets and signers.snapshot and signers.timestamp):
        raise ValueError("every online role needs a signer")
    expires = (now + expiry).replace(microsecond=0)
    targets: dict[str, TargetFile] = {}
    for p in pending:
        if p.image in targets:  # guarded at assignment time
            raise RuntimeError(f"{vin}: two pending assignments of {p.image}")
        custom = dict(p.custom)
        custom[ECU_SERIAL] = p.ecu_serial
        targets[p.image] = TargetFile(
            length=p.length,
            hashes=dict(p.hashes),
            path=p.image,
            unrecognized_fields={"custom": custom},
        )
    tv, sv, ts = previous.targets + 1, previous.snapshot + 1, previous.timestamp + 1
    # Uptane 5.2.3: no delegations on the Director
    t = _Targets(version=tv, expires=expires, targets=targets)
    set_vehicle_id(t, vin)
    targets_json = _sign_json(Metadata(t), signers.targets)
    targets_der = _sign_der(t, signers.targets)
    s = _Snapshot(version=sv, expires=expires, meta={"targets.json": meta_file(tv, targets_json)})
    snapshot_json = _sign_json(Metadata(s), signers.snapshot)
    ts_md = _Timestamp(version=ts, expires=expires, snapshot_meta=meta_file(sv, snapshot_json))
    timestamp_json = _sign_json(Metadata(ts_md), signers.timestamp)
    # each file once: ``targets.json`` & co. are served as the highest version
    # (``director.store.ALIASES``; issue 12)
    files = {
        f"{tv}.targets.json": targets_json,
        f"{tv}.targets.der": targets_der,
        f"{sv}.snapshot.json": snapshot_json,
        "timestamp.json": timestamp_json,
    }
    return VehicleFiles(files, tv, sv, expires, signers.root_version)

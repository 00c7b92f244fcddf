"""Check the DER forms of Director metadata before forwarding them (DESIGN 3).

Secondaries get Director root and targets in DER, signed by the Director's
keys over the DER encoding of ``signed``. Before the primary forwards them
it verifies each one with the Director keys it already trusts from the JSON
forms and checks that the DER ``signed`` says exactly what the verified JSON
``signed`` says (Uptane 2.1, 5.4.4.2 for the JSON side; the secondary then
does 5.4.4.1 on the DER side).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from tuf.api import exceptions as tuf_exc
from tuf.api.metadata import Metadata, Root, Targets

from uptane import der_metadata
from uptane.errors import CodecError, MetadataError
from uptane.verification.full import VerifiedRepository


@dataclass(frozen=True)
class DirectorDer:
    """Verified DER envelopes to forward: root chain (oldest first) and targets."""

    root_chain: tuple[bytes, ...]
    root_versions: tuple[int, ...]
    targets: bytes
    targets_version: int


def _load_der(data: bytes, max_size: int, what: str) -> Metadata[Any]:
    try:
        return Metadata.from_bytes(data, der_metadata.DERMetadataDeserializer(max_size=max_size))
    except (CodecError, tuf_exc.RepositoryError) as e:
        raise MetadataError(f"DER {what} cannot be decoded: {e}") from e


def _same(der_md: Metadata[Any], json_md: Metadata[Any], what: str) -> None:
    if der_md.signed.to_dict() != json_md.signed.to_dict():
        raise MetadataError(f"DER {what} does not say the same as the verified JSON {what}")


def verify_director_der(
    director: VerifiedRepository,
    root_ders: Mapping[int, bytes],
    targets_der: bytes,
    *,
    max_size: int = 1_048_576,
) -> DirectorDer:
    """Verify DER Director metadata against the verified JSON repository.

    ``root_ders`` maps root version -> DER envelope, for every version in
    ``director.roots``. Each DER root must equal the JSON root of that version
    and be signed by a threshold of that root's keys and of its
    predecessor's; the DER targets must equal the JSON targets and be signed
    by a threshold of the current root's targets keys. Raises
    ``MetadataError`` (content) or ``UnsignedMetadataError`` (signatures).
    """
    chain: list[bytes] = []
    versions: list[int] = []
    prev: Root | None = None
    for json_root in director.roots:
        version = json_root.signed.version
        data = root_ders.get(version)
        if data is None:
            raise MetadataError(f"DER root v{version} is missing")
        der_root = _load_der(data, max_size, f"root v{version}")
        _same(der_root, json_root, f"root v{version}")
        signed_bytes = der_metadata.der_signed_bytes(der_root.signed)
        if prev is not None:
            prev.verify_delegate(Root.type, signed_bytes, der_root.signatures)
        json_root.signed.verify_delegate(Root.type, signed_bytes, der_root.signatures)
        prev = json_root.signed
        chain.append(data)
        versions.append(version)

    der_targets = _load_der(targets_der, max_size, "targets")
    if not isinstance(der_targets.signed, Targets):
        raise MetadataError(f"DER targets is a {der_targets.signed.type}")
    _same(der_targets, director.targets, "targets")
    director.root.verify_delegate(
        Targets.type, der_metadata.der_signed_bytes(der_targets.signed), der_targets.signatures
    )
    return DirectorDer(
        root_chain=tuple(chain),
        root_versions=tuple(versions),
        targets=targets_der,
        targets_version=director.targets.signed.version,
    )

"""Check the DER forms of Director metadata before forwarding them (DESIGN 3).

Secondaries get Director root and targets in DER, signed by the Director's
keys over the DER encoding of ``signed``. Before the primary forwards them
it verifies each one with the Director keys it already trusts from the JSON
forms and checks that the DER ``signed`` says exactly what the verified JSON
``signed`` says (Uptane 2.1, 5.4.4.2 for the JSON side; the secondary then
does 5.4.4.1 on the DER side).

Cost: one encode of the verified JSON's ``signed`` (without asn1tools'
constraint pass: DER does not depend on constraints, so bytes equal
to the input still prove it canonical and equal to the JSON, and a value that
breaks one is refused where the DER is decoded, by each secondary,
``uptane.codec.decode``; the JSON is the Director's, signed) and a decode of each
(small) ``Signature`` element; the envelope rebuilt from them must equal the
input byte for byte, which proves at once that the input is canonical DER
and that it says what the JSON says; the ``signed`` part of the input is
never decoded. Signatures are checked over those bytes. ``DerCache`` keeps envelopes
already verified by version, so an unchanged root or targets is neither
fetched nor checked again, and the DER of each target of the last targets
checked, so a new targets version encodes only the targets that changed
(``uptane.der_targets``; issue 16).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Final

from securesystemslib.signer import Signature
from tuf.api.metadata import Root, Signed, Targets

from uptane import codec, der_metadata
from uptane.der_targets import TargetPieces, targets_signed_der
from uptane.der_values import _keyid
from uptane.errors import CodecError, MetadataError
from uptane.verification.full import VerifiedRepository

SIGNATURE_TYPE: Final = "Signature"
# Metadata.signatures is SEQUENCE (SIZE(0..64)) OF Signature (uptane.asn)
MAX_SIGNATURES: Final = 64


@dataclass(frozen=True)
class DirectorDer:
    """Verified DER envelopes to forward: root chain (oldest first) and targets."""

    root_chain: tuple[bytes, ...]
    root_versions: tuple[int, ...]
    targets: bytes
    targets_version: int


@dataclass
class DerCache:
    """DER envelopes already verified, with the JSON they were checked against.

    An entry is reused only for the same role and version, an equal verified
    JSON ``signed`` (and, for a root, an equal predecessor) and the very same
    DER bytes. Holds the current root chain's versions and one targets, and
    ``target_pieces``: the ASN.1 value and DER of each target of the last
    targets encoded (``targets_signed_der``), whatever the envelope's fate (a
    pure function of the value, trusting nothing).
    """

    roots: dict[int, tuple[Root, Root | None, bytes]] = field(default_factory=dict)
    targets: tuple[Targets, bytes] | None = None
    target_pieces: TargetPieces = field(default_factory=dict)

    def root(self, json_root: Root, prev: Root | None) -> bytes | None:
        """The verified DER of ``json_root`` (following ``prev``), if held."""
        entry = self.roots.get(json_root.version)
        if entry is None or not _equal(entry[0], json_root) or not _equal(entry[1], prev):
            return None
        return entry[2]

    def targets_for(self, json_targets: Targets) -> bytes | None:
        """The verified DER of ``json_targets``, if held."""
        if self.targets is None or not _equal(self.targets[0], json_targets):
            return None
        return self.targets[1]


def _equal(a: Signed | None, b: Signed | None) -> bool:
    return a is b or (a is not None and b is not None and a == b)


def _check_envelope(
    data: bytes, json_signed: Signed, max_size: int, what: str, cache: DerCache | None = None
) -> tuple[bytes, dict[str, Signature]]:
    """``data`` is the canonical DER of ``json_signed`` plus signatures: (signed bytes, sigs).

    One encode (the verified JSON's ``signed``; for targets, of the targets
    ``cache`` holds no equal one of) and the small ``Signature`` elements
    decoded; nothing else of ``data`` is decoded: the envelope rebuilt from
    those canonical parts must equal ``data`` byte for byte.
    """
    if len(data) > max_size:
        raise MetadataError(f"DER {what}: {len(data)} bytes exceeds the limit of {max_size}")
    try:
        _, elements = der_metadata.split_envelope(data)
        if len(elements) > MAX_SIGNATURES:
            raise CodecError(f"more than {MAX_SIGNATURES} signatures")
        signatures: dict[str, Signature] = {}
        for element in elements:
            value = codec.decode(SIGNATURE_TYPE, element)  # canonical, constraints checked
            keyid = _keyid(value["keyid"], "signature keyid")
            if keyid in signatures:
                raise CodecError(f"signature keyid {keyid} appears twice")
            signatures[keyid] = Signature(keyid, bytes(value["value"]).hex())
    except CodecError as e:
        raise MetadataError(f"DER {what} cannot be decoded: {e}") from e
    try:
        if isinstance(json_signed, Targets):
            held = cache.target_pieces if cache is not None else None
            expected, pieces = targets_signed_der(json_signed, held, check_constraints=False)
            if cache is not None:
                cache.target_pieces = pieces
        else:
            asn1 = der_metadata._signed_to_asn1(json_signed)  # every Python type checked
            expected = codec.encode(
                der_metadata.SIGNED_TYPE, asn1, check_types=False, check_constraints=False
            )
    except (CodecError, ValueError, TypeError, KeyError, AttributeError) as e:
        raise MetadataError(f"the verified JSON {what} has no DER form: {e}") from e
    if der_metadata.join_envelope(expected, elements) != data:
        raise MetadataError(
            f"DER {what} does not say the same as the verified JSON {what} "
            "(or is not in canonical DER form)"
        )
    return expected, signatures


def verify_director_der(
    director: VerifiedRepository,
    root_ders: Mapping[int, bytes],
    targets_der: bytes,
    *,
    max_size: int = 1_048_576,
    cache: DerCache | None = None,
) -> DirectorDer:
    """Verify DER Director metadata against the verified JSON repository.

    ``root_ders`` maps root version -> DER envelope, for every version in
    ``director.roots``. Each DER root must be the canonical DER of the JSON
    root of that version and be signed by a threshold of that root's keys and
    of its predecessor's; the DER targets must be the canonical DER of the
    JSON targets and be signed by a threshold of the current root's targets
    keys. Envelopes ``cache`` holds for the same JSON are not checked again;
    what verifies is stored in it. Raises ``MetadataError`` (content) or
    ``UnsignedMetadataError`` (signatures).
    """
    chain: list[bytes] = []
    versions: list[int] = []
    prev: Root | None = None
    for json_root in director.roots:
        version = json_root.version
        data = root_ders.get(version)
        if data is None:
            raise MetadataError(f"DER root v{version} is missing")
        if cache is None or cache.root(json_root, prev) != data:
            signed_bytes, signatures = _check_envelope(
                data, json_root, max_size, f"root v{version}"
            )
            if prev is not None:
                prev.verify_delegate(Root.type, signed_bytes, signatures)
            json_root.verify_delegate(Root.type, signed_bytes, signatures)
            if cache is not None:
                cache.roots[version] = (json_root, prev, data)
        prev = json_root
        chain.append(data)
        versions.append(version)
    if cache is not None:
        for old in set(cache.roots) - set(versions):
            del cache.roots[old]

    json_targets = director.targets
    if cache is None or cache.targets_for(json_targets) != targets_der:
        signed_bytes, signatures = _check_envelope(
            targets_der, json_targets, max_size, "targets", cache
        )
        director.root.verify_delegate(Targets.type, signed_bytes, signatures)
        if cache is not None:
            cache.targets = (json_targets, targets_der)
    return DirectorDer(
        root_chain=tuple(chain),
        root_versions=tuple(versions),
        targets=targets_der,
        targets_version=json_targets.version,
    )

"""TUF metadata in DER: python-tuf (de)serializers for what secondaries receive (DESIGN 3).

``DERSignedSerializer``, ``DERMetadataSerializer``, ``DERMetadataDeserializer``
and ``to_der_metadata`` plug into python-tuf's serialization API; the ASN.1
encoding itself is ``uptane.codec``'s.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any, Final

import asn1tools
from asn1tools.codecs import ber as ber_codec
from securesystemslib.signer import Signer
from tuf.api.metadata import Metadata, Signed
from tuf.api.serialization import (
    DeserializationError,
    MetadataDeserializer,
    MetadataSerializer,
    SerializationError,
    SignedSerializer,
)

from uptane.codec import decode, encode
from uptane.der_values import (
    MAX_JSON_DEPTH as MAX_JSON_DEPTH,
)
from uptane.der_values import (
    _bool,
    _check_sorted,
    _dict,
    _expires_from_asn1,
    _expires_to_asn1,
    _fail,
    _get_unrecognized,
    _hashes_from_asn1,
    _hashes_to_asn1,
    _hex,
    _int,
    _json_from_asn1,
    _json_to_asn1,
    _keyid,
    _keyids_from_asn1,
    _keyids_to_asn1,
    _keys_from_asn1,
    _keys_to_asn1,
    _list,
    _metafile_from_asn1,
    _metafile_to_asn1,
    _put_unrecognized,
    _role_from_asn1,
    _role_to_asn1,
    _split,
    _str,
)
from uptane.errors import CodecError

# --- TUF metadata in DER (DESIGN 3) -------------------------------------------
#
# python-tuf serialization plug points. Conversion goes through python-tuf's own
# ``to_dict``/``from_dict``: the DER value is built from ``signed.to_dict()``
# and decoded DER becomes a dict handed to ``Metadata.from_dict``, so python-tuf
# does all TUF validation. Maps are encoded sorted by key and decoders refuse
# anything but the one canonical encoding (``TufSigned``/``Metadata`` in
# ``uptane.asn``), so the DER a signature covers is a function of the content.

METADATA_TYPE: Final = "Metadata"
SIGNED_TYPE: Final = "TufSigned"
# The largest DER metadata file accepted (MetadataPush.der has the same cap).
DEFAULT_MAX_METADATA: Final = 1_048_576
_ROOT_ROLES: Final = ("root", "snapshot", "targets", "timestamp")


class DERSerializationError(CodecError, SerializationError):
    """TUF metadata cannot be expressed in the DER form (e.g. a float, a non-hex hash)."""


class DERDeserializationError(CodecError, DeserializationError):
    """Bytes are not one canonical DER ``Metadata`` holding valid TUF metadata."""


_COMMON: Final = ("_type", "spec_version", "version", "expires")


def _common_to_asn1(d: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "specVersion": _str(d["spec_version"], "spec_version"),
        "version": _int(d["version"], "version"),
        "expires": _expires_to_asn1(d["expires"]),
    }


def _common_from_asn1(kind: str, value: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "_type": kind,
        "spec_version": value["specVersion"],
        "version": value["version"],
        "expires": _expires_from_asn1(value["expires"]),
    }


def _root_to_asn1(d: Mapping[str, Any]) -> dict[str, Any]:
    out = _common_to_asn1(d)
    if "consistent_snapshot" in d:
        out["consistentSnapshot"] = _bool(d["consistent_snapshot"], "consistent_snapshot")
    out["keys"] = _keys_to_asn1(d["keys"], "root keys")
    roles = _dict(d["roles"], "root roles")
    if set(roles) != set(_ROOT_ROLES):
        _fail("root roles", f"must be exactly {', '.join(_ROOT_ROLES)}")
    out["roles"] = {name: _role_to_asn1(roles[name], f"role {name}") for name in _ROOT_ROLES}
    rest = _split(d, (*_COMMON, "consistent_snapshot", "keys", "roles"), "root")
    return _put_unrecognized(out, rest, "root")


def _root_from_asn1(value: Mapping[str, Any]) -> dict[str, Any]:
    out = _common_from_asn1("root", value)
    if "consistentSnapshot" in value:
        out["consistent_snapshot"] = value["consistentSnapshot"]
    out["keys"] = _keys_from_asn1(value["keys"], "root keys")
    out["roles"] = {n: _role_from_asn1(value["roles"][n], f"role {n}") for n in _ROOT_ROLES}
    return out | _get_unrecognized(value, "root")


def _snapshot_to_asn1(d: Mapping[str, Any]) -> dict[str, Any]:
    out = _common_to_asn1(d)
    meta = _dict(d["meta"], "snapshot meta")
    out["meta"] = [
        {"name": name, "meta": _metafile_to_asn1(meta[name], f"meta {name}")}
        for name in sorted(meta, key=lambda n: _str(n, "snapshot meta name"))
    ]
    return _put_unrecognized(out, _split(d, (*_COMMON, "meta"), "snapshot"), "snapshot")


def _snapshot_from_asn1(value: Mapping[str, Any]) -> dict[str, Any]:
    out = _common_from_asn1("snapshot", value)
    _check_sorted([e["name"] for e in value["meta"]], "snapshot meta")
    out["meta"] = {e["name"]: _metafile_from_asn1(e["meta"], e["name"]) for e in value["meta"]}
    return out | _get_unrecognized(value, "snapshot")


def _timestamp_to_asn1(d: Mapping[str, Any]) -> dict[str, Any]:
    out = _common_to_asn1(d)
    meta = _dict(d["meta"], "timestamp meta")
    if set(meta) != {"snapshot.json"}:
        _fail("timestamp meta", "must hold exactly snapshot.json")
    out["snapshotMeta"] = _metafile_to_asn1(meta["snapshot.json"], "snapshot.json")
    return _put_unrecognized(out, _split(d, (*_COMMON, "meta"), "timestamp"), "timestamp")


def _timestamp_from_asn1(value: Mapping[str, Any]) -> dict[str, Any]:
    out = _common_from_asn1("timestamp", value)
    out["meta"] = {"snapshot.json": _metafile_from_asn1(value["snapshotMeta"], "snapshot.json")}
    return out | _get_unrecognized(value, "timestamp")


def _target_to_asn1(
    path: str,
    value: object,
    custom_to_asn1: Callable[[object, str], tuple[str, Any]] = _json_to_asn1,
) -> dict[str, Any]:
    what = f"target {path!r}"
    target = _dict(value, what)
    length = target["length"]
    out: dict[str, Any] = {
        "path": path,
        "length": length if type(length) is int else _int(length, f"{what} length"),
        "hashes": _hashes_to_asn1(target["hashes"], f"{what} hashes"),
    }
    if "custom" in target:
        out["custom"] = custom_to_asn1(target["custom"], f"{what} custom")
    return _put_unrecognized(out, _split(target, ("length", "hashes", "custom"), what), what)


def _target_from_asn1(value: Mapping[str, Any]) -> dict[str, Any]:
    what = f"target {value['path']!r}"
    out: dict[str, Any] = {
        "length": value["length"],
        "hashes": _hashes_from_asn1(value["hashes"], f"{what} hashes"),
    }
    if "custom" in value:
        out["custom"] = _json_from_asn1(value["custom"], f"{what} custom")
    return out | _get_unrecognized(value, what)


_DELEGATED_ROLE: Final = (
    "name",
    "keyids",
    "threshold",
    "terminating",
    "paths",
    "path_hash_prefixes",
)
_SUCCINCT_ROLES: Final = ("keyids", "threshold", "bit_length", "name_prefix")


def _delegated_role_to_asn1(value: object) -> dict[str, Any]:
    role = _dict(value, "delegated role")
    name = _str(role["name"], "delegated role name")
    what = f"delegated role {name!r}"
    if ("paths" in role) == ("path_hash_prefixes" in role):
        _fail(what, "exactly one of paths and path_hash_prefixes must be set")
    if "paths" in role:
        paths = ("paths", [_str(p, f"{what} path") for p in _list(role["paths"], what)])
    else:
        prefixes = _list(role["path_hash_prefixes"], what)
        paths = ("pathHashPrefixes", [_str(p, f"{what} prefix") for p in prefixes])
    out = {
        "name": name,
        "keyids": _keyids_to_asn1(role["keyids"], f"{what} keyids"),
        "threshold": _int(role["threshold"], f"{what} threshold"),
        "terminating": _bool(role["terminating"], f"{what} terminating"),
        "paths": paths,
    }
    return _put_unrecognized(out, _split(role, _DELEGATED_ROLE, what), what)


def _delegated_role_from_asn1(value: Mapping[str, Any]) -> dict[str, Any]:
    what = f"delegated role {value['name']!r}"
    kind, paths = value["paths"]
    return {
        "name": value["name"],
        "keyids": _keyids_from_asn1(value["keyids"], f"{what} keyids"),
        "threshold": value["threshold"],
        "terminating": value["terminating"],
        ("paths" if kind == "paths" else "path_hash_prefixes"): list(paths),
        **_get_unrecognized(value, what),
    }


def _delegations_to_asn1(value: object) -> dict[str, Any]:
    deleg = _dict(value, "delegations")
    out: dict[str, Any] = {"keys": _keys_to_asn1(deleg["keys"], "delegation keys")}
    if ("roles" in deleg) == ("succinct_roles" in deleg):
        _fail("delegations", "exactly one of roles and succinct_roles must be set")
    if "roles" in deleg:
        roles = _list(deleg["roles"], "delegated roles")
        out["roles"] = ("roles", [_delegated_role_to_asn1(r) for r in roles])
    else:
        sr = _dict(deleg["succinct_roles"], "succinct_roles")
        succinct = {
            "keyids": _keyids_to_asn1(sr["keyids"], "succinct_roles keyids"),
            "threshold": _int(sr["threshold"], "succinct_roles threshold"),
            "bitLength": _int(sr["bit_length"], "succinct_roles bit_length"),
            "namePrefix": _str(sr["name_prefix"], "succinct_roles name_prefix"),
        }
        rest = _split(sr, _SUCCINCT_ROLES, "succinct_roles")
        out["roles"] = ("succinctRoles", _put_unrecognized(succinct, rest, "succinct_roles"))
    rest = _split(deleg, ("keys", "roles", "succinct_roles"), "delegations")
    return _put_unrecognized(out, rest, "delegations")


def _delegations_from_asn1(value: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"keys": _keys_from_asn1(value["keys"], "delegation keys")}
    kind, roles = value["roles"]
    if kind == "roles":
        out["roles"] = [_delegated_role_from_asn1(r) for r in roles]
    else:
        out["succinct_roles"] = {
            "keyids": _keyids_from_asn1(roles["keyids"], "succinct_roles keyids"),
            "threshold": roles["threshold"],
            "bit_length": roles["bitLength"],
            "name_prefix": roles["namePrefix"],
            **_get_unrecognized(roles, "succinct_roles"),
        }
    return out | _get_unrecognized(value, "delegations")


def _targets_to_asn1(d: Mapping[str, Any]) -> dict[str, Any]:
    out = _common_to_asn1(d)
    targets = _dict(d["targets"], "targets")
    out["targets"] = [
        _target_to_asn1(path, targets[path])
        for path in sorted(targets, key=lambda p: _str(p, "target path"))
    ]
    if "delegations" in d:
        out["delegations"] = _delegations_to_asn1(d["delegations"])
    if "custom" in d:
        out["custom"] = _json_to_asn1(d["custom"], "targets custom")
    rest = _split(d, (*_COMMON, "targets", "delegations", "custom"), "targets")
    return _put_unrecognized(out, rest, "targets")


def _targets_from_asn1(value: Mapping[str, Any]) -> dict[str, Any]:
    out = _common_from_asn1("targets", value)
    _check_sorted([t["path"] for t in value["targets"]], "targets")
    out["targets"] = {t["path"]: _target_from_asn1(t) for t in value["targets"]}
    if "delegations" in value:
        out["delegations"] = _delegations_from_asn1(value["delegations"])
    if "custom" in value:
        out["custom"] = _json_from_asn1(value["custom"], "targets custom")
    return out | _get_unrecognized(value, "targets")


_TO_ASN1: Final = {
    "root": _root_to_asn1,
    "targets": _targets_to_asn1,
    "snapshot": _snapshot_to_asn1,
    "timestamp": _timestamp_to_asn1,
}
_FROM_ASN1: Final = {
    "root": _root_from_asn1,
    "targets": _targets_from_asn1,
    "snapshot": _snapshot_from_asn1,
    "timestamp": _timestamp_from_asn1,
}


def _signed_to_asn1(signed: Signed) -> tuple[str, dict[str, Any]]:
    d = signed.to_dict()
    kind = d.get("_type")
    if kind not in _TO_ASN1:
        _fail("signed", f"unknown metadata type {kind!r}")
    return (kind, _TO_ASN1[kind](d))


def _signatures_to_asn1(md: Metadata[Any]) -> list[dict[str, Any]]:
    if md.unrecognized_fields:
        _fail("metadata", "unsigned unrecognized fields cannot be encoded in DER")
    out = []
    for keyid, sig in md.signatures.items():
        if sig.keyid != keyid or sig.unrecognized_fields:
            _fail("signature", f"malformed signature entry {keyid!r}")
        value = _hex(sig.signature, "signature")
        out.append({"keyid": _keyid(keyid, "signature keyid"), "value": value})
    return out


def _wrap_serialization(e: Exception) -> DERSerializationError:
    if isinstance(e, CodecError):
        return DERSerializationError(str(e))
    return DERSerializationError(f"cannot encode metadata as DER: {type(e).__name__}: {e}")


class DERSignedSerializer(SignedSerializer):
    """The DER encoding of ``signed`` (a ``TufSigned``): what DER signatures cover."""

    def serialize(self, signed_obj: Signed) -> bytes:
        try:
            # _signed_to_asn1 checks every Python type (der_values): asn1tools need not
            return encode(SIGNED_TYPE, _signed_to_asn1(signed_obj), check_types=False)
        except (CodecError, ValueError, TypeError, KeyError, AttributeError) as e:
            raise _wrap_serialization(e) from e


class DERMetadataSerializer(MetadataSerializer):
    """A whole metadata file as DER ``Metadata`` (signed + signatures over its DER).

    ``check_constraints=False`` only to compare the result with DER that was
    decoded with its constraints checked (``DERMetadataDeserializer``): the
    encoding of a value does not depend on them (``uptane.codec.encode``).
    """

    def __init__(self, *, check_constraints: bool = True) -> None:
        self.check_constraints = check_constraints

    def serialize(self, metadata_obj: Metadata[Any]) -> bytes:
        try:
            value = {
                "signed": _signed_to_asn1(metadata_obj.signed),
                "signatures": _signatures_to_asn1(metadata_obj),
            }
            return encode(
                METADATA_TYPE, value, check_types=False, check_constraints=self.check_constraints
            )
        except (CodecError, ValueError, TypeError, KeyError, AttributeError) as e:
            raise _wrap_serialization(e) from e


class DERMetadataDeserializer(MetadataDeserializer):
    """Parse DER ``Metadata``; python-tuf validates the content.

    Refuses input over ``max_size`` before parsing, trailing bytes, ASN.1
    constraint violations, and any encoding other than the canonical one
    (so a signature check over ``der_signed_bytes(md.signed)`` checks the very
    bytes received). Every failure is a ``DERDeserializationError``.

    One decode and one encode: the ASN.1 value is decoded without the codec's
    own canonical check (constraints checked), python-tuf builds the metadata,
    and its DER encoding (no second constraint pass) must equal the input byte
    for byte. That one comparison proves both that
    the input is canonical DER and that python-tuf's objects say exactly what
    the bytes say. The signed part of the input is kept on ``md.signed`` for
    ``der_signed_bytes`` (a slice, not a third encoding).
    """

    def __init__(self, max_size: int = DEFAULT_MAX_METADATA) -> None:
        self.max_size = max_size

    def deserialize(self, raw_data: bytes) -> Metadata[Any]:
        data = bytes(raw_data) if isinstance(raw_data, bytearray | memoryview) else raw_data
        try:
            value = decode(METADATA_TYPE, data, self.max_size, canonical=False)
            kind, signed = value["signed"]
            md_dict = {
                "signed": _FROM_ASN1[kind](signed),
                "signatures": [
                    {
                        "keyid": _keyid(s["keyid"], "signature keyid"),
                        "sig": bytes(s["value"]).hex(),
                    }
                    for s in value["signatures"]
                ],
            }
        except CodecError as e:
            raise DERDeserializationError(str(e)) from e
        except (ValueError, TypeError, KeyError, IndexError, AttributeError) as e:
            raise DERDeserializationError(f"malformed DER metadata: {e}") from e
        try:
            md: Metadata[Any] = Metadata.from_dict(md_dict)
        except Exception as e:  # python-tuf/securesystemslib validation, like JSONDeserializer
            raise DERDeserializationError(f"invalid TUF metadata: {e}") from e
        try:
            # the decode checked the constraints; byte equality carries them over
            canonical = DERMetadataSerializer(check_constraints=False).serialize(md)
        except DERSerializationError as e:
            raise DERDeserializationError(f"metadata cannot be re-encoded: {e}") from e
        if canonical != data:
            raise DERDeserializationError("metadata is not in canonical DER form")
        setattr(md.signed, _RECEIVED_SIGNED, (id(md.signed), signed_part(data)))
        return md


# Attribute of a ``Signed`` built by ``DERMetadataDeserializer``: its id and the
# DER bytes of its signed part as received (proved canonical and equal to the
# object). The id makes a copy (``copy.deepcopy`` copies the attribute) encode.
_RECEIVED_SIGNED: Final = "_uptane_der_signed"


def _tlv(data: bytes, offset: int, tag: int) -> tuple[int, int]:
    """(content start, end) of the DER element with one-octet ``tag`` at ``offset``."""
    if data[offset : offset + 1] != bytes((tag,)):
        raise CodecError(f"DER metadata: expected tag {tag:#04x} at offset {offset}")
    length, start = ber_codec.decode_length(data, offset + 1)
    if length is None or start + length > len(data):
        raise CodecError(f"DER metadata: element at offset {offset} runs past the end")
    return start, start + length


def split_envelope(envelope: bytes) -> tuple[bytes, list[bytes]]:
    """The ``signed`` element and each ``Signature`` element of a DER ``Metadata`` (slices).

    Reads only the length headers: nothing is decoded or checked for
    canonical form. ``join_envelope`` of the parts equals ``envelope`` exactly
    when its headers are canonical; ``uptane.verification.der`` relies on that
    comparison. Raises ``CodecError`` for headers that do not describe
    ``envelope`` (``Metadata`` is SEQUENCE { [0] TufSigned, [1] SEQUENCE OF
    Signature }, a CHOICE being explicitly tagged).
    """
    try:
        start, end = _tlv(envelope, 0, 0x30)
        if end != len(envelope):
            raise CodecError("DER metadata: bytes after the envelope")
        signed_start, signed_end = _tlv(envelope, start, 0xA0)
        sigs_start, sigs_end = _tlv(envelope, signed_end, 0xA1)
        if sigs_end != end:
            raise CodecError("DER metadata: bytes after the signatures")
        elements = []
        offset = sigs_start
        while offset < sigs_end:
            _, element_end = _tlv(envelope, offset, 0x30)
            if element_end > sigs_end:
                raise CodecError("DER metadata: a signature runs past the signatures")
            elements.append(envelope[offset:element_end])
            offset = element_end
    except (asn1tools.Error, TypeError, ValueError, IndexError) as e:
        raise CodecError(f"malformed DER metadata: {e}") from e
    return envelope[signed_start:signed_end], elements


def join_envelope(signed: bytes, signatures: list[bytes]) -> bytes:
    """The DER ``Metadata`` of a DER ``signed`` and DER ``Signature`` elements."""

    def tlv(tag: int, content: bytes) -> bytes:
        return bytes((tag,)) + bytes(ber_codec.encode_length_definite(len(content))) + content

    return tlv(0x30, tlv(0xA0, signed) + tlv(0xA1, b"".join(signatures)))


def signed_part(envelope: bytes) -> bytes:
    """The ``signed`` element of a canonical DER ``Metadata`` envelope (a slice)."""
    return split_envelope(envelope)[0]


def der_signed_bytes(signed: Signed) -> bytes:
    """The DER bytes signatures over ``signed`` cover (DESIGN 3).

    Verify a DER envelope with
    ``delegator.verify_delegate(role, der_signed_bytes(md.signed), md.signatures)``.
    For the very ``signed`` object ``DERMetadataDeserializer`` built, these
    are the bytes received (a slice, already proved to be the canonical
    encoding of ``signed``), so verifiers never encode twice. Anything else,
    a copy included, is encoded. An object changed in place after decoding
    keeps its received bytes: to sign changed content, sign through
    python-tuf (``Metadata.sign`` with ``DERSignedSerializer``, which always
    encodes), as ``to_der_metadata`` does.
    """
    received = getattr(signed, _RECEIVED_SIGNED, None)
    if isinstance(received, tuple) and received[0] == id(signed):
        return bytes(received[1])
    return DERSignedSerializer().serialize(signed)


def to_der_metadata(json_md: Metadata[Any], signers: Iterable[Signer]) -> bytes:
    """Re-sign ``json_md.signed`` over its DER form and return the DER envelope.

    This is what the Director serves as ``N.root.der`` / ``N.targets.der``:
    same content and keys as the JSON file, signatures over DER (DESIGN 3).
    """
    md: Metadata[Any] = Metadata(signed=json_md.signed)
    serializer = DERSignedSerializer()
    signed_any = False
    for signer in signers:
        md.sign(signer, append=True, signed_serializer=serializer)
        signed_any = True
    if not signed_any:
        raise ValueError("to_der_metadata needs at least one signer")
    return md.to_bytes(DERMetadataSerializer())

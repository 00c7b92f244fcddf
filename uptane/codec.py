"""DER codec for everything in ``uptane/asn1/uptane.asn`` (DESIGN 3 and 4).

Decoding is size-capped before any parsing, rejects trailing bytes and checks
every ASN.1 constraint; every failure is a ``CodecError``. The compiled
specification is built on first use and cached per process (no work at
import).

The second half holds python-tuf (de)serializers for the DER form of TUF
metadata that secondaries receive (``DERSignedSerializer``,
``DERMetadataSerializer``, ``DERMetadataDeserializer``, ``to_der_metadata``).
"""

from __future__ import annotations

import calendar
import functools
import itertools
import re
import types
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from importlib import resources
from typing import Any, Final, NoReturn

import asn1tools
from asn1tools.codecs import ber as ber_codec
from asn1tools.codecs import der as der_codec
from securesystemslib.signer import Signer
from tuf.api.metadata import Metadata, Signed
from tuf.api.serialization import (
    DeserializationError,
    MetadataDeserializer,
    MetadataSerializer,
    SerializationError,
    SignedSerializer,
)

from uptane.errors import CodecError

SPEC_FILE: Final = "uptane.asn"
MESSAGE_TYPE: Final = "SecondaryMessage"
# No single message on the bus may be larger (a chunk of 1 MiB + headers).
DEFAULT_MAX_MESSAGE: Final = 1_100_000

Buffer = bytes | bytearray | memoryview


@functools.cache
def spec() -> Any:
    """The compiled ASN.1 module (DER), compiled once per process."""
    text = resources.files("uptane.asn1").joinpath(SPEC_FILE).read_text(encoding="utf-8")
    compiled = asn1tools.compile_string(text, "der")
    for compiled_type in compiled.types.values():
        _check_array_tags(compiled_type.type, set())
    return compiled


def _check_array_tags(node: Any, seen: set[int]) -> None:
    """Make every SEQUENCE OF decoder of this compiled module refuse a wrong tag.

    asn1tools' DER ``SEQUENCE OF`` decoder (unlike its BER one) does not check
    that an element's tag matched, so an element with a wrong tag loops
    forever, appending to a list (eerimoq/asn1tools#180; a fix was proposed in
    PR #200). On the instances of this module only, use the BER decoder of the
    same content, which raises ``DecodeTagError`` instead. DER lengths are
    always definite, so the BER indefinite-length branch never runs.
    """
    if node is None or id(node) in seen:
        return
    seen.add(id(node))
    if isinstance(node, der_codec.ArrayType):
        node.decode_content = types.MethodType(ber_codec.ArrayType.decode_content, node)
    for attr in ("root_members", "additions", "members"):
        for child in getattr(node, attr, None) or ():
            _check_array_tags(child, seen)
    for attr in ("element_type", "inner"):
        _check_array_tags(getattr(node, attr, None), seen)


def encode(type_name: str, value: Any) -> bytes:
    """DER-encode ``value`` as ``type_name``; bad values raise ``CodecError``."""
    try:
        return bytes(spec().encode(type_name, value, check_constraints=True))
    except (asn1tools.Error, ValueError, TypeError, KeyError, AttributeError) as e:
        raise CodecError(f"cannot encode {type_name}: {e}") from e


def decode(type_name: str, data: Buffer, max_size: int = DEFAULT_MAX_MESSAGE) -> Any:
    """Decode exactly one DER value of ``type_name`` from ``data``.

    Refuses data over ``max_size`` before parsing, trailing bytes, values
    that break a constraint of the module, and any encoding of the value other
    than its DER one.
    """
    if not isinstance(data, bytes | bytearray | memoryview):
        raise CodecError(f"{type_name}: expected bytes, got {type(data).__name__}")
    data = bytes(data)
    if len(data) > max_size:
        raise CodecError(f"{type_name}: {len(data)} bytes exceeds the limit of {max_size}")
    if not data:
        raise CodecError(f"{type_name}: empty input")
    try:
        compiled = spec()
        length = compiled.decode_length(data)
        if length != len(data):
            raise CodecError(f"{type_name}: {len(data) - length} trailing bytes after the value")
        value = compiled.decode(type_name, data, check_constraints=True)
        # asn1tools also reads some BER (long-form lengths, any TRUE octet,
        # members out of order): accept only the one DER encoding of the value.
        if bytes(compiled.encode(type_name, value, check_constraints=True)) != data:
            raise CodecError(f"{type_name}: not in canonical DER form")
        return value
    except CodecError:
        raise
    except (asn1tools.Error, ValueError, TypeError, KeyError, IndexError, AttributeError) as e:
        raise CodecError(f"{type_name}: malformed DER: {e}") from e
    except RecursionError as e:
        raise CodecError(f"{type_name}: nesting too deep") from e


def encode_message(kind: str, value: Any) -> bytes:
    """Encode one primary/secondary message (an alternative of SecondaryMessage)."""
    return encode(MESSAGE_TYPE, (kind, value))


def decode_message(data: Buffer, max_size: int = DEFAULT_MAX_MESSAGE) -> tuple[str, Any]:
    """Decode one primary/secondary message into ``(kind, value)``."""
    kind, value = decode(MESSAGE_TYPE, data, max_size)
    return str(kind), value


def expect_message(data: Buffer, kind: str, max_size: int = DEFAULT_MAX_MESSAGE) -> Any:
    """Decode a message and require it to be of ``kind``."""
    got, value = decode_message(data, max_size)
    if got != kind:
        raise CodecError(f"expected a {kind} message, got {got}")
    return value


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
# Nesting limit for arbitrary JSON (custom and unrecognized fields).
MAX_JSON_DEPTH: Final = 32
_EXPIRES_FORMAT: Final = "%Y-%m-%dT%H:%M:%SZ"
_KEYID_RE: Final = re.compile(r"^[0-9a-f]{64}$")
_HEX_RE: Final = re.compile(r"^(?:[0-9a-f]{2})+$")
_ROOT_ROLES: Final = ("root", "snapshot", "targets", "timestamp")


class DERSerializationError(CodecError, SerializationError):
    """TUF metadata cannot be expressed in the DER form (e.g. a float, a non-hex hash)."""


class DERDeserializationError(CodecError, DeserializationError):
    """Bytes are not one canonical DER ``Metadata`` holding valid TUF metadata."""


def _fail(what: str, problem: str) -> NoReturn:
    raise CodecError(f"{what}: {problem}")


def _str(value: object, what: str) -> str:
    if not isinstance(value, str):
        _fail(what, f"expected a string, got {type(value).__name__}")
    return value


def _int(value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        _fail(what, f"expected an integer, got {type(value).__name__}")
    return value


def _bool(value: object, what: str) -> bool:
    if not isinstance(value, bool):
        _fail(what, f"expected a boolean, got {type(value).__name__}")
    return value


def _dict(value: object, what: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        _fail(what, f"expected an object, got {type(value).__name__}")
    return value


def _list(value: object, what: str) -> list[Any] | tuple[Any, ...]:
    if not isinstance(value, list | tuple):
        _fail(what, f"expected a list, got {type(value).__name__}")
    return value


def _keyid(value: object, what: str) -> str:
    keyid = _str(value, what)
    if not _KEYID_RE.match(keyid):
        _fail(what, f"keyid must be 64 lowercase hex characters, got {keyid!r}")
    return keyid


def _hex(value: object, what: str) -> bytes:
    text = _str(value, what)
    if not _HEX_RE.match(text):
        _fail(what, "expected lowercase hex of whole bytes")
    return bytes.fromhex(text)


def _check_sorted(keys: list[str], what: str) -> None:
    """Map entries must be strictly increasing: sorted and without duplicates."""
    for prev, cur in itertools.pairwise(keys):
        if not prev < cur:
            _fail(what, f"entries not sorted or duplicated at {cur!r}")


def _split(d: Mapping[str, Any], known: tuple[str, ...], what: str) -> dict[str, Any]:
    """Return the members of ``d`` not in ``known`` (its unrecognized fields)."""
    for key in d:
        _str(key, f"{what} key")
    return {k: v for k, v in d.items() if k not in known}


# JSON values (custom and unrecognized fields) <-> JsonValue / JsonObject


def _json_to_asn1(value: object, what: str, depth: int = 0) -> tuple[str, Any]:
    if depth > MAX_JSON_DEPTH:
        _fail(what, f"JSON nested deeper than {MAX_JSON_DEPTH}")
    if value is None:
        return ("null", None)
    if isinstance(value, bool):
        return ("boolean", value)
    if isinstance(value, int):
        return ("integer", value)
    if isinstance(value, str):
        return ("string", value)
    if isinstance(value, list | tuple):
        return ("array", [_json_to_asn1(v, what, depth + 1) for v in value])
    if isinstance(value, Mapping):
        return ("object", _object_to_asn1(value, what, depth + 1))
    return _fail(what, f"{type(value).__name__} is not allowed in TUF canonical JSON")


def _object_to_asn1(obj: Mapping[str, Any], what: str, depth: int = 0) -> list[dict[str, Any]]:
    if depth > MAX_JSON_DEPTH:
        _fail(what, f"JSON nested deeper than {MAX_JSON_DEPTH}")
    members = []
    for key in sorted(_dict(obj, what), key=lambda k: _str(k, f"{what} key")):
        members.append({"key": key, "value": _json_to_asn1(obj[key], what, depth + 1)})
    return members


def _json_from_asn1(value: tuple[str, Any], what: str, depth: int = 0) -> Any:
    if depth > MAX_JSON_DEPTH:
        _fail(what, f"JSON nested deeper than {MAX_JSON_DEPTH}")
    kind, inner = value
    if kind == "array":
        return [_json_from_asn1(v, what, depth + 1) for v in inner]
    if kind == "object":
        return _object_from_asn1(inner, what, depth + 1)
    return None if kind == "null" else inner


def _object_from_asn1(members: list[dict[str, Any]], what: str, depth: int = 0) -> dict[str, Any]:
    if depth > MAX_JSON_DEPTH:
        _fail(what, f"JSON nested deeper than {MAX_JSON_DEPTH}")
    _check_sorted([m["key"] for m in members], what)
    return {m["key"]: _json_from_asn1(m["value"], what, depth + 1) for m in members}


def _put_unrecognized(out: dict[str, Any], rest: Mapping[str, Any], what: str) -> dict[str, Any]:
    if rest:
        out["unrecognized"] = _object_to_asn1(rest, f"{what} unrecognized fields")
    return out


def _get_unrecognized(value: Mapping[str, Any], what: str) -> dict[str, Any]:
    members = value.get("unrecognized")
    if members is None:
        return {}
    if not members:
        _fail(what, "empty unrecognized fields must be omitted")
    return _object_from_asn1(members, f"{what} unrecognized fields")


# Common parts


def _expires_to_asn1(value: object) -> int:
    try:
        when = datetime.strptime(_str(value, "expires"), _EXPIRES_FORMAT)
    except ValueError as e:
        raise CodecError(f"expires: {e}") from e
    return calendar.timegm(when.timetuple())


def _expires_from_asn1(value: int) -> str:
    return datetime.fromtimestamp(value, UTC).strftime(_EXPIRES_FORMAT)


def _hashes_to_asn1(value: object, what: str) -> list[dict[str, Any]]:
    hashes = _dict(value, what)
    return [
        {"function": _str(alg, f"{what} algorithm"), "digest": _hex(hashes[alg], what)}
        for alg in sorted(hashes)
    ]


def _hashes_from_asn1(value: list[dict[str, Any]], what: str) -> dict[str, str]:
    _check_sorted([h["function"] for h in value], what)
    return {h["function"]: bytes(h["digest"]).hex() for h in value}


def _keys_to_asn1(value: object, what: str) -> list[dict[str, Any]]:
    keys = _dict(value, what)
    out = []
    for keyid in sorted(keys, key=lambda k: _keyid(k, f"{what} keyid")):
        kd = _dict(keys[keyid], f"{what} {keyid[:8]}")
        key = {
            "keyid": keyid,
            "keytype": _str(kd["keytype"], "keytype"),
            "scheme": _str(kd["scheme"], "scheme"),
            "keyval": _object_to_asn1(_dict(kd["keyval"], "keyval"), "keyval"),
        }
        rest = _split(kd, ("keytype", "scheme", "keyval"), "key")
        out.append(_put_unrecognized(key, rest, f"key {keyid[:8]}"))
    return out


def _keys_from_asn1(value: list[dict[str, Any]], what: str) -> dict[str, Any]:
    _check_sorted([k["keyid"] for k in value], what)
    keys: dict[str, Any] = {}
    for k in value:
        keyid = _keyid(k["keyid"], what)
        keys[keyid] = {
            "keytype": k["keytype"],
            "scheme": k["scheme"],
            "keyval": _object_from_asn1(k["keyval"], "keyval"),
            **_get_unrecognized(k, f"key {keyid[:8]}"),
        }
    return keys


def _keyids_to_asn1(value: object, what: str) -> list[str]:
    return [_keyid(k, what) for k in _list(value, what)]


def _keyids_from_asn1(value: list[str], what: str) -> list[str]:
    return [_keyid(k, what) for k in value]


def _role_to_asn1(value: object, what: str) -> dict[str, Any]:
    role = _dict(value, what)
    out = {
        "keyids": _keyids_to_asn1(role["keyids"], f"{what} keyids"),
        "threshold": _int(role["threshold"], f"{what} threshold"),
    }
    return _put_unrecognized(out, _split(role, ("keyids", "threshold"), what), what)


def _role_from_asn1(value: Mapping[str, Any], what: str) -> dict[str, Any]:
    return {
        "keyids": _keyids_from_asn1(value["keyids"], f"{what} keyids"),
        "threshold": value["threshold"],
        **_get_unrecognized(value, what),
    }


def _metafile_to_asn1(value: object, what: str) -> dict[str, Any]:
    meta = _dict(value, what)
    out: dict[str, Any] = {"version": _int(meta["version"], f"{what} version")}
    if "length" in meta:
        out["length"] = _int(meta["length"], f"{what} length")
    if "hashes" in meta:
        out["hashes"] = _hashes_to_asn1(meta["hashes"], f"{what} hashes")
    return _put_unrecognized(out, _split(meta, ("version", "length", "hashes"), what), what)


def _metafile_from_asn1(value: Mapping[str, Any], what: str) -> dict[str, Any]:
    out: dict[str, Any] = {"version": value["version"]}
    if "length" in value:
        out["length"] = value["length"]
    if "hashes" in value:
        out["hashes"] = _hashes_from_asn1(value["hashes"], f"{what} hashes")
    return out | _get_unrecognized(value, what)


# Role payloads

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


def _target_to_asn1(path: str, value: object) -> dict[str, Any]:
    what = f"target {path!r}"
    target = _dict(value, what)
    out: dict[str, Any] = {
        "path": path,
        "length": _int(target["length"], f"{what} length"),
        "hashes": _hashes_to_asn1(target["hashes"], f"{what} hashes"),
    }
    if "custom" in target:
        out["custom"] = _json_to_asn1(target["custom"], f"{what} custom")
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
            return encode(SIGNED_TYPE, _signed_to_asn1(signed_obj))
        except (CodecError, ValueError, TypeError, KeyError, AttributeError) as e:
            raise _wrap_serialization(e) from e


class DERMetadataSerializer(MetadataSerializer):
    """A whole metadata file as DER ``Metadata`` (signed + signatures over its DER)."""

    def serialize(self, metadata_obj: Metadata[Any]) -> bytes:
        try:
            value = {
                "signed": _signed_to_asn1(metadata_obj.signed),
                "signatures": _signatures_to_asn1(metadata_obj),
            }
            return encode(METADATA_TYPE, value)
        except (CodecError, ValueError, TypeError, KeyError, AttributeError) as e:
            raise _wrap_serialization(e) from e


class DERMetadataDeserializer(MetadataDeserializer):
    """Parse DER ``Metadata``; python-tuf validates the content.

    Refuses input over ``max_size`` before parsing, trailing bytes, ASN.1
    constraint violations, and any encoding other than the canonical one
    (so a signature check over ``der_signed_bytes(md.signed)`` checks the very
    bytes received). Every failure is a ``DERDeserializationError``.
    """

    def __init__(self, max_size: int = DEFAULT_MAX_METADATA) -> None:
        self.max_size = max_size

    def deserialize(self, raw_data: bytes) -> Metadata[Any]:
        try:
            value = decode(METADATA_TYPE, raw_data, self.max_size)
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
            canonical = DERMetadataSerializer().serialize(md)
        except DERSerializationError as e:
            raise DERDeserializationError(f"metadata cannot be re-encoded: {e}") from e
        if canonical != bytes(raw_data):
            raise DERDeserializationError("metadata is not in canonical DER form")
        return md


def der_signed_bytes(signed: Signed) -> bytes:
    """The DER bytes signatures over ``signed`` cover (DESIGN 3).

    Verify a DER envelope with
    ``delegator.verify_delegate(role, der_signed_bytes(md.signed), md.signatures)``.
    """
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

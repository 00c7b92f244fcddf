"""Field converters between TUF metadata dicts and their ASN.1 values (DESIGN 3).

Each ``_x_to_asn1``/``_x_from_asn1`` pair maps one field type both ways and raises
``CodecError`` naming the field for anything the DER form cannot hold.
"""

from __future__ import annotations

import calendar
import functools
import itertools
import re
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, Final, NoReturn, cast

from uptane.errors import CodecError

# Nesting limit for arbitrary JSON (custom and unrecognized fields).
MAX_JSON_DEPTH: Final = 32
_EXPIRES_FORMAT: Final = "%Y-%m-%dT%H:%M:%SZ"
_KEYID_RE: Final = re.compile(r"^[0-9a-f]{64}\Z")
_HEX_RE: Final = re.compile(r"[0-9a-f]+")


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
    if type(value) is not dict and not isinstance(value, Mapping):
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
    if len(text) % 2 or not _HEX_RE.fullmatch(text):
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
        if type(key) is not str:
            _str(key, f"{what} key")
    return {k: v for k, v in d.items() if k not in known}


# JSON values (custom and unrecognized fields) <-> JsonValue / JsonObject


def _json_to_asn1(value: object, what: str, depth: int = 0) -> tuple[str, Any]:
    # exact-type fast paths first (values from JSON); subclasses take the checks below
    if depth > MAX_JSON_DEPTH:
        _fail(what, f"JSON nested deeper than {MAX_JSON_DEPTH}")
    kind = type(value)
    if kind is str:
        return ("string", value)
    if kind is int:
        return ("integer", value)
    if kind is dict:
        return ("object", _object_to_asn1(cast(dict[str, Any], value), what, depth + 1))
    if kind is list:
        return ("array", [_json_to_asn1(v, what, depth + 1) for v in cast(list[Any], value)])
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
    for key in _dict(obj, what):
        if type(key) is not str:
            _str(key, f"{what} key")
    inner = depth + 1
    members = []
    for key in sorted(obj):
        value = obj[key]
        kind = type(value)  # strings and integers inline: most members are (issue 16)
        if kind is str and inner <= MAX_JSON_DEPTH:
            members.append({"key": key, "value": ("string", value)})
        elif kind is int and inner <= MAX_JSON_DEPTH:
            members.append({"key": key, "value": ("integer", value)})
        else:
            members.append({"key": key, "value": _json_to_asn1(value, what, inner)})
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
    return _expires_seconds(_str(value, "expires"))


@functools.lru_cache(maxsize=64)
def _expires_seconds(text: str) -> int:
    """Seconds since the epoch of an ``expires`` text; kept (issue 12: a batch shares one)."""
    try:
        when = datetime.strptime(text, _EXPIRES_FORMAT)
    except ValueError as e:
        raise CodecError(f"expires: {e}") from e
    return calendar.timegm(when.timetuple())


def _expires_from_asn1(value: int) -> str:
    return datetime.fromtimestamp(value, UTC).strftime(_EXPIRES_FORMAT)


def _hashes_to_asn1(value: object, what: str) -> list[dict[str, Any]]:
    hashes = _dict(value, what)
    for alg in hashes:
        if type(alg) is not str:
            _str(alg, f"{what} algorithm")
    return [{"function": alg, "digest": _hex(hashes[alg], what)} for alg in sorted(hashes)]


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

"""Canonical JSON bytes, as securesystemslib makes them, through the C JSON encoder (issue 12).

What TUF signatures cover is ``securesystemslib.formats.encode_canonical``
of the ``signed`` dict, UTF-8 encoded (python-tuf's
``CanonicalJSONSerializer``). Its pure-Python encoder was about a sixth of
the CPU of signing a vehicle's Director metadata. For the plain values
metadata is made of (dicts with string keys, lists, strings, integers,
booleans, null) and strings with nothing to escape, the standard library's
C encoder with sorted keys and no whitespace writes the very same bytes:
both sort members by key, write integers, ``true``, ``false`` and ``null``
alike, and escape only in strings (securesystemslib ``"`` and ``\\``; the
stdlib also control characters). So its output is used when it holds no
backslash (then no string needed escaping by either) and every value is of
those exact types (no float, which securesystemslib refuses and the stdlib
writes; no subclass, whose text may differ); anything else goes to
securesystemslib itself, which gives the same bytes or refuses as before.
"""

from __future__ import annotations

import json
from typing import Any

from securesystemslib.formats import encode_canonical
from tuf.api.metadata import Signed
from tuf.api.serialization import SerializationError, SignedSerializer

_FAST = json.JSONEncoder(ensure_ascii=False, sort_keys=True, separators=(",", ":"), allow_nan=False)
_SCALARS = (str, int, bool, type(None))


def _plain(value: Any) -> bool:
    """Whether ``value`` holds only dicts with str keys, lists, tuples, str, int, bool, None."""
    kind = type(value)
    if kind in _SCALARS:
        return True
    if kind is dict:
        for key, member in value.items():
            if type(key) is not str:
                return False
            if type(member) not in _SCALARS and not _plain(member):
                return False
        return True
    if kind is list or kind is tuple:
        return all(type(v) in _SCALARS or _plain(v) for v in value)
    return False


def canonical_json(value: Any) -> bytes:
    """``encode_canonical(value).encode("utf-8")``: the bytes TUF signatures cover.

    Raises what securesystemslib raises (``FormatError``) for a value it
    cannot encode.
    """
    try:
        if _plain(value):
            fast = _FAST.encode(value).encode("utf-8")
            if b"\\" not in fast:
                return fast
    except (ValueError, TypeError, RecursionError, UnicodeError):
        pass  # securesystemslib decides
    text = encode_canonical(value)
    assert text is not None  # no output function: the text is returned
    return text.encode("utf-8")


class CanonicalJSONSerializer(SignedSerializer):
    """python-tuf's ``CanonicalJSONSerializer``, the same bytes, through ``canonical_json``.

    For ``Metadata.sign(..., signed_serializer=...)``: the bytes signed are
    what any TUF client's verification serialises (``tests/test_canonical_json.py``).
    """

    def serialize(self, signed_obj: Signed) -> bytes:
        try:
            return canonical_json(signed_obj.to_dict())
        except Exception as e:
            raise SerializationError from e

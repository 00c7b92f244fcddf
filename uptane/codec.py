"""DER codec for everything in ``uptane/asn1/uptane.asn`` (DESIGN 4).

Decoding is size-capped before any parsing, rejects trailing bytes and checks
every ASN.1 constraint; every failure is a ``CodecError``. The compiled
specification is built on first use and cached per process (no work at
import).
"""

from __future__ import annotations

import functools
from importlib import resources
from typing import Any, Final

import asn1tools

from uptane.errors import CodecError

SPEC_FILE: Final = "uptane.asn"
MESSAGE_TYPE: Final = "SecondaryMessage"
# No single message on the bus may be larger (a chunk of 1 MiB + headers).
DEFAULT_MAX_MESSAGE: Final = 1_100_000


@functools.cache
def spec() -> Any:
    """The compiled ASN.1 module (DER), compiled once per process."""
    text = resources.files("uptane.asn1").joinpath(SPEC_FILE).read_text(encoding="utf-8")
    return asn1tools.compile_string(text, "der")


def encode(type_name: str, value: Any) -> bytes:
    """DER-encode ``value`` as ``type_name``; bad values raise ``CodecError``."""
    try:
        return bytes(spec().encode(type_name, value, check_constraints=True))
    except (asn1tools.Error, ValueError, TypeError, KeyError, AttributeError) as e:
        raise CodecError(f"cannot encode {type_name}: {e}") from e


def decode(type_name: str, data: bytes, max_size: int = DEFAULT_MAX_MESSAGE) -> Any:
    """Decode exactly one DER value of ``type_name`` from ``data``.

    Refuses data over ``max_size`` before parsing, trailing bytes, and values
    that break a constraint of the module.
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
        return compiled.decode(type_name, data, check_constraints=True)
    except CodecError:
        raise
    except (asn1tools.Error, ValueError, TypeError, KeyError, IndexError, AttributeError) as e:
        raise CodecError(f"{type_name}: malformed DER: {e}") from e
    except RecursionError as e:
        raise CodecError(f"{type_name}: nesting too deep") from e


def encode_message(kind: str, value: Any) -> bytes:
    """Encode one primary/secondary message (an alternative of SecondaryMessage)."""
    return encode(MESSAGE_TYPE, (kind, value))


def decode_message(data: bytes, max_size: int = DEFAULT_MAX_MESSAGE) -> tuple[str, Any]:
    """Decode one primary/secondary message into ``(kind, value)``."""
    kind, value = decode(MESSAGE_TYPE, data, max_size)
    return str(kind), value


def expect_message(data: bytes, kind: str, max_size: int = DEFAULT_MAX_MESSAGE) -> Any:
    """Decode a message and require it to be of ``kind``."""
    got, value = decode_message(data, max_size)
    if got != kind:
        raise CodecError(f"expected a {kind} message, got {got}")
    return value

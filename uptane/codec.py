"""DER codec for everything in ``uptane/asn1/uptane.asn`` (DESIGN 3 and 4).

Decoding is size-capped before any parsing, rejects trailing bytes and checks
every ASN.1 constraint; every failure is a ``CodecError``. The compiled
specification is built on first use and cached per process (no work at
import). The DER form of TUF metadata is in ``uptane.der_metadata``.
"""

from __future__ import annotations

import contextlib
import functools
import types
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from importlib import resources
from typing import Any, Final

import asn1tools
from asn1tools.codecs import ber as ber_codec
from asn1tools.codecs import der as der_codec

from uptane.errors import CodecError

SPEC_FILE: Final = "uptane.asn"
MESSAGE_TYPE: Final = "SecondaryMessage"
# No single message on the bus may be larger (a chunk of 1 MiB + headers).
DEFAULT_MAX_MESSAGE: Final = 1_100_000

Buffer = bytes | bytearray | memoryview

#: Most bytes (DER and keys) one ``shared_member_encodings`` block keeps (then it adds none).
MAX_SHARED_BYTES: Final = 8 * 1024 * 1024


class _Shared:
    """What one ``shared_member_encodings`` block holds."""

    __slots__ = ("built", "inside", "members", "size")

    def __init__(self) -> None:
        self.members: dict[tuple[int, str], bytes] = {}
        self.built: dict[Any, EncodedMember] = {}
        self.size = 0
        self.inside = False  # encoding a member: the members within it are not looked up


def built_members() -> tuple[dict[Any, EncodedMember], Callable[[int], bool]] | None:
    """In a ``shared_member_encodings`` block: its store of ``EncodedMember`` values.

    Returns the store (keys are the caller's) and ``room(size)``, which
    counts ``size`` bytes against the block's ``MAX_SHARED_BYTES`` and says
    whether one more entry may be kept. ``None`` outside a block.
    """
    shared = _SHARED.get()
    if shared is None:
        return None

    def room(size: int, shared: _Shared = shared) -> bool:
        if shared.size + size > MAX_SHARED_BYTES:
            return False
        shared.size += size
        return True

    return shared.built, room


_SHARED: ContextVar[_Shared | None] = ContextVar(
    "uptane_codec_shared_member_encodings", default=None
)


@functools.cache
def spec() -> Any:
    """The compiled ASN.1 module (DER), compiled once per process."""
    text = resources.files("uptane.asn1").joinpath(SPEC_FILE).read_text(encoding="utf-8")
    compiled = asn1tools.compile_string(text, "der")
    for compiled_type in compiled.types.values():
        _check_array_tags(compiled_type.type, set())
        _share_json_members(compiled_type.type, set())
    return compiled


@contextlib.contextmanager
def shared_member_encodings() -> Iterator[None]:
    """Within this block, a JSON member equal to one encoded before reuses its DER.

    The ``custom`` of every target in a targets file repeats most members
    (hardware ids, limits, capabilities): 200 targets encode their members
    in about half the time (``bench/full_verification.py``; issue 16). DER is
    a function of the value, so the bytes are the same as asn1tools' own: the
    reused bytes are what asn1tools produced for an equal member in this
    block. Values are compared by ``repr`` (injective on the plain types the
    ``uptane.der_values`` builders make). Only the outermost members are
    looked up (not the members inside one being encoded), so the ``repr``
    work and what is kept stay proportional to the DER made. Scoped to the
    block and the thread or task (a ``ContextVar``); keeps at most
    ``MAX_SHARED_BYTES``.
    """
    token = _SHARED.set(_Shared())
    try:
        yield
    finally:
        _SHARED.reset(token)


def _share_json_members(node: Any, seen: set[int]) -> None:
    """Make the ``JsonMember`` encoders of this compiled module honour ``shared_member_encodings``."""
    if node is None or id(node) in seen:
        return
    seen.add(id(node))
    names = [m.name for m in getattr(node, "root_members", None) or ()]
    if (
        isinstance(node, ber_codec.Sequence)
        and names == ["key", "value"]
        and not isinstance(node.encode, _SharedEncoder)
    ):  # once per node
        node.encode = _SharedEncoder(node.encode, id(node))
    for attr in ("root_members", "additions", "members"):
        for child in getattr(node, attr, None) or ():
            _share_json_members(child, seen)
    for attr in ("element_type", "inner"):
        _share_json_members(getattr(node, attr, None), seen)


class EncodedMember(dict[str, Any]):
    """A ``JsonMember`` value with the DER asn1tools made of it (``der``).

    Every ``JsonMember`` encoder of the compiled module writes ``der`` for
    it instead of encoding it again: whoever builds one sets ``der`` to
    ``encode("JsonMember", value)`` of this very value (``uptane.der_targets``).
    As a ``dict`` it is the value itself to everything else (comparisons,
    asn1tools' type and constraint checks).
    """

    __slots__ = ("der",)
    der: bytes


class _SharedEncoder:
    """A ``JsonMember`` encoder that reuses the DER of an equal member in the block."""

    def __init__(self, encode: Callable[..., None], node: int) -> None:
        self.encode = encode
        self.node = node

    def __call__(self, data: Any, encoded: bytearray, values: Any = None) -> None:
        if type(data) is EncodedMember:
            encoded.extend(data.der)
            return
        shared = _SHARED.get()
        if shared is None or shared.inside:
            self.encode(data, encoded)
            return
        key = (self.node, repr(data))
        der = shared.members.get(key)
        if der is not None:
            encoded.extend(der)
            return
        start = len(encoded)
        shared.inside = True
        try:
            self.encode(data, encoded)  # asn1tools' encoders only append
        finally:
            shared.inside = False
        size = len(encoded) - start + len(key[1])
        if shared.size + size <= MAX_SHARED_BYTES:
            shared.members[key] = bytes(encoded[start:])
            shared.size += size


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


def encode(
    type_name: str, value: Any, *, check_types: bool = True, check_constraints: bool = True
) -> bytes:
    """DER-encode ``value`` as ``type_name``; bad values raise ``CodecError``.

    ``check_types=False`` skips asn1tools' separate pass over the value's
    Python types (a fifth of the cost): only for values built by code that
    already checked them (``uptane.der_values``). ``check_constraints=False``
    skips asn1tools' pass over the module's constraints (a third of the cost;
    the encoding of a value does not depend on them): only to compare the
    result with DER that its receiver decodes with constraints checked
    (``decode``), never to make DER to send (``uptane.verification.der``).
    """
    try:
        return bytes(
            spec().encode(
                type_name, value, check_types=check_types, check_constraints=check_constraints
            )
        )
    except (asn1tools.Error, ValueError, TypeError, KeyError, AttributeError) as e:
        raise CodecError(f"cannot encode {type_name}: {e}") from e


def decode(
    type_name: str,
    data: Buffer,
    max_size: int = DEFAULT_MAX_MESSAGE,
    *,
    canonical: bool = True,
) -> Any:
    """Decode exactly one DER value of ``type_name`` from ``data``.

    Refuses data over ``max_size`` before parsing, trailing bytes, values
    that break a constraint of the module, and any encoding of the value other
    than its DER one. ``canonical=False`` skips that last check (one encode of
    the whole value): only for a caller that itself compares ``data`` with an
    encoding it makes anyway (``uptane.der_metadata`` re-encodes what python-tuf
    parsed; ``uptane.verification.der`` encodes the verified JSON).
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
        # The decoder checked the constraints and made the types: no second check (issue 12).
        if canonical:
            again = compiled.encode(type_name, value, check_types=False, check_constraints=False)
            if bytes(again) != data:
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

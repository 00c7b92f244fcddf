"""The DER of Director targets one target at a time (DESIGN 3; issue 16).

``targets_signed_der`` is ``DERSignedSerializer().serialize`` for a
``Targets``, with each target's DER ``TufTargetFile`` reusable: the primary
keeps the pieces of the last Director targets it checked
(``uptane.verification.der.DerCache``), so a new version in which a few
targets changed encodes only those.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Final

from asn1tools.codecs import ber as ber_codec
from tuf.api.metadata import Targets

from uptane.codec import EncodedMember, built_members, encode, shared_member_encodings, spec
from uptane.der_metadata import (
    SIGNED_TYPE,
    _target_to_asn1,
    _targets_to_asn1,
    _tlv,
    _wrap_serialization,
)
from uptane.der_values import _dict, _fail, _json_to_asn1, _object_to_asn1, _str
from uptane.errors import CodecError

TARGET_TYPE: Final = "TufTargetFile"
MEMBER_TYPE: Final = "JsonMember"
#: Per target path: its ASN.1 value and its DER ``TufTargetFile`` (``targets_signed_der``).
TargetPieces = dict[str, tuple[dict[str, Any], bytes]]


def targets_signed_der(
    signed: Targets,
    pieces: Mapping[str, tuple[dict[str, Any], bytes]] | None = None,
    *,
    check_constraints: bool = True,
) -> tuple[bytes, TargetPieces]:
    """``DERSignedSerializer().serialize(signed)`` for targets, one target at a time (issue 16).

    Every target's ASN.1 value is built (and checked) as ever; one equal to
    the value ``pieces`` holds for its path reuses that DER ``TufTargetFile``,
    any other is encoded by asn1tools (constraints checked unless
    ``check_constraints=False``: see ``uptane.codec.encode``). The rest of
    ``signed`` is encoded with no targets and the targets' ``SEQUENCE OF``
    content put in: DER of a ``SEQUENCE``/``SEQUENCE OF`` is its tag, its
    definite length and its elements' DER one after the other, so the result
    is byte for byte the whole encoding (tests compare them). Values are
    compared with ``==``: they name each JSON value's kind (a boolean is never
    equal to an integer there). The targets' JSON members that repeat
    (``custom`` hardware ids, limits) are encoded once
    (``uptane.codec.shared_member_encodings``). Returns the DER and this
    file's pieces.
    """
    try:
        d = signed.to_dict()
        if d.get("_type") != Targets.type:
            _fail("signed", f"expected targets, got {d.get('_type')!r}")
        json_targets = _dict(d["targets"], "targets")
        d["targets"] = {}
        checks = {"check_types": False, "check_constraints": check_constraints}
        head = encode(SIGNED_TYPE, (Targets.type, _targets_to_asn1(d)), **checks)
        custom = _custom_members(check_constraints)
        held = pieces or {}
        out: TargetPieces = {}
        paths = sorted(json_targets, key=lambda p: _str(p, "target path"))
        values = [_target_to_asn1(path, json_targets[path], custom) for path in paths]
        with shared_member_encodings():  # other JSON members that repeat (unrecognized)
            for path, target in zip(paths, values, strict=True):
                old = held.get(path)
                if old is not None and old[0] == target:
                    der = old[1]
                else:
                    der = encode(TARGET_TYPE, target, **checks)
                out[path] = (target, der)
        return _put_targets(head, b"".join(der for _, der in out.values())), out
    except (CodecError, ValueError, TypeError, KeyError, AttributeError) as e:
        raise _wrap_serialization(e) from e


def _custom_members(check_constraints: bool) -> Callable[[object, str], tuple[str, Any]]:
    """Targets' ``custom`` to ASN.1, each distinct member built and encoded once (issue 16).

    A Director targets repeats most ``custom`` members in every target
    (hardware ids, limits, capabilities, often the release counter); only
    ``ecu_serial`` differs. A member is looked up by its key and the ``repr``
    of its JSON value (injective on the plain JSON types python-tuf parses
    and the Director builds: ``1``, ``True`` and ``"1"`` stay apart); a new
    one is built and checked exactly as in a whole ``custom``
    (``der_values._object_to_asn1``) and encoded by asn1tools as a
    ``JsonMember``; an equal one reuses that ``EncodedMember`` (its value
    and its DER). asn1tools' constraint pass (``check_constraints``) still
    sees every member: an ``EncodedMember`` is the member's value. Scoped to
    one ``targets_signed_der`` call, or to the ``shared_member_encodings``
    block it is called in (several targets files), within that block's byte
    cap.
    """
    block = built_members()
    memo: dict[tuple[str, str], EncodedMember] = {} if block is None else block[0]
    room = (lambda size: True) if block is None else block[1]

    def to_asn1(value: object, what: str) -> tuple[str, Any]:
        if type(value) is not dict:
            return _json_to_asn1(value, what)
        for key in value:
            if type(key) is not str:
                _str(key, f"{what} key")
        members: list[EncodedMember] = []
        for key in sorted(value):
            item = value[key]
            lookup = (key, repr(item))
            member = memo.get(lookup)
            if member is None:
                (built,) = _object_to_asn1({key: item}, what, 1)  # as in _json_to_asn1(value)
                member = EncodedMember(built)
                member.der = encode(
                    MEMBER_TYPE, built, check_types=False, check_constraints=check_constraints
                )
                if room(len(member.der) + len(lookup[1])):
                    memo[lookup] = member
            members.append(member)
        return ("object", members)

    return to_asn1


def _put_targets(head: bytes, content: bytes) -> bytes:
    """``head`` (a DER ``TufSigned`` targets with no targets) with ``content`` as its targets.

    The tags are asn1tools' own (the compiled ``TufSigned``), the lengths
    asn1tools' definite form; the empty targets element must be where
    asn1tools put it.
    """
    choice = spec().types[SIGNED_TYPE].type.name_to_member[Targets.type]
    tag = bytes(choice.tag)
    member_tag = bytes(next(m.tag for m in choice.root_members if m.name == "targets"))
    if len(tag) != 1 or len(member_tag) != 1:
        raise CodecError("TufSigned tags are not one octet")
    start, end = _tlv(head, 0, tag[0])
    offset = start
    while offset < end:
        element_start, element_end = _tlv(head, offset, head[offset])
        if head[offset] == member_tag[0]:
            if element_start != element_end:
                raise CodecError("the targets element is not empty")
            members = head[start:offset] + _header(member_tag, content) + head[element_end:end]
            return _header(tag, members)
        offset = element_end
    raise CodecError("no targets element")


def _header(tag: bytes, content: bytes) -> bytes:
    return tag + bytes(ber_codec.encode_length_definite(len(content))) + content

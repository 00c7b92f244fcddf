"""``uptane.canonical_json``: the bytes securesystemslib's canonical JSON gives (issue 12)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from securesystemslib.exceptions import FormatError
from securesystemslib.formats import encode_canonical
from securesystemslib.signer import CryptoSigner
from tuf.api.metadata import Metadata, Snapshot, TargetFile, Targets
from tuf.api.serialization.json import CanonicalJSONSerializer as TufCanonical

from uptane import canonical_json as cj


def reference(value: Any) -> bytes:
    text = encode_canonical(value)
    assert text is not None
    return text.encode("utf-8")


_TEXT = st.text(
    st.characters(codec="utf-8") | st.sampled_from(['"', "\\", "\n", "\x00", "\x7f", "\u2028"]),
    max_size=12,
)
_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | _TEXT,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.tuples(inner, inner)
        | st.dictionaries(_TEXT, inner, max_size=4)
    ),
    max_leaves=20,
)


@settings(max_examples=400, deadline=None)
@given(_JSON)
def test_same_bytes_as_securesystemslib(value: Any) -> None:
    assert cj.canonical_json(value) == reference(value)


@pytest.mark.parametrize(
    "value",
    [
        {"a": 'say "hi"'},  # quotes: the stdlib escapes them as securesystemslib does
        {"a": "back\\slash"},
        {"a": "line\nbreak"},  # securesystemslib writes control characters raw
        {"a": "\x00\x1f"},
        {"é": ["ü", "\u2028", "𝄞"]},  # non-ASCII raw in both
        {"b": True, "a": False, "c": None, "d": -(2**70)},
        ("x", 1),
    ],
)
def test_escapes_and_edge_values(value: Any) -> None:
    assert cj.canonical_json(value) == reference(value)


def test_escaping_goes_to_securesystemslib(monkeypatch: pytest.MonkeyPatch) -> None:
    """A string with a control character: the stdlib's output (``\\n``) is not used."""
    calls: list[Any] = []

    def spy(value: Any) -> str | None:
        calls.append(value)
        return encode_canonical(value)

    monkeypatch.setattr(cj, "encode_canonical", spy)
    assert cj.canonical_json({"a": "x\ny"}) == b'{"a":"x\ny"}'
    assert calls == [{"a": "x\ny"}]
    calls.clear()
    assert cj.canonical_json({"a": "plain"}) == b'{"a":"plain"}'
    assert calls == []  # the fast path


class _Int(int):
    def __str__(self) -> str:
        return "seven"


@pytest.mark.parametrize(
    "value",
    [{"a": 1.5}, [float("nan")], {"a": {1: "x"}}, {"a": b"bytes"}, {"a": {1, 2}}],
)
def test_refused_as_securesystemslib_refuses(value: Any) -> None:
    """A float (the stdlib would write it), a non-str key, other types: refused alike."""
    with pytest.raises(Exception) as expected:
        reference(value)
    with pytest.raises(expected.type):
        cj.canonical_json(value)
    if not isinstance(value, dict) or not isinstance(value.get("a"), dict):
        assert expected.type is FormatError


def test_int_subclass_as_securesystemslib() -> None:
    assert cj.canonical_json({"a": _Int(7)}) == reference({"a": _Int(7)}) == b'{"a":seven}'


def test_serializer_matches_tuf_and_verifies() -> None:
    expires = datetime(2030, 1, 1, tzinfo=UTC)
    targets = Targets(
        version=3,
        expires=expires,
        targets={
            "a.wasm": TargetFile(
                length=5,
                hashes={"sha256": "ab" * 32},
                path="a.wasm",
                unrecognized_fields={"custom": {"ecu_serial": 'E"1', "n": [1, None, True]}},
            )
        },
    )
    for signed in (targets, Snapshot(version=2, expires=expires)):
        assert cj.CanonicalJSONSerializer().serialize(signed) == TufCanonical().serialize(signed)
    signer = CryptoSigner.generate_ed25519()
    md = Metadata(targets)
    md.sign(signer, signed_serializer=cj.CanonicalJSONSerializer())
    # a client verifies over tuf's own canonical bytes
    signer.public_key.verify_signature(md.signatures[signer.public_key.keyid], md.signed_bytes)

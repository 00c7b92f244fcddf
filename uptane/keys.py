"""Keys and signers from securesystemslib URIs (DESIGN 3, "Keys").

A key on disk is a pair of files: ``NAME.pub.json`` (the public key as a TUF
key dict, which carries its keyid) and, for keys we hold, ``NAME.pem`` (PKCS#8
PEM, loaded through the ``file2:`` signer URI). Any other securesystemslib
signer URI (``hsm:``, ``awskms:``, ...) works wherever a URI is accepted, so
moving a key into a token or KMS is a configuration change.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from securesystemslib.signer import CryptoSigner, Key, Signer, SSlibKey

from uptane.errors import KeyLoadError


@dataclass(frozen=True)
class KeyRef:
    """A public key plus the URI of its private part."""

    public: Key
    uri: str

    @property
    def keyid(self) -> str:
        return self.public.keyid

    def signer(self) -> Signer:
        return load_signer(self.uri, self.public)

    def to_dict(self) -> dict[str, object]:
        return {"uri": self.uri, "public": self.public.to_dict() | {"keyid": self.keyid}}

    @classmethod
    def from_dict(cls, data: object) -> KeyRef:
        if not isinstance(data, dict) or "uri" not in data or "public" not in data:
            raise KeyLoadError("key entry must be an object with 'uri' and 'public'")
        return cls(public=public_key_from_dict(data["public"]), uri=str(data["uri"]))


def public_key_from_dict(data: object) -> Key:
    """Parse a TUF key dict (with a ``keyid`` member) into a ``Key``."""
    if not isinstance(data, dict):
        raise KeyLoadError("public key must be a JSON object")
    data = dict(data)
    keyid = data.pop("keyid", None)
    try:
        if keyid is None:
            # Compute the keyid the way TUF does for a key dict without one.
            tmp = SSlibKey.from_dict("0" * 64, dict(data))
            return SSlibKey.from_crypto(tmp._crypto_key(), scheme=tmp.scheme)
        return Key.from_dict(str(keyid), data)
    except (KeyError, ValueError, TypeError) as e:
        raise KeyLoadError(f"invalid public key: {e}") from e


def load_public_key(path: str | os.PathLike[str]) -> Key:
    """Read a ``NAME.pub.json`` file."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise KeyLoadError(f"cannot read public key {path}: {e}") from e
    return public_key_from_dict(data)


def load_signer(uri: str, public_key: Key) -> Signer:
    """Load a signer for ``public_key`` from a securesystemslib private key URI."""
    try:
        return Signer.from_priv_key_uri(uri, public_key)
    except Exception as e:  # securesystemslib raises many unrelated types here
        raise KeyLoadError(f"cannot load signer {uri!r}: {e}") from e


def public_key_dict(key: Key) -> dict[str, object]:
    """A key as JSON with its keyid, the ``NAME.pub.json`` format."""
    return key.to_dict() | {"keyid": key.keyid}


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def generate_ed25519(directory: str | os.PathLike[str], name: str) -> KeyRef:
    """Generate an ed25519 key into ``directory/name.pem`` + ``name.pub.json``.

    Refuses to overwrite an existing key. The private key file is mode 0600.
    """
    check_key_free(directory, name)
    return write_key(directory, name, CryptoSigner.generate_ed25519())


def check_key_free(directory: str | os.PathLike[str], name: str) -> None:
    """Raise ``KeyLoadError`` if ``name`` is not a usable, unused key name."""
    if not name or "/" in name or "\\" in name or name.startswith("."):
        raise KeyLoadError(f"bad key name {name!r}")
    d = Path(directory)
    if (d / f"{name}.pem").exists() or (d / f"{name}.pub.json").exists():
        raise KeyLoadError(f"key {name!r} already exists in {d}; refusing to overwrite")


def write_key(directory: str | os.PathLike[str], name: str, signer: CryptoSigner) -> KeyRef:
    """Write ``signer`` (a key generated in memory) as ``name.pem`` + ``name.pub.json``.

    Lets a caller generate keys, sign with them, and store them only once the
    whole edit succeeded. Refuses to overwrite an existing key.
    """
    check_key_free(directory, name)
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    pem = d / f"{name}.pem"
    pub = d / f"{name}.pub.json"
    _write_private(pem, signer.private_bytes)
    pub.write_text(json.dumps(public_key_dict(signer.public_key), indent=2), encoding="utf-8")
    return keyref_for(directory, name, signer.public_key)


def keyref_for(directory: str | os.PathLike[str], name: str, public: Key) -> KeyRef:
    """The ``KeyRef`` of a key stored (or to be stored) as ``directory/name.pem``."""
    return KeyRef(public=public, uri=f"file2:{(Path(directory) / f'{name}.pem').resolve()}")


def load_keyref(directory: str | os.PathLike[str], name: str) -> KeyRef:
    """Load a key written by ``generate_ed25519``."""
    d = Path(directory)
    public = load_public_key(d / f"{name}.pub.json")
    return KeyRef(public=public, uri=f"file2:{(d / f'{name}.pem').resolve()}")


def keyref_from_public_file(path: str | os.PathLike[str]) -> KeyRef:
    """Load ``NAME.pub.json``; its private part, if held, is ``NAME.pem`` beside it."""
    pub = Path(path)
    public = load_public_key(pub)
    name = pub.name.removesuffix(".json").removesuffix(".pub")
    return keyref_for(pub.parent, name, public)

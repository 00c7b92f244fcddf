"""Delta targets: custom metadata of a signed binary delta between two images (docs/deltas.md).

A delta target is an ordinary Image repository target (signed, hashed,
length-capped like any other) whose ``custom.delta`` names the image it
applies to (``base``) and the image it produces (``result``), each by name,
length and hashes. The Director never names deltas: it assigns the result
image as usual, and a primary may carry that image to an ECU as a delta when
the ECU's reported image is the delta's base (Uptane 2.1, 5.3.3 and 5.4.4.2:
the ECU still checks the result against the Director's target).

This module only parses, builds and matches that metadata (sans-IO); the
diff format itself is detools' (``image_repo.delta``, ``ecus.secondary.delta``).
"""

from __future__ import annotations

import hmac
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from tuf.api.metadata import TargetFile

from uptane.errors import MetadataError
from uptane.manifest import InstalledImage
from uptane.metadata import check_target_path

#: Key of the delta description in a target's custom metadata.
DELTA: Final = "delta"
#: The one delta format: a detools sequential patch, heatshrink-compressed.
DELTA_FORMAT: Final = "detools-sequential-heatshrink"
#: Hash function whose digest names a delta after its base.
NAME_HASH: Final = "sha256"
_NAME_DIGITS: Final = 16


@dataclass(frozen=True)
class ImageRef:
    """One image named by a delta: target name, length and hashes (hex)."""

    name: str
    length: int
    hashes: Mapping[str, str]

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "length": self.length, "hashes": dict(self.hashes)}

    @classmethod
    def from_dict(cls, data: object, what: str) -> ImageRef:
        if not isinstance(data, Mapping):
            raise MetadataError(f"delta {what} must be an object")
        name = check_target_path(data.get("name"))
        length = data.get("length")
        if isinstance(length, bool) or not isinstance(length, int) or length < 0:
            raise MetadataError(f"delta {what} length must be a non-negative integer")
        hashes = data.get("hashes")
        if not isinstance(hashes, Mapping) or not hashes:
            raise MetadataError(f"delta {what} hashes must be a non-empty object")
        checked: dict[str, str] = {}
        for alg, digest in hashes.items():
            if not isinstance(alg, str) or not isinstance(digest, str):
                raise MetadataError(f"delta {what} hashes must map names to hex digests")
            try:
                bytes.fromhex(digest)
            except ValueError:
                raise MetadataError(f"delta {what} {alg} digest is not hex") from None
            checked[alg] = digest.lower()
        return cls(name=name, length=length, hashes=checked)

    def same_as(self, name: str, length: int, hashes: Mapping[str, str]) -> bool:
        """Same name and length, at least one common hash, and every common hash equal."""
        common = set(self.hashes) & set(hashes)
        return (
            self.name == name
            and self.length == length
            and bool(common)
            and all(hmac.compare_digest(self.hashes[a], hashes[a].lower()) for a in common)
        )

    def equals(self, name: str, length: int, hashes: Mapping[str, str]) -> bool:
        """Same name, length and exactly the same hashes (what the ECU checks)."""
        other = {a: d.lower() for a, d in hashes.items()}
        return self.same_as(name, length, hashes) and set(other) == set(self.hashes)


@dataclass(frozen=True)
class DeltaInfo:
    """The ``custom.delta`` of a delta target."""

    base: ImageRef
    result: ImageRef
    format: str = DELTA_FORMAT

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": self.format,
            "base": self.base.to_dict(),
            "result": self.result.to_dict(),
        }

    @classmethod
    def from_dict(cls, data: object) -> DeltaInfo:
        if not isinstance(data, Mapping):
            raise MetadataError("custom.delta must be an object")
        fmt = data.get("format")
        if fmt != DELTA_FORMAT:
            raise MetadataError(f"unknown delta format {fmt!r}; known: {DELTA_FORMAT}")
        return cls(
            base=ImageRef.from_dict(data.get("base"), "base"),
            result=ImageRef.from_dict(data.get("result"), "result"),
            format=fmt,
        )

    @classmethod
    def from_target_file(cls, target: TargetFile) -> DeltaInfo | None:
        """The delta a target describes, None for a plain image; raises on a malformed one."""
        custom = target.custom
        if not isinstance(custom, Mapping) or DELTA not in custom:
            return None
        info = cls.from_dict(custom[DELTA])
        if target.path != delta_name(info.result.name, info.base.hashes.get(NAME_HASH, "")):
            raise MetadataError(f"delta target {target.path!r} is not named after its base")
        return info


def delta_name(result_name: str, base_sha256: str) -> str:
    """Target name of the delta from the image whose sha256 is ``base_sha256`` to ``result_name``."""
    if len(base_sha256) < _NAME_DIGITS:
        raise MetadataError(f"a delta base needs a {NAME_HASH} hash")
    return check_target_path(f"{result_name}.delta-{base_sha256[:_NAME_DIGITS].lower()}")


@dataclass(frozen=True)
class DeltaOffer:
    """``imageOffer.delta`` (DER, ``DeltaOffer``): format, base image and patch length."""

    format: str
    base: InstalledImage
    length: int

    def to_asn1(self) -> dict[str, Any]:
        info = self.base.to_asn1()
        return {
            "format": self.format,
            "baseFilename": info["filename"],
            "baseLength": info["length"],
            "baseHashes": info["hashes"],
            "length": self.length,
        }

    @classmethod
    def from_asn1(cls, value: Mapping[str, Any]) -> DeltaOffer:
        base = InstalledImage.from_asn1(
            {
                "filename": value["baseFilename"],
                "length": value["baseLength"],
                "hashes": value["baseHashes"],
                "releaseCounter": 0,
            }
        )
        return cls(format=str(value["format"]), base=base, length=int(value["length"]))

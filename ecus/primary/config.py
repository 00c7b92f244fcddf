"""Primary ECU configuration (DESIGN 2-3): identity, keys, repositories, limits.

A primary is configured by one JSON file; relative paths in it are relative
to that file:

```json
{
  "vin": "VIN123", "ecu_serial": "primary-1", "hardware_id": "gw-a",
  "key": {"uri": "file2:keys/primary.pem", "public": "keys/primary.pub.json"},
  "repository_map": "map.json",
  "director_root": "director-root.json", "image_root": "image-root.json",
  "state_dir": "state", "download_dir": "images",
  "secondaries": [{"serial": "ecu-1", "hardware_id": "hw-a", "public_key": "keys/ecu-1.pub.json"}],
  "download": {"min_bytes_per_second": 4096, "grace_seconds": 5, "socket_timeout": 10},
  "metadata_limits": {"timestamp": 16384, "snapshot": 2000000, "targets": 5000000},
  "tls": {"ca": "tls/ca.pem", "cert": "tls/VIN.pem", "key": "tls/VIN-key.pem"}
}
```

``repository_map`` is a TAP 4 map (``uptane.verification.matching``) given
as a file name or inline. A public key (``key.public``, a secondary's
``public_key``) is a ``NAME.pub.json`` file, as ``uptane ecu keygen`` writes,
or an inline TUF key dict; a relative ``file2:`` URI is relative to the file.
Every field: docs/config.md.
"""

from __future__ import annotations

import json
import ssl
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from securesystemslib.signer import Key
from tuf.api.metadata import Metadata, Root
from tuf.api.serialization import DeserializationError

from uptane.errors import ConfigError, KeyLoadError, MetadataError
from uptane.keys import KeyRef, load_public_key, public_key_from_dict
from uptane.metadata import check_identifier
from uptane.verification.matching import RepositoryMap


@dataclass(frozen=True)
class EcuEntry:
    """A secondary the primary serves: serial, hardware id, registered key."""

    serial: str
    hardware_id: str
    public_key: Key

    def __post_init__(self) -> None:
        try:
            check_identifier(self.serial, "ECU serial")
            check_identifier(self.hardware_id, "hardware id")
        except MetadataError as e:
            raise ConfigError(str(e)) from e

    @classmethod
    def from_dict(cls, raw: Any, base_dir: Path | None = None) -> EcuEntry:
        if not isinstance(raw, dict) or set(raw) != {"serial", "hardware_id", "public_key"}:
            raise ConfigError("a secondary needs exactly 'serial', 'hardware_id', 'public_key'")
        try:
            key = _public_key(raw["public_key"], base_dir)
        except KeyLoadError as e:
            raise ConfigError(f"secondary {raw.get('serial')!r}: {e}") from e
        return cls(serial=raw["serial"], hardware_id=raw["hardware_id"], public_key=key)


@dataclass(frozen=True)
class DownloadPolicy:
    """Limits on every download (4.3.1 slow retrieval, 4.3.2 endless data).

    A download whose average rate stays below ``min_bytes_per_second`` after
    ``grace_seconds`` fails with ``SlowRetrievalError``; so does one that
    receives nothing for ``socket_timeout`` seconds. No image above
    ``max_image_bytes`` is fetched whatever its metadata says.
    """

    min_bytes_per_second: float = 4096.0
    grace_seconds: float = 5.0
    socket_timeout: float = 10.0
    max_image_bytes: int = 64 * 1024 * 1024
    chunk_size: int = 65536

    def __post_init__(self) -> None:
        if self.min_bytes_per_second < 0 or self.grace_seconds < 0:
            raise ConfigError("download rate and grace period must not be negative")
        if self.socket_timeout <= 0 or self.max_image_bytes <= 0 or self.chunk_size <= 0:
            raise ConfigError("socket_timeout, max_image_bytes and chunk_size must be positive")


@dataclass(frozen=True)
class MetadataLimits:
    """Maximum sizes of metadata files (4.3.2 endless data) and root rotations."""

    root: int = 512_000
    timestamp: int = 16_384
    snapshot: int = 2_000_000
    targets: int = 5_000_000
    der: int = 1_048_576
    max_root_rotations: int = 32

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConfigError(f"metadata_limits.{f.name} must be a positive integer")


@dataclass(frozen=True)
class TlsFiles:
    """Mutual TLS to the Director: the Director CA and this vehicle's client certificate."""

    ca: Path
    cert: Path | None = None
    key: Path | None = None

    @classmethod
    def from_dict(cls, raw: Any, base_dir: Path) -> TlsFiles:
        if not isinstance(raw, Mapping) or not isinstance(raw.get("ca"), str):
            raise ConfigError("'tls' must be an object with 'ca' (and 'cert', 'key')")
        unknown = set(raw) - {"ca", "cert", "key"}
        if unknown:
            raise ConfigError(f"unknown 'tls' keys: {sorted(unknown)}")
        if ("cert" in raw) != ("key" in raw):
            raise ConfigError("'tls' needs both 'cert' and 'key', or neither")
        paths = {}
        for name in ("ca", "cert", "key"):
            if name in raw:
                if not isinstance(raw[name], str) or not raw[name]:
                    raise ConfigError(f"'tls.{name}' must be a path")
                paths[name] = (base_dir / raw[name]).resolve()
        return cls(**paths)

    def context(self) -> ssl.SSLContext:
        """A client context trusting only ``ca`` and presenting the client certificate."""
        try:
            ctx = ssl.create_default_context(cafile=str(self.ca))
            if self.cert is not None:
                ctx.load_cert_chain(self.cert, self.key)
        except (OSError, ssl.SSLError) as e:
            raise ConfigError(f"tls: cannot load {self.ca}, {self.cert}, {self.key}: {e}") from e
        return ctx


def _public_key(raw: Any, base_dir: Path | None) -> Key:
    """A public key from a ``NAME.pub.json`` path (relative to ``base_dir``) or a key dict."""
    if isinstance(raw, str):
        return load_public_key((base_dir or Path()) / raw)
    return public_key_from_dict(raw)


def _key_ref(raw: Any, base_dir: Path) -> KeyRef:
    """``{"uri": ..., "public": ...}``: a relative ``file2:`` URI is relative to ``base_dir``."""
    if (
        not isinstance(raw, dict)
        or set(raw) != {"uri", "public"}
        or not isinstance(raw["uri"], str)
    ):
        raise KeyLoadError("'key' needs exactly 'uri' (a signer URI) and 'public'")
    uri: str = raw["uri"]
    if uri.startswith("file2:") and not Path(uri[len("file2:") :]).is_absolute():
        uri = f"file2:{(base_dir / uri[len('file2:') :]).resolve()}"
    return KeyRef(public=_public_key(raw["public"], base_dir), uri=uri)


def _check_root(data: bytes, what: str) -> bytes:
    try:
        md = Metadata[Root].from_bytes(data)
    except DeserializationError as e:
        raise ConfigError(f"{what} is not TUF root metadata: {e}") from e
    if not isinstance(md.signed, Root):
        raise ConfigError(f"{what} is not root metadata")
    return data


@dataclass(frozen=True)
class PrimaryConfig:
    """Everything a primary needs to run update cycles (DESIGN 2)."""

    vin: str
    ecu_serial: str
    hardware_id: str
    key: KeyRef
    repository_map: RepositoryMap
    director_root: bytes
    image_root: bytes
    state_dir: Path
    download_dir: Path | None = None
    secondaries: tuple[EcuEntry, ...] = ()
    download: DownloadPolicy = field(default_factory=DownloadPolicy)
    metadata_limits: MetadataLimits = field(default_factory=MetadataLimits)
    http_timeout: float = 30.0
    tls: TlsFiles | None = None  # mutual TLS to the Director (None: as the URLs say)

    def __post_init__(self) -> None:
        try:
            check_identifier(self.vin, "vin")
            check_identifier(self.ecu_serial, "primary ECU serial")
            check_identifier(self.hardware_id, "primary hardware id")
        except MetadataError as e:
            raise ConfigError(str(e)) from e
        _check_root(self.director_root, "director_root")
        _check_root(self.image_root, "image_root")
        serials = [self.ecu_serial, *(s.serial for s in self.secondaries)]
        if len(set(serials)) != len(serials):
            raise ConfigError("ECU serials in the primary config must be unique")

    @property
    def images_dir(self) -> Path:
        return self.download_dir if self.download_dir is not None else self.state_dir / "images"

    @property
    def ecu_hardware_ids(self) -> dict[str, str]:
        """Every ECU of the vehicle (the primary included): serial -> hardware id."""
        return {self.ecu_serial: self.hardware_id} | {
            s.serial: s.hardware_id for s in self.secondaries
        }

    @property
    def ecu_keys(self) -> dict[str, Key]:
        return {self.ecu_serial: self.key.public} | {
            s.serial: s.public_key for s in self.secondaries
        }

    @classmethod
    def load(cls, path: str | Path) -> PrimaryConfig:
        """Read a primary config file (see the module docstring)."""
        p = Path(path)
        try:
            raw = json.loads(p.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise ConfigError(f"cannot read primary config {p}: {e}") from e
        return cls.from_dict(raw, base_dir=p.parent)

    @classmethod
    def from_dict(cls, raw: Any, *, base_dir: Path) -> PrimaryConfig:
        if not isinstance(raw, dict):
            raise ConfigError("primary config must be a JSON object")
        known = {f.name for f in fields(cls)}
        unknown = set(raw) - known
        if unknown:
            raise ConfigError(f"unknown primary config keys: {sorted(unknown)}")

        def path_of(name: str) -> Path:
            value = raw.get(name)
            if not isinstance(value, str) or not value:
                raise ConfigError(f"'{name}' must be a path")
            return (base_dir / value).resolve()

        def read(name: str) -> bytes:
            try:
                return path_of(name).read_bytes()
            except OSError as e:
                raise ConfigError(f"cannot read {name}: {e}") from e

        map_raw = raw.get("repository_map")
        repo_map = (
            RepositoryMap.from_dict(map_raw)
            if isinstance(map_raw, dict)
            else RepositoryMap.from_bytes(read("repository_map"))
        )
        try:
            key = _key_ref(raw.get("key"), base_dir)
        except KeyLoadError as e:
            raise ConfigError(f"primary key: {e}") from e
        secondaries_raw = raw.get("secondaries", [])
        if not isinstance(secondaries_raw, list):
            raise ConfigError("'secondaries' must be a list")
        return cls(
            vin=raw.get("vin"),  # type: ignore[arg-type]  # validated in __post_init__
            ecu_serial=raw.get("ecu_serial"),  # type: ignore[arg-type]
            hardware_id=raw.get("hardware_id"),  # type: ignore[arg-type]
            key=key,
            repository_map=repo_map,
            director_root=read("director_root"),
            image_root=read("image_root"),
            state_dir=path_of("state_dir"),
            download_dir=path_of("download_dir") if "download_dir" in raw else None,
            secondaries=tuple(EcuEntry.from_dict(s, base_dir) for s in secondaries_raw),
            download=_sub(DownloadPolicy, raw.get("download", {}), "download"),
            metadata_limits=_sub(MetadataLimits, raw.get("metadata_limits", {}), "metadata_limits"),
            http_timeout=float(raw.get("http_timeout", 30.0)),
            tls=TlsFiles.from_dict(raw["tls"], base_dir) if raw.get("tls") is not None else None,
        )


def _sub(cls: Any, raw: Any, name: str) -> Any:
    if not isinstance(raw, Mapping):
        raise ConfigError(f"'{name}' must be an object")
    known = {f.name for f in fields(cls)}
    unknown = set(raw) - known
    if unknown:
        raise ConfigError(f"unknown '{name}' keys: {sorted(unknown)}")
    try:
        return cls(**dict(raw))
    except TypeError as e:
        raise ConfigError(f"invalid '{name}': {e}") from e

"""Director configuration: a director directory with ``director.json`` (DESIGN 6).

Layout written by ``uptane director init``::

    DIR/director.json     this config (mode 0600: it holds the operator token)
    DIR/keys/             NAME.pem + NAME.pub.json (root keys belong offline)
    DIR/root/N.root.json  the Director root chain, signed offline (+ N.root.der)
    DIR/image_root.json   trusted root of the Image repository (bootstrap)
    DIR/director.db       the SQLite inventory, unless ``db_url`` says otherwise

The app process only loads the online keys (targets, snapshot, timestamp);
``root_keys`` are read by the CLI's ``init`` and ``rotate`` alone.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from securesystemslib.signer import Signer

from uptane.errors import ConfigError, KeyLoadError
from uptane.keys import KeyRef

if TYPE_CHECKING:
    from director.server import ConnectionLimits

CONFIG_FILE = "director.json"
ONLINE_ROLES = ("targets", "snapshot", "timestamp")
DEFAULT_PORT = 8084
DEFAULT_MAX_BODY = 1_000_000
DEFAULT_REPORT_TIME_TOLERANCE = timedelta(days=1)
# limits on hostile clients (director.server, director.app.GuardMiddleware)
DEFAULT_BODY_TIMEOUT = 30.0
DEFAULT_BODY_BUDGET = 64_000_000
# per server process: answers of metadata GETs kept in memory (director.read_cache)
DEFAULT_READ_CACHE_BYTES = 64_000_000
TOKEN_ENV = "UPTANE_DIRECTOR_TOKEN"


@dataclass
class DirectorConfig:
    """Everything a Director process needs; loaded from ``DIR/director.json``.

    ``metadata_expiry`` is how long per-vehicle targets, snapshot and timestamp
    stay valid; they are re-signed when less than ``refresh_margin`` is left
    (or when assignments change), never per request.
    """

    directory: Path
    token: str
    db_url: str = ""
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    image_repo_url: str | None = None
    image_repo_root: str | None = "image_root.json"
    image_repo_cache: str | None = None
    online_keys: dict[str, list[KeyRef]] = field(default_factory=dict)
    root_keys: list[KeyRef] = field(default_factory=list)
    root_threshold: int = 1
    metadata_expiry: timedelta = timedelta(days=1)
    refresh_margin: timedelta = timedelta(hours=6)
    root_expiry: timedelta = timedelta(days=365)
    max_body: int = DEFAULT_MAX_BODY
    # how far an ECU report's time may be ahead of the Director's clock (5.4.2.1)
    report_time_tolerance: timedelta = DEFAULT_REPORT_TIME_TOLERANCE
    # hostile clients, per server process: seconds for a request's headers, for its
    # body, idle time between keep-alive requests; open connections; header bytes;
    # body bytes held by all requests in flight together
    header_timeout: float = 10.0
    body_timeout: float = DEFAULT_BODY_TIMEOUT
    keep_alive_timeout: float = 5.0
    max_connections: int = 1000
    # open connections from one peer address (an IPv6 peer: its /64) per server
    # process; 0: no limit (behind a proxy every connection has its address)
    max_connections_per_address: int = 0
    max_header_bytes: int = 65_536
    body_budget: int = DEFAULT_BODY_BUDGET
    # bytes of served metadata each server process keeps in memory (0: no cache)
    read_cache_bytes: int = DEFAULT_READ_CACHE_BYTES

    def __post_init__(self) -> None:
        self.directory = Path(self.directory)
        if not self.db_url:
            from director.db import default_sqlite_url  # SQLAlchemy: only when needed

            self.db_url = default_sqlite_url(self.directory)
        if self.refresh_margin >= self.metadata_expiry:
            raise ConfigError("refresh_margin must be shorter than metadata_expiry")
        if self.max_body < 1024:
            raise ConfigError("max_body must be at least 1024 bytes")
        if self.report_time_tolerance <= timedelta(0):
            raise ConfigError("report_time_tolerance must be positive")
        if min(self.header_timeout, self.body_timeout, self.keep_alive_timeout) <= 0:
            raise ConfigError("timeouts must be positive")
        if self.max_connections < 1 or self.max_header_bytes < 1024:
            raise ConfigError("max_connections >= 1 and max_header_bytes >= 1024 needed")
        if self.max_connections_per_address < 0:
            raise ConfigError("max_connections_per_address must be 0 (no limit) or more")
        if self.body_budget < self.max_body:
            raise ConfigError("body_budget must be at least max_body")
        if self.read_cache_bytes < 0:
            raise ConfigError("read_cache_bytes must be 0 (no cache) or more")

    def connection_limits(self) -> ConnectionLimits:
        """The per-connection limits of ``director.server.DirectorProtocol``."""
        from director.server import ConnectionLimits

        return ConnectionLimits(
            header_timeout=self.header_timeout,
            max_header_bytes=self.max_header_bytes,
            max_connections=self.max_connections,
            keep_alive_timeout=self.keep_alive_timeout,
            max_connections_per_address=self.max_connections_per_address,
        )

    @property
    def root_dir(self) -> Path:
        return self.directory / "root"

    @property
    def keys_dir(self) -> Path:
        return self.directory / "keys"

    def online_signers(self) -> list[Signer]:
        """Signers of the online roles (loaded from their signer URIs)."""
        signers: list[Signer] = []
        for role in ONLINE_ROLES:
            refs = self.online_keys.get(role, [])
            if not refs:
                raise ConfigError(f"no {role} key in {self.directory / CONFIG_FILE}")
            signers.extend(ref.signer() for ref in refs)
        return signers

    def root_signers(self) -> list[Signer]:
        """Offline root signers: only for ``init``/``rotate``."""
        return [ref.signer() for ref in self.root_keys]

    def image_repo_root_bytes(self) -> bytes | None:
        if self.image_repo_root is None:
            return None
        path = self.directory / self.image_repo_root
        try:
            return path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as e:
            raise ConfigError(f"cannot read Image repository root {path}: {e}") from e

    # --- file form ---------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return {
            "db_url": self.db_url,
            "token": self.token,
            "host": self.host,
            "port": self.port,
            "image_repo_url": self.image_repo_url,
            "image_repo_root": self.image_repo_root,
            "image_repo_cache": self.image_repo_cache,
            "online_keys": {
                role: [ref.to_dict() for ref in refs] for role, refs in self.online_keys.items()
            },
            "root_keys": [ref.to_dict() for ref in self.root_keys],
            "root_threshold": self.root_threshold,
            "metadata_expiry_seconds": int(self.metadata_expiry.total_seconds()),
            "refresh_margin_seconds": int(self.refresh_margin.total_seconds()),
            "root_expiry_seconds": int(self.root_expiry.total_seconds()),
            "max_body": self.max_body,
            "report_time_tolerance_seconds": int(self.report_time_tolerance.total_seconds()),
            "header_timeout": self.header_timeout,
            "body_timeout": self.body_timeout,
            "keep_alive_timeout": self.keep_alive_timeout,
            "max_connections": self.max_connections,
            "max_connections_per_address": self.max_connections_per_address,
            "max_header_bytes": self.max_header_bytes,
            "body_budget": self.body_budget,
            "read_cache_bytes": self.read_cache_bytes,
        }

    @classmethod
    def from_dict(cls, directory: Path, data: Any) -> DirectorConfig:
        if not isinstance(data, dict):
            raise ConfigError("director config must be a JSON object")
        try:
            return cls(
                directory=directory,
                token=os.environ.get(TOKEN_ENV) or str(data["token"]),
                db_url=str(data.get("db_url") or ""),
                host=str(data.get("host", "127.0.0.1")),
                port=int(data.get("port", DEFAULT_PORT)),
                image_repo_url=data.get("image_repo_url"),
                image_repo_root=data.get("image_repo_root"),
                image_repo_cache=data.get("image_repo_cache"),
                online_keys={
                    str(role): [KeyRef.from_dict(k) for k in refs]
                    for role, refs in dict(data.get("online_keys", {})).items()
                },
                root_keys=[KeyRef.from_dict(k) for k in data.get("root_keys", [])],
                root_threshold=int(data.get("root_threshold", 1)),
                metadata_expiry=timedelta(seconds=int(data.get("metadata_expiry_seconds", 86400))),
                refresh_margin=timedelta(seconds=int(data.get("refresh_margin_seconds", 21600))),
                root_expiry=timedelta(seconds=int(data.get("root_expiry_seconds", 365 * 86400))),
                max_body=int(data.get("max_body", DEFAULT_MAX_BODY)),
                report_time_tolerance=timedelta(
                    seconds=int(data.get("report_time_tolerance_seconds", 86400))
                ),
                header_timeout=float(data.get("header_timeout", 10.0)),
                body_timeout=float(data.get("body_timeout", DEFAULT_BODY_TIMEOUT)),
                keep_alive_timeout=float(data.get("keep_alive_timeout", 5.0)),
                max_connections=int(data.get("max_connections", 1000)),
                max_connections_per_address=int(data.get("max_connections_per_address", 0)),
                max_header_bytes=int(data.get("max_header_bytes", 65_536)),
                body_budget=int(data.get("body_budget", DEFAULT_BODY_BUDGET)),
                read_cache_bytes=int(data.get("read_cache_bytes", DEFAULT_READ_CACHE_BYTES)),
            )
        except (KeyError, TypeError, ValueError, KeyLoadError) as e:
            raise ConfigError(f"invalid director config: {e}") from e

    @classmethod
    def load(cls, directory: str | os.PathLike[str]) -> DirectorConfig:
        d = Path(directory)
        path = d / CONFIG_FILE
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"{path} not found: run `uptane director init {d}` first") from None
        except (OSError, ValueError) as e:
            raise ConfigError(f"cannot read {path}: {e}") from e
        return cls.from_dict(d, data)

    def save(self) -> None:
        """Write ``director.json`` (mode 0600) atomically."""
        from uptane.repository import atomic_write

        path = self.directory / CONFIG_FILE
        atomic_write(path, json.dumps(self.to_dict(), indent=2).encode("utf-8") + b"\n")
        os.chmod(path, 0o600)

"""A whole Uptane setup on loopback for primary tests (real servers, real keys).

``Env`` is one test's world: an Image repository (``image_repo.repo``) served
by ``image_repo.server``, a Director (``director.service`` + ``director.app``,
SQLite) with one registered vehicle (a primary and two secondaries), and a
``Primary`` wired to ``InMemorySecondary`` stand-ins. Both apps sit behind
session-wide ``Switchboard`` servers so a test can tamper with any response.

Malicious Director metadata is signed with the Director's own online keys
through ``SigningRepository`` on the Director's database store
(``craft_director``): what an attacker holding those keys could serve.
Likewise ``craft_image_role`` signs one Image repository role with its own
keys, past ``image_repo``'s checks: what a compromised supplier could publish.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import wasmtime
from securesystemslib.signer import CryptoSigner, Signer
from tuf.api.metadata import Metadata, Snapshot, TargetFile, Targets, Timestamp

from director.app import create_app as director_app
from director.config import DirectorConfig
from director.db import default_sqlite_url
from director.service import Director, EcuSpec
from director.setup import init_director
from ecus.primary import Primary
from ecus.primary.config import DownloadPolicy, EcuEntry, MetadataLimits, PrimaryConfig
from ecus.primary.links import InMemorySecondary
from ecus.sim.compromise import craft_director_targets
from image_repo.layout import CONFIG_FILE, RepoConfig
from image_repo.repo import ImageRepository
from image_repo.server import create_app as image_app
from uptane.keys import KeyRef, generate_ed25519
from uptane.metadata import ECU_SERIAL, shall_match
from uptane.repository import Clock, DirectoryStore, ExpiryPolicy, SigningRepository, utc_now
from uptane.verification.matching import RepositoryMap

from .servers import Switchboard

VIN = "VIN-TEST-0001"
PRIMARY = "primary-1"
PRIMARY_HW = "gateway"
SECONDARIES = {"ecu-a": "hw-a", "ecu-b": "hw-b"}
TOKEN = "test-operator-token"
DIRECTOR_EXPIRY = timedelta(days=10)
IMAGE_EXPIRY = ExpiryPolicy(timestamp=timedelta(days=1), snapshot=timedelta(days=7))


def wasm(n: int) -> bytes:
    """A small valid WASM module; different ``n``, different bytes."""
    return bytes(wasmtime.wat2wasm(f"(module (global i32 (i32.const {n})))"))


def tree_digest(path: Path) -> str:
    """One digest over every file, symlink and directory under ``path``."""
    h = hashlib.sha256()
    for dirpath, dirnames, filenames in os.walk(path):
        dirnames.sort()
        rel = os.path.relpath(dirpath, path)
        h.update(f"D {rel}\n".encode())
        for name in sorted(filenames):
            p = Path(dirpath, name)
            if p.is_symlink():
                h.update(f"L {rel}/{name} -> {os.readlink(p)}\n".encode())
            else:
                h.update(f"F {rel}/{name} {hashlib.sha256(p.read_bytes()).hexdigest()}\n".encode())
    return h.hexdigest()


def build_template(root: Path, image_url: str) -> Path:
    """Image repository + Director directory (keys, root, migrated DB), made once."""
    ImageRepository.init(root / "image", root_threshold=1, targets_threshold=1)
    init_director(
        root / "director",
        image_repo_url=image_url,
        image_repo_root=root / "image" / "metadata" / "1.root.json",
        token=TOKEN,
    )
    config = DirectorConfig.load(root / "director")
    Director.from_config(config).close()  # runs the migrations once
    return root


@dataclass
class Servers:
    image: Switchboard
    image_url: str
    director: Switchboard
    director_url: str


class Env:
    """One test's Image repository, Director, vehicle and primary factory."""

    def __init__(
        self,
        tmp: Path,
        template: Path,
        servers: Servers,
        clock: Clock = utc_now,
        secondaries: Mapping[str, str] = SECONDARIES,
    ) -> None:
        self.tmp = tmp
        self.hardware_ids = dict(secondaries)
        self.servers = servers
        self.clock = clock
        shutil.copytree(template / "image", tmp / "image")
        shutil.copytree(template / "director", tmp / "director")
        self.image_repo = ImageRepository(tmp / "image", clock=clock, expiry=IMAGE_EXPIRY)
        config = DirectorConfig.load(tmp / "director")
        config.db_url = default_sqlite_url(tmp / "director")
        config.image_repo_url = servers.image_url
        config.image_repo_cache = None
        config.metadata_expiry = DIRECTOR_EXPIRY
        self.director_config = config
        self.director = Director.from_config(config, clock=clock, migrate=False)
        servers.image.reset(image_app(tmp / "image"))
        servers.director.reset(director_app(self.director, TOKEN))

        self.primary_key: KeyRef = generate_ed25519(tmp / "keys", "primary")
        self.ecu_signers: dict[str, Signer] = {
            s: CryptoSigner.generate_ed25519() for s in self.hardware_ids
        }
        specs = [EcuSpec(PRIMARY, PRIMARY_HW, self.primary_key.public, primary=True)]
        specs += [
            EcuSpec(s, hw, self.ecu_signers[s].public_key) for s, hw in self.hardware_ids.items()
        ]
        self.director.register_vehicle(VIN, specs)
        self.secondaries = {
            s: InMemorySecondary(s, hw, self.ecu_signers[s], clock=clock)
            for s, hw in self.hardware_ids.items()
        }
        self._http = httpx.Client(trust_env=False)

    def close(self) -> None:
        self._http.close()
        self.director.close()

    # --- repositories ---------------------------------------------------------

    def add_image(
        self, name: str, n: int, hardware_ids: tuple[str, ...] = ("hw-a",), counter: int = 1
    ) -> tuple[TargetFile, bytes]:
        data = wasm(n)
        target = self.image_repo.add_target(
            data, name=name, hardware_ids=hardware_ids, release_counter=counter
        )
        return target, data

    def craft_image_role(
        self, role: str, mutate: Callable[[Targets], None], blobs: Mapping[str, bytes] | None = None
    ) -> None:
        """Sign Image repository role ``role`` with its own keys, bypassing ``image_repo``.

        A compromised supplier: ``mutate`` edits the role's targets freely and
        only the role's keys sign it; snapshot and timestamp are then re-signed
        by their (online) keys, as a repository publishing its suppliers'
        metadata would. ``blobs`` maps target names to image bytes to store.
        """
        config = RepoConfig.from_bytes((self.image_repo.path / CONFIG_FILE).read_bytes(), "image")
        repo = SigningRepository(
            store=DirectoryStore(self.image_repo.metadata_dir),
            expiry=IMAGE_EXPIRY,
            clock=self.clock,
        )
        repo.add_signers(
            ref.signer()
            for name in (role, Snapshot.type, Timestamp.type)
            for ref in config.roles[name]
        )
        with repo.edit_targets(role) as targets:
            mutate(targets)
        repo.publish()
        for name, data in (blobs or {}).items():
            target = repo.targets(role).targets[name]
            path = self.image_repo.blob_path(target)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)

    def assign(self, name: str, *serials: str) -> None:
        self.director.assign(name, ecu_serials=list(serials))

    def image_path(self, target: TargetFile) -> str:
        """URL path the primary downloads ``target`` from (hash-prefixed)."""
        dirname, sep, basename = target.path.rpartition("/")
        return f"/targets/{dirname}{sep}{target.hashes['sha256']}.{basename}"

    @staticmethod
    def director_path(filename: str) -> str:
        return f"/vehicles/{VIN}/metadata/{filename}"

    def director_file(self, filename: str) -> bytes:
        r = self._http.get(f"{self.servers.director_url}{self.director_path(filename)}")
        r.raise_for_status()
        return r.content

    def image_file(self, filename: str) -> bytes:
        r = self._http.get(f"{self.servers.image_url}/metadata/{filename}")
        r.raise_for_status()
        return r.content

    def director_version(self) -> int:
        """Current Director targets version of the vehicle."""
        return int(Metadata.from_bytes(self.director_file("timestamp.json")).signed.version)

    @staticmethod
    def director_target(
        image: TargetFile, serial: str, *, path: str | None = None, **custom: Any
    ) -> TargetFile:
        """A Director target for ``serial`` copied from an Image repository target."""
        fields = {k: v for k, v in shall_match(image.custom).items() if v is not None}
        fields.update(custom)
        fields[ECU_SERIAL] = serial
        return TargetFile(
            length=image.length,
            hashes=dict(image.hashes),
            path=path if path is not None else image.path,
            unrecognized_fields={"custom": fields},
        )

    def craft_director(self, mutate: Callable[[Targets], None]) -> int:
        """Sign new Director targets/snapshot/timestamp with the online keys; returns version."""
        return craft_director_targets(
            self.director,
            self.director_config.online_signers(),
            VIN,
            mutate,
            expiry=DIRECTOR_EXPIRY,
        )

    # --- the primary ------------------------------------------------------------

    def primary_config(self, **overrides: Any) -> PrimaryConfig:
        repo_map = RepositoryMap.from_dict(
            {
                "repositories": {
                    "director": [self.servers.director_url],
                    "image": [self.servers.image_url],
                },
                "mapping": [
                    {
                        "paths": ["*"],
                        "repositories": ["director", "image"],
                        "terminating": True,
                        "threshold": 2,
                    }
                ],
            }
        )
        values: dict[str, Any] = {
            "vin": VIN,
            "ecu_serial": PRIMARY,
            "hardware_id": PRIMARY_HW,
            "key": self.primary_key,
            "repository_map": repo_map,
            "director_root": (self.tmp / "director" / "root" / "1.root.json").read_bytes(),
            "image_root": self.image_repo.root_bytes(1),
            "state_dir": self.tmp / "primary-state",
            "download_dir": self.tmp / "primary-images",
            "secondaries": tuple(
                EcuEntry(s, hw, self.ecu_signers[s].public_key)
                for s, hw in self.hardware_ids.items()
            ),
            "download": DownloadPolicy(socket_timeout=5.0),
            "metadata_limits": MetadataLimits(),
        }
        values.update(overrides)
        return PrimaryConfig(**values)

    def primary(
        self,
        clock: Clock | None = None,
        secondaries: Mapping[str, InMemorySecondary] | None = None,
        **overrides: Any,
    ) -> Primary:
        clients = self.secondaries if secondaries is None else secondaries
        return Primary(
            self.primary_config(**overrides),
            clients.values(),
            clock=clock or self.clock,
        )


def shifted(delta: timedelta) -> Clock:
    """A clock ``delta`` away from real time (freeze attacks move clocks, DESIGN 7)."""
    return lambda: utc_now() + delta


def at(moment: datetime) -> Clock:
    return lambda: moment

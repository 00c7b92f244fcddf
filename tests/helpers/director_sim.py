"""A tiny Director simulator: signs root/targets in JSON and DER on demand (DESIGN 3, 9).

No database and no HTTP: a ``SigningRepository`` over a ``MemoryStore`` holds
the JSON forms, ``uptane.der_metadata.to_der_metadata`` re-signs each version over
DER with the same keys, which is what the Director serves to vehicles as
``N.root.der`` / ``N.targets.der``. Time is the simulator's ``now`` (tests move
it, never the wall clock). Secondary and CAN tests use it to feed partial
verification, and to play an attacker holding some key (``publish_targets``
with other ``signers``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

from securesystemslib.signer import CryptoSigner, Signer
from tuf.api.metadata import Metadata, Root, TargetFile, Targets

from ecus.primary.links import EcuUpdate
from uptane import der_metadata
from uptane.metadata import Limits, UptaneTarget, build_custom, set_vehicle_id
from uptane.repository import ExpiryPolicy, MemoryStore, SigningRepository

T0 = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)
VIN = "VIN-SIM-0001"
ROLES = (Root.type, Targets.type, "snapshot", "timestamp")


def target_file(
    name: str,
    data: bytes,
    *,
    ecu_serial: str,
    hardware_ids: Sequence[str],
    release_counter: int = 1,
    capabilities: Iterable[str] = (),
    limits: Limits | None = None,
    hash_algorithms: Sequence[str] = ("sha256", "sha512"),
) -> TargetFile:
    """A Director target for one ECU, hashed from ``data``."""
    tf = TargetFile.from_data(name, data, list(hash_algorithms))
    tf.unrecognized_fields["custom"] = build_custom(
        hardware_ids=hardware_ids,
        release_counter=release_counter,
        capabilities=capabilities,
        limits=limits,
        ecu_serial=ecu_serial,
    )
    return tf


class DirectorSim:
    """One vehicle's Director repository, signed on demand (root v1, targets v1 empty)."""

    def __init__(
        self,
        *,
        vin: str | None = VIN,
        now: datetime = T0,
        root_expiry: timedelta = timedelta(days=365),
        targets_expiry: timedelta = timedelta(days=1),
    ) -> None:
        self.vin = vin
        self.now = now
        self.store = MemoryStore()
        self.pool: dict[str, Signer] = {}
        self.repo = SigningRepository(
            store=self.store,
            expiry=ExpiryPolicy(root=root_expiry, targets=targets_expiry),
            clock=lambda: self.now,
        )
        self.root_ders: dict[int, bytes] = {}
        self.targets_ders: dict[int, bytes] = {}
        with self.repo.edit_root() as root:
            for role in ROLES:
                root.add_key(self._new_key().public_key, role)
        self._sign_root_der(previous=None)
        self.publish_targets([])

    # --- keys ---------------------------------------------------------------

    def _new_key(self) -> CryptoSigner:
        signer = CryptoSigner.generate_ed25519()
        self.pool[signer.public_key.keyid] = signer
        self.repo.add_signers([signer])
        return signer

    def role_signers(self, role: str, root: Root | None = None) -> list[Signer]:
        """The signers of the pool that ``root`` (default: the current) lists for ``role``."""
        root = root or self.repo.root()
        return [self.pool[k] for k in root.roles[role].keyids if k in self.pool]

    # --- root -----------------------------------------------------------------

    @property
    def root_version(self) -> int:
        return int(self.repo.root().version)

    def root_json(self, version: int) -> Metadata[Root]:
        data = self.store.read(f"{version}.root.json")
        assert data is not None, f"no root v{version}"
        return Metadata[Root].from_bytes(data)

    def _sign_root_der(self, previous: Root | None) -> bytes:
        md = self.root_json(self.root_version)
        keyids = set(md.signed.roles[Root.type].keyids)
        if previous is not None:
            keyids |= set(previous.roles[Root.type].keyids)
        der = der_metadata.to_der_metadata(
            md, [self.pool[k] for k in sorted(keyids) if k in self.pool]
        )
        self.root_ders[md.signed.version] = der
        return der

    def rotate_root(self, *, root_key: bool = True, targets_key: bool = False) -> bytes:
        """Publish root N+1 (new root and/or targets key), signed by old and new root keys."""
        previous = self.repo.root()
        with self.repo.edit_root() as root:
            if root_key:
                for keyid in list(root.roles[Root.type].keyids):
                    root.revoke_key(keyid, Root.type)
                root.add_key(self._new_key().public_key, Root.type)
            if targets_key:
                for keyid in list(root.roles[Targets.type].keyids):
                    root.revoke_key(keyid, Targets.type)
                root.add_key(self._new_key().public_key, Targets.type)
        return self._sign_root_der(previous)

    def root_chain(self, after: int = 1) -> tuple[bytes, ...]:
        """DER roots after version ``after``, oldest first (what the primary forwards)."""
        return tuple(self.root_ders[v] for v in sorted(self.root_ders) if v > after)

    # --- targets ----------------------------------------------------------------

    @property
    def targets_version(self) -> int:
        return int(self.repo.targets().version)

    def publish_targets(
        self,
        entries: Iterable[TargetFile],
        *,
        mutate: Callable[[Targets], None] | None = None,
        signers: Iterable[Signer] | None = None,
    ) -> bytes:
        """Sign targets N+1 listing ``entries``; return its DER.

        ``signers`` replaces the targets keys for the DER signature (an
        attacker's key); ``mutate`` edits ``signed`` before signing.
        """
        with self.repo.edit_targets() as targets:
            targets.targets = {e.path: e for e in entries}
            if self.vin is not None:
                set_vehicle_id(targets, self.vin)
            if mutate is not None:
                mutate(targets)
        md = self.repo.open(Targets.type)
        der = der_metadata.to_der_metadata(
            md, list(signers) if signers is not None else self.role_signers(Targets.type)
        )
        self.targets_ders[md.signed.version] = der
        return der

    def targets_json(self) -> Metadata[Targets]:
        md: Metadata[Targets] = self.repo.open(Targets.type)
        return md

    def update_for(self, target: TargetFile, image_path: Path, *, after_root: int = 1) -> EcuUpdate:
        """The ``EcuUpdate`` a primary would send for ``target`` with the latest metadata."""
        ut = UptaneTarget.from_target_file(target, director=True)
        assert ut.ecu_serial is not None
        versions = tuple(v for v in sorted(self.root_ders) if v > after_root)
        return EcuUpdate(
            ecu_serial=ut.ecu_serial,
            hardware_id=ut.hardware_ids[0],
            target=ut,
            image_path=image_path,
            director_root_chain=tuple(self.root_ders[v] for v in versions),
            director_root_versions=versions,
            director_targets=self.targets_ders[self.targets_version],
            director_targets_version=self.targets_version,
        )


def wasm_from_wat(path: Path, pad_to: int | None = None) -> bytes:
    """Compile a WAT file; ``pad_to`` appends a custom section to reach that size."""
    import wasmtime

    data = bytes(wasmtime.wat2wasm(path.read_text(encoding="utf-8")))
    if pad_to is not None and pad_to > len(data):
        data += custom_section(pad_to - len(data))
    return data


def custom_section(total: int, name: bytes = b"pad") -> bytes:
    """A WASM custom section of exactly ``total`` bytes (ignored by engines)."""

    def leb(n: int) -> bytes:
        out = bytearray()
        while True:
            byte, n = n & 0x7F, n >> 7
            out.append(byte | (0x80 if n else 0))
            if not n:
                return bytes(out)

    head = leb(len(name)) + name
    for size_len in range(1, 6):
        body = total - 1 - size_len
        if body >= len(head) and len(leb(body)) == size_len:
            return b"\x00" + leb(body) + head + b"\x00" * (body - len(head))
    raise ValueError(f"cannot make a custom section of {total} bytes")

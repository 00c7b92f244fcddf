"""Full verification of both repositories and image downloads for the primary (Uptane 2.1, 5.4.4.2).

``RepositorySync`` is the half of ``Primary`` that talks TUF: one ngclient
``Updater`` per repository into a scratch copy of the trusted state, the
sans-IO re-check of both repositories, the Director-only checks, Director/Image
agreement, release counters, the DER Director metadata, then downloads of every
image an ECU needs. ``Primary`` (``ecus.primary.cycle``) owns the rest.
"""

from __future__ import annotations

import contextlib
import functools
import shutil
from collections.abc import Callable, Mapping
from datetime import datetime
from pathlib import Path
from typing import Final, TypeVar
from urllib.parse import quote

from tuf.api import exceptions as tuf_exc
from tuf.api.metadata import Metadata, Root, Snapshot, TargetFile, Targets
from tuf.ngclient import Updater, UpdaterConfig

from ecus.primary.cache import VerificationCache
from ecus.primary.config import PrimaryConfig
from ecus.primary.deltas import delta_candidates, select_delta
from ecus.primary.download import download_image
from ecus.primary.fetch import PolicyFetcher
from ecus.primary.links import EcuUpdate
from ecus.primary.result import (
    STAGE_COMMIT,
    STAGE_DER,
    STAGE_DIRECTOR,
    STAGE_DOWNLOAD,
    STAGE_IMAGE,
    STAGE_MATCH,
    Stages,
)
from ecus.primary.stale import (
    check_floor,
    check_stored,
    put_back,
    set_aside,
    snapshot_floor,
    stored_files,
)
from ecus.primary.state import PrimaryState
from uptane.errors import (
    EndlessDataError,
    UptaneError,
)
from uptane.manifest import (
    EcuVersionReport,
    InstalledImage,
)
from uptane.metadata import UptaneTarget
from uptane.verification.der import DirectorDer, verify_director_der
from uptane.verification.director_checks import (
    check_director_targets,
    check_release_counter,
)
from uptane.verification.full import (
    VerifiedRepository,
    check_expiry,
    classify_hash_error,
    classify_version_error,
    verify_root_chain,
    verify_trusted,
)
from uptane.verification.matching import match_director_targets

T = TypeVar("T")

#: What a failed cycle keeps of the metadata ngclient verified (``_keep_verified``).
KEEP_ON_FAILURE: Final[Mapping[str, tuple[str, ...]]] = {
    "director": ("root_history", "root.json", "timestamp.json", "snapshot.json"),
    "image": ("root_history", "root.json", "timestamp.json", "snapshot.json", "targets.json"),
}
#: The same before the Director's targets passed the Uptane checks: its roots only.
#: One set of Director keys signs every vehicle's metadata, and only targets name
#: the vehicle, so another vehicle's newer timestamp/snapshot verify too: kept, they
#: would make this vehicle's own metadata look like a rollback for good.
KEEP_ON_FAILURE_UNCHECKED: Final[Mapping[str, tuple[str, ...]]] = {
    "director": ("root_history", "root.json"),
    "image": KEEP_ON_FAILURE["image"],
}


class RepositorySync:
    """Full verification and downloads; mixed into ``Primary`` (which sets the attributes)."""

    config: PrimaryConfig
    state: PrimaryState
    fetcher: PolicyFetcher

    @functools.cached_property
    def verification_cache(self) -> VerificationCache:
        """Per-primary in-memory cache (never trusted across a process restart)."""
        return VerificationCache()

    def director_metadata_url(self, base: str) -> str:
        """The vehicle's Director metadata URL on Director ``base`` (one TAP 4 URL)."""
        return f"{base}/vehicles/{quote(self.config.vin, safe='')}/metadata/"

    # --- verification (5.4.4.2) -----------------------------------------------

    def _updater(
        self,
        metadata_dir: Path,
        metadata_url: str,
        target_url: str | None,
        bootstrap: bytes,
        now: datetime,
    ) -> Updater:
        limits = self.config.metadata_limits
        config = UpdaterConfig(
            max_root_rotations=limits.max_root_rotations,
            root_max_length=limits.root,
            timestamp_max_length=limits.timestamp,
            snapshot_max_length=limits.snapshot,
            targets_max_length=limits.targets,
        )
        updater = Updater(
            str(metadata_dir),
            metadata_url,
            target_base_url=target_url,
            fetcher=self.fetcher,
            config=config,
            bootstrap=bootstrap,
        )
        # ngclient checks expiry against TrustedMetadataSet.reference_time, which
        # it sets to datetime.now() when the Updater is built. That is a private
        # attribute (tuf 7: Updater._trusted_set.reference_time); setting it here,
        # before any metadata is loaded, makes ngclient's freeze checks use the
        # primary's clock. The sans-IO re-check in uptane.verification.full does
        # not depend on it.
        updater._trusted_set.reference_time = now
        return updater

    def _tuf(self, fn: Callable[[], T]) -> T:
        """Run an ngclient step, naming its errors as the attacks they are."""
        try:
            return fn()
        except (tuf_exc.BadVersionNumberError, tuf_exc.LengthOrHashMismatchError) as e:
            last = self.fetcher.last_metadata
            filename, data = last if last else (None, None)
            named: Exception = (
                classify_version_error(e, filename, data)
                if isinstance(e, tuf_exc.BadVersionNumberError)
                else classify_hash_error(e, filename, data)
            )
            if named is e:
                raise
            raise named from e
        except tuf_exc.DownloadLengthMismatchError as e:
            raise EndlessDataError(f"more data than allowed: {e}") from e

    def _refresh(
        self,
        urls: tuple[str, ...],
        make: Callable[[str], Updater],
        unchanged: Callable[[Updater], bool] = lambda _: False,
    ) -> tuple[Updater, str]:
        """Refresh from the first mirror that can be reached (TAP 4 URL list).

        Only a failure to connect moves on to the next URL; anything a server
        answered (bad metadata, HTTP errors, slow or endless data) stops here.
        ngclient's ``refresh()`` step by step (tuf 7: ``_load_root``,
        ``_load_timestamp``, ``_load_snapshot``, ``_load_targets``, private):
        when ``unchanged(updater)`` says the timestamp ngclient now trusts is
        the one the last committed cycle verified, snapshot and targets are
        unchanged too and are not loaded again (Uptane 5.4.4.2 / TUF 5.4).
        """
        error: tuf_exc.DownloadError | None = None
        for url in urls:
            updater = make(url)
            try:
                self._tuf(updater._load_root)
                self._tuf(updater._load_timestamp)
                if not unchanged(updater):
                    self._tuf(updater._load_snapshot)
                    self._tuf(functools.partial(updater._load_targets, Targets.type, Root.type))
                return updater, url
            except tuf_exc.DownloadError as e:
                if isinstance(e, tuf_exc.DownloadHTTPError | tuf_exc.SlowRetrievalError):
                    raise
                error = e
        assert error is not None
        raise error

    def _unchanged(self, name: str, updater: Updater, names: frozenset[str] = frozenset()) -> bool:
        """Is what ngclient trusts after the timestamp what the last committed cycle verified?

        Same root and same timestamp (so the same snapshot, hence the same
        targets and delegated roles) and, for the Image repository, no target
        name that was not looked up then.
        """
        known = self.verification_cache.known.get(name)
        if known is None or not names <= known[1]:
            return False
        trusted = updater._trusted_set
        return trusted.root == known[0].root and trusted.timestamp == known[0].timestamp

    def _trusted_repository(
        self, name: str, metadata_dir: Path, updater: Updater, bootstrap: bytes, now: datetime
    ) -> VerifiedRepository:
        """The Uptane re-check of what ngclient trusted, on its parsed objects (5.4.4.2).

        Reads nothing ngclient just wrote but root history past the bootstrap
        root (after a rotation), and verifies a root chain once per process.
        """
        cache = self.verification_cache
        known = cache.known.get(name)
        trusted = updater._trusted_set
        if Snapshot.type not in trusted:
            # stopped after the timestamp (``_unchanged``): reuse what was verified
            assert known is not None
            check_expiry(known[0], now)
            return known[0]
        # Updater._trusted_set (private, see _updater): what ngclient verified
        first = self._bootstrap_version(bootstrap)
        if trusted.root.version == first:
            # no rotation: ngclient's root is the bootstrap root, verified (signed by
            # itself) when the Updater was built from it; nothing to verify again
            return verify_trusted(name, trusted, (trusted.root,), now)
        chain = (
            bootstrap,
            *(
                (metadata_dir / "root_history" / f"{v}.root.json").read_bytes()
                for v in range(first + 1, trusted.root.version + 1)
            ),
        )
        roots = cache.root_chains.get(chain)
        if roots is None:
            roots = verify_root_chain(chain, name)
            cache.root_chains = {chain: roots}
        return verify_trusted(name, trusted, roots, now)

    @staticmethod
    @functools.cache
    def _bootstrap_version(bootstrap: bytes) -> int:
        return Metadata[Root].from_bytes(bootstrap).signed.version

    def _verify_and_download(
        self, now: datetime, reports: Mapping[str, EcuVersionReport], stages: Stages
    ) -> tuple[dict[str, EcuUpdate], dict[str, UptaneTarget], DirectorDer | None]:
        cfg = self.config
        hardware_ids = cfg.ecu_hardware_ids  # a new dict per access: once, not per ECU
        scratch = self.state.begin()
        keep = KEEP_ON_FAILURE_UNCHECKED
        try:
            # Director: TUF, then the Uptane-only checks (5.4.4.2 steps 1-6 + Director rules)
            stages.enter(STAGE_DIRECTOR)
            previous = self._previous_director_counters(scratch / "director")
            _director_updater, director_url, director = self._sync_repository(
                "director",
                scratch / "director",
                cfg.repository_map.director_urls,
                lambda url: self._updater(
                    scratch / "director",
                    self.director_metadata_url(url),
                    None,
                    cfg.director_root,
                    now,
                ),
                cfg.director_root,
                now,
                unchanged=functools.partial(self._unchanged, "director"),
            )
            checked = self.verification_cache.checked
            if checked is not None and checked[0] is director.targets:
                director_targets = checked[2]  # a warm cycle: these very objects were checked
            else:
                director_targets = check_director_targets(
                    director.targets, vin=cfg.vin, ecu_hardware_ids=hardware_ids
                )
            keep = KEEP_ON_FAILURE  # this vehicle's Director metadata, checked

            # Image repository: TUF, then look up every Director target through delegations
            stages.enter(STAGE_IMAGE)
            names = frozenset(t.name for t in director_targets.by_ecu.values())
            for target_name in sorted(names):
                cfg.repository_map.check_covered(target_name)
            # and the deltas that could replace them: looked up (and re-checked) here, with
            # the images, so that a warm cycle finds them in what it verified before
            names |= delta_candidates(cfg, director_targets.by_ecu, reports)
            image_updater, _, image = self._sync_repository(
                "image",
                scratch / "image",
                cfg.repository_map.image_urls,
                lambda url: self._updater(
                    scratch / "image", f"{url}/metadata/", f"{url}/targets/", cfg.image_root, now
                ),
                cfg.image_root,
                now,
                names,
                unchanged=functools.partial(self._unchanged, "image", names=names),
            )

            # Agreement, delegations and release counters (5.4.4.2 step 7)
            stages.enter(STAGE_MATCH)
            installed = self.state.installed(scratch)
            image_infos: dict[str, TargetFile] = {}
            matched = checked is not None and checked[0] is director.targets and checked[1] is image
            if matched:
                assert checked is not None
                image_infos = dict(checked[3])  # a warm cycle: the same objects, matched then
            else:
                image_infos = match_director_targets(
                    director.targets, director_targets.by_ecu, image, hardware_ids
                )
            for serial, target in director_targets.by_ecu.items():
                check_release_counter(
                    target, self._installed_counter(serial, installed, reports, previous)
                )

            pending = {
                serial: target
                for serial, target in director_targets.by_ecu.items()
                if not _runs(
                    reports[serial].installed if serial in reports else installed.get(serial),
                    target,
                )
            }

            # DER forms to forward (DESIGN 3): only needed when something is sent
            stages.enter(STAGE_DER)
            der = self._fetch_der(director, director_url) if pending else None

            # Images (5.4.4.2 step 8 onwards: download and check)
            stages.enter(STAGE_DOWNLOAD)
            updates: dict[str, EcuUpdate] = {}
            for serial, target in pending.items():
                info = image_infos[target.name]
                assert der is not None
                updates[serial] = EcuUpdate(
                    ecu_serial=serial,
                    hardware_id=hardware_ids[serial],
                    target=target,
                    image_path=self._download(image_updater, info),
                    director_root_chain=der.root_chain,
                    director_root_versions=der.root_versions,
                    director_targets=der.targets,
                    director_targets_version=der.targets_version,
                    delta=select_delta(
                        self,
                        image_updater,
                        image,
                        target,
                        reports.get(serial),
                        hardware_ids[serial],
                    ),
                )

            stages.enter(STAGE_COMMIT)
            reported = {s: r.installed for s, r in reports.items() if r.installed is not None}
            self.state.write_installed(scratch, self._merge_installed(installed, reported))
            self.state.commit(scratch)
            # what this committed cycle verified: the next one may stop after the timestamps,
            # and finds the release counters of this Director targets without parsing it
            cache = self.verification_cache
            with contextlib.suppress(OSError):
                data = (self.state.current() / "director" / "targets.json").read_bytes()
                counters = {s: t.release_counter for s, t in director_targets.by_ecu.items()}
                cache.counters = (data, counters)
            self.verification_cache.known = {
                "director": (director, frozenset()),
                "image": (image, names),
            }
            cache.checked = (director.targets, image, director_targets, dict(image_infos))
        except Exception:
            self._keep_verified(scratch, keep)
            raise
        except BaseException:
            self.state.discard(scratch)
            raise
        return updates, dict(director_targets.by_ecu), der

    # --- what a failed cycle keeps (TUF 5.3.8, 5.4.5, 5.5.7, 5.6.6) ----------------

    def _keep_verified(self, scratch: Path, keep: Mapping[str, tuple[str, ...]]) -> None:
        """Keep the roots and top-level metadata ngclient verified in a cycle that failed.

        ngclient writes a file into the scratch copy only once it verified it,
        so a root rotation, or a newer timestamp/snapshot, stays trusted even
        though the cycle failed later: key revocations and rollback floors
        move forward (TUF 5.3.8, 5.4.5, 5.5.7, 5.6.6). ``keep`` says what
        (``KEEP_ON_FAILURE``; ``KEEP_ON_FAILURE_UNCHECKED`` while the Director's
        metadata has not yet been shown to be this vehicle's). Never kept:
        Director targets (the instructions, accepted with the rest or not at
        all; their version stays protected by the kept snapshot), delegated
        roles and ``installed.json``. A failure to keep is not allowed to hide the
        cycle's own error: the scratch copy is then simply dropped.
        """
        try:
            self.state.keep_metadata(scratch, keep)
        except Exception:
            self.state.discard(scratch)

    # --- a stale local snapshot (ngclient reuses what it stored) -------------------

    def _sync_repository(
        self,
        name: str,
        metadata_dir: Path,
        urls: tuple[str, ...],
        make: Callable[[str], Updater],
        bootstrap: bytes,
        now: datetime,
        lookups: frozenset[str] = frozenset(),
        unchanged: Callable[[Updater], bool] = lambda _: False,
    ) -> tuple[Updater, str, VerifiedRepository]:
        """Refresh one repository with ngclient, look ``lookups`` up, re-check what it trusts.

        ngclient reuses a stored snapshot when the new timestamp names the
        version it holds, without checking its hashes (``stale.check_stored``,
        which checks the stored targets and delegated roles too; tuf 7.0.1
        checks those itself); if the repository changed that file's content
        without a version bump that stored copy would be refused every cycle.
        So once, on a length/hash mismatch, the stored snapshot and targets
        files are set aside, their versions kept as the rollback floor
        (``stale.check_floor``), and the repository is fetched afresh; only a fresh
        copy that fails too is an error (``mix_and_match``). A fresh attempt
        that fails puts the stored files back. ``unchanged`` lets a warm cycle
        stop after the timestamp (``_refresh``).
        """

        def attempt(
            unchanged: Callable[[Updater], bool],
        ) -> tuple[Updater, str, VerifiedRepository]:
            stored = stored_files(metadata_dir)  # before ngclient adds what it downloads
            updater, url = self._refresh(urls, make, unchanged)
            trusted = updater._trusted_set
            if Snapshot.type in trusted:
                # ngclient's lookup loads the delegated roles on each path: none to load
                # when top-level targets delegates nothing (the walk stops there)
                if trusted.targets.delegations is not None:
                    for path in sorted(lookups):
                        self._tuf(functools.partial(updater.get_targetinfo, path))
                check_stored(metadata_dir, trusted, stored)
            return (
                updater,
                url,
                self._trusted_repository(name, metadata_dir, updater, bootstrap, now),
            )

        try:
            return attempt(unchanged)
        except tuf_exc.LengthOrHashMismatchError:
            floor = snapshot_floor(metadata_dir)
            if floor is None:
                raise
        aside = metadata_dir.with_name(f"{metadata_dir.name}.aside")
        set_aside(metadata_dir, aside)
        try:
            updater, url, verified = attempt(lambda _: False)
            check_floor(name, floor, verified)
        except BaseException:
            put_back(aside, metadata_dir)
            raise
        shutil.rmtree(aside, ignore_errors=True)
        return updater, url, verified

    @staticmethod
    def _merge_installed(
        installed: Mapping[str, InstalledImage], reported: Mapping[str, InstalledImage]
    ) -> dict[str, InstalledImage]:
        """Reported images replace recorded ones unless that would lower a counter."""
        merged = dict(installed)
        for serial, image in reported.items():
            old = merged.get(serial)
            if old is None or image.release_counter >= old.release_counter:
                merged[serial] = image
        return merged

    def _previous_director_counters(self, metadata_dir: Path) -> dict[str, int]:
        """Release counter per ECU in the previously trusted Director targets (5.4.4.2)."""
        try:
            data = (metadata_dir / "targets.json").read_bytes()
        except OSError:
            return {}
        cache = self.verification_cache
        if cache.counters is not None and cache.counters[0] == data:
            return dict(cache.counters[1])  # the same file as last cycle: parsed then
        try:
            md = Metadata[Targets].from_bytes(data)
        except tuf_exc.RepositoryError:
            return {}
        counters: dict[str, int] = {}
        for target_file in md.signed.targets.values():
            with contextlib.suppress(UptaneError):
                t = UptaneTarget.from_target_file(target_file, director=True)
                assert t.ecu_serial is not None
                counters[t.ecu_serial] = t.release_counter
        cache.counters = (data, dict(counters))
        return counters

    @staticmethod
    def _installed_counter(
        serial: str,
        installed: Mapping[str, InstalledImage],
        reports: Mapping[str, EcuVersionReport],
        previous: Mapping[str, int],
    ) -> int | None:
        """Highest release counter known for ``serial``: recorded, reported, or last assigned."""
        counters = [previous[serial]] if serial in previous else []
        if serial in installed:
            counters.append(installed[serial].release_counter)
        report = reports.get(serial)
        if report is not None and report.installed is not None:
            counters.append(report.installed.release_counter)
        return max(counters) if counters else None

    def _fetch_der(self, director: VerifiedRepository, url: str) -> DirectorDer:
        limit = self.config.metadata_limits.der
        base = self.director_metadata_url(url)
        get = self.fetcher.download_bytes
        cache = self.verification_cache.der
        root_ders: dict[int, bytes] = {}
        prev: Root | None = None
        for root in director.roots:
            # an envelope verified against this very JSON root is not fetched again
            held = cache.root(root, prev)
            root_ders[root.version] = (
                held
                if held is not None
                else self._tuf(functools.partial(get, f"{base}{root.version}.root.der", limit))
            )
            prev = root
        targets_der = cache.targets_for(director.targets)
        if targets_der is None:
            version = director.targets.version
            targets_der = self._tuf(functools.partial(get, f"{base}{version}.targets.der", limit))
        return verify_director_der(director, root_ders, targets_der, max_size=limit, cache=cache)

    def _download(self, updater: Updater, info: TargetFile) -> Path:
        """Fetch one image (``download.download_image``)."""
        return download_image(updater, info, self.config.download, self.config.images_dir)


def _runs(installed: InstalledImage | None, target: UptaneTarget) -> bool:
    """Does the ECU already run ``target``? (name, length, every common hash)."""
    if installed is None:
        return False
    common = set(installed.hashes) & set(target.hashes)
    return (
        installed.filename == target.name
        and installed.length == target.length
        and bool(common)
        and all(installed.hashes[a] == target.hashes[a] for a in common)
    )

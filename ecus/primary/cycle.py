"""The primary ECU's update cycle (DESIGN 2; Uptane 2.1, 5.4.2, 5.4.4.2).

``Primary.run_cycle`` does, in order:

1. collect signed version reports: its own (the primary is an ECU too) and,
   through ``SecondaryClient``, each secondary's, verifying each signature
   with that ECU's registered key, its serial and a fresh nonce;
2. sign the vehicle version manifest and PUT it to the Director;
3. full verification into a scratch copy of the trusted state: one ngclient
   ``Updater`` per repository (Director at ``{url}/vehicles/{vin}/metadata/``,
   Image at ``{url}/metadata/``), a sans-IO re-check of both repositories at
   the primary's clock (``uptane.verification.full``), the Director-only
   checks (``director_checks``), Director/Image agreement for every target
   (``matching``, through the Image repository's delegations, each of which
   must allow the ECU's hardware), release counters, and the DER Director
   metadata secondaries will get (``der``);
4. download every image an ECU needs (length-capped, all hashes, atomic,
   slow retrieval detected) into the download directory;
5. commit the scratch state atomically and return a ``CycleResult``.

Any failure in 3-5 discards the scratch copy, so trusted state is unchanged,
and is remembered (attack name + result) for the primary's next report.
The primary owns HTTP, disk and clock; security decisions are in
``uptane.verification``.
"""

from __future__ import annotations

import contextlib
import functools
import os
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote

import httpx
from securesystemslib.signer import Signer
from tuf.api import exceptions as tuf_exc
from tuf.api.metadata import Metadata, Root, TargetFile, Targets
from tuf.ngclient import Updater, UpdaterConfig

from ecus.config import PrimaryConfig
from ecus.fetcher import PolicyFetcher
from ecus.primary_state import PrimaryState, ReportState
from ecus.secondary_client import EcuUpdate, SecondaryClient
from uptane.errors import (
    ATTACK_PARTIAL_BUNDLE,
    ATTACK_REPLAYED_REPORT,
    ATTACK_SPOOFED_MESSAGE,
    CodecError,
    EndlessDataError,
    ImageMismatchError,
    ManifestError,
    SlowRetrievalError,
    TransportError,
    UnsafeTargetPathError,
    UptaneError,
    attack_name,
)
from uptane.manifest import (
    EcuVersionReport,
    InstalledImage,
    SignedEcuVersionReport,
    VehicleVersionManifest,
)
from uptane.metadata import UptaneTarget, check_target_path
from uptane.repository import Clock, utc_now
from uptane.verification.der import DirectorDer, verify_director_der
from uptane.verification.director_checks import (
    check_director_targets,
    check_release_counter,
)
from uptane.verification.full import (
    RepositoryBytes,
    VerifiedRepository,
    classify_version_error,
    verify_repository,
)
from uptane.verification.matching import (
    check_delegated_hardware,
    find_image_target,
    match_target,
)

NONCE_BYTES = 16
MAX_RESPONSE_BYTES = 65536

# Stages of a cycle, as reported in ``CycleIssue.stage`` / ``CycleResult.stage``.
STAGE_REPORTS = "reports"
STAGE_MANIFEST = "manifest"
STAGE_DIRECTOR = "director"
STAGE_IMAGE = "image"
STAGE_MATCH = "match"
STAGE_DER = "der"
STAGE_DOWNLOAD = "download"
STAGE_COMMIT = "commit"

T = TypeVar("T")


@dataclass(frozen=True)
class CycleIssue:
    """One thing that went wrong in a cycle, with the attack it is evidence of."""

    stage: str
    error: BaseException
    attack: str | None = None
    ecu_serial: str | None = None

    def __str__(self) -> str:
        who = f" [{self.ecu_serial}]" if self.ecu_serial else ""
        attack = f" (attack: {self.attack})" if self.attack else ""
        return f"{self.stage}{who}: {type(self.error).__name__}: {self.error}{attack}"


@dataclass(frozen=True)
class ManifestOutcome:
    """The Director's answer to the vehicle version manifest (5.4.2.2)."""

    accepted: bool
    status: int | None = None
    reason: str | None = None
    detail: str = ""
    metadata_version: int | None = None


@dataclass(frozen=True)
class CycleResult:
    """What one update cycle found and prepared.

    ``ok`` is True when full verification, downloads and commit succeeded;
    ``updates`` then holds, per ECU serial, the target to install, the image
    path and the DER Director metadata to forward (the primary's own serial
    included when it has an update); ``der`` holds the verified DER Director
    metadata they share (None when no ECU needs an update). ``error`` is the
    failure that stopped verification (None if ``ok``); ``issues`` lists it and
    every non-fatal
    problem (an unreachable secondary, a refused manifest, a bad report);
    ``attacks`` names every attack detected. ``timings`` is seconds spent per
    stage (by the primary's monotonic ``timer``), for benchmarks and logs.
    """

    VERIFICATION_STAGES = (STAGE_DIRECTOR, STAGE_IMAGE, STAGE_MATCH, STAGE_DER)

    ok: bool
    updates: Mapping[str, EcuUpdate] = field(default_factory=dict)
    director_targets: Mapping[str, UptaneTarget] = field(default_factory=dict)
    reports: Mapping[str, EcuVersionReport] = field(default_factory=dict)
    manifest: ManifestOutcome | None = None
    der: DirectorDer | None = None
    issues: tuple[CycleIssue, ...] = ()
    error: BaseException | None = None
    stage: str | None = None
    attacks: tuple[str, ...] = ()
    timings: Mapping[str, float] = field(default_factory=dict)

    def raise_for_error(self) -> None:
        if self.error is not None:
            raise self.error


class _Stages:
    """Which stage a cycle is in, and how long each took."""

    def __init__(self, timer: Callable[[], float]) -> None:
        self._timer = timer
        self.current = ""
        self._start = timer()
        self.timings: dict[str, float] = {}

    def enter(self, stage: str) -> None:
        self.close()
        self.current = stage
        self._start = self._timer()

    def close(self) -> str:
        if self.current:
            elapsed = self._timer() - self._start
            self.timings[self.current] = self.timings.get(self.current, 0.0) + elapsed
            self._start = self._timer()
        return self.current


def safe_target_path(base: Path, name: str) -> Path:
    """Where image ``name`` goes under ``base``; refuses anything that escapes it.

    The name must be a plain relative target path (``check_target_path``:
    no ``..``, absolute paths, backslashes or percent-encoding) AND the
    resolved path, symlinks followed, must stay inside ``base``.
    """
    check_target_path(name)
    root = base.resolve()
    candidate = (root / name).resolve()
    if candidate == root or not candidate.is_relative_to(root):
        raise UnsafeTargetPathError(f"target {name!r} resolves outside the download directory")
    return candidate


def _result_code(error: BaseException) -> str:
    if isinstance(error, ImageMismatchError | tuf_exc.LengthOrHashMismatchError):
        return "imageMismatch"
    if isinstance(error, SlowRetrievalError | EndlessDataError | tuf_exc.DownloadError):
        return "transferIncomplete"
    if isinstance(error, tuf_exc.RepositoryError):
        return "metadataRejected"
    return "internalError"


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Primary:
    """A primary ECU: full verification, downloads, manifests (DESIGN 2).

    ``secondaries`` are the links to the ECUs named in ``config.secondaries``.
    ``clock`` is the primary's time (UTC): every expiry check uses it.
    ``timer`` is the monotonic clock used for download rates.
    """

    def __init__(
        self,
        config: PrimaryConfig,
        secondaries: Iterable[SecondaryClient] = (),
        *,
        clock: Clock = utc_now,
        timer: Callable[[], float] = time.monotonic,
        signer: Signer | None = None,
        http: httpx.Client | None = None,
    ) -> None:
        self.config = config
        self.clock = clock
        self._signer = signer if signer is not None else config.key.signer()
        self._clients: dict[str, SecondaryClient] = {}
        known = {s.serial for s in config.secondaries}
        for client in secondaries:
            if client.serial not in known:
                raise ValueError(f"secondary {client.serial!r} is not in the primary config")
            self._clients[client.serial] = client
        self.state = PrimaryState(config.state_dir)
        self._timer = timer
        self.fetcher = PolicyFetcher(config.download, timer=timer)
        self._http = (
            http if http is not None else httpx.Client(timeout=config.http_timeout, trust_env=False)
        )

    # --- paths and URLs ------------------------------------------------------

    @property
    def trusted_dir(self) -> Path:
        """The trusted state: changes only when a cycle fully succeeds."""
        return self.state.trusted_dir

    def director_metadata_url(self, base: str) -> str:
        """The vehicle's Director metadata URL on Director ``base`` (one TAP 4 URL)."""
        return f"{base}/vehicles/{quote(self.config.vin, safe='')}/metadata/"

    # --- reports and manifest (5.4.2) ------------------------------------------

    def installed(self) -> dict[str, InstalledImage]:
        """Installed image per ECU as recorded in trusted state."""
        return self.state.installed()

    def mark_installed(self, ecu_serial: str, image: InstalledImage) -> None:
        """Record that ``ecu_serial`` (e.g. the primary itself) now runs ``image``."""
        if ecu_serial not in self.config.ecu_hardware_ids:
            raise ValueError(f"{ecu_serial!r} is not an ECU of this vehicle")
        self.state.update_installed({ecu_serial: image})

    def report_state(self) -> ReportState:
        """What the primary's next own report will say (attacks, last result)."""
        return self.state.reports()

    def own_report(self, nonce: bytes = b"") -> SignedEcuVersionReport:
        """Sign the primary's own ECU version report; bumps and persists its counter."""
        state = self.state.reports()
        state.report_counter += 1
        self.state.save_reports(state)  # persisted before use: a counter is never reused
        report = EcuVersionReport(
            ecu_serial=self.config.ecu_serial,
            hardware_id=self.config.hardware_id,
            installed=self.installed().get(self.config.ecu_serial),
            report_counter=state.report_counter,
            latest_time=self.clock().replace(microsecond=0),
            nonce=nonce,
            attacks_detected=tuple(state.attacks),
            last_result=state.last_result,
            last_result_text=state.last_result_text,
        )
        return SignedEcuVersionReport.sign(report, self._signer)

    def collect_reports(
        self,
    ) -> tuple[dict[str, SignedEcuVersionReport], dict[str, EcuVersionReport], list[CycleIssue]]:
        """Own report + a verified fresh report from every reachable secondary."""
        signed: dict[str, SignedEcuVersionReport] = {}
        reports: dict[str, EcuVersionReport] = {}
        issues: list[CycleIssue] = []
        own = self.own_report()
        signed[self.config.ecu_serial] = own
        reports[self.config.ecu_serial] = own.report
        for entry in self.config.secondaries:
            client = self._clients.get(entry.serial)
            if client is None:
                issues.append(
                    CycleIssue(
                        STAGE_REPORTS, TransportError("no link to this ECU"), None, entry.serial
                    )
                )
                continue
            nonce = os.urandom(NONCE_BYTES)
            try:
                report_signed = SignedEcuVersionReport.from_der(client.version_report(nonce))
                report = report_signed.verify(entry.public_key)
                if report.ecu_serial != entry.serial or report.hardware_id != entry.hardware_id:
                    raise ManifestError(
                        f"report signed by {entry.serial}'s key says it is "
                        f"{report.ecu_serial}/{report.hardware_id}",
                        "bad_ecu_signature",
                    )
                if report.nonce != nonce:
                    raise ManifestError(
                        "report does not carry this request's nonce", "replayed_report"
                    )
            except ManifestError as e:
                attack = (
                    ATTACK_REPLAYED_REPORT
                    if e.reason == "replayed_report"
                    else ATTACK_SPOOFED_MESSAGE
                )
                issues.append(CycleIssue(STAGE_REPORTS, e, attack, entry.serial))
                continue
            except CodecError as e:
                issues.append(CycleIssue(STAGE_REPORTS, e, ATTACK_SPOOFED_MESSAGE, entry.serial))
                continue
            except Exception as e:  # TransportError and friends: a fault, not an attack
                issues.append(CycleIssue(STAGE_REPORTS, e, attack_name(e), entry.serial))
                continue
            signed[entry.serial] = report_signed
            reports[entry.serial] = report
        return signed, reports, issues

    def upload_manifest(self, reports: Mapping[str, SignedEcuVersionReport]) -> ManifestOutcome:
        """Sign the vehicle version manifest and PUT it to the Director (5.4.2.2)."""
        body = VehicleVersionManifest(
            vin=self.config.vin, primary_ecu_serial=self.config.ecu_serial, reports=dict(reports)
        ).sign(self._signer)
        vin = quote(self.config.vin, safe="")
        response: httpx.Response | None = None
        error = "no Director URL"
        for base in self.config.repository_map.director_urls:  # mirrors, in map order
            try:
                response = self._http.put(
                    f"{base}/vehicles/{vin}/manifest",
                    content=body,
                    headers={"content-type": "application/json"},
                )
                break
            except httpx.TransportError as e:
                error = f"{base}: {e}"
            except httpx.HTTPError as e:
                return ManifestOutcome(False, None, "unreachable", f"{base}: {e}")
        if response is None:
            return ManifestOutcome(False, None, "unreachable", error)
        answer: Any = {}
        if len(response.content) <= MAX_RESPONSE_BYTES:
            with contextlib.suppress(ValueError):
                answer = response.json()
        if not isinstance(answer, dict):
            answer = {}
        if response.status_code == 200 and answer.get("accepted") is True:
            version = answer.get("metadata_version")
            return ManifestOutcome(
                True, 200, None, "", version if isinstance(version, int) else None
            )
        return ManifestOutcome(
            False,
            response.status_code,
            str(answer.get("error", "http_error"))[:100],
            str(answer.get("detail", ""))[:500],
        )

    # --- the cycle ------------------------------------------------------------

    def run_cycle(self) -> CycleResult:
        """One update cycle (module docstring). Never raises for bad remote data."""
        now = self.clock()
        stages = _Stages(self._timer)
        stages.enter(STAGE_REPORTS)
        signed, reports, issues = self.collect_reports()
        stages.enter(STAGE_MANIFEST)
        manifest = self.upload_manifest(signed)
        state = self.state.reports()
        if manifest.accepted:
            # the Director has our attacks and last result: start afresh
            state.attacks, state.last_result, state.last_result_text = [], "ok", ""
        else:
            issues.append(
                CycleIssue(
                    STAGE_MANIFEST,
                    ManifestError(
                        f"Director refused the manifest: {manifest.detail}", manifest.reason
                    ),
                )
            )
        issue_attacks = [i.attack for i in issues if i.attack]
        if issue_attacks:
            state.note_failure(issue_attacks, state.last_result, state.last_result_text)
        self.state.save_reports(state)

        stages.enter(STAGE_DIRECTOR)
        try:
            outcome = self._verify_and_download(now, reports, stages)
        except Exception as e:  # every failure is reported, none is fatal to the ECU
            stage = stages.close()
            attack = attack_name(e)
            issues.append(CycleIssue(stage, e, attack))
            state = self.state.reports()
            state.note_failure([attack] if attack else [], _result_code(e), f"{stage}: {e}")
            self.state.save_reports(state)
            return CycleResult(
                ok=False,
                reports=reports,
                manifest=manifest,
                issues=tuple(issues),
                error=e,
                stage=stage,
                attacks=tuple(dict.fromkeys(i.attack for i in issues if i.attack)),
                timings=stages.timings,
            )
        stages.close()
        updates, targets, der = outcome
        return CycleResult(
            ok=True,
            updates=updates,
            director_targets=targets,
            reports=reports,
            manifest=manifest,
            der=der,
            issues=tuple(issues),
            attacks=tuple(dict.fromkeys(i.attack for i in issues if i.attack)),
            timings=stages.timings,
        )

    def distribute(self, result: CycleResult) -> dict[str, BaseException | EcuVersionReport]:
        """Send each secondary its update; return its verified new report or the error.

        The primary's own update (if any) is left to the caller, who then
        calls ``mark_installed``.

        A bundle left partly installed is a partial bundle installation
        (Uptane 2.1, 4.3.3): when a secondary's update failed (link down,
        transfer failed, refused, unverifiable report, or no link at all)
        while another secondary of the same bundle now runs its new target,
        ``partial_bundle_installation`` goes into the primary's next own
        report, so the Director's inventory shows it. Not counted: a failure
        whose error already names an attack (the attack it is evidence of is
        reported by that name), and a bundle of which no secondary installed
        anything (nothing is partial; the next cycle sends it again).
        """
        outcomes: dict[str, BaseException | EcuVersionReport] = {}
        keys = self.config.ecu_keys
        installed: dict[str, InstalledImage] = {}
        failed: list[str] = []
        done: list[str] = []
        for serial, update in result.updates.items():
            client = self._clients.get(serial)
            if client is None:
                if serial != self.config.ecu_serial:
                    failed.append(serial)  # a secondary of the bundle we cannot reach
                continue
            try:
                report = SignedEcuVersionReport.from_der(client.send_update(update)).verify(
                    keys[serial]
                )
                if report.ecu_serial != serial:
                    raise ManifestError("install report names another ECU", "bad_ecu_signature")
            except Exception as e:  # a secondary's failure never stops the others
                outcomes[serial] = e
                if attack_name(e) is None:
                    failed.append(serial)
                continue
            outcomes[serial] = report
            if report.installed is not None:
                installed[serial] = report.installed
            if _runs(report.installed, update.target):
                done.append(serial)
        if installed:
            self.state.update_installed(self._merge_installed(self.installed(), installed))
        if failed and done:
            state = self.state.reports()
            state.note_failure([ATTACK_PARTIAL_BUNDLE], state.last_result, state.last_result_text)
            self.state.save_reports(state)
        return outcomes

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
        except tuf_exc.BadVersionNumberError as e:
            last = self.fetcher.last_metadata
            named = classify_version_error(e, *(last if last else (None, None)))
            if named is e:
                raise
            raise named from e
        except tuf_exc.DownloadLengthMismatchError as e:
            raise EndlessDataError(f"more data than allowed: {e}") from e

    def _refresh(
        self, urls: tuple[str, ...], make: Callable[[str], Updater]
    ) -> tuple[Updater, str]:
        """Refresh from the first mirror that can be reached (TAP 4 URL list).

        Only a failure to connect moves on to the next URL; anything a server
        answered (bad metadata, HTTP errors, slow or endless data) stops here.
        """
        error: tuf_exc.DownloadError | None = None
        for url in urls:
            updater = make(url)
            try:
                self._tuf(updater.refresh)
                return updater, url
            except tuf_exc.DownloadError as e:
                if isinstance(e, tuf_exc.DownloadHTTPError | tuf_exc.SlowRetrievalError):
                    raise
                error = e
        assert error is not None
        raise error

    @staticmethod
    def _repository_bytes(
        metadata_dir: Path, updater: Updater, bootstrap: bytes
    ) -> RepositoryBytes:
        """The bytes ngclient trusted, read back from its metadata dir."""
        # Updater._trusted_set (private, see _updater) tells which delegated roles
        # ngclient loaded this cycle; their files may sit beside stale ones.
        trusted = updater._trusted_set
        first = Metadata[Root].from_bytes(bootstrap).signed.version
        current = trusted.root.version
        chain = tuple(
            (metadata_dir / "root_history" / f"{v}.root.json").read_bytes()
            for v in range(first, current + 1)
        )
        delegated = {}
        for filename in trusted.snapshot.meta:
            role = filename.removesuffix(".json")
            if role != Targets.type and role in trusted:
                delegated[role] = (metadata_dir / f"{quote(role, safe='')}.json").read_bytes()
        return RepositoryBytes(
            root_chain=chain,
            timestamp=(metadata_dir / "timestamp.json").read_bytes(),
            snapshot=(metadata_dir / "snapshot.json").read_bytes(),
            targets=(metadata_dir / "targets.json").read_bytes(),
            delegated=delegated,
        )

    def _verify_and_download(
        self, now: datetime, reports: Mapping[str, EcuVersionReport], stages: _Stages
    ) -> tuple[dict[str, EcuUpdate], dict[str, UptaneTarget], DirectorDer | None]:
        cfg = self.config
        scratch = self.state.begin()
        try:
            # Director: TUF, then the Uptane-only checks (5.4.4.2 steps 1-6 + Director rules)
            stages.enter(STAGE_DIRECTOR)
            previous = self._previous_director_counters(scratch / "director")
            director_updater, director_url = self._refresh(
                cfg.repository_map.director_urls,
                lambda url: self._updater(
                    scratch / "director",
                    self.director_metadata_url(url),
                    None,
                    cfg.director_root,
                    now,
                ),
            )
            director = verify_repository(
                "director",
                self._repository_bytes(scratch / "director", director_updater, cfg.director_root),
                now,
            )
            director_targets = check_director_targets(
                director.targets.signed, vin=cfg.vin, ecu_hardware_ids=cfg.ecu_hardware_ids
            )

            # Image repository: TUF, then look up every Director target through delegations
            stages.enter(STAGE_IMAGE)
            image_updater, _ = self._refresh(
                cfg.repository_map.image_urls,
                lambda url: self._updater(
                    scratch / "image", f"{url}/metadata/", f"{url}/targets/", cfg.image_root, now
                ),
            )
            # ngclient's lookup loads (and verifies) the roles on each target's path
            looked_up: set[str] = set()
            for target in director_targets.by_ecu.values():
                cfg.repository_map.check_covered(target.name)
                if target.name not in looked_up:
                    self._tuf(functools.partial(image_updater.get_targetinfo, target.name))
                    looked_up.add(target.name)
            image = verify_repository(
                "image",
                self._repository_bytes(scratch / "image", image_updater, cfg.image_root),
                now,
            )

            # Agreement, delegations and release counters (5.4.4.2 step 7)
            stages.enter(STAGE_MATCH)
            installed = self.state.installed(scratch)
            image_infos: dict[str, TargetFile] = {}
            for serial, target in director_targets.by_ecu.items():
                # the same walk as ngclient's, over the re-verified bytes, also telling
                # which delegations led to the image: each must allow this ECU's hardware
                found = find_image_target(image, target.name)
                match_target(
                    director.targets.signed.targets[target.name],
                    None if found is None else found.target,
                )
                assert found is not None  # match_target refused None
                check_delegated_hardware(found, cfg.ecu_hardware_ids[serial])
                image_infos[target.name] = found.target
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
                    hardware_id=cfg.ecu_hardware_ids[serial],
                    target=target,
                    image_path=self._download(image_updater, info),
                    director_root_chain=der.root_chain,
                    director_root_versions=der.root_versions,
                    director_targets=der.targets,
                    director_targets_version=der.targets_version,
                )

            stages.enter(STAGE_COMMIT)
            reported = {s: r.installed for s, r in reports.items() if r.installed is not None}
            self.state.write_installed(scratch, self._merge_installed(installed, reported))
            self.state.commit(scratch)
        except BaseException:
            self.state.discard(scratch)
            raise
        return updates, dict(director_targets.by_ecu), der

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

    @staticmethod
    def _previous_director_counters(metadata_dir: Path) -> dict[str, int]:
        """Release counter per ECU in the previously trusted Director targets (5.4.4.2)."""
        try:
            md = Metadata[Targets].from_bytes((metadata_dir / "targets.json").read_bytes())
        except (OSError, tuf_exc.RepositoryError):
            return {}
        counters: dict[str, int] = {}
        for target_file in md.signed.targets.values():
            with contextlib.suppress(UptaneError):
                t = UptaneTarget.from_target_file(target_file, director=True)
                assert t.ecu_serial is not None
                counters[t.ecu_serial] = t.release_counter
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
        root_ders = {
            md.signed.version: self._tuf(
                functools.partial(get, f"{base}{md.signed.version}.root.der", limit)
            )
            for md in director.roots
        }
        version = director.targets.signed.version
        targets_der = self._tuf(functools.partial(get, f"{base}{version}.targets.der", limit))
        return verify_director_der(director, root_ders, targets_der, max_size=limit)

    def _download(self, updater: Updater, info: TargetFile) -> Path:
        """Fetch one image: length-capped, every hash checked, written atomically."""
        policy = self.config.download
        if info.length > policy.max_image_bytes:
            raise EndlessDataError(
                f"{info.path!r} is {info.length} bytes, over the limit of {policy.max_image_bytes}"
            )
        dest = safe_target_path(self.config.images_dir, info.path)
        if dest.is_file() and updater.find_cached_target(info, str(dest)) is not None:
            return dest
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
        os.close(fd)
        tmp = Path(tmp_name)
        try:
            try:
                updater.download_target(info, filepath=str(tmp))
            except tuf_exc.DownloadLengthMismatchError as e:
                raise EndlessDataError(
                    f"{info.path!r}: server sent more than {info.length} bytes"
                ) from e
            except tuf_exc.LengthOrHashMismatchError as e:
                raise ImageMismatchError(f"{info.path!r} does not match its metadata: {e}") from e
            _fsync_file(tmp)
            os.replace(tmp, dest)
            _fsync_file(dest.parent)
        finally:
            tmp.unlink(missing_ok=True)
        return dest


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

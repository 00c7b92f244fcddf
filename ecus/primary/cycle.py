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
import os
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
from securesystemslib.signer import Signer

from ecus.primary import policy
from ecus.primary.config import PrimaryConfig
from ecus.primary.fetch import PolicyFetcher
from ecus.primary.links import SecondaryClient
from ecus.primary.result import (
    MAX_RESPONSE_BYTES,
    NONCE_BYTES,
    STAGE_DIRECTOR,
    STAGE_MANIFEST,
    STAGE_REPORTS,
    CycleIssue,
    CycleResult,
    ManifestOutcome,
    Stages,
    result_code,
)
from ecus.primary.state import PrimaryState, ReportState
from ecus.primary.verify import RepositorySync, _runs
from uptane.errors import (
    ATTACK_PARTIAL_BUNDLE,
    ATTACK_REPLAYED_REPORT,
    ATTACK_SPOOFED_MESSAGE,
    CodecError,
    ManifestError,
    StateError,
    TransportError,
    attack_name,
)
from uptane.manifest import (
    EcuVersionReport,
    InstalledImage,
    SignedEcuVersionReport,
    VehicleVersionManifest,
)
from uptane.repository import Clock, utc_now


class Primary(RepositorySync):
    """A primary ECU: full verification, downloads, manifests (DESIGN 2).

    ``secondaries`` are the links to the ECUs named in ``config.secondaries``.
    ``clock`` is the primary's time (UTC): every expiry check uses it.
    ``timer`` is the monotonic clock used for download rates.
    ``install_policy`` (``ecus.primary.policy``) may hold updates back.
    """

    install_policy: policy.InstallPolicy | None = None

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
        # per secondary: counter of its last report the Director accepted (DESIGN 7)
        self._accepted: dict[str, int] = {}
        known = {s.serial for s in config.secondaries}
        for client in secondaries:
            if client.serial not in known:
                raise ValueError(f"secondary {client.serial!r} is not in the primary config")
            self._clients[client.serial] = client
        self.state = PrimaryState(config.state_dir, self._signer)
        self._timer = timer
        tls = config.tls.context() if config.tls is not None else None  # mutual TLS (issue 12)
        self.fetcher = PolicyFetcher(
            config.download, timer=timer, tls=tls, tls_urls=config.repository_map.director_urls
        )
        self._http = (
            http
            if http is not None
            else httpx.Client(
                timeout=config.http_timeout, trust_env=False, verify=tls if tls else True
            )
        )

    # --- paths and URLs ------------------------------------------------------

    @property
    def trusted_dir(self) -> Path:
        """The trusted state: changes only when a cycle fully succeeds."""
        return self.state.trusted_dir

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
        return self._reports()

    def _reports(self) -> ReportState:
        """The report state; a ``reports.json`` that fails authentication is replaced.

        Its counter cannot be trusted, and a counter must never be reused, so
        the new state counts on from the primary's clock in milliseconds (far
        above any counter reached one report at a time) and its last result
        says what happened (``StateError``, see ``ecus.primary.state``).
        """
        try:
            return self.state.reports()
        except StateError as e:
            state = ReportState(report_counter=int(self.clock().timestamp() * 1000))
            state.note_failure([], "internalError", f"state: {e}")
            self.state.save_reports(state)
            return state

    def own_report(self, nonce: bytes = b"") -> SignedEcuVersionReport:
        """Sign the primary's own ECU version report; bumps and persists its counter."""
        state = self._reports()
        state.report_counter += 1
        self.state.save_reports(state)  # persisted before use: a counter is never reused
        try:
            installed = self.installed().get(self.config.ecu_serial)
        except StateError as e:  # fail closed: claim nothing, say why
            installed = None
            state.note_failure([], "internalError", f"state: {e}")
        report = EcuVersionReport(
            ecu_serial=self.config.ecu_serial,
            hardware_id=self.config.hardware_id,
            installed=installed,
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
                report_signed = SignedEcuVersionReport.from_der(
                    client.version_report(nonce, last_accepted=self._accepted.get(entry.serial, 0))
                )
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
            refused = answer.get("refused_reports")
            return ManifestOutcome(
                True,
                200,
                None,
                "",
                version if isinstance(version, int) else None,
                {
                    str(s)[:128]: str(why)[:100]
                    for s, why in (refused.items() if isinstance(refused, dict) else ())
                    if s in reports
                },
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
        stages = Stages(self._timer)
        stages.enter(STAGE_REPORTS)
        signed, reports, issues = self.collect_reports()
        stages.enter(STAGE_MANIFEST)
        manifest = self.upload_manifest(signed)
        state = self._reports()
        if manifest.accepted:
            # the Director has our attacks and last result: start afresh
            state.attacks, state.last_result, state.last_result_text = [], "ok", ""
            # and the secondaries': the next requests carry signed receipts (DESIGN 7), but
            # not for a report the Director left out (its attacks must reach it later)
            self._accepted.update(
                {
                    s: r.report_counter
                    for s, r in reports.items()
                    if s not in manifest.refused_reports
                }
            )
            for serial, why in manifest.refused_reports.items():
                issues.append(
                    CycleIssue(
                        STAGE_MANIFEST,
                        ManifestError(f"the Director left this ECU's report out: {why}", why),
                        None,
                        serial,
                    )
                )
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
            state = self._reports()
            state.note_failure([attack] if attack else [], result_code(e), f"{stage}: {e}")
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
        held = policy.hold(self, result)  # consent and preconditions (ecus.primary.policy)
        if held is not None:
            return dict(held)
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
            state = self._reports()
            state.note_failure([ATTACK_PARTIAL_BUNDLE], state.last_result, state.last_result_text)
            self.state.save_reports(state)
        return outcomes

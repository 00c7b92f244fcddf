"""Primary building blocks: config, state directory, download paths, reports."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path

import pytest
from helpers.uptane_env import tree_digest
from securesystemslib.signer import CryptoSigner
from tuf.api.metadata import Metadata, Root

from ecus.primary import CycleResult, Primary, safe_target_path
from ecus.primary import state as state_module
from ecus.primary.can_link import SecondaryRefusedError, TransferFailedError
from ecus.primary.config import DownloadPolicy, MetadataLimits, PrimaryConfig
from ecus.primary.links import EcuUpdate, InMemorySecondary, SecondaryClient
from ecus.primary.state import PrimaryState, ReportState
from uptane.errors import (
    ATTACK_FREEZE,
    ATTACK_PARTIAL_BUNDLE,
    ConfigError,
    ImageMismatchError,
    StateError,
    TransportError,
    UnsafeTargetPathError,
)
from uptane.keys import generate_ed25519, public_key_dict
from uptane.manifest import EcuVersionReport, InstalledImage, SignedEcuVersionReport
from uptane.metadata import UptaneTarget
from uptane.repository import atomic_write

SIGNER = CryptoSigner.generate_ed25519()  # the primary's key, sealing its state


def root_bytes() -> bytes:
    signer = CryptoSigner.generate_ed25519()
    root = Root()
    for role in ("root", "targets", "snapshot", "timestamp"):
        root.add_key(signer.public_key, role)
    md = Metadata(root)
    md.sign(signer)
    return md.to_bytes()


def write_config(tmp_path: Path, **changes: object) -> Path:
    key = generate_ed25519(tmp_path / "keys", "primary")
    (tmp_path / "director-root.json").write_bytes(root_bytes())
    (tmp_path / "image-root.json").write_bytes(root_bytes())
    (tmp_path / "map.json").write_text(
        json.dumps(
            {
                "repositories": {
                    "director": ["http://127.0.0.1:8084"],
                    "image": ["http://127.0.0.1:8001"],
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
    )
    ecu_key = CryptoSigner.generate_ed25519().public_key
    raw: dict[str, object] = {
        "vin": "VIN-1",
        "ecu_serial": "primary-1",
        "hardware_id": "gw",
        "key": key.to_dict(),
        "repository_map": "map.json",
        "director_root": "director-root.json",
        "image_root": "image-root.json",
        "state_dir": "state",
        "secondaries": [
            {"serial": "ecu-a", "hardware_id": "hw-a", "public_key": public_key_dict(ecu_key)}
        ],
        "download": {"min_bytes_per_second": 100, "grace_seconds": 1},
        "metadata_limits": {"timestamp": 2048},
    }
    raw.update(changes)
    path = tmp_path / "primary.json"
    path.write_text(json.dumps(raw))
    return path


# --- config -------------------------------------------------------------------


def test_config_loads_with_paths_relative_to_the_file(tmp_path: Path) -> None:
    config = PrimaryConfig.load(write_config(tmp_path))
    assert config.state_dir == (tmp_path / "state").resolve()
    assert config.images_dir == config.state_dir / "images"
    assert config.repository_map.director_urls == ("http://127.0.0.1:8084",)
    assert config.ecu_hardware_ids == {"primary-1": "gw", "ecu-a": "hw-a"}
    assert config.download == DownloadPolicy(min_bytes_per_second=100, grace_seconds=1)
    assert config.metadata_limits == MetadataLimits(timestamp=2048)
    assert set(config.ecu_keys) == {"primary-1", "ecu-a"}


@pytest.mark.parametrize(
    "changes",
    [
        {"vin": "../etc"},
        {"surprise": 1},
        {"download": {"socket_timeout": 0}},
        {"download": {"speed": 1}},
        {"metadata_limits": {"targets": -1}},
        {"director_root": "missing.json"},
        {"image_root": "map.json"},
        {"repository_map": {"repositories": {}, "mapping": []}},
        {
            "secondaries": [
                {"serial": "ecu-z", "hardware_id": "x", "public_key": {"keytype": "rsa"}}
            ]
        },
    ],
)
def test_config_refuses_bad_values(tmp_path: Path, changes: dict[str, object]) -> None:
    with pytest.raises(ConfigError):
        PrimaryConfig.load(write_config(tmp_path, **changes))


def test_config_refuses_duplicate_serials(tmp_path: Path) -> None:
    key = public_key_dict(CryptoSigner.generate_ed25519().public_key)
    dup = [{"serial": "primary-1", "hardware_id": "hw-a", "public_key": key}]
    with pytest.raises(ConfigError, match="unique"):
        PrimaryConfig.load(write_config(tmp_path, secondaries=dup))


# --- download paths ----------------------------------------------------------------


def test_safe_target_path_keeps_images_inside_the_download_dir(tmp_path: Path) -> None:
    base = tmp_path / "images"
    base.mkdir()
    assert safe_target_path(base, "dir/app.wasm") == base.resolve() / "dir" / "app.wasm"
    for name in ["../x", "/etc/passwd", "a/../../x", ".", "a//b", "", "a/./b", "a\nb", "x" * 256]:
        with pytest.raises(UnsafeTargetPathError):
            safe_target_path(base, name)


# Names TUF accepts that the old per-segment pattern refused (issue 10, item 11).
ODD_NAMES = [
    "my app.wasm",
    "100%.wasm",
    "a%2F..%2Fx",
    "..%2Fevil.wasm",
    "a\\..\\evil",
    "user@host.wasm",
    "~tilde/x.wasm",
    "_leading.wasm",
    ".hidden",
    "dir/..hidden",
    "ünïcode.wasm",
    "x" * 255,
]


def test_safe_target_path_maps_every_tuf_name_to_its_own_file_inside(tmp_path: Path) -> None:
    """Free-form names are accepted and mapped one-to-one to plain files under the base."""
    base = tmp_path / "images"
    base.mkdir()
    paths = [safe_target_path(base, name) for name in ODD_NAMES]
    assert len(set(paths)) == len(ODD_NAMES)
    for name, path in zip(ODD_NAMES, paths, strict=True):
        assert path.is_relative_to(base.resolve()) and path != base.resolve()
        rel = path.relative_to(base.resolve())
        assert len(rel.parts) == name.count("/") + 1  # no segment added or merged
        assert all(not part.startswith(".") and len(part.encode()) <= 200 for part in rel.parts)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(name.encode())  # a real file system takes it
    assert sorted(p.name for p in base.iterdir() if p.is_file()) == sorted(
        p.name for p in paths if p.parent == base.resolve()
    )


def test_safe_target_path_refuses_escape_through_a_symlink(tmp_path: Path) -> None:
    """A name check_target_path accepts can still leave through a symlinked directory."""
    base = tmp_path / "images"
    base.mkdir()
    (tmp_path / "outside").mkdir()
    os.symlink(tmp_path / "outside", base / "sub")
    with pytest.raises(UnsafeTargetPathError, match="outside"):
        safe_target_path(base, "sub/app.wasm")


# --- state directory -----------------------------------------------------------------


def test_state_commit_swaps_a_whole_generation(tmp_path: Path) -> None:
    state = PrimaryState(tmp_path / "s", SIGNER)
    first = state.current()
    scratch = state.begin()
    (scratch / "director" / "timestamp.json").write_bytes(b"new")
    state.write_installed(scratch, {"ecu-a": InstalledImage("a.wasm", 1, {"sha256": "00"}, 2)})
    before = tree_digest(state.trusted_dir)
    assert state.installed() == {}
    state.commit(scratch)
    assert tree_digest(state.trusted_dir) != before
    assert not first.exists() and state.current().name == "gen-000001"
    assert (state.current() / "director" / "timestamp.json").read_bytes() == b"new"
    assert (state.current() / "seal.json").is_file()
    assert state.installed()["ecu-a"].release_counter == 2
    # a stale scratch (trusted state moved on since) is refused
    stale = state.work_dir / "gen-000001"
    stale.mkdir(parents=True)
    with pytest.raises(RuntimeError):
        state.commit(stale)


def test_state_discard_and_restart_leave_trusted_state_alone(tmp_path: Path) -> None:
    state = PrimaryState(tmp_path / "s", SIGNER)
    before = tree_digest(state.trusted_dir)
    scratch = state.begin()
    (scratch / "image" / "timestamp.json").write_bytes(b"half-done")
    # power cut: the scratch and a half-moved generation stay behind
    (state.trusted_dir / "gen-000009").mkdir()
    again = PrimaryState(tmp_path / "s", SIGNER)
    assert tree_digest(again.trusted_dir) == before
    assert not scratch.exists()


def test_state_scratch_writes_never_reach_the_trusted_generation(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 16: ``begin`` hard-links the trusted files; every write replaces, none goes through."""
    state = PrimaryState(tmp_path / "s", SIGNER)
    scratch = state.begin()
    (scratch / "director" / "timestamp.json").write_bytes(b"v1")
    state.commit(scratch)
    trusted = state.current()
    before = tree_digest(trusted)
    scratch = state.begin()
    ts = scratch / "director" / "timestamp.json"
    assert ts.stat().st_ino == (trusted / "director" / "timestamp.json").stat().st_ino
    atomic_write(ts, b"v2")  # how ngclient and the state write: a new file renamed over
    state.write_installed(scratch, {"ecu-a": InstalledImage("a.wasm", 1, {"sha256": "00"}, 2)})

    # power cut once the scratch is sealed, before it is moved into place
    def cut(_root: Path) -> None:
        raise OSError("power cut")

    monkeypatch.setattr(state_module, "_fsync_tree", cut)
    with pytest.raises(OSError, match="power cut"):
        state.commit(scratch)
    assert tree_digest(trusted) == before
    assert state.current() == trusted  # its seal still checks: not overwritten through a link
    assert (trusted / "director" / "timestamp.json").read_bytes() == b"v1"
    assert state.installed() == {}


def test_state_scratch_is_a_copy_where_hard_links_fail(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    state = PrimaryState(tmp_path / "s", SIGNER)
    scratch = state.begin()
    (scratch / "image" / "root_history").mkdir()
    (scratch / "image" / "root_history" / "1.root.json").write_bytes(b"root1")
    os.symlink("root_history/1.root.json", scratch / "image" / "root.json")
    state.commit(scratch)

    def no_links(*_args: object, **_kwargs: object) -> None:
        raise OSError("no hard links here")

    monkeypatch.setattr(os, "link", no_links)
    scratch = state.begin()
    trusted = state.current()
    assert tree_digest(scratch) == tree_digest(trusted)
    assert os.readlink(scratch / "image" / "root.json") == "root_history/1.root.json"
    copied = scratch / "image" / "root_history" / "1.root.json"
    assert copied.stat().st_ino != (trusted / "image/root_history/1.root.json").stat().st_ino
    state.commit(scratch)
    assert (state.current() / "image" / "root.json").read_bytes() == b"root1"


def test_state_seal_catches_every_change_outside_the_primary(tmp_path: Path) -> None:
    """Issue 10 item 6: edited, added, removed, renamed: all StateError when read."""
    state = PrimaryState(tmp_path / "s", SIGNER)
    state.update_installed({"ecu-a": InstalledImage("a.wasm", 1, {"sha256": "00"}, 2)})
    gen = state.current()

    def tampered(change: Callable[[], None], undo: Callable[[], None]) -> None:
        change()
        with pytest.raises(StateError):
            state.begin()
        undo()
        state.begin()  # back as sealed: fine again
        state.discard(state.work_dir / "gen-000002")

    ts = gen / "image" / "timestamp.json"
    tampered(lambda: ts.write_bytes(b"{}"), lambda: ts.unlink())
    inst = gen / "installed.json"
    good = inst.read_bytes()
    tampered(
        lambda: inst.write_bytes(good.replace(b'"release_counter": 2', b'"release_counter": 0')),
        lambda: inst.write_bytes(good),
    )
    tampered(lambda: inst.unlink(), lambda: inst.write_bytes(good))
    with pytest.raises(StateError):  # installed() alone checks its file
        inst.write_bytes(b"{}")
        state.installed()
    inst.write_bytes(good)
    seal = gen / "seal.json"
    sealed = seal.read_bytes()
    other = PrimaryState(tmp_path / "t", CryptoSigner.generate_ed25519())  # another key's seal
    tampered(
        lambda: seal.write_bytes((other.current() / "seal.json").read_bytes()),
        lambda: seal.write_bytes(sealed),
    )
    # the very payload this state sealed under a broken signature: other bytes than the
    # state wrote or authenticated, so authenticated again (issue 16), and refused
    envelope = json.loads(sealed)
    sig = envelope["signature"]["sig"]
    envelope["signature"]["sig"] = ("1" if sig[0] == "0" else "0") + sig[1:]
    tampered(
        lambda: seal.write_bytes(json.dumps(envelope).encode()),
        lambda: seal.write_bytes(sealed),
    )
    # a generation renamed (the current link pointed at an older number) is refused
    os.replace(gen, state.trusted_dir / "gen-000000")
    os.replace(state.trusted_dir / "current", state.trusted_dir / "old")
    os.symlink("gen-000000", state.trusted_dir / "current")
    with pytest.raises(StateError, match="another generation"):
        state.current()


def test_keep_metadata_commits_only_the_named_files(tmp_path: Path) -> None:
    """Issue 10 item 8: a failed cycle keeps verified metadata, nothing else."""
    state = PrimaryState(tmp_path / "s", SIGNER)
    scratch = state.begin()
    (scratch / "image" / "root_history").mkdir()
    (scratch / "image" / "root_history" / "2.root.json").write_bytes(b"root2")
    os.symlink("root_history/2.root.json", scratch / "image" / "root.json")
    (scratch / "image" / "role.json").write_bytes(b"delegated")
    state.write_installed(scratch, {"ecu-a": InstalledImage("a.wasm", 1, {"sha256": "00"}, 9)})
    keep = {"image": ("root_history", "root.json", "timestamp.json")}
    assert state.keep_metadata(scratch, keep)
    current = state.current()
    assert (current / "image" / "root.json").read_bytes() == b"root2"
    assert not (current / "image" / "role.json").exists()
    assert state.installed() == {}
    assert not scratch.exists()
    again = state.begin()
    assert not state.keep_metadata(again, keep)  # nothing new: no new generation
    assert state.current() == current


def test_report_state_round_trips_and_bounds_its_contents(tmp_path: Path) -> None:
    state = PrimaryState(tmp_path / "s", SIGNER)
    rs = ReportState(report_counter=7)
    rs.note_failure([ATTACK_FREEZE, ATTACK_FREEZE, "not-an-attack"], "metadataRejected", "x" * 2000)
    state.save_reports(rs)
    loaded = state.reports()
    assert loaded.report_counter == 7
    assert loaded.attacks == [ATTACK_FREEZE]
    assert loaded.last_result == "metadataRejected" and len(loaded.last_result_text) == 500
    rs.note_failure([], "noSuchCode", "")
    assert rs.last_result == "internalError"


# --- the in-memory secondary -----------------------------------------------------------


def test_in_memory_secondary_signs_fresh_reports() -> None:
    signer = CryptoSigner.generate_ed25519()
    ecu = InMemorySecondary("ecu-a", "hw-a", signer)
    assert isinstance(ecu, SecondaryClient)
    first = SignedEcuVersionReport.from_der(ecu.version_report(b"n1")).verify(signer.public_key)
    second = SignedEcuVersionReport.from_der(ecu.version_report(b"n2")).verify(signer.public_key)
    assert (first.nonce, second.nonce) == (b"n1", b"n2")
    assert second.report_counter == first.report_counter + 1


# --- distribution: partial bundle installation (4.3.3) ---------------------------------


def bundle_primary(
    tmp_path: Path, linked: tuple[str, ...] = ("ecu-a", "ecu-b")
) -> tuple[Primary, dict[str, InMemorySecondary], CycleResult]:
    """A primary with secondaries ecu-a and ecu-b and a verified bundle updating both."""
    signers = {s: CryptoSigner.generate_ed25519() for s in ("ecu-a", "ecu-b")}
    entries = [
        {"serial": s, "hardware_id": f"hw-{s[-1]}", "public_key": public_key_dict(k.public_key)}
        for s, k in signers.items()
    ]
    config = PrimaryConfig.load(write_config(tmp_path, secondaries=entries))
    ecus = {s: InMemorySecondary(s, f"hw-{s[-1]}", k) for s, k in signers.items()}
    updates = {}
    for serial in ecus:
        data = f"image for {serial}".encode()
        path = tmp_path / f"{serial}.wasm"
        path.write_bytes(data)
        target = UptaneTarget(
            name=f"{serial}.wasm",
            length=len(data),
            hashes={"sha256": hashlib.sha256(data).hexdigest()},
            hardware_ids=(f"hw-{serial[-1]}",),
            release_counter=2,
            ecu_serial=serial,
        )
        updates[serial] = EcuUpdate(serial, f"hw-{serial[-1]}", target, path, (), (), b"", 1)
    primary = Primary(config, [ecus[s] for s in linked])
    return primary, ecus, CycleResult(ok=True, updates=updates)


@pytest.mark.parametrize(
    "error",
    [
        TransportError("bus off"),
        TransferFailedError("ecu-b: image transfer failed 4 times", 128),
        SecondaryRefusedError("imageMismatch", "no space left", "image offer"),
    ],
)
def test_distribute_reports_a_partly_installed_bundle(tmp_path: Path, error: Exception) -> None:
    """ecu-a installs its part of the bundle, ecu-b's transfer fails: the Director must hear."""
    primary, ecus, result = bundle_primary(tmp_path)
    ecus["ecu-b"].fail_with = error
    outcomes = primary.distribute(result)
    assert isinstance(outcomes["ecu-a"], EcuVersionReport)
    assert outcomes["ecu-b"] is error
    assert primary.installed()["ecu-a"].filename == "ecu-a.wasm"
    report = primary.own_report().report
    assert ATTACK_PARTIAL_BUNDLE in report.attacks_detected
    assert report.last_result == "ok"  # the primary's own result is untouched
    assert ATTACK_PARTIAL_BUNDLE in primary.report_state().attacks


def test_distribute_counts_a_secondary_without_link_as_failed(tmp_path: Path) -> None:
    primary, _, result = bundle_primary(tmp_path, linked=("ecu-a",))
    assert set(primary.distribute(result)) == {"ecu-a"}
    assert ATTACK_PARTIAL_BUNDLE in primary.own_report().report.attacks_detected


@pytest.mark.parametrize(
    ("fail_a", "fail_b"),
    [
        (None, None),  # whole bundle installed
        (TransportError("down"), TransportError("down")),  # nothing installed: not partial
        (None, ImageMismatchError("bad image")),  # a failure that names its own attack
    ],
)
def test_distribute_does_not_report_a_bundle_that_is_not_partial(
    tmp_path: Path, fail_a: Exception | None, fail_b: Exception | None
) -> None:
    primary, ecus, result = bundle_primary(tmp_path)
    ecus["ecu-a"].fail_with, ecus["ecu-b"].fail_with = fail_a, fail_b
    primary.distribute(result)
    assert ATTACK_PARTIAL_BUNDLE not in primary.own_report().report.attacks_detected


def test_distribute_counts_only_installs_that_took(tmp_path: Path) -> None:
    """A secondary that answers but still runs its old image has not installed anything."""
    primary, ecus, result = bundle_primary(tmp_path)
    result.updates["ecu-a"].image_path.write_bytes(b"corrupted on disk")
    ecus["ecu-b"].fail_with = TransportError("down")
    outcomes = primary.distribute(result)
    assert isinstance(outcomes["ecu-a"], EcuVersionReport) and outcomes["ecu-a"].installed is None
    assert ATTACK_PARTIAL_BUNDLE not in primary.own_report().report.attacks_detected

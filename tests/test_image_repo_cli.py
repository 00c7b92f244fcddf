"""``uptane image-repo`` offline operations and their refusals (Uptane 2.1, 5.3)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import wasmtime
from click.testing import CliRunner, Result
from tuf.api.metadata import Metadata, Root, Snapshot, Targets, Timestamp

from image_repo.layout import CONFIG_FILE
from image_repo.repo import ImageRepository
from uptane.cli import cli as uptane_cli
from uptane.errors import RepositoryEditError
from uptane.keys import KeyRef, generate_ed25519
from uptane.repository import ExpiryPolicy

# the smallest apps a secondary loads: no capability, memory + self_test + tick
MINIMAL = """(module (memory (export "memory") 1)
  (func (export "self_test") (result i32) (i32.const 0))
  (func (export "tick") (param i64) (result i64) (local.get 0)) %s)"""
WASM = bytes(wasmtime.wat2wasm(MINIMAL % ""))
WASM2 = bytes(wasmtime.wat2wasm(MINIMAL % '(func (export "version") (result i32) (i32.const 2))'))
# imports exactly what --capability log --capability sensor.read grant
LOG_SENSOR = """(module
  (import "uptane" "log" (func (param i32 i32)))
  (import "uptane" "sensor_read" (func (param i32) (result i64)))
  (memory (export "memory") 1)
  (func (export "self_test") (result i32) (i32.const 0))
  (func (export "tick") (param i64) (result i64) (call 1 (i32.const 0))))"""


def words(text: str) -> list[str]:
    """Command-line arguments written as one string."""
    return text.split()


Run = Callable[..., Result]


def tree(path: Path) -> dict[str, str]:
    """Every file under ``path`` (hidden ones too) with its sha256."""
    return {
        str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(path.rglob("*"))
        if p.is_file()
    }


def md(repo: Path, filename: str) -> Metadata[Any]:
    return Metadata.from_bytes((repo / "metadata" / filename).read_bytes())


def version(repo: Path, role: str) -> int:
    return int(md(repo, f"{role}.json").signed.version)


@pytest.fixture
def run() -> Run:
    runner = CliRunner()

    def invoke(*args: object) -> Result:
        return runner.invoke(uptane_cli, ["image-repo", *map(str, args)])

    return invoke


@pytest.fixture
def app(tmp_path: Path) -> Path:
    p = tmp_path / "app.wasm"
    p.write_bytes(WASM)
    return p


@pytest.fixture
def repo(tmp_path: Path, run: Run) -> Path:
    d = tmp_path / "repo"
    result = run("init", d)
    assert result.exit_code == 0, result.output
    return d


@pytest.fixture
def supplier_repo(repo: Path, run: Run) -> Path:
    result = run(
        "delegate",
        repo,
        "acme",
        *words("--path acme/* --hardware-id brake-ecu --hardware-id abs-ecu"),
    )
    assert result.exit_code == 0, result.output
    return repo


def ok(result: Result) -> Result:
    assert result.exit_code == 0, result.output
    return result


# --- init ----------------------------------------------------------------------


def test_init_creates_keys_config_and_version_1(repo: Path) -> None:
    names = sorted(p.name for p in (repo / "metadata").iterdir())
    for role in ("root", "targets", "snapshot"):
        assert f"1.{role}.json" in names
    assert "timestamp.json" in names
    root = md(repo, "1.root.json").signed
    assert isinstance(root, Root)
    assert root.consistent_snapshot is True
    assert root.roles["root"].threshold == 2 and len(root.roles["root"].keyids) == 2
    assert root.roles["targets"].threshold == 2 and len(root.roles["targets"].keyids) == 2
    assert len(root.roles["snapshot"].keyids) == len(root.roles["timestamp"].keyids) == 1
    config = json.loads((repo / CONFIG_FILE).read_text())
    for role in ("root", "targets", "snapshot", "timestamp"):
        refs = [KeyRef.from_dict(r) for r in config["roles"][role]]
        assert [r.keyid for r in refs] == root.roles[role].keyids
        assert all(r.uri.startswith("file2:") and Path(r.uri[6:]).is_file() for r in refs)
    for role in ("root", "targets", "snapshot", "timestamp"):
        assert ImageRepository(repo).status().role(role).signed


def test_init_keys_dir_outside_repo(tmp_path: Path, run: Run) -> None:
    ok(run("init", tmp_path / "r", "--keys-dir", tmp_path / "offline"))
    assert (tmp_path / "offline" / "root-1.pem").is_file()
    assert not (tmp_path / "r" / "keys").exists()


def test_init_refuses_non_empty_dir(tmp_path: Path, run: Run, repo: Path) -> None:
    before = tree(repo)
    result = run("init", repo)
    assert result.exit_code != 0
    assert "not an empty directory" in result.output
    assert tree(repo) == before


def test_commands_refuse_a_dir_that_is_not_a_repository(tmp_path: Path, run: Run) -> None:
    result = run("status", tmp_path)
    assert result.exit_code != 0
    assert "is not an image repository" in result.output


# --- add -------------------------------------------------------------------------


def test_add_publishes_hash_prefixed_image_with_custom_fields(
    repo: Path, run: Run, tmp_path: Path
) -> None:
    app = tmp_path / "app.wasm"
    app.write_bytes(wasm := bytes(wasmtime.wat2wasm(LOG_SENSOR)))
    args = (
        "--name body/app.wasm --hardware-id door-ecu --hardware-id seat-ecu --release-counter 7 "
        "--capability log --capability sensor.read --fuel 5000 --memory-pages 2"
    )
    ok(run("add", repo, app, *words(args)))
    sha = hashlib.sha256(wasm).hexdigest()
    assert (repo / "targets" / "body" / f"{sha}.app.wasm").read_bytes() == wasm
    targets = md(repo, "2.targets.json").signed
    assert isinstance(targets, Targets)
    target = targets.targets["body/app.wasm"]
    assert target.length == len(wasm) and target.hashes["sha256"] == sha
    assert target.custom["hardware_ids"] == ["door-ecu", "seat-ecu"]
    assert target.custom["release_counter"] == 7
    assert target.custom["capabilities"] == ["log", "sensor.read"]
    assert target.custom["limits"]["fuel_per_call"] == 5000
    assert target.custom["limits"]["memory_pages"] == 2
    snapshot = md(repo, "2.snapshot.json").signed
    assert isinstance(snapshot, Snapshot)
    assert snapshot.meta["targets.json"].version == 2
    timestamp = md(repo, "timestamp.json").signed
    assert isinstance(timestamp, Timestamp)
    assert timestamp.snapshot_meta.version == 2


def test_add_default_name_is_basename_and_equal_counter_is_allowed(
    repo: Path, run: Run, app: Path, tmp_path: Path
) -> None:
    ok(run("add", repo, app, "--hardware-id", "hw", "--release-counter", 3))
    newer = tmp_path / "build" / "app.wasm"
    newer.parent.mkdir()
    newer.write_bytes(WASM2)
    ok(run("add", repo, newer, "--hardware-id", "hw", "--release-counter", 3))
    target = ImageRepository(repo).targets()["app.wasm"][1]
    assert target.hashes["sha256"] == hashlib.sha256(WASM2).hexdigest()


def test_add_to_supplier_role_signs_it_with_the_supplier_key(
    supplier_repo: Path, run: Run, app: Path
) -> None:
    top_before = version(supplier_repo, "targets")
    args = "--name acme/brake.wasm --hardware-id brake-ecu --release-counter 1 --role acme"
    ok(run("add", supplier_repo, app, *words(args)))
    assert version(supplier_repo, "targets") == top_before  # only the supplier role changed
    acme = md(supplier_repo, "acme.json")
    assert "acme/brake.wasm" in acme.signed.targets
    status = ImageRepository(supplier_repo).status()
    assert status.role("acme").signed and status.role("acme").version == 2
    supplier_key = json.loads((supplier_repo / CONFIG_FILE).read_text())["roles"]["acme"][0]
    assert set(acme.signatures) == {KeyRef.from_dict(supplier_key).keyid}


REFUSALS = [
    pytest.param(
        [("app.wasm", ["--release-counter", 5])],
        ["--release-counter", 4],
        "lower than 5",
        id="release-counter-rollback",
    ),
    pytest.param(
        [
            (
                "app.wasm",
                words("--release-counter 5 --name acme/x.wasm --role acme --hardware-id brake-ecu"),
            )
        ],
        ["--release-counter", 4, "--name", "acme/x.wasm"],
        "already published by role 'acme'",
        id="release-counter-rollback-other-role",
    ),
    pytest.param(
        [], ["--capability", "network.raw"], "'network.raw' is not one of", id="capability"
    ),
    pytest.param([], ["--name", "../evil.wasm"], "not a plain relative path", id="dotdot"),
    pytest.param([], ["--name", "/etc/evil.wasm"], "not a plain relative path", id="absolute"),
    pytest.param([], ["--name", "a\\evil.wasm"], "not a plain relative path", id="backslash"),
    pytest.param([], ["--name", "a//evil.wasm"], "not a plain relative path", id="empty-seg"),
    pytest.param([], ["--name", "a/.hidden"], "not a plain relative path", id="hidden"),
    pytest.param(
        [],
        ["--role", "acme", "--name", "other/x.wasm", "--hardware-id", "brake-ecu"],
        "outside its delegation",
        id="delegation-path",
    ),
    pytest.param(
        [], ["--role", "acme", "--name", "acme/x.wasm"], "hardware ids", id="delegation-hw"
    ),
    pytest.param([], ["--role", "nosuch"], "unknown role 'nosuch'", id="unknown-role"),
    pytest.param([], ["--role", "snapshot"], "not a targets role", id="not-targets-role"),
    pytest.param([], ["--fuel", 0], "'--fuel'", id="bad-limits"),
    pytest.param([], ["--hardware-id", "bad id!"], "hardware id", id="bad-hardware-id"),
]


@pytest.mark.parametrize(("setup", "args", "message"), REFUSALS)
def test_add_refusals_leave_repository_unchanged(
    supplier_repo: Path,
    run: Run,
    app: Path,
    setup: list[tuple[str, list[object]]],
    args: list[object],
    message: str,
) -> None:
    for _, extra in setup:
        base = [] if "--hardware-id" in extra else ["--hardware-id", "hw"]
        ok(run("add", supplier_repo, app, *base, *extra))
    before = tree(supplier_repo)
    defaults: list[object] = [] if "--hardware-id" in args else ["--hardware-id", "hw"]
    if "--release-counter" not in args:
        defaults += ["--release-counter", 1]
    result = run("add", supplier_repo, app, *defaults, *args)
    assert result.exit_code != 0
    assert message in result.output
    assert result.output.startswith("Error: ") and len(result.output.splitlines()) == 1
    assert tree(supplier_repo) == before


@pytest.mark.parametrize(
    "content",
    [b"not a wasm module", b"\0asm\1\0\0\0\xff\xff", WASM[:6], b""],
    ids=["text", "bad-section", "truncated", "empty"],
)
def test_add_refuses_invalid_wasm(repo: Path, run: Run, tmp_path: Path, content: bytes) -> None:
    bad = tmp_path / "bad.wasm"
    bad.write_bytes(content)
    before = tree(repo)
    result = run("add", repo, bad, "--hardware-id", "hw", "--release-counter", 1)
    assert result.exit_code != 0
    assert "not a valid WebAssembly module" in result.output
    assert tree(repo) == before


def test_add_refused_when_a_threshold_key_is_missing(repo: Path, run: Run, app: Path) -> None:
    (repo / "keys" / "targets-2.pem").unlink()
    before = tree(repo)
    result = run("add", repo, app, "--hardware-id", "hw", "--release-counter", 1)
    assert result.exit_code != 0
    assert "cannot sign role 'targets'" in result.output
    assert "targets-2.pem" in result.output
    assert tree(repo) == before


# --- delegate ------------------------------------------------------------------------


def test_delegate_adds_terminating_role_with_hardware_ids(supplier_repo: Path) -> None:
    targets = md(supplier_repo, "targets.json").signed
    assert isinstance(targets, Targets)
    assert targets.delegations is not None and targets.delegations.roles is not None
    role = targets.delegations.roles["acme"]
    assert role.terminating and role.paths == ["acme/*"] and role.threshold == 1
    assert role.unrecognized_fields["custom"]["hardware_ids"] == ["brake-ecu", "abs-ecu"]
    assert (supplier_repo / "keys" / "acme-1.pem").is_file()
    assert md(supplier_repo, "1.acme.json").signed.targets == {}
    snapshot = md(supplier_repo, "snapshot.json").signed
    assert isinstance(snapshot, Snapshot)
    assert snapshot.meta["acme.json"].version == 1


def test_delegate_with_external_key_and_threshold(repo: Path, run: Run, tmp_path: Path) -> None:
    k1 = generate_ed25519(tmp_path / "supplier", "s1")
    k2 = generate_ed25519(tmp_path / "supplier", "s2")
    keys = [
        "--key",
        tmp_path / "supplier" / "s1.pub.json",
        "--key",
        tmp_path / "supplier" / "s2.pub.json",
    ]
    ok(
        run(
            "delegate",
            repo,
            "tier1",
            *words("--path tier1/* --hardware-id hw --threshold 2"),
            *keys,
        )
    )
    status = ImageRepository(repo).status().role("tier1")
    assert set(status.keyids) == {k1.keyid, k2.keyid}
    assert status.threshold == 2 and status.valid_signatures == 2
    assert not list((repo / "keys").glob("tier1*"))


def test_delegate_external_public_key_only_defers_the_role(
    repo: Path, run: Run, tmp_path: Path, app: Path
) -> None:
    generate_ed25519(tmp_path / "supplier", "s1")
    pem = tmp_path / "supplier" / "s1.pem"
    held = pem.read_bytes()
    pem.unlink()  # the supplier keeps the private key
    key = ["--key", tmp_path / "supplier" / "s1.pub.json"]
    ok(run("delegate", repo, "tier1", *words("--path tier1/* --hardware-id hw"), *key))
    assert not (repo / "metadata" / "tier1.json").exists()
    args = ["--name", "tier1/a.wasm", "--role", "tier1", "--hardware-id", "hw"]
    before = tree(repo)
    result = run("add", repo, app, "--release-counter", 1, *args)
    assert result.exit_code != 0 and "cannot sign role 'tier1'" in result.output
    assert tree(repo) == before
    pem.write_bytes(held)  # the supplier signs
    ok(run("add", repo, app, "--release-counter", 1, *args))
    assert ImageRepository(repo).status().role("tier1").signed


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["acme", "--path", "x/*", "--hardware-id", "hw"], "already exists"),
        (["targets", "--path", "x/*", "--hardware-id", "hw"], "top-level role"),
        (["bad/name", "--path", "x/*", "--hardware-id", "hw"], "role name"),
        (["new", "--path", "../*", "--hardware-id", "hw"], "path pattern"),
        (["new", "--path", "/abs/*", "--hardware-id", "hw"], "path pattern"),
        (["new", "--path", "x/*", "--hardware-id", "h w"], "hardware id"),
        (["new", "--path", "x/*", "--hardware-id", "a", "--hardware-id", "a"], "distinct"),
    ],
    ids=["exists", "top-level", "name", "dotdot", "absolute", "hw", "dup-hw"],
)
def test_delegate_refusals(supplier_repo: Path, run: Run, args: list[str], message: str) -> None:
    before = tree(supplier_repo)
    result = run("delegate", supplier_repo, *args)
    assert result.exit_code != 0
    assert message in result.output
    assert tree(supplier_repo) == before


def test_delegate_refuses_threshold_above_keys(repo: Path, run: Run, tmp_path: Path) -> None:
    generate_ed25519(tmp_path, "s1")
    before = tree(repo)
    key = ["--key", tmp_path / "s1.pub.json"]
    result = run("delegate", repo, "s", *words("--path s/* --hardware-id hw --threshold 2"), *key)
    assert result.exit_code != 0 and "cannot be reached" in result.output
    assert tree(repo) == before


# --- remove / resign / status --------------------------------------------------------------


def test_remove_target_and_refuse_unknown(repo: Path, run: Run, app: Path) -> None:
    ok(run("add", repo, app, "--hardware-id", "hw", "--release-counter", 1))
    ok(run("remove", repo, "app.wasm"))
    assert "app.wasm" not in md(repo, "targets.json").signed.targets
    before = tree(repo)
    result = run("remove", repo, "app.wasm")
    assert result.exit_code != 0 and "does not publish 'app.wasm'" in result.output
    assert tree(repo) == before


def test_removed_image_keeps_its_release_counter(repo: Path, run: Run, app: Path) -> None:
    """Removing an image and re-adding it cannot lower its release counter (5.3.3)."""
    ok(run("add", repo, app, "--hardware-id", "hw", "--release-counter", 5))
    ok(run("remove", repo, "app.wasm"))
    before = tree(repo)
    result = run("add", repo, app, "--hardware-id", "hw", "--release-counter", 4)
    assert result.exit_code != 0 and "lower than 5" in result.output
    assert tree(repo) == before
    ok(run("add", repo, app, "--hardware-id", "hw", "--release-counter", 5))


def test_resign_defaults_to_snapshot_and_timestamp(repo: Path, run: Run) -> None:
    versions = {r: version(repo, r) for r in ("root", "targets", "snapshot", "timestamp")}
    ok(run("resign", repo))
    assert version(repo, "root") == versions["root"]
    assert version(repo, "targets") == versions["targets"]
    assert version(repo, "snapshot") == versions["snapshot"] + 1
    assert version(repo, "timestamp") == versions["timestamp"] + 1
    ok(run("resign", repo, "--role", "targets", "--role", "root"))
    assert version(repo, "root") == 2 and version(repo, "targets") == 2
    assert md(repo, "snapshot.json").signed.meta["targets.json"].version == 2
    result = run("resign", repo, "--role", "nosuch")
    assert result.exit_code != 0 and "unknown role" in result.output


def test_resign_expires_in_counts_from_the_repository_clock(tmp_path: Path) -> None:
    now = datetime(2030, 1, 1, tzinfo=UTC)
    repo = ImageRepository.init(tmp_path / "r", clock=lambda: now, expiry=ExpiryPolicy())
    repo.resign(["targets", "timestamp"], expires_in=timedelta(days=30))
    status = repo.status()
    assert status.role("targets").expires == now + timedelta(days=30)
    assert status.role("timestamp").expires == now + timedelta(days=30)
    assert status.role("snapshot").expires == now + ExpiryPolicy().snapshot
    with pytest.raises(RepositoryEditError):
        repo.resign(expires_in=timedelta(0))


def test_status_lists_roles_and_targets(supplier_repo: Path, run: Run, app: Path) -> None:
    ok(run("add", supplier_repo, app, "--hardware-id", "hw", "--release-counter", 4))
    text = ok(run("status", supplier_repo)).output
    for word in ("root", "targets", "snapshot", "timestamp", "acme", "app.wasm", "acme/*"):
        assert word in text
    data = json.loads(ok(run("status", supplier_repo, "--json")).output)
    names = {r["name"] for r in data["roles"]}
    assert names == {"root", "targets", "snapshot", "timestamp", "acme"}
    assert all(r["signed"] for r in data["roles"])
    [target] = data["targets"]
    assert target["name"] == "app.wasm" and target["custom"]["release_counter"] == 4


# --- rotate-key ---------------------------------------------------------------------------


def test_rotate_targets_key(repo: Path, run: Run) -> None:
    old = md(repo, "root.json").signed.roles["targets"].keyids[0]
    ok(run("rotate-key", repo, "targets", "--old", old[:16]))
    root = md(repo, "2.root.json").signed
    assert old not in root.roles["targets"].keyids and len(root.roles["targets"].keyids) == 2
    targets = md(repo, "targets.json")
    assert targets.signed.version == 2 and old not in targets.signatures
    root.verify_delegate("targets", targets.signed_bytes, targets.signatures)
    config = json.loads((repo / CONFIG_FILE).read_text())
    assert old in [r["public"]["keyid"] for r in config["retired"]]
    assert old not in [r["public"]["keyid"] for r in config["roles"]["targets"]]


def test_rotate_supplier_key(supplier_repo: Path, run: Run, tmp_path: Path) -> None:
    new = generate_ed25519(tmp_path, "acme-next")
    old = ImageRepository(supplier_repo).status().role("acme").keyids[0]
    new_key = ["--new-key", tmp_path / "acme-next.pub.json"]
    ok(run("rotate-key", supplier_repo, "acme", "--old", old, *new_key))
    acme = ImageRepository(supplier_repo).status().role("acme")
    assert acme.keyids == (new.keyid,) and acme.signed
    assert set(md(supplier_repo, "acme.json").signatures) == {new.keyid}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["root", "--old", "ffff"], "matches 0 key(s)"),
        (["root", "--old", ""], "matches 0 key(s)"),
        (["nosuch", "--old", "ab"], "unknown role"),
    ],
)
def test_rotate_key_refusals(repo: Path, run: Run, args: list[str], message: str) -> None:
    before = tree(repo)
    result = run("rotate-key", repo, *args)
    assert result.exit_code != 0 and message in result.output
    assert tree(repo) == before


def test_rotate_key_refuses_a_key_already_in_the_role(repo: Path, run: Run) -> None:
    keyids = md(repo, "root.json").signed.roles["root"].keyids
    before = tree(repo)
    new_key = ["--new-key", repo / "keys" / "root-2.pub.json"]
    result = run("rotate-key", repo, "root", "--old", keyids[0], *new_key)
    assert result.exit_code != 0 and "already signs role 'root'" in result.output
    assert tree(repo) == before


def test_root_rotation_refused_without_a_threshold_of_old_root_keys(repo: Path, run: Run) -> None:
    """The new root alone would be fully signed (root-2 + new key); the old one is not."""
    keyids = md(repo, "root.json").signed.roles["root"].keyids
    config = json.loads((repo / CONFIG_FILE).read_text())
    root1 = next(KeyRef.from_dict(r) for r in config["roles"]["root"] if r["uri"].endswith("1.pem"))
    Path(root1.uri.removeprefix("file2:")).unlink()
    assert root1.keyid in keyids
    before = tree(repo)
    result = run("rotate-key", repo, "root", "--old", root1.keyid)
    assert result.exit_code != 0
    assert "keys of the root it replaces" in result.output
    assert tree(repo) == before


# --- the module ABI, checked at add ------------------------------------------------

WAT_DIR = Path(__file__).parent / "wat"


def _module(tmp_path: Path, wat: str) -> Path:
    p = tmp_path / "m.wasm"
    p.write_bytes(bytes(wasmtime.wat2wasm(wat)))
    return p


ABI_REFUSALS = [
    pytest.param(
        LOG_SENSOR, ["--capability", "log"], "needs capability 'sensor.read'", id="missing"
    ),
    pytest.param(MINIMAL % "", ["--capability", "health"], "drop --capability health", id="unused"),
    pytest.param(
        """(module (memory (export "memory") 1)
          (func (export "self_test") (result i32) (i32.const 0)))""",
        [],
        "does not export function tick(i64) -> (i64)",
        id="no-tick",
    ),
    pytest.param(
        """(module (func (export "self_test") (result i32) (i32.const 0))
          (func (export "tick") (param i64) (result i64) (local.get 0)))""",
        [],
        "does not export its memory",
        id="no-memory",
    ),
    pytest.param(
        MINIMAL.replace(
            "(param i64) (result i64) (local.get 0)", "(param i32) (result i32) (local.get 0)"
        )
        % "",
        [],
        "export tick must have signature (i64) -> (i64)",
        id="tick-signature",
    ),
    pytest.param(
        '(module (import "env" "abort" (func)) ' + MINIMAL[len("(module ") :] % "",
        [],
        "import env.abort is not a host function",
        id="foreign-import",
    ),
    pytest.param(
        '(module (import "uptane" "log" (func (param i32))) ' + MINIMAL[len("(module ") :] % "",
        ["--capability", "log"],
        "import uptane.log must have signature (i32, i32) -> ()",
        id="import-signature",
    ),
    pytest.param(
        MINIMAL.replace('(memory (export "memory") 1)', '(memory (export "memory") 4)') % "",
        ["--memory-pages", "2"],
        "needs 4 memory pages, --memory-pages is 2",
        id="memory",
    ),
]


@pytest.mark.parametrize(("wat", "args", "message"), ABI_REFUSALS)
def test_add_checks_the_module_against_what_is_signed(
    repo: Path, run: Run, tmp_path: Path, wat: str, args: list[str], message: str
) -> None:
    module = _module(tmp_path, wat)
    before = tree(repo)
    result = run("add", repo, module, "--hardware-id", "hw", "--release-counter", 1, *args)
    assert result.exit_code == 1, result.output
    assert message in result.output
    assert result.output.startswith("Error: ") and len(result.output.splitlines()) == 1
    assert tree(repo) == before


def test_add_help_lists_capabilities_abi_and_a_minimal_app(
    run: Run, repo: Path, tmp_path: Path
) -> None:
    from image_repo.abi import MINIMAL_WAT

    text = run("add", "--help").output
    for word in (
        "log",
        "health",
        "sensor.read",
        "actuator.write",
        "sensor_read",
        "actuator_write",
        "self_test",
        "tick",
        "version",
        "memory",
        "docs/wasm-abi.md",
    ):
        assert word in text
    for line in MINIMAL_WAT.splitlines():
        assert line.strip() in text
    # the minimal app of the help is accepted, and a secondary loads it
    ok(
        run(
            "add",
            repo,
            _module(tmp_path, MINIMAL_WAT),
            "--hardware-id",
            "hw",
            "--release-counter",
            1,
        )
    )


@pytest.mark.parametrize("wat", sorted(WAT_DIR.glob("*.wat")), ids=lambda p: p.stem)
def test_abi_check_agrees_with_the_secondary_on_every_test_module(wat: Path) -> None:
    """What add refuses statically, a secondary refuses at compile (and vice versa)."""
    from ecus.secondary.wasm_host import WasmHost
    from image_repo.abi import HOST_FUNCTIONS, check_module
    from uptane.errors import WasmError
    from uptane.metadata import KNOWN_CAPABILITIES, Limits

    data = bytes(wasmtime.wat2wasm(wat.read_text()))
    limits = Limits()
    module = wasmtime.Module(wasmtime.Engine(), data)
    imported = {i.name for i in module.imports if i.module == "uptane"}
    # grant exactly what the module imports: only the ABI itself can refuse it
    caps = sorted({f.capability for f in HOST_FUNCTIONS if f.name in imported} & KNOWN_CAPABILITIES)
    try:
        WasmHost().compile(data, caps, limits)
        host_ok = True
    except WasmError:
        host_ok = False
    try:
        check_module(data, caps, limits)
        static_ok = True
    except WasmError:
        static_ok = False
    assert static_ok == host_ok

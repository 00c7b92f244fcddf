"""Operator mistakes on the command line: one line ``Error: ...``, exit 1, no traceback.

Also: ``uptane --help`` and each part's ``--help`` import none of the heavy
libraries (issue 11, start-up time), run in a fresh interpreter.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from uptane.cli import cli as uptane_cli
from uptane.keys import generate_ed25519

HEAVY = ("fastapi", "sqlalchemy", "wasmtime", "can", "tuf", "uvicorn", "alembic")
UNREACHABLE_PG = "postgresql+psycopg://postgres@127.0.0.1:1/test"


def invoke(*args: object) -> Result:
    return CliRunner().invoke(uptane_cli, [str(a) for a in args])


def one_error(result: Result, *needles: str, code: int = 1) -> str:
    """The result is exactly one ``Error: ...`` line containing ``needles``."""
    out = result.output
    assert result.exit_code == code, out
    assert "Traceback" not in out, out
    assert result.exception is None or isinstance(result.exception, SystemExit), out
    assert out.startswith("Error: ") and len(out.strip().splitlines()) == 1, out
    for needle in needles:
        assert needle in out, out
    assert out.count("Error") == 1, out
    return out


@pytest.mark.parametrize(
    "argv",
    [
        ["--help"],
        ["director", "--help"],
        ["director", "list", "--help"],
        ["image-repo", "--help"],
        ["image-repo", "add", "--help"],
        ["ecu", "--help"],
        ["ecu", "primary", "--help"],
    ],
    ids=" ".join,
)
def test_help_imports_no_heavy_library(argv: list[str]) -> None:
    code = (
        "import sys\n"
        "from uptane.cli import main\n"
        f"sys.argv = ['uptane', *{argv!r}]\n"
        "try:\n"
        "    main()\n"
        "except SystemExit as e:\n"
        "    assert e.code == 0, e.code\n"
        f"loaded = [m for m in {HEAVY!r} if m in sys.modules]\n"
        "print('LOADED', loaded)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert "LOADED []" in out, out.splitlines()[-1]
    assert "Usage: uptane" in out


def test_help_lists_every_part() -> None:
    out = invoke("--help").output
    for part in ("demo", "director", "ecu", "image-repo", "sim"):
        assert f"  {part}" in out


# --- Director: database URLs, paths ------------------------------------------------


@pytest.mark.parametrize(
    ("url", "needle"),
    [
        ("nonsense", "invalid database URL nonsense"),
        ("mysql://u@h/db", "no driver for the database mysql://u@h/db"),
        ("oracle+nosuch://x", "unsupported database"),
    ],
)
def test_director_init_checks_the_db_url_before_writing(
    tmp_path: Path, url: str, needle: str
) -> None:
    d = tmp_path / "director"
    one_error(invoke("director", "init", d, "--db", url), needle, "postgresql+psycopg://")
    assert not d.exists()


@pytest.fixture
def director_dir(tmp_path: Path) -> Path:
    d = tmp_path / "director"
    assert invoke("director", "init", d).exit_code == 0
    return d


@pytest.mark.parametrize(
    ("url", "needle"),
    [
        ("nonsense", "invalid database URL"),
        ("mysql://u@h/db", "module MySQLdb is not installed"),
        (UNREACHABLE_PG, "cannot use the database postgresql+psycopg://postgres@127.0.0.1:1"),
    ],
)
@pytest.mark.parametrize("command", ["list", "assign", "register", "serve"])
def test_director_commands_refuse_a_bad_db_in_one_line(
    director_dir: Path, tmp_path: Path, url: str, needle: str, command: str
) -> None:
    key = generate_ed25519(tmp_path / "keys", "p1")
    extra = {
        "list": [],
        "assign": ["x.wasm", "--hardware-id", "hw"],
        "register": [
            "--vin",
            "V1",
            "--primary",
            "P1",
            "--ecu",
            f"P1,gw,{tmp_path}/keys/p1.pub.json",
        ],
        "serve": ["--port", "0"],
    }[command]
    assert key.keyid
    one_error(invoke("director", command, director_dir, *extra, "--db", url), needle)


def test_director_paths(tmp_path: Path) -> None:
    a_file = tmp_path / "file"
    a_file.write_text("x")
    one_error(invoke("director", "init", a_file), "'DIR'", "is a file", code=2)
    one_error(invoke("director", "init", a_file / "d"), "Not a directory")
    one_error(invoke("director", "list", a_file), "'DIR'", "is a file", code=2)
    one_error(invoke("director", "serve", a_file), "'DIR'", "is a file", code=2)
    one_error(invoke("director", "list", tmp_path / "none"), "run `uptane director init")
    one_error(invoke("director", "init", "/proc/uptane-test/d"), "/proc/uptane-test")


def test_director_dir_is_positional_or_dir_option(director_dir: Path) -> None:
    for argv in (
        ["list", director_dir],
        ["list", "--dir", director_dir],
        ["list", f"--dir={director_dir}", "--json"],
    ):
        result = invoke("director", *argv)
        assert result.exit_code == 0, result.output


def test_director_register_and_assign_errors_name_the_option(
    director_dir: Path, tmp_path: Path
) -> None:
    bad = tmp_path / "bad.pub.json"
    bad.write_text(json.dumps({"keytype": "ed25519"}))
    out = one_error(
        invoke(
            "director",
            "register",
            director_dir,
            "--vin",
            "V",
            "--primary",
            "P",
            "--ecu",
            f"P,gw,{bad}",
        ),
        "--ecu",
        "invalid public key",
        code=2,
    )
    assert out.count("invalid public key") == 1
    one_error(
        invoke(
            "director",
            "register",
            director_dir,
            "--vin",
            "V",
            "--primary",
            "P",
            "--ecu",
            f"P,gw,{tmp_path}/missing.pub.json",
        ),
        "--ecu",
        "missing.pub.json",
        "No such file",
        code=2,
    )
    out = one_error(
        invoke("director", "assign", director_dir, "x.wasm"), "--ecu", "--hardware-id", code=2
    )
    assert "ecu_serials" not in out
    one_error(
        invoke("director", "assign", director_dir, "x.wasm", "--ecu", "E", "--vin", "V"),
        "--vin",
        code=2,
    )


# --- Image repository --------------------------------------------------------------


def test_image_repo_paths(tmp_path: Path) -> None:
    a_file = tmp_path / "file"
    a_file.write_text("x")
    one_error(invoke("image-repo", "init", a_file), "not an empty directory")
    one_error(invoke("image-repo", "init", "/proc/uptane-test/r"), "/proc/uptane-test")
    one_error(invoke("image-repo", "status", tmp_path / "none"), "not an image repository")


def test_invalid_wasm_message_is_whole(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    assert invoke("image-repo", "init", repo).exit_code == 0
    bad = tmp_path / "bad.wasm"
    bad.write_bytes(b"\0asX" + b"\0" * 8)
    out = one_error(
        invoke("image-repo", "add", repo, bad, "--hardware-id", "hw", "--release-counter", 1),
        "not a valid WebAssembly module",
    )
    assert out.count("[") == out.count("]")  # wasmtime's multi-line message is not cut off


def test_image_repo_status_shows_key_ids_per_role(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    assert invoke("image-repo", "init", repo).exit_code == 0
    out = invoke("image-repo", "status", repo).output
    root = json.loads((repo / "metadata" / "1.root.json").read_text())["signed"]
    for role in ("root", "targets", "snapshot", "timestamp"):
        [line] = [
            line
            for i, line in enumerate(out.splitlines())
            if line.strip().startswith("keys ") and out.splitlines()[i - 1].startswith(role)
        ]
        for keyid in root["roles"][role]["keyids"]:
            assert keyid in line
    # the key id shown is what rotate-key --old takes
    old = root["roles"]["snapshot"]["keyids"][0]
    result = invoke("image-repo", "rotate-key", repo, "snapshot", "--old", old[:12])
    assert result.exit_code == 0, result.output


def test_unknown_command_is_one_line() -> None:
    one_error(invoke("image-repo", "nosuch"), "No such command", code=2)


def test_serve_on_a_busy_port_is_one_line(director_dir: Path, tmp_path: Path) -> None:
    import socket

    repo = tmp_path / "repo"
    assert invoke("image-repo", "init", repo).exit_code == 0
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        for argv in (["director", "serve", director_dir], ["image-repo", "serve", repo]):
            one_error(invoke(*argv, "--port", port), f"cannot listen on 127.0.0.1:{port}", "--port")


def test_ecu_keygen_into_an_unwritable_place_is_one_line(tmp_path: Path) -> None:
    a_file = tmp_path / "file"
    a_file.write_text("x")
    one_error(invoke("ecu", "keygen", a_file / "keys", "b1"), "Not a directory")
    assert invoke("ecu", "keygen", tmp_path / "keys", "b1").exit_code == 0
    one_error(invoke("ecu", "keygen", tmp_path / "keys", "b1"), "refusing to overwrite")


@pytest.mark.parametrize(
    "module", ["director.fleet_cli", "director.cli", "ecus.sim.campaign_run", "image_repo.cli"]
)
def test_each_command_module_imports_on_its_own(module: str) -> None:
    """No import cycle between the command modules, whichever is imported first."""
    run = subprocess.run(
        [sys.executable, "-c", f"import {module}"], capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0, run.stderr

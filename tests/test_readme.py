"""The README's "Running the parts", run as a newcomer would: in order, in an empty directory.

The commands are read from the README's ``sh`` blocks of that section (the
simulator's block aside: ``tests/test_sim.py`` and ``tests/test_demo.py``
run those) and executed with bash, each as its own process, with the
venv's ``bin`` first on ``PATH``. A line ending in ``&`` is started in the
background and waited for (a server until its port answers, an ECU until it
says it listens); every other step must exit 0. Substituted, so parallel
runs cannot collide: the ports 8001 and 8084 (free ports), the multicast
group of the CAN bus (a random one), and ``KEYID`` (a snapshot key id from
the ``status`` output before it, as the README says). At the end, the
Director's inventory says the secondary runs the assigned image.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BIN = Path(sys.executable).parent

pytestmark = pytest.mark.slow


@dataclass
class Step:
    """One command of the README: its text and whether it runs in the background."""

    command: str
    background: bool = False


def readme_steps(text: str) -> list[Step]:
    """The commands of "Running the parts", in order (heredocs and ``\\`` lines joined)."""
    section = text[text.index("## Running the parts") :]
    section = section[: section.index("\n## ", 1)]
    section = section[: section.index("**Simulator:**")]
    steps: list[Step] = []
    for block in re.findall(r"```sh\n(.*?)```", section, flags=re.S):
        lines = block.splitlines()
        i = 0
        while i < len(lines):
            line = lines[i]
            i += 1
            if not line.strip():
                continue
            heredoc = re.search(r"<<'(\w+)'", line)
            if heredoc:
                end = lines.index(heredoc.group(1), i)
                steps.append(Step("\n".join([line, *lines[i : end + 1]])))
                i = end + 1
                continue
            while line.endswith("\\"):
                line = line[:-1] + " " + lines[i].strip()
                i += 1
            bare = re.sub(r"\s+#.*$", "", line).strip()
            if bare.endswith("&"):
                steps.append(Step(bare[:-1].strip(), background=True))
            else:
                steps.append(Step(line))
    return steps


def test_readme_steps_are_parsed() -> None:
    steps = readme_steps(README.read_text(encoding="utf-8"))
    background = [s.command.split()[:3] for s in steps if s.background]
    assert background == [
        ["uptane", "image-repo", "serve"],
        ["uptane", "director", "serve"],
        ["uptane", "ecu", "secondary"],
    ]
    assert any("--capability log" in s.command for s in steps)
    assert sum("uptane ecu primary" in s.command for s in steps) == 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_port(port: int, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 60
    while True:
        assert proc.poll() is None, log.read_text()
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        assert time.monotonic() < deadline, f"nothing listens on {port}: {log.read_text()}"
        time.sleep(0.1)


def _wait_output(needle: str, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 60
    while needle not in log.read_text():
        assert proc.poll() is None, log.read_text()
        assert time.monotonic() < deadline, f"no {needle!r}: {log.read_text()}"
        time.sleep(0.1)


@pytest.fixture
def background() -> Iterator[list[subprocess.Popen[bytes]]]:
    procs: list[subprocess.Popen[bytes]] = []
    yield procs
    for proc in reversed(procs):
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
    for proc in procs:
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_running_the_parts_as_written(
    tmp_path: Path, background: list[subprocess.Popen[bytes]]
) -> None:
    image_port, director_port = _free_port(), _free_port()
    group = f"239.{random.randint(0, 255)}.{random.randint(0, 255)}.{random.randint(1, 254)}"
    env = {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "PYTHONUNBUFFERED": "1",
    }
    env.pop("UPTANE_DIRECTOR_DIR", None)
    env.pop("UPTANE_DIRECTOR_TOKEN", None)
    outputs: list[tuple[str, str]] = []
    for n, step in enumerate(readme_steps(README.read_text(encoding="utf-8"))):
        command = (
            step.command.replace("8001", str(image_port))
            .replace("8084", str(director_port))
            .replace("239.74.163.2", group)
        )
        if "KEYID" in command:
            status = next(out for cmd, out in reversed(outputs) if "image-repo status" in cmd)
            lines = status.splitlines()
            snapshot = next(i for i, line in enumerate(lines) if line.startswith("snapshot"))
            keyid = lines[snapshot + 1].split("keys", 1)[1].strip().split(",")[0]
            command = command.replace("KEYID", keyid)
        if step.background:
            log = tmp_path / f"background-{n}.log"
            with log.open("wb") as f:
                proc = subprocess.Popen(
                    ["bash", "-c", f"exec {command}"],
                    cwd=tmp_path,
                    env=env,
                    stdout=f,
                    stderr=subprocess.STDOUT,
                )
            background.append(proc)
            if "image-repo serve" in command:
                _wait_port(image_port, proc, log)
            elif "director serve" in command:
                _wait_port(director_port, proc, log)
            else:
                _wait_output("listening on", proc, log)
            continue
        result = subprocess.run(
            ["bash", "-c", command],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=180,
        )
        output = result.stdout + result.stderr
        assert result.returncode == 0, f"{command}\n{output}"
        assert "Traceback" not in output, output
        outputs.append((command, output))

    cycles = [out for cmd, out in outputs if "ecu primary" in cmd]
    assert cycles[0].startswith("cycle 1: ok") and "B1 installed apps/brake/app.wasm" in cycles[0]
    assert cycles[1].startswith("cycle 1: ok") and "B1 up to date" in cycles[1]
    assert "manifest: accepted" in cycles[1]
    listed = subprocess.run(
        ["uptane", "director", "list", "director/", "--json"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    [vehicle] = json.loads(listed)
    assert vehicle["vin"] == "VIN1" and vehicle["pending"] == []
    ecus = {e["serial"]: e for e in vehicle["ecus"]}
    assert ecus["B1"]["installed"]["filename"] == "apps/brake/app.wasm"
    assert ecus["B1"]["last_result"] == "ok"
    # the secondary's active slot holds exactly the signed image
    slots = tmp_path / "b1-slots"
    wasm = (tmp_path / "app.wasm").read_bytes()
    assert any(p.is_file() and p.read_bytes() == wasm for p in slots.rglob("*"))


# --- docs/ -------------------------------------------------------------------------

DOCS = README.parent / "docs"


def test_readme_points_at_docs_in_the_repository() -> None:
    text = README.read_text(encoding="utf-8")
    assert "DESIGN.md" not in text
    for page in ("README", "architecture", "formats", "config", "wasm-abi", "operations"):
        assert f"docs/{page}.md" in text or page == "README"
        assert (DOCS / f"{page}.md").is_file()
    for link in re.findall(r"\]\((docs/[^)#]+)\)", text):
        assert (README.parent / link).exists(), link


def test_architecture_has_a_diagram() -> None:
    assert "```mermaid" in (DOCS / "architecture.md").read_text(encoding="utf-8")


def test_config_doc_names_every_field() -> None:
    """Every field the config loaders accept is documented in docs/config.md."""
    from dataclasses import fields

    from director.config import DirectorConfig
    from ecus.primary.config import DownloadPolicy, MetadataLimits, PrimaryConfig
    from ecus.transport.isotp import CanBusConfig

    doc = (DOCS / "config.md").read_text(encoding="utf-8")
    names = {f.name for cls in (PrimaryConfig, DownloadPolicy, MetadataLimits) for f in fields(cls)}
    names |= {f.name for f in fields(CanBusConfig)}
    names |= {"serial", "public_key", "request_id", "response_id", "ids", "bus", "can"}
    names |= {"slot_dir", "max_time_ahead_seconds", "vin", "key", "uri", "public"}
    names |= {"primary_key", "ceilings", "delta_memory_bytes"}
    names |= {"fuel_per_call", "self_test_fuel", "memory_pages", "call_seconds"}
    names |= {"repositories", "mapping", "paths", "threshold", "terminating"}
    names |= set(DirectorConfig(directory=Path("d"), token="t").to_dict())
    missing = sorted(n for n in names if f"`{n}`" not in doc and f".{n}`" not in doc)
    assert not missing, missing


def test_ecu_help_describes_config_and_points_to_the_doc() -> None:
    from click.testing import CliRunner

    from uptane.cli import cli

    for command, fields_ in (
        ("primary", ("repository_map", "director_root", "secondaries", "state_dir")),
        ("secondary", ("director_root", "slot_dir", "bus", "serial")),
    ):
        out = CliRunner().invoke(cli, ["ecu", command, "--help"]).output
        assert "docs/config.md" in out
        for field in fields_:
            assert field in out

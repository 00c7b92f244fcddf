"""``uptane demo`` end to end, in-process (click's CliRunner, no TTY)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

import demo.cli
import demo.main
from demo.cli import cli
from demo.main import DEFAULT_VIN
from ecus.sim.scenarios import SCENARIOS, Scenario, ScenarioOutcome, scenario
from ecus.sim.world import SimVehicle, World

HWS = ("brake-ctl", "body-ctl", "adas-cam")


def run(*args: str) -> Result:
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


SERIALS = ("primary", *(f"{hw}-{i}" for i, hw in enumerate(HWS, 1)))


def closing_rows(output: str) -> dict[str, str]:
    """The closing table's line for each ECU (the table after 'final state').

    The table fits 100 columns: serials are shown without the VIN prefix,
    images without ``apps/<hardware id>/``, each on one line, never cut.
    """
    table = output[output.index(f"vehicle {DEFAULT_VIN}: final state") :]
    table = table[: table.index("expected outcomes")]
    assert f"serial after '{DEFAULT_VIN}-'" in table
    rows = {}
    for line in table.splitlines():
        assert len(line) <= 100, line
        cells = [c.strip() for c in line.split("│")]
        if len(cells) > 2 and cells[1] in SERIALS:
            rows[cells[1]] = line
    return rows


def test_output_fits_100_columns_and_faults_read_the_same(output: str) -> None:
    for line in output.splitlines():
        assert len(line) <= 100, line
    # a fault names no attack: the same words in its scenario line and in the table
    line = next(ln for ln in output.splitlines() if "HANDLED power-cut-chunk" in ln)
    assert "detected: none (a fault)" in line
    row = next(ln for ln in output.splitlines() if ln.startswith("│ power-cut-chunk"))
    assert "none (a fault)" in row
    # the demo's apps have a realistic size, so the CAN transfers are real ones
    sizes = [int(m) for m in re.findall(r"blink-v\d\.wasm \((\d+) bytes", output)]
    assert len(sizes) == 6 and all(64 * 1024 <= n <= 256 * 1024 for n in sizes), sizes


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Result]:
    """One demo with an attack and a fault, its directory kept (--dir)."""
    directory = tmp_path_factory.mktemp("demo") / "demo"
    result = run(
        "--secondaries", "3", "--scenarios", "freeze-director,replayed-manifest,power-cut-chunk",
        "--dir", str(directory),
    )  # fmt: skip
    return directory, result


@pytest.fixture
def output(demo_run: tuple[Path, Result]) -> str:
    assert demo_run[1].exit_code == 0, demo_run[1].output
    return demo_run[1].output


def test_demo_subset_of_scenarios_keeps_dir(demo_run: tuple[Path, Result]) -> None:
    directory, result = demo_run
    assert result.exit_code == 0, result.output
    out = result.output
    # servers and directory are shown, the directory is kept (--dir)
    assert "http://127.0.0.1:" in out and str(directory.resolve()) in out
    assert (directory / "director" / "director.db").is_file()
    assert (directory / "image").is_dir()
    # both versions went in, and v2 behaves differently
    assert "3/3 secondaries on v1" in out and "3/3 secondaries on v2" in out
    assert "0 1 2 3 4 5" in out and "7 9 11 13 15 17" in out
    assert "BLOCKED freeze-director" in out and "BLOCKED replayed-manifest" in out
    rows = closing_rows(out)
    assert set(rows) == set(SERIALS)
    for i, hw in enumerate(HWS, 1):
        row = rows[f"{hw}-{i}"]
        v = 3 if i == 1 else 2  # power-cut-chunk installs a v3 on the first secondary
        assert f"│ {hw} " in row and f"│ blink-v{v}.wasm " in row and f"│ v{v} " in row
        assert "│ ok " in row
    primary = rows["primary"]
    assert "freeze" in primary and "gateway" in primary
    assert "All 7 expected outcomes happened" in out


@pytest.mark.slow
def test_full_default_demo() -> None:
    """The demo as CI runs it: defaults, every scenario (under a minute)."""
    result = run()
    assert result.exit_code == 0, result.output
    out = result.output
    for sc in SCENARIOS:
        assert f"scenario {sc.name} blocked and recovered" in out
    assert "FAIL" not in out and "Traceback" not in out
    rows = closing_rows(out)
    assert len(rows) == 4
    assert f"All {len(SCENARIOS) + 4} expected outcomes happened" in out


@pytest.fixture
def failing_scenario(monkeypatch: pytest.MonkeyPatch) -> str:
    """A scenario whose attack gets through (to see the demo fail loudly)."""
    name = "always-installs"

    def run_it(world: World, vehicle: SimVehicle) -> ScenarioOutcome:
        return ScenarioOutcome(
            name=name,
            blocked=False,
            detected=(),
            error=None,
            director_attacks=(),
            slots_unchanged=False,
            recovered=True,
            detail="a defence is missing",
        )

    fake = Scenario(name, "arbitrary_software", "test double", "nothing", run_it)

    def lookup(wanted: str) -> Scenario:
        return fake if wanted == name else scenario(wanted)

    monkeypatch.setattr(demo.cli, "scenario", lookup)
    monkeypatch.setattr(demo.main, "scenario", lookup)
    return name


def test_failed_expectation_exits_nonzero(failing_scenario: str) -> None:
    result = run("--scenarios", failing_scenario)
    assert result.exit_code == 1
    assert "1 expected outcome(s) did not happen" in result.output
    assert f"scenario {failing_scenario} blocked and recovered" in result.output
    assert "NOT blocked" in result.output
    assert "arbitrary_software not detected" in result.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--scenarios", "freeze-director,no-such-attack"], "unknown scenario(s): no-such-attack"),
        (["--scenarios", "power-cut-nowhere"], "unknown scenario(s): power-cut-nowhere"),
        (["--secondaries", "2"], "--secondaries"),
        (["--no-attacks", "--scenarios", "freeze-director"], "exclude each other"),
    ],
)
def test_bad_options_exit_2(args: list[str], message: str) -> None:
    result = run(*args)
    assert result.exit_code == 2
    assert message in result.output


def test_dir_must_be_empty(tmp_path: Path) -> None:
    (tmp_path / "something").write_text("x")
    result = run("--dir", str(tmp_path), "--no-attacks")
    assert result.exit_code == 2
    assert "is not empty" in result.output


def test_list_scenarios_and_help() -> None:
    result = run("--list-scenarios")
    assert result.exit_code == 0
    for sc in SCENARIOS:
        assert sc.name in result.output
    help_text = run("--help").output
    for option in ("--secondaries", "--fd / --classic", "--paced", "--keep", "--dir",
                   "--scenarios", "--no-attacks", "--list-scenarios"):  # fmt: skip
        assert option in help_text

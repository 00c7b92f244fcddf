"""The scenario catalogue: names, lookup, and the README table that documents it."""

from __future__ import annotations

from pathlib import Path

import pytest

from ecus.secondary.slots import WRITE_POINTS
from ecus.sim.scenarios import SCENARIOS, power_cut, scenario
from uptane.errors import ATTACKS

README = Path(__file__).resolve().parents[2] / "README.md"


def test_scenarios_are_named_once_and_documented() -> None:
    names = [s.name for s in SCENARIOS]
    assert len(names) == len(set(names))
    for sc in SCENARIOS:
        assert sc.attack is None or sc.attack in ATTACKS
        assert sc.title and sc.defeated_by
        assert scenario(sc.name) is sc


def test_power_cut_at_any_write_point() -> None:
    for point in WRITE_POINTS:
        assert scenario(f"power-cut-{point.replace('_', '-')}").name == power_cut(point).name
    with pytest.raises(ValueError, match="unknown write point"):
        scenario("power-cut-nowhere")
    with pytest.raises(KeyError):
        scenario("no-such-attack")


def test_readme_table_lists_every_scenario_and_test() -> None:
    text = README.read_text(encoding="utf-8")
    section = text[text.index("## Attacks and the checks that defeat them") :]
    for sc in SCENARIOS:
        assert f"`{sc.name}`" in section, sc.name
    here = Path(__file__).parent
    # tests/attacks/ first; a unit test in tests/ may be named where no vehicle is needed
    tests = {p.stem: p.read_text(encoding="utf-8") for p in here.parent.glob("test_*.py")}
    tests |= {p.stem: p.read_text(encoding="utf-8") for p in here.glob("test_*.py")}
    for line in section.splitlines():
        if line.startswith("|") and "test_" in line:
            cell = line.rsplit("|", 2)[-2]
            for ref in (r.strip(" `") for r in cell.split(",")):
                module, _, name = ref.partition("::")
                assert module in tests and f"def {name}(" in tests[module], ref

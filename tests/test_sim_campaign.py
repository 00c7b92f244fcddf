"""``uptane sim --campaign``: a canary catches a bad payload and the campaign halts (issue 14)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from ecus.sim.campaign_run import run_campaign_fleet
from ecus.sim.cli import cli
from ecus.sim.runner import FleetConfig

PHASES = [
    {"name": "canary", "vehicles": 1, "minutes": 30},
    {"name": "half", "percent": 50, "minutes": 60},
    {"name": "all", "percent": 100},
]


@pytest.mark.slow
def test_bad_payload_halts_at_the_canary(tmp_path: Path) -> None:
    phases = tmp_path / "phases.json"
    phases.write_text(json.dumps(PHASES))
    result = CliRunner().invoke(
        cli,
        [
            "--vehicles",
            "4",
            "--secondaries",
            "1",
            "--campaign",
            str(phases),
            "--bad-payload",
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output[result.output.index("{") :])
    campaign = summary["campaign"]
    assert (campaign["status"], campaign["phase"]) == ("halted", "canary")
    assert "health_failures" in campaign["halt_reason"]
    assert len(summary["vehicles_on_v2"]) == 1 and summary["vehicles_pending_v2"] == []
    assert summary["vehicles_untouched"] == 3


@pytest.mark.slow
def test_good_payload_goes_through_every_phase(tmp_path: Path) -> None:
    config = FleetConfig(vehicles=3, secondaries=1)
    report = run_campaign_fleet(config, PHASES, tmp_path)
    assert report.ok
    assert report.campaign is not None and report.campaign.status == "completed"
    assert sorted(report.on_v2) == sorted(report.reached) and len(report.on_v2) == 3
    assert [p.assigned for p in report.campaign.progress] == [1, 1, 1]


def test_bad_payload_needs_a_campaign() -> None:
    result = CliRunner().invoke(cli, ["--bad-payload"])
    assert result.exit_code != 0 and "--campaign" in result.output


@pytest.mark.slow
def test_demo_campaign_scenario() -> None:
    from demo.cli import cli as demo_cli

    result = CliRunner().invoke(demo_cli, ["--campaign"])
    assert result.exit_code == 0, result.output
    assert "halted" in result.output and "untouched" in result.output

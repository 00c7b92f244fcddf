"""The benchmarks in ``bench/`` still run, at their smallest sizes (README "Benchmarks").

Figures are not checked here (tests assert no timings): each script must exit 0,
print its ``ratio=`` lines and no traceback. Left out: ``can_transfer.py`` (its
paced runs take the wire time of a 256 KiB module, ~40 s) and
``delta_transfer.py`` (it fetches real releases from the npm registry once).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers.director_env import PG_DSN, _pg_user

REPO = Path(__file__).resolve().parent.parent

SMALL = {
    "full_verification.py": ["--cpu", "--rounds", "1", "--sizes", "1", "--image-targets", "20"],
    "fleet_intake.py": ["--vehicles", "3", "--rounds", "1"],
    "director_http_stacks.py": ["--requests", "100"],
    "fleet_sim.py": ["--sizes", "2", "--secondaries", "1"],
}


def _run(script: str, args: list[str]) -> str:
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / script), *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, f"{script} exited {proc.returncode}:\n{proc.stderr[-3000:]}"
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "ratio=" in proc.stdout, proc.stdout
    return proc.stdout


@pytest.mark.parametrize("script", sorted(SMALL))
def test_bench_runs(script: str) -> None:
    _run(script, SMALL[script])


def _pg_url() -> str:
    try:
        user = _pg_user()
    except ConnectionError as e:  # no server: skip outside CI
        if os.environ.get("CI"):
            raise
        pytest.skip(f"PostgreSQL not reachable: {e}")
    dsn = dict(part.split("=", 1) for part in PG_DSN.split())
    return f"postgresql+psycopg://{user}@{dsn['host']}:{dsn['port']}/{dsn['dbname']}"


def test_director_throughput_runs() -> None:
    """PostgreSQL only (the bench makes a schema of its own and drops it)."""
    url = _pg_url()
    out = _run(
        "director_throughput.py",
        ["--fleet", "300", "--active", "4", "--rounds", "2", "--polls", "100", "--db", url],
    )
    for line in ("poll:", "manifest:", "flat:", "check-ins/s with 2 worker(s)", "assign:"):
        assert line in out, out
    # the additional figure on more connections (at most one per active vehicle)
    assert "manifest: check-in with a new manifest on 4 connections" in out, out


def test_worker_balance_runs() -> None:
    """PostgreSQL only (the workers share a database; a schema of its own, dropped)."""
    out = _run("worker_balance.py", ["--connections", "6", "--rounds", "1", "--db", _pg_url()])
    assert "--workers 2: 6 connections in all" in out, out

"""The Director when its database drops its connections (a PostgreSQL restart or failover).

A request whose statement finds its pooled connection dead is answered
``503 database_unavailable`` with ``Retry-After`` (JSON, one log line), never a
500 with a traceback; the next request reconnects. Real PostgreSQL: the
Director's connections are ended with ``pg_terminate_backend``.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from helpers.director_env import (
    PG_DSN,
    Env,
    ImageRepoSim,
    MovableClock,
    _pg_user,
    _serve_asgi,
    http_client,
    new_car,
    put_manifest,
)

from director.app import create_app
from director.service import Director
from director.setup import init_director


@pytest.fixture
def named(
    db_url: str,
    image_repo: ImageRepoSim,
    tmp_path: Path,
) -> Iterator[tuple[Env, str]]:
    """A Director served over HTTP whose connections carry an application name of their own."""
    if not db_url.startswith("postgresql"):
        pytest.skip("ending the server's connections is PostgreSQL's (pg_terminate_backend)")
    name = f"uptane-dbdown-{uuid.uuid4().hex[:8]}"
    url = f"{db_url}&application_name={name}"
    root_file = tmp_path / "image-root.json"
    root_file.write_bytes(image_repo.root_bytes)
    config = init_director(
        tmp_path / "dir", image_repo_url=image_repo.url, image_repo_root=root_file, db_url=url
    )
    director = Director.from_config(config)
    base, stop = _serve_asgi(create_app(director, config.token, read_cache_bytes=0))
    client, op = http_client(base), http_client(base, config.token)
    env = Env(director, config, base, image_repo, MovableClock(), client, op, tmp_path)
    try:
        yield env, name
    finally:
        client.close()
        op.close()
        stop()
        director.close()


def terminate(name: str) -> int:
    """End every PostgreSQL connection named ``name``; how many there were."""
    with psycopg.connect(f"{PG_DSN} user={_pg_user()}", autocommit=True) as conn:
        rows = conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = %s",
            (name,),
        ).fetchall()
    return len(rows)


def test_dropped_connections_answer_503_then_reconnect(
    named: tuple[Env, str], caplog: pytest.LogCaptureFixture
) -> None:
    env, name = named
    car = new_car()
    assert env.op.post("/api/vehicles", json=car.body()).status_code == 201
    assert put_manifest(env, car, car.manifest()).status_code == 200
    assert env.http.get(f"/vehicles/{car.vin}/metadata/timestamp.json").status_code == 200

    for request in (
        lambda: env.op.get("/api/vehicles"),  # FastAPI route
        lambda: env.http.get(f"/vehicles/{car.vin}/metadata/timestamp.json"),  # fast path
        lambda: put_manifest(env, car, car.manifest()),  # manifest route, group commit
    ):
        assert terminate(name) >= 1  # the pool's connections are dead now
        with caplog.at_level(logging.WARNING, logger="director.app"):
            caplog.clear()
            r = request()
        assert r.status_code == 503, r.text
        assert r.json()["error"] == "database_unavailable"
        assert r.headers["Retry-After"] == "1"
        assert [rec.message for rec in caplog.records if "database unavailable" in rec.message]
        assert not any(rec.exc_info for rec in caplog.records)  # one line, no traceback
        again = request()
        assert again.status_code == 200, again.text  # the pool reconnected

"""The Director's per-process read cache (issue 12, ``director.read_cache``).

Real uvicorn servers (in threads, and ``uptane director serve`` processes),
SQLite and PostgreSQL: cached answers are the uncached answers, a write
committed anywhere reaches the next poll (at once in the writer's process and
on SQLite, after the NOTIFY on PostgreSQL), expiry and root changes bypass
the cache, a lost listener connection clears it, and mutual TLS still lets a
vehicle read only its own files.
"""

from __future__ import annotations

import json
import socket
import ssl
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path

import httpx
import pytest
from helpers.director_env import (
    Car,
    ImageRepoSim,
    MovableClock,
    _serve_asgi,
    http_client,
    new_car,
)
from helpers.proc_sockets import stop_group
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url
from tuf.api.metadata import Metadata

from director.app import create_app
from director.config import DirectorConfig
from director.db import ROOT_CHANGED, Database
from director.read_cache import ReadCache
from director.service import Director, EcuSpec
from director.setup import init_director, rotate_key
from director.tls import REFUSED_BODY, issue_vehicle_certificate, running_vehicle_listener


@dataclass
class Served:
    director: Director
    config: DirectorConfig
    url: str
    cache: ReadCache
    clock: MovableClock

    def register(self, car: Car) -> Car:
        self.director.register_vehicle(
            car.vin,
            [
                EcuSpec(e.serial, e.hardware_id, e.signer.public_key, primary=e.primary)
                for e in car.ecus.values()
            ],
        )
        return car


def _director_dir(tmp: Path, image_repo: ImageRepoSim, db_url: str) -> DirectorConfig:
    root_file = tmp / "image-root.json"
    root_file.write_bytes(image_repo.root_bytes)
    return init_director(
        tmp / "dir", image_repo_url=image_repo.url, image_repo_root=root_file, db_url=db_url
    )


def _wait(check: Callable[[], bool], what: str, seconds: float = 15.0) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


@pytest.fixture
def fresh_db(db_url: str, tmp_path: Path) -> Iterator[str]:
    """An empty database of ``db_url``'s kind (a new Director root chain goes in)."""
    if db_url.startswith("sqlite"):
        yield f"sqlite:///{tmp_path / 'fresh.db'}"
        return
    schema = f"t_{uuid.uuid4().hex[:12]}"
    engine = create_engine(make_url(db_url).difference_update_query(["options"]))
    with engine.begin() as conn:
        conn.execute(text(f"CREATE SCHEMA {schema}"))
    yield (
        make_url(db_url)
        .update_query_dict({"options": f"-csearch_path={schema}"})
        .render_as_string(hide_password=False)
    )
    with engine.begin() as conn:
        conn.execute(text(f"DROP SCHEMA {schema} CASCADE"))
    engine.dispose()


@pytest.fixture(scope="module")
def served(
    db_url: str, image_repo: ImageRepoSim, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Served]:
    config = _director_dir(tmp_path_factory.mktemp("cache"), image_repo, db_url)
    clock = MovableClock()
    director = Director.from_config(config, clock=clock)
    app = create_app(director, config.token)
    cache = app.state.read_cache
    assert isinstance(cache, ReadCache)
    url, stop = _serve_asgi(app)
    with httpx.Client(base_url=url) as http:
        http.get("/root/1.root.json")  # starts the cache (PostgreSQL: its listener)
    _wait(lambda: cache.live, "the cache to go live")
    yield Served(director, config, url, cache, clock)
    stop()
    director.close()


def _version(data: bytes) -> int:
    return Metadata.from_bytes(data).signed.version


# --- the answers ------------------------------------------------------------------


def test_cached_answers_are_the_uncached_answers(served: Served) -> None:
    car = served.register(new_car())
    plain_url, stop = _serve_asgi(
        create_app(served.director, served.config.token, read_cache_bytes=0)
    )
    base = f"/vehicles/{car.vin}/metadata"
    paths = [
        f"{base}/{name}"
        for name in (
            "timestamp.json",
            "snapshot.json",
            "targets.json",
            "1.targets.json",
            "1.targets.der",
            "9.targets.json",  # 404 of a known vehicle: cached
            "1.root.json",
            "root.json",
            "1.root.der",
            "2.root.json",
            "99999999999.root.json",  # over 32 bits: refused as the uncached path does
            "nonsense.json",
        )
    ] + [
        "/vehicles/UNKNOWN-VIN-0001/metadata/timestamp.json",
        "/root/1.root.json",
        "/root/root.der",
        "/root/2.root.json",
        "/root/bogus",
    ]
    hits = served.cache.stats.hits
    try:
        with http_client(served.url) as cached, http_client(plain_url) as plain:
            for path in paths:
                want = plain.get(path)
                etag = want.headers.get("etag")
                for _ in range(2):  # the second one from the cache where cacheable
                    got = cached.get(path)
                    assert (got.status_code, got.content) == (want.status_code, want.content), path
                    for header in ("etag", "content-type", "cache-control"):
                        assert got.headers.get(header) == want.headers.get(header), (path, header)
                if etag is not None:
                    cond = {"If-None-Match": f'W/"x", {etag}'}
                    got, want = cached.get(path, headers=cond), plain.get(path, headers=cond)
                    assert got.status_code == want.status_code == 304, path
                    assert got.content == b"" and got.headers["etag"] == etag
    finally:
        stop()
    # 11 of the paths are cacheable; each was asked 2-3 times more after its first
    assert served.cache.stats.hits - hits >= 11 * 2


def test_a_write_in_this_process_reaches_the_next_poll(served: Served) -> None:
    car = served.register(new_car())
    ts = f"/vehicles/{car.vin}/metadata/timestamp.json"
    with http_client(served.url) as http:
        first = http.get(ts)
        hits = served.cache.stats.hits
        assert http.get(ts, headers={"If-None-Match": first.headers["etag"]}).status_code == 304
        assert served.cache.stats.hits == hits + 1  # served from memory
        serial = next(s for s, e in car.ecus.items() if e.hardware_id == "brake-ecu")
        served.director.assign("brake-1.wasm", ecu_serials=[serial])
        # no waiting: the writer's process evicts on commit
        after = http.get(ts, headers={"If-None-Match": first.headers["etag"]})
        assert after.status_code == 200
        assert _version(after.content) == _version(first.content) + 1
        assert after.content == served.director.metadata(car.vin, "timestamp.json")


def test_the_read_cache_is_on_metrics(served: Served) -> None:
    """Operators see this process's hits, misses, size and whether the channel is up."""
    car = served.register(new_car())
    ts = f"/vehicles/{car.vin}/metadata/timestamp.json"
    with http_client(served.url) as http:
        first = http.get(ts)
        assert http.get(ts, headers={"If-None-Match": first.headers["etag"]}).status_code == 304
    with http_client(served.url, served.config.token) as op:
        text = op.get("/metrics").text
    stats = served.cache.stats
    assert f'uptane_director_read_cache_lookups_total{{result="hit"}} {float(stats.hits)}' in text
    assert (
        f'uptane_director_read_cache_lookups_total{{result="miss"}} {float(stats.misses)}' in text
    )
    assert f"uptane_director_read_cache_bytes {float(served.cache.size)}" in text
    assert "uptane_director_read_cache_live 1.0" in text
    assert stats.hits >= 1


def test_metadata_due_for_signing_is_not_served_from_the_cache(served: Served) -> None:
    car = served.register(new_car())
    ts = f"/vehicles/{car.vin}/metadata/timestamp.json"
    margin = served.config.metadata_expiry - served.config.refresh_margin
    with http_client(served.url) as http:
        first = http.get(ts)
        etag = {"If-None-Match": first.headers["etag"]}
        try:
            served.clock.offset = margin - timedelta(minutes=5)
            hits = served.cache.stats.hits
            assert http.get(ts, headers=etag).status_code == 304
            assert served.cache.stats.hits == hits + 1
            served.clock.offset = margin + timedelta(minutes=5)  # now within the margin
            renewed = http.get(ts, headers=etag)
            assert renewed.status_code == 200
            assert _version(renewed.content) == _version(first.content) + 1
        finally:
            served.clock.offset = timedelta()


def test_a_root_change_clears_the_cache(
    fresh_db: str, image_repo: ImageRepoSim, tmp_path: Path
) -> None:
    config = _director_dir(tmp_path, image_repo, fresh_db)
    director = Director.from_config(config)
    app = create_app(director, config.token)
    url, stop = _serve_asgi(app)
    try:
        car = new_car()
        Served(director, config, url, app.state.read_cache, MovableClock()).register(car)
        with http_client(url) as http:
            http.get("/health")
            http.get("/root/1.root.json")
            _wait(lambda: app.state.read_cache.live, "the cache to go live")
            probes = (f"/vehicles/{car.vin}/metadata/2.root.json", "/root/2.root.json")
            for _ in range(2):
                assert [http.get(p).status_code for p in probes] == [404, 404]
            rotate_key(config, "root")
            assert director.import_root_dir(config.root_dir) == 1
            got = [http.get(p) for p in probes]
            assert [r.status_code for r in got] == [200, 200]
            assert (
                got[0].content == got[1].content == (config.root_dir / "2.root.json").read_bytes()
            )
    finally:
        stop()
        director.close()


# --- the cache's own rules ---------------------------------------------------------


def test_a_read_that_raced_an_eviction_is_not_kept() -> None:
    cache = ReadCache(10_000)
    until = datetime.now(UTC) + timedelta(hours=1)
    now = datetime.now(UTC)
    assert cache.vehicle("V1", "timestamp.json", now) is None  # not live: nothing kept
    cache.fill_vehicle(cache.begin(), "V1", 1, until, "timestamp.json", "old", 10)
    assert len(cache) == 0
    cache.set_live(True)
    seq = cache.begin()  # a read starts ...
    cache.invalidate(frozenset({1}))  # ... a write of vehicle 1 commits meanwhile
    cache.fill_vehicle(seq, "V1", 1, until, "timestamp.json", "old", 10)
    assert cache.vehicle("V1", "timestamp.json", now) is None
    assert cache.stats.refused_fills == 2
    cache.fill_vehicle(seq, "V2", 2, until, "timestamp.json", "other", 10)  # another vehicle
    assert cache.vehicle("V2", "timestamp.json", now) == "other"
    cache.fill_vehicle(cache.begin(), "V1", 1, until, "timestamp.json", "new", 10)
    assert cache.vehicle("V1", "timestamp.json", now) == "new"
    assert cache.vehicle("V1", "timestamp.json", until) is None  # due for re-signing
    seq = cache.begin()
    cache.invalidate(frozenset({ROOT_CHANGED}))  # a root change forgets everything
    assert len(cache) == 0
    cache.fill_vehicle(seq, "V3", 3, until, "timestamp.json", "x", 10)
    assert len(cache) == 0
    cache.fill_root(seq, "2.root.json", "x")
    assert cache.root("2.root.json") is None
    # too many evictions to remember one by one: every read in flight is refused
    cache.fill_vehicle(cache.begin(), "V4", 4, until, "timestamp.json", "kept", 10)
    seq = cache.begin()
    for vid in range(100, 100 + 10_001):
        cache.invalidate(frozenset({vid}))
    cache.fill_vehicle(seq, "V5", 5, until, "timestamp.json", "x", 10)
    assert cache.vehicle("V5", "timestamp.json", now) is None
    assert cache.vehicle("V4", "timestamp.json", now) == "kept"  # not evicted by that


def test_the_cache_stays_within_its_bytes() -> None:
    cache = ReadCache(20_000)
    cache.set_live(True)
    until = datetime.now(UTC) + timedelta(hours=1)
    for i in range(200):
        cache.fill_vehicle(cache.begin(), f"V{i}", i, until, "timestamp.json", i, 700)
        assert cache.size <= 20_000
    assert 0 < len(cache) < 200
    now = datetime.now(UTC)
    assert cache.vehicle("V199", "timestamp.json", now) == 199  # the newest stay
    assert cache.vehicle("V0", "timestamp.json", now) is None  # the oldest went


# --- across processes ----------------------------------------------------------------


SERVE = (sys.executable, "-m", "uptane.cli", "director", "serve")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _serve(directory: Path, log: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = _free_port()
    out = log.open("ab")
    proc = subprocess.Popen(
        [*SERVE, "--dir", str(directory), "--port", str(port)],
        stdout=out,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    out.close()
    url = f"http://127.0.0.1:{port}"

    def up() -> bool:
        assert proc.poll() is None, log.read_text()
        try:
            return httpx.get(f"{url}/health", timeout=2).status_code == 200
        except httpx.TransportError:
            return False

    _wait(up, "the server", 60)
    return proc, url


def _stop(proc: subprocess.Popen[bytes]) -> None:
    stop_group(proc)


def _cached_poll(http: httpx.Client, ts: str) -> httpx.Response:
    """A timestamp the server now keeps: fetched, then answered 304 (a cache hit)."""
    first = http.get(ts)
    assert first.status_code == 200, first.text
    for _ in range(3):
        assert http.get(ts, headers={"If-None-Match": first.headers["etag"]}).status_code == 304
    return first


def _next_timestamp(http: httpx.Client, ts: str, old: httpx.Response, wait: float) -> float:
    """Polls with the old ETag until the new timestamp comes; returns how long it took."""
    t0 = time.monotonic()
    while True:
        r = http.get(ts, headers={"If-None-Match": old.headers["etag"]})
        if r.status_code == 200:
            assert _version(r.content) == _version(old.content) + 1
            return time.monotonic() - t0
        assert r.status_code == 304
        assert time.monotonic() - t0 < wait, "the server kept serving the old timestamp"
        time.sleep(0.01)


def test_two_server_processes_see_each_others_writes(
    fresh_db: str, image_repo: ImageRepoSim, tmp_path: Path
) -> None:
    """Two ``serve`` processes on one database: a write through one, or by a third
    process, reaches the other's next poll (SQLite: at once; PostgreSQL: after the
    NOTIFY, well under a second here)."""
    config = _director_dir(tmp_path, image_repo, fresh_db)
    wait = 0.0 if fresh_db.startswith("sqlite") else 10.0
    a, url_a = _serve(config.directory, tmp_path / "a.log")
    b, url_b = _serve(config.directory, tmp_path / "b.log")
    writer = Director.from_config(config, migrate=False)
    try:
        car = new_car()
        op = {"Authorization": f"Bearer {config.token}"}
        assert httpx.post(f"{url_a}/api/vehicles", json=car.body(), headers=op).status_code == 201
        ts = f"/vehicles/{car.vin}/metadata/timestamp.json"
        serial = next(s for s, e in car.ecus.items() if e.hardware_id == "brake-ecu")
        with http_client(url_a) as http_a, http_client(url_b) as http_b:
            if not fresh_db.startswith("sqlite"):  # each server's listener is up: it caches
                for http in (http_a, http_b):
                    _wait(partial(_is_cached, http, writer.db, car.vin), "the cache", 15)
            old = _cached_poll(http_b, ts)
            # a write through server A's API
            r = http_a.post(
                "/api/assignments",
                json={"image": "brake-1.wasm", "ecu_serials": [serial]},
                headers=op,
            )
            assert r.status_code == 201, r.text
            _next_timestamp(http_b, ts, old, wait)
            # a write by another process (the CLI, a campaign ticker elsewhere)
            old_a = _cached_poll(http_a, ts)
            old = _cached_poll(http_b, ts)
            writer.assign("brake-2.wasm", ecu_serials=[serial])
            _next_timestamp(http_b, ts, old, wait)
            _next_timestamp(http_a, ts, old_a, wait)
    finally:
        writer.close()
        _stop(a)
        _stop(b)


def _set_stored(db: Database, vin: str, data: bytes) -> None:
    """Change a vehicle's stored timestamp behind the Director's back (no notification)."""
    with db.engine.begin() as conn:
        conn.execute(
            text(
                "UPDATE metadata_files SET data = :d WHERE filename = 'timestamp.json' AND "
                "vehicle_id = (SELECT id FROM vehicles WHERE vin = :v)"
            ),
            {"d": data, "v": vin},
        )


def _is_cached(http: httpx.Client, db: Database, vin: str) -> bool:
    """Whether the server answers ``vin``'s timestamp from memory: a change of the stored
    bytes without a notification is not seen (PostgreSQL; the bytes are put back)."""
    ts = f"/vehicles/{vin}/metadata/timestamp.json"
    first = http.get(ts)
    _set_stored(db, vin, first.content.replace(b'"_type"', b'"_type" ', 1))
    try:
        return http.get(ts, headers={"If-None-Match": first.headers["etag"]}).status_code == 304
    finally:
        _set_stored(db, vin, first.content)


# --- PostgreSQL: the listener ------------------------------------------------------------


def test_a_lost_listener_connection_clears_the_cache(served: Served, db_url: str) -> None:
    if not db_url.startswith("postgresql"):
        pytest.skip("the LISTEN connection is PostgreSQL's")
    listener = served.cache.listener
    assert listener is not None and listener.backend_pid is not None
    car = served.register(new_car())
    ts = f"/vehicles/{car.vin}/metadata/timestamp.json"
    with http_client(served.url) as http:
        first = _cached_poll(http, ts)
        etag = {"If-None-Match": first.headers["etag"]}
        # bytes changed behind the Director's back: no notification, so the
        # cache goes on answering 304 (only a notification or a lost channel evicts)
        changed = first.content.replace(b'"_type"', b'"_type" ', 1)
        _set_stored(served.director.db, car.vin, changed)
        assert http.get(ts, headers=etag).status_code == 304
        clears, connections = served.cache.stats.clears, listener.connections
        pid = listener.backend_pid
        with served.director.db.engine.begin() as conn:
            assert conn.execute(text("SELECT pg_terminate_backend(:p)"), {"p": pid}).scalar()
        _wait(lambda: listener.connections > connections and served.cache.live, "a reconnection")
        assert listener.backend_pid != pid
        assert served.cache.stats.clears >= clears + 2  # on the loss, and on the reconnection
        r = http.get(ts, headers=etag)
        assert (r.status_code, r.content) == (200, changed)


def test_no_cache_without_the_listener(served: Served, db_url: str) -> None:
    """While the LISTEN connection is down the cache neither answers nor fills."""
    if not db_url.startswith("postgresql"):
        pytest.skip("the LISTEN connection is PostgreSQL's")
    cache = ReadCache.for_database(served.director.db, 1_000_000)
    assert cache is not None and cache.listener is not None
    try:
        cache.listener.conninfo = "postgresql://postgres@127.0.0.1:1/none"  # nothing listens
        cache.start()
        until = datetime.now(UTC) + timedelta(hours=1)
        time.sleep(0.3)  # a few failed connection attempts
        assert not cache.live and cache.listener.connections == 0
        cache.fill_vehicle(cache.begin(), "V1", 1, until, "timestamp.json", "x", 10)
        assert cache.vehicle("V1", "timestamp.json", datetime.now(UTC)) is None
    finally:
        cache.close()
        served.director.db.commit_hooks.remove(cache.invalidate)
        served.director.db.dispose_hooks.remove(cache.close)


# --- mutual TLS -------------------------------------------------------------------------


def test_mutual_tls_serves_a_vehicle_only_its_own_cached_files(tmp_path: Path) -> None:
    config = init_director(tmp_path / "d")
    director = Director.from_config(config)
    app = create_app(director, config.token, ca_directory=config.directory)
    cache = app.state.read_cache
    mine, theirs = new_car(1), new_car(1)
    served = Served(director, config, "", cache, MovableClock())
    served.register(mine)
    served.register(theirs)

    def client(vin: str, url: str) -> httpx.Client:
        cert, key, ca = issue_vehicle_certificate(config.directory, vin).write(tmp_path, vin)
        ctx = ssl.create_default_context(cafile=str(ca))
        ctx.load_cert_chain(cert, key)
        return httpx.Client(base_url=url, verify=ctx, timeout=10, trust_env=False)

    try:
        with running_vehicle_listener(app, config.directory) as url:
            ts = f"/vehicles/{mine.vin}/metadata/timestamp.json"
            with client(mine.vin, url) as own, client(theirs.vin, url) as other:
                first = _cached_poll(own, ts)
                hits = cache.stats.hits
                assert (
                    own.get(ts, headers={"If-None-Match": first.headers["etag"]}).status_code == 304
                )
                assert cache.stats.hits == hits + 1  # in the cache now
                for headers in ({}, {"If-None-Match": first.headers["etag"]}):
                    r = other.get(ts, headers=headers)
                    assert (r.status_code, r.content) == (404, REFUSED_BODY)
                assert cache.stats.hits == hits + 1  # refused before the cache
                assert (
                    other.get(f"/vehicles/{theirs.vin}/metadata/timestamp.json").status_code == 200
                )
    finally:
        director.close()


def test_read_cache_bytes_config(tmp_path: Path) -> None:
    config = init_director(tmp_path / "d")
    data = json.loads((tmp_path / "d" / "director.json").read_text())
    assert data["read_cache_bytes"] == 64_000_000
    data["read_cache_bytes"] = 0
    (tmp_path / "d" / "director.json").write_text(json.dumps(data))
    director = Director.from_config(DirectorConfig.load(tmp_path / "d"))
    try:
        assert DirectorConfig.load(tmp_path / "d").read_cache_bytes == 0
        assert create_app(director, config.token, read_cache_bytes=0).state.read_cache is None
    finally:
        director.close()
    data["read_cache_bytes"] = -1
    (tmp_path / "d" / "director.json").write_text(json.dumps(data))
    with pytest.raises(Exception, match="read_cache_bytes"):
        DirectorConfig.load(tmp_path / "d")


def test_every_writer_of_served_metadata_reports_its_changes() -> None:
    """A tripwire: a module that writes ``metadata_files`` or ``root_metadata`` must
    call ``metadata_changed``, or the read caches of every process would keep
    serving what it replaced."""
    writes = ("insert(", "update(", "delete(", "session.add(", ".data =", ".der =")
    offenders = []
    for path in sorted((Path(__file__).parent.parent / "director").glob("*.py")):
        source = path.read_text(encoding="utf-8")
        # a module can write the tables if it holds their Core table or ORM rows
        touches = any(
            pattern.format(model) in source
            for model in ("MetadataFile", "RootMetadata")
            for pattern in ("{}.__table__", "{}(", "({},", "({})")
        )
        if touches and any(w in source for w in writes) and "metadata_changed" not in source:
            offenders.append(path.name)
    assert offenders == []

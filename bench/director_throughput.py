"""Director cost per operation, measured as the SERVER processes' CPU time (DESIGN 6, 9).

Starts an Image repository (static HTTP) and the Director (`uptane director
serve`, its own process tree) on loopback over PostgreSQL (a fresh schema),
registers a fleet of ``--fleet`` vehicles with the bulk import, and drives the
server from separate client processes. The Director's CPU time is read from
the OS (``/proc``, user + system, every process of the server's tree), so the
clients' own CPU does not count; a 2-core machine cannot show the server's
cost through wall-clock throughput while the clients share the cores.

Figures (each against a baseline measured in the same run):

- ``poll``: a poll that changed nothing, as a primary makes it with
  conditional requests: ``GET N+1.root.json`` (404) and ``GET
  timestamp.json`` with ``If-None-Match`` (304). ``ratio`` = server CPU of
  the same number of requests to a trivial endpoint (``/health``, same HTTP
  stack) / server CPU of the poll (goal >= 0.5).
- ``manifest``: a check-in with a new manifest (PUT of a signed vehicle
  version manifest of 5 ECU reports, then the poll). ``ratio`` = CPU of the
  check-in's signature work (1 + 5 ed25519 verifications, measured here) /
  server CPU of the check-in (goal >= 0.5). Also the same check-ins on
  ``--wide`` (32) connections, an additional line: the manifests of concurrent
  connections are written together (group commit), so the server CPU per
  check-in falls as more of them are in flight.
- check-ins/s (wall clock, clients on the same cores) with 1 and 2 workers.
- ``setup``: the bulk import, in vehicles/s.
- ``flat``: a check-in's server CPU and the server's memory with
  ``--baseline-fleet`` (1,000) registered vehicles, then with ``--fleet``:
  ``ratio`` = CPU at the small fleet / CPU at the full fleet (flat: ~1).
- ``assign``: one image assigned to every vehicle with hardware id
  ``bench-hw`` (every vehicle of the fleet): the rows in batches, each batch's
  vehicles re-signed by ``--signers`` processes once it commits; meanwhile client
  processes poll, and their latency and throughput are printed against the
  same polls just before the assignment (``ratio`` = polls/s during / before).
  Also the CPU time of the signer processes, of the assigning thread and of
  their PostgreSQL backends (sampled from ``/proc`` every 0.25 s): less noisy
  than the wall time on a shared machine.

    .venv/bin/python bench/director_throughput.py [--fleet 10000] [--db URL]
    .venv/bin/python bench/director_throughput.py --fleet 100000 --polls 1000
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import http.client
import http.server
import multiprocessing as mp
import os
import random
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from checkins import (  # bench/ is on sys.path when a bench runs
    checkin_cpu,
    postgres_cpu,
    postgres_pids,
)
from proc_cpu import pid_cpu, tree_cpu, tree_pids, tree_rss
from securesystemslib.signer import CryptoSigner, Key, Signature
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url
from tuf.api.metadata import TargetFile

from director.service import Director, EcuSpec, VehicleRecord
from director.setup import init_director
from uptane.manifest import EcuVersionReport, SignedEcuVersionReport, VehicleVersionManifest
from uptane.metadata import build_custom
from uptane.repository import DirectoryStore, SigningRepository

ECUS_PER_VEHICLE = 5
DEFAULT_DB = "postgresql+psycopg://postgres@127.0.0.1:5432/test"


# --- the server's CPU time, from the OS ------------------------------------------


# --- setup --------------------------------------------------------------------------


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


def image_repository(directory: Path) -> tuple[str, bytes, http.server.ThreadingHTTPServer]:
    repo = SigningRepository(store=DirectoryStore(directory / "metadata"))
    signers = {
        r: CryptoSigner.generate_ed25519() for r in ("root", "targets", "snapshot", "timestamp")
    }
    repo.add_signers(signers.values())
    with repo.edit_root() as root:
        for role, signer in signers.items():
            root.add_key(signer.public_key, role)
    with repo.edit_targets() as targets:
        tf = TargetFile.from_data("bench-app.wasm", b"\0asm\1\0\0\0" * 64, ["sha256"])
        tf.unrecognized_fields["custom"] = build_custom(
            hardware_ids=["bench-hw"], release_counter=1
        )
        targets.targets[tf.path] = tf
        tf2 = TargetFile.from_data("bench-app-2.wasm", b"\0asm\1\0\0\0" * 65, ["sha256"])
        tf2.unrecognized_fields["custom"] = build_custom(
            hardware_ids=["bench-hw"], release_counter=2
        )
        targets.targets[tf2.path] = tf2
    repo.publish()
    handler = functools.partial(_Quiet, directory=str(directory))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    root_bytes = repo.store.read("1.root.json")
    assert root_bytes is not None
    return f"http://127.0.0.1:{server.server_address[1]}", root_bytes, server


def fresh_postgres_schema(url: str) -> tuple[str, str]:
    """A new schema in the PostgreSQL database ``url`` names; returns (url, schema)."""
    schema = f"bench_{uuid.uuid4().hex[:10]}"
    u = make_url(url)
    if u.drivername == "postgresql":
        u = u.set(drivername="postgresql+psycopg")
    engine = create_engine(u)
    with engine.begin() as conn:
        conn.execute(text(f"CREATE SCHEMA {schema}"))
    engine.dispose()
    u = u.update_query_dict({"options": f"-csearch_path={schema}"})
    return u.render_as_string(hide_password=False), schema


def drop_postgres_schema(url: str, schema: str) -> None:
    engine = create_engine(make_url(url).difference_update_query(["options"]))
    with engine.begin() as conn:
        conn.execute(text(f"DROP SCHEMA {schema} CASCADE"))
    engine.dispose()


def active_vehicle(i: int) -> tuple[VehicleRecord, dict[str, CryptoSigner]]:
    """A vehicle whose keys the bench holds: it sends manifests."""
    vin = f"ACTIVE{i:06d}"
    signers = {f"{vin}-{k}": CryptoSigner.generate_ed25519() for k in range(ECUS_PER_VEHICLE)}
    ecus = tuple(
        EcuSpec(
            s, "gateway" if k == 0 else "bench-hw" if k == 1 else f"hw-{k}", sg.public_key, k == 0
        )
        for k, (s, sg) in enumerate(signers.items())
    )
    return VehicleRecord(vin, ecus), signers


def filler_fleet(n: int) -> list[VehicleRecord]:
    """The rest of the registered fleet (2 ECUs each; keys shared, never used to sign)."""
    keys = [CryptoSigner.generate_ed25519().public_key for _ in range(2)]
    return [
        VehicleRecord(
            f"FLEET{i:07d}",
            (
                EcuSpec(f"FLEET{i:07d}-0", "gateway", keys[0], True),
                EcuSpec(f"FLEET{i:07d}-1", "bench-hw", keys[1]),
            ),
        )
        for i in range(n)
    ]


def sign_manifests(
    vin: str, signers: dict[str, CryptoSigner], first: int, count: int
) -> list[bytes]:
    now = datetime.now(UTC).replace(microsecond=0)
    serials = list(signers)
    out = []
    for counter in range(first, first + count):
        reports = {
            s: SignedEcuVersionReport.sign(
                EcuVersionReport(
                    s,
                    "gateway" if k == 0 else "bench-hw" if k == 1 else f"hw-{k}",
                    None,
                    counter,
                    now,
                ),
                signers[s],
            )
            for k, s in enumerate(serials)
        }
        out.append(VehicleVersionManifest(vin, serials[0], reports).sign(signers[serials[0]]))
    return out


# --- the server --------------------------------------------------------------------


class _PortTaken(Exception):
    """The server's port was taken before it could listen on it."""


class Server:
    """``uptane director serve`` in its own process group."""

    def __init__(self, directory: Path, db_url: str, workers: int, log: Path) -> None:
        for attempt in range(5):  # a port another process took meanwhile: another one
            try:
                self._start(directory, db_url, workers, log)
                return
            except _PortTaken:
                if attempt == 4:
                    raise SystemExit("no free port for the server") from None

    def _start(self, directory: Path, db_url: str, workers: int, log: Path) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = int(s.getsockname()[1])
        self.log = log.open("ab")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "uptane.cli",
                "director",
                "serve",
                "--dir",
                str(directory),
                "--db",
                db_url,
                "--port",
                str(self.port),
                "--workers",
                str(workers),
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            # no background signer: the assign phase's signer processes do the signing
            env={**os.environ, "PYTHONUNBUFFERED": "1", "UPTANE_DIRECTOR_SIGNER_SECONDS": "0"},
            start_new_session=True,
        )
        deadline = time.monotonic() + 90
        while True:
            if self.proc.poll() is not None:
                self.log.close()
                tail = log.read_text()[-2000:]
                if f"cannot listen on 127.0.0.1:{self.port}" in tail:
                    raise _PortTaken
                raise SystemExit(f"server exited: {tail}")
            try:
                c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2)
                c.request("GET", "/health")
                if c.getresponse().status == 200 and self._listening():
                    c.close()
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit("server did not start")
            time.sleep(0.2)

    def _listening(self) -> bool:
        """Whether the socket listening on ``self.port`` is this server's.

        Another bench's server may take the free port this one was given
        before it binds it (this one then exits): its /health must not count.
        """
        port = f"{self.port:04X}"
        inodes = set()
        for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[1].endswith(f":{port}") and fields[3] == "0A":  # LISTEN
                inodes.add(f"socket:[{fields[9]}]")
        for pid in tree_pids(self.proc.pid):
            try:
                fds = list(Path(f"/proc/{pid}/fd").iterdir())
            except OSError:
                continue
            for fd in fds:
                try:
                    if os.readlink(fd) in inodes:
                        return True
                except OSError:
                    continue
        return False

    def cpu(self) -> float:
        return tree_cpu(self.proc.pid)

    def stop(self) -> None:
        os.killpg(self.proc.pid, signal.SIGINT)
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.log.close()


# --- clients (separate processes) ---------------------------------------------------


def _read(conn: http.client.HTTPConnection) -> tuple[int, bytes, str | None]:
    r = conn.getresponse()
    return r.status, r.read(), r.getheader("etag")


def _poll(conn: http.client.HTTPConnection, vin: str, etag: str | None) -> str | None:
    """A no-change poll: the next root (404), then the timestamp, conditionally."""
    base = f"/vehicles/{vin}/metadata"
    conn.request("GET", f"{base}/2.root.json")
    status, _, _ = _read(conn)
    if status != 404:
        raise RuntimeError(f"{vin}: 2.root.json answered {status}")
    headers = {"If-None-Match": etag} if etag else {}
    conn.request("GET", f"{base}/timestamp.json", headers=headers)
    status, _, new_etag = _read(conn)
    if status not in (200, 304):
        raise RuntimeError(f"{vin}: timestamp answered {status}")
    return new_etag


def _client(job: dict[str, Any], start: Any, results: Any) -> None:
    """One client process: runs ``job`` on one keep-alive connection after ``start``."""
    conn = http.client.HTTPConnection("127.0.0.1", job["port"], timeout=60)
    conn.connect()
    conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    etags: dict[str, str | None] = dict(job.get("etags", {}))
    start.wait()
    done = 0
    t0 = time.perf_counter()
    if job["kind"] == "trivial":
        for _ in range(job["count"]):
            conn.request("GET", "/health")
            _read(conn)
            done += 1
    elif job["kind"] == "poll":
        for vin in job["vins"]:
            etags[vin] = _poll(conn, vin, etags.get(vin))
            done += 1
    elif job["kind"] == "timed_poll":
        # poll the VINs round and round until ``stop``; every request's latency
        latencies: list[float] = []
        vins = job["vins"]
        interval = job["interval"]
        while not job["stop"].is_set():
            vin = vins[done % len(vins)]
            t = time.perf_counter()
            if t < t0 + done * interval:  # at the client's rate (a fleet polls at its pace)
                time.sleep(t0 + done * interval - t)
                t = time.perf_counter()
            etags[vin] = _poll(conn, vin, etags.get(vin))
            latencies.append(time.perf_counter() - t)
            done += 1
        results.put((done, time.perf_counter() - t0, latencies))
        conn.close()
        return
    elif job["kind"] == "checkin":
        for vin, manifest in job["manifests"]:
            conn.request(
                "PUT",
                f"/vehicles/{vin}/manifest",
                body=manifest,
                headers={"Content-Type": "application/json"},
            )
            status, body, _ = _read(conn)
            if status != 200:
                raise RuntimeError(f"{vin}: manifest refused: {body[:300]!r}")
            etags[vin] = _poll(conn, vin, etags.get(vin))
            done += 1
    results.put((done, time.perf_counter() - t0, etags))
    conn.close()


def run_clients(
    server: Server, jobs: Sequence[dict[str, Any]]
) -> tuple[int, float, float, dict[str, Any]]:
    """Run ``jobs`` in client processes at once; (operations, wall s, server CPU s, etags)."""
    ctx = mp.get_context("fork")
    start = ctx.Event()
    results = ctx.Queue()
    procs = [ctx.Process(target=_client, args=(j, start, results)) for j in jobs]
    for p in procs:
        p.start()
    time.sleep(0.5)  # every client connected and waiting
    cpu0 = server.cpu()
    t0 = time.perf_counter()
    start.set()
    done, etags = 0, {}
    for _ in procs:
        n, _, e = results.get(timeout=600)
        done += n
        etags.update(e)
    wall = time.perf_counter() - t0
    cpu = server.cpu() - cpu0
    for p in procs:
        p.join()
        if p.exitcode != 0:
            raise SystemExit(f"a client failed (exit {p.exitcode})")
    return done, wall, cpu, etags


def timed_polls(
    server: Server,
    vins: list[list[str]],
    etags: dict[str, str | None],
    during: Any,
    rate: float,
) -> tuple[int, float, list[float]]:
    """Poll ``vins`` (one list per client process) at ``rate`` polls/s in all while ``during()`` runs.

    Returns (polls, wall seconds, every poll's latency).
    """
    ctx = mp.get_context("fork")
    start, stop = ctx.Event(), ctx.Event()
    results = ctx.Queue()
    jobs = [
        {
            "kind": "timed_poll",
            "port": server.port,
            "vins": v,
            "etags": etags,
            "stop": stop,
            "interval": len(vins) / rate,
        }
        for v in vins
    ]
    procs = [ctx.Process(target=_client, args=(j, start, results)) for j in jobs]
    for p in procs:
        p.start()
    time.sleep(0.5)
    t0 = time.perf_counter()
    start.set()
    try:
        during()
    finally:
        stop.set()
    wall = time.perf_counter() - t0
    done, latencies = 0, []
    for _ in procs:
        n, _, lat = results.get(timeout=600)
        done += n
        latencies.extend(lat)
    for p in procs:
        p.join()
        if p.exitcode != 0:
            raise SystemExit(f"a polling client failed (exit {p.exitcode})")
    return done, wall, latencies


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def signature_cpu_per_checkin(manifests: list[tuple[Key, bytes]], keys: dict[str, Key]) -> float:
    """CPU seconds of one check-in's signature work: 1 + 5 ed25519 verifications."""
    from director.envelope import ManifestEnvelope
    from uptane import codec

    work: list[tuple[Key, Signature, bytes]] = []
    for primary_key, data in manifests:
        env = ManifestEnvelope.from_bytes(data, 1_000_000)
        from securesystemslib.formats import encode_canonical

        signed = (encode_canonical(env.signed) or "").encode()
        work.append((primary_key, env.signatures[0], signed))
        import base64

        for serial, text_ in env.reports.items():
            value = codec.decode("SignedEcuVersionReport", base64.b64decode(text_))
            sig = value["signatures"][0]
            work.append(
                (
                    keys[serial],
                    Signature(sig["keyid"], bytes(sig["value"]).hex()),
                    bytes(value["report"]),
                )
            )
    t0 = time.process_time()
    rounds = 0
    while time.process_time() - t0 < 1.0:
        for key, sig, data in work:
            key.verify_signature(sig, data)
        rounds += 1
    return (time.process_time() - t0) / (rounds * len(manifests))


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--fleet", type=int, default=10_000, help="registered vehicles")
    parser.add_argument(
        "--baseline-fleet", type=int, default=1000, help="registered vehicles of the flat check"
    )
    parser.add_argument("--active", type=int, default=40, help="vehicles sending manifests")
    parser.add_argument("--rounds", type=int, default=10, help="manifests per active vehicle")
    parser.add_argument("--polls", type=int, default=2000, help="no-change polls measured")
    parser.add_argument(
        "--clients", type=int, default=4, help="client processes (polls), connections (check-ins)"
    )
    parser.add_argument(
        "--lanes", type=int, default=16, help="connections of the check-ins/s figure"
    )
    parser.add_argument(
        "--wide", type=int, default=32, help="connections of the additional manifest figure"
    )
    parser.add_argument("--signers", type=int, default=2, help="signer processes (assign)")
    parser.add_argument(
        "--poll-rate", type=float, default=200, help="polls/s in all around the assignment"
    )
    parser.add_argument("--db", default=DEFAULT_DB, help="PostgreSQL URL (a schema is made)")
    args = parser.parse_args()
    small = max(args.active, min(args.fleet, args.baseline_fleet))

    tmp = Path(tempfile.mkdtemp(prefix="director-bench-"))
    image_url, image_root, image_server = image_repository(tmp / "image")
    (tmp / "image-root.json").write_bytes(image_root)
    db_url, schema = fresh_postgres_schema(args.db)
    config = init_director(
        tmp / "director",
        image_repo_url=image_url,
        image_repo_root=tmp / "image-root.json",
        db_url=db_url,
    )
    servers: list[Server] = []
    log = tmp / "server.log"
    n = args.clients

    def split(items: list[Any]) -> list[list[Any]]:
        return [items[i::n] for i in range(n)]

    try:
        director = Director.from_config(config)
        actives = [active_vehicle(i) for i in range(args.active)]
        filler = filler_fleet(args.fleet - args.active)
        t0 = time.perf_counter()
        first = director.import_vehicles(
            [r for r, _ in actives] + filler[: small - args.active], batch=500
        )
        imported = time.perf_counter() - t0
        director.assign("bench-app.wasm", hardware_id="bench-hw", vins=[r.vin for r, _ in actives])
        keys = {e.serial: e.public_key for r, _ in actives for e in r.ecus}
        manifests = {
            r.vin: sign_manifests(r.vin, signers, 1, 8 * args.rounds) for r, signers in actives
        }
        rng = random.Random(1)

        # check-in cost and server memory with the small fleet (the flat check's baseline)
        server = Server(tmp / "director", db_url, 1, log)
        servers.append(server)
        run_clients(server, [{"kind": "trivial", "port": server.port, "count": 200}] * n)
        ops, _, cpu, _, _ = checkin_cpu(server, manifests, 0, args.rounds, n)
        small_checkin, small_rss = cpu / ops, tree_rss(server.proc.pid)
        server.stop()
        servers.remove(server)

        t0 = time.perf_counter()
        rest = director.import_vehicles(filler[small - args.active :], batch=500)
        imported += time.perf_counter() - t0
        added = first.added + rest.added
        director.close()
        print(
            f"setup: {added} vehicles imported in {imported:.1f} s ({added / imported:.0f} "
            f"vehicles/s, {imported / max(1, added) * 1000:.2f} ms/vehicle, PostgreSQL, "
            f"batches of 500)"
        )
        all_vins = [r.vin for r in filler]
        sample = rng.sample(all_vins, min(len(all_vins), args.polls))

        # the server's PostgreSQL backends, by name: their CPU too (check-ins/s lines)
        app_name = f"director_{schema}"
        server_url = make_url(db_url).update_query_dict({"application_name": app_name})
        pg = postgres_cpu(db_url, app_name)
        rates: dict[int, float] = {}
        for workers in (1, 2):
            server = Server(tmp / "director", server_url.render_as_string(False), workers, log)
            servers.append(server)
            port = server.port
            # warm up: every worker, every statement; learn the sample's ETags
            run_clients(server, [{"kind": "trivial", "port": port, "count": 200}] * n)
            _, _, _, etags = run_clients(
                server, [{"kind": "poll", "port": port, "vins": v} for v in split(sample)]
            )
            if workers == 1:
                ops, _, trivial_cpu, _ = run_clients(
                    server,
                    [{"kind": "trivial", "port": port, "count": 2 * args.polls // n}] * n,
                )
                trivial_per_request = trivial_cpu / ops
                ops, _, poll_cpu, _ = run_clients(
                    server,
                    [
                        {"kind": "poll", "port": port, "vins": v, "etags": etags}
                        for v in split(sample)
                    ],
                )
                poll = poll_cpu / ops
                print(
                    f"poll: no-change poll (GET 2.root.json 404 + conditional GET timestamp.json "
                    f"304) over {args.fleet} vehicles: server CPU {poll * 1000:.3f} ms; trivial "
                    f"endpoint x2 {2 * trivial_per_request * 1000:.3f} ms; "
                    f"ratio={2 * trivial_per_request / poll:.3f}"
                )
            # each vehicle's manifests in order: [0, r) small fleet, then r per worker count
            # for this figure, 2r for the next, and with 1 worker r for the --wide figure
            start_at = args.rounds * (1 + 4 * (workers - 1))
            ops, wall, cpu, _, _ = checkin_cpu(server, manifests, start_at, args.rounds, n)
            if workers == 1:
                sig = signature_cpu_per_checkin(
                    [(keys[f"{vin}-0"], ms[0]) for vin, ms in manifests.items()], keys
                )
                print(
                    f"manifest: check-in with a new manifest (PUT, 5 ECU reports, + no-change "
                    f"poll): server CPU {cpu / ops * 1000:.3f} ms; signature work "
                    f"{sig * 1000:.3f} ms; ratio={sig / (cpu / ops):.3f}"
                )
                full_rss = tree_rss(server.proc.pid)
                print(
                    f"flat: check-in server CPU with {small} registered vehicles "
                    f"{small_checkin * 1000:.3f} ms, with {args.fleet} {cpu / ops * 1000:.3f} ms; "
                    f"ratio={small_checkin / (cpu / ops):.3f}; server RSS {small_rss / 2**20:.0f} "
                    f"MiB -> {full_rss / 2**20:.0f} MiB"
                )
            print(
                f"manifest: server CPU {cpu / ops * 1000:.3f} ms/check-in with {workers} "
                f"worker(s) ({ops} check-ins on {n} connections)"
            )
            if workers == 1:
                # the same check-ins from more connections at once: bigger group commits
                wide = min(args.wide, args.active)  # a vehicle's check-ins use one connection
                ops, _, wide_cpu, _, _ = checkin_cpu(
                    server, manifests, start_at + args.rounds, args.rounds, wide
                )
                print(
                    f"manifest: check-in with a new manifest on {wide} connections: "
                    f"server CPU {wide_cpu / ops * 1000:.3f} ms; signature work "
                    f"{sig * 1000:.3f} ms; ratio={sig / (wide_cpu / ops):.3f} (additional "
                    f"figure; the one above, on {n} connections, is the goal's)"
                )
                start_at += args.rounds
            # throughput: more connections, one cheap client process (raw keep-alive HTTP,
            # bodies built first); the CPU of everything taking part, per check-in
            ops, wall, cpu, client, pg_cpu = checkin_cpu(
                server, manifests, start_at + args.rounds, 2 * args.rounds, args.lanes, pg
            )
            rates[workers] = ops / wall
            print(
                f"check-ins/s with {workers} worker(s): {ops / wall:.1f} ({ops} check-ins on "
                f"{args.lanes} connections from 1 client process; CPU per check-in: server "
                f"{cpu / ops * 1000:.3f} ms, its PostgreSQL backends {pg_cpu / ops * 1000:.3f} "
                f"ms, client {client / ops * 1000:.3f} ms; together {(cpu + pg_cpu + client) / wall:.2f} "
                f"of {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f})"
            )
            if workers == 2:
                print(
                    f"workers: check-ins/s with 2 workers / with 1: ratio={rates[2] / rates[1]:.3f}"
                )
            if workers == 2:
                assign_phase(args, config, server, split(sample), etags)
            server.stop()
            servers.remove(server)
    finally:
        for server in servers:
            server.stop()
        image_server.shutdown()
        drop_postgres_schema(db_url, schema)
        shutil.rmtree(tmp, ignore_errors=True)


def assign_phase(
    args: argparse.Namespace,
    config: Any,
    server: Server,
    vins: list[list[str]],
    etags: dict[str, str | None],
) -> None:
    """Polls for a few seconds, then the same polls while the fleet-wide assignment runs.

    The ``--signers`` processes start with the assignment and sign each batch of
    vehicles once its rows commit (``SignerProcesses``): the rows and the
    signing overlap, and the total is until the last vehicle is signed.
    """
    from director.metadata_signer import SignerProcesses

    rate = args.poll_rate
    base_n, base_wall, base_lat = timed_polls(server, vins, etags, lambda: time.sleep(10), rate)
    # the assignment's and the signers' PostgreSQL backends, by name: their CPU, sampled
    # (a backend's last sample counts once it is gone)
    app_name = f"assign_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    url = make_url(config.db_url).update_query_dict({"application_name": app_name})
    config = dataclasses.replace(config, db_url=url.render_as_string(hide_password=False))
    director = Director.from_config(config, migrate=False)
    phases: dict[str, float] = {}
    pg_seen: dict[int, float] = {}
    sampling = threading.Event()
    pids_of = postgres_pids(config.db_url, app_name)

    def sample_pg() -> None:
        while not sampling.wait(0.25):
            for pid in pids_of():
                pg_seen[pid] = max(pg_seen.get(pid, 0.0), pid_cpu(pid))

    def children_cpu() -> float:
        """CPU seconds of this process's children that ended and were waited for."""
        ru = resource.getrusage(resource.RUSAGE_CHILDREN)
        return ru.ru_utime + ru.ru_stime

    def assign() -> None:
        t = time.perf_counter()
        cpu0, children0 = time.thread_time(), children_cpu()
        with SignerProcesses(config, args.signers) as signers:
            infos = director.assign("bench-app-2.wasm", hardware_id="bench-hw", sign=False)
            phases["rows"] = time.perf_counter() - t
            phases["rows_cpu"] = time.thread_time() - cpu0
            phases["ecus"] = len(infos)
            phases["signed"] = signers.finish()
        phases["total"] = time.perf_counter() - t
        # the signer processes have been joined; the polling clients are still running
        phases["signers_cpu"] = children_cpu() - children0

    sampler = threading.Thread(target=sample_pg, daemon=True)
    # the connections open already (from_config's): their CPU so far is not counted
    pg_before = {pid: pid_cpu(pid) for pid in pids_of()}
    sampler.start()
    try:
        n_, wall, lat = timed_polls(server, vins, etags, assign, rate)
        # what the fleet's signed files take (a figure the machine's load does not move)
        with director.db.engine.connect() as conn:
            files, files_bytes = conn.execute(
                text(
                    "SELECT count(*), pg_total_relation_size('metadata_files') FROM metadata_files"
                )
            ).one()
    finally:
        sampling.set()
        sampler.join()
        director.close()
    total = phases["total"]
    print(
        f"assign: bench-app-2.wasm to every bench-hw ECU ({phases['ecus']:.0f} vehicles): "
        f"rows in {phases['rows']:.1f} s (batches of 1000), {phases['signed']:.0f} vehicles "
        f"re-signed by {args.signers} processes meanwhile; every vehicle signed after "
        f"{total:.1f} s ({phases['ecus'] / total:.0f} vehicles/s; load average "
        f"{os.getloadavg()[0]:.1f})"
    )
    print(
        f"assign: CPU: signer processes "
        f"{phases['signers_cpu']:.1f} s ({phases['signers_cpu'] / phases['ecus'] * 1000:.2f} "
        f"ms/vehicle), the assigning thread (rows) {phases['rows_cpu']:.1f} s; PostgreSQL "
        f"backends of both "
        f"{sum(cpu - pg_before.get(pid, 0.0) for pid, cpu in pg_seen.items()):.1f} s (sampled)"
    )
    print(
        f"assign: metadata_files after it: {files} rows ({files / phases['ecus']:.1f} per "
        f"vehicle), {files_bytes / 2**20:.0f} MiB with its indexes and TOAST"
    )
    print(
        f"assign: polls (at most {rate:.0f}/s) during it {n_ / wall:.0f}/s, latency p50 "
        f"{_pct(lat, 0.5) * 1000:.1f} ms p99 {_pct(lat, 0.99) * 1000:.1f} ms max "
        f"{max(lat) * 1000:.0f} ms; just before {base_n / base_wall:.0f}/s, p50 "
        f"{_pct(base_lat, 0.5) * 1000:.1f} ms p99 {_pct(base_lat, 0.99) * 1000:.1f} ms max "
        f"{max(base_lat) * 1000:.0f} ms; ratio={(n_ / wall) / (base_n / base_wall):.3f} "
        f"(polls/s during / before)"
    )


if __name__ == "__main__":
    main()

"""Manifest intake at fleet scale (issue 12): group commit, the manifests kept, cached keys.

``director.group_commit`` on its own (deterministic, with threads), then the
Director over SQLite and PostgreSQL with the fixtures of ``test_director``.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from helpers.director_env import (
    Env,
    new_car,
    put_manifest,
    register,
)
from securesystemslib.formats import encode_canonical
from securesystemslib.signer import CryptoSigner
from sqlalchemy import func, select, update

from director import manifest_route
from director.db import Ecu, Vehicle, VehicleManifestRecord
from director.group_commit import GroupCommit
from uptane.errors import ManifestError
from uptane.keys import public_key_dict

# --- group commit on its own -----------------------------------------------------------


def _wait_for(condition: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached")
        time.sleep(0.005)


def test_requests_waiting_on_a_commit_are_written_together() -> None:
    batches: list[list[str]] = []
    go = threading.Event()

    def write(items: Sequence[str]) -> list[str]:
        batches.append(list(items))
        if len(batches) == 1:
            assert go.wait(10)
        return [f"ok:{i}" for i in items]

    gc: GroupCommit[str, str] = GroupCommit(write, key=lambda i: i)
    with ThreadPoolExecutor(4) as pool:
        first = pool.submit(gc.submit, "a")
        _wait_for(lambda: batches == [["a"]])
        rest = [pool.submit(gc.submit, i) for i in ("b", "c", "d")]
        _wait_for(lambda: len(gc._queue) == 3)
        go.set()
        assert first.result(10) == "ok:a"
        assert [f.result(10) for f in rest] == ["ok:b", "ok:c", "ok:d"]
    assert batches == [["a"], ["b", "c", "d"]]
    assert gc._queue == []
    _wait_for(lambda: not gc._writing)


def test_one_item_per_key_in_a_batch_and_batches_capped() -> None:
    batches: list[list[tuple[str, int]]] = []
    go = threading.Event()

    def write(items: Sequence[tuple[str, int]]) -> list[int]:
        batches.append(list(items))
        if len(batches) == 1:
            assert go.wait(10)
        return [n for _, n in items]

    gc: GroupCommit[tuple[str, int], int] = GroupCommit(write, key=lambda i: i[0], max_batch=2)
    with ThreadPoolExecutor(5) as pool:
        first = pool.submit(gc.submit, ("x", 0))
        _wait_for(lambda: len(batches) == 1)
        later = []
        for item in (("x", 1), ("y", 2), ("x", 3), ("z", 4)):
            later.append(pool.submit(gc.submit, item))
            _wait_for(lambda: len(gc._queue) == len(later))  # queued in this order
        go.set()
        assert [first.result(10)] + [f.result(10) for f in later] == [0, 1, 2, 3, 4]
    assert batches[0] == [("x", 0)]
    assert batches[1] == [("x", 1), ("y", 2)]  # ("x", 3) waits for the next batch
    assert sorted(batches[2]) == [("x", 3), ("z", 4)]


def test_a_failing_batch_is_written_item_by_item() -> None:
    batches: list[list[str]] = []
    go = threading.Event()

    def write(items: Sequence[str]) -> list[str | BaseException]:
        batches.append(list(items))
        if len(batches) == 1:
            assert go.wait(10)
        if "bad" in items:
            raise RuntimeError("the database refused bad")
        return [ValueError("refused") if i == "no" else f"ok:{i}" for i in items]

    gc: GroupCommit[str, str] = GroupCommit(write, key=lambda i: i)
    with ThreadPoolExecutor(4) as pool:
        first = pool.submit(gc.submit, "a")
        _wait_for(lambda: len(batches) == 1)
        rest = {i: pool.submit(gc.submit, i) for i in ("b", "bad", "no")}
        _wait_for(lambda: len(gc._queue) == 3)
        go.set()
        assert first.result(10) == "ok:a"
        assert rest["b"].result(10) == "ok:b"
        with pytest.raises(RuntimeError, match="refused bad"):
            rest["bad"].result(10)
        with pytest.raises(ValueError, match="refused"):
            rest["no"].result(10)
    assert batches == [["a"], ["b", "bad", "no"], ["b"], ["bad"], ["no"]]


def test_event_loop_requests_share_the_writer_and_a_batch_with_threads() -> None:
    batches: list[list[str]] = []
    go = threading.Event()

    def write(items: Sequence[str]) -> list[str | BaseException]:
        batches.append(list(items))
        if len(batches) == 1:
            assert go.wait(10)
        return [ValueError("refused") if i == "no" else f"ok:{i}" for i in items]

    gc: GroupCommit[str, str] = GroupCommit(write, key=lambda i: i, idle=0.05)

    async def main() -> list[object]:
        first = asyncio.get_running_loop().run_in_executor(None, gc.submit, "a")
        await asyncio.to_thread(_wait_for, lambda: batches == [["a"]])
        futures = [gc.submit_async(i) for i in ("b", "no")]
        threaded = asyncio.get_running_loop().run_in_executor(None, gc.submit, "c")
        await asyncio.to_thread(_wait_for, lambda: len(gc._queue) == 3)
        go.set()
        return await asyncio.gather(first, *futures, threaded, return_exceptions=True)

    a, b, no, c = asyncio.run(main())
    assert (a, b, c) == ("ok:a", "ok:b", "ok:c")
    assert isinstance(no, ValueError)
    assert batches == [["a"], ["b", "no", "c"]]  # one transaction for both kinds of waiter
    _wait_for(lambda: gc._writer is None)  # idle: the writer thread ended
    assert gc.submit("d") == "ok:d"  # and a new one starts with the next item


def test_a_leader_waits_for_requests_being_checked_and_only_for_them() -> None:
    batches: list[list[str]] = []

    def write(items: Sequence[str]) -> list[str]:
        batches.append(list(items))
        return list(items)

    gc: GroupCommit[str, str] = GroupCommit(write, key=lambda i: i, max_wait=30.0)
    checked = threading.Event()

    def announced(item: str, refuse: bool) -> str:
        with gc.arriving() as arrival:
            assert checked.wait(10)
            if refuse:
                raise ValueError("refused while checking")
            return gc.submit(item, arrival)

    with ThreadPoolExecutor(3) as pool:
        a = pool.submit(announced, "a", False)
        refused = pool.submit(announced, "x", True)
        _wait_for(lambda: gc._arriving == 2)
        b = pool.submit(gc.submit, "b")  # the writer waits for "a" (and "x")
        _wait_for(lambda: gc._writer is not None and len(gc._queue) == 1)
        assert batches == []
        checked.set()
        assert (a.result(10), b.result(10)) == ("a", "b")
        with pytest.raises(ValueError, match="refused"):
            refused.result(10)
    assert batches == [["b", "a"]]  # one transaction, not 30 s late: "x" left
    assert gc._arriving == 0
    start = time.monotonic()
    assert gc.submit("c") == "c"  # nobody being checked: no wait
    assert time.monotonic() - start < 5


# --- the Director -------------------------------------------------------------------------


def _rows(env: Env, vin: str) -> int:
    with env.db.transaction() as s:
        return int(
            s.scalar(
                select(func.count())
                .select_from(VehicleManifestRecord)
                .join(Vehicle, Vehicle.id == VehicleManifestRecord.vehicle_id)
                .where(Vehicle.vin == vin)
            )
            or 0
        )


def _last_manifest(env: Env, vin: str) -> bytes | None:
    with env.db.transaction() as s:
        return s.scalar(select(Vehicle.last_manifest).where(Vehicle.vin == vin))


def _verified(sent: bytes) -> bytes:
    doc = json.loads(sent)
    return (
        encode_canonical({"signed": doc["signed"], "signatures": doc["signatures"]}) or ""
    ).encode()


def test_a_check_in_that_changes_nothing_keeps_only_the_latest_manifest(env: Env) -> None:
    car = register(env, new_car(n_secondaries=2))
    s0 = f"{car.vin}-S0"
    first = car.manifest()
    assert put_manifest(env, car, first).status_code == 200
    assert _rows(env, car.vin) == 1  # the first manifest is history
    assert _last_manifest(env, car.vin) == _verified(first)
    for _ in range(3):  # new counters and times only
        sent = car.manifest()
        assert put_manifest(env, car, sent).status_code == 200
        assert _rows(env, car.vin) == 1
        assert _last_manifest(env, car.vin) == _verified(sent)
    # a new install result is kept, with the result row pointing at it
    reports = {s: car.report(s) for s in car.ecus}
    reports[s0] = car.report(s0, last_result="trialFailed", last_result_text="self-test trap")
    sent = car.manifest(reports=reports)
    assert put_manifest(env, car, sent).status_code == 200
    assert _rows(env, car.vin) == 2
    assert [r.result for r in env.director.vehicle_status(car.vin).results] == ["trialFailed"]
    # an attack report is kept too
    reports = {s: car.report(s) for s in car.ecus}
    reports[s0] = car.report(
        s0,
        last_result="trialFailed",
        last_result_text="self-test trap",
        attacks_detected=("freeze",),
    )
    sent = car.manifest(reports=reports)
    assert put_manifest(env, car, sent).status_code == 200
    assert _rows(env, car.vin) == 3
    assert _last_manifest(env, car.vin) == _verified(sent)
    # a refused manifest changes neither
    r = put_manifest(env, car, sent)
    assert (r.status_code, r.json()["error"]) == (409, "replayed_report")
    assert _rows(env, car.vin) == 3
    assert _last_manifest(env, car.vin) == _verified(sent)


def test_concurrent_check_ins_are_all_recorded_and_a_replay_race_has_one_winner(
    env: Env,
) -> None:
    cars = [register(env, new_car(n_secondaries=2)) for _ in range(6)]
    for _ in range(2):
        sent = [(c.vin, c.manifest()) for c in cars]
        with ThreadPoolExecutor(6) as pool:
            receipts = list(pool.map(lambda vm: env.director.receive_manifest(*vm), sent))
        assert [r.vin for r in receipts] == [c.vin for c in cars]
    for car in cars:
        counters = {e.report_counter for e in env.director.vehicle_status(car.vin).ecus}
        assert counters == {2}
    # the same manifest twice at once: one is recorded, the other is a replay
    car = cars[0]
    sent_once = car.manifest()

    def attempt(_: int) -> str:
        try:
            env.director.receive_manifest(car.vin, sent_once)
            return "accepted"
        except ManifestError as e:
            return e.reason

    with ThreadPoolExecutor(4) as pool:
        outcomes = sorted(pool.map(attempt, range(4)))
    assert outcomes == ["accepted", "replayed_report", "replayed_report", "replayed_report"]


def test_a_check_in_with_cached_keys_is_checked_on_the_event_loop(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 12: only a vehicle's first check-in (per process) reads its keys in a thread."""
    hops: list[str] = []
    real = manifest_route.run_in_threadpool

    async def counted(func: Any, *args: Any) -> Any:
        hops.append(func.__name__)
        return await real(func, *args)

    monkeypatch.setattr(manifest_route, "run_in_threadpool", counted)
    car = register(env, new_car(n_secondaries=1))
    for _ in range(3):
        assert put_manifest(env, car, car.manifest()).status_code == 200
    assert hops == ["receive_manifest"]
    # a refusal with cached keys is re-checked with the registered keys, in a thread
    bad = car.manifest()
    doc = json.loads(bad)
    doc["signed"]["ecu_version_reports"].popitem()
    doc["signed"]["ecu_version_reports"]["NOT-AN-ECU"] = "AA=="
    r = put_manifest(env, car, json.dumps(doc).encode())
    assert (r.status_code, r.json()["error"]) == (403, "bad_primary_signature")
    assert hops == ["receive_manifest", "recheck_manifest"]


def test_cached_ecu_keys_are_checked_against_the_registered_ones(env: Env) -> None:
    """A key changed in the inventory: the new one is accepted at once, the old one never."""
    car = register(env, new_car(n_secondaries=1))
    s0 = f"{car.vin}-S0"
    assert put_manifest(env, car, car.manifest()).status_code == 200  # keys now cached
    old = car.ecus[s0].signer
    new = CryptoSigner.generate_ed25519()
    with env.db.transaction(write=True) as s:
        s.execute(
            update(Ecu).where(Ecu.serial == s0).values(public_key=public_key_dict(new.public_key))
        )
    # signed with the old key: passes the cached keys, not the locked rows
    r = put_manifest(env, car, car.manifest())
    assert (r.status_code, r.json()["error"]) == (403, "bad_ecu_signature")
    car.ecus[s0].signer = new  # signed with the new one: refused by the cache, then re-checked
    r = put_manifest(env, car, car.manifest())
    assert r.status_code == 200, r.text
    car.ecus[s0].signer = old
    r = put_manifest(env, car, car.manifest())
    assert (r.status_code, r.json()["error"]) == (403, "bad_ecu_signature")
    assert {e.report_counter for e in env.director.vehicle_status(car.vin).ecus} == {3}
    # and a vehicle removed from the inventory is unknown, cached keys or not
    with env.db.transaction(write=True) as s:
        vehicle = s.scalars(select(Vehicle).where(Vehicle.vin == car.vin)).one()
        s.delete(vehicle)
    car.ecus[s0].signer = new
    r = put_manifest(env, car, car.manifest())
    assert (r.status_code, r.json()["error"]) == (404, "unknown_vehicle")

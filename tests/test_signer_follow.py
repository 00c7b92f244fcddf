"""Signers that follow a running assignment, batch by batch (issue 12).

``MetadataSigner.sign_following`` and ``SignerProcesses``: the vehicles of
each committed batch are re-signed while the next batches are written; each
vehicle is signed exactly once per change and verifies as a primary checks
it (``helpers.signer_env.verify_vehicle``). SQLite and PostgreSQL.
"""

from __future__ import annotations

import dataclasses
import multiprocessing as mp
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from helpers.director_env import Env
from helpers.signer_env import fleet, signer_env, small_batches_fixture, verify_vehicle  # noqa: F401  (fixtures)
from sqlalchemy.engine import make_url
from tuf.api.metadata import Metadata, Targets
from tuf.api.serialization.json import JSONSerializer

from director.metadata_signer import SignerProcesses


def _assert_signed_once(env: Env, before: dict[str, int], image: str) -> None:
    """Each vehicle of ``before`` verifies one targets version up, its brake ECU on ``image``."""
    for vin, version in before.items():
        repo, by_ecu = verify_vehicle(env, vin)
        assert repo.targets.version == version + 1
        assert by_ecu[f"{vin}-B"].name == image


def _wait_until(condition: object, seconds: float = 30) -> bool:
    assert callable(condition)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return bool(condition())


def test_a_following_signer_signs_each_change_while_it_runs_and_ends_when_done(
    env: Env, small_batches: None
) -> None:
    first = [r.vin for r in fleet(env, "FOA", 9)]
    second = [r.vin for r in fleet(env, "FOB", 8)]
    before = {vin: verify_vehicle(env, vin)[0].targets.version for vin in first + second}
    done = threading.Event()
    result: list[int] = []
    errors: list[BaseException] = []

    def follow() -> None:
        try:
            result.append(env.director.sign_following(done, batch=2, idle=0.01))
        except BaseException as e:  # reported below
            errors.append(e)

    signer = threading.Thread(target=follow)
    signer.start()
    try:
        time.sleep(0.2)
        assert signer.is_alive()  # nothing stale yet, but the change is not done: it waits
        env.director.assign("brake-1.wasm", hardware_id="brake-ecu", vins=first, sign=False)
        # signed while the change is still running (done not set)
        assert _wait_until(lambda: env.director.stale_count() == 0)
        assert signer.is_alive()
        env.director.assign("brake-1.wasm", hardware_id="brake-ecu", vins=second, sign=False)
    finally:
        done.set()
        signer.join(timeout=60)
    assert not signer.is_alive() and not errors, errors
    assert result == [len(first) + len(second)]  # each vehicle once
    assert env.director.stale_count() == 0
    _assert_signed_once(env, before, "brake-1.wasm")


def test_signer_processes_sign_an_assignment_as_it_is_written(
    env: Env, small_batches: None
) -> None:
    """``SignerProcesses`` around ``assign(sign=False)``: every vehicle signed exactly once."""
    vins = [r.vin for r in fleet(env, "SPR", 40)]
    before = {vin: verify_vehicle(env, vin)[0].targets.version for vin in vins}
    with SignerProcesses(env.config, 2, batch=3) as signers:
        infos = env.director.assign("brake-2.wasm", hardware_id="brake-ecu", vins=vins, sign=False)
        assert sorted(a.vin for a in infos) == sorted(vins)
        assert signers.finish() == len(vins)
    assert env.director.stale_count() == 0
    _assert_signed_once(env, before, "brake-2.wasm")


def test_signer_processes_sign_what_a_failed_change_committed(env: Env) -> None:
    vins = [r.vin for r in fleet(env, "SPF", 6)]
    with (
        pytest.raises(RuntimeError, match="the change failed"),
        SignerProcesses(env.config, 2, batch=2),
    ):
        env.director.assign("brake-1.wasm", hardware_id="brake-ecu", vins=vins, sign=False)
        raise RuntimeError("the change failed")
    assert env.director.stale_count() == 0
    for vin in vins:
        assert verify_vehicle(env, vin)[1][f"{vin}-B"].name == "brake-1.wasm"


def test_a_deferred_assignment_wakes_the_signer_after_each_batch(
    env: Env, small_batches: None
) -> None:
    """The server's signer starts on the first committed batch, not after the last."""
    vins = [r.vin for r in fleet(env, "WAK", 15)]  # 3 batches of at most 7
    wakes: list[int] = []
    env.director.wake_signer = lambda: wakes.append(env.director.stale_count())
    env.director.defer_signing_above = 2
    try:
        env.director.assign("brake-1.wasm", hardware_id="brake-ecu", vins=vins)
    finally:
        env.director.wake_signer = None
        env.director.defer_signing_above = None
    assert len(wakes) == 3 and wakes[0] < wakes[-1]  # woken as each batch committed
    assert env.director.sign_stale() >= len(vins)
    for vin in vins:
        assert verify_vehicle(env, vin)[1][f"{vin}-B"].name == "brake-1.wasm"


def test_signed_json_is_what_tuf_serialises(env: Env) -> None:
    """The documents are built with ``to_dict`` once (metadata_build): the bytes are tuf's."""
    vin = fleet(env, "JSN", 1)[0].vin
    env.director.assign("brake-1.wasm", hardware_id="brake-ecu", vins=[vin])
    for name in ("targets.json", "snapshot.json", "timestamp.json"):
        data = env.http.get(f"/vehicles/{vin}/metadata/{name}").content
        assert Metadata[Targets].from_bytes(data).to_bytes(JSONSerializer(compact=True)) == data


def _assign_and_die(config_dir: str, db_url: str, vins: list[str], pids: Any) -> None:
    """Start signer processes, write an assignment, and get killed before ``finish``."""
    from director.config import DirectorConfig
    from director.service import Director

    config = DirectorConfig.load(config_dir)
    config.db_url = db_url
    director = Director.from_config(config, migrate=False)
    director.assign_batch = 4
    signers = SignerProcesses(config, 2, batch=3).__enter__()
    pids.put([p.pid for p in signers._procs])
    director.assign("brake-2.wasm", hardware_id="brake-ecu", vins=vins, sign=False)
    os.kill(os.getpid(), signal.SIGKILL)


def _gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return True
    return state in ("Z", "X")


def test_signer_processes_of_a_killed_assignment_sign_what_it_committed_and_exit(
    env: Env,
) -> None:
    """Killed mid-change (before ``finish``): the vehicles are signed once, the signers exit."""
    if env.db.engine.dialect.name != "postgresql":
        pytest.skip("signer processes run on PostgreSQL (SQLite has one writer)")
    vins = [r.vin for r in fleet(env, "KIL", 14)]
    before = {vin: verify_vehicle(env, vin)[0].targets.version for vin in vins}
    ctx = mp.get_context("spawn")
    pids: Any = ctx.Queue()
    parent = ctx.Process(
        target=_assign_and_die, args=(str(env.tmp / "dir"), env.config.db_url, vins, pids)
    )
    parent.start()
    signer_pids = pids.get(timeout=60)
    parent.join(timeout=60)
    assert parent.exitcode == -signal.SIGKILL
    assert _wait_until(lambda: all(_gone(pid) for pid in signer_pids), 60)
    assert env.director.stale_count() == 0
    _assert_signed_once(env, before, "brake-2.wasm")


def test_a_failed_signer_process_is_an_error_not_a_hang(env: Env) -> None:
    """A signer process that fails makes ``finish`` raise, and leaving the block returns."""
    if env.db.engine.dialect.name != "postgresql":
        pytest.skip("signer processes run on PostgreSQL (SQLite has one writer)")
    url = make_url(env.config.db_url).update_query_dict({"options": "-csearch_path=no_such_schema"})
    bad = dataclasses.replace(env.config, db_url=url.render_as_string(hide_password=False))
    outcome: list[BaseException | None] = []

    def run() -> None:
        try:
            with SignerProcesses(bad, 2) as signers:
                signers.finish()
            outcome.append(None)
        except BaseException as e:  # reported below
            outcome.append(e)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout=120)
    assert not thread.is_alive()
    assert len(outcome) == 1 and isinstance(outcome[0], RuntimeError), outcome
    assert "signer process failed" in str(outcome[0])

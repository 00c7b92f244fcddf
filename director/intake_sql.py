"""The SQL of the check-in path (``director.intake``): Core statements, built once.

Issue 12: no ORM objects on the check-in path; a statement object memoises its
SQL cache key, so reusing it saves building and hashing it per request.
"""

from __future__ import annotations

from collections import namedtuple
from collections.abc import Mapping
from typing import Any

from sqlalchemy import (
    ColumnElement,
    Connection,
    Dialect,
    Integer,
    Select,
    String,
    Table,
    TextClause,
    any_,
    bindparam,
    exists,
    insert,
    select,
    update,
)
from sqlalchemy import text as sql_text
from sqlalchemy.dialects.postgresql import ARRAY

from director.campaign_outcomes import OBSERVED
from director.db import (
    Assignment,
    DetectedAttack,
    Ecu,
    InstallResult,
    Vehicle,
    VehicleManifestRecord,
)
from director.fleet_db import CampaignVehicle, EcuHealthRecord
from director.records import INSTALLED, PENDING
from director.signing import _LATEST_ROOT

# Statements of the check-in path, built once, Core only (see ``director.signing``).
VEHICLES = Vehicle.__table__
ECUS = Ecu.__table__
ASSIGNMENTS = Assignment.__table__
MANIFESTS = VehicleManifestRecord.__table__
ATTACKS = DetectedAttack.__table__
RESULTS = InstallResult.__table__
assert isinstance(VEHICLES, Table) and isinstance(ECUS, Table)
assert isinstance(ASSIGNMENTS, Table) and isinstance(MANIFESTS, Table)
assert isinstance(ATTACKS, Table) and isinstance(RESULTS, Table)

# a vehicle's ECUs and keys (manifest checks before the lock)
ECU_KEYS = (
    select(ECUS.c.serial, ECUS.c.hardware_id, ECUS.c.is_primary, ECUS.c.public_key)
    .join(VEHICLES, ECUS.c.vehicle_id == VEHICLES.c.id)
    .where(VEHICLES.c.vin == bindparam("vin"))
)
# the vehicles of a batch, locked in VIN order as every writer of several vehicles
# locks them (``director.assignments``): no deadlock between them; with
# their metadata state and the latest root version


def _lock_vehicles(vins: ColumnElement[bool]) -> Select[Any]:
    return (
        select(
            VEHICLES.c.id,
            VEHICLES.c.vin,
            VEHICLES.c.metadata_expires,
            VEHICLES.c.targets_version,
            VEHICLES.c.root_version,
            _LATEST_ROOT.label("latest_root"),
        )
        .where(vins)
        .order_by(VEHICLES.c.vin)
        .with_for_update(of=VEHICLES)
    )


LOCK_VEHICLES = _lock_vehicles(VEHICLES.c.vin.in_(bindparam("vins", expanding=True)))
# PostgreSQL: one array parameter, so the statement's text is the same for any batch
LOCK_VEHICLES_PG = _lock_vehicles(VEHICLES.c.vin == any_(bindparam("vins", type_=ARRAY(String))))
# a vehicle's last check-in and latest manifest (SQLite: one per vehicle)
TOUCH_VEHICLE = (
    update(VEHICLES)
    .where(VEHICLES.c.id == bindparam("b_id"))
    .values(last_seen=bindparam("b_now"), last_manifest=bindparam("b_body"))
)


# each ECU's report state, pending assignment (at most one), last health and
# whether the vehicle is in a campaign, under the lock: a statement of its own,
# so it sees what committed while it waited (READ COMMITTED); also what
# ``director.fleet`` compares the reports with
def _ecu_state(vehicle_ids: ColumnElement[bool], observed: ColumnElement[bool]) -> Select[Any]:
    return (
        select(
            ECUS.c.id,
            ECUS.c.vehicle_id,
            ECUS.c.serial,
            ECUS.c.hardware_id,
            ECUS.c.public_key["keyid"].as_string().label("keyid"),
            ECUS.c.installed,
            ECUS.c.last_report_counter,
            ECUS.c.last_report_time,
            ECUS.c.last_result,
            ECUS.c.last_result_text,
            ASSIGNMENTS.c.id.label("a_id"),
            ASSIGNMENTS.c.image.label("a_image"),
            ASSIGNMENTS.c.length.label("a_length"),
            ASSIGNMENTS.c.hashes.label("a_hashes"),
            ASSIGNMENTS.c.custom.label("a_custom"),
            ASSIGNMENTS.c.created_at.label("a_created_at"),
            EcuHealthRecord.status.label("health_status"),
            EcuHealthRecord.traps.label("health_traps"),
            EcuHealthRecord.capability_denials.label("health_denials"),
            EcuHealthRecord.rollbacks.label("health_rollbacks"),
            EcuHealthRecord.payload.label("health_payload"),
            exists()
            .where(CampaignVehicle.vehicle_id == ECUS.c.vehicle_id, observed)
            .label("in_campaign"),
        )
        .select_from(ECUS)
        .outerjoin(
            ASSIGNMENTS,
            (ASSIGNMENTS.c.ecu_id == ECUS.c.id) & (ASSIGNMENTS.c.status == PENDING),
        )
        .outerjoin(EcuHealthRecord, EcuHealthRecord.ecu_id == ECUS.c.id)
        .where(vehicle_ids)
    )


ECU_STATE = _ecu_state(
    ECUS.c.vehicle_id.in_(bindparam("vehicle_ids", expanding=True)),
    CampaignVehicle.status.in_(OBSERVED),
)
# PostgreSQL: array parameters only (no IN list expanded per execution)
ECU_STATE_PG = _ecu_state(
    ECUS.c.vehicle_id == any_(bindparam("vehicle_ids", type_=ARRAY(Integer))),
    CampaignVehicle.status == any_(bindparam("observed", sorted(OBSERVED), type_=ARRAY(String))),
)
INSERT_MANIFEST = insert(MANIFESTS).returning(MANIFESTS.c.id)
INSERT_ATTACK = insert(ATTACKS)
INSERT_RESULT = insert(RESULTS)
COMPLETE = (
    update(ASSIGNMENTS)
    .where(ASSIGNMENTS.c.id == bindparam("b_id"), ASSIGNMENTS.c.status == PENDING)
    .values(status=INSTALLED, updated_at=bindparam("b_now"))
)
# the vehicles' last check-in and latest manifest (hex) and every ECU's new report
# state, in one statement (PostgreSQL); its row count is the ECUs'
WRITE_STATE_PG = sql_text(
    "WITH touched AS (UPDATE vehicles SET last_seen = v.at, "
    "last_manifest = decode(v.body, 'hex') "
    "FROM jsonb_to_recordset(CAST(:vehicles AS jsonb)) AS v(id integer, at timestamp, body text) "
    "WHERE vehicles.id = v.id RETURNING vehicles.id) "
    "UPDATE ecus SET last_report_counter = e.counter, last_report_at = e.at, "
    "last_report_time = e.time, installed = e.installed, last_result = e.result, "
    "last_result_text = e.text "
    "FROM jsonb_to_recordset(CAST(:ecus AS jsonb)) AS e(id integer, counter bigint, "
    "at timestamp, time timestamp, installed json, result text, text text) "
    "WHERE ecus.id = e.id"
)
# ... or one per ECU (SQLite)
UPDATE_ECU = (
    update(ECUS)
    .where(ECUS.c.id == bindparam("b_ecu_id"))
    .values(
        last_report_counter=bindparam("counter"),
        last_report_at=bindparam("at"),
        last_report_time=bindparam("time"),
        installed=bindparam("b_installed"),
        last_result=bindparam("result"),
        last_result_text=bindparam("text"),
    )
)


class DriverStatement:
    """A Core statement compiled once per dialect, run on the DBAPI cursor (PostgreSQL).

    Issue 12: on the check-in path SQLAlchemy's per-execution work (execution
    context, result metadata from the cursor's description) costs more CPU
    than the statement; these statements run on the transaction's own DBAPI
    connection (same transaction), their SQL and constant parameters made by
    SQLAlchemy's compiler, each column's value by its type's result processor
    (``TypeEngine.result_processor``: ``UTCDateTime`` as for any query).
    """

    def __init__(self, statement: Select[Any] | TextClause) -> None:
        self.statement = statement
        self._compiled: dict[str, tuple[str, dict[str, Any], Any, list[Any]]] = {}

    def _compile(self, dialect: Dialect) -> tuple[str, dict[str, Any], Any, list[Any]]:
        done = self._compiled.get(dialect.name)
        if done is None:
            compiled = self.statement.compile(dialect=dialect)
            constants = {k: v for k, v in compiled.params.items() if v is not None}
            columns = list(getattr(self.statement, "selected_columns", ()))
            row = namedtuple("Row", [c.key for c in columns]) if columns else None
            processors = [
                c.type.dialect_impl(dialect).result_processor(dialect, None) for c in columns
            ]
            done = self._compiled[dialect.name] = (compiled.string, constants, row, processors)
        return done

    def rows(self, conn: Connection, params: Mapping[str, Any]) -> list[Any]:
        """The statement's rows (attributes named as its columns)."""
        sql, constants, row, processors = self._compile(conn.dialect)
        raw = self._run(conn, sql, {**constants, **params}, fetch=True)
        if not any(processors):
            return [row._make(r) for r in raw]
        return [
            row._make([v if p is None else p(v) for p, v in zip(processors, r, strict=True)])
            for r in raw
        ]

    def rowcount(self, conn: Connection, params: Mapping[str, Any]) -> int:
        """Run the statement; the number of rows it changed."""
        sql, constants, _, _ = self._compile(conn.dialect)
        return int(self._run(conn, sql, {**constants, **params}, fetch=False))

    @staticmethod
    def _run(conn: Connection, sql: str, params: dict[str, Any], fetch: bool) -> Any:
        """Execute on the DBAPI cursor: all rows, or the row count.

        A DBAPI error is handed to SQLAlchemy's own handling, as if it had run
        the statement: wrapped (``OperationalError``...), and on a lost
        connection the pool invalidated (``director.http_layer.DatabaseUnavailable``).
        """
        driver = conn.connection.driver_connection
        if driver is None:  # a detached connection: no transaction to run in
            raise RuntimeError("the connection has no DBAPI connection")
        cursor = driver.cursor()
        try:
            cursor.execute(sql, params)
            return cursor.fetchall() if fetch else cursor.rowcount
        except conn.dialect.loaded_dbapi.Error as e:
            conn._handle_dbapi_exception(e, sql, params, cursor, None)
        finally:
            cursor.close()


LOCK_VEHICLES_DRIVER = DriverStatement(LOCK_VEHICLES_PG)
ECU_STATE_DRIVER = DriverStatement(ECU_STATE_PG)
WRITE_STATE_DRIVER = DriverStatement(WRITE_STATE_PG)

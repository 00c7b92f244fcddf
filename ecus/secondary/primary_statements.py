"""What a secondary accepts from its primary: signed report receipts and signed time (DESIGN 7).

Both are statements signed by the primary's key, provisioned on the secondary
like the Director root (``primary_key``). A time message is bound to a nonce
this ECU issued (each good once) and moves the time floor at most
``max_time_ahead`` past the ECU's clock; a receipt names the counter of this
ECU's last report the Director recorded, and only the attacks that report
carried are then cleared. Anything else is refused and recorded as an attack.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable, Mapping
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, Final

from securesystemslib.signer import Key

from ecus.secondary.slots import SlotStore
from uptane import codec
from uptane.errors import ReplayedMessageError, SpoofedMessageError
from uptane.manifest import verify_statement

if TYPE_CHECKING:
    from ecus.secondary.report_state import ReportState

#: Time nonces an ECU keeps outstanding (each good for one time message).
MAX_TIME_NONCES: Final = 4
TIME_NONCE_BYTES: Final = 16


def _utc(value: datetime) -> datetime:
    if value.tzinfo is None:
        raise ValueError("the ECU clock must return timezone-aware datetimes")
    return value.astimezone(UTC)


class PrimaryStatements:
    """Receipts and time messages; mixed into ``Secondary``, which provides the rest."""

    identity: Any
    primary_key: Key | None
    store: SlotStore
    clock: Callable[[], datetime]
    max_time_ahead: timedelta | None
    _time_nonces: deque[bytes]

    if TYPE_CHECKING:

        @property
        def report_state(self) -> ReportState: ...

        def _save_report_state(self, state: ReportState) -> None: ...

        def _note_attack(self, attack: str | None, text: str) -> None: ...

        def reference_time(self) -> datetime: ...

        @staticmethod
        def _ack(code: str, text: str = "") -> bytes: ...

    def _on_receipt(self, counter: int | None, signatures: Any) -> None:
        """Clear the attacks the Director recorded, if the primary signed the receipt."""
        if self.primary_key is None:
            return  # not provisioned: no receipt can be checked, attacks stay reported
        try:
            if counter is None:
                raise SpoofedMessageError("report receipt names no counter")
            receipt = {"ecuSerial": self.identity.ecu_serial, "reportCounter": counter}
            verify_statement("reportReceipt", receipt, signatures, self.primary_key)
        except SpoofedMessageError as e:
            self._note_attack(e.attack, f"report receipt refused: {e}")
            return
        if counter > self.store.report_counter:
            self._note_attack(
                SpoofedMessageError.attack,
                f"report receipt names counter {counter}, never issued "
                f"(last is {self.store.report_counter})",
            )
            return
        self._save_report_state(self.report_state.cleared(counter))

    def _on_time_nonce(self, value: Mapping[str, Any]) -> bytes:
        nonce = os.urandom(TIME_NONCE_BYTES)
        self._time_nonces.append(nonce)
        return codec.encode_message("timeNonceResponse", {"nonce": nonce})

    def _check_time_message(self, value: Mapping[str, Any]) -> datetime:
        """The time of an authentic, fresh time message; else a typed error (DESIGN 7)."""
        if "nonce" not in value or "signatures" not in value:
            raise SpoofedMessageError("time message is not signed")
        nonce = bytes(value["nonce"])
        statement = {"ecuSerial": self.identity.ecu_serial, "nonce": nonce, "time": value["time"]}
        verify_statement("time", statement, value["signatures"], self.primary_key)
        if nonce not in self._time_nonces:
            raise ReplayedMessageError("time message carries a nonce this ECU did not issue")
        self._time_nonces.remove(nonce)  # good once
        return datetime.fromtimestamp(value["time"], UTC)

    def _on_time(self, value: Mapping[str, Any]) -> bytes:
        if self.primary_key is None:
            return self._ack("badRequest", "no primary key is provisioned: time is not accepted")
        try:
            when = self._check_time_message(value)
        except (SpoofedMessageError, ReplayedMessageError) as e:
            self._note_attack(e.attack, f"time message refused: {e}")
            return self._ack("badRequest", f"time message refused ({e.attack}): {e}")
        floor = self.store.time_floor
        # time messages carry whole seconds: compare at that resolution
        if floor is not None and when < floor.replace(microsecond=0):
            return self._ack("badRequest", f"time {when.isoformat()} is before the floor")
        if self.max_time_ahead is not None:
            limit = _utc(self.clock()) + self.max_time_ahead
            if when > limit:
                return self._ack(
                    "badRequest", f"time {when.isoformat()} is too far ahead of the ECU clock"
                )
        self.store.advance_time_floor(when)
        return self._ack("ok", f"time floor is {self.reference_time().isoformat()}")

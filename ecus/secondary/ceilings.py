"""ECU ceilings on the signed limits of a WASM image (DESIGN 5; issue 10).

Signed ``limits`` are the image's; the ECU caps them, so a huge signed fuel
or memory budget cannot hold a small ECU: an image above the ceilings is
refused (at the offer, before any byte moves), and every call is bounded in
wall-clock time by the WASM host whatever its fuel.
"""

from __future__ import annotations

import itertools
import threading
import time
from dataclasses import dataclass

import wasmtime

from uptane.errors import WasmLimitsExceededError
from uptane.metadata import Limits


@dataclass(frozen=True)
class WasmCeilings:
    """What this ECU grants an image at most, whatever its signed ``limits`` say.

    Defaults fit a small ECU: 4 MiB of linear memory, 20 M fuel per call
    (a few tens of milliseconds of work), 100 M for the self-test, and one
    second of wall-clock time per call.
    """

    fuel_per_call: int = 20_000_000
    self_test_fuel: int = 100_000_000
    memory_pages: int = 64
    call_seconds: float = 1.0

    def __post_init__(self) -> None:
        for name in ("fuel_per_call", "self_test_fuel", "memory_pages"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"ceiling {name} must be a positive integer")
        seconds = self.call_seconds
        if isinstance(seconds, bool) or not isinstance(seconds, int | float) or seconds <= 0:
            raise ValueError("ceiling call_seconds must be a positive number")

    def check(self, limits: Limits) -> None:
        """Raise ``WasmLimitsExceededError`` naming every signed limit above its ceiling."""
        over = [
            f"{name} {getattr(limits, name)} > {getattr(self, name)}"
            for name in ("fuel_per_call", "self_test_fuel", "memory_pages")
            if getattr(limits, name) > getattr(self, name)
        ]
        if over:
            raise WasmLimitsExceededError(
                "signed limits exceed this ECU's ceilings: " + ", ".join(over)
            )


class EpochWatchdog:
    """Bumps a wasmtime engine's epoch once a call's wall-clock bound has passed.

    One daemon thread serves every engine of the process; it sleeps while no
    call is running. ``arm`` before a call (whose store's epoch deadline is one
    tick ahead), ``disarm`` after it: a call that outlives its bound traps.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._armed: dict[int, tuple[float, wasmtime.Engine]] = {}
        self._tokens = itertools.count()
        self._thread: threading.Thread | None = None

    def arm(self, engine: wasmtime.Engine, seconds: float) -> int:
        with self._cond:
            token = next(self._tokens)
            self._armed[token] = (time.monotonic() + seconds, engine)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="wasm-epoch", daemon=True)
                self._thread.start()
            self._cond.notify()
            return token

    def disarm(self, token: int) -> None:
        with self._cond:
            self._armed.pop(token, None)

    def _run(self) -> None:
        with self._cond:
            while True:
                if not self._armed:
                    self._cond.wait()
                    continue
                now = time.monotonic()
                for token, (deadline, engine) in list(self._armed.items()):
                    if deadline <= now:
                        del self._armed[token]
                        engine.increment_epoch()
                if self._armed:
                    self._cond.wait(min(d for d, _ in self._armed.values()) - now)


#: The process-wide watchdog of the WASM hosts.
WATCHDOG = EpochWatchdog()

"""The WASM host of a secondary ECU, on wasmtime (DESIGN 5; Uptane 2.1, 5.4.3).

An image is a binary WebAssembly module. It runs in a wasmtime ``Store`` with
fuel (a deterministic budget per call) and a memory cap taken from the
image's signed ``limits``; the only way out of the sandbox is the host
functions that its signed ``capabilities`` grant.

ABI (version 1; its tables and static check: ``uptane.wasm_abi``)
-------------------------------------------------------------------
Imports, all from module ``"uptane"``; each is granted only if its
capability (in brackets) is among the image's signed capabilities:

- ``log(ptr: i32, len: i32)`` [``log``]: UTF-8 text at ``ptr`` in the
  module's memory goes to the log sink (at most ``MAX_LOG_BYTES`` bytes kept,
  at most ``MAX_LOGS_PER_CALL`` messages per call); a range outside memory
  traps.
- ``health(code: i32)`` [``health``]: 0 = healthy; any other code fails a
  trial (``WasmHealthFailedError``).
- ``sensor_read(channel: i32) -> i64`` [``sensor.read``]: a sensor reading.
- ``actuator_write(channel: i32, value: i64) -> i32`` [``actuator.write``]:
  0 = written; -1 = refused because the call already made
  ``actuator_writes_per_tick`` writes (a rate-limit violation is recorded).

Any other import (another module, another name, a memory/table/global
import) or an import the capabilities do not grant fails with
``WasmForbiddenImportError`` before any code of the module runs (the start
function included); a granted import with the wrong signature is
``WasmInvalidModuleError``.

Exports: ``memory`` (the one linear memory, 32-bit), ``self_test() -> i32``
(0 = pass), ``tick(t: i64) -> i64`` (the module's output for tick ``t``: its
observable behaviour), optional ``version() -> i32``. A missing or mistyped
export is ``WasmMissingExportError``.

Limits (``uptane.metadata.Limits``): every call (the start function, each
tick) gets ``fuel_per_call`` fuel, ``self_test`` gets ``self_test_fuel``;
running out is ``WasmFuelExhaustedError``. Linear memory is capped at
``memory_pages`` 64 KiB pages by the store limiter: a module that declares a
larger minimum is refused (``WasmMemoryLimitError``) before it runs, and
``memory.grow`` past the cap returns -1, so a module can never hold more. A
trap (``unreachable`` or an out-of-bounds access, as an allocator failure
ends in) while the memory has grown to the cap is reported as
``WasmMemoryLimitError``; any other trap is ``WasmTrapError``.

ECU ceilings (``WasmCeilings``): signed limits are the image's; the ECU
caps them. An image whose ``fuel_per_call``, ``self_test_fuel`` or
``memory_pages`` exceed the ECU's ceilings is refused
(``WasmLimitsExceededError``: the secondary checks at the offer, before any
byte moves, and ``load`` checks again). Every call also has a wall-clock
bound (``call_seconds``) whatever its fuel, enforced by wasmtime epoch
interruption: a watchdog thread bumps the engine's epoch when the bound
passes and the call traps (``WasmTimeoutError``). Calls on one host are
serialized, so one call's bound never cuts another short.

A trial (``WasmHost.trial``) compiles and instantiates the module, runs
``self_test``, then ``confirm_ticks`` ticks, then ``version()``: every call
into the module is inside the trial, and the first failure (a ``WasmError``,
or any error of a host function, ``WasmHostError``) stops it and names its
``reason`` (``uptane.errors.WASM_REASONS``). Rate-limit violations do not
fail a trial (the write is refused, the module sees -1); they are counted in
the result for the ECU to report.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Final, TypeVar

import wasmtime

from ecus.secondary.ceilings import WATCHDOG, WasmCeilings
from ecus.secondary.peripherals import Peripherals, SimPeripherals
from uptane.errors import (
    UptaneError,
    WasmError,
    WasmFuelExhaustedError,
    WasmHealthFailedError,
    WasmHostError,
    WasmInvalidModuleError,
    WasmMemoryLimitError,
    WasmMissingExportError,
    WasmSelfTestFailedError,
    WasmTimeoutError,
    WasmTrapError,
)
from uptane.metadata import (
    Limits,
    check_capabilities,
)
from uptane.wasm_abi import (
    ABI_MODULE,
    EXPORTS,
    HOST_FUNCTIONS,
    WASM_MAGIC,
    check_exports,
    check_imports,
)

__all__ = ["Peripherals", "SimPeripherals", "TrialResult", "WasmApp", "WasmCeilings", "WasmHost"]

_T = TypeVar("_T")

PAGE_SIZE: Final = 65536
MAX_LOG_BYTES: Final = 1024
MAX_LOGS_PER_CALL: Final = 64
# Store limits besides memory: one instance, one memory, a few small tables.
MAX_TABLES: Final = 4
MAX_TABLE_ELEMENTS: Final = 65536

_I64_MIN: Final = -(2**63)
_I64_MAX: Final = 2**63 - 1

# Traps an allocator failure ends in; at the memory cap they mean "out of memory".
_OOM_TRAPS: Final = frozenset(
    {wasmtime.TrapCode.UNREACHABLE, wasmtime.TrapCode.MEMORY_OUT_OF_BOUNDS}
)


def _trap_text(trap: wasmtime.Trap) -> str:
    lines = [line.strip() for line in trap.message.splitlines() if line.strip()]
    return lines[-1] if lines else "trap"


@dataclass(frozen=True)
class TrialResult:
    """Outcome of trying an image: self-test plus confirmation window (DESIGN 5).

    ``reason`` is None when ``passed``, else one of ``uptane.errors.WASM_REASONS``.
    ``app`` is the instance that passed, ready to keep running (None on failure).
    """

    passed: bool
    reason: str | None
    detail: str
    ticks_run: int
    outputs: tuple[int, ...]
    self_test_code: int | None = None
    version: int | None = None
    rate_limit_violations: int = 0
    fuel_used: int = 0
    app: WasmApp | None = field(default=None, repr=False, compare=False)


class WasmHost:
    """Compiles and runs images; holds the one wasmtime ``Engine`` of an ECU."""

    def __init__(self, ceilings: WasmCeilings | None = None) -> None:
        self.ceilings = ceilings if ceilings is not None else WasmCeilings()
        config = wasmtime.Config()
        config.consume_fuel = True
        config.epoch_interruption = True
        config.wasm_threads = False
        config.shared_memory = False
        config.wasm_multi_memory = False
        config.wasm_memory64 = False
        config.cranelift_nan_canonicalization = True
        config.wasm_relaxed_simd_deterministic = True
        self.engine = wasmtime.Engine(config)
        # One call at a time on this engine: a call's epoch bump must not cut another short.
        self._calls = threading.Lock()

    def compile(
        self, module_bytes: bytes, capabilities: Iterable[str], limits: Limits
    ) -> wasmtime.Module:
        """Compile ``module_bytes`` and check its imports, exports and memory.

        Raises a ``WasmError`` before any of the module's code has run.
        """
        granted = set(check_capabilities(capabilities))
        if not module_bytes.startswith(WASM_MAGIC):
            # wasmtime would parse non-binary input as WAT text: images are binary only.
            raise WasmInvalidModuleError("image is not a binary WebAssembly module")
        try:
            module = wasmtime.Module(self.engine, module_bytes)
        except wasmtime.WasmtimeError as e:
            raise WasmInvalidModuleError(f"invalid WebAssembly module: {_first_line(e)}") from None
        check_imports(module, granted)
        check_exports(module, limits)
        return module

    def load(
        self,
        module_bytes: bytes,
        capabilities: Iterable[str],
        limits: Limits,
        peripherals: Peripherals,
    ) -> WasmApp:
        """Compile, check and instantiate an image under its limits (no self-test).

        Raises ``WasmLimitsExceededError`` first if ``limits`` exceed the ceilings.
        """
        self.ceilings.check(limits)
        caps = check_capabilities(capabilities)
        module = self.compile(module_bytes, caps, limits)
        return WasmApp(
            self.engine,
            module,
            caps,
            limits,
            peripherals,
            call_seconds=self.ceilings.call_seconds,
            call_lock=self._calls,
        )

    def trial(
        self,
        module_bytes: bytes,
        capabilities: Iterable[str],
        limits: Limits,
        peripherals: Peripherals,
        *,
        start_tick: int = 0,
    ) -> TrialResult:
        """Try an image: load, ``self_test`` within its budget, the confirmation window,
        then ``version()``.

        Ticks ``start_tick .. start_tick + confirm_ticks - 1`` each run within
        ``fuel_per_call``. Any ``WasmError`` (including a non-zero self-test
        result or a non-zero health code) or any other error under the module
        (``WasmHostError``) ends the trial as not passed. Only bad arguments
        raise (``MetadataError`` for unknown capabilities).
        """
        outputs: list[int] = []
        app: WasmApp | None = None
        self_test_code: int | None = None
        try:
            try:
                app = self.load(module_bytes, capabilities, limits, peripherals)
                self_test_code = app.self_test()
                if self_test_code != 0:
                    raise WasmSelfTestFailedError(f"self_test returned {self_test_code}")
                app.check_health("self_test")
                for t in range(start_tick, start_tick + limits.confirm_ticks):
                    outputs.append(app.tick(t))
                    app.check_health(f"tick {t}")
                version = app.version()
                app.check_health("version")
            except UptaneError:  # a WasmError, or bad arguments (MetadataError)
                raise
            except Exception as e:  # anything else under the module is a host failure
                raise WasmHostError(f"trial failed: {type(e).__name__}: {e}") from e
        except WasmError as e:
            return TrialResult(
                passed=False,
                reason=e.reason,
                detail=str(e),
                ticks_run=len(outputs),
                outputs=tuple(outputs),
                self_test_code=self_test_code,
                rate_limit_violations=app.rate_limit_violations if app else 0,
                fuel_used=app.fuel_used if app else 0,
            )
        return TrialResult(
            passed=True,
            reason=None,
            detail=f"self_test passed and {len(outputs)} ticks confirmed",
            ticks_run=len(outputs),
            outputs=tuple(outputs),
            self_test_code=self_test_code,
            version=version,
            rate_limit_violations=app.rate_limit_violations,
            fuel_used=app.fuel_used,
            app=app,
        )


def _first_line(e: Exception) -> str:
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return "; ".join(lines[:3]) if lines else type(e).__name__


class WasmApp:
    """One instantiated image, called under its limits (DESIGN 5).

    Not thread-safe. After a call fails with a ``WasmError`` the app is
    stopped: every later call raises that error again.
    """

    def __init__(
        self,
        engine: wasmtime.Engine,
        module: wasmtime.Module,
        capabilities: Iterable[str],
        limits: Limits,
        peripherals: Peripherals,
        *,
        call_seconds: float = WasmCeilings.call_seconds,
        call_lock: threading.Lock | None = None,
    ) -> None:
        self.limits = limits
        self.call_seconds = call_seconds
        self._engine = engine
        self._call_lock = call_lock if call_lock is not None else threading.Lock()
        self.capabilities = check_capabilities(capabilities)
        self.peripherals = peripherals
        self.rate_limit_violations = 0
        self.logs_dropped = 0
        self.fuel_used = 0
        self.health = 0
        self.health_reports: list[int] = []
        self._failed: WasmError | None = None
        self._call_name = "instantiate"
        self._writes_this_call = 0
        self._logs_this_call = 0
        self._bad_health_this_call: list[int] = []

        self._store = wasmtime.Store(engine)
        self._store.set_limits(
            memory_size=limits.memory_pages * PAGE_SIZE,
            table_elements=MAX_TABLE_ELEMENTS,
            instances=1,
            tables=MAX_TABLES,
            memories=1,
        )
        linker = wasmtime.Linker(engine)
        self._define_host_functions(linker)
        self._memory: wasmtime.Memory | None = None
        self._initial_pages = 0
        instance = self._run(
            "instantiate", limits.fuel_per_call, lambda: linker.instantiate(self._store, module)
        )
        exports = instance.exports(self._store)
        memory = exports["memory"]
        if not isinstance(memory, wasmtime.Memory):  # pragma: no cover - checked in compile
            raise WasmMissingExportError("'memory' export is not a memory")
        self._memory = memory
        self._initial_pages = memory.size(self._store)
        self._funcs: dict[str, wasmtime.Func] = {}
        for name in (f.name for f in EXPORTS):
            func = exports.get(name)
            if isinstance(func, wasmtime.Func):
                self._funcs[name] = func

    # --- host functions -----------------------------------------------------

    def _define_host_functions(self, linker: wasmtime.Linker) -> None:
        impls: dict[str, tuple[Callable[..., object], bool]] = {
            "log": (self._host_log, True),
            "health": (self._host_health, False),
            "sensor_read": (self._host_sensor_read, False),
            "actuator_write": (self._host_actuator_write, False),
        }
        for spec in HOST_FUNCTIONS:
            if spec.capability not in self.capabilities:
                continue
            func, access_caller = impls[spec.name]
            linker.define_func(
                ABI_MODULE, spec.name, spec.functype(), func, access_caller=access_caller
            )

    def _host_log(self, caller: wasmtime.Caller, ptr: int, length: int) -> None:
        memory = caller.get("memory")
        if not isinstance(memory, wasmtime.Memory):
            raise WasmTrapError(f"{self._call_name}: log called without an exported memory")
        size = memory.data_len(caller)
        if ptr < 0 or length < 0 or ptr + length > size:
            raise WasmTrapError(
                f"{self._call_name}: log({ptr}, {length}) is outside memory of {size} bytes"
            )
        if self._logs_this_call >= MAX_LOGS_PER_CALL:
            self.logs_dropped += 1
            return
        self._logs_this_call += 1
        data = bytes(memory.read(caller, ptr, ptr + min(length, MAX_LOG_BYTES)))
        self.peripherals.log(data.decode("utf-8", errors="replace"))

    def _host_health(self, code: int) -> None:
        self.health = code
        self.health_reports.append(code)
        if code != 0:
            self._bad_health_this_call.append(code)

    def _host_sensor_read(self, channel: int) -> int:
        value = self.peripherals.read_sensor(channel)
        if (
            isinstance(value, bool)
            or not isinstance(value, int)
            or not _I64_MIN <= value <= _I64_MAX
        ):
            raise ValueError(f"sensor {channel} returned {value!r}, not a signed 64-bit integer")
        return value

    def _host_actuator_write(self, channel: int, value: int) -> int:
        if self._writes_this_call >= self.limits.actuator_writes_per_tick:
            self.rate_limit_violations += 1
            return -1
        self._writes_this_call += 1
        self.peripherals.write_actuator(channel, value)
        return 0

    # --- calls --------------------------------------------------------------

    def _run(self, name: str, fuel: int, call: Callable[[], _T]) -> _T:
        if self._failed is not None:
            raise self._failed
        self._call_name = name
        self._writes_this_call = 0
        self._logs_this_call = 0
        self._bad_health_this_call = []
        with self._call_lock:
            self._store.set_fuel(fuel)
            # the wall-clock bound: the call traps once the watchdog bumps the epoch
            self._store.set_epoch_deadline(1)
            token = WATCHDOG.arm(self._engine, self.call_seconds)
            try:
                return call()
            except WasmError as e:
                self._failed = e
                raise
            except wasmtime.Trap as trap:
                self._failed = self._classify(name, trap)
                raise self._failed from None
            except wasmtime.WasmtimeError as e:
                self._failed = WasmTrapError(f"{name} failed: {_first_line(e)}")
                raise self._failed from None
            except Exception as e:  # a host function (peripheral) failed under the module
                self._failed = WasmHostError(
                    f"{name}: host function failed: {type(e).__name__}: {e}"
                )
                raise self._failed from e
            finally:
                WATCHDOG.disarm(token)
                self.fuel_used += fuel - self._store.get_fuel()

    def _classify(self, name: str, trap: wasmtime.Trap) -> WasmError:
        code = trap.trap_code
        if code == wasmtime.TrapCode.OUT_OF_FUEL:
            budget = (
                self.limits.self_test_fuel if name == "self_test" else self.limits.fuel_per_call
            )
            return WasmFuelExhaustedError(f"{name} used up its fuel ({budget})")
        if code == wasmtime.TrapCode.INTERRUPT:
            return WasmTimeoutError(
                f"{name} ran longer than this ECU's bound of {self.call_seconds} s per call"
            )
        if self._memory is not None and code in _OOM_TRAPS:
            pages = self._memory.size(self._store)
            if pages >= self.limits.memory_pages and pages > self._initial_pages:
                return WasmMemoryLimitError(
                    f"{name} trapped ({_trap_text(trap)}) after growing memory to its cap of "
                    f"{self.limits.memory_pages} pages"
                )
        return WasmTrapError(f"{name} trapped: {_trap_text(trap)}")

    def _call_export(self, name: str, fuel: int, *args: int) -> int:
        func = self._funcs[name]
        result: object = self._run(name, fuel, lambda: func(self._store, *args))
        if not isinstance(result, int):  # pragma: no cover - export types are checked
            raise WasmTrapError(f"{name} returned {result!r}")
        return result

    def self_test(self) -> int:
        """Run ``self_test`` within ``self_test_fuel``; return its code (0 = pass)."""
        return self._call_export("self_test", self.limits.self_test_fuel)

    def tick(self, t: int) -> int:
        """Run ``tick(t)`` within ``fuel_per_call``; return the module's output."""
        if not _I64_MIN <= t <= _I64_MAX:
            raise ValueError(f"tick {t} is not a signed 64-bit integer")
        return self._call_export("tick", self.limits.fuel_per_call, t)

    def version(self) -> int | None:
        """The module's ``version()`` if it exports one."""
        if "version" not in self._funcs:
            return None
        return self._call_export("version", self.limits.fuel_per_call)

    def check_health(self, what: str) -> None:
        """Raise ``WasmHealthFailedError`` if the last call reported a non-zero health code."""
        if self._bad_health_this_call:
            codes = ", ".join(str(c) for c in self._bad_health_this_call)
            self._failed = WasmHealthFailedError(f"{what} reported health code {codes}")
            raise self._failed

    @property
    def memory_pages(self) -> int:
        """Current size of the app's linear memory in pages."""
        assert self._memory is not None
        return self._memory.size(self._store)

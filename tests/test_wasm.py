"""WASM host: ABI, capabilities, limits and trials (ecus/wasm.py, DESIGN 5)."""

from __future__ import annotations

from functools import cache
from pathlib import Path

import pytest
import wasmtime

from ecus.secondary.wasm_host import SimPeripherals, TrialResult, WasmCeilings, WasmHost
from uptane.errors import (
    WASM_REASONS,
    InstallError,
    MetadataError,
    WasmError,
    WasmForbiddenImportError,
    WasmFuelExhaustedError,
    WasmHostError,
    WasmInvalidModuleError,
    WasmLimitsExceededError,
    WasmMemoryLimitError,
    WasmTimeoutError,
)
from uptane.metadata import Limits

ROOT = Path(__file__).resolve().parents[1]
ALL_CAPS = ("log", "health", "sensor.read", "actuator.write")
V1_CAPS = ("log", "health", "actuator.write")


@cache
def wasm(name: str) -> bytes:
    """Compile a WAT file of tests/wat or demo/apps to a binary module."""
    for folder in (ROOT / "tests" / "wat", ROOT / "demo" / "apps"):
        path = folder / f"{name}.wat"
        if path.exists():
            return bytes(wasmtime.wat2wasm(path.read_text()))
    raise FileNotFoundError(name)


@pytest.fixture(scope="session")
def host() -> WasmHost:
    return WasmHost()


def small_limits(**kw: int) -> Limits:
    base = {
        "fuel_per_call": 100_000,
        "memory_pages": 4,
        "self_test_fuel": 200_000,
        "confirm_ticks": 5,
        "actuator_writes_per_tick": 4,
    }
    base.update(kw)
    return Limits(**base)


def failed(result: TrialResult, reason: str) -> None:
    assert not result.passed, result
    assert result.reason == reason, result
    assert result.reason in WASM_REASONS
    assert result.app is None


# --- demo apps -------------------------------------------------------------


def test_blink_v1_trial_passes_and_keeps_running(host: WasmHost) -> None:
    p = SimPeripherals()
    result = host.trial(wasm("blink_v1"), V1_CAPS, Limits(confirm_ticks=6), p)
    assert result.passed and result.reason is None
    assert result.ticks_run == 6
    assert result.outputs == (0, 1, 2, 3, 4, 5)
    assert result.self_test_code == 0
    assert result.version == 1
    assert result.rate_limit_violations == 0
    assert result.fuel_used > 0
    assert p.logs == ["blink v1: self-test ok"]
    assert p.writes == [(0, 0)] + [(0, t % 2) for t in range(6)]
    assert result.app is not None
    assert result.app.tick(7) == 7
    assert result.app.health == 0


def test_blink_v2_output_differs_and_reads_sensor(host: WasmHost) -> None:
    p = SimPeripherals(sensors={0: 5})
    result = host.trial(wasm("blink_v2"), ALL_CAPS, Limits(confirm_ticks=4), p, start_tick=10)
    assert result.passed, result
    assert result.outputs == tuple(t * 2 + 5 for t in range(10, 14))
    assert result.version == 2
    assert p.writes[1:] == [(0, (t // 2) % 2) for t in range(10, 14)]


def test_blink_v2_without_sensor_capability_is_refused(host: WasmHost) -> None:
    p = SimPeripherals()
    result = host.trial(wasm("blink_v2"), V1_CAPS, Limits(), p)
    failed(result, "forbidden_import")
    assert "sensor.read" in result.detail
    assert p.logs == [] and p.writes == []


def test_ticks_are_deterministic_in_fuel(host: WasmHost) -> None:
    apps = [host.load(wasm("blink_v1"), V1_CAPS, Limits(), SimPeripherals()) for _ in range(2)]
    used = []
    for app in apps:
        before = app.fuel_used
        app.tick(3)
        used.append(app.fuel_used - before)
    assert used[0] == used[1] > 0


# --- failure reasons -------------------------------------------------------


def test_trap_in_self_test(host: WasmHost) -> None:
    result = host.trial(wasm("trap_self_test"), (), small_limits(), SimPeripherals())
    failed(result, "trap")
    assert "unreachable" in result.detail
    assert result.ticks_run == 0


def test_endless_self_test_is_stopped_by_fuel(host: WasmHost) -> None:
    limits = small_limits()
    result = host.trial(wasm("loop_forever"), (), limits, SimPeripherals())
    failed(result, "fuel_exhausted")
    # All of the self-test budget, and not one unit more, was spent.
    assert result.fuel_used == limits.self_test_fuel


def test_endless_tick_in_confirmation_window(host: WasmHost) -> None:
    limits = small_limits(confirm_ticks=10)
    result = host.trial(wasm("loop_in_tick"), (), limits, SimPeripherals())
    failed(result, "fuel_exhausted")
    assert result.ticks_run == 3
    assert result.outputs == (0, 1, 2)


def test_confirm_window_shorter_than_the_fault_passes(host: WasmHost) -> None:
    # Same module, window ends before tick 3: the trial has nothing to object to.
    result = host.trial(wasm("loop_in_tick"), (), small_limits(confirm_ticks=3), SimPeripherals())
    assert result.passed
    assert result.outputs == (0, 1, 2)


def test_forbidden_import_fails_before_any_code_runs(host: WasmHost) -> None:
    p = SimPeripherals()
    result = host.trial(wasm("forbidden_import"), ("log",), small_limits(), p)
    failed(result, "forbidden_import")
    assert "actuator.write" in result.detail
    assert p.logs == []  # the start function never ran
    with pytest.raises(WasmForbiddenImportError):
        host.load(wasm("forbidden_import"), ("log",), small_limits(), p)
    assert p.logs == []


def test_granted_import_lets_the_same_module_run(host: WasmHost) -> None:
    p = SimPeripherals()
    result = host.trial(wasm("forbidden_import"), ("log", "actuator.write"), small_limits(), p)
    assert result.passed, result
    assert p.logs == ["start ran"]


@pytest.mark.parametrize("name", ["unknown_import", "imports_memory"])
def test_imports_outside_the_abi_are_forbidden(host: WasmHost, name: str) -> None:
    failed(host.trial(wasm(name), ALL_CAPS, small_limits(), SimPeripherals()), "forbidden_import")


def test_wrong_import_signature_is_invalid(host: WasmHost) -> None:
    result = host.trial(wasm("wrong_signature"), ALL_CAPS, small_limits(), SimPeripherals())
    failed(result, "invalid_module")
    assert "uptane.health" in result.detail


def test_failed_self_test(host: WasmHost) -> None:
    result = host.trial(wasm("self_test_fails"), (), small_limits(), SimPeripherals())
    failed(result, "self_test_failed")
    assert result.self_test_code == 1
    assert result.ticks_run == 0


def test_growing_memory_past_the_cap(host: WasmHost) -> None:
    result = host.trial(wasm("grow_memory"), (), small_limits(memory_pages=4), SimPeripherals())
    failed(result, "memory_limit")
    assert "4 pages" in result.detail


def test_memory_cap_is_enforced_on_grow(host: WasmHost) -> None:
    app = host.load(wasm("grow_copes"), (), small_limits(memory_pages=4), SimPeripherals())

    def grow(pages: int) -> tuple[int, int]:
        out = app.tick(pages)
        size, answer = out >> 32, out & 0xFFFFFFFF
        return size, answer - (1 << 32) if answer >= 1 << 31 else answer

    assert grow(2) == (1, 1)  # 1 -> 3 pages
    assert grow(5) == (3, -1)  # 3 + 5 > 4: refused
    assert app.memory_pages == 3
    assert grow(1) == (3, 3)  # 3 -> 4 pages, exactly the cap
    assert grow(1) == (4, -1)
    assert app.memory_pages == 4


def test_declared_memory_over_cap_is_refused_before_running(host: WasmHost) -> None:
    with pytest.raises(WasmMemoryLimitError, match="64 memory pages"):
        host.load(wasm("big_memory"), (), small_limits(memory_pages=16), SimPeripherals())
    # Within the cap the module's start function does run (and traps).
    result = host.trial(wasm("big_memory"), (), small_limits(memory_pages=64), SimPeripherals())
    failed(result, "trap")


def test_actuator_rate_limit(host: WasmHost) -> None:
    p = SimPeripherals()
    limits = small_limits(confirm_ticks=3, actuator_writes_per_tick=4)
    result = host.trial(wasm("actuator_flood"), ("actuator.write",), limits, p)
    # Writes beyond the limit are refused (-1) and counted; the trial itself goes on.
    assert result.passed, result
    assert result.outputs == (6, 6, 6)
    assert result.rate_limit_violations == 18
    assert p.writes == [(1, t) for t in range(3) for _ in range(4)]


def test_health_code_fails_trial(host: WasmHost) -> None:
    result = host.trial(wasm("health_bad"), ("health",), small_limits(), SimPeripherals())
    failed(result, "health_failed")
    assert "7" in result.detail
    assert result.outputs == (0, 1, 2)


def test_missing_export(host: WasmHost) -> None:
    result = host.trial(wasm("missing_tick"), (), small_limits(), SimPeripherals())
    failed(result, "missing_export")
    assert "tick" in result.detail


def test_log_outside_memory_traps(host: WasmHost) -> None:
    p = SimPeripherals()
    result = host.trial(wasm("bad_log"), ("log",), small_limits(), p)
    failed(result, "trap")
    assert "outside memory" in result.detail
    assert p.logs == []


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"not wasm at all",
        b'(module (func (export "self_test") (result i32) (i32.const 0)))',
        b"\0asm\x01\0\0\0\x01garbage",
    ],
)
def test_invalid_module_bytes(host: WasmHost, data: bytes) -> None:
    failed(host.trial(data, (), small_limits(), SimPeripherals()), "invalid_module")
    with pytest.raises(WasmInvalidModuleError):
        host.compile(data, (), small_limits())


def test_unknown_capability_is_a_metadata_error(host: WasmHost) -> None:
    with pytest.raises(MetadataError):
        host.trial(wasm("blink_v1"), ("log", "root.shell"), Limits(), SimPeripherals())


def test_app_stays_stopped_after_a_failure(host: WasmHost) -> None:
    app = host.load(wasm("loop_in_tick"), (), small_limits(), SimPeripherals())
    assert app.tick(1) == 1
    with pytest.raises(WasmFuelExhaustedError) as first:
        app.tick(3)
    with pytest.raises(WasmFuelExhaustedError) as again:
        app.tick(1)
    assert again.value is first.value


def test_errors_are_typed_install_errors() -> None:
    assert issubclass(WasmError, InstallError)
    assert {
        "invalid_module",
        "forbidden_import",
        "trap",
        "fuel_exhausted",
        "memory_limit",
        "self_test_failed",
        "missing_export",
        "health_failed",
        "timeout",
        "host_error",
        "limits_exceeded",
    } == WASM_REASONS


# --- every call is inside the trial; ECU ceilings (issue 10, items 1-2) ------


@pytest.mark.parametrize(
    ("module", "reason"),
    [("version_traps", "trap"), ("version_loops", "fuel_exhausted")],
)
def test_version_failure_fails_the_trial(host: WasmHost, module: str, reason: str) -> None:
    """``version()`` runs inside the trial: its trap or fuel exhaustion fails it."""
    result = host.trial(wasm(module), (), small_limits(), SimPeripherals())
    failed(result, reason)
    assert result.ticks_run == 5  # self_test and the window passed first


class _BrokenSensor(SimPeripherals):
    def read_sensor(self, channel: int) -> int:
        raise OSError(f"sensor {channel} bus fault")


def test_host_function_error_fails_the_trial(host: WasmHost) -> None:
    """A peripheral that raises under the module is a typed ``host_error``, not a crash."""
    result = host.trial(wasm("sensor_tick"), ("sensor.read",), small_limits(), _BrokenSensor())
    failed(result, "host_error")
    assert "sensor 0 bus fault" in result.detail
    app = host.load(wasm("sensor_tick"), ("sensor.read",), small_limits(), _BrokenSensor())
    with pytest.raises(WasmHostError):
        app.tick(0)


def test_wall_clock_bound_interrupts_a_call_whatever_its_fuel() -> None:
    """Epoch interruption stops a loop long before its (huge) signed fuel runs out.

    The fuel is finite (seconds of looping), so without the bound the trial ends
    in ``fuel_exhausted`` and this test fails instead of hanging.
    """
    fuel = 5 * 10**9
    host = WasmHost(WasmCeilings(fuel_per_call=fuel, call_seconds=0.5))
    limits = small_limits(fuel_per_call=fuel)
    result = host.trial(wasm("loop_in_tick"), (), limits, SimPeripherals())
    failed(result, "timeout")
    assert result.ticks_run == 3
    assert result.fuel_used < fuel
    app = host.load(wasm("loop_in_tick"), (), limits, SimPeripherals())
    assert app.tick(0) == 0  # the bound is per call: a later call gets a fresh one
    with pytest.raises(WasmTimeoutError):
        app.tick(3)


@pytest.mark.parametrize(
    ("limits", "field"),
    [
        ({"fuel_per_call": 20_000_001}, "fuel_per_call"),
        ({"self_test_fuel": 100_000_001}, "self_test_fuel"),
        ({"memory_pages": 65}, "memory_pages"),
    ],
)
def test_limits_above_the_ceilings_are_refused_before_running(
    host: WasmHost, limits: dict[str, int], field: str
) -> None:
    with pytest.raises(WasmLimitsExceededError, match=field):
        host.load(wasm("blink_v1"), V1_CAPS, Limits(**limits), SimPeripherals())
    failed(
        host.trial(wasm("blink_v1"), V1_CAPS, Limits(**limits), SimPeripherals()), "limits_exceeded"
    )


def test_ceilings_are_checked() -> None:
    with pytest.raises(ValueError, match="memory_pages"):
        WasmCeilings(memory_pages=0)
    with pytest.raises(ValueError, match="call_seconds"):
        WasmCeilings(call_seconds=0)

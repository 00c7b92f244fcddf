"""WAT sources of the demo apps, and the demo's full-size builds of them.

``blink_v{N}.wat`` are small (a few hundred bytes): the simulator and the
tests compile them as they are (``ecus.sim.world.app_module``). The demo
ships them at a realistic size instead (``demo_app``): the same app plus a
calibration table in its data segment (``CALIBRATION_KIB``, at offset
``TABLE_OFFSET``) that its ``self_test`` checksums, so a module that arrives
with a corrupted table fails its trial, and the CAN transfer progress bars
show a transfer of a size real ECU software has.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Final

APPS_DIR: Final = Path(__file__).resolve().parent
CALIBRATION_KIB: Final = 64
TABLE_OFFSET: Final = 65536  # the second memory page: the app's own data stays in the first
_PAGE: Final = 65536
_MEMORY: Final = '(memory (export "memory") 1)'
_SELF_TEST: Final = '(func (export "self_test") (result i32)'
_TABLE_BROKEN: Final = 3  # self_test's result when the table's checksum is wrong


def calibration_table(version: int, kib: int = CALIBRATION_KIB) -> bytes:
    """A deterministic table of 16-bit points (a curve per version), ``kib`` KiB long."""
    points = kib * 1024 // 2
    return b"".join(
        (((i * i * 7 + i * (31 + version) + version * 4099) >> 3) & 0xFFFF).to_bytes(2, "little")
        for i in range(points)
    )


def table_checksum(table: bytes) -> int:
    """What ``$calibration_sum`` computes: the wrapping i32 sum of the table's words."""
    total = 0
    for i in range(0, len(table), 4):
        total = (total + int.from_bytes(table[i : i + 4], "little")) & 0xFFFFFFFF
    return total - (1 << 32) if total >= 1 << 31 else total


def demo_source(version: int, kib: int = CALIBRATION_KIB) -> str:
    """``blink_v{version}.wat`` with a ``kib`` KiB calibration table its self-test checks."""
    source = (APPS_DIR / f"blink_v{version}.wat").read_text(encoding="utf-8")
    if source.count(_MEMORY) != 1 or source.count(_SELF_TEST) != 1:
        raise ValueError(f"blink_v{version}.wat lacks the memory or self_test this build extends")
    table = calibration_table(version, kib)
    pages = 1 + -(-len(table) // _PAGE)
    data = "".join(f"\\{b:02x}" for b in table)
    checked = (
        f"{_SELF_TEST}\n"
        f"    ;; the calibration table must be intact\n"
        f"    (if (i32.ne (call $calibration_sum) (i32.const {table_checksum(table)}))\n"
        f"      (then (return (i32.const {_TABLE_BROKEN}))))"
    )
    extra = f"""
  (data (i32.const {TABLE_OFFSET}) "{data}")
  (func $calibration_sum (result i32)
    (local $i i32) (local $sum i32)
    (block $done
      (loop $next
        (br_if $done (i32.ge_u (local.get $i) (i32.const {len(table)})))
        (local.set $sum
          (i32.add (local.get $sum) (i32.load (i32.add (i32.const {TABLE_OFFSET}) (local.get $i)))))
        (local.set $i (i32.add (local.get $i) (i32.const 4)))
        (br $next)))
    (local.get $sum))
"""
    source = source.replace(_MEMORY, f'(memory (export "memory") {pages})')
    source = source.replace(_SELF_TEST, checked)
    end = source.rstrip().rfind(")")
    return source[:end] + extra + source[end:]


@functools.cache
def demo_app(version: int, kib: int = CALIBRATION_KIB) -> bytes:
    """The demo's build of ``blink_v{version}``: a binary module of about ``kib`` KiB."""
    import wasmtime

    return bytes(wasmtime.wat2wasm(demo_source(version, kib)))

"""Two consecutive releases of a WASM app that share most of their bytes (delta tests)."""

from __future__ import annotations

import random
from pathlib import Path

import wasmtime

APPS = Path(__file__).resolve().parents[2] / "demo" / "apps"
ASSET_BYTES = 48 * 1024


def _leb(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def release(version: int, assets: int = ASSET_BYTES) -> bytes:
    """blink v1 or v2 followed by a custom section of ``assets`` seeded random bytes.

    The custom section is the same in every release (like a lookup table or
    calibration data that a minor release does not touch), so a delta between
    two releases is a small fraction of either.
    """
    code = bytes(wasmtime.wat2wasm((APPS / f"blink_v{version}.wat").read_text(encoding="utf-8")))
    name = b"assets"
    payload = random.Random(1234).randbytes(assets)
    body = _leb(len(name)) + name + payload
    return code + b"\x00" + _leb(len(body)) + body

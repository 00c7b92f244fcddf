"""Static check of a WASM image against the secondary's module ABI, before it is signed.

A secondary refuses an image whose imports its signed capabilities do not
grant, or which lacks an export it calls (``ecus.secondary.wasm_host``, ABI
version 1; docs/wasm-abi.md). ``uptane image-repo add`` runs this check, so
what the Image repository signs is what an ECU will load: the module is
compiled (not run) and its imports and exports are read with wasmtime's
``Module.imports`` / ``Module.exports``.

The rules, from the ABI:

- every import is a function of module ``"uptane"`` named in ``HOST_FUNCTIONS``
  with that signature, and its capability is granted;
- every granted capability is used by an import (least privilege: a grant the
  module does not need is refused, naming the ``--capability`` to drop);
- the module exports ``memory`` (one plain 32-bit memory whose minimum fits
  ``limits.memory_pages``) and the functions of ``EXPORTS`` with their
  signatures (``version`` is optional).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final

import wasmtime

from uptane.errors import (
    WasmForbiddenImportError,
    WasmInvalidModuleError,
    WasmMemoryLimitError,
    WasmMissingExportError,
)
from uptane.metadata import (
    CAP_ACTUATOR_WRITE,
    CAP_HEALTH,
    CAP_LOG,
    CAP_SENSOR_READ,
    Limits,
    check_capabilities,
)

ABI_MODULE: Final = "uptane"
WASM_MAGIC: Final = b"\0asm"


@dataclass(frozen=True)
class Function:
    """One function of the ABI: signature, the capability that grants it, what it does."""

    name: str
    params: tuple[str, ...]
    results: tuple[str, ...]
    purpose: str
    capability: str | None = None
    required: bool = True

    @property
    def signature(self) -> str:
        return f"({', '.join(self.params)}) -> ({', '.join(self.results)})"

    def wat(self) -> str:
        params = f" (param {' '.join(self.params)})" if self.params else ""
        results = f" (result {' '.join(self.results)})" if self.results else ""
        return f"(func{params}{results})"

    def matches(self, ty: wasmtime.FuncType) -> bool:
        return (
            tuple(str(p) for p in ty.params) == self.params
            and tuple(str(r) for r in ty.results) == self.results
        )


#: Host functions a module may import from ``"uptane"``, each granted by one capability.
HOST_FUNCTIONS: Final = (
    Function(
        "log", ("i32", "i32"), (), "log(ptr, len): UTF-8 text in memory to the ECU log", CAP_LOG
    ),
    Function(
        "health", ("i32",), (), "health(code): 0 = healthy, anything else fails a trial", CAP_HEALTH
    ),
    Function(
        "sensor_read",
        ("i32",),
        ("i64",),
        "sensor_read(channel) -> value: read a sensor",
        CAP_SENSOR_READ,
    ),
    Function(
        "actuator_write",
        ("i32", "i64"),
        ("i32",),
        "actuator_write(channel, value) -> 0 written, -1 refused (rate limit)",
        CAP_ACTUATOR_WRITE,
    ),
)

#: Functions the secondary calls; ``memory`` must be exported too.
EXPORTS: Final = (
    Function("self_test", (), ("i32",), "self_test() -> 0 to pass, run once per trial"),
    Function("tick", ("i64",), ("i64",), "tick(t) -> output: the app's behaviour at tick t"),
    Function("version", (), ("i32",), "version() -> the app's own version (optional)", None, False),
)

#: The smallest module that passes: no capability, exports memory, self_test and tick.
MINIMAL_WAT: Final = """\
(module
  (memory (export "memory") 1)
  (func (export "self_test") (result i32) (i32.const 0))
  (func (export "tick") (param $t i64) (result i64) (local.get $t)))
"""


def _compile(data: bytes) -> wasmtime.Module:
    if not data.startswith(WASM_MAGIC):
        # wasmtime would also parse WAT text; images are binary modules
        raise WasmInvalidModuleError(
            "not a valid WebAssembly module: not a binary module (compile .wat with wat2wasm)"
        )
    try:
        return wasmtime.Module(wasmtime.Engine(), data)
    except wasmtime.WasmtimeError as e:
        text = " ".join(line.strip() for line in str(e).splitlines() if line.strip())
        raise WasmInvalidModuleError(f"not a valid WebAssembly module: {text}") from None


def check_module(data: bytes, capabilities: Iterable[str], limits: Limits) -> None:
    """Raise a ``WasmError`` unless ``data`` fits the ABI with exactly ``capabilities``."""
    granted = set(check_capabilities(capabilities))
    module = _compile(data)
    host = {f.name: f for f in HOST_FUNCTIONS}
    used: set[str] = set()
    for imp in module.imports:
        where = f"{imp.module}.{imp.name}"
        spec = host.get(imp.name or "") if imp.module == ABI_MODULE else None
        if spec is None:
            known = ", ".join(f"{ABI_MODULE}.{f.name}" for f in HOST_FUNCTIONS)
            raise WasmForbiddenImportError(
                f"import {where} is not a host function (the ABI has {known})"
            )
        assert spec.capability is not None
        if not isinstance(imp.type, wasmtime.FuncType):
            raise WasmForbiddenImportError(f"import {where} is not a function")
        if not spec.matches(imp.type):
            raise WasmInvalidModuleError(f"import {where} must have signature {spec.signature}")
        if spec.capability not in granted:
            raise WasmForbiddenImportError(
                f"import {where} needs capability {spec.capability!r}: "
                f"add --capability {spec.capability}"
            )
        used.add(spec.capability)
    unused = sorted(granted - used)
    if unused:
        drop = " ".join(f"--capability {c}" for c in unused)
        raise WasmForbiddenImportError(
            f"capability {', '.join(repr(c) for c in unused)} granted but the module "
            f"imports nothing it grants: drop {drop}"
        )
    exports = {exp.name: exp.type for exp in module.exports}
    memory = exports.get("memory")
    if not isinstance(memory, wasmtime.MemoryType):
        raise WasmMissingExportError("module does not export its memory as 'memory'")
    if memory.is_64 or memory.is_shared:
        raise WasmInvalidModuleError("memory must be a plain 32-bit memory")
    if memory.limits.min > limits.memory_pages:
        raise WasmMemoryLimitError(
            f"module needs {memory.limits.min} memory pages, --memory-pages is "
            f"{limits.memory_pages}"
        )
    for f in EXPORTS:
        ty = exports.get(f.name)
        if ty is None and not f.required:
            continue
        if not isinstance(ty, wasmtime.FuncType):
            raise WasmMissingExportError(
                f"module does not export function {f.name}{f.signature} ({f.purpose})"
            )
        if not f.matches(ty):
            raise WasmMissingExportError(f"export {f.name} must have signature {f.signature}")

"""The secondary's module ABI, version 1, and its static check (DESIGN 5; docs/wasm-abi.md).

One table of host functions (imports from module ``"uptane"``, each granted
by one capability) and exports, read by the secondary's WASM host
(``ecus.secondary.wasm_host``: before any code of a module runs) and by the
Image repository (``image_repo.abi``: before an image is signed), so the two
can never disagree about what an ECU will load. It sits in the core so that
both may import it (docs/architecture.md: no import runs upward); it runs
nothing, wasmtime only reads a compiled module's imports and exports.

The rules:

- every import is a function of module ``"uptane"`` named in ``HOST_FUNCTIONS``
  with that signature, and its capability is granted;
- the module exports ``memory`` (one plain 32-bit memory whose minimum fits
  ``limits.memory_pages``) and the functions of ``EXPORTS`` with their
  signatures (``version`` is optional).

The Image repository adds least privilege: a granted capability the module
does not import is refused there (``unused_capabilities``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

import wasmtime

from uptane.errors import (
    WasmForbiddenImportError,
    WasmInvalidModuleError,
    WasmMemoryLimitError,
    WasmMissingExportError,
)
from uptane.metadata import CAP_ACTUATOR_WRITE, CAP_HEALTH, CAP_LOG, CAP_SENSOR_READ, Limits

ABI_MODULE: Final = "uptane"
WASM_MAGIC: Final = b"\0asm"

_VALTYPES: Final = {"i32": wasmtime.ValType.i32, "i64": wasmtime.ValType.i64}


def _signature(params: tuple[str, ...], results: tuple[str, ...]) -> str:
    return f"({', '.join(params)}) -> ({', '.join(results)})"


def signature_of(ty: wasmtime.FuncType) -> str:
    """``ty`` written like ``Function.signature``."""
    return _signature(tuple(str(p) for p in ty.params), tuple(str(r) for r in ty.results))


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
        return _signature(self.params, self.results)

    def wat(self) -> str:
        params = f" (param {' '.join(self.params)})" if self.params else ""
        results = f" (result {' '.join(self.results)})" if self.results else ""
        return f"(func{params}{results})"

    def functype(self) -> wasmtime.FuncType:
        return wasmtime.FuncType(
            [_VALTYPES[p]() for p in self.params], [_VALTYPES[r]() for r in self.results]
        )

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
HOST_BY_NAME: Final = {f.name: f for f in HOST_FUNCTIONS}

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


def check_imports(module: wasmtime.Module, granted: set[str], *, hint: bool = False) -> set[str]:
    """Raise unless every import is a granted host function; returns the capabilities used.

    ``hint``: name the ``--capability`` option to add (the Image repository's CLI).
    """
    used: set[str] = set()
    for imp in module.imports:
        where = f"{imp.module}.{imp.name}"
        spec = HOST_BY_NAME.get(imp.name or "") if imp.module == ABI_MODULE else None
        if spec is None:
            known = ", ".join(f"{ABI_MODULE}.{f.name}" for f in HOST_FUNCTIONS)
            raise WasmForbiddenImportError(
                f"import {where} is not a host function (the ABI has {known})"
            )
        assert spec.capability is not None
        if spec.capability not in granted:
            advice = f": add --capability {spec.capability}" if hint else ", which is not granted"
            raise WasmForbiddenImportError(
                f"import {where} needs capability {spec.capability!r}{advice}"
            )
        ty = imp.type
        if not isinstance(ty, wasmtime.FuncType):
            raise WasmForbiddenImportError(f"import {where} is not a function")
        if not spec.matches(ty):
            raise WasmInvalidModuleError(
                f"import {where} must have signature {spec.signature}, not {signature_of(ty)}"
            )
        used.add(spec.capability)
    return used


def check_exports(module: wasmtime.Module, limits: Limits, *, limit_name: str = "limit") -> None:
    """Raise unless ``module`` exports its memory (within ``limits``) and the ABI's functions."""
    exports = {exp.name: exp.type for exp in module.exports}
    memory = exports.get("memory")
    if not isinstance(memory, wasmtime.MemoryType):
        raise WasmMissingExportError("module does not export its memory as 'memory'")
    if memory.is_64 or memory.is_shared:
        raise WasmInvalidModuleError("memory must be a plain 32-bit memory")
    if memory.limits.min > limits.memory_pages:
        raise WasmMemoryLimitError(
            f"module needs {memory.limits.min} memory pages, {limit_name} is {limits.memory_pages}"
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
            raise WasmMissingExportError(
                f"export {f.name} must have signature {f.signature}, not {signature_of(ty)}"
            )

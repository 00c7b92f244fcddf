"""Static check of a WASM image against the secondary's module ABI, before it is signed.

A secondary refuses an image whose imports its signed capabilities do not
grant, or which lacks an export it calls (``uptane.wasm_abi``, ABI
version 1; docs/wasm-abi.md). ``uptane image-repo add`` runs the same check
(the same tables and code), so what the Image repository signs is what an
ECU will load: the module is compiled (not run) and its imports and exports
are read with wasmtime's ``Module.imports`` / ``Module.exports``.

On top of the ECU's rules, least privilege: every granted capability is
used by an import (a grant the module does not need is refused, naming the
``--capability`` to drop).
"""

from __future__ import annotations

from collections.abc import Iterable

import wasmtime

from uptane.errors import WasmForbiddenImportError, WasmInvalidModuleError
from uptane.metadata import Limits, check_capabilities
from uptane.wasm_abi import (
    ABI_MODULE,
    EXPORTS,
    HOST_FUNCTIONS,
    MINIMAL_WAT,
    WASM_MAGIC,
    Function,
    check_exports,
    check_imports,
)

__all__ = ["ABI_MODULE", "EXPORTS", "HOST_FUNCTIONS", "MINIMAL_WAT", "Function", "check_module"]


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
    used = check_imports(module, granted, hint=True)
    unused = sorted(granted - used)
    if unused:
        drop = " ".join(f"--capability {c}" for c in unused)
        raise WasmForbiddenImportError(
            f"capability {', '.join(repr(c) for c in unused)} granted but the module "
            f"imports nothing it grants: drop {drop}"
        )
    check_exports(module, limits, limit_name="--memory-pages")

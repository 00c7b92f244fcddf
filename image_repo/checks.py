"""Checks of what an Image repository edit names: images, roles, path patterns (Uptane 5.3).

Images must be valid WebAssembly modules (DESIGN 1); supplier (delegated)
role names and their path patterns are plain, so that they cannot reach
outside the repository or be mistaken for a top-level role; a delegation's
``custom.hardware_ids`` says which ECUs its images may go to.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Final

import wasmtime
from tuf.api.metadata import DelegatedRole

from uptane.errors import ConfigError, RepositoryEditError, WasmInvalidModuleError
from uptane.metadata import HARDWARE_IDS
from uptane.repository import TOP_LEVEL_ROLES

_ROLE_NAME_RE: Final = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,63}\Z")
_PATTERN_SEGMENT_RE: Final = re.compile(r"^[A-Za-z0-9*?][A-Za-z0-9._+*?-]{0,127}\Z")


def validate_wasm(data: bytes) -> None:
    """Raise ``WasmInvalidModuleError`` unless ``data`` is a valid WASM module."""
    try:
        wasmtime.Module.validate(wasmtime.Engine(), data)
    except wasmtime.WasmtimeError as e:
        text = " ".join(line.strip() for line in str(e).splitlines() if line.strip())
        raise WasmInvalidModuleError(
            f"not a valid WebAssembly module: {text or 'invalid module'}"
        ) from e


def check_role_name(name: str) -> str:
    """Return ``name`` if it can name a delegated (supplier) role."""
    if not isinstance(name, str) or not _ROLE_NAME_RE.match(name):
        raise RepositoryEditError(
            f"role name {name!r} must be 1-64 letters, digits, '_' or '-', starting with a letter"
        )
    if name in TOP_LEVEL_ROLES:
        raise RepositoryEditError(f"{name!r} is a top-level role, not a supplier name")
    return name


def check_path_pattern(pattern: str) -> str:
    """Return ``pattern`` if it is a relative glob of plain segments (``*``/``?`` only)."""
    if not isinstance(pattern, str) or not pattern or len(pattern) > 255:
        raise RepositoryEditError("a path pattern must be 1-255 characters")
    for segment in pattern.split("/"):
        if not _PATTERN_SEGMENT_RE.match(segment):
            raise RepositoryEditError(
                f"path pattern {pattern!r}: segment {segment!r} must use only letters, "
                "digits, ._+- and the wildcards * and ?"
            )
    return pattern


def delegated_hardware_ids(role: DelegatedRole) -> tuple[str, ...] | None:
    """Hardware ids a delegation allows (``custom.hardware_ids``), None if unrestricted."""
    custom = role.unrecognized_fields.get("custom")
    if not isinstance(custom, Mapping) or HARDWARE_IDS not in custom:
        return None
    hw = custom[HARDWARE_IDS]
    if not isinstance(hw, list):
        raise ConfigError(f"delegation {role.name!r}: custom.hardware_ids must be a list")
    return tuple(str(h) for h in hw)

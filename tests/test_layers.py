"""The layers of docs/architecture.md: no import runs upward.

``uptane/`` < ``image_repo/``, ``director/`` < ``ecus/transport/`` <
``ecus/primary/``, ``ecus/secondary/`` < ``ecus/sim/`` (and the ``ecus`` CLI) <
``demo/``. Every import statement of the project's packages is read (inside
functions too), so a lower layer never depends on a higher one.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def layer(module: str) -> int | None:
    """The layer of a project module, or None for anything else."""
    top, _, rest = module.partition(".")
    sub = rest.partition(".")[0]
    if top == "uptane":
        return 0
    if top in ("image_repo", "director"):
        return 1
    if top == "ecus":
        return {"transport": 2, "primary": 3, "secondary": 3}.get(sub, 4)
    if top == "demo":
        return 5
    return None


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def test_no_import_runs_upward() -> None:
    upward = []
    for package in ("uptane", "image_repo", "director", "ecus", "demo"):
        for path in sorted((ROOT / package).rglob("*.py")):
            name = module_name(path)
            own = layer(name)
            assert own is not None
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.Import):
                    imported = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    imported = [node.module]
                else:
                    continue
                for target in imported:
                    other = layer(target)
                    if other is not None and other > own:
                        upward.append(f"{name} imports {target}")
    assert upward == []


def test_the_layer_check_sees_an_upward_import() -> None:
    """The check itself: a lower layer naming a higher one is found."""
    assert layer("image_repo.abi") == 1 and layer("ecus.secondary.wasm_host") == 3
    assert layer("ecus.transport.isotp") == 2 and layer("ecus.sim.world") == 4
    assert layer("tuf.api.metadata") is None

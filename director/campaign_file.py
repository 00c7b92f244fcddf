"""Reading a campaign document from a file: JSON, or YAML for ``.yaml``/``.yml`` (DESIGN 10).

Shared by ``uptane director campaign create`` and ``uptane sim --campaign``;
errors are one-line ``click.ClickException``s naming the file.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click


def read_campaign_file(path: Path) -> Any:
    """A campaign document from a JSON or YAML file (YAML when it ends in .yaml/.yml)."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise click.ClickException(f"cannot read {path}: {e.strerror or e}") from e
    try:
        if path.suffix.lower() in (".yaml", ".yml"):
            import yaml

            return yaml.safe_load(text)
        return json.loads(text)
    except ValueError as e:  # json.JSONDecodeError
        raise click.ClickException(f"{path} is not valid JSON: {e}") from e
    except Exception as e:  # yaml.YAMLError
        raise click.ClickException(f"{path} is not valid YAML: {str(e).splitlines()[0]}") from e

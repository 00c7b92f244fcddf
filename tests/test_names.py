"""Names and identifiers end where they end: no pattern accepts a trailing newline.

Python's ``$`` also matches before a final ``\\n``, so a VIN, serial, hardware
id, key id or role name with one appended would pass a ``^...$`` check and
then differ from the stored or signed name it is compared with.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from image_repo.checks import check_path_pattern, check_role_name
from image_repo.delta import parse_release
from uptane.errors import UptaneError
from uptane.metadata import check_identifier, check_plain_target_path


@pytest.mark.parametrize(
    ("check", "good"),
    [
        (lambda v: check_identifier(v, "VIN"), "VIN-0001"),
        (check_plain_target_path, "apps/app-1.wasm"),
        (check_role_name, "supplier-a"),
        (check_path_pattern, "apps/*.wasm"),
    ],
)
def test_a_trailing_newline_is_refused(check: Callable[[str], str], good: str) -> None:
    assert check(good) == good
    with pytest.raises((UptaneError, ValueError)):
        check(good + "\n")


def test_release_spec_with_a_trailing_newline_is_refused() -> None:
    assert parse_release("app.wasm@3") == ("app.wasm", 3)
    with pytest.raises((UptaneError, ValueError)):
        parse_release("app.wasm@3\n")

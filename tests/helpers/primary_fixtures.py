"""Pytest fixtures of the primary's tests: a real Director and Image repository, a vehicle.

``servers``: both repositories' HTTP servers (a ``Switchboard`` each), one per
test module; ``template``: the keys and metadata every vehicle starts from;
``env``: a fresh vehicle (``Env``) per test. Import them into a test module
(``from helpers.primary_fixtures import env_fixture, servers_fixture, template_fixture``).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from helpers.servers import Switchboard, serve
from helpers.uptane_env import Env, Servers, build_template


@pytest.fixture(scope="module", name="servers")
def servers_fixture() -> Iterator[Servers]:
    image, director = Switchboard(), Switchboard()
    with serve(image) as image_url, serve(director) as director_url:
        yield Servers(image, image_url, director, director_url)


@pytest.fixture(scope="module", name="template")
def template_fixture(servers: Servers, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_template(tmp_path_factory.mktemp("template"), servers.image_url)


@pytest.fixture(name="env")
def env_fixture(tmp_path: Path, template: Path, servers: Servers) -> Iterator[Env]:
    e = Env(tmp_path, template, servers)
    yield e
    e.close()

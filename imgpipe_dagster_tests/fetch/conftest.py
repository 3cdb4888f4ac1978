"""Fixtures of the fetch tests: one warm test image server per session on 127.0.0.1."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from imgpipe_dagster.testing.image_server import ImageServer


@pytest.fixture(scope="session")
def image_server() -> Iterator[ImageServer]:
    with ImageServer() as server:
        server.warm()
        yield server

"""Fixtures of the fetch tests: one test image server per session on 127.0.0.1."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from imgpipe_dagster_tests.web.image_server import ImageServer


@pytest.fixture(scope="session")
def image_server() -> Iterator[ImageServer]:
    """The server; photos render on first request (tests with tight timeouts use warm_image_server)."""
    with ImageServer() as server:
        yield server


@pytest.fixture(scope="session")
def warm_image_server(image_server: ImageServer) -> ImageServer:
    """The same server with every fault payload and good-case photo built, so none waits on a build."""
    return image_server.warm()

"""Test-wide settings: every async test runs on uvloop, as meshproxy does in production."""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Callable

import pytest

from meshproxy.config.model import Http1Codec
from meshproxy.core.codecs import CodecFactory, codec_factory
from meshproxy.io.loop import loop_factory

# The tests import their helpers as a plain module.
sys.path.insert(0, os.path.dirname(__file__))

# A proxy set in the environment must not capture the tests' own loopback clients.
for _key in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "ALL_PROXY", "all_proxy"):
    os.environ.pop(_key, None)
os.environ["NO_PROXY"] = "*"


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--http1-codec",
        choices=("h11", "httptools"),
        default="h11",
        help="the spec.http1Codec that tests/helpers.py bootstrap() writes (issue #7): run the "
        "integration suite against either codec",
    )


def pytest_configure(config: pytest.Config) -> None:
    import helpers

    helpers.HTTP1_CODEC = config.getoption("--http1-codec")


@pytest.fixture(params=["h11", "httptools"])
def codecs(request: pytest.FixtureRequest) -> CodecFactory:
    """Each HTTP/1.1 codec in turn: the conformance suite runs every case against both."""
    return codec_factory(Http1Codec(request.param))


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> dict[str, Callable[[], asyncio.AbstractEventLoop]]:
    return {"uvloop": loop_factory}

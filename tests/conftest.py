"""Test-wide settings: every async test runs on uvloop, as meshproxy does in production."""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Callable

import pytest

from meshproxy.io.loop import loop_factory

# The tests import their helpers as a plain module.
sys.path.insert(0, os.path.dirname(__file__))

# A proxy set in the environment must not capture the tests' own loopback clients.
for _key in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "ALL_PROXY", "all_proxy"):
    os.environ.pop(_key, None)
os.environ["NO_PROXY"] = "*"


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> dict[str, Callable[[], asyncio.AbstractEventLoop]]:
    return {"uvloop": loop_factory}

"""Choosing the HTTP/1.1 codec: ``spec.http1Codec`` (h11 | httptools | auto) to constructors.

Owns the one place that knows which codecs exist and whether the optional one is installed.
httptools (llhttp) is an extra (``pip install meshproxy[fast]``), so it is imported only when chosen.

Rules: pure; the edge receives a ``CodecFactory`` and never names a codec class itself.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass

from meshproxy.config.model import Http1Codec
from meshproxy.core.h11codec import H11ClientCodec, H11ServerCodec
from meshproxy.core.http1 import ClientCodec, ServerCodec


@dataclass(frozen=True, slots=True, kw_only=True)
class CodecFactory:
    """Constructors of one codec's two sides: one server codec per client connection, one client
    codec per upstream connection."""

    name: str
    server: Callable[[], ServerCodec]
    client: Callable[[], ClientCodec]


H11 = CodecFactory(name="h11", server=H11ServerCodec, client=H11ClientCodec)


def httptools_available() -> bool:
    return importlib.util.find_spec("httptools") is not None


def codec_factory(choice: Http1Codec) -> CodecFactory:
    """The codec the bootstrap chose; ``auto`` is httptools when installed, else h11.

    Config validation has already refused ``httptools`` when it is not installed.
    """
    if choice is Http1Codec.H11 or (choice is Http1Codec.AUTO and not httptools_available()):
        return H11
    from meshproxy.core.httptools_codec import HttptoolsClientCodec, HttptoolsServerCodec

    return CodecFactory(name="httptools", server=HttptoolsServerCodec, client=HttptoolsClientCodec)

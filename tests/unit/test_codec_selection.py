"""Choosing the HTTP/1.1 codec: spec.http1Codec (h11 | httptools | auto) and its config errors."""

from __future__ import annotations

import sys

import pytest
from config_helpers import BOOT, line_of, located, only_issue

from meshproxy.config.load import load_texts
from meshproxy.config.model import Http1Codec
from meshproxy.core.codecs import codec_factory, httptools_available
from meshproxy.core.h11codec import H11ClientCodec, H11ServerCodec
from meshproxy.core.httptools_codec import HttptoolsClientCodec, HttptoolsServerCodec


def with_codec(value: str) -> str:
    return BOOT.replace(
        "  serviceAccount: app\n", f"  serviceAccount: app\n  http1Codec: {value}\n"
    )


@pytest.fixture
def without_httptools(monkeypatch: pytest.MonkeyPatch) -> None:
    """An environment where `pip install meshproxy` left the [fast] extra out."""
    monkeypatch.setitem(sys.modules, "httptools", None)  # makes the import fail, find_spec None
    assert not httptools_available()


def test_default_is_h11() -> None:
    config = load_texts([("boot.yaml", BOOT)])
    assert config.bootstrap.spec.http1_codec is Http1Codec.H11
    codecs = codec_factory(config.bootstrap.spec.http1_codec)
    assert codecs.name == "h11"
    assert isinstance(codecs.server(), H11ServerCodec)
    assert isinstance(codecs.client(), H11ClientCodec)


@pytest.mark.parametrize("value", ["httptools", "auto"])
def test_httptools_when_installed(value: str) -> None:
    config = load_texts([("boot.yaml", with_codec(value))])
    codecs = codec_factory(config.bootstrap.spec.http1_codec)
    assert codecs.name == "httptools"
    assert isinstance(codecs.server(), HttptoolsServerCodec)
    assert isinstance(codecs.client(), HttptoolsClientCodec)


def test_auto_falls_back_to_h11_without_httptools(without_httptools: None) -> None:
    config = load_texts([("boot.yaml", with_codec("auto"))])
    assert codec_factory(config.bootstrap.spec.http1_codec).name == "h11"


def test_httptools_without_httptools_is_a_config_error(without_httptools: None) -> None:
    text = with_codec("httptools")
    issue = only_issue(("boot.yaml", text))
    assert located(issue) == (
        "boot.yaml",
        line_of(text, "http1Codec"),
        "MeshProxy app-v1",
        "spec.http1Codec",
    )
    assert "install meshproxy[fast]" in issue.message


def test_unknown_codec_is_a_config_error() -> None:
    text = with_codec("llhttp")
    issue = only_issue(("boot.yaml", text))
    assert issue.path == "spec.http1Codec"
    assert "h11" in issue.message and "httptools" in issue.message

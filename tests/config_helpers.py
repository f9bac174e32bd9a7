"""Shared helpers for the configuration tests: build YAML, load it, and locate its errors."""

from __future__ import annotations

import textwrap

import pytest

from meshproxy.config.load import load_texts
from meshproxy.errors import ConfigError, ConfigIssue


def doc(text: str) -> str:
    return textwrap.dedent(text).lstrip("\n")


def docs(*parts: str) -> str:
    return "---\n".join(doc(p) for p in parts)


def line_of(text: str, needle: str) -> int:
    """The 1-based line on which ``needle`` occurs, asserting it occurs exactly once."""
    assert text.count(needle) == 1, f"{needle!r} must occur exactly once"
    return text[: text.index(needle)].count("\n") + 1


def issues_of(*sources: tuple[str, str]) -> list[ConfigIssue]:
    with pytest.raises(ConfigError) as info:
        load_texts(list(sources))
    assert str(info.value) == "\n".join(str(i) for i in info.value.issues)
    return list(info.value.issues)


def only_issue(*sources: tuple[str, str]) -> ConfigIssue:
    found = issues_of(*sources)
    assert len(found) == 1, "\n".join(str(i) for i in found)
    return found[0]


def located(issue: ConfigIssue) -> tuple[str, int, str, str]:
    return (issue.file, issue.line, issue.where, issue.path)


BOOT = doc(
    """
    apiVersion: meshproxy.io/v1alpha1
    kind: MeshProxy
    metadata: {name: app-v1, namespace: default}
    spec:
      serviceAccount: app
      admin: 127.0.0.1:0
      outbound: {address: 127.0.0.1:0}
    """
)

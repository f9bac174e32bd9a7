"""Loading configuration: YAML files in, a validated ``MeshConfig`` out, or every error located.

Owns the only YAML import in meshproxy. Documents are composed into YAML nodes (which keep their
line numbers) and decoded straight into the frozen model of ``config/model.py`` by reading its type
hints: unknown fields, wrong types, bad durations and addresses are reported with the file, the line
and the field path. Cross-document checks (dangling references, duplicates) are Istio semantics and
live in ``config/istio.py``; this module gives them a way to find the line of any field.

Rules: collect every problem, never stop at the first; never return a partly valid config.
"""

from __future__ import annotations

import dataclasses
import enum
import os
import re
import types
import typing
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Final

import yaml

from meshproxy.config import istio
from meshproxy.config.model import (
    AuthorizationPolicy,
    DestinationRule,
    Duration,
    HostPort,
    MeshConfig,
    MeshProxy,
    Metadata,
    PeerAuthentication,
    Resource,
    ServiceEntry,
    Telemetry,
    VirtualService,
    yaml_key,
)
from meshproxy.errors import ConfigError, ConfigIssue

# Istio serves each kind under several API versions; accept all of them (issue #2 §2).
_NETWORKING = (
    "networking.istio.io/v1",
    "networking.istio.io/v1beta1",
    "networking.istio.io/v1alpha3",
)
_SECURITY = ("security.istio.io/v1", "security.istio.io/v1beta1")
_KINDS: Final[Mapping[str, tuple[tuple[str, ...], type[Resource]]]] = {
    "MeshProxy": (("meshproxy.io/v1alpha1",), MeshProxy),
    "ServiceEntry": (_NETWORKING, ServiceEntry),
    "VirtualService": (_NETWORKING, VirtualService),
    "DestinationRule": (_NETWORKING, DestinationRule),
    "Telemetry": (("telemetry.istio.io/v1", "telemetry.istio.io/v1alpha1"), Telemetry),
    "PeerAuthentication": (_SECURITY, PeerAuthentication),
    "AuthorizationPolicy": (_SECURITY, AuthorizationPolicy),
}
# Kinds Istio defines that meshproxy does not read yet: a clear error beats silently ignoring them.
_NOT_YET: Final = frozenset({"RequestAuthentication", "Gateway", "Sidecar", "EnvoyFilter"})
# Fields the Kubernetes API server adds to metadata; accepted so `kubectl get -o yaml` loads.
_K8S_METADATA: Final = frozenset(
    {
        "uid",
        "resourceVersion",
        "generation",
        "creationTimestamp",
        "managedFields",
        "ownerReferences",
        "finalizers",
        "selfLink",
        "deletionTimestamp",
        "deletionGracePeriodSeconds",
        "generateName",
    }
)

_DURATION_RE: Final = re.compile(r"^(?:(\d+(?:\.\d+)?)(h|ms|us|µs|ns|m|s))+$")
_DURATION_PART_RE: Final = re.compile(r"(\d+(?:\.\d+)?)(h|ms|us|µs|ns|m|s)")
_UNIT_SECONDS: Final = {
    "h": 3600.0,
    "m": 60.0,
    "s": 1.0,
    "ms": 1e-3,
    "us": 1e-6,
    "µs": 1e-6,
    "ns": 1e-9,
}
_TAG_STR = "tag:yaml.org,2002:str"
_TAG_INT = "tag:yaml.org,2002:int"
_TAG_FLOAT = "tag:yaml.org,2002:float"
_TAG_BOOL = "tag:yaml.org,2002:bool"
_TAG_NULL = "tag:yaml.org,2002:null"


def parse_duration(text: str) -> float:
    """Parse Istio's (protobuf JSON / Go) duration form into seconds: ``250ms``, ``1.5s``, ``1h30m``."""
    text = text.strip()
    if not _DURATION_RE.match(text):
        raise ValueError(f"invalid duration {text!r} (expected a form like 250ms, 1.5s, 1m, 1h)")
    return sum(float(n) * _UNIT_SECONDS[u] for n, u in _DURATION_PART_RE.findall(text))


def parse_host_port(text: str) -> HostPort:
    """Parse ``host:port`` or ``[v6]:port`` with a port in 1..65535."""
    text = text.strip()
    if text.startswith("["):
        end = text.find("]")
        if end < 0 or text[end + 1 : end + 2] != ":":
            raise ValueError(f"invalid address {text!r} (expected [ipv6]:port)")
        host, port_s = text[1:end], text[end + 2 :]
    else:
        host, sep, port_s = text.rpartition(":")
        if not sep or not host or ":" in host:
            raise ValueError(f"invalid address {text!r} (expected host:port)")
    if not port_s.isdigit() or not 0 <= int(port_s) < 65536:  # 0: pick a free port
        raise ValueError(f"invalid port in address {text!r}")
    return HostPort(host=host, port=int(port_s))


_render_path = istio.key_path


class _Invalid:
    """Marker for a value that failed to decode (its issue is already recorded)."""


_INVALID: Final = _Invalid()


@dataclasses.dataclass(slots=True)
class _FieldInfo:
    name: str
    hint: Any
    required: bool


_FIELDS_CACHE: dict[type, dict[str, _FieldInfo]] = {}


def _fields_of(cls: type) -> dict[str, _FieldInfo]:
    cached = _FIELDS_CACHE.get(cls)
    if cached is None:
        hints = typing.get_type_hints(cls)
        cached = {}
        for f in dataclasses.fields(cls):
            key = f.metadata.get("yaml", yaml_key(f.name))
            required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
            cached[key] = _FieldInfo(f.name, hints[f.name], required)
        _FIELDS_CACHE[cls] = cached
    return cached


class _Decoder:
    """Decodes one document's YAML nodes into model objects, recording issues and field lines."""

    def __init__(self, file: str, issues: list[ConfigIssue]) -> None:
        self.file = file
        self.issues = issues
        self.where = ""
        self.lines: dict[str, int] = {}
        self._scalar_loader = yaml.SafeLoader("")

    def issue(self, node: yaml.Node, path: str, message: str) -> _Invalid:
        self.issues.append(
            ConfigIssue(
                file=self.file,
                line=node.start_mark.line + 1,
                where=self.where,
                path=path,
                message=message,
            )
        )
        return _INVALID

    def scalar(self, node: yaml.Node) -> object:
        return self._scalar_loader.construct_object(node, deep=True)

    def decode(self, node: yaml.Node, hint: Any, path: str) -> object:
        self.lines.setdefault(path, node.start_mark.line + 1)
        origin = typing.get_origin(hint)
        if origin is types.UnionType or origin is typing.Union:
            args = [a for a in typing.get_args(hint) if a is not type(None)]
            if isinstance(node, yaml.ScalarNode) and node.tag == _TAG_NULL:
                return None
            return self.decode(node, args[0], path)
        if origin is tuple:
            if isinstance(node, yaml.ScalarNode) and node.tag == _TAG_NULL:
                return ()
            if not isinstance(node, yaml.SequenceNode):
                return self.issue(node, path, "expected a list")
            item_hint = typing.get_args(hint)[0]
            items = [self.decode(n, item_hint, f"{path}[{i}]") for i, n in enumerate(node.value)]
            if any(i is _INVALID for i in items):
                return _INVALID
            return tuple(items)
        if origin is Mapping or origin is dict:
            if isinstance(node, yaml.ScalarNode) and node.tag == _TAG_NULL:
                return types.MappingProxyType({})
            if not isinstance(node, yaml.MappingNode):
                return self.issue(node, path, "expected a map")
            value_hint = typing.get_args(hint)[1]
            out: dict[str, object] = {}
            bad = False
            for knode, vnode in node.value:
                key = self.scalar(knode)
                if not isinstance(key, str):
                    key = str(key)
                sub = _render_path(path, key)
                if key in out:
                    self.issue(knode, sub, "duplicate key")
                    bad = True
                    continue
                value = self.decode(vnode, value_hint, sub)
                bad = bad or value is _INVALID
                out[key] = value
            return _INVALID if bad else types.MappingProxyType(out)
        if hint is not HostPort and isinstance(hint, type) and dataclasses.is_dataclass(hint):
            return self.decode_object(node, hint, path)
        if isinstance(hint, type) and issubclass(hint, enum.Enum):
            raw = self.scalar(node) if isinstance(node, yaml.ScalarNode) else None
            for member in hint:
                if member.value == raw:
                    return member
            allowed = ", ".join(str(m.value) for m in hint)
            return self.issue(node, path, f"invalid value {raw!r} (expected one of: {allowed})")
        if not isinstance(node, yaml.ScalarNode):
            return self.issue(
                node, path, f"expected a {_type_word(hint)}, got a {_node_word(node)}"
            )
        return self._decode_scalar(node, hint, path)

    def _decode_scalar(self, node: yaml.ScalarNode, hint: Any, path: str) -> object:
        value = self.scalar(node)
        if hint is Duration:
            if isinstance(value, str):
                try:
                    return Duration(parse_duration(value))
                except ValueError as exc:
                    return self.issue(node, path, str(exc))
            return self.issue(node, path, f"invalid duration {value!r} (write it like 1.5s)")
        if hint is HostPort:
            if isinstance(value, str):
                try:
                    return parse_host_port(value)
                except ValueError as exc:
                    return self.issue(node, path, str(exc))
            return self.issue(node, path, f"invalid address {value!r} (expected host:port)")
        if hint is str:
            if node.tag == _TAG_STR:
                return value
            return self.issue(node, path, f"expected a string, got {value!r} (quote it)")
        if hint is bool:
            if node.tag == _TAG_BOOL:
                return value
            return self.issue(node, path, f"expected true or false, got {value!r}")
        if hint is int:
            if node.tag == _TAG_INT:
                return value
            return self.issue(node, path, f"expected an integer, got {value!r}")
        if hint is float:
            if node.tag in (_TAG_INT, _TAG_FLOAT):
                return float(typing.cast(float, value))
            return self.issue(node, path, f"expected a number, got {value!r}")
        raise TypeError(f"model type {hint!r} has no decoder")  # a bug in model.py, not input

    def decode_object(
        self, node: yaml.Node, cls: type, path: str, ignore: Iterable[str] = ()
    ) -> object:
        if isinstance(node, yaml.ScalarNode) and node.tag == _TAG_NULL:
            node = yaml.MappingNode("tag:yaml.org,2002:map", [], node.start_mark, node.end_mark)
        if not isinstance(node, yaml.MappingNode):
            return self.issue(node, path, f"expected a map, got a {_node_word(node)}")
        fields = _fields_of(cls)
        ignored = set(ignore)
        kwargs: dict[str, object] = {}
        seen: set[str] = set()
        bad = False
        for knode, vnode in node.value:
            key = self.scalar(knode)
            key_s = key if isinstance(key, str) else str(key)
            sub = _render_path(path, key_s)
            if key_s in seen:
                self.issue(knode, sub, "duplicate field")
                bad = True
                continue
            seen.add(key_s)
            info = fields.get(key_s)
            if info is None:
                if key_s in ignored:
                    continue
                known = ", ".join(sorted(fields))
                self.issue(knode, sub, f"unknown field {key_s!r} (known fields: {known})")
                bad = True
                continue
            value = self.decode(vnode, info.hint, sub)
            if value is _INVALID:
                bad = True
            else:
                kwargs[info.name] = value
        for key, info in fields.items():
            if info.required and key not in seen:
                self.issue(node, _render_path(path, key), "required field is missing")
                bad = True
        if bad:
            return _INVALID
        return cls(**kwargs)


def _type_word(hint: Any) -> str:
    return {
        str: "string",
        int: "integer",
        float: "number",
        bool: "boolean",
        Duration: "duration",
        HostPort: "host:port string",
    }.get(hint, "value")


def _node_word(node: yaml.Node) -> str:
    if isinstance(node, yaml.MappingNode):
        return "map"
    if isinstance(node, yaml.SequenceNode):
        return "list"
    return "scalar"


@dataclasses.dataclass(slots=True)
class _Located:
    resource: Resource
    file: str
    line: int
    lines: dict[str, int]


def _expand(paths: Sequence[str | os.PathLike[str]]) -> list[Path]:
    files: list[Path] = []
    for p in paths:
        path = Path(p)
        if path.is_dir():
            files.extend(
                sorted(
                    f
                    for f in path.rglob("*")
                    if f.suffix in (".yaml", ".yml")
                    and f.is_file()
                    and not _hidden(f.relative_to(path))
                )
            )
        else:
            files.append(path)
    return files


def _hidden(relative: Path) -> bool:
    """A dot-named file or a file under a dot-named directory, which a directory scan skips.

    Kubernetes mounts a ConfigMap as a hidden ``..<timestamp>/`` directory holding the files, a
    ``..data`` link to it and one visible link per key (the kubelet's atomic writer, so an update
    swaps ``..data`` in one rename). Reading the hidden copies as well would load every document
    twice; ``.git`` and editor files are skipped for the same reason.
    """
    return any(part.startswith(".") for part in relative.parts)


def load_paths(paths: Sequence[str | os.PathLike[str]]) -> MeshConfig:
    """Read YAML files and directories (``*.yaml``/``*.yml``, recursively, hidden names skipped)
    into one MeshConfig."""
    issues: list[ConfigIssue] = []
    sources: list[tuple[str, str]] = []
    if not paths:
        raise ConfigError([ConfigIssue(file="-", line=0, where="", path="", message="no files")])
    for f in _expand(paths):
        try:
            sources.append((str(f), f.read_text(encoding="utf-8")))
        except (OSError, UnicodeDecodeError) as exc:
            issues.append(ConfigIssue(file=str(f), line=0, where="", path="", message=str(exc)))
    if issues:
        raise ConfigError(issues)
    return load_texts(sources)


def load_texts(sources: Sequence[tuple[str, str]]) -> MeshConfig:
    """Decode ``(file name, YAML text)`` pairs; raise ConfigError listing every problem."""
    issues: list[ConfigIssue] = []
    located: list[_Located] = []
    for file, text in sources:
        try:
            nodes = list(yaml.compose_all(text, Loader=yaml.SafeLoader))
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            line = mark.line + 1 if mark is not None else 0
            problem = getattr(exc, "problem", None) or str(exc)
            issues.append(
                ConfigIssue(file=file, line=line, where="", path="", message=f"YAML: {problem}")
            )
            continue
        for node in nodes:
            if node is None or (isinstance(node, yaml.ScalarNode) and node.tag == _TAG_NULL):
                continue  # an empty document (a trailing `---`, or only comments)
            item = _decode_document(file, node, issues)
            if item is not None:
                located.append(item)
    if not issues:
        config = _assemble(located, [file for file, _ in sources], issues)
        if config is not None and not issues:
            return config
    raise ConfigError(sorted(issues, key=lambda i: (i.file, i.line)))


def _decode_document(file: str, node: yaml.Node, issues: list[ConfigIssue]) -> _Located | None:
    dec = _Decoder(file, issues)
    if not isinstance(node, yaml.MappingNode):
        dec.issue(node, "", "a document must be a map with apiVersion, kind, metadata and spec")
        return None
    top: dict[str, yaml.Node] = {}
    for knode, vnode in node.value:
        key = str(dec.scalar(knode))
        if key in top:
            dec.issue(knode, key, "duplicate field")
            return None
        top[key] = vnode
    kind_node = top.get("kind")
    kind = dec.scalar(kind_node) if isinstance(kind_node, yaml.ScalarNode) else None
    name_hint = _peek_name(dec, top.get("metadata"))
    dec.where = f"{kind} {name_hint}".strip() if isinstance(kind, str) else ""
    if kind_node is None or not isinstance(kind, str):
        dec.issue(node, "kind", "required field is missing")
        return None
    if kind not in _KINDS:
        if kind in _NOT_YET:
            dec.issue(kind_node, "kind", f"kind {kind!r} is not supported by this meshproxy yet")
        else:
            dec.issue(kind_node, "kind", f"unknown kind {kind!r} (known: {', '.join(_KINDS)})")
        return None
    versions, cls = _KINDS[kind]
    api_node = top.get("apiVersion")
    api = dec.scalar(api_node) if isinstance(api_node, yaml.ScalarNode) else None
    if api_node is None:
        dec.issue(node, "apiVersion", "required field is missing")
        return None
    if api not in versions:
        dec.issue(
            api_node,
            "apiVersion",
            f"{api!r} does not serve {kind} (use one of: {', '.join(versions)})",
        )
        return None
    ok = True
    for key, vnode in top.items():
        if key not in ("apiVersion", "kind", "metadata", "spec", "status"):
            dec.issue(vnode, key, f"unknown field {key!r}")
            ok = False
    meta_node = top.get("metadata")
    if meta_node is None:
        dec.issue(node, "metadata", "required field is missing")
        return None
    metadata = dec.decode_object(meta_node, Metadata, "metadata", ignore=_K8S_METADATA)
    spec_cls = typing.get_type_hints(cls)["spec"]
    spec_node = top.get("spec")
    if spec_node is None:
        spec_node = yaml.MappingNode("tag:yaml.org,2002:map", [], node.start_mark, node.end_mark)
    spec = dec.decode(spec_node, spec_cls, "spec")
    if metadata is _INVALID or spec is _INVALID or not ok:
        return None
    resource: Resource = cls(metadata=metadata, spec=spec)  # type: ignore[arg-type]
    return _Located(resource, file, node.start_mark.line + 1, dec.lines)


def _peek_name(dec: _Decoder, meta: yaml.Node | None) -> str:
    if isinstance(meta, yaml.MappingNode):
        for k, v in meta.value:
            if dec.scalar(k) == "name" and isinstance(v, yaml.ScalarNode):
                return str(dec.scalar(v))
    return ""


def _assemble(
    located: list[_Located], files: list[str], issues: list[ConfigIssue]
) -> MeshConfig | None:
    by_id = {id(item.resource): item for item in located}

    def locate(resource: Resource, path: str) -> tuple[str, int]:
        item = by_id[id(resource)]
        probe = path
        while probe:
            line = item.lines.get(probe)
            if line is not None:
                return item.file, line
            shorter = re.sub(r"(\.[^.\[]+|\[[^\]]*\])$", "", probe)
            probe = "" if shorter == probe else shorter  # a top-level name: stop
        return item.file, item.line

    config = istio.assemble(
        [item.resource for item in located],
        sources=tuple(dict.fromkeys(files)),
        locate=locate,
        report=issues.append,
    )
    return config


Locator = Callable[[Resource, str], tuple[str, int]]

"""PeerAuthentication: the mTLS mode this workload's inbound listener enforces, per port.

Owns Istio's composition of PeerAuthentication resources into one effective mode (reference §1.4;
istio/api ``security/v1beta1/peer_authentication.proto``; istio/istio
``pilot/pkg/security/authn/policy_applier.go`` ``ComposePeerAuthentication``):

1. Levels. *Mesh*: in the root namespace (``istio-system``) without a selector (or with an empty
   ``matchLabels``). *Namespace*: in this workload's namespace without a selector. *Workload*:
   in this workload's namespace with a selector whose ``matchLabels`` all equal this workload's
   labels. A selector policy in the root namespace is ignored ("Workload-level policy, aka the
   one with selector and not in root namespace"), as are policies of other namespaces.
2. One per level: when several share a level, the oldest wins in Istio
   (``CreationTimestamp.Before``); meshproxy has no timestamps and takes the first in config
   order (files in the order given, documents in file order).
3. Inheritance: start from PERMISSIVE ("Initial outputPolicy is set to a PERMISSIVE"); apply the
   mesh, then namespace, then workload mode, each only when it is not UNSET (a missing ``mtls``
   is UNSET).
4. Ports: the workload policy's ``portLevelMtls[port]`` (the *workload* / container port, not the
   Service port) overrides its result for that port; an UNSET port entry inherits the workload
   level's result. Port-level settings of mesh / namespace policies are rejected by validation
   (``ValidatePeerAuthentication``: "mesh/namespace peer authentication cannot have port level
   mTLS").

The result is never UNSET: STRICT (mTLS only), PERMISSIVE (mTLS or plaintext) or DISABLE
(plaintext; a TLS ClientHello is then not terminated by the sidecar).

Rules: pure; computed once per config load, not per connection.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from meshproxy.config.istio import ROOT_NAMESPACE
from meshproxy.config.model import (
    MeshConfig,
    MtlsMode,
    PeerAuthentication,
    PeerAuthenticationMutualTLS,
)


def _no_ports() -> Mapping[int, MtlsMode]:
    return MappingProxyType({})


@dataclass(frozen=True, slots=True, kw_only=True)
class MtlsSettings:
    """The composed result: one mode for the workload and overrides for some ports."""

    mode: MtlsMode  # never UNSET
    ports: Mapping[int, MtlsMode] = field(default_factory=_no_ports)  # never UNSET
    # "ns/name" of the policy chosen at each level ("" if none), for `meshproxy explain`-style output.
    mesh: str = ""
    namespace: str = ""
    workload: str = ""

    def mode_for(self, port: int) -> MtlsMode:
        return self.ports.get(port, self.mode)


def _mode(mtls: PeerAuthenticationMutualTLS | None) -> MtlsMode:
    return MtlsMode.UNSET if mtls is None else mtls.mode


def compose(
    policies: tuple[PeerAuthentication, ...], *, namespace: str, labels: Mapping[str, str]
) -> MtlsSettings:
    """Compose the PeerAuthentications that apply to a workload in ``namespace`` with
    ``labels`` (rules 1-4 of the module docstring)."""
    mesh: PeerAuthentication | None = None
    ns_level: PeerAuthentication | None = None
    workload: PeerAuthentication | None = None
    for pa in policies:
        pa_ns = pa.metadata.namespace or namespace
        selector = pa.spec.selector.match_labels if pa.spec.selector is not None else {}
        if not selector:
            if pa_ns == ROOT_NAMESPACE:
                mesh = mesh or pa
            elif pa_ns == namespace:
                ns_level = ns_level or pa
        elif (
            pa_ns == namespace
            and pa_ns != ROOT_NAMESPACE
            and all(labels.get(k) == v for k, v in selector.items())
        ):
            workload = workload or pa

    # peer_authentication.proto: "UNSET: inherit from parent, if has one. Otherwise treated
    # as PERMISSIVE."
    mode = MtlsMode.PERMISSIVE
    for level in (mesh, ns_level, workload):
        if level is not None and _mode(level.spec.mtls) is not MtlsMode.UNSET:
            mode = _mode(level.spec.mtls)
    ports: dict[int, MtlsMode] = {}
    if workload is not None:
        for port, mtls in workload.spec.port_level_mtls.items():
            if not (port.isascii() and port.isdigit()):
                raise ValueError(f"portLevelMtls key {port!r} is not a port number")
            port_mode = _mode(mtls)
            ports[int(port)] = mode if port_mode is MtlsMode.UNSET else port_mode

    def name(pa: PeerAuthentication | None) -> str:
        return "" if pa is None else f"{pa.metadata.namespace or namespace}/{pa.metadata.name}"

    return MtlsSettings(
        mode=mode,
        ports=MappingProxyType(ports),
        mesh=name(mesh),
        namespace=name(ns_level),
        workload=name(workload),
    )


def mtls_settings(config: MeshConfig) -> MtlsSettings:
    """The composed PeerAuthentication of this proxy's workload (the bootstrap's metadata)."""
    meta = config.bootstrap.metadata
    return compose(config.peer_authentications, namespace=meta.namespace, labels=meta.labels)


def effective_mtls(config: MeshConfig, port: int) -> MtlsMode:
    """STRICT, PERMISSIVE or DISABLE for inbound connections to workload ``port``."""
    return mtls_settings(config).mode_for(port)

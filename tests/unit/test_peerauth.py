"""core/peerauth.py: Istio's PeerAuthentication composition (ComposePeerAuthentication).

The workload is in namespace "default" with labels app=reviews,version=v1. Levels: mesh (root
namespace, no selector) < namespace (own namespace, no selector) < workload (own namespace,
matching selector) < the workload policy's portLevelMtls; UNSET inherits; PERMISSIVE at the top.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

import pytest
from config_helpers import doc

from meshproxy.config.load import load_texts
from meshproxy.config.model import (
    Metadata,
    MtlsMode,
    PeerAuthentication,
    PeerAuthenticationMutualTLS,
    PeerAuthenticationSpec,
    WorkloadSelector,
)
from meshproxy.core.peerauth import MtlsSettings, compose, effective_mtls, mtls_settings

S, P, D, U = MtlsMode.STRICT, MtlsMode.PERMISSIVE, MtlsMode.DISABLE, MtlsMode.UNSET
LABELS = MappingProxyType({"app": "reviews", "version": "v1"})


def pa(
    name: str,
    mode: MtlsMode | None,
    *,
    namespace: str = "default",
    selector: Mapping[str, str] | None = None,
    ports: Mapping[str, MtlsMode] | None = None,
) -> PeerAuthentication:
    return PeerAuthentication(
        metadata=Metadata(name=name, namespace=namespace),
        spec=PeerAuthenticationSpec(
            selector=None if selector is None else WorkloadSelector(match_labels=selector),
            mtls=None if mode is None else PeerAuthenticationMutualTLS(mode=mode),
            port_level_mtls=MappingProxyType(
                {k: PeerAuthenticationMutualTLS(mode=v) for k, v in (ports or {}).items()}
            ),
        ),
    )


def mesh(mode: MtlsMode | None, name: str = "mesh") -> PeerAuthentication:
    return pa(name, mode, namespace="istio-system")


def ns(mode: MtlsMode | None, name: str = "ns") -> PeerAuthentication:
    return pa(name, mode)


def wl(
    mode: MtlsMode | None,
    name: str = "wl",
    *,
    selector: Mapping[str, str] | None = None,
    ports: Mapping[str, MtlsMode] | None = None,
) -> PeerAuthentication:
    return pa(name, mode, selector=selector or {"app": "reviews"}, ports=ports)


def settings(*policies: PeerAuthentication) -> MtlsSettings:
    return compose(policies, namespace="default", labels=LABELS)


@pytest.mark.parametrize(
    ("policies", "expected"),
    [
        ((), P),  # nothing: PERMISSIVE
        ((mesh(S),), S),
        ((mesh(D),), D),
        ((mesh(U),), P),  # UNSET at the top: PERMISSIVE
        ((mesh(None),), P),  # no mtls block = UNSET
        ((mesh(S), ns(D)), D),  # namespace over mesh
        ((mesh(S), ns(U)), S),  # UNSET namespace inherits the mesh
        ((mesh(S), ns(None)), S),
        ((mesh(D), ns(P), wl(S)), S),  # workload over namespace
        ((mesh(D), ns(S), wl(U)), S),  # UNSET workload inherits the namespace
        ((mesh(S), ns(U), wl(U)), S),  # ... and through it, the mesh
        ((ns(S), wl(D)), D),
        ((wl(S),), S),
        ((wl(D), mesh(S), ns(P)), D),  # config order does not matter across levels
    ],
)
def test_precedence_and_inheritance(
    policies: tuple[PeerAuthentication, ...], expected: MtlsMode
) -> None:
    result = settings(*policies)
    assert result.mode is expected
    assert result.mode_for(9080) is expected


@pytest.mark.parametrize(
    ("policy", "applies"),
    [
        (pa("x", S, namespace="shop"), False),  # another namespace's namespace-wide policy
        (pa("x", S, namespace="shop", selector={"app": "reviews"}), False),
        # Istio ignores selector policies in the root namespace (ComposePeerAuthentication).
        (pa("x", S, namespace="istio-system", selector={"app": "reviews"}), False),
        (wl(S, selector={"app": "ratings"}), False),
        (wl(S, selector={"app": "reviews", "version": "v2"}), False),
        (wl(S, selector={"app": "reviews", "version": "v1"}), True),
        (pa("x", S, selector={}), True),  # empty matchLabels: namespace-wide
        (pa("x", S, namespace=""), True),  # unset namespace: the bootstrap's
    ],
)
def test_which_policies_apply(policy: PeerAuthentication, applies: bool) -> None:
    assert settings(policy).mode is (S if applies else P)


def test_first_in_config_order_wins_within_a_level() -> None:
    assert settings(mesh(D, "m1"), mesh(S, "m2")).mode is D
    assert settings(ns(S, "n1"), ns(D, "n2")).mode is S
    assert settings(wl(D, "w1"), wl(S, "w2")).mode is D
    # the first is chosen even when UNSET: it inherits, the second is not consulted
    chosen = settings(mesh(S), ns(U, "n1"), ns(D, "n2"))
    assert (chosen.mode, chosen.namespace) == (S, "default/n1")


def test_port_level_overrides_the_workload_mode_for_that_port_only() -> None:
    result = settings(mesh(S), wl(S, ports={"8080": D, "9090": P}))
    assert result.mode_for(8080) is D
    assert result.mode_for(9090) is P
    assert result.mode_for(9080) is S
    assert effective_ports(result) == {8080: D, 9090: P}


def test_unset_port_level_inherits_the_workload_level_result() -> None:
    # the workload's own mode is UNSET, so the port inherits what the workload inherited
    result = settings(ns(D), wl(U, ports={"8080": U, "8081": S}))
    assert result.mode is D
    assert result.mode_for(8080) is D
    assert result.mode_for(8081) is S


def test_port_level_of_a_workload_policy_that_does_not_select_us_is_ignored() -> None:
    result = settings(ns(P), wl(S, selector={"app": "ratings"}, ports={"8080": D}))
    assert result.mode_for(8080) is P


def test_chosen_policy_names_are_reported() -> None:
    result = settings(mesh(S), ns(P), wl(U))
    assert (result.mesh, result.namespace, result.workload) == (
        "istio-system/mesh",
        "default/ns",
        "default/wl",
    )
    assert settings() == MtlsSettings(mode=P)


def test_non_numeric_port_key_is_refused() -> None:
    with pytest.raises(ValueError, match="not a port number"):
        settings(wl(S, ports={"http": D}))


def effective_ports(result: MtlsSettings) -> dict[int, MtlsMode]:
    return dict(result.ports)


BOOT = doc(
    """
    apiVersion: meshproxy.io/v1alpha1
    kind: MeshProxy
    metadata:
      name: reviews-v1
      namespace: default
      labels: {app: reviews, version: v1}
    spec:
      serviceAccount: reviews
      admin: 127.0.0.1:0
      inbound: {address: 127.0.0.1:0, app: 127.0.0.1:9080}
      # STRICT needs a certificate; loading names the files, only the TLS edge reads them.
      tls: {certChain: cert.pem, privateKey: key.pem, rootCert: ca.pem}
    """
)

PEER_AUTHS = doc(
    """
    apiVersion: security.istio.io/v1
    kind: PeerAuthentication
    metadata: {name: default, namespace: istio-system}
    spec:
      mtls: {mode: STRICT}
    ---
    apiVersion: security.istio.io/v1beta1
    kind: PeerAuthentication
    metadata: {name: reviews}
    spec:
      selector:
        matchLabels: {app: reviews}
      portLevelMtls:
        "8080": {mode: DISABLE}
        "8081": {}
    """
)


def test_effective_mtls_from_yaml() -> None:
    config = load_texts([("boot.yaml", BOOT), ("pa.yaml", PEER_AUTHS)])
    assert effective_mtls(config, 9080) is S
    assert effective_mtls(config, 8080) is D
    assert effective_mtls(config, 8081) is S  # {} is UNSET: inherits the workload's STRICT
    assert mtls_settings(config).workload == "default/reviews"


def test_effective_mtls_without_policies_is_permissive() -> None:
    config = load_texts([("boot.yaml", BOOT)])
    assert effective_mtls(config, 9080) is P

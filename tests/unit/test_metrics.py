"""Istio's standard metrics and the proxy's internals (telemetry/metrics.py), from records by hand.

No sockets and no event loop: each test builds ``RequestRecord``s the way the stacks fill them and
reads the proxy's own registry back. Semantics: reference §3.1 (Istio's metric names, label set and
order, ``unknown`` for missing values) and §2.8 (Envoy's default histogram buckets in ms).
"""

from __future__ import annotations

import prometheus_client
import pytest
from prometheus_client.parser import text_string_to_metric_families

from meshproxy.config.load import load_texts
from meshproxy.config.model import MeshConfig
from meshproxy.core.record import Direction, RequestRecord
from meshproxy.core.routing import PASSTHROUGH_NAME, HostTable, inbound_cluster
from meshproxy.telemetry.metrics import (
    BLACKHOLE_NAME,
    ENVOY_BUCKETS,
    HTTP_LABELS,
    TCP_LABELS,
    MeshMetrics,
    split_service,
)

CLUSTER = "outbound|9080||reviews.default.svc.cluster.local"
V2 = "outbound|9080|v2|reviews.default.svc.cluster.local"
EXTERNAL = "outbound|443||api.example.com"

CONFIG = """\
apiVersion: meshproxy.io/v1alpha1
kind: MeshProxy
metadata:
  name: productpage-v1
  namespace: shop
  labels: {app: productpage, version: v1}
spec:
  serviceAccount: bookinfo-productpage
  trustDomain: example.org
  admin: 127.0.0.1:0
  outbound: {address: 127.0.0.1:0}
  inbound: {address: 127.0.0.1:0, app: 127.0.0.1:9080}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: reviews, namespace: default}
spec:
  hosts: [reviews.default.svc.cluster.local]
  location: MESH_INTERNAL
  ports: [{number: 9080, name: http, protocol: HTTP}]
  resolution: STATIC
  endpoints:
  - {address: 10.0.0.1, labels: {app: reviews, version: v1}}
  - {address: 10.0.0.2, labels: {app: reviews, version: v2}}
  - {address: 10.0.0.3}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews, namespace: default}
spec:
  host: reviews.default.svc.cluster.local
  subsets:
  - {name: v2, labels: {version: v2}}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: api, namespace: egress}
spec:
  hosts: [api.example.com]
  ports: [{number: 443, name: https, protocol: HTTP}]
  resolution: DNS
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: productpage, namespace: shop}
spec:
  hosts: [productpage]
  ports: [{number: 9080, name: http, protocol: HTTP}]
  resolution: STATIC
  endpoints: [{address: 127.0.0.1}]
"""

SOURCE = {
    "source_workload": "productpage-v1",
    "source_workload_namespace": "shop",
    "source_principal": "spiffe://example.org/ns/shop/sa/bookinfo-productpage",
    "source_app": "productpage",
    "source_version": "v1",
    "source_canonical_service": "productpage",
    "source_canonical_revision": "v1",
    "source_cluster": "unknown",
}


@pytest.fixture(scope="module")
def config() -> MeshConfig:
    return load_texts([("mesh.yaml", CONFIG)])


@pytest.fixture
def metrics(config: MeshConfig) -> MeshMetrics:
    clusters = [*HostTable(config).clusters.values(), inbound_cluster(15006, "127.0.0.1", 9080)]
    return MeshMetrics(config, clusters)


def record(
    *,
    direction: Direction = Direction.OUTBOUND,
    cluster: str = CLUSTER,
    host: str = "10.0.0.1:9080",
    code: int = 200,
    flags: tuple[str, ...] = (),
    seconds: float = 0.012,
    received: int = 10,
    sent: int = 100,
    authority: str = "reviews:9080",
    path: str = "/reviews/0",
) -> RequestRecord:
    """A record as the stacks leave it once the request is over."""
    rec = RequestRecord(direction, 100.0, "127.0.0.1:50000")
    rec.method = "GET"
    rec.path = path
    rec.authority = authority
    rec.cluster = cluster
    rec.upstream_host = host
    rec.response_code = code
    for flag in flags:
        rec.add_flag(flag)
    rec.bytes_received = received
    rec.bytes_sent = sent
    rec.end = 100.0 + seconds
    return rec


def series(metrics: MeshMetrics, name: str) -> list[dict[str, str]]:
    """The label sets of every sample of ``name`` in the registry, with their values."""
    out = []
    for family in metrics.registry.collect():
        for sample in family.samples:
            if sample.name == name:
                out.append({**sample.labels, "value": str(sample.value)})
    return out


def only(metrics: MeshMetrics, name: str) -> dict[str, str]:
    found = series(metrics, name)
    assert len(found) == 1, found
    return found[0]


# --------------------------------------------------------------------------------------------
# Labels


def test_outbound_labels_are_istios_full_set(metrics: MeshMetrics) -> None:
    metrics.sink(record())
    labels = only(metrics, "istio_requests_total")
    assert labels == {
        "reporter": "source",
        **SOURCE,
        "destination_workload": "unknown",
        "destination_workload_namespace": "unknown",
        "destination_principal": "unknown",
        "destination_app": "reviews",
        "destination_version": "v1",
        "destination_service": "reviews.default.svc.cluster.local",
        "destination_service_name": "reviews",
        "destination_service_namespace": "default",
        "destination_canonical_service": "reviews",
        "destination_canonical_revision": "v1",
        "destination_cluster": "unknown",
        "request_protocol": "http",
        "response_flags": "-",
        "connection_security_policy": "unknown",
        "response_code": "200",
        "grpc_response_status": "",
        "value": "1.0",
    }


def test_label_names_in_istios_order(metrics: MeshMetrics) -> None:
    # reference §3.1: reporter, source_* (8), destination_* (11), then the request's labels.
    assert HTTP_LABELS[0] == "reporter"
    assert HTTP_LABELS[1:9] == tuple(SOURCE)
    assert HTTP_LABELS[9] == "destination_workload"
    assert HTTP_LABELS[-5:] == (
        "request_protocol",
        "response_flags",
        "connection_security_policy",
        "response_code",
        "grpc_response_status",
    )
    assert HTTP_LABELS[:-2] == TCP_LABELS
    metrics.sink(record())
    families = {m.name: m for m in metrics.registry.collect()}
    for name in ("istio_requests", "istio_request_duration_milliseconds"):
        sample = families[name].samples[0]
        assert tuple(sample.labels)[: len(HTTP_LABELS)] == HTTP_LABELS


def test_endpoint_labels_pick_destination_app_and_version(metrics: MeshMetrics) -> None:
    metrics.sink(record(cluster=V2, host="10.0.0.2:9080"))
    metrics.sink(record(host="10.0.0.3:9080"))  # an endpoint without labels
    by_host = {s["destination_version"]: s for s in series(metrics, "istio_requests_total")}
    assert by_host["v2"]["destination_app"] == "reviews"
    assert by_host["v2"]["destination_service"] == "reviews.default.svc.cluster.local"
    assert by_host["unknown"]["destination_app"] == "unknown"
    assert by_host["unknown"]["destination_canonical_service"] == "unknown"


def test_uf_and_flags(metrics: MeshMetrics) -> None:
    metrics.sink(record(code=503, flags=("UF",), sent=91))
    metrics.sink(record(code=503, flags=("URX", "UF"), sent=91))
    metrics.sink(record(code=503, flags=("UF",), sent=91))
    got = {
        (s["response_code"], s["response_flags"]): s["value"]
        for s in series(metrics, "istio_requests_total")
    }
    assert got == {("503", "UF"): "2.0", ("503", "URX,UF"): "1.0"}


def test_no_endpoint_chosen_still_names_the_service(metrics: MeshMetrics) -> None:
    # 503 UH: routing chose the cluster, balancing found no endpoint.
    metrics.sink(record(host="", code=503, flags=("UH",)))
    labels = only(metrics, "istio_requests_total")
    assert labels["destination_service"] == "reviews.default.svc.cluster.local"
    assert labels["destination_app"] == "unknown"
    assert labels["response_flags"] == "UH"


def test_external_service_namespace_is_its_service_entrys(metrics: MeshMetrics) -> None:
    metrics.sink(record(cluster=EXTERNAL, host="api.example.com:443"))
    labels = only(metrics, "istio_requests_total")
    assert labels["destination_service"] == "api.example.com"
    assert labels["destination_service_name"] == "api.example.com"
    assert labels["destination_service_namespace"] == "egress"


def test_inbound_is_reported_by_the_destination(metrics: MeshMetrics) -> None:
    rec = record(
        direction=Direction.INBOUND,
        cluster="inbound|15006||",
        host="127.0.0.1:9080",
        authority="productpage:9080",
    )
    metrics.sink(rec)
    labels = only(metrics, "istio_requests_total")
    assert labels["reporter"] == "destination"
    assert labels["connection_security_policy"] == "none"  # no mTLS yet
    for key in SOURCE:
        assert labels[key] == "unknown", key  # the caller is unknown until mTLS
    assert labels["destination_workload"] == "productpage-v1"
    assert labels["destination_workload_namespace"] == "shop"
    assert labels["destination_principal"] == (
        "spiffe://example.org/ns/shop/sa/bookinfo-productpage"
    )
    assert labels["destination_app"] == "productpage"
    assert labels["destination_version"] == "v1"
    assert labels["destination_service"] == "productpage.shop.svc.cluster.local"
    assert labels["destination_service_name"] == "productpage"
    assert labels["destination_service_namespace"] == "shop"


def test_inbound_host_aliases_and_case(metrics: MeshMetrics) -> None:
    for authority in (
        "productpage",
        "PRODUCTPAGE:9080",
        "productpage.shop",
        "productpage.shop.svc.cluster.local:9080",
    ):
        metrics.sink(
            record(direction=Direction.INBOUND, cluster="inbound|15006||", authority=authority)
        )
    labels = only(metrics, "istio_requests_total")
    assert labels["destination_service"] == "productpage.shop.svc.cluster.local"
    assert labels["value"] == "4.0"


def test_passthrough_and_blackhole_use_istios_cluster_names(metrics: MeshMetrics) -> None:
    metrics.sink(record(cluster=PASSTHROUGH_NAME, host="93.184.216.34:80", authority="x.org"))
    metrics.sink(record(cluster=BLACKHOLE_NAME, host="", code=502, authority="y.org"))
    got = {s["destination_service"]: s for s in series(metrics, "istio_requests_total")}
    assert set(got) == {PASSTHROUGH_NAME, BLACKHOLE_NAME}
    assert got[PASSTHROUGH_NAME]["destination_service_name"] == PASSTHROUGH_NAME
    assert got[BLACKHOLE_NAME]["response_code"] == "502"


def test_local_reply_before_routing_is_unknown(metrics: MeshMetrics) -> None:
    metrics.sink(record(cluster="", host="", code=404, flags=("NR",)))
    labels = only(metrics, "istio_requests_total")
    assert labels["destination_service"] == "unknown"
    assert labels["response_flags"] == "NR"


def test_label_values_stay_bounded(metrics: MeshMetrics) -> None:
    """Raw hosts, paths and authorities never reach a label: 1000 distinct ones, one series."""
    for i in range(1000):
        metrics.sink(
            record(
                cluster=PASSTHROUGH_NAME,
                host=f"10.1.{i // 256}.{i % 256}:{1000 + i}",
                authority=f"host-{i}.example:{1000 + i}",
                path=f"/user/{i}?q={i}",
            )
        )
        metrics.sink(
            record(
                direction=Direction.INBOUND,
                cluster="inbound|15006||",
                authority=f"attacker-{i}.example",
                path=f"/x/{i}",
            )
        )
    assert len(series(metrics, "istio_requests_total")) == 2
    text = metrics.exposition().decode()
    assert "host-" not in text and "attacker-" not in text
    assert "/user/" not in text and "10.1." not in text
    assert len(metrics._http) == 2


def test_children_bound_once_per_label_set(
    metrics: MeshMetrics, monkeypatch: pytest.MonkeyPatch
) -> None:
    for _ in range(50):
        metrics.sink(record())
    metrics.sink(record(code=503, flags=("UF",)))
    assert len(metrics._http) == 2  # one series object per label set, bound at first use


# --------------------------------------------------------------------------------------------
# Histograms and TCP


def test_buckets_are_envoys_default_in_ms(metrics: MeshMetrics) -> None:
    assert ENVOY_BUCKETS == (
        0.5, 1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000,
        30000, 60000, 300000, 600000, 1800000, 3600000,
    )  # fmt: skip
    metrics.sink(record())
    for family in text_string_to_metric_families(metrics.exposition().decode()):
        if family.type != "histogram":
            continue
        bounds = [s.labels["le"] for s in family.samples if s.name.endswith("_bucket")]
        assert [float(b) for b in bounds] == [*ENVOY_BUCKETS, float("inf")], family.name


def test_duration_in_ms_and_body_sizes(metrics: MeshMetrics) -> None:
    metrics.sink(record(seconds=0.25, received=300, sent=7000))
    metrics.sink(record(seconds=0.004, received=0, sent=20))
    labels = {"response_code": "200", "destination_version": "v1"}
    full = {k: v for k, v in only(metrics, "istio_requests_total").items() if k != "value"}
    assert full.items() >= labels.items()
    value = metrics.registry.get_sample_value
    assert value("istio_request_duration_milliseconds_sum", full) == pytest.approx(254.0)
    assert value("istio_request_duration_milliseconds_count", full) == 2
    assert value("istio_request_duration_milliseconds_bucket", {**full, "le": "5.0"}) == 1
    assert value("istio_request_duration_milliseconds_bucket", {**full, "le": "250.0"}) == 2
    assert value("istio_request_bytes_sum", full) == 300
    assert value("istio_response_bytes_sum", full) == 7020
    assert value("istio_response_bytes_bucket", {**full, "le": "5000.0"}) == 1


def test_upgraded_connection_counts_as_tcp(metrics: MeshMetrics) -> None:
    metrics.sink(record(code=101, received=40, sent=900))
    metrics.sink(record(code=101, received=2, sent=5))
    opened = only(metrics, "istio_tcp_connections_opened_total")
    assert opened["request_protocol"] == "tcp"
    assert "response_code" not in opened and "grpc_response_status" not in opened
    assert opened["destination_service"] == "reviews.default.svc.cluster.local"
    assert opened["value"] == "2.0"
    assert only(metrics, "istio_tcp_connections_closed_total")["value"] == "2.0"
    assert only(metrics, "istio_tcp_sent_bytes_total")["value"] == "905.0"
    assert only(metrics, "istio_tcp_received_bytes_total")["value"] == "42.0"
    # The HTTP request that asked for the upgrade is counted too, as Istio's HTTP filter does.
    assert only(metrics, "istio_requests_total")["response_code"] == "101"


def test_plain_requests_leave_tcp_metrics_empty(metrics: MeshMetrics) -> None:
    metrics.sink(record())
    assert series(metrics, "istio_tcp_connections_opened_total") == []


# --------------------------------------------------------------------------------------------
# Registry, exposition, internals


def test_own_registry_not_the_global_one(metrics: MeshMetrics) -> None:
    metrics.sink(record())
    assert metrics.registry is not prometheus_client.REGISTRY
    assert prometheus_client.REGISTRY.get_sample_value("istio_requests_total", {}) is None
    text = metrics.exposition().decode()
    assert "_created" not in text  # Istio exports no *_created series
    assert "# TYPE istio_requests_total counter" in text


def test_two_instances_do_not_collide(config: MeshConfig) -> None:
    a = MeshMetrics(config, HostTable(config).clusters.values())
    b = MeshMetrics(config, HostTable(config).clusters.values())
    a.sink(record())
    assert series(b, "istio_requests_total") == []


def test_reload_counters_exist_at_zero(metrics: MeshMetrics) -> None:
    value = metrics.registry.get_sample_value
    assert value("meshproxy_config_reloads_total", {"result": "accepted"}) == 0
    assert value("meshproxy_config_reloads_total", {"result": "rejected"}) == 0
    metrics.reload_rejected()
    assert value("meshproxy_config_reloads_total", {"result": "rejected"}) == 1


def _snapshot(name: str, **over: object) -> dict[str, object]:
    """A ClusterState.snapshot() as io/pool.py shapes it (only the keys the collector reads)."""
    snap: dict[str, object] = {
        "name": name,
        "limits": {
            "max_connections": 10,
            "connections": 3,
            "remaining_connections": 7,
            "max_pending_requests": 5,
            "pending_requests": 1,
            "remaining_pending_requests": 4,
            "max_requests": 20,
            "requests": 2,
            "remaining_requests": 18,
            "max_retries": 3,
            "retries": 0,
            "remaining_retries": 3,
            "overflow_connections": 0,
            "overflow_pending": 4,
            "overflow_requests": 1,
            "overflow_retries": 2,
        },
        "retries": 6,
        "retry_overflows": 2,
        "timeouts": 1,
        "endpoints": [
            {
                "total_connections": 4,
                "total_requests": 40,
                "connect_failures": 1,
                "health": "healthy",
            },
            {
                "total_connections": 1,
                "total_requests": 9,
                "connect_failures": 0,
                "health": "ejected",
            },
        ],
        "outlier_detection": {
            "ejected": 1,
            "ejections_total": 3,
            "ejections_overflow": 0,
            "ejections_consecutive_5xx": 2,
            "ejections_consecutive_gateway_failure": 0,
            "ejections_consecutive_local_origin_failure": 1,
        },
    }
    snap.update(over)
    return snap


def test_internals_from_snapshots(config: MeshConfig) -> None:
    snaps = [
        _snapshot(CLUSTER),
        _snapshot(PASSTHROUGH_NAME, timeouts=2),
        _snapshot(PASSTHROUGH_NAME, timeouts=3),  # passthrough hosts share one name: summed
    ]
    metrics = MeshMetrics(
        config,
        (),
        cluster_snapshots=lambda: snaps,
        listener_snapshots=lambda: [("outbound", 4), ("inbound", 1)],
    )
    value = metrics.registry.get_sample_value
    c = {"cluster_name": CLUSTER}
    assert value("meshproxy_cluster_upstream_cx_active", c) == 3
    assert value("meshproxy_cluster_upstream_cx_total", c) == 5
    assert value("meshproxy_cluster_upstream_cx_connect_fail_total", c) == 1
    assert value("meshproxy_cluster_upstream_rq_active", c) == 2
    assert value("meshproxy_cluster_upstream_rq_total", c) == 49
    assert value("meshproxy_cluster_upstream_rq_pending_active", c) == 1
    assert value("meshproxy_cluster_upstream_rq_retry_total", c) == 6
    assert value("meshproxy_cluster_upstream_rq_timeout_total", c) == 1
    assert value("meshproxy_cluster_membership_total", c) == 2
    assert value("meshproxy_cluster_membership_healthy", c) == 1
    assert value("meshproxy_cluster_upstream_overflow_total", {**c, "kind": "pending"}) == 4
    assert value("meshproxy_cluster_upstream_overflow_total", {**c, "kind": "retries"}) == 2
    assert value("meshproxy_cluster_limit", {**c, "resource": "pending_requests"}) == 5
    assert value("meshproxy_cluster_limit_remaining", {**c, "resource": "requests"}) == 18
    ejections = "meshproxy_cluster_outlier_detection_ejections_total"
    assert value(ejections, {**c, "kind": "consecutive_5xx"}) == 2
    assert value(ejections, {**c, "kind": "consecutive_local_origin_failure"}) == 1
    assert value("meshproxy_cluster_outlier_detection_ejections_active", c) == 1
    p = {"cluster_name": PASSTHROUGH_NAME}
    assert value("meshproxy_cluster_upstream_rq_timeout_total", p) == 5
    assert value("meshproxy_cluster_upstream_rq_total", p) == 98
    assert value("meshproxy_listener_downstream_cx_active", {"listener_name": "outbound"}) == 4
    # A cluster without outlier detection reports zero ejections, not an error.
    snaps.append(_snapshot("outbound|80||plain", outlier_detection=None))
    assert (
        value(
            "meshproxy_cluster_outlier_detection_ejections_active",
            {"cluster_name": "outbound|80||plain"},
        )
        == 0
    )


def test_certificate_expiry_registered_without_fake_values(config: MeshConfig) -> None:
    metrics = MeshMetrics(config, ())
    text = metrics.exposition().decode()
    assert "# TYPE meshproxy_certificate_expiration_timestamp_seconds gauge" in text
    assert "\nmeshproxy_certificate_expiration_timestamp_seconds{" not in text
    with_cert = MeshMetrics(config, (), certificates=lambda: [("default", 1.9e9)])
    assert with_cert.registry.get_sample_value(
        "meshproxy_certificate_expiration_timestamp_seconds", {"certificate": "default"}
    ) == pytest.approx(1.9e9)


def test_split_service() -> None:
    assert split_service("reviews.default.svc.cluster.local", {}) == ("reviews", "default")
    assert split_service("api.example.com", {"api.example.com": "egress"}) == (
        "api.example.com",
        "egress",
    )
    assert split_service("api.example.com", {}) == ("api.example.com", "unknown")

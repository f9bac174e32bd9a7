"""config/load.py: YAML text and files in, the typed frozen model out, or every error located.

Each error case asserts the exact file, line (1-based) and field path of the issue, so that a user
can jump straight to the mistake.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from config_helpers import BOOT, doc, docs, issues_of, line_of, located, only_issue

from meshproxy.config.istio import fqdn
from meshproxy.config.load import load_paths, load_texts
from meshproxy.config.model import (
    HostPort,
    Location,
    MeshConfig,
    Resolution,
    SimpleLB,
    TrafficPolicyMode,
)
from meshproxy.errors import ConfigError

# ---------------------------------------------------------------------------------------------
# Helpers


SE = doc(
    """
    apiVersion: networking.istio.io/v1
    kind: ServiceEntry
    metadata:
      name: reviews
    spec:
      hosts: [reviews]
      ports:
      - number: 9080
        name: http
        protocol: HTTP
      resolution: STATIC
      endpoints:
      - address: 127.0.0.1
        ports: {http: 9080}
    """
)


def with_boot(*parts: str) -> str:
    return docs(BOOT, *parts)


# ---------------------------------------------------------------------------------------------
# A valid, complete configuration


FULL = docs(
    """
    apiVersion: meshproxy.io/v1alpha1
    kind: MeshProxy
    metadata:
      name: productpage-v1
      namespace: bookinfo
    spec:
      serviceAccount: bookinfo-productpage
      trustDomain: example.org
      admin: 127.0.0.1:15000
      outbound:
        address: 127.0.0.1:15001
      inbound:
        address: "[::1]:15006"
        app: 127.0.0.1:9080
      outboundTrafficPolicy: REGISTRY_ONLY
      drainDuration: 1m
      timeouts:
        requestHeaders: 250ms
        idle: 1h30m
    """,
    """
    apiVersion: networking.istio.io/v1
    kind: ServiceEntry
    metadata:
      name: reviews
      labels: {app: reviews}
    spec:
      hosts: [reviews]
      ports:
      - number: 9080
        name: http
        protocol: HTTP
        targetPort: 9081
      location: MESH_INTERNAL
      resolution: STATIC
      endpoints:
      - address: 10.0.0.1
        ports: {http: 9080}
        labels: {version: v1}
        weight: 3
      - address: 10.0.0.2
        labels: {version: v2}
    """,
    """
    apiVersion: networking.istio.io/v1beta1
    kind: VirtualService
    metadata:
      name: reviews
      namespace: bookinfo
    spec:
      hosts: [reviews]
      http:
      - name: jason
        match:
        - uri: {prefix: /api}
          method: {exact: GET}
          headers:
            end-user: {exact: jason}
          queryParams:
            debug: {regex: "on|yes"}
          ignoreUriCase: true
        route:
        - destination: {host: reviews, subset: v2, port: {number: 9080}}
          weight: 75
          headers:
            request:
              set: {x-canary: "true"}
        - destination: {host: reviews, subset: v1}
          weight: 25
        timeout: 1.5s
        retries:
          attempts: 3
          perTryTimeout: 500ms
          retryOn: 5xx,connect-failure
        fault:
          delay:
            fixedDelay: 2s
            percentage: {value: 10}
          abort:
            httpStatus: 503
            percentage: {value: 0.5}
        mirror: {host: reviews, subset: v1}
        mirrorPercentage: {value: 20}
        corsPolicy:
          allowOrigins:
          - exact: https://example.com
          allowMethods: [GET, POST]
          maxAge: 24h
          allowCredentials: false
        headers:
          response:
            remove: [x-internal]
      - route:
        - destination: {host: reviews.bookinfo.svc.cluster.local}
    """,
    """
    apiVersion: networking.istio.io/v1alpha3
    kind: DestinationRule
    metadata:
      name: reviews
    spec:
      host: reviews
      trafficPolicy:
        loadBalancer: {simple: LEAST_REQUEST}
        connectionPool:
          tcp: {maxConnections: 100, connectTimeout: 250ms}
          http: {http1MaxPendingRequests: 10, maxRetries: 2}
        outlierDetection:
          consecutive5xxErrors: 5
          interval: 10s
          baseEjectionTime: 30s
          maxEjectionPercent: 50
      subsets:
      - name: v1
        labels: {version: v1}
      - name: v2
        labels: {version: v2}
        trafficPolicy:
          loadBalancer: {simple: ROUND_ROBIN}
    """,
)


def test_full_config_loads_into_the_typed_model() -> None:
    config = load_texts([("mesh.yaml", FULL)])
    assert isinstance(config, MeshConfig)
    assert config.sources == ("mesh.yaml",)

    boot = config.bootstrap
    assert boot.metadata.name == "productpage-v1"
    assert boot.metadata.namespace == "bookinfo"
    spec = boot.spec
    assert spec.service_account == "bookinfo-productpage"
    assert spec.trust_domain == "example.org"
    assert spec.admin == HostPort(host="127.0.0.1", port=15000)
    assert spec.outbound is not None
    assert spec.outbound.address == HostPort(host="127.0.0.1", port=15001)
    assert spec.inbound is not None
    assert spec.inbound.address == HostPort(host="::1", port=15006)
    assert str(spec.inbound.address) == "[::1]:15006"
    assert spec.inbound.app == HostPort(host="127.0.0.1", port=9080)
    assert spec.outbound_traffic_policy is TrafficPolicyMode.REGISTRY_ONLY
    assert spec.drain_duration == 60.0
    assert spec.timeouts.request_headers == 0.25
    assert spec.timeouts.idle == 5400.0

    (se,) = config.service_entries
    assert se.metadata.name == "reviews"
    assert se.metadata.namespace == "bookinfo"  # filled from the bootstrap
    assert dict(se.metadata.labels) == {"app": "reviews"}
    assert se.spec.hosts == ("reviews",)
    (port,) = se.spec.ports
    assert (port.number, port.name, port.protocol, port.target_port) == (9080, "http", "HTTP", 9081)
    assert se.spec.location is Location.MESH_INTERNAL
    assert se.spec.resolution is Resolution.STATIC
    first, second = se.spec.endpoints
    assert first.address == "10.0.0.1"
    assert dict(first.ports) == {"http": 9080}
    assert dict(first.labels) == {"version": "v1"}
    assert first.weight == 3
    assert second.weight is None
    assert dict(second.ports) == {}

    (vs,) = config.virtual_services
    assert vs.metadata.namespace == "bookinfo"
    assert vs.spec.hosts == ("reviews",)
    jason, fallback = vs.spec.http
    assert jason.name == "jason"
    (match,) = jason.match
    assert match.uri is not None and match.uri.prefix == "/api" and match.uri.exact is None
    assert match.method is not None and match.method.exact == "GET"
    assert match.headers["end-user"].exact == "jason"
    assert match.query_params["debug"].regex == "on|yes"
    assert match.ignore_uri_case is True
    v2, v1 = jason.route
    assert v2.destination.host == "reviews"
    assert v2.destination.subset == "v2"
    assert v2.destination.port is not None and v2.destination.port.number == 9080
    assert v2.weight == 75
    assert v2.headers is not None and v2.headers.request is not None
    assert dict(v2.headers.request.set) == {"x-canary": "true"}
    assert (v1.destination.subset, v1.weight, v1.destination.port) == ("v1", 25, None)
    assert jason.timeout == 1.5
    assert jason.retries is not None
    assert jason.retries.attempts == 3
    assert jason.retries.per_try_timeout == 0.5
    assert jason.retries.retry_on == "5xx,connect-failure"
    assert jason.fault is not None
    assert jason.fault.delay is not None and jason.fault.delay.fixed_delay == 2.0
    assert jason.fault.delay.percentage is not None
    assert jason.fault.delay.percentage.value == 10.0
    assert isinstance(jason.fault.delay.percentage.value, float)
    assert jason.fault.abort is not None and jason.fault.abort.http_status == 503
    assert jason.fault.abort.percentage is not None
    assert jason.fault.abort.percentage.value == 0.5
    assert jason.mirror is not None and jason.mirror.subset == "v1"
    assert jason.mirror_percentage is not None and jason.mirror_percentage.value == 20.0
    cors = jason.cors_policy
    assert cors is not None
    assert cors.allow_origins[0].exact == "https://example.com"
    assert cors.allow_methods == ("GET", "POST")
    assert cors.max_age == 86400.0
    assert cors.allow_credentials is False
    assert jason.headers is not None and jason.headers.response is not None
    assert jason.headers.response.remove == ("x-internal",)
    assert fallback.route[0].destination.host == "reviews.bookinfo.svc.cluster.local"
    assert fallback.route[0].weight is None

    (dr,) = config.destination_rules
    assert dr.metadata.namespace == "bookinfo"
    assert dr.spec.host == "reviews"
    tp = dr.spec.traffic_policy
    assert tp is not None
    assert tp.load_balancer is not None and tp.load_balancer.simple is SimpleLB.LEAST_REQUEST
    assert tp.connection_pool is not None
    assert tp.connection_pool.tcp is not None
    assert tp.connection_pool.tcp.max_connections == 100
    assert tp.connection_pool.tcp.connect_timeout == 0.25
    assert tp.connection_pool.http is not None
    assert tp.connection_pool.http.http1_max_pending_requests == 10
    assert tp.connection_pool.http.max_retries == 2
    assert tp.outlier_detection is not None
    assert tp.outlier_detection.consecutive_5xx_errors == 5
    assert tp.outlier_detection.interval == 10.0
    assert tp.outlier_detection.base_ejection_time == 30.0
    assert tp.outlier_detection.max_ejection_percent == 50
    assert [s.name for s in dr.spec.subsets] == ["v1", "v2"]
    assert dict(dr.spec.subsets[1].labels) == {"version": "v2"}
    sub_tp = dr.spec.subsets[1].traffic_policy
    assert sub_tp is not None and sub_tp.load_balancer is not None
    assert sub_tp.load_balancer.simple is SimpleLB.ROUND_ROBIN

    # Short names stay as written in the model; fqdn() resolves them in the filled namespace.
    assert fqdn(vs.spec.hosts[0], vs.metadata.namespace) == "reviews.bookinfo.svc.cluster.local"
    assert fqdn(dr.spec.host, dr.metadata.namespace) == fallback.route[0].destination.host


def test_the_model_is_frozen() -> None:
    config = load_texts([("mesh.yaml", FULL)])
    with pytest.raises(AttributeError):
        config.bootstrap.spec.service_account = "x"  # type: ignore[misc]
    assert isinstance(config.service_entries, tuple)
    assert isinstance(config.service_entries[0].spec.ports, tuple)
    with pytest.raises(TypeError):
        config.service_entries[0].spec.endpoints[0].ports["http"] = 1  # type: ignore[index]


def test_defaults_of_a_minimal_bootstrap() -> None:
    text = doc(
        """
        apiVersion: meshproxy.io/v1alpha1
        kind: MeshProxy
        metadata: {name: minimal}
        spec:
          outbound: {address: 127.0.0.1:0}
        """
    )
    config = load_texts([("m.yaml", text)])
    assert config.bootstrap.metadata.namespace == "default"
    spec = config.bootstrap.spec
    assert spec.service_account == "default"
    assert spec.trust_domain == "cluster.local"
    assert spec.admin == HostPort(host="127.0.0.1", port=15000)
    assert spec.inbound is None
    assert spec.outbound_traffic_policy is TrafficPolicyMode.ALLOW_ANY
    assert spec.drain_duration == 5.0
    assert spec.timeouts.request_headers == 10.0
    assert spec.timeouts.idle == 3600.0
    assert config.service_entries == ()
    assert config.virtual_services == ()
    assert config.destination_rules == ()


def test_explicit_namespaces_are_kept_and_absent_ones_come_from_the_bootstrap() -> None:
    text = docs(
        BOOT.replace("namespace: default", "namespace: shop"),
        SE,
        SE.replace("name: reviews", "name: reviews\n  namespace: other"),
    )
    config = load_texts([("m.yaml", text)])
    assert config.bootstrap.metadata.namespace == "shop"
    assert [se.metadata.namespace for se in config.service_entries] == ["shop", "other"]


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("250ms", 0.25),
        ("1.5s", 1.5),
        ("1m", 60.0),
        ("1h", 3600.0),
        ("1h30m", 5400.0),
        ("0s", 0.0),
        ("100us", 0.0001),
    ],
)
def test_durations_are_seconds(text: str, seconds: float) -> None:
    config = load_texts([("m.yaml", BOOT + f"  drainDuration: {text}\n")])
    assert config.bootstrap.spec.drain_duration == pytest.approx(seconds)
    assert isinstance(config.bootstrap.spec.drain_duration, float)


@pytest.mark.parametrize(
    "api", ["networking.istio.io/v1", "networking.istio.io/v1beta1", "networking.istio.io/v1alpha3"]
)
def test_every_served_networking_api_version_is_accepted(api: str) -> None:
    text = with_boot(SE.replace("networking.istio.io/v1", api))
    config = load_texts([("m.yaml", text)])
    assert config.service_entries[0].spec.hosts == ("reviews",)


def test_kubernetes_server_fields_and_status_are_accepted() -> None:
    se = SE.replace(
        "  name: reviews\n",
        "  name: reviews\n"
        "  uid: 7d2c1a4e-0000-4000-8000-000000000000\n"
        '  resourceVersion: "12345"\n'
        "  generation: 2\n"
        '  creationTimestamp: "2024-01-01T00:00:00Z"\n'
        "  annotations:\n"
        "    kubectl.kubernetes.io/last-applied-configuration: '{}'\n",
    )
    se += "status:\n  observedGeneration: '2'\n  conditions: [{type: Reconciled, status: 'True'}]\n"
    config = load_texts([("m.yaml", with_boot(se))])
    (entry,) = config.service_entries
    assert entry.metadata.name == "reviews"
    assert dict(entry.metadata.annotations) == {
        "kubectl.kubernetes.io/last-applied-configuration": "{}"
    }


def test_comment_only_leading_document_is_skipped() -> None:
    config = load_texts([("m.yaml", "# leading comment\n---\n" + with_boot(SE))])
    assert len(config.service_entries) == 1


@pytest.mark.parametrize(
    "tail",
    [
        "---\n",  # a trailing separator, as many generators write
        "---\n# trailing comment\n",
        "---\n---\n",
    ],
)
def test_empty_documents_are_skipped(tail: str) -> None:
    # kubectl and Istio skip empty documents in a multi-document file.
    config = load_texts([("m.yaml", with_boot(SE) + tail)])
    assert len(config.service_entries) == 1


# ---------------------------------------------------------------------------------------------
# Files and directories


def test_load_paths_reads_files_and_directories(tmp_path: Path) -> None:
    (tmp_path / "boot.yaml").write_text(BOOT)
    conf = tmp_path / "conf.d"
    (conf / "nested").mkdir(parents=True)
    (conf / "a-services.yml").write_text(SE)
    (conf / "nested" / "b-routes.yaml").write_text(
        docs(
            """
            apiVersion: networking.istio.io/v1
            kind: VirtualService
            metadata: {name: reviews}
            spec:
              hosts: [reviews]
              http:
              - route:
                - destination: {host: reviews}
            """,
            """
            apiVersion: networking.istio.io/v1
            kind: DestinationRule
            metadata: {name: reviews}
            spec:
              host: reviews
            """,
        )
    )
    (conf / "README.txt").write_text("not: [yaml")  # not *.yaml/*.yml: ignored
    config = load_paths([tmp_path / "boot.yaml", conf])
    assert config.sources == (
        str(tmp_path / "boot.yaml"),
        str(conf / "a-services.yml"),
        str(conf / "nested" / "b-routes.yaml"),
    )
    assert [se.metadata.name for se in config.service_entries] == ["reviews"]
    assert [vs.metadata.name for vs in config.virtual_services] == ["reviews"]
    assert [dr.metadata.name for dr in config.destination_rules] == ["reviews"]


def test_load_paths_accepts_str_paths_and_a_single_multi_document_file(tmp_path: Path) -> None:
    path = tmp_path / "mesh.yml"
    path.write_text(FULL)
    config = load_paths([str(path)])
    assert config.sources == (str(path),)
    assert config.bootstrap.metadata.name == "productpage-v1"


def test_load_paths_reports_errors_with_the_real_file_name(tmp_path: Path) -> None:
    good = tmp_path / "a.yaml"
    good.write_text(BOOT)
    bad = tmp_path / "b.yaml"
    bad.write_text(SE.replace("resolution: STATIC", "resolution: STATIK"))
    with pytest.raises(ConfigError) as info:
        load_paths([good, bad])
    (issue,) = info.value.issues
    assert located(issue) == (str(bad), 11, "ServiceEntry reviews", "spec.resolution")


def test_load_paths_reports_a_missing_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as info:
        load_paths([missing])
    (issue,) = info.value.issues
    assert issue.file == str(missing)
    assert "No such file" in issue.message


# ---------------------------------------------------------------------------------------------
# Shape errors: each names file, line and field path


def test_unknown_top_level_field() -> None:
    text = with_boot(SE + "specs: {}\n")
    issue = only_issue(("m.yaml", text))
    assert located(issue) == ("m.yaml", line_of(text, "specs:"), "ServiceEntry reviews", "specs")
    assert issue.message == "unknown field 'specs'"


@pytest.mark.parametrize(
    ("old", "new", "path"),
    [
        ("  name: reviews\n", "  name: reviews\n  nmae: x\n", "metadata.nmae"),
        ("  hosts: [reviews]\n", "  hosts: [reviews]\n  hostz: [x]\n", "spec.hostz"),
        ("    protocol: HTTP\n", "    protocol: HTTP\n    portocol: x\n", "spec.ports[0].portocol"),
        (
            "    ports: {http: 9080}\n",
            "    ports: {http: 9080}\n    lables: {a: b}\n",
            "spec.endpoints[0].lables",
        ),
    ],
)
def test_unknown_field_at_any_depth(old: str, new: str, path: str) -> None:
    text = with_boot(SE.replace(old, new))
    issue = only_issue(("m.yaml", text))
    key = path.rsplit(".", 1)[1]
    assert located(issue) == ("m.yaml", line_of(text, f"{key}:"), "ServiceEntry reviews", path)
    assert issue.message.startswith(f"unknown field {key!r} (known fields: ")


def test_unknown_field_deep_in_a_virtual_service() -> None:
    vs = doc(
        """
        apiVersion: networking.istio.io/v1
        kind: VirtualService
        metadata: {name: reviews}
        spec:
          hosts: [reviews]
          http:
          - route:
            - destination:
                host: reviews
                subsett: v1
        """
    )
    text = with_boot(SE, vs)
    issue = only_issue(("m.yaml", text))
    assert located(issue) == (
        "m.yaml",
        line_of(text, "subsett:"),
        "VirtualService reviews",
        "spec.http[0].route[0].destination.subsett",
    )
    assert issue.message == "unknown field 'subsett' (known fields: host, port, subset)"


@pytest.mark.parametrize(
    ("old", "new", "path", "message"),
    [
        (
            "number: 9080",
            'number: "9080"',
            "spec.ports[0].number",
            "expected an integer, got '9080'",
        ),
        ("number: 9080", "number: 90.5", "spec.ports[0].number", "expected an integer, got 90.5"),
        ("number: 9080", "number: true", "spec.ports[0].number", "expected an integer, got True"),
        ("name: http", "name: 80", "spec.ports[0].name", "expected a string, got 80 (quote it)"),
        ("name: http", "name: yes", "spec.ports[0].name", "expected a string, got True (quote it)"),
        ("hosts: [reviews]", "hosts: reviews", "spec.hosts", "expected a list"),
        ("hosts: [reviews]", "hosts: {a: b}", "spec.hosts", "expected a list"),
        ("ports: {http: 9080}", "ports: [http]", "spec.endpoints[0].ports", "expected a map"),
        (
            "ports: {http: 9080}",
            "ports: {http: '9080'}",
            "spec.endpoints[0].ports.http",
            "expected an integer, got '9080'",
        ),
        (
            "  - address: 127.0.0.1",
            "  - address: [127.0.0.1]",
            "spec.endpoints[0].address",
            "expected a string, got a list",
        ),
        (
            "  - number: 9080",
            "  - [9080]\n  - number: 9080",
            "spec.ports[0]",
            "expected a map, got a list",
        ),
    ],
)
def test_wrong_types(old: str, new: str, path: str, message: str) -> None:
    se = SE.replace(old, new, 1)
    text = with_boot(se)
    issue = only_issue(("m.yaml", text))
    assert located(issue) == (
        "m.yaml",
        line_of(text, new.split("\n")[0]),
        "ServiceEntry reviews",
        path,
    )
    assert issue.message == message


def test_wrong_type_bool_field() -> None:
    vs = doc(
        """
        apiVersion: networking.istio.io/v1
        kind: VirtualService
        metadata: {name: reviews}
        spec:
          hosts: [reviews]
          http:
          - match:
            - ignoreUriCase: "true"
            route:
            - destination: {host: reviews}
        """
    )
    text = with_boot(SE, vs)
    issue = only_issue(("m.yaml", text))
    assert located(issue) == (
        "m.yaml",
        line_of(text, "ignoreUriCase"),
        "VirtualService reviews",
        "spec.http[0].match[0].ignoreUriCase",
    )
    assert issue.message == "expected true or false, got 'true'"


def test_metadata_must_be_a_map() -> None:
    text = with_boot(SE.replace("metadata:\n  name: reviews\n", "metadata: [reviews]\n"))
    issue = only_issue(("m.yaml", text))
    assert located(issue) == (
        "m.yaml",
        line_of(text, "metadata: [reviews]"),
        "ServiceEntry",
        "metadata",
    )
    assert issue.message == "expected a map, got a list"


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("5", "invalid duration 5 (write it like 1.5s)"),
        ("1.5", "invalid duration 1.5 (write it like 1.5s)"),
        ("5 seconds", "invalid duration '5 seconds' (expected a form like 250ms, 1.5s, 1m, 1h)"),
        ("-1s", "invalid duration '-1s' (expected a form like 250ms, 1.5s, 1m, 1h)"),
        ("1d", "invalid duration '1d' (expected a form like 250ms, 1.5s, 1m, 1h)"),
        ("s", "invalid duration 's' (expected a form like 250ms, 1.5s, 1m, 1h)"),
        ('""', "invalid duration '' (expected a form like 250ms, 1.5s, 1m, 1h)"),
    ],
)
def test_bad_duration(value: str, message: str) -> None:
    text = BOOT + f"  drainDuration: {value}\n"
    issue = only_issue(("boot.yaml", text))
    assert located(issue) == (
        "boot.yaml",
        line_of(text, "drainDuration"),
        "MeshProxy app-v1",
        "spec.drainDuration",
    )
    assert issue.message == message


def test_duration_given_as_a_map() -> None:
    text = BOOT + "  timeouts:\n    idle: {seconds: 5}\n"
    issue = only_issue(("boot.yaml", text))
    assert located(issue) == (
        "boot.yaml",
        line_of(text, "idle:"),
        "MeshProxy app-v1",
        "spec.timeouts.idle",
    )
    assert issue.message == "expected a duration, got a map"


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("127.0.0.1", "invalid address '127.0.0.1' (expected host:port)"),
        ("host:99999", "invalid port in address 'host:99999'"),
        ("host:-1", "invalid port in address 'host:-1'"),
        ("'host:'", "invalid port in address 'host:'"),
        (":15000", "invalid address ':15000' (expected host:port)"),
        ("'[::1]15000'", "invalid address '[::1]15000' (expected [ipv6]:port)"),
        ("::1:15000", "invalid address '::1:15000' (expected host:port)"),
        ("15000", "invalid address 15000 (expected host:port)"),
    ],
)
def test_bad_address(value: str, message: str) -> None:
    text = BOOT.replace("admin: 127.0.0.1:0", f"admin: {value}")
    issue = only_issue(("boot.yaml", text))
    assert located(issue) == (
        "boot.yaml",
        line_of(text, "admin:"),
        "MeshProxy app-v1",
        "spec.admin",
    )
    assert issue.message == message


def test_bad_nested_address() -> None:
    text = BOOT.replace("outbound: {address: 127.0.0.1:0}", "outbound: {address: localhost}")
    issue = only_issue(("boot.yaml", text))
    assert located(issue) == (
        "boot.yaml",
        line_of(text, "outbound:"),
        "MeshProxy app-v1",
        "spec.outbound.address",
    )
    assert issue.message == "invalid address 'localhost' (expected host:port)"


@pytest.mark.parametrize(
    ("old", "new", "path", "message"),
    [
        (
            "resolution: STATIC",
            "resolution: STATIK",
            "spec.resolution",
            "invalid value 'STATIK' (expected one of: NONE, STATIC, DNS, DNS_ROUND_ROBIN)",
        ),
        (
            "resolution: STATIC",
            "resolution: static",
            "spec.resolution",
            "invalid value 'static' (expected one of: NONE, STATIC, DNS, DNS_ROUND_ROBIN)",
        ),
        (
            "resolution: STATIC",
            "resolution: [STATIC]",
            "spec.resolution",
            "invalid value None (expected one of: NONE, STATIC, DNS, DNS_ROUND_ROBIN)",
        ),
        (
            "resolution: STATIC",
            "resolution: STATIC\n  location: OUTSIDE",
            "spec.location",
            "invalid value 'OUTSIDE' (expected one of: MESH_EXTERNAL, MESH_INTERNAL)",
        ),
    ],
)
def test_invalid_enum_value(old: str, new: str, path: str, message: str) -> None:
    text = with_boot(SE.replace(old, new))
    issue = only_issue(("m.yaml", text))
    needle = new.split("\n")[-1].strip()
    assert located(issue) == ("m.yaml", line_of(text, needle), "ServiceEntry reviews", path)
    assert issue.message == message


def test_invalid_enum_in_bootstrap() -> None:
    text = BOOT + "  outboundTrafficPolicy: ALLOW_ALL\n"
    issue = only_issue(("boot.yaml", text))
    assert located(issue) == (
        "boot.yaml",
        line_of(text, "outboundTrafficPolicy"),
        "MeshProxy app-v1",
        "spec.outboundTrafficPolicy",
    )
    assert issue.message == "invalid value 'ALLOW_ALL' (expected one of: ALLOW_ANY, REGISTRY_ONLY)"


def test_missing_service_entry_hosts() -> None:
    text = with_boot(SE.replace("  hosts: [reviews]\n", ""))
    issue = only_issue(("m.yaml", text))
    # Reported on the spec map (a missing key has no line of its own).
    line = line_of(text, "  ports:\n  - number")
    assert located(issue) == ("m.yaml", line, "ServiceEntry reviews", "spec.hosts")
    assert issue.message == "required field is missing"


def test_missing_metadata_name() -> None:
    text = with_boot(SE.replace("  name: reviews\n", "  namespace: default\n"))
    issue = only_issue(("m.yaml", text))
    line = line_of(text, "  namespace: default\nspec")
    assert located(issue) == ("m.yaml", line, "ServiceEntry", "metadata.name")
    assert issue.message == "required field is missing"


def test_missing_metadata() -> None:
    text = with_boot(SE.replace("metadata:\n  name: reviews\n", ""))
    issue = only_issue(("m.yaml", text))
    assert located(issue) == (
        "m.yaml",
        line_of(text, "kind: ServiceEntry") - 1,
        "ServiceEntry",
        "metadata",
    )
    assert issue.message == "required field is missing"


def test_missing_destination_host() -> None:
    vs = doc(
        """
        apiVersion: networking.istio.io/v1
        kind: VirtualService
        metadata: {name: reviews}
        spec:
          hosts: [reviews]
          http:
          - route:
            - destination:
                subset: v1
        """
    )
    text = with_boot(SE, vs)
    issue = only_issue(("m.yaml", text))
    assert located(issue) == (
        "m.yaml",
        line_of(text, "subset: v1"),
        "VirtualService reviews",
        "spec.http[0].route[0].destination.host",
    )
    assert issue.message == "required field is missing"


def test_missing_spec_reports_its_required_fields() -> None:
    se = doc(
        """
        apiVersion: networking.istio.io/v1
        kind: ServiceEntry
        metadata: {name: reviews}
        """
    )
    text = with_boot(se)
    issue = only_issue(("m.yaml", text))
    assert located(issue) == (
        "m.yaml",
        line_of(text, "kind: ServiceEntry") - 1,
        "ServiceEntry reviews",
        "spec.hosts",
    )
    assert issue.message == "required field is missing"


def test_duplicate_field_in_an_object() -> None:
    text = with_boot(
        SE.replace("  resolution: STATIC\n", "  resolution: STATIC\n  resolution: DNS\n")
    )
    issue = only_issue(("m.yaml", text))
    assert located(issue) == (
        "m.yaml",
        line_of(text, "resolution: DNS"),
        "ServiceEntry reviews",
        "spec.resolution",
    )
    assert issue.message == "duplicate field"


def test_duplicate_key_in_a_map() -> None:
    text = with_boot(SE.replace("ports: {http: 9080}", "ports: {http: 9080, http: 9081}"))
    issue = only_issue(("m.yaml", text))
    assert located(issue) == (
        "m.yaml",
        line_of(text, "http: 9081"),
        "ServiceEntry reviews",
        "spec.endpoints[0].ports.http",
    )
    assert issue.message == "duplicate key"


def test_duplicate_top_level_key() -> None:
    text = with_boot(SE + "kind: ServiceEntry\n")
    issue = only_issue(("m.yaml", text))
    assert (issue.file, issue.line, issue.path) == ("m.yaml", text.count("\n"), "kind")
    assert issue.message == "duplicate field"


def test_yaml_syntax_error_reports_its_line() -> None:
    se = SE.replace("  resolution: STATIC\n", "  resolution: STATIC: DNS\n")
    text = with_boot(se)
    issue = only_issue(("m.yaml", text))
    assert (issue.file, issue.line, issue.where, issue.path) == (
        "m.yaml",
        line_of(text, "resolution: STATIC: DNS"),
        "",
        "",
    )
    assert issue.message.startswith("YAML: ")
    assert "mapping values are not allowed here" in issue.message


def test_yaml_syntax_error_in_a_flow_collection() -> None:
    text = BOOT + "  drainDuration: [5s\n"
    issue = only_issue(("boot.yaml", text))
    assert issue.file == "boot.yaml"
    assert issue.line == text.count("\n") + 1  # the end of input, where the "]" was expected
    assert issue.message.startswith("YAML: ")


def test_unknown_kind() -> None:
    text = with_boot(SE.replace("kind: ServiceEntry", "kind: ServiceEntree"))
    issue = only_issue(("m.yaml", text))
    assert located(issue) == (
        "m.yaml",
        line_of(text, "kind: ServiceEntree"),
        "ServiceEntree reviews",
        "kind",
    )
    assert issue.message == (
        "unknown kind 'ServiceEntree' (known: MeshProxy, ServiceEntry, VirtualService, "
        "DestinationRule, Telemetry, PeerAuthentication, AuthorizationPolicy)"
    )


def test_kind_not_supported_yet() -> None:
    ra = doc(
        """
        apiVersion: security.istio.io/v1
        kind: RequestAuthentication
        metadata: {name: jwt}
        spec: {}
        """
    )
    text = with_boot(ra)
    issue = only_issue(("m.yaml", text))
    assert located(issue) == (
        "m.yaml",
        line_of(text, "kind: RequestAuthentication"),
        "RequestAuthentication jwt",
        "kind",
    )
    assert issue.message == "kind 'RequestAuthentication' is not supported by this meshproxy yet"


def test_missing_kind() -> None:
    text = with_boot(SE.replace("kind: ServiceEntry\n", ""))
    issue = only_issue(("m.yaml", text))
    assert (issue.file, issue.line, issue.path) == (
        "m.yaml",
        line_of(text, "apiVersion: networking"),
        "kind",
    )
    assert issue.message == "required field is missing"


@pytest.mark.parametrize(
    "api", ["networking.istio.io/v2", "networking.istio.io/v1alpha1", "meshproxy.io/v1alpha1"]
)
def test_wrong_api_version(api: str) -> None:
    text = with_boot(SE.replace("apiVersion: networking.istio.io/v1", f"apiVersion: {api}"))
    issue = only_issue(("m.yaml", text))
    assert located(issue) == (
        "m.yaml",
        line_of(text, f"apiVersion: {api}\nkind: ServiceEntry"),
        "ServiceEntry reviews",
        "apiVersion",
    )
    assert issue.message == (
        f"{api!r} does not serve ServiceEntry (use one of: networking.istio.io/v1, "
        "networking.istio.io/v1beta1, networking.istio.io/v1alpha3)"
    )


def test_bootstrap_under_an_istio_api_version() -> None:
    text = BOOT.replace("meshproxy.io/v1alpha1", "networking.istio.io/v1")
    issue = only_issue(("boot.yaml", text))
    assert located(issue) == ("boot.yaml", 1, "MeshProxy app-v1", "apiVersion")
    assert issue.message == (
        "'networking.istio.io/v1' does not serve MeshProxy (use one of: meshproxy.io/v1alpha1)"
    )


def test_missing_api_version() -> None:
    text = with_boot(SE.replace("apiVersion: networking.istio.io/v1\n", ""))
    issue = only_issue(("m.yaml", text))
    assert located(issue) == (
        "m.yaml",
        line_of(text, "kind: ServiceEntry"),
        "ServiceEntry reviews",
        "apiVersion",
    )
    assert issue.message == "required field is missing"


@pytest.mark.parametrize("body", ["- a\n- b\n", "just a string\n", "42\n"])
def test_a_document_that_is_not_a_map(body: str) -> None:
    text = BOOT + "---\n" + body
    issue = only_issue(("m.yaml", text))
    assert located(issue) == ("m.yaml", BOOT.count("\n") + 2, "", "")
    assert issue.message == "a document must be a map with apiVersion, kind, metadata and spec"


def test_no_bootstrap_document() -> None:
    issue = only_issue(("services.yaml", SE))
    assert (issue.file, issue.path) == ("services.yaml", "")
    assert issue.message.startswith("no MeshProxy bootstrap document")


def test_no_bootstrap_document_in_an_empty_file_names_the_file() -> None:
    issue = only_issue(("empty.yaml", "# nothing here\n"))
    assert issue.file == "empty.yaml"
    assert issue.message.startswith("no MeshProxy bootstrap document")


@pytest.mark.timeout(3)  # locating the path "kind" must not loop
def test_two_bootstrap_documents() -> None:
    second = BOOT.replace("name: app-v1", "name: app-v2")
    found = issues_of(("a.yaml", BOOT), ("b.yaml", docs(SE, second)))
    start = SE.count("\n") + 2  # the second document's first line; its kind: is on the next
    (issue,) = found
    assert (issue.file, issue.where, issue.path) == ("b.yaml", "MeshProxy app-v2", "kind")
    assert issue.line in (start, start + 1)
    assert found[0].message == "only one MeshProxy bootstrap document is allowed"


# ---------------------------------------------------------------------------------------------
# Every error is reported, sorted by file and line


def test_every_error_across_files_is_reported_in_file_and_line_order() -> None:
    a = with_boot(
        SE.replace("resolution: STATIC", "resolution: STATIK").replace(
            "number: 9080", "number: eighty"
        )
    )
    b = docs(
        """
        apiVersion: networking.istio.io/v1
        kind: VirtualService
        metadata: {name: reviews}
        spec:
          hosts: [reviews]
          http:
          - timeout: 5
            route:
            - destination: {host: reviews}
        """,
        """
        apiVersion: networking.istio.io/v1
        kind: Gateway
        metadata: {name: gw}
        spec: {}
        """,
    )
    c = "kind: [\n"
    # Passed out of order: the report is sorted by file, then line.
    found = issues_of(("c.yaml", c), ("b.yaml", b), ("a.yaml", a))
    assert [(i.file, i.line, i.path) for i in found] == [
        ("a.yaml", line_of(a, "number: eighty"), "spec.ports[0].number"),
        ("a.yaml", line_of(a, "STATIK"), "spec.resolution"),
        ("b.yaml", line_of(b, "timeout: 5"), "spec.http[0].timeout"),
        ("b.yaml", line_of(b, "kind: Gateway"), "kind"),
        ("c.yaml", 2, ""),
    ]
    assert found[2].message == "invalid duration 5 (write it like 1.5s)"
    assert found[3].message == "kind 'Gateway' is not supported by this meshproxy yet"


def test_several_errors_in_one_document_are_all_reported() -> None:
    se = (
        SE.replace("hosts: [reviews]", "hosts: reviews")
        .replace("number: 9080", "number: x")
        .replace("address: 127.0.0.1", "address: 1")
    )
    text = with_boot(se)
    found = issues_of(("m.yaml", text))
    assert [(i.line, i.path) for i in found] == [
        (line_of(text, "hosts: reviews"), "spec.hosts"),
        (line_of(text, "number: x"), "spec.ports[0].number"),
        (line_of(text, "address: 1\n"), "spec.endpoints[0].address"),
    ]


def test_issue_str_names_file_line_subject_and_path() -> None:
    text = with_boot(SE.replace("resolution: STATIC", "resolution: STATIK"))
    issue = only_issue(("mesh.yaml", text))
    assert str(issue) == (
        f"mesh.yaml:{line_of(text, 'STATIK')}: ServiceEntry reviews: spec.resolution: "
        "invalid value 'STATIK' (expected one of: NONE, STATIC, DNS, DNS_ROUND_ROBIN)"
    )


def test_map_keys_that_are_not_identifiers_are_quoted_in_paths() -> None:
    vs = doc(
        """
        apiVersion: networking.istio.io/v1
        kind: VirtualService
        metadata: {name: reviews}
        spec:
          hosts: [reviews]
          http:
          - match:
            - headers:
                x-ok: {exact: a}
                end-user: {exakt: jason}
            route:
            - destination: {host: reviews}
        """
    )
    text = with_boot(SE, vs)
    issue = only_issue(("m.yaml", text))
    assert located(issue) == (
        "m.yaml",
        line_of(text, "exakt"),
        "VirtualService reviews",
        'spec.http[0].match[0].headers["end-user"].exakt',
    )

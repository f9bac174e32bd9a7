"""Metrics over real sockets: ``GET /stats/prometheus``, the scrape port, Grafana, a real Prometheus.

Traffic goes through a running meshproxy to real upstreams (one answering, one refusing
connections), then the exposition is read back from the admin server and from the separate
scrape port (Istio's :15090) and parsed with prometheus_client's own parser. The Grafana dashboard
in ``examples/grafana`` may only query metric names a live proxy exports. Last, Debian's
``prometheus`` binary scrapes the proxy every second and answers PromQL for the request rate and
the p99 latency. Semantics: reference §3.1 (Istio's metrics and labels), §2.8 (buckets).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import shutil
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
from helpers import (
    RawClient,
    Reply,
    SeenRequest,
    bootstrap,
    join,
    proxy,
    service_entry,
    upstream,
)
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

DASHBOARD = Path(__file__).parents[2] / "examples" / "grafana" / "meshproxy-dashboard.json"
SVC = "svc.default.svc.cluster.local"
DEAD = "dead.default.svc.cluster.local"

# --------------------------------------------------------------------------------------------
# Config and helpers


def config(svc_port: int, dead_port: int, *, inbound_app: int | None = None) -> str:
    """``svc`` answers; ``dead`` refuses connections and has no retries (plain 503 UF)."""
    boot = bootstrap(extra="telemetry: {prometheus: 127.0.0.1:0}", inbound_app=inbound_app)
    boot = boot.replace(
        "metadata: {name: app-v1, namespace: default}",
        "metadata: {name: app-v1, namespace: default, labels: {app: app, version: v1}}",
    )
    no_retries = (
        "apiVersion: networking.istio.io/v1\n"
        "kind: VirtualService\n"
        "metadata: {name: dead, namespace: default}\n"
        "spec:\n"
        "  hosts: [dead]\n"
        "  http:\n"
        "  - route: [{destination: {host: dead}}]\n"
        "    retries: {attempts: 0}\n"
    )
    return join(
        boot, service_entry("svc", [svc_port]), service_entry("dead", [dead_port]), no_retries
    )


@contextlib.contextmanager
def refusing_port() -> Iterator[int]:
    """A port bound but not listening: connections to it are refused, and it stays ours."""
    sock = socket.socket()
    try:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]
    finally:
        sock.close()


async def send(port: int, host: str, count: int) -> list[int]:
    client = await RawClient.connect(port)
    try:
        return [
            (await client.request("GET", f"/{i}", [("host", host)])).status for i in range(count)
        ]
    finally:
        await client.close()


async def scrape(port: int, path: str = "/stats/prometheus") -> tuple[int, str, str]:
    client = await RawClient.connect(port)
    try:
        response = await client.request("GET", path, [("host", "127.0.0.1")])
    finally:
        await client.close()
    return response.status, response.header("content-type") or "", response.body.decode()


def samples(text: str) -> list[Sample]:
    return [s for family in text_string_to_metric_families(text) for s in family.samples]


def requests_by(text: str, **match: str) -> dict[tuple[str, str, str], float]:
    """istio_requests_total by (reporter, destination_service, response_code + flags)."""
    out: dict[tuple[str, str, str], float] = {}
    for s in samples(text):
        if s.name != "istio_requests_total":
            continue
        if any(s.labels.get(k) != v for k, v in match.items()):
            continue
        key = (
            s.labels["reporter"],
            s.labels["destination_service"],
            f"{s.labels['response_code']} {s.labels['response_flags']}",
        )
        out[key] = out.get(key, 0.0) + s.value
    return out


def one(text: str, name: str, **match: str) -> Sample:
    found = [
        s
        for s in samples(text)
        if s.name == name and all(s.labels.get(k) == v for k, v in match.items())
    ]
    assert len(found) == 1, (name, match, found)
    return found[0]


# --------------------------------------------------------------------------------------------
# /stats/prometheus on the admin server and on the scrape port


async def test_requests_total_on_admin_and_scrape_port() -> None:
    with refusing_port() as dead_port:
        async with upstream() as up, upstream() as app:
            async with proxy(config(up.port, dead_port, inbound_app=app.port)) as px:
                assert await send(px.port, "svc:9080", 3) == [200] * 3
                assert await send(px.port, "dead:9080", 2) == [503] * 2
                assert await send(px.inbound_port, "svc:9080", 1) == [200]
                assert px.app.prometheus is not None
                admin = await scrape(px.admin_port)
                port = await scrape(px.app.prometheus.port)
                wrong_path = await scrape(px.app.prometheus.port, "/ready")

    for status, content_type, text in (admin, port):
        assert status == 200
        assert content_type.startswith("text/plain; version=")
        assert requests_by(text) == {
            ("source", SVC, "200 -"): 3.0,
            ("source", DEAD, "503 UF"): 2.0,
            ("destination", SVC, "200 -"): 1.0,
        }
        ok = one(text, "istio_requests_total", reporter="source", response_code="200").labels
        assert ok["source_workload"] == "app-v1"
        assert ok["source_workload_namespace"] == "default"
        assert ok["source_app"] == "app" and ok["source_version"] == "v1"
        assert ok["source_principal"] == "spiffe://cluster.local/ns/default/sa/app"
        assert ok["destination_service_name"] == "svc"
        assert ok["destination_service_namespace"] == "default"
        assert ok["destination_version"] == "v1"  # the endpoint's label
        assert ok["destination_principal"] == "unknown"  # no peer identity before mTLS
        assert ok["connection_security_policy"] == "unknown"
        assert ok["request_protocol"] == "http"
        inbound = one(text, "istio_requests_total", reporter="destination").labels
        assert inbound["destination_workload"] == "app-v1"
        assert inbound["destination_principal"] == "spiffe://cluster.local/ns/default/sa/app"
        assert inbound["source_workload"] == "unknown"
        assert inbound["connection_security_policy"] == "none"
        count = one(
            text,
            "istio_request_duration_milliseconds_count",
            reporter="source",
            response_code="503",
        )
        assert count.value == 2
        # Proxy internals: the refused connects, the requests that reached the upstream.
        dead = {"cluster_name": f"outbound|9080||{DEAD}"}
        assert one(text, "meshproxy_cluster_upstream_cx_connect_fail_total", **dead).value == 2
        svc = {"cluster_name": f"outbound|9080||{SVC}"}
        assert one(text, "meshproxy_cluster_upstream_rq_total", **svc).value == 3
        listeners = {
            s.labels["listener_name"]
            for s in samples(text)
            if s.name == "meshproxy_listener_downstream_cx_active"
        }
        assert listeners == {"outbound", "inbound"}
    assert wrong_path[0] == 404  # the scrape port serves /stats/prometheus only


async def test_no_scrape_port_unless_configured() -> None:
    async with proxy(bootstrap()) as px:
        assert px.app.prometheus is None
        status, _, text = await scrape(px.admin_port)
    assert status == 200
    assert "# TYPE istio_requests_total counter" in text


# --------------------------------------------------------------------------------------------
# The Grafana dashboard queries only what meshproxy exports

_NOT_METRICS = {
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "bool",
    "and",
    "or",
    "unless",
    "offset",
    "inf",
    "nan",
}


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (strings, matchers, ranges and grouping
    labels removed; an identifier followed by ``(`` is a function)."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    expr = re.sub(r"\{[^}]*\}", " ", expr)
    expr = re.sub(r"\[[^\]]*\]", " ", expr)
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", expr)
    names = set()
    for match in re.finditer(r"(?<![\w.$])[A-Za-z_:][A-Za-z0-9_:]*", expr):
        word = match.group()
        if expr[match.end() :].lstrip().startswith("(") or word.lower() in _NOT_METRICS:
            continue
        names.add(word)
    return names


def dashboard_queries() -> list[str]:
    """Every PromQL expression in the dashboard: panel targets and template variable queries."""
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [
        target["expr"]
        for panel in dashboard["panels"]
        for target in panel.get("targets", [])
        if target.get("expr")
    ]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] != "query":
            continue
        query = variable["query"]
        text = query["query"] if isinstance(query, dict) else query
        found = re.fullmatch(r"label_values\((\w+),\s*(\w+)\)", text)
        assert found is not None, text  # Grafana's label_values(metric, label)
        exprs.append(found.group(1))
    return exprs


def grafana_to_promql(expr: str, interval: str = "1m") -> str:
    """The dashboard's variables as Grafana would expand them with the defaults selected."""
    return (
        expr.replace("$__rate_interval", interval)
        .replace("$reporter", "source")
        .replace("$destination_service", ".*")
    )


def test_metric_names_parser() -> None:
    assert metric_names(
        'histogram_quantile(0.99, sum by (le) (rate(a_bucket{x="b_c",y=~"$v"}[5m])))'
    ) == {"a_bucket"}
    assert metric_names("sum(rate(a_total[1m])) by (cluster_name) / b + on(x) c") == {
        "a_total",
        "b",
        "c",
    }


async def test_dashboard_queries_only_exported_metrics() -> None:
    with refusing_port() as dead_port:
        async with upstream() as up, proxy(config(up.port, dead_port)) as px:
            await send(px.port, "svc:9080", 2)
            await send(px.port, "dead:9080", 1)
            _, _, text = await scrape(px.admin_port)
    exported = {s.name for s in samples(text)}
    exprs = dashboard_queries()
    assert len(exprs) >= 10
    used: set[str] = set()
    for expr in exprs:
        names = metric_names(expr)
        assert names, expr
        assert names <= exported, (expr, names - exported)
        used |= names
    # What the dashboard is for (issue #6 §4): rate, errors, latency, retries, overflows, ejections.
    assert {
        "istio_requests_total",
        "istio_request_duration_milliseconds_bucket",
        "meshproxy_cluster_upstream_rq_retry_total",
        "meshproxy_cluster_upstream_overflow_total",
        "meshproxy_cluster_outlier_detection_ejections_total",
    } <= used
    joined = "\n".join(exprs)
    for quantile in ("0.50", "0.90", "0.99"):
        assert f"histogram_quantile({quantile}," in joined
    assert 'response_code=~"5.."' in joined


# --------------------------------------------------------------------------------------------
# A real Prometheus server scrapes the proxy

PROMETHEUS = shutil.which("prometheus")
DELAY = 0.035  # upstream latency: every request lands in Envoy's (25, 50] ms bucket
TRAFFIC_SECONDS = 5.0
WINDOW = "3s"


@contextlib.asynccontextmanager
async def prometheus_server(tmp_path: Path, target_port: int) -> AsyncIterator[str]:
    """Run the prometheus binary scraping ``target_port`` every second; yield its base URL."""
    assert PROMETHEUS is not None
    (tmp_path / "prometheus.yml").write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        "scrape_configs:\n"
        "- job_name: meshproxy\n"
        "  metrics_path: /stats/prometheus\n"
        f"  static_configs: [{{targets: ['127.0.0.1:{target_port}']}}]\n"
    )
    log_path = tmp_path / "prometheus.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [
                PROMETHEUS,
                f"--config.file={tmp_path / 'prometheus.yml'}",
                f"--storage.tsdb.path={tmp_path / 'data'}",
                # Port 0: the kernel picks a free port; the log line "Listening on" names it.
                "--web.listen-address=127.0.0.1:0",
                "--log.level=info",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        address = None
        async with asyncio.timeout(20):
            while address is None:
                assert proc.poll() is None, log_path.read_text()
                found = re.search(r'msg="Listening on" address=(\S+)', log_path.read_text())
                if found is None:
                    await asyncio.sleep(0.05)  # polling the log of another process, bounded
                    continue
                address = found.group(1)
        url = f"http://{address}"
        async with httpx.AsyncClient(base_url=url, timeout=5) as client, asyncio.timeout(20):
            while (await client.get("/-/ready")).status_code != 200:
                await asyncio.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


async def query(client: httpx.AsyncClient, promql: str, at: float | None = None) -> list[dict]:
    params = {"query": promql}
    if at is not None:
        params["time"] = f"{at:.3f}"
    response = await client.get("/api/v1/query", params=params)
    body = response.json()
    assert body["status"] == "success", (promql, body)
    result: list[dict] = body["data"]["result"]
    return result


def scalar(result: list[dict]) -> float:
    assert len(result) == 1, result
    return float(result[0]["value"][1])


@pytest.mark.skipif(
    PROMETHEUS is None,
    reason="the prometheus binary is missing (Debian: apt-get install prometheus; .ci/run does)",
)
async def test_real_prometheus_scrapes_rate_and_p99(tmp_path: Path) -> None:
    async def slow(req: SeenRequest) -> Reply:
        await asyncio.sleep(DELAY)
        return Reply(body=b"ok")

    with refusing_port() as dead_port:
        async with upstream(slow) as up, proxy(config(up.port, dead_port)) as px:
            assert px.app.prometheus is not None
            async with (
                prometheus_server(tmp_path, px.app.prometheus.port) as url,
                httpx.AsyncClient(base_url=url, timeout=5) as prom,
            ):
                # The target is up before traffic starts, so every request is in the series.
                async with asyncio.timeout(10):
                    while not await query(prom, 'up{job="meshproxy"} == 1'):
                        await asyncio.sleep(0.1)
                started = time.time()
                deadline = asyncio.get_running_loop().time() + TRAFFIC_SECONDS

                async def client() -> int:
                    conn = await RawClient.connect(px.port)
                    done = 0
                    try:
                        while asyncio.get_running_loop().time() < deadline:
                            reply = await conn.request("GET", "/", [("host", "svc:9080")])
                            assert reply.status == 200
                            done += 1
                    finally:
                        await conn.close()
                    return done

                total = sum(await asyncio.gather(*(client() for _ in range(4))))
                ended = time.time()
                # Wait (bounded) for a scrape that has seen every request.
                async with asyncio.timeout(10):
                    while True:
                        seen = await query(prom, "sum(istio_requests_total)")
                        if seen and float(seen[0]["value"][1]) == total:
                            break
                        await asyncio.sleep(0.2)

                at = ended - 0.5  # inside the traffic, with a full window of scrapes before it
                rate = scalar(await query(prom, f"sum(rate(istio_requests_total[{WINDOW}]))", at))
                p99 = scalar(
                    await query(
                        prom,
                        "histogram_quantile(0.99, sum(rate("
                        f"istio_request_duration_milliseconds_bucket[{WINDOW}])) by (le))",
                        at,
                    )
                )
                # Every dashboard query is valid PromQL on a real server and finds data (but
                # the 5xx share: this traffic has no errors).
                empty = [
                    expr
                    for expr in dashboard_queries()
                    if not await query(prom, grafana_to_promql(expr, WINDOW), at)
                ]
            _, _, text = await scrape(px.admin_port)

    expected_rate = total / (ended - started)
    assert total > 50
    assert rate == pytest.approx(expected_rate, rel=0.15), (rate, expected_rate, total)
    # Envoy buckets: a 35 ms upstream puts every request in (25, 50]. When none fell outside it
    # (the proxy's own histogram says so), linear interpolation gives exactly 25 + 25 * 0.99.
    assert 25.0 < p99 <= 50.0
    bucket = "istio_request_duration_milliseconds_bucket"
    below = one(text, bucket, le="25.0", response_code="200").value
    within = one(text, bucket, le="50.0", response_code="200").value
    if below == 0 and within == total:
        assert p99 == pytest.approx(49.75)
    assert all('response_code=~"5.."' in expr for expr in empty), empty


async def test_a_telemetry_resource_can_turn_istio_metrics_off() -> None:
    import httpx
    from helpers import bootstrap, join, proxy, service_entry, upstream

    off = (
        "apiVersion: telemetry.istio.io/v1\nkind: Telemetry\n"
        "metadata: {name: no-metrics, namespace: default}\n"
        "spec:\n  metrics:\n  - providers: [{name: prometheus}]\n"
        "    overrides: [{disabled: true}]\n"
    )
    async with upstream() as up:
        config = join(bootstrap(), service_entry("svc", [up.port]), off)
        async with proxy(config) as px, httpx.AsyncClient() as client:
            assert (await client.get(px.url, headers={"host": "svc"})).status_code == 200
            text = (await client.get(f"http://127.0.0.1:{px.admin_port}/stats/prometheus")).text
    assert "istio_requests_total{" not in text  # no series recorded
    assert "meshproxy_cluster_upstream_rq_total" in text  # the proxy's own internals stay

"""The forwarding path over real sockets: routing, pooling, headers, real clients, the admin server."""

from __future__ import annotations

import asyncio
import json
import re
import shutil

import httpx
import pytest
from helpers import (
    RawClient,
    Reply,
    SeenRequest,
    Upstream,
    bootstrap,
    join,
    proxy,
    service_entry,
    upstream,
)


async def test_host_header_forms_all_reach_the_service() -> None:
    async with upstream() as up:
        config = join(bootstrap(), service_entry("reviews", [up.port]))
        async with proxy(config) as px, httpx.AsyncClient() as client:
            for host in (
                "reviews",
                "reviews:9080",
                "reviews.default",
                "reviews.default.svc",
                "reviews.default.svc.cluster.local",
                "reviews.default.svc.cluster.local:9080",
                "REVIEWS.default:9080",
            ):
                r = await client.get(f"{px.url}/x", headers={"host": host})
                assert r.status_code == 200, host
            assert len(up.requests) == 7
            # Hosts keep their original form on the way upstream.
            assert up.requests[-1].header("host") == "REVIEWS.default:9080"


async def test_other_namespace_service_needs_its_namespace() -> None:
    async with upstream() as up:
        config = join(bootstrap(), service_entry("ratings", [up.port], namespace="shop"))
        async with proxy(config) as px, httpx.AsyncClient() as client:
            ok = await client.get(f"{px.url}/", headers={"host": "ratings.shop:9080"})
            short = await client.get(f"{px.url}/", headers={"host": "ratings:9080"})
    assert ok.status_code == 200
    assert short.status_code == 502  # REGISTRY_ONLY: the short name is not in this namespace


async def test_absolute_form_uri_when_used_as_http_proxy() -> None:
    async with upstream() as up:
        config = join(bootstrap(), service_entry("reviews", [up.port]))
        async with proxy(config) as px, httpx.AsyncClient(proxy=px.url) as client:
            r = await client.get("http://reviews:9080/reviews/7?x=1")
    assert r.status_code == 200
    seen = up.requests[0]
    assert seen.target == "/reviews/7?x=1"
    assert seen.header("host") == "reviews:9080"


async def test_allow_any_passes_unknown_hosts_through() -> None:
    async with upstream() as up:
        async with proxy(bootstrap(policy="ALLOW_ANY")) as px, httpx.AsyncClient() as client:
            r = await client.get(f"{px.url}/direct", headers={"host": f"127.0.0.1:{up.port}"})
            assert r.status_code == 200
            assert r.text == "GET /direct"
            clusters = (await client.get(f"http://127.0.0.1:{px.admin_port}/clusters")).json()
    names = [c["name"] for c in clusters["clusters"]]
    assert "PassthroughCluster" in names


async def test_registry_only_answers_unknown_hosts_with_502() -> None:
    async with upstream() as up:
        async with proxy(bootstrap(policy="REGISTRY_ONLY")) as px, httpx.AsyncClient() as client:
            r = await client.get(f"{px.url}/", headers={"host": f"127.0.0.1:{up.port}"})
    assert r.status_code == 502
    assert up.requests == []


async def test_upstream_connection_is_reused_across_requests_and_clients() -> None:
    async with upstream() as up:
        config = join(bootstrap(), service_entry("reviews", [up.port]))
        async with proxy(config) as px:
            for _ in range(5):  # five clients, each with its own connection...
                client = await RawClient.connect(px.port)
                for _ in range(4):  # ...each sending four keep-alive requests
                    resp = await client.request("GET", "/", [("host", "reviews")])
                    assert resp.status == 200
                await client.close()
    assert len(up.requests) == 20
    assert up.connections == 1


async def test_a_pooled_connection_closed_by_the_upstream_is_not_used() -> None:
    async with upstream() as up:
        config = join(bootstrap(), service_entry("reviews", [up.port]))
        async with proxy(config) as px:
            client = await RawClient.connect(px.port)
            assert (await client.request("GET", "/1", [("host", "reviews")])).status == 200
            closed_before = up.closed
            up.drop_idle_connections()  # an app with a short keep-alive timeout
            await up.wait_closed(closed_before + 1)
            assert (await client.request("GET", "/2", [("host", "reviews")])).status == 200
            await client.close()
    assert up.connections == 2


async def test_request_reset_on_a_reused_connection_is_replayed_on_a_fresh_one() -> None:
    """The keep-alive race: the upstream drops a reused connection as the next request arrives."""
    per_connection: dict[int, int] = {}
    server: Upstream

    def handler(req: SeenRequest) -> Reply:
        count = per_connection.get(req.connection_id, 0) + 1
        per_connection[req.connection_id] = count
        if count == 2:
            for proto in server.open:
                if proto.id == req.connection_id and proto.transport is not None:
                    proto.transport.abort()  # reset, no response byte
        return Reply(body=f"conn {req.connection_id}".encode())

    async with upstream(handler) as server:
        config = join(bootstrap(), service_entry("reviews", [server.port]))
        async with proxy(config) as px:
            client = await RawClient.connect(px.port)
            first = await client.request("GET", "/a", [("host", "reviews")])
            second = await client.request("GET", "/b", [("host", "reviews")])
            await client.close()
    assert (first.status, first.body) == (200, b"conn 1")
    assert (second.status, second.body) == (200, b"conn 2")
    assert [r.target for r in server.requests] == ["/a", "/b", "/b"]


async def test_request_with_body_is_not_replayed_after_a_reset() -> None:
    server: Upstream

    def handler(req: SeenRequest) -> Reply:
        if req.method == "POST":
            for proto in server.open:
                if proto.id == req.connection_id and proto.transport is not None:
                    proto.transport.abort()
        return Reply()

    async with upstream(handler) as server:
        config = join(bootstrap(), service_entry("reviews", [server.port]))
        async with proxy(config) as px:
            client = await RawClient.connect(px.port)
            assert (await client.request("GET", "/", [("host", "reviews")])).status == 200
            resp = await client.request("POST", "/", [("host", "reviews")], body=b"payload")
            await client.close()
    assert resp.status == 503
    assert [r.method for r in server.requests] == ["GET", "POST"]


async def test_headers_are_handled_as_an_istio_sidecar_does() -> None:
    async with upstream() as up:
        config = join(bootstrap(), service_entry("reviews", [up.port]))
        async with proxy(config) as px:
            client = await RawClient.connect(px.port)
            resp = await client.request(
                "GET",
                "/",
                [
                    ("host", "reviews"),
                    ("connection", "x-hop"),
                    ("x-hop", "1"),
                    ("keep-alive", "timeout=5"),
                    ("proxy-connection", "keep-alive"),
                    ("te", "trailers, deflate"),
                    ("x-forwarded-for", "10.1.2.3"),
                    ("x-envoy-foo", "kept"),
                    ("X-Custom", "Value"),
                ],
            )
            second = await client.request(
                "GET",
                "/",
                [("host", "reviews"), ("x-request-id", "my-id"), ("x-forwarded-proto", "https")],
            )
            await client.close()
    seen = up.requests[0]
    for gone in ("connection", "x-hop", "keep-alive", "proxy-connection"):
        assert seen.header(gone) is None, gone
    assert seen.header("te") == "trailers"
    assert seen.header("x-forwarded-for") == "10.1.2.3"  # untouched, not appended to
    assert seen.header("x-forwarded-proto") == "http"
    assert seen.header("x-envoy-foo") == "kept"
    assert seen.header("x-custom") == "Value"
    rid = seen.header("x-request-id")
    assert rid is not None
    assert re.fullmatch(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}", rid)
    assert up.requests[1].header("x-request-id") == "my-id"
    assert up.requests[1].header("x-forwarded-proto") == "https"
    assert resp.status == 200
    service_time = resp.header("x-envoy-upstream-service-time")
    assert service_time is not None and service_time.isdigit()
    assert second.status == 200


async def test_response_hop_by_hop_headers_are_removed() -> None:
    def handler(req: SeenRequest) -> Reply:
        return Reply(headers=[("connection", "x-secret"), ("x-secret", "1"), ("x-app", "2")])

    async with upstream(handler) as up:
        config = join(bootstrap(), service_entry("reviews", [up.port]))
        async with proxy(config) as px:
            client = await RawClient.connect(px.port)
            resp = await client.request("GET", "/", [("host", "reviews")])
            await client.close()
    assert resp.header("x-secret") is None
    assert resp.header("x-app") == "2"


async def test_client_connection_close_is_honoured() -> None:
    async with upstream() as up:
        config = join(bootstrap(), service_entry("reviews", [up.port]))
        async with proxy(config) as px:
            reader, writer = await asyncio.open_connection("127.0.0.1", px.port)
            writer.write(b"GET / HTTP/1.1\r\nHost: reviews\r\nConnection: close\r\n\r\n")
            raw = await asyncio.wait_for(reader.read(), 5)  # EOF: the proxy closed
            writer.close()
    assert raw.startswith(b"HTTP/1.1 200")
    assert b"connection: close" in raw.lower()
    assert up.requests[0].header("connection") is None  # not carried upstream


async def test_pipelined_requests_are_answered_in_order() -> None:
    async with upstream() as up:
        config = join(bootstrap(), service_entry("reviews", [up.port]))
        async with proxy(config) as px:
            reader, writer = await asyncio.open_connection("127.0.0.1", px.port)
            writer.write(
                b"GET /1 HTTP/1.1\r\nHost: reviews\r\n\r\n"
                b"GET /2 HTTP/1.1\r\nHost: reviews\r\n\r\n"
                b"GET /3 HTTP/1.1\r\nHost: reviews\r\nConnection: close\r\n\r\n"
            )
            raw = await asyncio.wait_for(reader.read(), 5)
            writer.close()
    assert raw.count(b"HTTP/1.1 200") == 3
    assert raw.index(b"GET /1") < raw.index(b"GET /2") < raw.index(b"GET /3")


async def test_least_request_spreads_load_over_endpoints() -> None:
    async with upstream() as a, upstream() as b:
        config = join(bootstrap(), service_entry("reviews", [a.port, b.port]))
        async with proxy(config) as px, httpx.AsyncClient() as client:

            async def call() -> int:
                r = await client.get(f"{px.url}/", headers={"host": "reviews"})
                return r.status_code

            statuses = await asyncio.gather(*(call() for _ in range(40)))
    assert set(statuses) == {200}
    assert a.requests and b.requests
    assert len(a.requests) + len(b.requests) == 40


async def test_inbound_listener_forwards_to_the_local_app() -> None:
    async with upstream() as app:
        async with proxy(bootstrap(inbound_app=app.port)) as px, httpx.AsyncClient() as client:
            r = await client.get(
                f"http://127.0.0.1:{px.inbound_port}/hello", headers={"host": "productpage:9080"}
            )
    assert r.status_code == 200
    assert r.text == "GET /hello"
    assert app.requests[0].header("host") == "productpage:9080"
    assert app.requests[0].header("x-request-id")


async def _curl(*args: str) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        "curl",
        "-sS",
        "--max-time",
        "10",
        "--noproxy",
        "",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 20)
    assert proc.returncode == 0, err
    return proc.returncode, out.decode()


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is installed by .ci/run")
async def test_curl_through_the_outbound_listener() -> None:
    async with upstream() as up:
        config = join(bootstrap(), service_entry("reviews", [up.port]))
        async with proxy(config) as px:
            _, by_host = await _curl("-H", "Host: reviews:9080", f"{px.url}/by-host")
            _, by_proxy = await _curl("-x", px.url, "http://reviews:9080/by-proxy")
            _, upload = await _curl(
                "-H", "Host: reviews", "--data-binary", "hello", f"{px.url}/upload"
            )
    assert by_host == "GET /by-host"
    assert by_proxy == "GET /by-proxy"
    assert upload == "POST /upload"
    assert up.requests[2].body == b"hello"
    assert up.connections == 1  # three curl processes, one pooled upstream connection


async def test_admin_endpoints() -> None:
    async with upstream() as up:
        config = join(bootstrap(), service_entry("reviews", [up.port]))
        async with proxy(config) as px, httpx.AsyncClient() as client:
            admin = f"http://127.0.0.1:{px.admin_port}"
            await client.get(f"{px.url}/", headers={"host": "reviews"})
            ready = await client.get(f"{admin}/ready")
            dump = (await client.get(f"{admin}/config_dump")).json()
            clusters = (await client.get(f"{admin}/clusters")).json()
            listeners = (await client.get(f"{admin}/listeners")).json()
            missing = await client.get(f"{admin}/nope")
            wrong_method = await client.get(f"{admin}/quitquitquit")
    assert (ready.status_code, ready.text) == (200, "LIVE\n")
    assert dump["bootstrap"]["spec"]["serviceAccount"] == "app"
    assert dump["serviceEntries"][0]["spec"]["hosts"] == ["reviews"]
    entry = clusters["clusters"][0]
    assert entry["name"] == "outbound|9080||reviews.default.svc.cluster.local"
    endpoint = entry["endpoints"][0]
    assert endpoint["address"] == f"127.0.0.1:{up.port}"
    assert endpoint["total_requests"] == 1
    assert endpoint["active_connections"] == 1
    assert endpoint["idle_connections"] == 1
    assert endpoint["active_requests"] == 0
    assert listeners["outbound"]["address"] == f"127.0.0.1:{px.port}"
    assert missing.status_code == 404 and "GET /ready" in missing.text
    assert wrong_method.status_code == 405


async def test_config_dump_never_shows_a_private_key() -> None:
    rule = (
        "apiVersion: networking.istio.io/v1\nkind: DestinationRule\n"
        "metadata: {name: reviews}\nspec:\n  host: reviews\n  trafficPolicy:\n"
        "    tls: {mode: MUTUAL, clientCertificate: /c.pem, privateKey: /secret-key.pem}\n"
    )
    async with upstream() as up:
        config = join(bootstrap(), service_entry("reviews", [up.port]), rule)
        async with proxy(config) as px, httpx.AsyncClient() as client:
            text = (await client.get(f"http://127.0.0.1:{px.admin_port}/config_dump")).text
    assert "secret-key" not in text
    tls = json.loads(text)["destinationRules"][0]["spec"]["trafficPolicy"]["tls"]
    assert tls["privateKey"] == "[redacted]"
    assert tls["clientCertificate"] == "/c.pem"


async def test_max_requests_per_connection_closes_upstream_connections() -> None:
    rule = (
        "apiVersion: networking.istio.io/v1\nkind: DestinationRule\n"
        "metadata: {name: reviews}\nspec:\n  host: reviews\n"
        "  trafficPolicy: {connectionPool: {http: {maxRequestsPerConnection: 2}}}\n"
    )
    async with upstream() as up:
        config = join(bootstrap(), service_entry("reviews", [up.port]), rule)
        async with proxy(config) as px:
            client = await RawClient.connect(px.port)
            for _ in range(6):
                assert (await client.request("GET", "/", [("host", "reviews")])).status == 200
            await client.close()
    assert up.connections == 3


async def test_idle_upstream_connections_are_closed_after_the_pool_idle_timeout() -> None:
    rule = (
        "apiVersion: networking.istio.io/v1\nkind: DestinationRule\n"
        "metadata: {name: reviews}\nspec:\n  host: reviews\n"
        "  trafficPolicy: {connectionPool: {http: {idleTimeout: 200ms}}}\n"
    )
    async with upstream() as up:
        config = join(bootstrap(), service_entry("reviews", [up.port]), rule)
        async with proxy(config) as px:
            client = await RawClient.connect(px.port)
            assert (await client.request("GET", "/", [("host", "reviews")])).status == 200
            loop = asyncio.get_running_loop()
            started = loop.time()
            await up.wait_closed(1)  # the proxy closed its idle pooled connection
            assert 0.15 <= loop.time() - started < 3
            # ...and a later request opens a new one.
            assert (await client.request("GET", "/", [("host", "reviews")])).status == 200
            await client.close()
    assert up.connections == 2


async def test_upstream_answering_before_the_body_ends_closes_the_client_connection() -> None:
    async def early(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 413 Payload Too Large\r\ncontent-length: 4\r\n\r\nbig!")
        await writer.drain()
        await reader.read()  # until the proxy closes its side
        writer.close()

    server = await asyncio.start_server(early, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        async with proxy(join(bootstrap(), service_entry("reviews", [port]))) as px:
            reader, writer = await asyncio.open_connection("127.0.0.1", px.port)
            writer.write(b"POST / HTTP/1.1\r\nHost: reviews\r\nContent-Length: 100000\r\n\r\n")
            writer.write(b"x" * 1000)  # ...and the rest never comes
            raw = await asyncio.wait_for(reader.read(), 5)  # EOF: the proxy closed
            writer.close()
    finally:
        server.close()
    assert raw.startswith(b"HTTP/1.1 413")
    assert raw.endswith(b"big!")
    assert b"connection: close" in raw.lower()


async def test_tcp_keepalive_settings_reach_the_upstream_socket() -> None:
    import socket

    rule = (
        "apiVersion: networking.istio.io/v1\nkind: DestinationRule\n"
        "metadata: {name: reviews}\nspec:\n  host: reviews\n  trafficPolicy:\n"
        "    connectionPool: {tcp: {tcpKeepalive: {probes: 4, time: 7s, interval: 3s}}}\n"
    )
    async with upstream() as up:
        config = join(bootstrap(), service_entry("reviews", [up.port]), rule)
        async with proxy(config) as px:
            client = await RawClient.connect(px.port)
            assert (await client.request("GET", "/", [("host", "reviews")])).status == 200
            await client.close()
            assert px.app.pools is not None
            (pool,) = [p for _, p in px.app.pools.all_pools() if p.connections]
            (conn,) = pool.connections
            assert conn.transport is not None
            sock = conn.transport.get_extra_info("socket")
            assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT) == 4
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == 7
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL) == 3


async def test_connections_are_not_reused_past_max_connection_duration() -> None:
    rule = (
        "apiVersion: networking.istio.io/v1\nkind: DestinationRule\n"
        "metadata: {name: reviews}\nspec:\n  host: reviews\n"
        "  trafficPolicy: {connectionPool: {tcp: {maxConnectionDuration: 200ms}}}\n"
    )
    async with upstream() as up:
        config = join(bootstrap(), service_entry("reviews", [up.port]), rule)
        async with proxy(config) as px:
            client = await RawClient.connect(px.port)
            assert (await client.request("GET", "/", [("host", "reviews")])).status == 200
            assert (await client.request("GET", "/", [("host", "reviews")])).status == 200
            assert up.connections == 1  # young enough to be reused
            await up.wait_closed(1)  # the sweep closes it once it is older than 200 ms
            assert (await client.request("GET", "/", [("host", "reviews")])).status == 200
            await client.close()
    assert up.connections == 2

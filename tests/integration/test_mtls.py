"""Mutual TLS over real sockets: two sidecars, STRICT and PERMISSIVE, identities, refusals.

Every handshake here is a real one (Python's ssl on both ends, uvloop underneath), with
certificates from our own dev CA (meshproxy.io.ca) or from trustme for the foreign CA.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import ssl
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from tests.helpers import RunningProxy, bootstrap, join, proxy, upstream
from tests.pki import (
    Pki,
    authorization_policy,
    foreign_client,
    peer_authentication,
    tls_block,
)


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return Pki(tmp_path)


def _boot(service_account: str, **kwargs: object) -> str:
    return bootstrap(**kwargs).replace(  # type: ignore[arg-type]
        "serviceAccount: app", f"serviceAccount: {service_account}"
    )


def reviews_entry(port: int, *, labels: str = "{security.istio.io/tlsMode: istio}") -> str:
    return (
        "apiVersion: networking.istio.io/v1\n"
        "kind: ServiceEntry\n"
        "metadata: {name: reviews, namespace: default}\n"
        "spec:\n"
        "  hosts: [reviews]\n"
        "  location: MESH_INTERNAL\n"
        "  resolution: STATIC\n"
        "  ports: [{number: 9080, name: http, protocol: HTTP}]\n"
        "  endpoints:\n"
        f"  - address: 127.0.0.1\n    ports: {{http: {port}}}\n"
        f"    labels: {labels}\n"
        "    serviceAccount: reviews\n"
    )


@contextlib.asynccontextmanager
async def server_sidecar(
    pki: Pki, app_port: int, *docs: str, timeout: str = "5s", account: str = "reviews"
) -> AsyncIterator[RunningProxy]:
    files = pki.issue(account)
    text = join(
        _boot(account, inbound_app=app_port, extra=tls_block(files, handshake_timeout=timeout)),
        *docs,
    )
    async with proxy(text) as running:
        yield running


@contextlib.asynccontextmanager
async def client_sidecar(
    pki: Pki, *docs: str, account: str = "sleep"
) -> AsyncIterator[RunningProxy]:
    files = pki.issue(account)
    async with proxy(join(_boot(account, extra=tls_block(files)), *docs)) as running:
        yield running


async def test_two_sidecars_mutual_tls_with_identity_policy(pki: Pki) -> None:
    """app -> outbound sidecar -> mTLS -> inbound sidecar (STRICT, ALLOW sleep) -> app."""
    allow_sleep = authorization_policy(
        "allow-sleep",
        "ALLOW",
        "rules:\n- from:\n  - source: {principals: [cluster.local/ns/default/sa/sleep]}\n",
    )
    async with (
        upstream() as app,
        server_sidecar(pki, app.port, peer_authentication("STRICT"), allow_sleep) as server,
        client_sidecar(pki, reviews_entry(server.inbound_port)) as client,
        httpx.AsyncClient() as http,
    ):
        resp = await http.get(
            f"{client.url}/reviews/1",
            headers={"host": "reviews:9080", "x-forwarded-client-cert": "By=forged"},
        )
        assert resp.status_code == 200, resp.text
        seen = app.requests[-1]
        xfcc = seen.header("x-forwarded-client-cert")
        assert xfcc is not None
        assert xfcc.startswith(f"By={pki.uri('reviews')};Hash=")
        assert xfcc.endswith(f';Subject="";URI={pki.uri("sleep")}')
        assert seen.all("x-forwarded-client-cert") == [xfcc]  # the forged one is gone
        # The client sidecar set x-forwarded-proto; an internal hop keeps it (Envoy, non-edge).
        assert seen.header("x-forwarded-proto") == "http"
        # A second request reuses the pooled TLS connection: one handshake, not one per request.
        resp = await http.get(f"{client.url}/reviews/2", headers={"host": "reviews:9080"})
        assert resp.status_code == 200
        assert app.connections == 1
        pools = client.app.pools
        assert pools is not None
        assert sum(p.total_connections for _, p in pools.all_pools()) == 1


async def test_identity_not_allowed_is_denied_403(pki: Pki) -> None:
    allow_other = authorization_policy(
        "allow-other",
        "ALLOW",
        "rules:\n- from:\n  - source: {principals: [cluster.local/ns/default/sa/other]}\n",
    )
    async with (
        upstream() as app,
        server_sidecar(pki, app.port, peer_authentication("STRICT"), allow_other) as server,
        client_sidecar(pki, reviews_entry(server.inbound_port)) as client,
        httpx.AsyncClient() as http,
    ):
        resp = await http.get(f"{client.url}/", headers={"host": "reviews:9080"})
        assert resp.status_code == 403
        assert resp.text == "RBAC: access denied"
        assert app.requests == []


async def test_deny_policy_wins_over_allow(pki: Pki) -> None:
    policies = (
        authorization_policy(
            "deny-admin", "DENY", "rules:\n- to:\n  - operation: {paths: [/admin*]}\n"
        ),
        authorization_policy(
            "allow-all-mesh", "ALLOW", "rules:\n- from:\n  - source: {namespaces: [default]}\n"
        ),
    )
    async with (
        upstream() as app,
        server_sidecar(pki, app.port, peer_authentication("STRICT"), *policies) as server,
        client_sidecar(pki, reviews_entry(server.inbound_port)) as client,
        httpx.AsyncClient() as http,
    ):
        denied = await http.get(f"{client.url}/admin/users", headers={"host": "reviews:9080"})
        allowed = await http.get(f"{client.url}/reviews", headers={"host": "reviews:9080"})
    assert (denied.status_code, denied.text) == (403, "RBAC: access denied")
    assert allowed.status_code == 200
    assert [r.target for r in app.requests] == ["/reviews"]


async def _tls_get(port: int, ctx: ssl.SSLContext, path: str = "/") -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=ctx)
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nhost: reviews\r\nconnection: close\r\n\r\n".encode())
        return await asyncio.wait_for(reader.read(), 5)
    finally:
        writer.close()


async def _refused_handshake(port: int, ctx: ssl.SSLContext) -> None:
    """Connect with ``ctx``; the server must refuse: during the handshake, or (TLS 1.3, where
    the client finishes first) by closing before any HTTP answer."""
    try:
        data = await _tls_get(port, ctx)
    except (ssl.SSLError, ConnectionError, OSError):
        return
    assert data == b"", f"the server answered: {data[:80]!r}"


async def test_strict_refuses_plaintext_and_counts_it(pki: Pki) -> None:
    async with (
        upstream() as app,
        server_sidecar(pki, app.port, peer_authentication("STRICT")) as server,
    ):
        reader, writer = await asyncio.open_connection("127.0.0.1", server.inbound_port)
        writer.write(b"GET / HTTP/1.1\r\nhost: reviews\r\n\r\n")
        # Closed (or reset: the request was never read), never an HTTP answer.
        with contextlib.suppress(ConnectionResetError):
            assert await asyncio.wait_for(reader.read(), 5) == b""
        writer.close()
        listener = server.app.listeners["inbound"]
        assert listener.tls_failures == {"plaintext": 1}
        assert listener.active == 0
        assert app.requests == []
        assert server.app.metrics is not None
        text = server.app.metrics.exposition().decode()
        assert (
            'meshproxy_listener_tls_refused_total{listener_name="inbound",reason="plaintext"} 1.0'
            in text
        )


async def test_permissive_serves_tls_and_plaintext_on_one_port(pki: Pki) -> None:
    client_files = pki.issue("sleep")
    async with (
        upstream() as app,
        server_sidecar(pki, app.port, peer_authentication("PERMISSIVE")) as server,
    ):
        port = server.inbound_port
        async with httpx.AsyncClient() as http:
            plain = await http.get(f"http://127.0.0.1:{port}/plain")
        assert plain.status_code == 200
        assert app.requests[-1].header("x-forwarded-client-cert") is None
        raw = await _tls_get(port, pki.client_context(client_files), "/tls")
        assert raw.startswith(b"HTTP/1.1 200 ")
        assert app.requests[-1].header("x-forwarded-client-cert") is not None
        assert [r.target for r in app.requests] == ["/plain", "/tls"]


async def test_no_peer_authentication_means_permissive(pki: Pki) -> None:
    async with upstream() as app, server_sidecar(pki, app.port) as server:
        assert server.app.listeners["inbound"].tls is not None
        async with httpx.AsyncClient() as http:
            assert (await http.get(f"http://127.0.0.1:{server.inbound_port}/")).status_code == 200


async def test_disable_serves_plaintext_only(pki: Pki) -> None:
    async with (
        upstream() as app,
        server_sidecar(pki, app.port, peer_authentication("DISABLE")) as server,
    ):
        assert server.app.listeners["inbound"].tls is None
        client_files = pki.issue("sleep")
        with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
            await _tls_get(server.inbound_port, pki.client_context(client_files))


@pytest.mark.parametrize("case", ["foreign_ca", "expired", "not_yet_valid", "no_client_cert"])
async def test_bad_client_certificates_are_refused(pki: Pki, tmp_path: Path, case: str) -> None:
    now = dt.datetime.now(dt.UTC)
    if case == "foreign_ca":
        ctx = foreign_client(tmp_path, pki)
    elif case == "expired":
        ctx = pki.client_context(pki.issue("sleep", ttl=60, now=now - dt.timedelta(hours=2)))
    elif case == "not_yet_valid":
        ctx = pki.client_context(pki.issue("sleep", now=now + dt.timedelta(hours=2)))
    else:
        ctx = pki.client_context()
    async with (
        upstream() as app,
        server_sidecar(pki, app.port, peer_authentication("STRICT")) as server,
    ):
        await _refused_handshake(server.inbound_port, ctx)
        listener = server.app.listeners["inbound"]
        for _ in range(100):  # the refusal is counted when the server's handshake task ends
            if listener.tls_failures:
                break
            await asyncio.sleep(0.01)
        assert sum(listener.tls_failures.values()) == 1, listener.tls_failures
        assert set(listener.tls_failures) <= {"bad_certificate", "handshake_failed"}
        assert listener.active == 0
        assert app.requests == []


async def test_certificate_without_spiffe_id_is_refused(pki: Pki) -> None:
    cert, key = pki.without_spiffe()
    ctx = pki.client_context()
    ctx.load_cert_chain(str(cert), str(key))
    async with (
        upstream() as app,
        server_sidecar(pki, app.port, peer_authentication("STRICT")) as server,
    ):
        await _refused_handshake(server.inbound_port, ctx)
        listener = server.app.listeners["inbound"]
        assert listener.tls_failures == {"no_spiffe_id": 1}
        assert listener.active == 0
        assert app.requests == []


@pytest.mark.parametrize(
    "payload",
    [
        pytest.param(b"", id="silent"),
        pytest.param(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", id="truncated-hello"),
        pytest.param(b"\x16\xff\xff garbage that is not TLS\r\n\r\n", id="garbage-record"),
    ],
)
async def test_stalled_or_garbage_handshakes_end(pki: Pki, payload: bytes) -> None:
    async with (
        upstream() as app,
        server_sidecar(pki, app.port, peer_authentication("STRICT"), timeout="300ms") as server,
    ):
        reader, writer = await asyncio.open_connection("127.0.0.1", server.inbound_port)
        writer.write(payload)
        # The server ends it: at the handshake timeout for a stall, at once for garbage.
        data = await asyncio.wait_for(reader.read(), 5)
        writer.close()
        assert not data.startswith(b"HTTP/")
        listener = server.app.listeners["inbound"]
        for _ in range(100):
            if listener.tls_failures:
                break
            await asyncio.sleep(0.01)
        reasons = set(listener.tls_failures)
        if payload.startswith(b"\x16\xff"):
            assert reasons == {"handshake_failed"}
        else:
            assert reasons == {"handshake_timeout"}
        assert listener.active == 0
        assert not listener.tasks  # no handshake task left behind
        # The listener still serves a proper client afterwards.
        ok = await _tls_get(server.inbound_port, pki.client_context(pki.issue("sleep")))
        assert ok.startswith(b"HTTP/1.1 200 ")


async def test_server_with_wrong_identity_fails_with_uf(pki: Pki) -> None:
    """The client expects reviews' SPIFFE ID; a server holding another's certificate is not it."""
    async with (
        upstream() as app,
        server_sidecar(pki, app.port, peer_authentication("STRICT"), account="impostor") as srv,
        client_sidecar(pki, reviews_entry(srv.inbound_port)) as client,
        httpx.AsyncClient() as http,
    ):
        resp = await http.get(f"{client.url}/", headers={"host": "reviews:9080"})
        assert resp.status_code == 503
        assert resp.text.endswith("remote connection failure")
        assert app.requests == []


async def test_certs_admin_lists_certificates_without_keys(pki: Pki) -> None:
    async with upstream() as app, server_sidecar(pki, app.port) as server:
        url = f"http://127.0.0.1:{server.admin_port}/certs"
        body = await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=5).read())
    data = json.loads(body)
    workload = data["certificates"][0]
    assert workload["kind"] == "workload"
    assert workload["spiffe_id"] == pki.uri("reviews")
    assert workload["serial"]
    assert data["certificates"][1]["kind"] == "root"
    assert b"PRIVATE KEY" not in body

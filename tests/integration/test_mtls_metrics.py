"""mTLS in the metrics, over real sockets: what the Prometheus exposition says about identities
and certificates.

* Istio's standard metrics on the destination side know the caller once mTLS proves it: the
  inbound (``reporter="destination"``) ``istio_requests_total`` series of a request that came over
  mTLS carries ``connection_security_policy="mutual_tls"`` and the caller's SPIFFE ID as
  ``source_principal``; a plaintext request on the same PERMISSIVE port carries ``none`` and
  ``unknown`` (Istio's stats filter: ``connection.mtls`` decides the policy label, the peer
  certificate's URI SAN the principal).
* ``meshproxy_certificate_expiration_timestamp_seconds`` has a sample for the workload
  certificate (and each root of the bundle) when ``spec.tls`` is set, with the certificate's
  notAfter, and follows a rotation.

The exposition is read from the admin server's ``GET /stats/prometheus`` and parsed with
prometheus_client's own parser.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from meshproxy.io.ca import IssuedFiles, cert_info
from meshproxy.io.tls import POLL_SECONDS
from tests.helpers import RawClient, RunningProxy, bootstrap, join, proxy, upstream
from tests.pki import (
    Pki,
    peer_authentication,
    sidecar_bootstrap,
    sidecar_entry,
    tls_block,
    workload_serial,
)

EXPIRY = "meshproxy_certificate_expiration_timestamp_seconds"


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return Pki(tmp_path)


async def get(port: int, path: str, host: str) -> tuple[int, bytes]:
    client = await RawClient.connect(port)
    try:
        resp = await client.request("GET", path, [("host", host)])
    finally:
        await client.close()
    return resp.status, resp.body


async def exposition(running: RunningProxy) -> list[Sample]:
    status, body = await get(running.admin_port, "/stats/prometheus", "admin")
    assert status == 200
    return [s for f in text_string_to_metric_families(body.decode()) for s in f.samples]


def requests_total(samples: list[Sample], **match: str) -> list[Sample]:
    return [
        s
        for s in samples
        if s.name == "istio_requests_total" and all(s.labels.get(k) == v for k, v in match.items())
    ]


@contextlib.asynccontextmanager
async def server_sidecar(
    pki: Pki, app_port: int, files: IssuedFiles, mode: str
) -> AsyncIterator[RunningProxy]:
    text = join(
        sidecar_bootstrap("reviews", tls_block(files), inbound_app=app_port),
        peer_authentication(mode),
    )
    async with proxy(text) as running:
        yield running


# --------------------------------------------------------------------------------------------
# istio_requests_total on the destination side


async def test_inbound_request_metrics_carry_the_mtls_policy_and_source_principal(
    pki: Pki,
) -> None:
    async with (
        upstream() as app,
        server_sidecar(pki, app.port, pki.issue("reviews"), "PERMISSIVE") as server,
    ):
        client_text = join(
            sidecar_bootstrap("sleep", tls_block(pki.issue("sleep"))),
            sidecar_entry("reviews", server.inbound_port, "reviews"),
        )
        async with proxy(client_text) as client:
            # app -> sleep's sidecar -> mTLS -> reviews' sidecar -> app
            assert (await get(client.port, "/mtls", "reviews:9080"))[0] == 200
        # And one plaintext request on the same PERMISSIVE port, from no sidecar at all.
        assert (await get(server.inbound_port, "/plain", "reviews:9080"))[0] == 200
        assert [r.target for r in app.requests] == ["/mtls", "/plain"]
        samples = await exposition(server)
    inbound = requests_total(samples, reporter="destination")
    assert inbound, "no inbound istio_requests_total series"
    by_policy = {s.labels["connection_security_policy"]: s for s in inbound}
    assert set(by_policy) == {"mutual_tls", "none"}, [s.labels for s in inbound]
    mtls = by_policy["mutual_tls"]
    assert mtls.value == 1
    assert mtls.labels["source_principal"] == pki.uri("sleep")
    assert mtls.labels["destination_principal"] == pki.uri("reviews")
    assert mtls.labels["response_code"] == "200"
    plain = by_policy["none"]
    assert plain.value == 1
    assert plain.labels["source_principal"] == "unknown"


# --------------------------------------------------------------------------------------------
# The certificate expiry gauge


def expiries(samples: list[Sample]) -> dict[str, float]:
    return {s.labels["certificate"]: s.value for s in samples if s.name == EXPIRY}


async def test_certificate_expiry_gauge_has_the_workload_and_root_certificates(
    pki: Pki, tmp_path: Path
) -> None:
    live = tmp_path / "reviews-live"
    first = pki.issue("reviews", out=live, ttl=3600)
    root = cert_info(pki.bundle.read_bytes())
    async with (
        upstream() as app,
        server_sidecar(pki, app.port, first, "STRICT") as server,
    ):
        gauge = expiries(await exposition(server))
        assert gauge == {
            "workload": first.info.not_after.timestamp(),
            f"root:{root.serial}": root.not_after.timestamp(),
        }
        # A rotation (a certificate with another lifetime) moves the workload sample.
        second = await asyncio.to_thread(pki.issue, "reviews", out=live, ttl=7200)
        async with asyncio.timeout(10 * POLL_SECONDS):
            while await workload_serial(server.admin_port) != second.info.serial:
                await asyncio.sleep(0.05)
        gauge = expiries(await exposition(server))
        assert gauge["workload"] == second.info.not_after.timestamp()
        assert gauge["workload"] > first.info.not_after.timestamp()


async def test_certificate_expiry_gauge_is_empty_without_spec_tls() -> None:
    async with proxy(bootstrap()) as running:
        samples = await exposition(running)
    assert expiries(samples) == {}

from __future__ import annotations

import httpx
from helpers import bootstrap, join, proxy, service_entry, upstream


async def test_request_goes_through_to_the_service_endpoint() -> None:
    async with upstream() as up:
        config = join(bootstrap(), service_entry("reviews", [up.port]))
        async with proxy(config) as px, httpx.AsyncClient() as client:
            r = await client.get(f"{px.url}/reviews/1", headers={"host": "reviews:9080"})
            assert r.status_code == 200
            assert r.text == "GET /reviews/1"
            assert up.requests[0].header("host") == "reviews:9080"

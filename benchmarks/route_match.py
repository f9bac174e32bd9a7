"""Micro-benchmark: what route matching costs per request as the route table grows.

Measures ``Router.route`` (the whole route step: VirtualService lookup, rule matching, weighted pick,
head rewrite) for a request, with route tables of different sizes, in one process:

- ``1 VS x 1 rule``: the baseline;
- ``1000 VS x 1 rule``: a mesh with 1,000 VirtualServices (one per host), request to one of them;
- ``100 VS x 10 rules``: the request matches the 10th rule of its VirtualService;
- ``1 VS x 1000 rules``: worst case, the request matches the last of 1,000 rules of one host.

Run: ``python benchmarks/route_match.py [--seconds 1.0]``. It prints microseconds per request
(median of 5 runs) and the added cost over the baseline.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

from meshproxy.config.load import load_texts
from meshproxy.core.http1 import RequestHead
from meshproxy.core.record import Direction, RequestRecord
from meshproxy.core.routetable import RouteTable
from meshproxy.core.routing import HostTable
from meshproxy.layers.route import Router

BOOT = """apiVersion: meshproxy.io/v1alpha1
kind: MeshProxy
metadata: {name: bench, namespace: default}
spec:
  outbound: {address: 127.0.0.1:0}
  admin: 127.0.0.1:0
"""


def service(i: int) -> str:
    return f"""apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: svc{i}}}
spec:
  hosts: [svc{i}]
  ports: [{{number: 80, name: http, protocol: HTTP}}]
  resolution: STATIC
  endpoints: [{{address: 127.0.0.1, ports: {{http: 8080}}, labels: {{version: v1}}}}]
"""


def virtual_service(i: int, rules: int) -> str:
    http = "".join(
        f"""  - name: r{j}
    match:
    - uri: {{prefix: /api/v{j}/}}
      headers: {{end-user: {{exact: user{j}}}}}
    route: [{{destination: {{host: svc{i}}}}}]
"""
        for j in range(rules)
    )
    return f"""apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: vs{i}}}
spec:
  hosts: [svc{i}]
  http:
{http}"""


def build(services: int, rules: int) -> Router:
    docs = [BOOT] + [service(i) for i in range(services)]
    docs += [virtual_service(i, rules) for i in range(services)]
    config = load_texts([("bench.yaml", "---\n".join(docs))])
    hosts = HostTable(config)
    return Router(hosts, RouteTable(config, hosts), random.Random(1))


def measure(router: Router, host: str, rule: int, seconds: float) -> float:
    head = RequestHead(
        method=b"GET",
        target=f"/api/v{rule}/items?x=1".encode(),
        headers=[
            (b"host", host.encode()),
            (b"user-agent", b"bench"),
            (b"end-user", f"user{rule}".encode()),
            (b"x-request-id", b"0f7c1d5e-1c44-4c5e-9a35-8e0f3b0a2a11"),
        ],
    )
    record = RequestRecord(Direction.OUTBOUND, 0.0, "127.0.0.1:1")
    decision = router.route(head, host, record)
    assert decision.route is not None and decision.route.index == rule, "wrong rule matched"
    route = router.route
    n = 0
    start = time.perf_counter()
    deadline = start + seconds
    while True:
        for _ in range(200):
            route(head, host, record)
        n += 200
        now = time.perf_counter()
        if now >= deadline:
            return (now - start) / n * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=1.0, help="per measurement")
    args = parser.parse_args()
    cases = [
        ("1 VS x 1 rule", 1, 1, 0, 0),
        ("1000 VS x 1 rule", 1000, 1, 500, 0),
        ("100 VS x 10 rules", 100, 10, 50, 9),
        ("1 VS x 1000 rules", 1, 1000, 0, 999),
    ]
    results: dict[str, float] = {}
    for label, services, rules, host, rule in cases:
        router = build(services, rules)
        runs = [measure(router, f"svc{host}:80", rule, args.seconds) for _ in range(5)]
        results[label] = statistics.median(runs)
    base = results["1 VS x 1 rule"]
    print("| route table | us per request (median of 5) | added over 1 rule |")
    print("|---|---:|---:|")
    for label, value in results.items():
        print(f"| {label} | {value:.2f} | {value - base:+.2f} |")


if __name__ == "__main__":
    main()

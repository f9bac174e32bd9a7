"""``meshproxy demo``: Istio's canary routing, shown on a local bookinfo-like mesh.

Owns the README's main command. It starts the mesh of ``mesh.py`` (productpage, reviews v1/v2/v3
and ratings, each app behind its own meshproxy sidecar, configured by the Istio YAML in
``bookinfo/``), sends requests to productpage through its sidecar as an anonymous user and as
``test-user``, and prints which reviews version answered each and whether ratings was called. The
VirtualService in ``bookinfo/mesh/reviews.yaml`` sends ``end-user: test-user`` to reviews v2 and
everyone else to v1; the exit status says whether the mesh routed exactly so (0) or not (1). It then
prints the commands to try more, and with ``serve`` keeps the mesh running, access logs on, until
Ctrl-C (SIGINT) or SIGTERM, and exits with the same status.

Rules: everything it starts is closed before it returns, on success, failure or Ctrl-C.
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import shlex
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import h11

from meshproxy.errors import ConfigError
from meshproxy.examples.mesh import BOOKINFO, MESH_DIR, Mesh, Ports
from meshproxy.examples.services import Json, http_get
from meshproxy.io.loop import loop_factory

TEST_USER = "test-user"
_ORDER = ("productpage", "reviews", "ratings")  # the order a request visits them


@dataclass(frozen=True, slots=True, kw_only=True)
class Outcome:
    """One request to productpage, and the path it took through the mesh."""

    user: str | None
    status: int
    productpage: str | None = None  # the version of each service that answered, if any
    reviews: str | None = None
    ratings: str | None = None
    stars: str | None = None
    request_id: str | None = None
    trace_kept: bool = False  # x-request-id and traceparent reached every hop unchanged
    error: str | None = None

    @property
    def expected(self) -> tuple[str, str | None]:
        """(reviews version, ratings version) as the canary VirtualService prescribes."""
        return ("v2", "v1") if self.user == TEST_USER else ("v1", None)

    @property
    def ok(self) -> bool:
        got = (self.reviews, self.ratings)
        return self.status == 200 and self.productpage == "v1" and got == self.expected

    def path(self) -> str:
        if self.error is not None:
            return self.error
        hops = [f"productpage {self.productpage}"]
        if self.reviews is not None:
            hops.append(f"reviews {self.reviews}")
        if self.ratings is not None:
            hops.append(f"ratings {self.ratings}")
        note = f"{self.stars} stars" if self.stars else "no stars; ratings not called"
        return " -> ".join(hops) + f"  ({note})"


def _str(value: object) -> str | None:
    return value if isinstance(value, str) else None


def _dict(value: object) -> Json:
    return value if isinstance(value, dict) else {}


def read_outcome(user: str | None, status: int, page: Json, sent: dict[str, str]) -> Outcome:
    """What productpage's JSON answer says about the path of the request."""
    reviews = _dict(page.get("reviews"))
    ratings = _dict(reviews.get("ratings"))
    hops = [page, reviews, ratings] if ratings else [page, reviews]
    seen = [_dict(hop.get("headers")) for hop in hops]
    request_id = _str(seen[0].get("x-request-id"))
    trace_kept = request_id is not None and all(
        h.get("x-request-id") == request_id and h.get("traceparent") == sent["traceparent"]
        for h in seen
    )
    error = None
    if status != 200 or page.get("service") != "productpage":
        error = f"productpage failed: {page.get('error', page)}"
    elif reviews.get("service") != "reviews":
        error = f"reviews failed ({page.get('reviews_status')}): {reviews.get('error', reviews)}"
    elif reviews.get("ratings_status") not in (None, 200):
        error = (
            f"reviews {reviews.get('version')} -> ratings failed ({reviews.get('ratings_status')}): "
            f"{ratings.get('error', ratings)}"
        )
    return Outcome(
        user=user,
        status=status,
        productpage=_str(page.get("version")),
        reviews=_str(reviews.get("version")) if reviews.get("service") == "reviews" else None,
        ratings=_str(ratings.get("version")) if ratings.get("service") == "ratings" else None,
        stars=_str(reviews.get("stars")),
        request_id=request_id,
        trace_kept=trace_kept,
        error=error,
    )


async def visit_productpage(mesh: Mesh, user: str | None) -> Outcome:
    """GET /productpage through productpage's sidecar, as a browser (or an ingress) would."""
    # A trace context as a tracing client would start it (W3C Trace Context, version 00, sampled).
    sent = {"traceparent": f"00-{secrets.token_hex(16)}-{secrets.token_hex(8)}-01"}
    if user is not None:
        sent["end-user"] = user
    inbound = mesh["productpage-v1"].inbound
    try:
        reply = await http_get(
            (inbound.host, inbound.port), "productpage:9080", "/productpage", list(sent.items())
        )
    except (OSError, TimeoutError, h11.ProtocolError) as exc:
        return Outcome(user=user, status=0, error=f"no answer: {exc or type(exc).__name__}")
    return read_outcome(user, reply.status, reply.body, sent)


def _shown(path: Path) -> str:
    """A path as a user would type it: relative when under the current directory."""
    try:
        shown = str(path.relative_to(Path.cwd()))
    except ValueError:
        shown = str(path)
    return shlex.quote(shown)


class _Printer:
    def __init__(self, out: TextIO) -> None:
        self.out = out

    def __call__(self, text: str = "") -> None:
        self.out.write(text + "\n")
        self.out.flush()


def _print_mesh(say: _Printer, mesh: Mesh) -> None:
    say(
        "meshproxy demo: a bookinfo-like mesh on loopback, each app behind its own meshproxy sidecar"
    )
    say()
    rows = [("workload", "app", "sidecar inbound", "sidecar outbound", "admin", "calls")]
    for running in sorted(mesh, key=lambda r: (_ORDER.index(r.workload.service), r.workload.name)):
        w = running.workload
        rows.append(
            (
                w.name,
                str(running.app_address.port),
                str(running.inbound.port),
                str(running.outbound.port),
                str(running.admin.port),
                ", ".join(w.calls) or "-",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        say(
            "  "
            + "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        )
    say("  (all on 127.0.0.1)")
    if mesh.fallback is not None:
        say("  A port named in the YAML is taken, so these are free ones instead:")
        say(f"    {mesh.fallback}")
    say()
    say(f"  config: {_shown(BOOKINFO)}/")
    say("    mesh/<service>.yaml       ServiceEntry, DestinationRule (subsets v1, v2, v3) and,")
    say("                              in mesh/reviews.yaml, the VirtualService below")
    say("    sidecars/<workload>.yaml  each sidecar's MeshProxy bootstrap")
    say("  routing: VirtualService reviews sends `end-user: test-user` to reviews v2,")
    say("           everyone else to reviews v1")


def _print_outcomes(say: _Printer, mesh: Mesh, outcomes: list[Outcome]) -> bool:
    inbound = mesh["productpage-v1"].inbound
    say()
    if not outcomes:
        say("No requests sent (--requests 0).")
        return True
    say(f"Requests to productpage, through its sidecar's inbound listener ({inbound}):")
    say()
    for o in outcomes:
        sent = f"GET /productpage  end-user: {o.user}" if o.user else "GET /productpage"
        status = o.status if o.status else "---"
        mark = (
            ""
            if o.ok
            else "   <-- expected reviews " + " -> ratings ".join(v for v in o.expected if v)
        )
        say(f"  {sent:<40} {status}  {o.path()}{mark}")
    anonymous = [o for o in outcomes if o.user is None]
    tested = [o for o in outcomes if o.user == TEST_USER]
    kept = [o for o in outcomes if o.trace_kept]
    say()
    if kept:
        say(
            "  Each request's x-request-id (added by productpage's sidecar) and traceparent reached"
        )
        say("  every service it touched unchanged: the apps forward them, as Istio asks apps to.")
    if len(kept) != len(outcomes):
        say(f"  {len(outcomes) - len(kept)} request(s) lost their x-request-id or traceparent.")
    ok = all(o.ok for o in outcomes) and len(kept) == len(outcomes)
    say()
    say(
        f"Routing {'as configured' if ok else 'NOT as configured'}: "
        f"anonymous -> reviews v1 ({sum(o.ok for o in anonymous)} of {len(anonymous)}), "
        f"test-user -> reviews v2 -> ratings v1 ({sum(o.ok for o in tested)} of {len(tested)})."
    )
    return ok


def _print_next(say: _Printer, mesh: Mesh, serve: bool) -> None:
    productpage = mesh["productpage-v1"]
    inbound, admin = productpage.inbound, productpage.admin
    if not serve:  # the mesh is gone by then; `--serve` uses the YAML's ports when they are free
        spec = productpage.documented.bootstrap.spec
        assert spec.inbound is not None
        inbound, admin = spec.inbound.address, spec.admin
    url = f"http://{inbound}/productpage"
    sidecar = _shown(productpage.workload.bootstrap)
    say()
    if serve:
        say("The mesh is serving. In another shell, try:")
    else:
        say("Try more: keep the mesh running with `meshproxy demo --serve`, then in another shell:")
    say(f"  curl {url}")
    say(f"  curl -H 'end-user: {TEST_USER}' {url}")
    say(f"  curl http://{admin}/clusters      # productpage's sidecar: its endpoints")
    say("Ask meshproxy why a request goes where it goes (nothing is sent):")
    say(
        f"  meshproxy route -c {sidecar} -c {_shown(MESH_DIR)} "
        f"-H 'end-user: {TEST_USER}' http://reviews:9080/reviews/0"
    )
    if serve and not mesh.fixed:
        say("  (meshproxy route reads the YAML, which names the fixed ports, not the ones above)")
    say(
        "Run each piece by hand with `meshproxy run -c ...`: see examples/README.md in the "
        "meshproxy repository."
    )


async def _serve_until_signal(say: _Printer, mesh: Mesh) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    signals = (signal.SIGINT, signal.SIGTERM)
    for sig in signals:
        loop.add_signal_handler(sig, stop.set)
    try:
        say()
        say("Access log of every sidecar follows (Ctrl-C stops the mesh):")
        mesh.access_log_enabled = True
        await stop.wait()
        mesh.access_log_enabled = False
        say("stopping")
        # Closed while the handlers are still in place: a second Ctrl-C does not cut it short.
        await mesh.close()
    finally:
        for sig in signals:
            loop.remove_signal_handler(sig)


async def demo(
    *, requests: int = 3, serve: bool = False, ports: Ports = Ports.FIXED, out: TextIO
) -> int:
    """Run the demo, printing to ``out``; 0 when the mesh routed as the canary rule says, else 1."""
    say = _Printer(out)
    mesh = Mesh(ports, access_log=out if serve else None)
    try:
        try:
            await mesh.start()
        except ConfigError as exc:  # the bundled YAML, edited into something invalid
            for issue in exc.issues:
                print(issue, file=sys.stderr)
            print(f"cannot start the demo mesh: {len(exc.issues)} error(s)", file=sys.stderr)
            return 1
        _print_mesh(say, mesh)
        outcomes: list[Outcome] = []
        for _ in range(requests):
            for user in (None, TEST_USER):
                outcomes.append(await visit_productpage(mesh, user))
        ok = _print_outcomes(say, mesh, outcomes)
        _print_next(say, mesh, serve)
        if serve:
            await _serve_until_signal(say, mesh)
    finally:
        await mesh.close()
    say()
    say("demo ok" if ok else "demo FAILED: the mesh did not route as configured")
    return 0 if ok else 1


def run_demo(requests: int = 3, serve: bool = False, ports: str = "fixed") -> int:
    """The ``meshproxy demo`` command. ``ports``: "fixed" (the YAML's) or "auto" (free ones)."""
    if requests < 0:
        print("--requests must be 0 or more", file=sys.stderr)
        return 2
    try:
        with asyncio.Runner(loop_factory=loop_factory) as runner:
            return runner.run(
                demo(requests=requests, serve=serve, ports=Ports(ports), out=sys.stdout)
            )
    except KeyboardInterrupt:  # Ctrl-C before serving: the mesh is already closed
        print("interrupted", file=sys.stderr)
        return 130


def main(argv: list[str] | None = None) -> int:
    """``python -m meshproxy.examples.demo``: the demo without the rest of the CLI."""
    parser = argparse.ArgumentParser(prog="python -m meshproxy.examples.demo", description=__doc__)
    parser.add_argument("--requests", type=int, default=3, help="requests to send as each user")
    parser.add_argument("--serve", action="store_true", help="keep the mesh running until Ctrl-C")
    parser.add_argument("--ports", choices=[p.value for p in Ports], default=Ports.FIXED.value)
    args = parser.parse_args(argv)
    return run_demo(requests=args.requests, serve=args.serve, ports=args.ports)


if __name__ == "__main__":
    raise SystemExit(main())

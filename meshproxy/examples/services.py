"""The bookinfo-like apps of the demo mesh: productpage, reviews v1/v2/v3 and ratings.

Owns the applications that sit behind the sidecars in ``meshproxy demo`` and ``examples/``: small
HTTP/1.1 servers (asyncio streams + h11) that answer JSON saying who they are. As in Istio's
bookinfo, productpage calls reviews; reviews v1 shows no stars, v2 black stars and v3 red stars, and
v2 and v3 call ratings. An app calls another service only through its own sidecar's outbound
listener, by name (``Host: reviews:9080``), and forwards the headers Istio asks applications to
propagate: the user (``end-user``, which the canary rule matches) and the request id and trace
context (``x-request-id``, ``traceparent``, ...), so that one request can be followed through the mesh.

Rules: demo code. The apps know nothing of meshproxy, only their sidecar's address. Every
connection task is tracked and cancelled on close; every outgoing call has a deadline.
Run one alone with ``python -m meshproxy.examples.services reviews v2 --port 19100 --sidecar
127.0.0.1:19102``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import signal
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass

import h11

# Headers an app must copy from its incoming request to its outgoing calls: Istio's sidecars cannot
# tie the two together themselves (Istio docs, "Distributed tracing": trace context propagation;
# bookinfo's productpage forwards the same set plus the user).
PROPAGATED: tuple[str, ...] = (
    "end-user",
    "x-request-id",
    "traceparent",
    "tracestate",
    "b3",
    "x-b3-traceid",
    "x-b3-spanid",
    "x-b3-parentspanid",
    "x-b3-sampled",
    "x-b3-flags",
)
SERVICE_PORT = 9080  # the port every bookinfo service is known by in the mesh
CALL_TIMEOUT = 5.0  # seconds; a deadline for each call an app makes through its sidecar
_MAX_BODY = 1 << 20
_STARS = {"v2": "black", "v3": "red"}
_REVIEWS = (
    ("Reviewer1", "An extremely entertaining play by Shakespeare. The slapstick humour is refreshing!"),
    ("Reviewer2", "Absolutely fun and entertaining. The play lacks thematic depth when compared "
     "to other plays by Shakespeare."),
)  # fmt: skip
_RATINGS = {"Reviewer1": 5, "Reviewer2": 4}
_ID = re.compile(r"^/(reviews|ratings)/([0-9]+)$")

Json = dict[str, object]
Address = tuple[str, int]


@dataclass(frozen=True, slots=True, kw_only=True)
class Request:
    method: str
    path: str
    headers: Mapping[str, str]  # names lower-cased; a repeated header keeps its last value


@dataclass(frozen=True, slots=True, kw_only=True)
class Reply:
    status: int
    body: Json


def propagated(headers: Mapping[str, str]) -> list[tuple[str, str]]:
    """The headers of ``PROPAGATED`` present in ``headers``, to copy onto an outgoing call."""
    return [(name, headers[name]) for name in PROPAGATED if name in headers]


async def http_get(
    address: Address,
    authority: str,
    path: str,
    headers: Sequence[tuple[str, str]] = (),
    *,
    timeout: float = CALL_TIMEOUT,
) -> Reply:
    """One GET on a fresh connection; a non-JSON body comes back as ``{"error": text}``.

    Raises ``OSError`` (refused, reset), ``TimeoutError`` or ``h11.ProtocolError``.
    """
    async with asyncio.timeout(timeout):
        reader, writer = await asyncio.open_connection(*address)
        try:
            conn = h11.Connection(h11.CLIENT)
            request = h11.Request(
                method="GET",
                target=path,
                headers=[("host", authority), *headers, ("connection", "close")],
            )
            writer.write(conn.send(request) + (conn.send(h11.EndOfMessage()) or b""))
            status = 0
            body = bytearray()
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    conn.receive_data(await reader.read(65536))
                elif isinstance(event, h11.Response):
                    status = event.status_code
                elif isinstance(event, h11.Data):
                    if len(body) + len(event.data) > _MAX_BODY:
                        raise h11.RemoteProtocolError("response body too large")
                    body += event.data
                elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
                    break
        finally:
            writer.close()
    return Reply(status=status, body=_decode(bytes(body)))


def _decode(body: bytes) -> Json:
    try:
        value = json.loads(body)
    except ValueError:
        return {"error": body.decode("utf-8", "replace").strip()}
    return value if isinstance(value, dict) else {"value": value}


Handler = Callable[[Request], Awaitable[Reply]]


class BookinfoApp:
    """One bookinfo app: a service name, a version, and (if it calls others) its sidecar."""

    def __init__(self, service: str, version: str, sidecar: Address | None = None) -> None:
        handlers: dict[str, Handler] = {
            "productpage": self._productpage,
            "reviews": self._reviews,
            "ratings": self._ratings,
        }
        if service not in handlers:
            raise ValueError(f"unknown service {service!r} (known: {', '.join(handlers)})")
        self.service = service
        self.version = version
        # The sidecar's outbound listener; set once the sidecar is up, before any request comes.
        self.sidecar = sidecar
        self.port = 0
        self._handler = handlers[service]
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[object]] = set()

    @property
    def name(self) -> str:
        return f"{self.service}-{self.version}"

    async def start(self, host: str, port: int) -> None:
        self._server = await asyncio.start_server(self._connection, host, port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None

    # -- the HTTP/1.1 server ---------------------------------------------------------------------
    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            await self._serve(reader, writer)
        except (OSError, h11.ProtocolError):
            pass  # the peer went away or spoke nonsense: nothing to answer
        except asyncio.CancelledError:
            # close() cancelled it, and the task ends here. Not re-raised: Python 3.11's streams
            # log a cancelled connection callback as an error (fixed in 3.12).
            pass
        finally:
            self._tasks.discard(task)
            writer.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = h11.Connection(h11.SERVER)
        request: h11.Request | None = None
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(await reader.read(65536))
            elif isinstance(event, h11.Request):
                request = event
            elif isinstance(event, h11.EndOfMessage):
                assert request is not None
                reply = await self._answer(request)
                body = json.dumps(reply.body, indent=2).encode() + b"\n"
                head = h11.Response(
                    status_code=reply.status,
                    headers=[
                        ("content-type", "application/json"),
                        ("content-length", str(len(body))),
                    ],
                )
                writer.write(conn.send(head) + conn.send(h11.Data(data=body)))
                writer.write(conn.send(h11.EndOfMessage()) or b"")
                await writer.drain()
                if conn.our_state is h11.MUST_CLOSE:
                    return
                conn.start_next_cycle()
            elif isinstance(event, h11.ConnectionClosed) or event is h11.PAUSED:
                return

    async def _answer(self, request: h11.Request) -> Reply:
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in request.headers}
        req = Request(
            method=request.method.decode("ascii"),
            path=request.target.decode("latin-1"),
            headers=headers,
        )
        if req.method != "GET":
            return Reply(status=405, body=self._whoami(req, error="only GET is served"))
        return await self._handler(req)

    def _whoami(self, req: Request, **fields: object) -> Json:
        return {
            "service": self.service,
            "version": self.version,
            "path": req.path,
            # What this app received of the propagated headers: the trail of one request.
            "headers": dict(propagated(req.headers)),
            **fields,
        }

    async def _call(self, service: str, path: str, req: Request) -> Reply:
        """Call ``service`` by name through this app's sidecar, passing the propagated headers on."""
        authority = f"{service}:{SERVICE_PORT}"
        if self.sidecar is None:
            return Reply(
                status=503, body={"error": f"{self.name} has no sidecar to reach {service}"}
            )
        try:
            return await http_get(self.sidecar, authority, path, propagated(req.headers))
        except (OSError, TimeoutError, h11.ProtocolError) as exc:
            reason = str(exc) or type(exc).__name__
            return Reply(status=503, body={"error": f"calling {authority}: {reason}"})

    # -- the services ----------------------------------------------------------------------------
    async def _productpage(self, req: Request) -> Reply:
        if req.path.partition("?")[0] not in ("/", "/productpage"):
            return Reply(status=404, body=self._whoami(req, error="try /productpage"))
        reviews = await self._call("reviews", "/reviews/0", req)
        body = self._whoami(
            req,
            user=req.headers.get("end-user"),
            reviews_status=reviews.status,
            reviews=reviews.body,
        )
        # Like bookinfo, the page still renders when reviews fails; it says so inside.
        return Reply(status=200, body=body)

    async def _reviews(self, req: Request) -> Reply:
        m = _ID.match(req.path.partition("?")[0])
        if m is None or m.group(1) != "reviews":
            return Reply(status=404, body=self._whoami(req, error="try /reviews/<id>"))
        color = _STARS.get(self.version)
        body = self._whoami(req, id=int(m.group(2)))
        if color is None:  # v1: no stars, and no call to ratings
            body["reviews"] = [{"reviewer": who, "text": text} for who, text in _REVIEWS]
            return Reply(status=200, body=body)
        ratings = await self._call("ratings", f"/ratings/{m.group(2)}", req)
        stars = ratings.body.get("ratings") if ratings.status == 200 else None
        body["stars"] = color
        body["reviews"] = [
            {
                "reviewer": who,
                "text": text,
                "rating": {"stars": stars.get(who), "color": color}
                if isinstance(stars, dict)
                else {"error": "ratings service is currently unavailable"},
            }
            for who, text in _REVIEWS
        ]
        body["ratings_status"] = ratings.status
        body["ratings"] = ratings.body
        return Reply(status=200, body=body)

    async def _ratings(self, req: Request) -> Reply:
        m = _ID.match(req.path.partition("?")[0])
        if m is None or m.group(1) != "ratings":
            return Reply(status=404, body=self._whoami(req, error="try /ratings/<id>"))
        return Reply(status=200, body=self._whoami(req, id=int(m.group(2)), ratings=_RATINGS))


def _address(text: str) -> Address:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected host:port, got {text!r}")
    return host.strip("[]"), int(port)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m meshproxy.examples.services",
        description="Run one bookinfo app of the demo mesh (see examples/README.md).",
    )
    parser.add_argument("service", choices=["productpage", "reviews", "ratings"])
    parser.add_argument("version", help="v1, v2 or v3 (reviews v2 and v3 call ratings)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument(
        "--sidecar",
        type=_address,
        metavar="HOST:PORT",
        help="the outbound listener of this app's sidecar (needed by productpage, reviews v2/v3)",
    )
    args = parser.parse_args(argv)

    async def serve() -> None:
        app = BookinfoApp(args.service, args.version, args.sidecar)
        await app.start(args.host, args.port)
        print(f"{app.name} on {args.host}:{app.port} (Ctrl-C stops)", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        try:
            await stop.wait()
        finally:
            await app.close()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)

    asyncio.run(serve())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

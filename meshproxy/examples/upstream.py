"""A tiny HTTP/1.1 demo service: answers every request with JSON naming its service and version.

Owns nothing of the proxy; it stands in for the apps behind meshproxy in the demo and the examples.
Run it alone with ``python -m meshproxy.examples.upstream --port 9081 --version v1``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import typing

import h11


class DemoService(asyncio.Protocol):
    def __init__(self, service: str, version: str) -> None:
        self.service = service
        self.version = version
        self.conn = h11.Connection(h11.SERVER)
        self.transport: asyncio.Transport | None = None
        self.request: h11.Request | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = transport = typing.cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.conn.receive_data(data)
        self._process()

    def _process(self) -> None:
        assert self.transport is not None
        while True:
            try:
                event = self.conn.next_event()
            except h11.RemoteProtocolError:
                self.transport.close()
                return
            if isinstance(event, h11.Request):
                self.request = event
            elif isinstance(event, h11.EndOfMessage):
                self._respond()
                if self.conn.our_state is h11.MUST_CLOSE:
                    self.transport.close()
                    return
                self.conn.start_next_cycle()
            elif event is h11.NEED_DATA or event is h11.PAUSED:
                return
            elif isinstance(event, h11.ConnectionClosed):
                self.transport.close()
                return

    def _respond(self) -> None:
        assert self.transport is not None and self.request is not None
        headers = {k.decode(): v.decode() for k, v in self.request.headers}
        body = json.dumps(
            {
                "service": self.service,
                "version": self.version,
                "path": self.request.target.decode(),
                "request_headers": headers,
            }
        ).encode()
        out = self.conn.send(
            h11.Response(
                status_code=200,
                headers=[("content-type", "application/json"), ("content-length", str(len(body)))],
            )
        )
        self.transport.writelines([out or b"", self.conn.send(h11.Data(data=body)) or b""])
        self.transport.write(self.conn.send(h11.EndOfMessage()) or b"")


async def start_service(host: str, port: int, service: str, version: str) -> asyncio.Server:
    loop = asyncio.get_running_loop()
    return await loop.create_server(lambda: DemoService(service, version), host, port)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9081)
    parser.add_argument("--service", default="reviews")
    parser.add_argument("--version", default="v1")
    args = parser.parse_args()

    async def serve() -> None:
        server = await start_service(args.host, args.port, args.service, args.version)
        print(f"{args.service} {args.version} on {args.host}:{args.port}", flush=True)
        async with server:
            await server.serve_forever()

    asyncio.run(serve())


if __name__ == "__main__":
    main()

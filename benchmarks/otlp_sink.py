"""Local OTLP/HTTP trace sink for benchmarks/run.py: the collector the tracing targets export to.

A small threaded HTTP/1.1 keep-alive server on 127.0.0.1. It answers every `POST .../v1/traces`
with 200 and an empty body (an empty `ExportTraceServiceResponse`, what a real collector returns
when it accepts everything) and counts, per request path, the POSTs (span batches), the bytes and
the spans in them. Each benchmark target exports to its own path (`/<target>/v1/traces`), so the
counts say which target sent what. `GET /stats` returns the counters as JSON.

Spans are counted by walking the protobuf wire format of `ExportTraceServiceRequest`
(resource_spans = 1 -> scope_spans = 2 -> spans = 2) with the standard library only; a body that
does not parse counts as a bad batch. Bodies may be gzip-compressed and may arrive chunked.

    python benchmarks/otlp_sink.py --port 4318
"""

from __future__ import annotations

import argparse
import gzip
import http.server
import json
import threading
from collections.abc import Iterator

# protobuf wire types
_VARINT, _I64, _LEN, _I32 = 0, 1, 2, 5


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(data):
            raise ValueError("truncated varint")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7
        if shift > 63:
            raise ValueError("varint too long")


def _fields(data: bytes) -> Iterator[tuple[int, bytes | None]]:
    """(field number, payload) for each field of a message; payload None unless length-delimited."""
    pos = 0
    while pos < len(data):
        key, pos = _varint(data, pos)
        number, wire = key >> 3, key & 7
        if wire == _VARINT:
            _, pos = _varint(data, pos)
            yield number, None
        elif wire == _I64:
            pos += 8
            yield number, None
        elif wire == _I32:
            pos += 4
            yield number, None
        elif wire == _LEN:
            length, pos = _varint(data, pos)
            if pos + length > len(data):
                raise ValueError("truncated field")
            yield number, data[pos : pos + length]
            pos += length
        else:
            raise ValueError(f"unsupported wire type {wire}")
    if pos != len(data):
        raise ValueError("trailing bytes")


def count_spans(body: bytes) -> int:
    """Spans in an OTLP `ExportTraceServiceRequest` (protobuf)."""
    spans = 0
    for number, resource_spans in _fields(body):
        if number != 1 or resource_spans is None:
            continue
        for rs_number, scope_spans in _fields(resource_spans):
            if rs_number != 2 or scope_spans is None:
                continue
            spans += sum(1 for n, span in _fields(scope_spans) if n == 2 and span is not None)
    return spans


class Counters:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._paths: dict[str, dict[str, int]] = {}

    def add(self, path: str, size: int, spans: int | None) -> None:
        with self._lock:
            entry = self._paths.setdefault(
                path, {"posts": 0, "bytes": 0, "spans": 0, "bad_batches": 0}
            )
            entry["posts"] += 1
            entry["bytes"] += size
            if spans is None:
                entry["bad_batches"] += 1
            else:
                entry["spans"] += spans

    def snapshot(self) -> dict[str, dict[str, int]]:
        with self._lock:
            return {path: dict(entry) for path, entry in self._paths.items()}


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "otlp-sink"
    counters: Counters  # set on the class by main()

    def log_message(self, format: str, *args: object) -> None:
        pass  # no per-request logging: the sink must stay cheap

    def _reply(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks: list[bytes] = []
            while True:
                size = int(self.rfile.readline().split(b";", 1)[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()  # CRLF after the chunk
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def do_POST(self) -> None:
        body = self._read_body()
        if not self.path.endswith("/v1/traces"):
            self._reply(404, b"not found\n", "text/plain")
            return
        spans: int | None
        try:
            payload = body
            if self.headers.get("Content-Encoding", "").lower() == "gzip":
                payload = gzip.decompress(body)
            spans = count_spans(payload)
        except (ValueError, OSError, EOFError):
            spans = None
        self.counters.add(self.path, len(body), spans)
        self._reply(200, b"", "application/x-protobuf")

    def do_GET(self) -> None:
        if self.path == "/stats":
            body = json.dumps(self.counters.snapshot(), sort_keys=True).encode()
            self._reply(200, body, "application/json")
        else:
            self._reply(404, b"not found\n", "text/plain")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    Handler.counters = Counters()
    server = http.server.ThreadingHTTPServer((args.host, args.port), Handler)
    server.daemon_threads = True
    print(f"otlp sink listening on {args.host}:{args.port}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()

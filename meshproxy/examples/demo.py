"""``meshproxy demo``: meshproxy on the bundled example config, in front of bundled upstreams.

Owns the README's first command. It starts two demo ``reviews`` endpoints (v1 and v2), starts
meshproxy on ``demo.yaml`` with its ports moved to free ones, sends a few requests through the
outbound listener the way an app would (``Host: reviews:9080``), and prints what went where.
"""

from __future__ import annotations

import asyncio
import json
import sys
from importlib import resources

from meshproxy.app import App
from meshproxy.config.load import load_texts
from meshproxy.examples.upstream import start_service
from meshproxy.io.loop import loop_factory


async def _get(port: int, host: str, path: str) -> tuple[int, dict[str, object]]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        raw = await asyncio.wait_for(reader.read(), timeout=10)
    finally:
        writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    try:
        parsed = json.loads(body)
    except ValueError:
        parsed = {"body": body.decode(errors="replace")}
    return status, parsed


async def _demo(requests: int, serve: bool) -> int:
    text = resources.files("meshproxy.examples").joinpath("demo.yaml").read_text()
    v1 = await start_service("127.0.0.1", 0, "reviews", "v1")
    v2 = await start_service("127.0.0.1", 0, "reviews", "v2")
    p1 = v1.sockets[0].getsockname()[1]
    p2 = v2.sockets[0].getsockname()[1]
    if not serve:
        text = text.replace("127.0.0.1:15001", "127.0.0.1:0").replace(
            "127.0.0.1:15000", "127.0.0.1:0"
        )
    text = text.replace("http: 9081", f"http: {p1}").replace("http: 9082", f"http: {p2}")
    config = load_texts([("demo.yaml", text)])
    app = App(config, access_log=sys.stdout)
    await app.start()
    port = app.listeners["outbound"].port
    assert app.admin is not None
    print(f"meshproxy outbound listener on 127.0.0.1:{port}, admin on 127.0.0.1:{app.admin.port}")
    print(f"reviews endpoints: v1 on 127.0.0.1:{p1}, v2 on 127.0.0.1:{p2}\n")
    ok = True
    try:
        for i in range(requests):
            status, body = await _get(port, "reviews:9080", f"/reviews/{i}")
            print(
                f"GET http://reviews:9080/reviews/{i} -> {status} from reviews {body.get('version')}"
            )
            ok = ok and status == 200
        status, _ = await _get(port, "ratings:9080", "/ratings/0")
        print(f"GET http://ratings:9080/ratings/0 -> {status} (not in the registry: REGISTRY_ONLY)")
        ok = ok and status == 502
        if serve:
            print(
                "\nserving; try: curl -H 'Host: reviews:9080' http://127.0.0.1:15001/ (Ctrl-C stops)"
            )
            app.install_signal_handlers()
            await app.wait_stopped()
    finally:
        await app.close()
        v1.close()
        v2.close()
    print("\ndemo ok" if ok else "\ndemo FAILED")
    return 0 if ok else 1


def run_demo(requests: int = 3, serve: bool = False) -> int:
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        return runner.run(_demo(requests, serve))

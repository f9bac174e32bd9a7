"""Hot reload over real processes: the watched files or SIGHUP give new requests the new config
(on kept-alive connections too) with zero failed requests; an invalid change is rejected whole,
logged with file, line and field, counted, and the old config keeps serving; a listener whose
address changed is rebound and the old one drained; a cluster whose definition changed finishes
its in-flight requests on its old pool, whose connections then close."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import re
import signal
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import httpx
import pytest
from helpers import (
    Handler,
    ProxyProcess,
    RawClient,
    RawResponse,
    Reply,
    SeenRequest,
    Upstream,
    bootstrap,
    join,
    service_entry,
    upstream,
)

from meshproxy.app import App, ReloadResult
from meshproxy.config.load import load_paths, load_texts
from meshproxy.config.model import MeshConfig
from meshproxy.io.watch import FileWatcher, fingerprint

RELOADED = "meshproxy reloaded:"
REJECTED = "meshproxy reload rejected:"


def labelled(label: str) -> Handler:
    def handler(req: SeenRequest) -> Reply:
        return Reply(headers=[("x-upstream", label)], body=label.encode())

    return handler


def reviews_config(
    v1: int, v2: int, *, weights: tuple[object, object], outbound: str = "127.0.0.1:0", dr: str = ""
) -> str:
    boot = bootstrap().replace(
        "  outbound:\n    address: 127.0.0.1:0", f"  outbound:\n    address: {outbound}"
    )
    destination_rule = (
        "apiVersion: networking.istio.io/v1\n"
        "kind: DestinationRule\n"
        "metadata: {name: reviews, namespace: default}\n"
        "spec:\n"
        "  host: reviews\n"
        f"{dr}"
        "  subsets:\n"
        "  - {name: v1, labels: {version: v1}}\n"
        "  - {name: v2, labels: {version: v2}}\n"
    )
    virtual_service = (
        "apiVersion: networking.istio.io/v1\n"
        "kind: VirtualService\n"
        "metadata: {name: reviews, namespace: default}\n"
        "spec:\n"
        "  hosts: [reviews]\n"
        "  http:\n"
        "  - route:\n"
        "    - destination: {host: reviews, subset: v1}\n"
        f"      weight: {weights[0]}\n"
        "    - destination: {host: reviews, subset: v2}\n"
        f"      weight: {weights[1]}\n"
    )
    return join(boot, service_entry("reviews", [v1, v2]), destination_rule, virtual_service)


def write(path: Path, text: str) -> None:
    """Replace the file atomically (as an editor or a ConfigMap update does)."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


@pytest.fixture
async def v1_v2() -> AsyncIterator[tuple[Upstream, Upstream]]:
    async with upstream(labelled("v1")) as v1, upstream(labelled("v2")) as v2:
        yield v1, v2


async def start(config_dir: Path, text: str) -> tuple[ProxyProcess, Path]:
    config_dir.mkdir(exist_ok=True)
    path = config_dir / "mesh.yaml"
    path.write_text(text)
    px = await ProxyProcess(str(config_dir)).start()  # a directory: every YAML file in it
    return px, path


async def get(
    port: int, target: str = "/", host: str = "reviews", addr: str = "127.0.0.1"
) -> RawResponse:
    reader, writer = await asyncio.open_connection(addr, port)
    client = RawClient(reader, writer)
    try:
        return await client.request("GET", target, [("host", host)])
    finally:
        await client.close()


async def admin_json(px: ProxyProcess, path: str) -> dict[str, object]:
    async with httpx.AsyncClient() as client:
        r = await client.get(f"http://127.0.0.1:{px.ports['admin']}{path}")
    r.raise_for_status()
    data = r.json()
    assert isinstance(data, dict)
    return data


async def reloads(px: ProxyProcess, result: str) -> float:
    async with httpx.AsyncClient() as client:
        r = await client.get(f"http://127.0.0.1:{px.ports['admin']}/stats/prometheus")
    m = re.search(rf'^meshproxy_config_reloads_total{{result="{result}"}} (\S+)$', r.text, re.M)
    assert m is not None, r.text
    return float(m.group(1))


async def stop(px: ProxyProcess) -> str:
    """SIGTERM, exit 0, and the process's stderr."""
    px.signal(signal.SIGTERM)
    assert await px.wait(timeout=15) == 0
    return px.stderr_text()


async def test_reload_under_load_changes_routing_with_zero_failed_requests(
    tmp_path: Path, v1_v2: tuple[Upstream, Upstream]
) -> None:
    v1, v2 = v1_v2
    px, path = await start(tmp_path / "conf", reviews_config(v1.port, v2.port, weights=(100, 0)))
    try:
        port = px.ports["outbound"]
        written = asyncio.Event()  # the new config is on disk (requests sent after may see it)
        reloaded = asyncio.Event()  # the reload line was read (requests sent after must see it)
        started = asyncio.Event()
        failures: list[str] = []
        seen: list[
            tuple[int, str | None]
        ] = []  # (0 before the write, 1 between, 2 after; served by)

        async def client_loop() -> None:
            # One kept-alive connection per client: the new config must reach it too.
            client = await RawClient.connect(port)
            after = 0
            try:
                for i in range(5000):  # bounded; stops early once the change has been seen
                    phase = 2 if reloaded.is_set() else 1 if written.is_set() else 0
                    try:
                        r = await client.request("GET", f"/{i}", [("host", "reviews")])
                    except Exception as exc:  # any failure at all is what this test counts
                        failures.append(f"{type(exc).__name__}: {exc}")
                        return
                    if r.status != 200:
                        failures.append(f"{r.status} {r.body!r}")
                    seen.append((phase, r.header("x-upstream")))
                    if i == 20:
                        started.set()
                    after += phase == 2
                    if after >= 50:
                        return
            finally:
                await client.close()

        async with asyncio.timeout(60):
            clients = [asyncio.ensure_future(client_loop()) for _ in range(4)]
            await started.wait()
            # The change: all traffic from v1 to v2, picked up by the file watcher.
            written.set()
            write(path, reviews_config(v1.port, v2.port, weights=(0, 100)))
            line = await px.line(RELOADED, timeout=30)
            reloaded.set()
            await asyncio.gather(*clients)
        assert line.startswith(f"{RELOADED} version=2 ")
        assert failures == []
        before = [who for phase, who in seen if phase == 0]
        after = [who for phase, who in seen if phase == 2]
        assert len(before) >= 21 and set(before) == {"v1"}  # the old config served until the swap
        assert len(after) >= 200 and set(after) == {"v2"}  # and the new one right after it
        assert v2.connections >= 1
        dump = await admin_json(px, "/config_dump")
        assert dump["version"] == 2
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", str(dump["loadedAt"]))
        assert await reloads(px, "accepted") == 1
        assert await reloads(px, "rejected") == 0
        await stop(px)
    finally:
        px.stop()


async def test_invalid_reload_is_rejected_whole_and_old_config_keeps_serving(
    tmp_path: Path, v1_v2: tuple[Upstream, Upstream]
) -> None:
    v1, v2 = v1_v2
    px, path = await start(tmp_path / "conf", reviews_config(v1.port, v2.port, weights=(100, 0)))
    try:
        port = px.ports["outbound"]
        client = await RawClient.connect(port)  # kept alive across the rejected reload
        assert (await client.request("GET", "/", [("host", "reviews")])).header(
            "x-upstream"
        ) == "v1"
        bad = reviews_config(v1.port, v2.port, weights=(0, "lots"))  # v2's weight: not a number
        write(path, bad)
        line = await px.line(REJECTED, timeout=30)
        assert line == f"{REJECTED} 1 error(s); still serving version=1"
        # Traffic untouched, on the kept-alive connection and on a new one.
        for _ in range(20):
            r = await client.request("GET", "/", [("host", "reviews")])
            assert (r.status, r.header("x-upstream")) == (200, "v1")
        assert (await get(port)).header("x-upstream") == "v1"
        assert (await admin_json(px, "/config_dump"))["version"] == 1
        assert await reloads(px, "rejected") == 1
        assert await reloads(px, "accepted") == 0
        # Fixed: accepted, the next version.
        write(path, reviews_config(v1.port, v2.port, weights=(0, 100)))
        assert (await px.line(RELOADED, timeout=30)).startswith(f"{RELOADED} version=2 ")
        r = await client.request("GET", "/", [("host", "reviews")])
        assert (r.status, r.header("x-upstream")) == (200, "v2")
        await client.close()
        stderr = await stop(px)
        # The error names the file, the line and the field.
        bad_line = bad.splitlines().index("      weight: lots") + 1
        assert (
            f"config reload rejected: {path}:{bad_line}: VirtualService reviews: "
            "spec.http[0].route[1].weight: expected an integer, got 'lots'"
        ) in stderr
    finally:
        px.stop()


async def test_sighup_reloads_at_once(tmp_path: Path, v1_v2: tuple[Upstream, Upstream]) -> None:
    v1, v2 = v1_v2
    px, path = await start(tmp_path / "conf", reviews_config(v1.port, v2.port, weights=(100, 0)))
    try:
        # Nothing changed on disk: only the signal can trigger this reload.
        px.signal(signal.SIGHUP)
        assert (await px.line(RELOADED)).startswith(f"{RELOADED} version=2 ")
        assert (await get(px.ports["outbound"])).header("x-upstream") == "v1"
        write(path, reviews_config(v1.port, v2.port, weights=(0, 100)))
        px.signal(signal.SIGHUP)
        line = await px.line(RELOADED)
        assert re.match(rf"{RELOADED} version=[34] ", line)  # the watcher may have seen it too
        assert (await get(px.ports["outbound"])).header("x-upstream") == "v2"
        assert await reloads(px, "accepted") >= 2
        await stop(px)
    finally:
        px.stop()


class Gate:
    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.arrived = asyncio.Event()

    async def handler(self, req: SeenRequest) -> Reply:
        self.arrived.set()
        if req.target == "/held":
            await self.release.wait()
        return Reply(headers=[("x-upstream", "v1")], body=req.target.encode())


@pytest.fixture
async def gated() -> AsyncIterator[tuple[Gate, Upstream, Upstream]]:
    gate = Gate()
    async with upstream(gate.handler) as v1, upstream(labelled("v2")) as v2:
        yield gate, v1, v2
        gate.release.set()


async def test_changed_listener_address_is_rebound_and_the_old_one_drained(
    tmp_path: Path, gated: tuple[Gate, Upstream, Upstream]
) -> None:
    gate, v1, v2 = gated
    px, path = await start(tmp_path / "conf", reviews_config(v1.port, v2.port, weights=(100, 0)))
    try:
        old_port = px.ports["outbound"]
        client = await RawClient.connect(old_port)
        held = asyncio.ensure_future(
            client.request("GET", "/held", [("host", "reviews")], timeout=20)
        )
        async with asyncio.timeout(10):
            await gate.arrived.wait()
        # Another loopback address: a new listener, bound before the old one drains.
        write(path, reviews_config(v1.port, v2.port, weights=(100, 0), outbound="127.0.0.2:0"))
        px.signal(signal.SIGHUP)
        line = await px.line(RELOADED)
        host, new_port = px.parse_ports(line)["outbound"]
        assert host == "127.0.0.2"
        r = await get(new_port, "/new", addr="127.0.0.2")
        assert (r.status, r.body) == (200, b"/new")
        with pytest.raises(OSError):  # the old listener no longer accepts
            await asyncio.open_connection("127.0.0.1", old_port)
        # Its request in flight finishes, with `connection: close`.
        gate.release.set()
        answered = await held
        assert (answered.status, answered.body) == (200, b"/held")
        assert answered.header("connection") == "close"
        listeners = await admin_json(px, "/listeners")
        assert listeners["outbound"] == {
            "address": f"127.0.0.2:{new_port}",
            "active_connections": 0,
            "mtls": "DISABLE",
            "tls_refused": {},
        }
        await client.close()
        await stop(px)
    finally:
        px.stop()


async def test_reload_to_an_address_in_use_is_rejected(
    tmp_path: Path, v1_v2: tuple[Upstream, Upstream]
) -> None:
    v1, v2 = v1_v2
    blocker = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    taken = blocker.sockets[0].getsockname()[1]
    px, path = await start(tmp_path / "conf", reviews_config(v1.port, v2.port, weights=(100, 0)))
    try:
        write(
            path,
            reviews_config(v1.port, v2.port, weights=(0, 100), outbound=f"127.0.0.1:{taken}"),
        )
        px.signal(signal.SIGHUP)
        assert await px.line(REJECTED) == f"{REJECTED} 1 error(s); still serving version=1"
        # Nothing of the new config applies: not its routes either.
        assert (await get(px.ports["outbound"])).header("x-upstream") == "v1"
        assert await reloads(px, "rejected") == 1
        stderr = await stop(px)
        assert "config reload rejected: cannot listen:" in stderr
    finally:
        px.stop()
        blocker.close()


async def test_changed_cluster_finishes_in_flight_requests_then_closes_old_connections(
    tmp_path: Path, gated: tuple[Gate, Upstream, Upstream]
) -> None:
    gate, v1, v2 = gated
    px, path = await start(tmp_path / "conf", reviews_config(v1.port, v2.port, weights=(100, 0)))
    try:
        port = px.ports["outbound"]
        client = await RawClient.connect(port)
        held = asyncio.ensure_future(
            client.request("GET", "/held", [("host", "reviews")], timeout=20)
        )
        async with asyncio.timeout(10):
            await gate.arrived.wait()
        # The DestinationRule's policy changes: every reviews cluster is a new one.
        policy = "  trafficPolicy:\n    connectionPool: {http: {maxRequestsPerConnection: 100}}\n"
        write(path, reviews_config(v1.port, v2.port, weights=(100, 0), dr=policy))
        px.signal(signal.SIGHUP)
        await px.line(RELOADED)
        # New requests: the new cluster's pool, a new upstream connection.
        r = await get(port, "/next")
        assert (r.status, r.body) == (200, b"/next")
        assert v1.connections == 2
        # The old pool's request finishes, uncut; then its connection closes (it is idle and
        # its cluster retired), while the new pool's stays open.
        gate.release.set()
        answered = await held
        assert (answered.status, answered.body) == (200, b"/held")
        await v1.wait_closed(1, timeout=10)
        assert len(v1.open) == 1
        await client.close()
        await stop(px)
    finally:
        px.stop()


async def test_file_watcher_sees_edits_removals_and_returns(tmp_path: Path) -> None:
    conf = tmp_path / "conf"
    (conf / "sub").mkdir(parents=True)
    a, b = conf / "a.yaml", conf / "sub" / "b.yml"
    a.write_text("a: 1\n")
    b.write_text("b: 1\n")
    changed = asyncio.Event()
    watcher = FileWatcher([str(conf)], 0.01, changed.set)
    watcher.start()
    try:

        async def change(action: Callable[[], object]) -> None:
            changed.clear()
            action()
            async with asyncio.timeout(5):
                await changed.wait()

        await change(lambda: write(a, "a: 2\n"))  # edited (replaced)
        await change(b.unlink)  # removed
        await change(lambda: b.write_text("b: 2\n"))  # back
        await change(lambda: (conf / "c.yaml").write_text("c: 1\n"))  # a new file in the dir
        # Files that are not YAML are not part of the configuration.
        (conf / "notes.txt").write_text("x")
        assert fingerprint([str(conf)]) == watcher._last
    finally:
        watcher.stop()


# -- in-process: the App's reload paths ------------------------------------------------------


async def test_tables_that_cannot_be_built_are_rejected_not_raised() -> None:
    async with upstream(labelled("v1")) as v1, upstream(labelled("v2")) as v2:
        config = load_texts([("t.yaml", reviews_config(v1.port, v2.port, weights=(100, 0)))])
        async with proxy_in_process(config) as app:
            # Past validation (as a bug in it would let through): routes to an unknown service.
            broken = dataclasses.replace(config, service_entries=())
            result = await app.reload(broken)
            assert result == ReloadResult(
                accepted=False,
                version=1,
                errors=("destination host 'reviews' is not a known service",),
            )
            assert app.config is config and app.runtime is not None and app.runtime.version == 1
            assert app.metrics is not None
            assert b'meshproxy_config_reloads_total{result="rejected"} 1.0' in (
                app.metrics.exposition()
            )
            r = await get(app.listeners["outbound"].port)
            assert (r.status, r.header("x-upstream")) == (200, "v1")


async def test_no_reload_while_draining() -> None:
    async with upstream(labelled("v1")) as v1, upstream(labelled("v2")) as v2:
        config = load_texts([("t.yaml", reviews_config(v1.port, v2.port, weights=(100, 0)))])
        async with proxy_in_process(config) as app:
            app.begin_drain()
            result = await app.reload(config)
            assert result == ReloadResult(
                accepted=False, version=1, errors=("not reloading while DRAINING",)
            )
            app.request_reload()  # ignored: nothing scheduled
            assert app._reload_task is None


async def test_reload_requests_during_a_reload_coalesce_into_one_more(tmp_path: Path) -> None:
    async with upstream(labelled("v1")) as v1, upstream(labelled("v2")) as v2:
        path = tmp_path / "mesh.yaml"
        path.write_text(reviews_config(v1.port, v2.port, weights=(100, 0)))
        app = App(load_paths([str(path)]), config_paths=[str(path)])
        await app.start()
        try:
            results: list[ReloadResult] = []
            app.on_reload = results.append
            # Requests before the files are read are one reload: it will read them all.
            app.request_reload()
            app.request_reload()
            app.request_reload()
            task = app._reload_task
            assert task is not None
            await asyncio.wait_for(task, 10)
            assert [(r.accepted, r.version) for r in results] == [(True, 2)]

            # A request while a reload runs (it may have read the files too early): one more.
            def again(result: ReloadResult) -> None:
                results.append(result)
                if result.version == 3:
                    app.request_reload()
                    app.request_reload()

            app.on_reload = again
            app.request_reload()
            task = app._reload_task
            assert task is not None
            await asyncio.wait_for(task, 10)
            assert [(r.accepted, r.version) for r in results] == [(True, 2), (True, 3), (True, 4)]
        finally:
            await app.close()


@contextlib.asynccontextmanager
async def proxy_in_process(config: MeshConfig) -> AsyncIterator[App]:
    app = App(config)
    await app.start()
    try:
        yield app
    finally:
        await app.close()

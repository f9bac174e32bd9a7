"""Access logs (telemetry/access_log.py): the formats, when logs are on, the non-blocking writer.

Synchronous: records are built by hand; the writer thread is driven by outputs that block or fail
on purpose, and every wait on it is bounded.
"""

from __future__ import annotations

import calendar
import io
import json
import threading
from pathlib import Path

import pytest

from meshproxy.config.load import load_texts
from meshproxy.config.model import AccessLogFormat
from meshproxy.core.record import Direction, RequestRecord
from meshproxy.telemetry.access_log import (
    AccessLog,
    access_log_plan,
    build_access_log,
    compile_filter,
    fields_of,
    format_json,
    format_line,
    format_text,
)

# 2026-11-26T00:46:23.707Z, the reference's [obs] line (§2.5); .7075 keeps float rounding away.
WALL = calendar.timegm((2026, 11, 26, 0, 46, 23, 0, 0, 0)) + 0.7075
WAIT = 5.0  # bound on every wait for the writer thread


def full_record() -> RequestRecord:
    r = RequestRecord(Direction.OUTBOUND, 100.0, "127.0.0.1:50000")
    r.end = 100.0015
    r.method = "GET"
    r.path = "/dead"
    r.authority = "127.0.0.1:19001"
    r.request_id = "4d8e"
    r.user_agent = "curl/7.88.1"
    r.response_code = 503
    r.add_flag("URX")
    r.add_flag("UF")
    r.bytes_sent = 98
    r.upstream_host = "127.0.0.1:19011"
    r.cluster = "outbound|9080||svc.default.svc.cluster.local"
    r.route_name = "svc-route"
    return r


def bare_record(code: int = 200, direction: Direction = Direction.OUTBOUND) -> RequestRecord:
    r = RequestRecord(direction, 100.0, "127.0.0.1:50000")
    r.end = 100.0
    r.response_code = code
    return r


# -- text ---------------------------------------------------------------------------------------


def test_text_line_is_envoys_default_format_plus_cluster_and_direction() -> None:
    assert format_line(full_record(), WALL) == (
        '[2026-11-26T00:46:23.707Z] "GET /dead HTTP/1.1" 503 URX,UF 0 98 1 - "-" "curl/7.88.1" '
        '"4d8e" "127.0.0.1:19001" "127.0.0.1:19011" '
        "outbound|9080||svc.default.svc.cluster.local outbound\n"
    )


def test_text_missing_values_are_dashes() -> None:
    r = bare_record(direction=Direction.INBOUND)
    assert format_line(r, WALL) == (
        '[2026-11-26T00:46:23.707Z] "- - HTTP/1.1" 200 - 0 0 0 - "-" "-" "-" "-" "-" - inbound\n'
    )


def test_text_upstream_service_time_and_xff() -> None:
    r = full_record()
    r.upstream_service_time = 0.0123
    r.x_forwarded_for = "10.0.0.1"
    line = format_line(r, WALL)
    assert ' 0 98 1 12 "10.0.0.1" ' in line


# -- json ---------------------------------------------------------------------------------------


def test_json_has_the_same_fields_under_istios_names() -> None:
    r = full_record()
    r.upstream_service_time = 0.0123
    entry = json.loads(format_json(fields_of(r, WALL - r.start)))
    assert entry == {
        "start_time": "2026-11-26T00:46:23.707Z",
        "method": "GET",
        "path": "/dead",
        "protocol": "HTTP/1.1",
        "response_code": 503,
        "response_flags": "URX,UF",
        "bytes_received": 0,
        "bytes_sent": 98,
        "duration": 1,
        "upstream_service_time": 12,
        "x_forwarded_for": None,
        "user_agent": "curl/7.88.1",
        "request_id": "4d8e",
        "authority": "127.0.0.1:19001",
        "upstream_host": "127.0.0.1:19011",
        "upstream_cluster": "outbound|9080||svc.default.svc.cluster.local",
        "direction": "outbound",
        "route_name": "svc-route",
    }


def test_json_missing_values_are_null_and_one_line() -> None:
    line = format_json(fields_of(bare_record(), WALL - 100.0))
    assert line.endswith("\n") and line.count("\n") == 1
    entry = json.loads(line)
    assert entry["response_flags"] == "-"
    for key in ("method", "path", "user_agent", "request_id", "authority", "upstream_host"):
        assert entry[key] is None, key
    assert entry["upstream_service_time"] is None


def test_json_escapes_what_it_must() -> None:
    r = full_record()
    r.user_agent = 'evil" \\ agent'
    assert json.loads(format_json(fields_of(r, 0.0)))["user_agent"] == 'evil" \\ agent'


def test_text_and_json_agree() -> None:
    f = fields_of(full_record(), WALL - 100.0)
    text, entry = format_text(f), json.loads(format_json(f))
    for key in ("method", "path", "response_flags", "request_id", "upstream_cluster"):
        assert str(entry[key]) in text


# -- filter -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("expression", "passes"),
    [
        ("response.code >= 400", {404, 503}),
        ("response.code == 503", {503}),
        ("response.code != 200", {404, 503}),
        ("response.code < 400", {200}),
        ("response.code >= 400 && response.code < 500", {404}),
        ("response.code == 200 || response.code > 500", {200, 503}),
    ],
)
def test_filter_subset(expression: str, passes: set[int]) -> None:
    keep = compile_filter(expression)
    assert {c for c in (200, 404, 503) if keep(bare_record(c))} == passes


@pytest.mark.parametrize(
    "expression", ["request.headers['x'] == 'y'", "response.code >= ", "response.code >= 400 &&"]
)
def test_filter_outside_the_subset_is_refused(expression: str) -> None:
    with pytest.raises(ValueError, match="unsupported access log filter"):
        compile_filter(expression)


# -- when logs are on ---------------------------------------------------------------------------

BOOT = """\
apiVersion: meshproxy.io/v1alpha1
kind: MeshProxy
metadata: {name: reviews-v1, namespace: default, labels: {app: reviews, version: v1}}
spec:
  admin: 127.0.0.1:0
  outbound: {address: 127.0.0.1:0}
"""


def telemetry(name: str, namespace: str, body: str, selector: str = "") -> str:
    return (
        "---\napiVersion: telemetry.istio.io/v1\nkind: Telemetry\n"
        f"metadata: {{name: {name}, namespace: {namespace}}}\nspec:\n"
        + (f"  selector: {{matchLabels: {selector}}}\n" if selector else "")
        + f"  accessLogging:\n{body}"
    )


ON = "  - providers: [{name: envoy}]\n"
OFF = "  - disabled: true\n"


def plan_for(*docs: str, boot_extra: str = "", forced: bool = False):  # type: ignore[no-untyped-def]
    config = load_texts([("t.yaml", BOOT + boot_extra + "".join(docs))])
    return access_log_plan(config, forced=forced)


def test_off_by_default_as_in_istio() -> None:
    assert plan_for() is None


def test_a_mesh_wide_telemetry_turns_them_on_to_stdout() -> None:
    plan = plan_for(telemetry("mesh-default", "istio-system", ON))
    assert plan is not None
    assert plan.path == "/dev/stdout"
    assert plan.format is AccessLogFormat.TEXT
    assert plan.directions == frozenset(Direction)


def test_any_provider_name_and_no_provider_turn_them_on() -> None:
    assert plan_for(telemetry("t", "default", "  - providers: [{name: otel}]\n")) is not None
    assert plan_for(telemetry("t", "default", "  - {}\n")) is not None


def test_the_bootstrap_turns_them_on_with_its_path_and_format() -> None:
    extra = "  telemetry:\n    accessLog: {path: /tmp/x.log, format: json}\n"
    plan = plan_for(boot_extra=extra)
    assert plan is not None
    assert (plan.path, plan.format) == ("/tmp/x.log", AccessLogFormat.JSON)


def test_a_disabled_telemetry_overrides_the_bootstrap() -> None:
    extra = "  telemetry:\n    accessLog: {path: /tmp/x.log}\n"
    assert plan_for(telemetry("turn-off", "default", OFF), boot_extra=extra) is None


def test_the_most_specific_telemetry_wins() -> None:
    mesh_on = telemetry("mesh", "istio-system", ON)
    ns_off = telemetry("ns", "default", OFF)
    workload_on = telemetry("wl", "default", ON, selector="{app: reviews}")
    other_workload_on = telemetry("wl2", "default", ON, selector="{app: ratings}")
    other_ns_on = telemetry("elsewhere", "prod", ON)
    assert plan_for(mesh_on) is not None
    assert plan_for(mesh_on, ns_off) is None
    assert plan_for(mesh_on, ns_off, workload_on) is not None
    assert plan_for(mesh_on, ns_off, other_workload_on) is None
    assert plan_for(other_ns_on) is None


def test_match_mode_picks_the_direction_and_filter_is_kept() -> None:
    body = (
        "  - match: {mode: CLIENT}\n    providers: [{name: envoy}]\n"
        "    filter: {expression: 'response.code >= 400'}\n"
    )
    plan = plan_for(telemetry("t", "default", body))
    assert plan is not None
    assert plan.directions == frozenset({Direction.OUTBOUND})
    assert plan.filters == {Direction.OUTBOUND: "response.code >= 400"}
    server_off = "  - providers: [{name: envoy}]\n  - match: {mode: SERVER}\n    disabled: true\n"
    plan = plan_for(telemetry("t", "default", server_off))
    assert plan is not None and plan.directions == frozenset({Direction.OUTBOUND})


def test_an_explicit_output_forces_them_on() -> None:
    plan = plan_for(telemetry("turn-off", "default", OFF), forced=True)
    assert plan is not None and plan.directions == frozenset(Direction)


def test_build_applies_directions_and_filter() -> None:
    body = (
        "  - match: {mode: CLIENT}\n    providers: [{name: envoy}]\n"
        "    filter: {expression: 'response.code >= 400'}\n"
    )
    config = load_texts([("t.yaml", BOOT + telemetry("t", "default", body))])
    out = io.StringIO()
    alog = build_access_log(config, 100.0, out=out)
    assert alog is not None
    # An explicit output logs both directions, unfiltered.
    alog.write(bare_record(200, Direction.INBOUND))
    assert out.getvalue().count("\n") == 1
    # Without one, the plan's direction and filter apply (its stdout is swapped for a buffer).
    out = io.StringIO()
    alog = AccessLog(
        out,
        100.0,
        directions={Direction.OUTBOUND},
        record_filter=compile_filter("response.code >= 400"),
    )
    for code, direction in [(200, Direction.OUTBOUND), (503, Direction.OUTBOUND)]:
        alog.write(bare_record(code, direction))
    alog.write(bare_record(503, Direction.INBOUND))
    lines = out.getvalue().splitlines()
    assert len(lines) == 1 and '" 503 - ' in lines[0] and lines[0].endswith(" outbound")


def test_build_opens_the_bootstrap_path(tmp_path: Path) -> None:
    path = tmp_path / "access.log"
    extra = f"  telemetry:\n    accessLog: {{path: {path}, format: json}}\n"
    config = load_texts([("t.yaml", BOOT + extra)])
    alog = build_access_log(config, 100.0)
    assert alog is not None
    alog.write(full_record())
    alog.close()
    (entry,) = [json.loads(line) for line in path.read_text().splitlines()]
    assert entry["response_flags"] == "URX,UF"


# -- the writer ---------------------------------------------------------------------------------


class BlockingOut(io.TextIOBase):
    """A TextIO whose writes wait for ``release``: a stuck pipe or a slow disk."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()
        self.chunks: list[str] = []
        self.flushes = 0
        self.closed_by_log = False

    def write(self, s: str) -> int:
        self.entered.set()
        assert self.release.wait(WAIT), "test never released the output"
        self.chunks.append(s)
        return len(s)

    def flush(self) -> None:
        self.flushes += 1

    def close(self) -> None:
        self.closed_by_log = True
        super().close()


def test_a_stuck_output_never_blocks_the_sink_and_drops_are_counted() -> None:
    out = BlockingOut()
    alog = AccessLog(out, 100.0, max_lines=3)  # type: ignore[arg-type]
    alog.write(full_record())  # the writer takes it and sticks in write()
    assert out.entered.wait(WAIT)
    for _ in range(5):  # returns at once though nothing is written
        alog.write(full_record())
    assert (alog.queued, alog.dropped, alog.written) == (3, 2, 0)
    out.release.set()
    alog.close()
    assert alog.written == 4
    assert "".join(out.chunks).count("\n") == 4
    assert alog.dropped == 2


def test_close_writes_everything_flushes_and_joins(tmp_path: Path) -> None:
    path = tmp_path / "a.log"
    f = path.open("a", encoding="utf-8")
    alog = AccessLog(f, 100.0, close_out=True)
    thread = alog._thread
    assert thread is not None and thread.is_alive()
    for i in range(1000):
        r = full_record()
        r.path = f"/p/{i}"
        alog.write(r)
    alog.close()
    assert not thread.is_alive()
    assert f.closed
    lines = path.read_text().splitlines()
    assert [line.split(" ")[2] for line in lines] == [f"/p/{i}" for i in range(1000)]
    assert (alog.written, alog.dropped) == (1000, 0)
    alog.close()  # twice is fine


def test_close_leaves_a_borrowed_output_open_but_flushed() -> None:
    out = BlockingOut()
    out.release.set()
    alog = AccessLog(out, 100.0)  # type: ignore[arg-type]
    alog.write(full_record())
    alog.close()
    assert out.flushes >= 1 and not out.closed_by_log
    assert "".join(out.chunks).count("\n") == 1


def test_lines_after_close_are_dropped() -> None:
    out = BlockingOut()
    out.release.set()
    alog = AccessLog(out, 100.0)  # type: ignore[arg-type]
    alog.close()
    alog.write(full_record())
    assert alog.dropped == 1 and out.chunks == []


def test_a_failing_output_loses_lines_not_requests() -> None:
    class Broken(io.TextIOBase):
        def write(self, s: str) -> int:
            raise OSError(28, "No space left on device")

    alog = AccessLog(Broken(), 100.0)  # type: ignore[arg-type]
    alog.write(full_record())
    alog.close()
    assert alog.errors >= 1 and alog.written == 0


def test_an_in_memory_buffer_is_written_inline() -> None:
    out = io.StringIO()
    alog = AccessLog(out, 100.0, format=AccessLogFormat.JSON)
    assert alog._thread is None
    alog.write(full_record())
    assert json.loads(out.getvalue())["path"] == "/dead"  # there at once, no thread involved

"""The admin page's live numbers: recent requests and per-destination rates over a sliding window.

Owns the ``Dashboard`` record sink behind the admin server's ``GET /`` page and its
``GET /dashboard.json``: a bounded ring of recent request summaries (method, path without its query
string and truncated, status, response flags, duration, destination) and, per destination (the
upstream cluster, a bounded label), request and error counts and a latency histogram in one-second
slots over the last ``window`` seconds. Rates, error ratios and p50/p90/p99 are computed when the
page asks, never per request. ``PAGE`` is the page itself: one self-contained HTML document (no
external assets) that polls ``dashboard.json`` every second with ``fetch()``.

Rules: per record, a few attribute reads, one ``bisect`` and some integer increments, no clock
read (the record's end time is the loop's) and no allocation beyond one small tuple and a slot
reset once a second; never imports ``io`` (the composition root passes a callable for the cluster
snapshots); never keeps a query string, header, cookie or body.
"""

from __future__ import annotations

import bisect
import collections
from collections.abc import Callable, Mapping, Sequence

from meshproxy.core.record import RequestRecord

ClusterSnapshots = Callable[[], Sequence[Mapping[str, object]]]

# Latency bucket upper bounds in milliseconds: four per doubling (each about 19% wider than the
# last) from 0.1 ms to about 3 minutes; a percentile is interpolated inside its bucket.
_BOUNDS_MS: tuple[float, ...] = tuple(0.1 * 2 ** (i / 4) for i in range(84))
_BUCKETS = len(_BOUNDS_MS) + 1  # the last one is the overflow bucket
_PATH_MAX = 96
_NO_CLUSTER = "(no cluster)"  # local replies before a cluster was chosen (NR, DPE, ...)
_OTHER = "(other)"  # destinations beyond max_destinations share one series
_MAX_CLUSTERS = 100
_MAX_ENDPOINTS = 50


class _Series:
    """One destination's counters: totals since start and one-second slots in a ring."""

    __slots__ = ("counts", "direction", "errors", "hist", "seconds", "total", "total_errors")

    def __init__(self, direction: str, slots: int) -> None:
        self.direction = direction
        self.total = 0
        self.total_errors = 0
        self.seconds = [-1] * slots  # which second each slot currently counts
        self.counts = [0] * slots
        self.errors = [0] * slots
        self.hist = [[0] * _BUCKETS for _ in range(slots)]


def _percentile(hist: Sequence[int], count: int, q: float) -> float | None:
    if count <= 0:
        return None
    rank = q * count
    seen = 0
    for i, n in enumerate(hist):
        if n and seen + n >= rank:
            lower = _BOUNDS_MS[i - 1] if i > 0 else 0.0
            upper = _BOUNDS_MS[i] if i < len(_BOUNDS_MS) else _BOUNDS_MS[-1]
            return round(lower + (upper - lower) * ((rank - seen) / n), 2)
        seen += n
    return round(_BOUNDS_MS[-1], 2)


class Dashboard:
    """The record sink (``record``) and the snapshot the admin page polls (``snapshot``)."""

    __slots__ = (
        "_clock",
        "_clusters",
        "_max_destinations",
        "_recent",
        "_series",
        "_since",
        "_slots",
        "window",
    )

    def __init__(
        self,
        clusters: ClusterSnapshots,
        clock: Callable[[], float],
        *,
        window: int = 10,
        recent: int = 50,
        max_destinations: int = 64,
    ) -> None:
        self._clusters = clusters
        self._clock = clock
        self.window = max(1, window)
        # One slot more than the window, so the slot being reused is never one still counted.
        self._slots = self.window + 1
        self._max_destinations = max_destinations
        self._series: dict[str, _Series] = {}
        # (end, direction, method, path, status, flags, duration ms, destination, upstream host)
        self._recent: collections.deque[tuple[float, str, str, str, int, str, float, str, str]] = (
            collections.deque(maxlen=max(1, recent))
        )
        self._since = clock()

    # -- per request (event loop) ------------------------------------------------------------
    def record(self, record: RequestRecord) -> None:
        """The record sink."""
        start = record.start
        end = record.end or start
        ms = (end - start) * 1000.0
        code = record.response_code
        # Istio's dashboards count 5xx as errors; 0 is a request that got no response (DC, ...).
        error = code >= 500 or code == 0
        name = record.cluster or _NO_CLUSTER
        series = self._series.get(name)
        if series is None:
            series = self._new_series(name, record.direction.value)
        second = int(end)
        i = second % self._slots
        if series.seconds[i] != second:
            series.seconds[i] = second
            series.counts[i] = 0
            series.errors[i] = 0
            series.hist[i] = [0] * _BUCKETS
        series.counts[i] += 1
        series.total += 1
        if error:
            series.errors[i] += 1
            series.total_errors += 1
        series.hist[i][bisect.bisect_left(_BOUNDS_MS, ms)] += 1
        path = record.path
        cut = path.find("?")
        if cut >= 0:
            path = path[:cut]  # a query string may carry tokens: never kept
        if len(path) > _PATH_MAX:
            path = path[:_PATH_MAX] + "…"
        self._recent.append(
            (
                end,
                record.direction.value,
                record.method,
                path,
                code,
                record.flags_text,
                ms,
                name,
                record.upstream_host,
            )
        )

    def _new_series(self, name: str, direction: str) -> _Series:
        if len(self._series) >= self._max_destinations:  # bounded: the rest share one series
            other = self._series.get(_OTHER)
            if other is None:
                other = self._series[_OTHER] = _Series("-", self._slots)
            return other
        series = self._series[name] = _Series(direction, self._slots)
        return series

    # -- per poll (admin) --------------------------------------------------------------------
    def snapshot(self) -> dict[str, object]:
        """What ``GET /dashboard.json`` serves; computed now, from the slots in the window."""
        now = self._clock()
        current = int(now)
        oldest = current - self.window + 1
        # Before the proxy has run a whole window, rates are over the time it has run.
        span = min(float(self.window), max(1.0, now - self._since))
        rows: list[tuple[float, str, dict[str, object]]] = []
        all_hist = [0] * _BUCKETS
        all_count = all_errors = all_total = all_total_errors = 0
        for name, series in self._series.items():
            hist = [0] * _BUCKETS
            count = errors = 0
            for i, second in enumerate(series.seconds):
                if oldest <= second <= current:
                    count += series.counts[i]
                    errors += series.errors[i]
                    for b, n in enumerate(series.hist[i]):
                        if n:
                            hist[b] += n
            for b, n in enumerate(hist):
                all_hist[b] += n
            all_count += count
            all_errors += errors
            all_total += series.total
            all_total_errors += series.total_errors
            row: dict[str, object] = {"name": name, "direction": series.direction}
            row |= _rates(hist, count, errors, span)
            row |= {"total": series.total, "total_errors": series.total_errors}
            rows.append((-count, name, row))
        rows.sort(key=lambda r: (r[0], r[1]))  # busiest first, then by name
        recent = [
            {
                "ago_s": round(max(0.0, now - end), 1),
                "direction": direction,
                "method": method or "-",
                "path": path or "-",
                "status": status,
                "flags": flags,
                "duration_ms": round(ms, 1),
                "destination": dest,
                "upstream_host": host or "-",
            }
            for end, direction, method, path, status, flags, ms, dest, host in reversed(
                self._recent
            )
        ]
        return {
            "window_seconds": self.window,
            "totals": _rates(all_hist, all_count, all_errors, span)
            | {"total": all_total, "total_errors": all_total_errors},
            "destinations": [row for _, _, row in rows],
            "clusters": _cluster_summaries(self._clusters()),
            "recent": recent,
        }


def _rates(hist: Sequence[int], count: int, errors: int, span: float) -> dict[str, object]:
    return {
        "rps": round(count / span, 2),
        "error_rate": round(errors / count, 4) if count else 0.0,
        "requests": count,
        "errors": errors,
        "p50_ms": _percentile(hist, count, 0.50),
        "p90_ms": _percentile(hist, count, 0.90),
        "p99_ms": _percentile(hist, count, 0.99),
    }


def _int(value: object) -> int:
    return value if isinstance(value, int) else 0


def _cluster_summaries(snaps: Sequence[Mapping[str, object]]) -> list[dict[str, object]]:
    """One entry per cluster name (passthrough destinations share a name), at most 100."""
    out: dict[str, dict[str, object]] = {}
    for snap in snaps:
        summary = _cluster_summary(snap)
        name = str(summary["name"])
        seen = out.get(name)
        if seen is None:
            if len(out) < _MAX_CLUSTERS:
                out[name] = summary
            continue
        for key in ("retries", "timeouts", "overflows", "ejections", "more_endpoints"):
            seen[key] = _int(seen[key]) + _int(summary[key])
        endpoints = [*_list(seen["endpoints"]), *_list(summary["endpoints"])]
        seen["endpoints"] = endpoints[:_MAX_ENDPOINTS]
        seen["more_endpoints"] = _int(seen["more_endpoints"]) + max(
            0, len(endpoints) - _MAX_ENDPOINTS
        )
    return list(out.values())


def _list(value: object) -> list[object]:
    return value if isinstance(value, list) else []


def _cluster_summary(snap: Mapping[str, object]) -> dict[str, object]:
    """The parts of a ``ClusterState.snapshot`` the page shows, bounded in endpoints."""
    raw = snap.get("endpoints")
    endpoints = [e for e in raw if isinstance(e, Mapping)] if isinstance(raw, list) else []
    outlier = snap.get("outlier_detection")
    limits = snap.get("limits")
    overflows = 0
    if isinstance(limits, Mapping):
        overflows = sum(_int(v) for k, v in limits.items() if str(k).startswith("overflow_"))
    return {
        "name": str(snap.get("name", "")),
        "retries": _int(snap.get("retries")),
        "timeouts": _int(snap.get("timeouts")),
        "overflows": overflows,
        "ejections": _int(outlier.get("ejections_total")) if isinstance(outlier, Mapping) else 0,
        "endpoints": [
            {
                "address": str(e.get("address", "")),
                "health": str(e.get("health", "unknown")),
                "returns_in_seconds": e.get("returns_in_seconds"),
                "active_requests": _int(e.get("active_requests")),
                "total_requests": _int(e.get("total_requests")),
                "connect_failures": _int(e.get("connect_failures")),
            }
            for e in endpoints[:_MAX_ENDPOINTS]
        ],
        "more_endpoints": max(0, len(endpoints) - _MAX_ENDPOINTS),
    }


# The admin page. Every value from the proxy goes in with textContent, never innerHTML: paths and
# cluster names are request data.
PAGE = b"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>meshproxy</title>
<style>
  :root { --fg: #1d2330; --muted: #6b7385; --line: #e3e6ec; --bg: #f6f7f9; --card: #fff;
          --ok: #1f8f4e; --bad: #c62f2f; --warn: #b8740a; }
  * { box-sizing: border-box; }
  body { margin: 0; font: 14px/1.4 system-ui, -apple-system, "Segoe UI", sans-serif;
         color: var(--fg); background: var(--bg); }
  header { display: flex; align-items: baseline; gap: 1rem; padding: .8rem 1.2rem;
           background: #1d2330; color: #fff; }
  header h1 { font-size: 1.1rem; margin: 0; }
  header .sub { color: #aab3c5; }
  #status { margin-left: auto; font-size: .85rem; }
  #status.live::before { content: "\\25CF "; color: #3ccf7a; }
  #status.offline::before { content: "\\25CF "; color: #ff6b6b; }
  main { padding: 1rem 1.2rem; display: grid; gap: 1rem; }
  .cards { display: grid; grid-template-columns: repeat(auto-fit, minmax(150px, 1fr)); gap: .8rem; }
  .card { background: var(--card); border: 1px solid var(--line); border-radius: 6px;
          padding: .7rem .9rem; }
  .card .label { color: var(--muted); font-size: .8rem; text-transform: uppercase; }
  .card .value { font-size: 1.6rem; font-variant-numeric: tabular-nums; }
  section { background: var(--card); border: 1px solid var(--line); border-radius: 6px;
            padding: .6rem .9rem; overflow-x: auto; }
  h2 { font-size: .95rem; margin: .2rem 0 .5rem; }
  table { border-collapse: collapse; width: 100%; font-variant-numeric: tabular-nums; }
  th, td { text-align: left; padding: .25rem .6rem .25rem 0; border-bottom: 1px solid var(--line);
           white-space: nowrap; }
  th { color: var(--muted); font-weight: 600; font-size: .8rem; }
  td.num, th.num { text-align: right; }
  .empty { color: var(--muted); }
  .bad { color: var(--bad); font-weight: 600; }
  .ok { color: var(--ok); }
  .warn { color: var(--warn); font-weight: 600; }
  .badge { display: inline-block; padding: 0 .45rem; border-radius: 9px; font-size: .8rem;
           color: #fff; background: var(--ok); }
  .badge.ejected { background: var(--bad); }
  .path { max-width: 28rem; overflow: hidden; text-overflow: ellipsis; }
</style>
</head>
<body data-polls="0">
<header>
  <h1>meshproxy</h1><span class="sub" id="node"></span>
  <span id="status">connecting&hellip;</span>
</header>
<main>
  <div class="cards">
    <div class="card"><div class="label">Requests/s</div><div class="value" id="rps">-</div></div>
    <div class="card"><div class="label">Error rate</div><div class="value" id="error-rate">-</div></div>
    <div class="card"><div class="label">p50 latency</div><div class="value" id="p50">-</div></div>
    <div class="card"><div class="label">p99 latency</div><div class="value" id="p99">-</div></div>
    <div class="card"><div class="label">Requests since start</div>
      <div class="value" id="total">-</div></div>
  </div>
  <section>
    <h2>Destinations <span class="sub" id="window"></span></h2>
    <table id="destinations"><thead><tr><th>Destination</th><th>Direction</th>
      <th class="num">Req/s</th><th class="num">Errors</th><th class="num">p50 ms</th>
      <th class="num">p90 ms</th><th class="num">p99 ms</th><th class="num">In window</th>
      <th class="num">Total</th></tr></thead><tbody></tbody></table>
  </section>
  <section>
    <h2>Clusters</h2>
    <table id="clusters"><thead><tr><th>Cluster</th><th>Endpoint</th><th>Health</th>
      <th class="num">Active</th><th class="num">Requests</th><th class="num">Connect failures</th>
      <th class="num">Retries</th><th class="num">Timeouts</th><th class="num">Overflows</th>
      <th class="num">Ejections</th></tr></thead><tbody></tbody></table>
  </section>
  <section>
    <h2>Recent requests</h2>
    <table id="recent"><thead><tr><th class="num">Ago</th><th>Direction</th><th>Method</th>
      <th>Path</th><th class="num">Status</th><th>Flags</th><th class="num">ms</th>
      <th>Destination</th><th>Upstream host</th></tr></thead><tbody></tbody></table>
  </section>
</main>
<script>
"use strict";
const $ = (id) => document.getElementById(id);
const ms = (v) => (v === null || v === undefined) ? "-" : String(v);
const pct = (v) => (100 * v).toFixed(1) + "%";

function cell(row, text, cls) {
  const td = document.createElement("td");
  td.textContent = text;
  if (cls) td.className = cls;
  row.appendChild(td);
  return td;
}

function fill(table, items, build, emptyText) {
  const body = document.createElement("tbody");
  if (items.length === 0) {
    const row = body.insertRow();
    const td = cell(row, emptyText, "empty");
    td.colSpan = table.tHead.rows[0].cells.length;
  }
  for (const item of items) build(body.insertRow(), item);
  table.replaceChild(body, table.tBodies[0]);
}

function render(d) {
  const t = d.totals;
  $("rps").textContent = t.rps.toFixed(2);
  $("error-rate").textContent = pct(t.error_rate);
  $("error-rate").className = "value" + (t.error_rate > 0 ? " bad" : "");
  $("p50").textContent = t.p50_ms === null ? "-" : t.p50_ms + " ms";
  $("p99").textContent = t.p99_ms === null ? "-" : t.p99_ms + " ms";
  $("total").textContent = String(t.total);
  $("window").textContent = "(last " + d.window_seconds + " s)";
  if (d.server) $("node").textContent = d.server.node + " \\u00b7 " + d.server.state;
  fill($("destinations"), d.destinations, (row, x) => {
    row.dataset.destination = x.name;
    cell(row, x.name);
    cell(row, x.direction);
    cell(row, x.rps.toFixed(2), "num rps");
    cell(row, pct(x.error_rate), "num error-rate" + (x.error_rate > 0 ? " bad" : ""));
    cell(row, ms(x.p50_ms), "num");
    cell(row, ms(x.p90_ms), "num");
    cell(row, ms(x.p99_ms), "num");
    cell(row, String(x.requests), "num requests");
    cell(row, String(x.total), "num total");
  }, "no requests yet");
  const eps = [];
  for (const c of d.clusters) {
    const list = c.endpoints.length ? c.endpoints : [null];
    list.forEach((e, i) => eps.push({c, e, first: i === 0}));
  }
  fill($("clusters"), eps, (row, {c, e, first}) => {
    row.dataset.cluster = c.name;
    cell(row, first ? c.name : "");
    if (e === null) { cell(row, "(no endpoints)", "empty"); cell(row, ""); }
    else {
      cell(row, e.address);
      const td = cell(row, "");
      const badge = document.createElement("span");
      badge.className = "badge " + e.health;
      badge.textContent = e.health + (e.returns_in_seconds ? " (" + e.returns_in_seconds + " s)" : "");
      td.appendChild(badge);
    }
    cell(row, e ? String(e.active_requests) : "", "num");
    cell(row, e ? String(e.total_requests) : "", "num");
    cell(row, e ? String(e.connect_failures) : "", "num" + (e && e.connect_failures ? " warn" : ""));
    cell(row, first ? String(c.retries) : "", "num");
    cell(row, first ? String(c.timeouts) : "", "num");
    cell(row, first ? String(c.overflows) : "", "num");
    cell(row, first ? String(c.ejections) : "", "num");
  }, "no clusters");
  fill($("recent"), d.recent, (row, r) => {
    cell(row, r.ago_s.toFixed(1) + " s", "num");
    cell(row, r.direction);
    cell(row, r.method);
    cell(row, r.path, "path");
    cell(row, String(r.status), "num status" + (r.status >= 500 || r.status === 0 ? " bad"
      : r.status >= 400 ? " warn" : " ok"));
    cell(row, r.flags, "flags" + (r.flags !== "-" ? " bad" : ""));
    cell(row, r.duration_ms.toFixed(1), "num");
    cell(row, r.destination);
    cell(row, r.upstream_host);
  }, "no requests yet");
}

let polls = 0;
async function poll() {
  try {
    const response = await fetch("dashboard.json", {cache: "no-store"});
    if (!response.ok) throw new Error("HTTP " + response.status);
    render(await response.json());
    polls += 1;
    document.body.dataset.polls = String(polls);
    $("status").textContent = "live";
    $("status").className = "live";
  } catch (err) {
    $("status").textContent = "offline: " + err.message;
    $("status").className = "offline";
  }
}
poll();
setInterval(poll, 1000);
</script>
</body>
</html>
"""

"""The command line: ``meshproxy run``, ``wait``, ``validate``, ``route``, ``iptables``, ``ca`` and
``demo``.

Owns argument parsing, logging set-up (the only place handlers are configured) and the process
exit codes: 0 on a clean exit or drain, 1 on invalid configuration, 2 on usage errors, 3 when a
listener cannot bind, 4 when ``iptables --apply`` finds iptables missing or refusing the rules, or
when this workload's certificate cannot be loaded. ``run`` watches its config files and reloads
them on change or SIGHUP, printing one line per reload; ``wait`` exits 0 once a proxy's /ready
answers 200 and 1 at its timeout. ``validate`` prints the configuration's warnings
(``core/explain.py`` ``lint``) on stderr after its summary and still exits 0; ``route`` explains
where a request would go without sending it; ``ca init`` and ``ca issue`` run the development CA
(``io/ca.py``).

Rules: thin; everything it does is a call into ``app``, ``workers``, ``config`` or ``io`` (``ca``,
``capture``; ``iptables`` builds its rules in ``core/capture.py``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

from meshproxy import __version__
from meshproxy.app import App, ReloadResult
from meshproxy.config.load import load_paths, parse_duration, parse_host_port
from meshproxy.config.model import AccessLogFormat, MeshConfig
from meshproxy.core.capture import (
    INBOUND_PORT,
    OUTBOUND_PORT,
    PROXY_UID,
    RESERVED_INBOUND_PORTS,
    CaptureSpec,
    Family,
    parse_exclude_ips,
    parse_inbound_ports,
    parse_include_ips,
    parse_owners,
    parse_ports,
    restore_text,
)
from meshproxy.core.routetable import RouteTable
from meshproxy.core.routing import HostTable
from meshproxy.errors import CertificateError, ConfigError
from meshproxy.io.capture import IptablesError, apply_rules
from meshproxy.io.loop import loop_factory
from meshproxy.io.wait import wait_ready
from meshproxy.workers import (
    Supervisor,
    as_worker,
    follow_supervisor,
    worker_config,
    worker_count,
)

log = logging.getLogger("meshproxy")


def _config_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "-c",
        "--config",
        action="append",
        required=True,
        metavar="PATH",
        help="a YAML file or a directory of them; repeat for more",
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="meshproxy", description=__doc__)
    parser.add_argument("--version", action="version", version=f"meshproxy {__version__}")
    parser.add_argument(
        "--log-level",
        default=None,
        choices=["debug", "info", "warning", "error"],
        help="default: info (warning for demo, whose output is its table)",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run the proxy on a configuration")
    _config_option(run)
    run.add_argument(
        "--access-log",
        metavar="FILE",
        help="write Envoy-format access log lines to FILE ('-' for stdout); without it, a "
        "Telemetry resource's accessLogging or spec.telemetry.accessLog turns them on",
    )
    run.add_argument(
        "--access-log-format",
        choices=[f.value for f in AccessLogFormat],
        default=None,
        help="text (Envoy's default format) or json; default: spec.telemetry.accessLog.format",
    )
    run.add_argument(
        "--workers",
        type=int,
        default=None,
        metavar="N",
        help="worker processes sharing the listeners through SO_REUSEPORT (0: one per usable "
        "core); default: spec.workers (1)",
    )

    wait = sub.add_parser(
        "wait",
        help="block until a proxy is ready (GET /ready answers 200)",
        description="Poll the admin address's /ready until it answers 200: exit 0 when ready, "
        "1 at the timeout (saying what it last saw), 2 on a usage error. For a postStart hook "
        "or an app container's entrypoint (Istio's `pilot-agent wait`).",
    )
    wait.add_argument(
        "--admin",
        default="127.0.0.1:15000",
        metavar="HOST:PORT",
        help="the proxy's admin address (default: 127.0.0.1:15000)",
    )
    wait.add_argument(
        "--timeout", default="60s", metavar="DURATION", help="e.g. 500ms, 30s, 2m (default 60s)"
    )

    validate = sub.add_parser("validate", help="check a configuration and exit")
    _config_option(validate)

    route = sub.add_parser(
        "route",
        help="explain where a request would go, without sending it",
        description="Explain which VirtualService rule, destinations and endpoints a request "
        "would get, and why each earlier rule did not match. Nothing is sent.",
    )
    _config_option(route)
    route.add_argument(
        "-H",
        "--header",
        action="append",
        default=[],
        metavar="'NAME: VALUE'",
        help="a request header; repeat for more (a host header overrides the URL's authority)",
    )
    route.add_argument(
        "-X", "--request", dest="method", default="GET", metavar="METHOD", help="default GET"
    )
    route.add_argument("--json", action="store_true", help="print the explanation as JSON")
    route.add_argument("url", metavar="URL", help="e.g. http://reviews:9080/reviews/1?x=1")

    _iptables_parser(sub)

    demo = sub.add_parser("demo", help="run a local bookinfo mesh and show the canary routing")
    demo.add_argument(
        "--requests",
        type=int,
        default=3,
        help="requests to send as each user (anonymous and test-user)",
    )
    demo.add_argument(
        "--ports",
        choices=["fixed", "auto"],
        default="fixed",
        help="fixed: the ports in the bundled YAML (free ones if taken); auto: always free ports",
    )
    demo.add_argument(
        "--serve",
        action="store_true",
        help="keep the mesh running after the requests, with access logs (Ctrl-C stops)",
    )
    _ca_parser(sub)
    return parser


def _ca_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    ca = sub.add_parser(
        "ca",
        help="a development CA: create one, issue workload certificates from it",
        description="A development certificate authority for mTLS between meshproxy sidecars "
        "(Istio-style SPIFFE certificates). Not for production keys.",
    )
    ca_sub = ca.add_subparsers(dest="ca_command", required=True)
    init = ca_sub.add_parser("init", help="create a root CA (ca.pem, ca-key.pem) in a directory")
    init.add_argument("--dir", required=True, type=Path, metavar="DIR")
    init.add_argument(
        "--trust-domain",
        default="cluster.local",
        help="the SPIFFE trust domain (default: %(default)s)",
    )
    init.add_argument("--force", action="store_true", help="replace a CA already in DIR")
    issue = ca_sub.add_parser(
        "issue",
        help="issue a workload certificate spiffe://<trust domain>/ns/<NS>/sa/<SA>",
    )
    issue.add_argument("--dir", required=True, type=Path, metavar="DIR", help="the CA directory")
    issue.add_argument("--namespace", required=True, metavar="NS")
    issue.add_argument("--service-account", required=True, metavar="SA")
    issue.add_argument(
        "--ttl", default="24h", help="certificate lifetime, e.g. 24h, 90m, 3600s (default: 24h)"
    )
    issue.add_argument("--out", required=True, type=Path, metavar="OUTDIR")
    issue.add_argument("--cert-name", default="cert.pem", metavar="NAME")
    issue.add_argument("--key-name", default="key.pem", metavar="NAME")
    issue.add_argument("--ca-name", default="ca.pem", metavar="NAME")


def _iptables_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    ipt = sub.add_parser(
        "iptables",
        help="write the nat rules that capture the app's traffic (Istio's istio-iptables)",
        description="Print or apply the iptables nat rules that send the app's outbound TCP to "
        "the outbound listener and inbound TCP to the inbound listener, never capturing the "
        "proxy's own traffic (matched by uid/gid), as Istio's init container does. Defaults "
        "are the sidecar injector's: -p 15001 -z 15006 -u 1337 -b '*' -i '*' "
        "-d 15090,15021,15020.",
    )
    mode = ipt.add_mutually_exclusive_group(required=True)
    mode.add_argument("--print", action="store_true", help="print the iptables-restore input")
    mode.add_argument(
        "--apply", action="store_true", help="feed it to iptables-restore --noflush (root)"
    )
    ipt.add_argument("--proxy-uid", default=PROXY_UID, metavar="UIDS", help="default 1337")
    ipt.add_argument("--proxy-gid", default=None, metavar="GIDS", help="default: the uids")
    ipt.add_argument("--outbound-port", type=int, default=OUTBOUND_PORT, help="default 15001")
    ipt.add_argument("--inbound-port", type=int, default=INBOUND_PORT, help="default 15006")
    ipt.add_argument(
        "--inbound-ports",
        default="*",
        metavar="PORTS",
        help="'*' (default) or a port list to capture inbound; '' captures none",
    )
    ipt.add_argument(
        "--exclude-inbound-ports",
        default="",
        metavar="PORTS",
        help="with '*': ports not captured, after 15090,15021,15020 (always excluded, as the "
        "injector's -d)",
    )
    ipt.add_argument("--exclude-outbound-ports", default="", metavar="PORTS")
    ipt.add_argument(
        "--include-outbound-ips", default="*", metavar="CIDRS", help="'*' (default) or CIDRs"
    )
    ipt.add_argument("--exclude-outbound-ips", default="", metavar="CIDRS")
    ipt.add_argument(
        "--ipv6", action="store_true", help="also write the ip6tables rules (ip6tables-restore)"
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=getattr(
            logging, (args.log_level or ("warning" if args.command == "demo" else "info")).upper()
        ),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if args.command == "validate":
        return _validate(args.config)
    if args.command == "route":
        headers = _headers(args.header)
        if headers is None:
            print(f"meshproxy route: bad header in {args.header!r}", file=sys.stderr)
            print("expected -H 'name: value'", file=sys.stderr)
            return 2
        return _route(args.config, args.method, args.url, headers, as_json=args.json)
    if args.command == "run":
        fmt = AccessLogFormat(args.access_log_format) if args.access_log_format else None
        return _run(args.config, args.access_log, fmt, args.workers)
    if args.command == "wait":
        return _wait(args.admin, args.timeout)
    if args.command == "ca":
        return _ca(args)
    if args.command == "iptables":
        return _iptables(args)
    if args.command == "demo":
        from meshproxy.examples.demo import run_demo

        return run_demo(requests=args.requests, serve=args.serve, ports=args.ports)
    return 2


def _load(paths: list[str]) -> tuple[MeshConfig, HostTable, RouteTable] | None:
    """The configuration and the tables built from it, or None after printing its errors."""
    try:
        config = load_paths(paths)
    except ConfigError as exc:
        for issue in exc.issues:
            print(issue, file=sys.stderr)
        print(f"{len(exc.issues)} error(s)", file=sys.stderr)
        return None
    try:
        hosts = HostTable(config)
        routes = RouteTable(config, hosts)
    except ValueError as exc:  # validation should have caught it; say so rather than crash
        print(f"error: {exc}", file=sys.stderr)
        print("1 error(s)", file=sys.stderr)
        return None
    return config, hosts, routes


def _headers(values: list[str]) -> dict[str, str] | None:
    """``-H 'name: value'`` options as one map; repeated names are comma-joined (RFC 9110 §5.3)."""
    out: dict[str, str] = {}
    for item in values:
        name, sep, value = item.partition(":")
        name = name.strip().lower()
        if not sep or not name or any(c in name for c in " \t"):
            return None
        value = value.strip()
        out[name] = f"{out[name]},{value}" if name in out else value
    return out


def _route(
    paths: list[str], method: str, url: str, headers: dict[str, str], *, as_json: bool
) -> int:
    loaded = _load(paths)
    if loaded is None:
        return 1
    _, hosts, routes = loaded
    from meshproxy.core.explain import explain_request, to_json, to_text  # not needed by `run`

    try:
        expl = explain_request(hosts, routes, method=method, url=url, headers=headers)
    except ValueError as exc:
        print(f"meshproxy route: {exc}", file=sys.stderr)
        return 2
    if as_json:
        print(json.dumps(to_json(expl), indent=2))
    else:
        print(to_text(expl), end="")
    return 0


def _capture_spec(args: argparse.Namespace) -> CaptureSpec:
    """The options as a CaptureSpec; ``ValueError`` names the bad option."""
    uids = parse_owners("--proxy-uid", args.proxy_uid)
    gids = parse_owners("--proxy-gid", args.proxy_gid) if args.proxy_gid is not None else uids
    for option, port in (
        ("--outbound-port", args.outbound_port),
        ("--inbound-port", args.inbound_port),
    ):
        if not 0 < port < 65536:
            raise ValueError(f"{option}: {port} is not a port (1-65535)")
    extra = parse_ports("--exclude-inbound-ports", args.exclude_inbound_ports)
    return CaptureSpec(
        proxy_uids=uids,
        proxy_gids=gids,
        outbound_port=args.outbound_port,
        inbound_port=args.inbound_port,
        inbound_ports=parse_inbound_ports(args.inbound_ports),
        exclude_inbound_ports=tuple(dict.fromkeys((*RESERVED_INBOUND_PORTS, *extra))),
        exclude_outbound_ports=parse_ports("--exclude-outbound-ports", args.exclude_outbound_ports),
        include_outbound_ips=parse_include_ips(args.include_outbound_ips),
        exclude_outbound_ips=parse_exclude_ips(args.exclude_outbound_ips),
    )


def _iptables(args: argparse.Namespace) -> int:
    try:
        spec = _capture_spec(args)
    except ValueError as exc:
        print(f"meshproxy iptables: {exc}", file=sys.stderr)
        return 2
    families = (Family.IPV4, Family.IPV6) if args.ipv6 else (Family.IPV4,)
    if args.print:
        for family in families:
            tool = "iptables-restore" if family is Family.IPV4 else "ip6tables-restore"
            print(f"# {tool} --noflush", flush=True)
            print(restore_text(spec, family), end="", flush=True)
        return 0
    for family in families:
        try:
            apply_rules(restore_text(spec, family), family)
        except IptablesError as exc:
            print(f"meshproxy iptables: {exc}", file=sys.stderr)
            return 4
    log.info("capture rules applied (%s)", ", ".join(f"IPv{int(f)}" for f in families))
    return 0


def _validate(paths: list[str]) -> int:
    loaded = _load(paths)
    if loaded is None:
        return 1
    config, hosts, routes = loaded
    print(
        f"ok: {len(config.sources)} file(s), {len(config.service_entries)} ServiceEntry, "
        f"{len(config.virtual_services)} VirtualService, "
        f"{len(config.destination_rules)} DestinationRule, bootstrap "
        f"{config.bootstrap.metadata.name}.{config.bootstrap.metadata.namespace}",
        flush=True,
    )
    # Warnings go to stderr so the summary stays one line for scripts; they never fail validate.
    from meshproxy.core.explain import lint  # imported here: `run` does not need it

    warnings = lint(config, hosts, routes)
    for warning in warnings:
        print(f"warning: {warning}", file=sys.stderr)
    if warnings:
        print(f"{len(warnings)} warning(s)", file=sys.stderr)
    return 0


def _run(
    paths: list[str],
    access_log: str | None,
    fmt: AccessLogFormat | None = None,
    workers: int | None = None,
) -> int:
    try:
        config = load_paths(paths)
    except ConfigError as exc:
        for issue in exc.issues:
            print(issue, file=sys.stderr)
        print(f"refusing to start: {len(exc.issues)} configuration error(s)", file=sys.stderr)
        return 1
    worker = as_worker(os.environ)
    if worker is not None:
        if not follow_supervisor(os.environ):
            print("meshproxy worker: its supervisor is gone; not starting", file=sys.stderr)
            return 1
        config = worker_config(config, os.environ)
    else:
        count = worker_count(workers if workers is not None else config.bootstrap.spec.workers)
        if count > 1:
            extra = []
            if access_log:
                extra += ["--access-log", access_log]
            if fmt is not None:
                extra += ["--access-log-format", fmt.value]
            with asyncio.Runner(loop_factory=loop_factory) as runner:
                return runner.run(_supervise(config, paths, count, extra))
    out: TextIO | None = None
    if access_log == "-":
        out = sys.stdout
    elif access_log:
        out = open(access_log, "a", encoding="utf-8")  # noqa: SIM115 - closed below
    try:
        with asyncio.Runner(loop_factory=loop_factory) as runner:
            return runner.run(_serve(config, out, fmt, paths, worker))
    finally:
        if out is not None and out is not sys.stdout:
            out.close()


async def _supervise(config: MeshConfig, paths: list[str], count: int, extra: list[str]) -> int:
    supervisor = Supervisor(config, paths, count, extra)
    try:
        await supervisor.start()
    except (OSError, RuntimeError, TimeoutError) as exc:
        print(f"cannot start {count} workers: {exc}", file=sys.stderr)
        return 3
    supervisor.install_signal_handlers()
    admin = supervisor.admin
    assert admin is not None
    log.info("%d workers ready", count)
    health = supervisor.health
    print(
        f"meshproxy ready: {supervisor.listeners_text} admin={admin.address.host}:{admin.port}"
        + (f" health={health.address.host}:{health.port}" if health is not None else ""),
        flush=True,
    )
    try:
        return await supervisor.wait()
    finally:
        await supervisor.close()


async def _serve(
    config: MeshConfig,
    access_log: TextIO | None,
    fmt: AccessLogFormat | None = None,
    paths: Sequence[str] = (),
    worker: tuple[int, int] | None = None,
) -> int:
    # The access log's lines are written by a thread; App.close flushes it before ``out`` closes.
    # The config files are watched and re-read on SIGHUP; each reload's outcome is one line.
    app = App(
        config,
        access_log=access_log,
        access_log_format=fmt,
        config_paths=paths,
        worker=worker,
    )
    app.on_reload = lambda result: _print_reload(app, result)
    try:
        await app.start()
    except OSError as exc:
        print(f"cannot listen: {exc}", file=sys.stderr)
        return 3
    except CertificateError as exc:
        print(f"cannot load this workload's certificate: {exc}", file=sys.stderr)
        return 4
    app.install_signal_handlers()
    print("meshproxy ready: " + _addresses(app), flush=True)
    try:
        await app.wait_stopped()
    finally:
        await app.close()
    log.info("stopped")
    return 0


def _ca(args: argparse.Namespace) -> int:
    """``meshproxy ca init|issue``: every problem (no CA, bad TTL or name, unwritable directory)
    is a usage error, exit 2, one line on stderr."""
    from meshproxy.io import ca  # cryptography: only for the commands that need it

    try:
        if args.ca_command == "init":
            path = ca.init_ca(args.dir, args.trust_domain, force=args.force)
            print(
                f"created CA {path} (key {args.dir / ca.CA_KEY}, trust domain {args.trust_domain})"
            )
            return 0
        ttl = parse_duration(args.ttl)
        files = ca.issue(
            args.dir,
            args.namespace,
            args.service_account,
            ttl=ttl,
            out=args.out,
            cert_name=args.cert_name,
            key_name=args.key_name,
            ca_name=args.ca_name,
        )
    except (CertificateError, ValueError, OSError) as exc:
        print(f"meshproxy ca {args.ca_command}: {exc}", file=sys.stderr)
        return 2
    print(
        f"issued {files.info.spiffe_id} valid until {files.info.not_after.isoformat()}: "
        f"{files.cert} {files.key} {files.ca}"
    )
    return 0


def _addresses(app: App) -> str:
    parts = [f"{name}={lst.address.host}:{lst.port}" for name, lst in app.listeners.items()]
    if app.admin is not None:
        parts.append(f"admin={app.admin.address.host}:{app.admin.port}")
    if app.health is not None:
        parts.append(f"health={app.health.address.host}:{app.health.port}")
    return " ".join(parts)


def _print_reload(app: App, result: ReloadResult) -> None:
    """One stdout line per reload, like the ready line (the errors themselves are logged)."""
    if result.accepted:
        print(f"meshproxy reloaded: version={result.version} {_addresses(app)}", flush=True)
    else:
        print(
            f"meshproxy reload rejected: {len(result.errors)} error(s); "
            f"still serving version={result.version}",
            flush=True,
        )


def _wait(admin: str, timeout: str) -> int:
    try:
        address = parse_host_port(admin)
        seconds = parse_duration(timeout)
    except ValueError as exc:
        print(f"meshproxy wait: {exc}", file=sys.stderr)
        return 2
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        result = runner.run(wait_ready(address, seconds))
    if result.ready:
        print(f"meshproxy wait: ready ({result.last})", flush=True)
        return 0
    print(
        f"meshproxy wait: not ready after {timeout} ({result.tries} tries); "
        f"last saw: {result.last}",
        file=sys.stderr,
    )
    return 1

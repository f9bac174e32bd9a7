"""examples/kubernetes (issue #8 §3), checked offline.

1. Every manifest validates against the Kubernetes OpenAPI schemas of the ``kubernetes-validate``
   package in strict mode (unknown fields are errors), for 1.29 (the first release with native
   sidecars on by default) and for the newest version the installed package ships.
2. Every meshproxy configuration embedded in a ConfigMap is written to a directory laid out as
   the kubelet mounts it and loaded by the real ``meshproxy validate`` CLI.
3. The pieces agree with each other: probes and the bootstrap's health port, the iptables flags
   and the ports and uid, the service account, labels and policy selectors, the certificate
   paths and the CSI volume, the drain and the grace period.
4. The configuration runs: a real ``meshproxy run`` of it (listeners moved to loopback port 0,
   the SPIFFE files replaced by a dev CA's) refuses plaintext, admits productpage's identity
   only, and its peak RSS under mTLS requests stays below the sidecar's memory request.

``meshproxy validate`` does not open ``spec.tls`` files (true today), so the certificate paths,
which exist only inside a pod, are checked against the volume mount and not read.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import kubernetes_validate
import pytest
import yaml
from helpers import upstream
from pki import Pki

from meshproxy.config.load import load_paths
from meshproxy.config.model import MeshConfig, MtlsMode, TLSMode
from meshproxy.core.authz import applies
from meshproxy.core.peerauth import effective_mtls

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "examples" / "kubernetes"
VERSIONS = ["1.29.0", kubernetes_validate.latest_version()]
LOOPBACK = re.compile(r"^(127\.|::1$)")
NAMESPACE = "bookinfo"
SPIFFE_MOUNT = "/var/run/secrets/spiffe.io"


def _manifests() -> Iterator[tuple[str, int, dict[str, Any]]]:
    for path in sorted(K8S.glob("*.yaml")):
        for i, doc in enumerate(yaml.safe_load_all(path.read_text())):
            if doc is not None:
                yield path.name, i, doc


MANIFESTS = list(_manifests())


def _one(kind: str) -> dict[str, Any]:
    found = [d for _, _, d in MANIFESTS if d["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def _pod() -> dict[str, Any]:
    spec: dict[str, Any] = _one("Deployment")["spec"]["template"]["spec"]
    return spec


def _container(name: str) -> dict[str, Any]:
    pod = _pod()
    found = [c for c in pod.get("initContainers", []) + pod["containers"] if c["name"] == name]
    assert len(found) == 1, name
    return found[0]


def _write_configmap(root: Path, data: dict[str, str]) -> None:
    """The kubelet's atomic-writer layout: ``..<stamp>/`` with the files, ``..data`` pointing
    at it, one visible link per key."""
    stamp = root / "..2026_11_26_00_00_00.000000001"
    stamp.mkdir(parents=True)
    for key, text in data.items():
        (stamp / key).write_text(text)
    (root / "..data").symlink_to(stamp.name)
    for key in data:
        (root / key).symlink_to(Path("..data") / key)


@pytest.fixture(scope="module")
def config_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("etc-meshproxy")
    _write_configmap(root, _one("ConfigMap")["data"])
    return root


@pytest.fixture(scope="module")
def config(config_dir: Path) -> MeshConfig:
    return load_paths([config_dir])


# ---------------------------------------------------------------------------------------------
# 1. Schemas


def test_the_example_has_every_piece() -> None:
    kinds = sorted(d["kind"] for _, _, d in MANIFESTS)
    assert kinds == [
        "ConfigMap",
        "Deployment",
        "Namespace",
        "Role",
        "RoleBinding",
        "Service",
        "ServiceAccount",
    ]


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize(
    ("name", "index", "doc"), MANIFESTS, ids=[f"{n}#{i}" for n, i, _ in MANIFESTS]
)
def test_manifest_validates_against_the_kubernetes_schema(
    name: str, index: int, doc: dict[str, Any], version: str
) -> None:
    assert kubernetes_validate.validate(doc, version, strict=True) == version.rsplit(".", 1)[0]


def test_strict_schema_validation_rejects_an_unknown_field() -> None:
    deployment = yaml.safe_load((K8S / "deployment.yaml").read_text())
    deployment["spec"]["template"]["spec"]["initContainers"][1]["restartPolicyy"] = "Always"
    with pytest.raises(kubernetes_validate.ValidationError, match="restartPolicyy"):
        kubernetes_validate.validate(deployment, VERSIONS[0], strict=True)


# ---------------------------------------------------------------------------------------------
# 2. The embedded meshproxy configuration, through the real CLI


def test_embedded_config_passes_meshproxy_validate(config_dir: Path) -> None:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    result = subprocess.run(
        [sys.executable, "-m", "meshproxy", "validate", "-c", str(config_dir)],
        capture_output=True,
        text=True,
        timeout=30,
        env=env,
        cwd=REPO,
    )
    assert result.returncode == 0, result.stderr
    # Four keys, each read once (not again from the hidden ..data copy).
    assert result.stdout.strip() == (
        "ok: 4 file(s), 1 ServiceEntry, 1 VirtualService, 1 DestinationRule, "
        "bootstrap reviews-v2.bookinfo"
    )


def test_embedded_config_has_the_istio_policy_the_readme_describes(config: MeshConfig) -> None:
    (dr,) = config.destination_rules
    assert dr.spec.traffic_policy is not None and dr.spec.traffic_policy.tls is not None
    assert dr.spec.traffic_policy.tls.mode is TLSMode.ISTIO_MUTUAL
    (pa,) = config.peer_authentications
    assert pa.spec.mtls is not None and pa.spec.mtls.mode is MtlsMode.STRICT
    (ap,) = config.authorization_policies
    principals = [p for r in ap.spec.rules for f in r.from_ for p in f.source.principals]
    assert principals == ["cluster.local/ns/bookinfo/sa/bookinfo-productpage"]
    assert len(config.telemetries) == 1


# ---------------------------------------------------------------------------------------------
# 3. The pieces agree


def test_sidecar_is_native_and_starts_after_the_capture() -> None:
    pod = _pod()
    names = [c["name"] for c in pod["initContainers"]]
    assert names == ["iptables", "meshproxy"]
    assert "restartPolicy" not in pod["initContainers"][0]  # runs to completion first
    assert pod["initContainers"][1]["restartPolicy"] == "Always"  # a sidecar
    assert _container("iptables")["image"] == _container("meshproxy")["image"]
    assert all("lifecycle" not in c for c in pod["initContainers"] + pod["containers"])


def test_probes_hit_the_bootstraps_health_port(config: MeshConfig) -> None:
    spec = config.bootstrap.spec
    assert spec.health is not None and spec.health.host == "0.0.0.0"  # the kubelet: pod IP
    assert LOOPBACK.match(spec.admin.host), "the admin (/quitquitquit) stays on loopback"
    sidecar = _container("meshproxy")
    for probe in ("startupProbe", "readinessProbe"):
        get = sidecar[probe]["httpGet"]
        assert (get["path"], get["port"]) == ("/healthz/ready", spec.health.port)
    assert "livenessProbe" not in sidecar  # 503 while draining must not restart it
    ports = {p["containerPort"] for p in sidecar["ports"]}
    assert spec.health.port in ports
    assert spec.admin.port not in ports


def test_capture_flags_match_the_ports_and_the_proxy_uid(config: MeshConfig) -> None:
    spec = config.bootstrap.spec
    args = _container("iptables")["args"]
    assert args[:2] == ["iptables", "--apply"]
    flags = dict(zip(args[2::2], args[3::2], strict=True))
    sidecar_ctx = _container("meshproxy")["securityContext"]
    assert flags["--proxy-uid"] == str(sidecar_ctx["runAsUser"]) == "1337"
    inbound = {int(p) for p in flags["--inbound-ports"].split(",")}
    service_ports = {p["targetPort"] for p in _one("Service")["spec"]["ports"]}
    app_ports = {p["containerPort"] for p in _container("reviews")["ports"]}
    assert inbound == service_ports == app_ports
    assert spec.inbound is not None and spec.inbound.app.port in inbound
    # The probe and scrape ports are not captured (the kubelet and Prometheus speak plaintext).
    assert spec.health is not None and spec.telemetry.prometheus is not None
    assert not inbound & {spec.health.port, spec.telemetry.prometheus.port}
    # The app's own traffic lands on loopback after REDIRECT in OUTPUT: outbound stays private.
    assert spec.outbound is not None and LOOPBACK.match(spec.outbound.address.host)


def test_security_contexts() -> None:
    proxy = _container("meshproxy")["securityContext"]
    assert proxy["runAsUser"] == proxy["runAsGroup"] == 1337
    assert proxy["runAsNonRoot"] is True
    assert proxy["readOnlyRootFilesystem"] is True
    assert proxy["allowPrivilegeEscalation"] is False
    assert proxy["capabilities"] == {"drop": ["ALL"]}
    init = _container("iptables")["securityContext"]
    assert init["runAsUser"] == 0
    assert init["capabilities"] == {"drop": ["ALL"], "add": ["NET_ADMIN", "NET_RAW"]}
    assert init["allowPrivilegeEscalation"] is False and init["privileged"] is False


def test_identity_and_certificates_come_from_the_csi_volume(config: MeshConfig) -> None:
    spec = config.bootstrap.spec
    pod = _pod()
    assert spec.service_account == pod["serviceAccountName"]
    assert spec.service_account == _one("ServiceAccount")["metadata"]["name"]
    assert config.bootstrap.metadata.namespace == _one("Namespace")["metadata"]["name"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["name"]: m for m in _container("meshproxy")["volumeMounts"]}
    csi = volumes["spiffe"]["csi"]
    assert csi["driver"] == "spiffe.csi.cert-manager.io"
    assert csi["volumeAttributes"]["spiffe.csi.cert-manager.io/fs-group"] == "1337"
    mount = Path(mounts["spiffe"]["mountPath"])
    assert mounts["spiffe"]["readOnly"] is True
    tls = spec.tls
    assert tls is not None
    # csi-driver-spiffe's file names (cert-manager/csi-driver-spiffe README).
    assert [Path(p) for p in (tls.cert_chain, tls.private_key, tls.root_cert)] == [
        mount / "tls.crt",
        mount / "tls.key",
        mount / "ca.crt",
    ]
    # True today: validate passed above although these exist only inside the pod.
    assert not Path(tls.cert_chain).exists()
    # The config directory is the ConfigMap, where the image's CMD reads it.
    assert mounts["meshproxy-config"]["mountPath"] == "/etc/meshproxy"
    assert _container("meshproxy")["args"] == ["run", "-c", "/etc/meshproxy"]
    assert volumes["meshproxy-config"]["configMap"]["name"] == _one("ConfigMap")["metadata"]["name"]


def test_policies_select_this_workload(config: MeshConfig) -> None:
    """Selectors match the bootstrap's labels, which must be the pod's labels: otherwise the
    STRICT PeerAuthentication and the AuthorizationPolicy would silently not apply."""
    meta = config.bootstrap.metadata
    assert dict(meta.labels) == _pod_labels()
    assert effective_mtls(config, 9080) is MtlsMode.STRICT
    (ap,) = config.authorization_policies
    assert applies(ap, meta.namespace, meta.labels)
    for tm in config.telemetries:
        assert tm.spec.selector is not None
        assert tm.spec.selector.match_labels.items() <= meta.labels.items()
    # The Service selects the same pods.
    assert _one("Service")["spec"]["selector"].items() <= meta.labels.items()


def _pod_labels() -> dict[str, str]:
    labels: dict[str, str] = _one("Deployment")["spec"]["template"]["metadata"]["labels"]
    return labels


def test_grace_period_covers_the_drain(config: MeshConfig) -> None:
    grace = _pod()["terminationGracePeriodSeconds"]
    assert grace >= config.bootstrap.spec.drain_duration


def _mebibytes(quantity: str) -> float:
    units = {"Ki": 1 / 1024, "Mi": 1.0, "Gi": 1024.0}
    for suffix, scale in units.items():
        if quantity.endswith(suffix):
            return float(quantity[: -len(suffix)]) * scale
    raise ValueError(f"unsupported quantity {quantity!r}")


def _vm(pid: int, field: str) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise KeyError(field)


@dataclass
class Running:
    proc: subprocess.Popen[bytes]
    ports: dict[str, str]
    pki: Pki

    def client(self, service_account: str) -> httpx.AsyncClient:
        """An HTTPS client holding ``service_account``'s certificate (namespace bookinfo)."""
        ctx = self.pki.client_context(self.pki.issue(service_account, NAMESPACE))
        return httpx.AsyncClient(verify=ctx, timeout=10, limits=httpx.Limits(max_connections=16))

    def url(self, path: str) -> str:
        return f"https://{self.ports['inbound']}{path}"


@contextlib.asynccontextmanager
async def running_example(tmp_path: Path, app_port: int) -> AsyncIterator[Running]:
    """This ConfigMap's configuration as a real process: listeners moved to loopback port 0,
    the app to ``app_port``, and the csi-driver-spiffe files replaced by a dev CA's (the same
    names and roles: chain, key, bundle) for bookinfo-reviews."""
    pki = Pki(tmp_path / "pki")
    svid = pki.issue(_pod()["serviceAccountName"], NAMESPACE)
    conf = tmp_path / "conf"
    conf.mkdir()
    for key, text in _one("ConfigMap")["data"].items():
        text = re.sub(r"(?:127\.0\.0\.1|0\.0\.0\.0):150\d\d", "127.0.0.1:0", text)
        text = text.replace("app: 127.0.0.1:9080", f"app: 127.0.0.1:{app_port}")
        text = text.replace(f"{SPIFFE_MOUNT}/tls.crt", str(svid.cert))
        text = text.replace(f"{SPIFFE_MOUNT}/tls.key", str(svid.key))
        text = text.replace(f"{SPIFFE_MOUNT}/ca.crt", str(svid.ca))
        (conf / key).write_text(text)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen(
        [sys.executable, "-m", "meshproxy", "--log-level", "warning", "run", "-c", str(conf)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    try:
        assert proc.stdout is not None and proc.stderr is not None
        line = (await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), 30)).decode()
        if not line.startswith("meshproxy ready:"):
            proc.kill()
            raise AssertionError(f"did not start: {line!r} {proc.stderr.read().decode()}")
        ports = dict(p.split("=", 1) for p in line.split(":", 1)[1].split())
        yield Running(proc, ports, pki)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()


async def test_example_policy_holds_on_a_running_proxy(tmp_path: Path) -> None:
    """STRICT: plaintext is refused; the AuthorizationPolicy admits productpage only."""
    async with upstream() as app, running_example(tmp_path, app.port) as px:
        async with px.client("bookinfo-productpage") as productpage:
            ok = await productpage.get(px.url("/reviews/1"))
            other_path = await productpage.get(px.url("/admin"))
        async with px.client("bookinfo-ratings") as ratings:
            other_peer = await ratings.get(px.url("/reviews/1"))
        with contextlib.suppress(httpx.TransportError):
            async with httpx.AsyncClient(timeout=5) as plain:
                refused = await plain.get(f"http://{px.ports['inbound']}/reviews/1")
                raise AssertionError(f"plaintext got an answer: {refused.status_code}")
        async with httpx.AsyncClient() as probe:
            ready = await probe.get(f"http://{px.ports['health']}/healthz/ready")
    assert ok.status_code == 200
    assert (other_path.status_code, other_path.text) == (403, "RBAC: access denied")
    assert (other_peer.status_code, other_peer.text) == (403, "RBAC: access denied")
    assert ready.status_code == 200
    assert [r.target for r in app.requests] == ["/reviews/1"]


async def test_memory_request_covers_the_measured_rss(tmp_path: Path) -> None:
    """Push mTLS requests (new handshakes and keep-alive) through the inbound listener of this
    configuration and compare the proxy's peak RSS with the sidecar's memory request."""
    resources = _container("meshproxy")["resources"]
    request = _mebibytes(resources["requests"]["memory"])
    limit = _mebibytes(resources["limits"]["memory"])
    assert request < limit
    async with upstream() as app, running_example(tmp_path, app.port) as px:
        for _ in range(3):  # bounded: 3 clients (up to 16 handshakes each) x 200 requests
            async with px.client("bookinfo-productpage") as client:
                replies = await asyncio.gather(
                    *(client.get(px.url(f"/reviews/{i}")) for i in range(200))
                )
            assert {r.status_code for r in replies} == {200}
        peak = _vm(px.proc.pid, "VmHWM")
    assert peak < request, f"peak RSS {peak:.1f} MiB exceeds the {request:.0f} MiB request"

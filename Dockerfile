# syntax=docker/dockerfile:1
#
# meshproxy as a sidecar image (issue #8 §1).
#
#   docker build -t meshproxy:dev .
#   docker run --rm --read-only --tmpfs /tmp meshproxy:dev       # the default bootstrap
#   docker run --rm --read-only --tmpfs /tmp -v "$PWD/conf:/etc/meshproxy:ro" meshproxy:dev
#
# Two stages: `build` turns the project and every dependency into wheels; the final stage installs
# from those wheels only (--no-index), so it needs no compiler, no network and no pip cache.
# It runs as uid 1337, Istio's proxy uid: the iptables init container excludes that uid's traffic
# from capture (`meshproxy iptables --proxy-uid 1337`), so the proxy's own upstream calls are not
# sent back to itself. Nothing is written outside /tmp, so the root filesystem can be read-only.
#
# The base is pinned by version and by digest (the multi-arch index of the Docker Official Image
# python:3.12.7-slim-bookworm, as recorded by Renovate in nalabelle/build images/digests.Dockerfile
# and used by other public Dockerfiles); bump both together.
# tests/integration/test_dockerfile.py checks this file statically and runs the same pip steps.

FROM python:3.12.7-slim-bookworm@sha256:032c52613401895aa3d418a4c563d2d05f993bc3ecc065c8f4e2280978acd249 AS build

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1

WORKDIR /src
# Only what the wheel is built from (.dockerignore keeps the rest of the tree out of the context).
COPY pyproject.toml README.md ./
COPY meshproxy ./meshproxy
# Every dependency has a manylinux wheel for CPython 3.12 (uvloop, cryptography, PyYAML, ...), so
# this stage needs no compiler either; a dependency without one would fail here, not at run time.
RUN pip wheel --wheel-dir /wheels .


FROM python:3.12.7-slim-bookworm@sha256:032c52613401895aa3d418a4c563d2d05f993bc3ecc065c8f4e2280978acd249

# No .pyc writes at run time (read-only root): pip compiles the bytecode at install time instead,
# which also keeps cold start fast (reference §6 #1). Logs unbuffered for `kubectl logs`.
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PYTHONFAULTHANDLER=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    TMPDIR=/tmp

# iptables for the capture init container (`meshproxy iptables --apply`, same image, as Istio's
# proxyv2 image carries it for istio-init); Debian bookworm's default is the nft backend.
# Runtime tools only: no compiler, no -dev package, and the apt lists are not kept.
RUN apt-get update \
 && apt-get install --yes --no-install-recommends iptables \
 && rm -rf /var/lib/apt/lists/*

# Istio's proxy user is uid 1337 (istio/istio pilot/docker/Dockerfile.proxyv2: `useradd --uid 1337
# istio-proxy`); the gid matches so the cert volume's fs-group can be 1337 too.
RUN groupadd --system --gid 1337 meshproxy \
 && useradd --system --uid 1337 --gid 1337 --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin meshproxy

# The wheels are bind-mounted from the build stage, never copied into a layer. pip is removed
# afterwards: nothing is installed at run time (this hides it; the base layer still holds its bytes).
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    pip install --no-index --find-links /wheels meshproxy \
 && pip uninstall --yes pip \
 && meshproxy --version

# The default bootstrap (Istio's ports); Kubernetes mounts a ConfigMap over this directory.
COPY examples/container/meshproxy.yaml /etc/meshproxy/meshproxy.yaml

# Inbound, health (kubelet probes) and Prometheus scrape. The admin (15000) and the outbound
# listener (15001) stay on loopback and are not exposed.
EXPOSE 15006 15021 15090

USER 1337:1337
WORKDIR /tmp

# Docker's own check (Kubernetes ignores it and uses the probes on 15021): the admin /ready,
# 200 only once config is loaded and every listener is bound, 503 while draining. A bootstrap that
# moves the admin off 127.0.0.1:15000 needs `docker run --health-cmd` to match.
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
  CMD ["python", "-c", "import sys, urllib.request as u; sys.exit(0 if u.urlopen('http://127.0.0.1:15000/ready', timeout=2).status == 200 else 1)"]

# SIGTERM starts the drain (inbound closes, in-flight requests finish, exit by drainDuration).
STOPSIGNAL SIGTERM
ENTRYPOINT ["meshproxy"]
CMD ["run", "-c", "/etc/meshproxy"]

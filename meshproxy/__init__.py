"""meshproxy: a pure-Python asyncio sidecar proxy for an Istio-style service mesh."""

__version__ = "0.1.0"

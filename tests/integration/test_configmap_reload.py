"""A running proxy follows a Kubernetes ConfigMap update (issue #8 §3 with §4's hot reload).

The kubelet updates a ConfigMap volume by writing a new hidden ``..<timestamp>/`` directory,
swapping the ``..data`` link to it in one rename and deleting the old directory; the visible
files are links through ``..data``. This test does exactly that to a real directory under a
running ``meshproxy run -c DIR`` and checks that the new routing serves new requests, that each
document is loaded once (not again from the hidden copy), and that a broken update is rejected
while the old configuration keeps serving.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import httpx
from helpers import (
    Handler,
    ProxyProcess,
    Reply,
    SeenRequest,
    bootstrap,
    service_entry,
    upstream,
)

RELOADED = "meshproxy reloaded:"
REJECTED = "meshproxy reload rejected:"


class Kubelet:
    """The atomic writer of one ConfigMap volume."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.generation = 0

    def write(self, data: dict[str, str]) -> None:
        self.generation += 1
        stamp = f"..2026_11_26_05_00_00.{self.generation:09d}"
        (self.root / stamp).mkdir()
        for key, text in data.items():
            (self.root / stamp / key).write_text(text)
        old = os.readlink(self.root / "..data") if (self.root / "..data").is_symlink() else None
        (self.root / "..data_tmp").symlink_to(stamp)
        os.replace(self.root / "..data_tmp", self.root / "..data")
        for key in data:
            if not (self.root / key).is_symlink():
                (self.root / key).symlink_to(Path("..data") / key)
        if old is not None:
            shutil.rmtree(self.root / old)


def _named(name: str) -> Handler:
    async def handler(req: SeenRequest) -> Reply:
        return Reply(body=name.encode())

    return handler


async def test_configmap_update_is_applied_and_a_broken_one_rejected(tmp_path: Path) -> None:
    async with upstream(_named("a")) as a, upstream(_named("b")) as b:
        kubelet = Kubelet(tmp_path)
        boot = bootstrap()
        kubelet.write({"bootstrap.yaml": boot, "mesh.yaml": service_entry("svc", [a.port])})
        px = await ProxyProcess(str(tmp_path)).start()
        try:
            url = f"http://127.0.0.1:{px.ports['outbound']}/"
            async with httpx.AsyncClient(headers={"host": "svc:9080"}) as client:
                assert (await client.get(url)).text == "a"
                kubelet.write({"bootstrap.yaml": boot, "mesh.yaml": service_entry("svc", [b.port])})
                await px.line(RELOADED)
                assert (await client.get(url)).text == "b"
                # A broken update: rejected whole, the last good configuration keeps serving.
                kubelet.write({"bootstrap.yaml": boot, "mesh.yaml": "kind: [unclosed\n"})
                await px.line(REJECTED)
                assert (await client.get(url)).text == "b"
        finally:
            px.stop()

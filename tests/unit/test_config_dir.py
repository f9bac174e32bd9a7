"""config/load.py reading a directory laid out as Kubernetes mounts a ConfigMap.

The kubelet's atomic writer puts the files in a hidden ``..<timestamp>/`` directory, points a
``..data`` link at it and adds one visible link per key; an update writes a new timestamped
directory and swaps ``..data`` in one rename. ``meshproxy run -c /etc/meshproxy`` must load each
document once, from whichever directory ``..data`` names now. Real files and links in tmp_path.
"""

from __future__ import annotations

import os
from pathlib import Path

from config_helpers import BOOT

from meshproxy.config.load import load_paths

SE = """apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: {name}, namespace: default}}
spec:
  hosts: [{name}]
  ports: [{{number: 9080, name: http, protocol: HTTP}}]
  resolution: STATIC
  endpoints: [{{address: 127.0.0.1, ports: {{http: 19091}}}}]
"""


def _write_configmap(root: Path, stamp: str, files: dict[str, str]) -> None:
    """One atomic-writer generation: the hidden directory, ``..data`` swapped to it, key links."""
    data = root / stamp
    data.mkdir()
    for name, text in files.items():
        (data / name).write_text(text)
    tmp_link = root / "..data_tmp"
    tmp_link.symlink_to(stamp)
    os.replace(tmp_link, root / "..data")  # the rename the kubelet does
    for name in files:
        link = root / name
        if not link.is_symlink():
            link.symlink_to(Path("..data") / name)


def test_configmap_mount_loads_each_document_once(tmp_path: Path) -> None:
    _write_configmap(
        tmp_path,
        "..2026_11_26_04_00_00.000000001",
        {"bootstrap.yaml": BOOT, "mesh.yaml": SE.format(name="reviews")},
    )
    config = load_paths([tmp_path])
    assert [se.metadata.name for se in config.service_entries] == ["reviews"]
    assert sorted(Path(s).name for s in config.sources) == ["bootstrap.yaml", "mesh.yaml"]
    # Read through the visible links, never from the hidden generation directory.
    assert all(len(Path(s).relative_to(tmp_path).parts) == 1 for s in config.sources)


def test_configmap_update_is_read_from_the_new_generation(tmp_path: Path) -> None:
    _write_configmap(
        tmp_path,
        "..2026_11_26_04_00_00.1",
        {"bootstrap.yaml": BOOT, "mesh.yaml": SE.format(name="a")},
    )
    _write_configmap(
        tmp_path,
        "..2026_11_26_04_05_00.2",
        {"bootstrap.yaml": BOOT, "mesh.yaml": SE.format(name="b")},
    )
    # The old generation is still on disk (the kubelet removes it later): it must not be read.
    assert (tmp_path / "..2026_11_26_04_00_00.1" / "mesh.yaml").exists()
    config = load_paths([tmp_path])
    assert [se.metadata.name for se in config.service_entries] == ["b"]


def test_hidden_files_and_directories_are_skipped_in_a_scan(tmp_path: Path) -> None:
    (tmp_path / "bootstrap.yaml").write_text(BOOT)
    (tmp_path / ".git").mkdir()
    (tmp_path / ".git" / "stale.yaml").write_text(SE.format(name="stale"))
    (tmp_path / ".backup.yaml").write_text(SE.format(name="backup"))
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "mesh.yaml").write_text(SE.format(name="reviews"))
    config = load_paths([tmp_path])
    assert [se.metadata.name for se in config.service_entries] == ["reviews"]


def test_a_hidden_file_named_explicitly_is_read(tmp_path: Path) -> None:
    hidden = tmp_path / ".mesh.yaml"
    hidden.write_text(SE.format(name="reviews"))
    (tmp_path / "bootstrap.yaml").write_text(BOOT)
    config = load_paths([tmp_path / "bootstrap.yaml", hidden])
    assert [se.metadata.name for se in config.service_entries] == ["reviews"]


def test_a_hidden_directory_named_explicitly_is_scanned(tmp_path: Path) -> None:
    conf = tmp_path / ".meshproxy"
    conf.mkdir()
    (conf / "bootstrap.yaml").write_text(BOOT)
    (conf / "mesh.yaml").write_text(SE.format(name="reviews"))
    config = load_paths([conf])
    assert [se.metadata.name for se in config.service_entries] == ["reviews"]

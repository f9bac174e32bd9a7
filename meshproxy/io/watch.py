"""Watching the configuration files for changes: stat-polling, no dependency, no thread.

Owns one timer that, every ``interval`` seconds, takes a fingerprint of the configured paths
(each YAML file, and every ``*.yaml``/``*.yml`` under a directory, recursively: path, inode,
size, mtime) and calls ``on_change`` when it differs from the last one. Polling ``stat`` a few
files once a second costs microseconds and sees every way a file changes, including Kubernetes'
ConfigMap volumes, whose files are symlinks into a ``..data`` directory swapped atomically (``stat``
follows the link, so the inode changes), where inotify on the file itself would miss it.

Rules: never reads or parses a file (that is ``config/load.py``'s job, on reload); a file that is
missing or unreadable is part of the fingerprint too, so its return is a change as well.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Sequence
from pathlib import Path

Fingerprint = tuple[tuple[str, int, int, int], ...]

_SUFFIXES = (".yaml", ".yml")


def fingerprint(paths: Sequence[str]) -> Fingerprint:
    """What the configuration files look like now: (path, inode, size, mtime_ns) per file."""
    out: list[tuple[str, int, int, int]] = []
    for p in paths:
        path = Path(p)
        if path.is_dir():
            files = sorted(str(f) for f in path.rglob("*") if f.suffix in _SUFFIXES)
        else:
            files = [str(path)]
        for f in files:
            try:
                st = os.stat(f)
            except OSError:
                out.append((f, -1, -1, -1))  # missing now: its return is a change
                continue
            out.append((f, st.st_ino, st.st_size, st.st_mtime_ns))
    return tuple(out)


class FileWatcher:
    """Calls ``on_change()`` when the fingerprint of ``paths`` changes (checked every ``interval``)."""

    __slots__ = ("_handle", "_last", "_loop", "interval", "on_change", "paths")

    def __init__(
        self, paths: Sequence[str], interval: float, on_change: Callable[[], None]
    ) -> None:
        self.paths = tuple(paths)
        self.interval = interval
        self.on_change = on_change
        self._loop = asyncio.get_running_loop()
        self._last = fingerprint(self.paths)
        self._handle: asyncio.TimerHandle | None = None

    def start(self) -> None:
        self._handle = self._loop.call_later(self.interval, self._check)

    def rebase(self) -> None:
        """Take the files as they are now as the baseline (after a reload read them)."""
        self._last = fingerprint(self.paths)

    def _check(self) -> None:
        try:
            now = fingerprint(self.paths)
            if now != self._last:
                self._last = now
                self.on_change()
        finally:
            self._handle = self._loop.call_later(self.interval, self._check)

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

"""A script's own section of benchmarks/RESULTS.md, below run.py's notes marker.

run.py rewrites everything above `<!-- notes -->` and keeps everything below it, so the
one-command benchmarks that add their own results (scaling.py, idle_conns.py) put a section
between their own begin/end markers below it: a rerun replaces that section and nothing else.
"""

from __future__ import annotations

from pathlib import Path

import run as bench  # benchmarks/run.py: this script's directory is on sys.path


def write_section(path: Path, section: str, begin_marker: str, end_marker: str) -> None:
    """Replace the text from `begin_marker` to `end_marker` (both kept, being part of `section`)
    below the notes marker with `section`, or append `section`; add the notes marker if absent."""
    text = path.read_text() if path.exists() else ""
    if bench.NOTES_MARKER not in text:
        text = text.rstrip("\n") + ("\n\n" if text else "") + bench.NOTES_MARKER + "\n"
    notes = text.find(bench.NOTES_MARKER)
    begin, end = text.find(begin_marker, notes), text.find(end_marker, notes)
    if begin >= 0 and end > begin:
        text = text[:begin] + section + text[end + len(end_marker) :]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)

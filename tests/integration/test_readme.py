"""The README's configuration example is a real, valid configuration."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[2] / "README.md"


def test_readme_configuration_example_validates(tmp_path: Path) -> None:
    blocks = re.findall(r"```yaml\n(.*?)```", README.read_text(), re.S)
    assert blocks, "README.md has no yaml example"
    config = tmp_path / "mesh.yaml"
    config.write_text(blocks[0])
    result = subprocess.run(
        [sys.executable, "-m", "meshproxy", "validate", "-c", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "1 VirtualService, 1 DestinationRule" in result.stdout
    assert result.stderr == ""  # no warnings either

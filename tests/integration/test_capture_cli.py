"""``meshproxy iptables``: what ``--print`` shows, how bad options and a missing or stuck
``iptables-restore`` are answered. Nothing here changes the machine's rules: applying them for real
happens inside network namespaces (``test_capture_netns.py``).
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import free_env

from meshproxy.cli import main
from meshproxy.core.capture import CaptureSpec, Family, restore_text
from meshproxy.io.capture import IptablesError, apply_rules

ROOT = Path(__file__).resolve().parents[2]


def meshproxy(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    run_env = env if env is not None else free_env()
    run_env["PYTHONPATH"] = str(ROOT)
    return subprocess.run(
        [sys.executable, "-m", "meshproxy", *args],
        capture_output=True,
        text=True,
        timeout=30,
        env=run_env,
        check=False,
    )


def test_print_shows_the_injectors_default_rules() -> None:
    done = meshproxy("iptables", "--print")
    assert done.returncode == 0, done.stderr
    assert done.stdout == "# iptables-restore --noflush\n" + restore_text(CaptureSpec())


def test_print_with_options_and_ipv6(capsys: pytest.CaptureFixture[str]) -> None:
    argv = [
        "iptables",
        "--print",
        "--ipv6",
        "--proxy-uid",
        "1337,0",
        "--proxy-gid",
        "1338",
        "--outbound-port",
        "16001",
        "--inbound-port",
        "16006",
        "--inbound-ports",
        "9080,9081",
        "--exclude-outbound-ports",
        "5432",
        "--include-outbound-ips",
        "10.0.0.0/8,fd00::/8",
        "--exclude-outbound-ips",
        "10.1.0.0/16",
    ]
    assert main(argv) == 0
    out = capsys.readouterr().out
    v4, _, v6 = out.partition("# ip6tables-restore --noflush\n")
    assert v4.startswith("# iptables-restore --noflush\n* nat\n")
    assert "-A ISTIO_REDIRECT -p tcp -j REDIRECT --to-ports 16001" in v4
    assert "-A ISTIO_IN_REDIRECT -p tcp -j REDIRECT --to-ports 16006" in v4
    assert "-A ISTIO_INBOUND -p tcp --dport 9081 -j ISTIO_IN_REDIRECT" in v4
    assert "-A ISTIO_OUTPUT -m owner --uid-owner 0 -j RETURN" in v4
    assert "-A ISTIO_OUTPUT -m owner --gid-owner 1338 -j RETURN" in v4
    assert "--gid-owner 1337" not in v4  # an explicit gid replaces the default
    assert "-A ISTIO_OUTPUT -p tcp --dport 5432 -j RETURN" in v4
    assert "-A ISTIO_OUTPUT -d 10.1.0.0/16 -j RETURN" in v4
    assert v4.endswith("-A ISTIO_OUTPUT -d 10.0.0.0/8 -j ISTIO_REDIRECT\nCOMMIT\n")
    assert "-A ISTIO_OUTPUT -o lo -s ::6/128 -j RETURN" in v6
    assert v6.endswith("-A ISTIO_OUTPUT -d fd00::/8 -j ISTIO_REDIRECT\nCOMMIT\n")


def test_excluded_inbound_ports_follow_the_reserved_ones(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["iptables", "--print", "--exclude-inbound-ports", "22,15020"]) == 0
    out = capsys.readouterr().out
    returns = [
        line for line in out.splitlines() if line.startswith("-A ISTIO_INBOUND -p tcp --dport")
    ]
    assert returns == [
        "-A ISTIO_INBOUND -p tcp --dport 15008 -j RETURN",
        "-A ISTIO_INBOUND -p tcp --dport 15090 -j RETURN",
        "-A ISTIO_INBOUND -p tcp --dport 15021 -j RETURN",
        "-A ISTIO_INBOUND -p tcp --dport 15020 -j RETURN",
        "-A ISTIO_INBOUND -p tcp --dport 22 -j RETURN",
    ]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--exclude-outbound-ports", "80,x"], "--exclude-outbound-ports: 'x' is not a port"),
        (["--exclude-inbound-ports", "70000"], "--exclude-inbound-ports: '70000' is not a port"),
        (["--inbound-ports", "0"], "--inbound-ports: '0' is not a port"),
        (["--outbound-port", "0"], "--outbound-port: 0 is not a port"),
        (["--inbound-port", "65536"], "--inbound-port: 65536 is not a port"),
        (["--proxy-uid", ","], "--proxy-uid: at least one id is needed"),
        (["--proxy-gid", "a;b"], "--proxy-gid: 'a;b' is not a user or group id"),
        (["--include-outbound-ips", "10.0.0.0/40"], "--include-outbound-ips: '10.0.0.0/40'"),
        (["--exclude-outbound-ips", "*"], "--exclude-outbound-ips: '*' would capture nothing"),
    ],
)
def test_bad_options_exit_2_naming_the_option(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["iptables", "--print", *args]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("meshproxy iptables: ")
    assert message in captured.err


def test_print_or_apply_is_required() -> None:
    done = meshproxy("iptables")
    assert done.returncode == 2
    assert "one of the arguments --print --apply is required" in done.stderr
    done = meshproxy("iptables", "--print", "--apply")
    assert done.returncode == 2
    assert "not allowed with argument" in done.stderr


def test_apply_without_iptables_says_what_to_install(tmp_path: Path) -> None:
    env = free_env()
    env["PATH"] = str(tmp_path)  # an empty directory: no iptables-restore anywhere
    done = meshproxy("iptables", "--apply", env=env)
    assert done.returncode == 4
    assert "iptables-restore not found: install the iptables package" in done.stderr


def test_apply_with_an_unrunnable_iptables_restore(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    fake = tmp_path / "iptables-restore"
    fake.write_text("#!/bin/sh\nexit 0\n")
    fake.chmod(stat.S_IRUSR)  # present but not executable
    monkeypatch.setenv("PATH", str(tmp_path))
    # Linux lets even root execute only a file with some execute bit: this one has none.
    assert not os.access(fake, os.X_OK)
    assert main(["iptables", "--apply"]) == 4
    assert "iptables-restore cannot run" in capsys.readouterr().err


def test_apply_that_hangs_is_stopped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A stand-in that never answers, to show the bound (a hung iptables lock cannot be made to
    # order); the real iptables-restore is applied, and refuses, in test_capture_netns.py.
    stuck = tmp_path / "iptables-restore"
    stuck.write_text("#!/bin/sh\nexec sleep 30\n")
    stuck.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}/usr/bin{os.pathsep}/bin")
    with pytest.raises(IptablesError, match=r"iptables-restore did not finish in 0\.3s"):
        apply_rules(restore_text(CaptureSpec()), Family.IPV4, timeout=0.3)

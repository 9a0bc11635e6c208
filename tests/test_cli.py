"""The CLI as a user meets it: help everywhere, documented commands, one-line errors, exit codes."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from flowerbed.errors import ExitCode
from tests.conftest import assert_clean_error, run_cli

COMMANDS = [
    [],
    ["init"],
    ["run"],
    ["demo"],
    ["certs"],
    ["certs", "init"],
    ["certs", "server"],
    ["certs", "node"],
    ["certs", "show"],
    ["superlink"],
    ["superlink", "start"],
    ["supernode"],
    ["supernode", "start"],
    ["check"],
    ["check", "firewall"],
    ["env"],
    ["env", "conda"],
    ["kit"],
    ["kit", "build"],
    ["kit", "coordinator-unit"],
    ["bundle"],
    ["bundle", "wheels"],
]
DOCS = Path(__file__).parent.parent / "docs" / "cli.md"


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c) or "flowerbed")
def test_help(command: list[str]) -> None:
    result = run_cli(*command, "--help")
    assert result.returncode == 0, result.stderr
    assert "usage: flowerbed" in result.stdout.lower()
    lines = [line for line in result.stdout.splitlines() if line.strip(" │╭╮╰╯─")]
    assert len(lines) > 3


@pytest.mark.parametrize("command", [c for c in COMMANDS if c], ids=" ".join)
def test_command_is_documented(command: list[str]) -> None:
    assert f"flowerbed {' '.join(command)}" in DOCS.read_text()


def test_version() -> None:
    result = run_cli("--version")
    assert result.returncode == 0
    assert result.stdout.startswith("flowerbed ")


def test_init_then_certs_flow(tmp_path: Path) -> None:
    fed = tmp_path / "fed"
    result = run_cli("init", str(fed), "--superlink-address", "link.example.org", "--san", "10.0.0.5",
                     "--site", "inst-a", "--site", "inst-b", "--site", "univ-hospital")  # fmt: skip
    assert result.returncode == 0, result.stderr
    text = (fed / "federation.toml").read_text()
    assert 'address = "link.example.org"' in text and "port = 9092" in text
    assert run_cli("certs", "init", "-d", str(fed)).returncode == 0
    ca_before = (fed / "pki" / "ca.crt").read_bytes()
    assert_clean_error(run_cli("certs", "init", "-d", str(fed)), ExitCode.ERROR, "a CA already exists")
    assert (fed / "pki" / "ca.crt").read_bytes() == ca_before
    result = run_cli("certs", "server", "-d", str(fed))
    assert result.returncode == 0
    assert "link.example.org, 10.0.0.5, localhost, 127.0.0.1" in result.stdout
    for site in ("inst-a", "inst-b", "univ-hospital"):
        assert run_cli("certs", "node", site, "-d", str(fed)).returncode == 0
        assert stat.S_IMODE((fed / "nodes" / f"{site}.key").stat().st_mode) == 0o600
    assert_clean_error(run_cli("certs", "node", "inst-a", "-d", str(fed)), ExitCode.ERROR, "already exists")
    assert_clean_error(run_cli("certs", "node", "ghost", "-d", str(fed)), ExitCode.ERROR, "unknown site 'ghost'")
    shown = run_cli("certs", "show", "-d", str(fed))
    assert shown.returncode == 0
    flat = " ".join(shown.stdout.split())
    assert "SHA256:" in flat and "10.0.0.5" in flat and flat.count("node key") == 3
    assert_clean_error(
        run_cli("init", str(fed), "--superlink-address", "x.org", "--site", "a"),
        ExitCode.ERROR,
        "already exists",
    )


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["--superlink-address", "bad host!", "--site", "a"], ExitCode.INVALID_CONFIG, "neither a DNS name"),
        (["--superlink-address", "x.org", "--site", "Bad_Name"], ExitCode.INVALID_CONFIG, "lower-case"),
        (["--superlink-address", "x.org", "--site", "a", "--port", "0"], ExitCode.INVALID_CONFIG,
         "superlink.port"),
        (["--site", "a"], 2, "Missing option '--superlink-address'"),
    ],
)  # fmt: skip
def test_init_refuses_invalid_input(tmp_path: Path, args: list[str], code: int, message: str) -> None:
    assert_clean_error(run_cli("init", str(tmp_path / "f"), *args), code, message)
    assert not (tmp_path / "f" / "federation.toml").exists()


def test_invalid_federation_file_lists_each_field(tmp_path: Path) -> None:
    (tmp_path / "federation.toml").write_text(
        'name = "Bad Name"\n[superlink]\naddress = "x.org"\nport = 99999\n[[sites]]\nname = "a"\n'
    )
    result = run_cli("certs", "init", "-d", str(tmp_path))
    assert_clean_error(result, ExitCode.INVALID_CONFIG, "is invalid (2 problem(s))", "name:", "superlink.port:")


def test_missing_federation(tmp_path: Path) -> None:
    for args in (["certs", "show"], ["superlink", "start"], ["run"]):
        assert_clean_error(run_cli(*args, "-d", str(tmp_path)), ExitCode.ERROR, "federation.toml does not exist")


def test_superlink_start_without_certificates(tmp_path: Path) -> None:
    run_cli("init", str(tmp_path), "--superlink-address", "localhost", "--site", "a", "--force")
    assert_clean_error(run_cli("superlink", "start", "-d", str(tmp_path)), ExitCode.ERROR,
                       "ca.crt is missing: run `flowerbed certs init` first")  # fmt: skip


def test_run_without_superlink(tmp_path: Path) -> None:
    run_cli("init", str(tmp_path), "--superlink-address", "localhost", "--site", "a", "--force")
    assert_clean_error(run_cli("run", "-d", str(tmp_path)), ExitCode.ERROR,
                       "no SuperLink connection", "flowerbed superlink start")  # fmt: skip

"""The CLI as a user meets it: help everywhere, documented commands, one-line errors, exit codes."""

from __future__ import annotations

import stat
from pathlib import Path

import click
import pytest

from flowerbed.errors import ExitCode
from tests.conftest import assert_clean_error, run_cli


def real_commands() -> list[list[str]]:
    """Every command and group the app really has (a new command cannot escape the checks below)."""
    import typer.main

    from flowerbed.cli import app

    def walk(group: click.Group, prefix: list[str]) -> list[list[str]]:
        found = [prefix]
        for name, command in sorted(group.commands.items()):
            if isinstance(command, click.Group):
                found += walk(command, [*prefix, name])
            else:
                found.append([*prefix, name])
        return found

    root = typer.main.get_command(app)
    assert isinstance(root, click.Group)
    return walk(root, [])


COMMANDS = real_commands()
DOCS = Path(__file__).parent.parent / "docs" / "cli.md"


def test_the_command_list_is_the_apps() -> None:
    flat = {" ".join(c) for c in COMMANDS}
    assert {"", "run", "certs show", "supernode start", "superlink start", "kit build", "bundle wheels"} <= flat
    assert len(flat) >= 22


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
    assert "10.0.0.5" in flat and flat.count("node key") == 6  # three table rows, three fingerprint lines
    # Whole fingerprints, each on a line of its own, whatever the terminal's width: compared out of band.
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes

    for kind, name in (("CA", "ca.crt"), ("server", "server.crt")):
        cert = x509.load_pem_x509_certificate((fed / "pki" / name).read_bytes())
        assert f"{kind} {name}: SHA256:{cert.fingerprint(hashes.SHA256()).hex(':')}" in shown.stdout.splitlines()
    narrow = run_cli("certs", "show", "-d", str(fed), env={"COLUMNS": "60"})
    assert (
        f"CA ca.crt: SHA256:{x509.load_pem_x509_certificate((fed / 'pki' / 'ca.crt').read_bytes()).fingerprint(hashes.SHA256()).hex(':')}"
        in narrow.stdout.splitlines()
    )
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


@pytest.mark.federation
def test_missing_federation(tmp_path: Path) -> None:
    for args in (["certs", "show"], ["superlink", "start"], ["run"]):
        assert_clean_error(run_cli(*args, "-d", str(tmp_path)), ExitCode.ERROR, "federation.toml does not exist")


@pytest.mark.federation
def test_superlink_start_without_certificates(tmp_path: Path) -> None:
    run_cli("init", str(tmp_path), "--superlink-address", "localhost", "--site", "a", "--force")
    assert_clean_error(run_cli("superlink", "start", "-d", str(tmp_path)), ExitCode.ERROR,
                       "ca.crt is missing: run `flowerbed certs init` first")  # fmt: skip


@pytest.mark.federation
def test_run_without_superlink(tmp_path: Path) -> None:
    run_cli("init", str(tmp_path), "--superlink-address", "localhost", "--site", "a", "--force")
    assert_clean_error(run_cli("run", "-d", str(tmp_path)), ExitCode.ERROR,
                       "was never started: start it with `flowerbed superlink start -d")  # fmt: skip


def test_messages_print_outside_text_literally(capsys: pytest.CaptureFixture[str]) -> None:
    """Flower's errors quote TOML tables and fingerprints: neither is rich markup nor an emoji code."""
    from flowerbed.console import error, info

    error("Invalid Flower App configuration: [tool.flwr.app] is missing", ["[bold]x[/] SHA256:ab:cd:ef"])
    info("fingerprint SHA256:e9:97:95:25:ab:f3:cd:45")
    text = capsys.readouterr().err
    assert "Invalid Flower App configuration: [tool.flwr.app] is missing" in text
    assert "[bold]x[/] SHA256:ab:cd:ef" in text
    assert "SHA256:e9:97:95:25:ab:f3:cd:45" in text


@pytest.mark.federation
@pytest.mark.parametrize("form", ["default", "dot", "relative", "absolute"])
def test_federation_folder_in_every_form(tmp_path: Path, form: str) -> None:
    """`-d` left out (= `.`), `-d .`, a relative `-d` and an absolute one all reach the same folder."""
    fed = tmp_path / "fed"
    assert run_cli("init", str(fed), "--superlink-address", "localhost", "--site", "a").returncode == 0
    where = {"default": ([], fed), "dot": (["-d", "."], fed), "relative": (["-d", "fed"], tmp_path),
             "absolute": (["-d", str(fed)], tmp_path / "elsewhere")}  # fmt: skip
    args, cwd = where[form]
    cwd.mkdir(exist_ok=True)
    for command in (["certs", "init"], ["certs", "server"], ["kit", "build"], ["certs", "show"]):
        result = run_cli(*command, *args, cwd=cwd, timeout=300)
        assert result.returncode == 0, (command, result.stderr)
    assert (fed / "kits" / "a.tar.gz").is_file()
    assert f"issued {fed / 'pki' / 'server.crt'}" not in result.stdout  # (show prints no issue line)
    assert "ca.crt: SHA256:" in result.stdout

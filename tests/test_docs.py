"""The troubleshooting page lists only messages the code (or Flower) really prints."""

from __future__ import annotations

import re
from pathlib import Path

import flwr

ROOT = Path(__file__).parent.parent
PAGE = ROOT / "docs" / "troubleshooting.md"


def sources(root: Path, patterns: tuple[str, ...]) -> str:
    return "\n".join(p.read_text(errors="replace") for pattern in patterns for p in root.rglob(pattern))


def table_keys(section: str) -> list[str]:
    keys = []
    for line in section.splitlines():
        match = re.match(r"\| `(.+?)` \|", line)
        if match:
            keys.append(match.group(1))
    return keys


def test_every_listed_message_is_printed_by_the_code() -> None:
    text = PAGE.read_text()
    ours, flower = text.split("## Messages from Flower's own logs")
    # Only the package's own code: not tests/ (which quote the messages) and not .venv.
    package = ("flowerbed", "certs", "superlink", "supernode", "serverapp", "clientapp", "deploy")
    code = " ".join("\n".join(sources(ROOT / folder, ("*.py",)) for folder in package).split())
    keys = table_keys(ours)
    assert len(keys) >= 30
    # f-string pieces: compare the literal text around placeholders
    missing = [k for k in keys if not all(part in code for part in re.split(r"\{[^}]*\}", k) if part)]
    assert missing == []
    # Flower's lines come from its source; the TLS one from OpenSSL, which the supervisor watches for.
    flwr_code = sources(Path(flwr.__file__).parent, ("*.py",)) + (ROOT / "supernode" / "supervisor.py").read_text()
    assert [k for k in table_keys(flower) if k not in flwr_code] == []


def test_docs_are_linked_from_readme() -> None:
    readme = (ROOT / "README.md").read_text()
    for page in sorted((ROOT / "docs").glob("*.md")):
        assert f"docs/{page.name}" in readme, page.name


def test_one_install_path_is_written_the_same_everywhere() -> None:
    """The site page, the coordinator page and the kit README quote the same install commands."""
    from flowerbed.deploy import install

    site = " ".join((ROOT / "docs" / "quickstart-site.md").read_text().split())
    assert install.ONLINE in site and install.OFFLINE in site
    coordinator = (ROOT / "docs" / "quickstart-coordinator.md").read_text()
    assert "flowerbed kit build" in coordinator and "flowerbed kit build --bundle" in coordinator
    template = (ROOT / "deploy" / "templates" / "kit-README.md").read_text()
    assert "@@INSTALL_ONLINE@@" in template and "@@INSTALL_OFFLINE@@" in template

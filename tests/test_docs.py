"""The documentation stays true: the generated reference matches the CLI and settings, and every link
between the README and docs/ leads to a file that exists."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from docs.reference import render

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
LINK = re.compile(r"\]\(([^)\s]+)\)")


def test_reference_is_generated_from_the_cli_and_settings() -> None:
    written = (ROOT / "docs" / "reference.md").read_text()
    assert written == render(), "docs/reference.md is stale: python -m docs.reference > docs/reference.md"


def test_reference_names_every_command_and_variable() -> None:
    written = (ROOT / "docs" / "reference.md").read_text()
    for name in (
        "### `hivemarket rent`",
        "--metrics-port",
        "HIVEMARKET_DASHBOARD_REFRESH",
        "HIVEMARKET_HOME",
    ):
        assert name in written, name


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_local_links_lead_somewhere(page: Path) -> None:
    for target in LINK.findall(page.read_text()):
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue  # a URL, or an anchor in the same page
        path = (page.parent / target.split("#", 1)[0]).resolve()
        assert path.exists(), f"{page.relative_to(ROOT)} links to {target}, which does not exist"

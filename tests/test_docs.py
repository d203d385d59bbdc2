"""The documentation stays true: the generated reference matches the CLI and settings, every link between
the README and docs/ leads to a file (and heading) that exists, and the README stays a front door: short,
with the CI's test command in it, linking every page under docs/."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = ROOT / "docs"
PAGES = [README, *sorted(DOCS.rglob("*.md"))]
LINK = re.compile(r"\]\(([^)\s]+)\)")
README_MAX_LINES = 250
# .ci/run runs the sh block that follows this comment (it finds the comment by its first words).
CI_MARKER = "<!-- ci: test command (.ci/run runs the block below exactly as written) -->"


def _prose(text: str) -> str:
    """The page without its fenced code blocks (a `# comment` in a shell block is not a heading)."""
    kept, fenced = [], False
    for line in text.splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced:
            kept.append(line)
    return "\n".join(kept)


def _anchors(page: Path) -> set[str]:
    """The anchors GitHub gives the page's headings: lower case, punctuation dropped, spaces to hyphens."""
    headings = re.findall(r"^#{1,6} +(.+?) *#*$", _prose(page.read_text()), re.M)
    return {re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-") for heading in headings}


def _local_links(page: Path) -> list[tuple[str, Path, str]]:
    """(link as written, the file it names, its anchor or "") for every link that is not a URL."""
    links = []
    for target in LINK.findall(_prose(page.read_text())):
        if re.match(r"[a-z]+:", target):
            continue  # a URL
        path, _, anchor = target.partition("#")
        links.append((target, (page.parent / path).resolve() if path else page, anchor))
    return links


@pytest.mark.timeout(60)
def test_reference_is_generated_from_the_cli_and_settings() -> None:
    # Rendered in a process of its own: click caches a command's help option on the command the first time
    # a context asks for it, so a test that invoked a subcommand directly (without the root's -h) would
    # change what the same process renders (seen in CI: `--help` instead of `-h, --help`).
    command = [sys.executable, "-m", "docs.reference"]
    rendered = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=True, timeout=50)
    written = (DOCS / "reference.md").read_text()
    stale = "docs/reference.md is stale: python -m docs.reference > docs/reference.md"
    assert written == rendered.stdout, stale


def test_reference_names_every_command_and_variable() -> None:
    written = (DOCS / "reference.md").read_text()
    for name in (
        "### `hivemarket rent`",
        "--metrics-port",
        "HIVEMARKET_DASHBOARD_REFRESH",
        "HIVEMARKET_HOME",
    ):
        assert name in written, name


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_local_links_lead_somewhere(page: Path) -> None:
    for target, path, anchor in _local_links(page):
        assert path.exists(), f"{page.relative_to(ROOT)} links to {target}, which does not exist"
        if anchor and path.suffix == ".md":
            assert anchor in _anchors(path), f"{page.relative_to(ROOT)} links to {target}: no such heading"


def test_the_readme_is_a_front_door() -> None:
    lines = len(README.read_text().splitlines())
    assert lines < README_MAX_LINES, (
        f"README.md has {lines} lines (under {README_MAX_LINES}): move the depth to a page under docs/"
    )


def test_the_readme_keeps_the_ci_test_command() -> None:
    """The comment is followed by the sh block .ci/run runs: the install with the constraints, then pytest."""
    readme = README.read_text()
    assert readme.count(CI_MARKER) == 1, "README.md lost the CI test command's comment"
    block = re.search(re.escape(CI_MARKER) + r"\n```sh\n(.+?)\n```\n", readme, re.S)
    assert block, "the CI test command's comment is not followed by a ```sh block"
    assert "pip install -c constraints.txt -e '.[dev]'" in block[1] and "python -m pytest" in block[1]
    assert CI_MARKER.split(" (")[0] in (ROOT / ".ci" / "run").read_text(), ".ci/run no longer finds the block"


def test_the_readme_links_every_page_under_docs() -> None:
    linked = {path for _, path, _ in _local_links(README)}
    missing = [str(page.relative_to(ROOT)) for page in PAGES[1:] if page.resolve() not in linked]
    assert not missing, f"README.md does not link {missing}"

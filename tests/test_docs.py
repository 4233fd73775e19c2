"""The documentation holds together: links lead somewhere, every configuration key is
described, CI runs the README's test command, and nothing cites a document that is not in
the repository."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from proxy import config

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
_FENCED = re.compile(r"^```.*?^```", re.DOTALL | re.MULTILINE)
_LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
_HEADING = re.compile(r"^#{1,6} +(.+?) *#*$", re.MULTILINE)


def prose(page: Path) -> str:
    """A page without its fenced code blocks (which may hold brackets of their own)."""
    return _FENCED.sub("", page.read_text(encoding="utf-8"))


def slug(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation dropped, spaces to -."""
    text = re.sub(r"[^\w\- ]", "", heading.lower().replace("`", ""))
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    found: set[str] = set()
    for heading in _HEADING.findall(prose(page)):
        base = anchor = slug(heading)
        n = 0
        while anchor in found:  # GitHub numbers repeated headings: x, x-1, x-2
            n += 1
            anchor = f"{base}-{n}"
        found.add(anchor)
    return found


def links(page: Path) -> list[str]:
    return [target for target in _LINK.findall(prose(page))
            if not re.match(r"[a-z]+:", target)]  # http:, https:, mailto: lead elsewhere


def test_the_readme_and_the_docs_pages_exist() -> None:
    names = {page.name for page in PAGES}
    assert {"README.md", "configuration.md", "forwarding.md", "tokens.md", "rate-limits.md",
            "replicas.md", "operations.md", "security.md", "demo.md", "performance.md",
            "development.md"} <= names


@pytest.mark.parametrize("page", PAGES, ids=lambda page: page.name)
def test_every_relative_link_leads_to_a_file_and_heading_that_exist(page: Path) -> None:
    broken = []
    for target in links(page):
        path, _, fragment = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        if not linked.exists():
            broken.append(f"{target}: no such file")
        elif fragment and linked.suffix == ".md" and fragment not in anchors(linked):
            broken.append(f"{target}: no heading #{fragment} in {linked.name}")
    assert broken == []


def test_every_configuration_key_is_described_in_the_configuration_page() -> None:
    text = (ROOT / "docs" / "configuration.md").read_text(encoding="utf-8")
    sections = {name: value for name, value in vars(config).items()
                if name.endswith("_KEYS") and isinstance(value, tuple)}
    assert {"TOP_KEYS", "SET_KEYS", "LISTEN_KEYS"} <= sections.keys()
    missing = []
    for name, keys in sections.items():
        for key in keys:
            if name == "TOP_KEYS":
                wanted = f"`{key}"  # `listen.host`, `shutdown_timeout`
            elif name == "SET_KEYS":
                wanted = f"`{key}`"  # in the table of credentials.<set>
            else:
                wanted = f"`{name.removesuffix('_KEYS').lower()}.{key}`"
            if wanted not in text:
                missing.append(wanted)
    assert missing == []


def test_ci_runs_the_readmes_test_command_literally() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    found = re.search(r"<!-- test command -->\n```sh\n(.+?)\n```", readme)
    assert found is not None, "the README's test command is not marked"
    command = found[1]
    assert "\n" not in command  # one line to copy
    ci_lines = (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()
    assert any(line.startswith(command) for line in ci_lines)


# Built from pieces, so that this file does not match the search it makes.
_OUTSIDE = re.compile("|".join(["SPEC" + r" ?\u00a7", "SPEC" + r"\.md", "BOL-API" + r"\.md",
                                r"\bissue" + r" [0-9]+\b"]))
_SKIPPED = {".git", ".venv", "__pycache__", ".mypy_cache", ".pytest_cache", ".ruff_cache",
            ".hypothesis", "build", "dist"}


def test_nothing_cites_a_document_that_is_not_in_the_repository() -> None:
    citing = []
    for path in sorted(ROOT.rglob("*")):
        parts = path.relative_to(ROOT).parts
        if (not path.is_file() or _SKIPPED & set(parts) or path.suffix in (".pyc", ".whl")
                or any(part.endswith(".egg-info") for part in parts)):
            continue  # not the repository's text: tools' caches, build output
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        for number, line in enumerate(text.splitlines(), 1):
            if _OUTSIDE.search(line):
                citing.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()[:80]}")
    assert citing == []

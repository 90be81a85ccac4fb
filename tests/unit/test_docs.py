"""README is the front door and docs/ the reference (issue 17): README stays short and opens with `make run`,
every relative link resolves, and docs/cli.md names every option that `raylign ... --help` prints."""

import argparse
import re
from pathlib import Path

import pytest

from pipeline.cli import build_parser
from tests.conftest import REPO

README = REPO / "README.md"
CLI_MD = REPO / "docs" / "cli.md"
PAGES = [README, REPO / "ROADMAP.md", *sorted((REPO / "docs").glob("*.md"))]
# Linked from README but written by another change of issue 17 (the supported-architectures page); checked like
# any other link once it exists.
PENDING = {REPO / "docs" / "models.md"}

FENCE = re.compile(r"^```.*?^```[ \t]*$", re.S | re.M)
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
COMMAND = re.compile(r"^(\$ )?(make|raylign|\.venv/bin/\S+|python\S*|pip|ray|bash|docker|kubectl|git)( |$)")
OPTION = re.compile(r"(?<![\w-])--?[A-Za-z][\w-]*")


def commands_in_order(markdown: str) -> list[str]:
    """Every command a reader sees, in order: the lines of fenced code blocks and inline code spans that start
    with a command name."""
    found = []
    pos = 0
    for fence in [*FENCE.finditer(markdown), None]:
        prose = markdown[pos : fence.start() if fence else len(markdown)]
        found += [span for span in re.findall(r"`([^`\n]+)`", prose) if COMMAND.match(span)]
        if fence is None:
            break
        for line in fence.group(0).splitlines()[1:-1]:
            line = line.split("#", 1)[0].strip()
            if COMMAND.match(line):
                found.append(line)
        pos = fence.end()
    return found


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for heading in re.findall(r"^#{1,6} (.+)$", FENCE.sub("", page.read_text()), re.M):
        base = slug(heading)
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def broken_links(page: Path) -> list[str]:
    broken = []
    for target in LINK.findall(FENCE.sub("", page.read_text())):
        if re.match(r"[a-z]+:", target):
            continue  # http(s), mailto: not checked offline
        path_part, _, fragment = target.partition("#")
        dest = (page.parent / path_part).resolve() if path_part else page
        if dest in PENDING and not dest.exists():
            continue
        if not dest.exists():
            broken.append(f"{page.relative_to(REPO)}: {target}: no such file")
        elif fragment and dest.suffix == ".md" and fragment not in anchors(dest):
            broken.append(f"{page.relative_to(REPO)}: {target}: no heading #{fragment} in {dest.name}")
    return broken


def parsers(parser: argparse.ArgumentParser, path: tuple[str, ...] = ("raylign",)):
    """(command path, parser) for `raylign` and every command and subcommand below it."""
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from parsers(sub, (*path, name))


def sections(markdown: str) -> dict[tuple[str, ...], str]:
    """docs/cli.md's `## \\`raylign ...\\`` sections, keyed by their command path."""
    out = {}
    parts = re.split(r"^## ", FENCE.sub("", markdown), flags=re.M)
    for part in parts[1:]:
        heading, _, body = part.partition("\n")
        if m := re.fullmatch(r"`(raylign(?: [a-z]+)*)`", heading.strip()):
            out[tuple(m.group(1).split())] = body
    return out


COMMAND_PATHS = [path for path, _ in parsers(build_parser())]


def test_readme_is_at_most_20000_bytes():
    size = len(README.read_bytes())
    assert size <= 20_000, f"README.md is {size} bytes; move reference material to docs/"


def test_the_first_command_in_readme_is_make_run():
    commands = commands_in_order(README.read_text())
    assert commands, "README shows no command"
    assert commands[0] == "make run", f"the first command README shows is {commands[0]!r}, not `make run`"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_relative_link_points_to_an_existing_file(page):
    assert broken_links(page) == []


@pytest.mark.parametrize("path", COMMAND_PATHS, ids=" ".join)
def test_docs_cli_names_every_option_of_every_command(path):
    """Each option in `raylign <path> --help` appears in the docs/cli.md section of that command (or of the
    nearest command above it that has a section)."""
    parser = dict(parsers(build_parser()))[path]
    printed = set(OPTION.findall(parser.format_help()))
    declared = {s for action in parser._actions for s in action.option_strings}
    assert declared <= printed  # the pattern reads what --help prints
    docs = sections(CLI_MD.read_text())
    owner = max((p for p in docs if path[: len(p)] == p), key=len)
    missing = sorted(o for o in printed if not re.search(rf"(?<![\w-]){re.escape(o)}(?![\w-])", docs[owner]))
    assert missing == [], f"docs/cli.md section `{' '.join(owner)}` lacks {missing}"

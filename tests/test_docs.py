"""README.md and docs/: every relative link resolves, every `hrseg <command>` they name exists
and its --help runs, and the README stays a newcomer's page (<= 200 lines)."""
import re
from pathlib import Path

import pytest

from hrseg import cli

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", ROOT / "CHANGELOG.md", *sorted((ROOT / "docs").rglob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
COMMAND = re.compile(r"(?<![\w/.-])hrseg ([a-z][a-z-]*)\b")
# words after "hrseg" in prose that are not subcommands
PROSE = {"is", "in", "and", "or", "the", "a", "as", "to", "has", "itself", "command",
         "changes", "imports", "import", "on", "keeps", "does", "writes", "reads", "runs", "with"}


def _links(page: Path):
    for target in LINK.findall(page.read_text()):
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue                                   # external, or an anchor on the page
        yield target.split("#", 1)[0]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(page):
    missing = [t for t in _links(page) if not (page.parent / t).exists()]
    assert not missing, f"{page.relative_to(ROOT)} links to missing {missing}"


def _commands() -> set[str]:
    found = set()
    for page in PAGES:
        for code in re.findall(r"```.*?```|`[^`]+`", page.read_text(), flags=re.DOTALL):
            found |= {c for c in COMMAND.findall(code) if c not in PROSE}
    return found


def test_every_named_subcommand_exists_and_its_help_runs(capsys):
    parser = cli.build_parser()
    known = set(next(a for a in parser._actions if a.dest == "command").choices)
    named = _commands()
    assert {"train", "run", "memory"} <= named            # the scan finds what the pages name
    assert named <= known, f"the docs name unknown subcommands {sorted(named - known)}"
    for command in sorted(named):
        with pytest.raises(SystemExit) as done:
            parser.parse_args([command, "--help"])
        assert done.value.code == 0
        assert f"hrseg {command}" in capsys.readouterr().out


def test_the_readme_is_a_newcomers_page():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 200
    assert "make run" in text and "make test" in text
    assert not re.search(r"\b20\d\d-\d\d-\d\d\b", text), "dated measurements go to CHANGELOG.md"

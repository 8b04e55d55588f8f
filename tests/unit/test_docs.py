"""The documentation stays true to the code and to itself: the configuration reference is what
``scripts/config_reference.py`` generates from the code, the README stays a short front door that
starts with the two commands a newcomer runs, and no relative link points nowhere."""

import dataclasses
import importlib
import re
import sys
import textwrap
from pathlib import Path

import pytest

from conftest import REPO

if str(REPO) not in sys.path:  # ``scripts`` is a package of the repository root
    sys.path.insert(0, str(REPO))

from scripts import config_reference  # noqa: E402

README = REPO / "README.md"
DOCS = REPO / "docs"
MAX_README_LINES = 200

# The README's first two code blocks, exactly: install and run the default job; install and test.
RUN_COMMAND = ("python3 -m venv .venv && .venv/bin/pip install torch==2.13.0 -e . && "
               "PYTHON=.venv/bin/python launch/local.sh train --config configs/digits_fedavg.yaml")
TEST_COMMAND = ('python3 -m venv .venv && .venv/bin/pip install torch==2.13.0 -e ".[test]" && '
                ".venv/bin/python -m pytest -q")

_FENCE = re.compile(r"^```[^\n]*\n(.*?)^```", re.MULTILINE | re.DOTALL)
_LINK = re.compile(r"\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")


def fenced_blocks(text: str) -> list:
    """The contents of the ``` code blocks of a Markdown text, in order, without the fences."""
    return [block.strip("\n") for block in _FENCE.findall(text)]


def anchors(markdown: Path) -> set:
    """The heading anchors of a Markdown page, as GitHub makes them: lower case, punctuation
    but '-' and '_' dropped, spaces as '-', a repeated anchor numbered -1, -2, ..."""
    found, seen = set(), {}
    for heading in re.findall(r"^#{1,6}\s+(.+?)\s*#*$", _FENCE.sub("", markdown.read_text(
            encoding="utf-8")), re.MULTILINE):
        slug = re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")
        found.add(f"{slug}-{seen[slug]}" if slug in seen else slug)
        seen[slug] = seen.get(slug, 0) + 1
    return found


def broken_links(markdown: Path) -> list:
    """Relative link targets of ``markdown`` (outside code blocks) that name no existing path,
    or a heading that a Markdown page it names does not have."""
    text = _FENCE.sub("", markdown.read_text(encoding="utf-8"))
    broken = []
    for target in _LINK.findall(text):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.IGNORECASE):
            continue  # http:, mailto:, ...
        path, _, anchor = target.partition("#")
        file = markdown.parent / path if path else markdown
        if not file.exists() or (anchor and file.suffix == ".md" and anchor not in anchors(file)):
            broken.append(target)
    return broken


def test_the_configuration_reference_is_what_the_code_generates():
    committed = (DOCS / "configuration_reference.md").read_text(encoding="utf-8")
    assert committed == config_reference.render(), (
        "docs/configuration_reference.md differs from the code: "
        "run python -m scripts.config_reference")


def _dotted_keys(values: dict, prefix: str = "") -> list:
    keys = []
    for name, value in values.items():
        if isinstance(value, dict):
            keys += _dotted_keys(value, f"{prefix}{name}.")
        else:
            keys.append(f"{prefix}{name}")
    return keys


@pytest.mark.parametrize("overrides", [
    [],
    ["server.strategy=fedadam", "partition.method=dirichlet", "client.algorithm=fedprox",
     "data.name=image_folder", "data.root=photos"],
    ["task.name=sd_lora", "finetune.pretrained=base", "finetune.instance_prompt=a photo",
     "data.name=image_folder", "data.root=photos"],
])
def test_the_reference_documents_every_key_a_config_resolves_to(overrides):
    """Cross-check of the generator against the loader: each key of a resolved config (core,
    the named pieces' parameters, the task's sections) has its row."""
    from fedrun.config import load_config, to_dict

    reference = config_reference.render()
    missing = [key for key in _dotted_keys(to_dict(load_config(None, overrides)))
               if f"| `{key}` |" not in reference]
    assert not missing


PIECES = '''
from dataclasses import dataclass, field
from typing import List, Optional


@dataclass
class Base:
    alpha: float = 0.5
    """How much of the base."""
    undocumented: int = 3


@dataclass
class Derived(Base):
    names: List[str] = field(default_factory=lambda: ["a", "b"])
    """Names | with a pipe."""
    limit: Optional[int] = None


class Strategy:
    @dataclass
    class Params:
        momentum: float = 0.9
        """Server momentum,
        over two lines."""
'''


def test_field_docs_are_read_from_the_source_of_each_class(tmp_path, monkeypatch):
    """Inherited fields keep the declaring class's text, nested ``Params`` classes are found, a
    field without a string has none, and a table cell escapes the pipe."""
    (tmp_path / "doc_pieces_sample.py").write_text(textwrap.dedent(PIECES))
    monkeypatch.syspath_prepend(str(tmp_path))
    module = importlib.import_module("doc_pieces_sample")

    docs = config_reference.field_docs(module.Derived)
    assert [docs[f.name].doc for f in dataclasses.fields(module.Derived)] == [
        "How much of the base.", "", "Names | with a pipe.", ""]
    assert docs["limit"].annotation == "Optional[int]"
    assert config_reference.field_docs(module.Strategy.Params)["momentum"].doc == \
        "Server momentum, over two lines."
    rows = config_reference.field_table(module.Derived, "server.")
    assert "| `server.names` | `List[str]` | `[a, b]` | Names \\| with a pipe. |" in rows
    assert "| `server.limit` | `Optional[int]` | `null` |  |" in rows


def test_the_readme_is_a_front_door_of_at_most_200_lines():
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= MAX_README_LINES, (
        f"README.md has {len(lines)} lines; move detail to a page of docs/ and link it")


def test_the_readme_starts_with_the_run_and_the_test_command():
    blocks = fenced_blocks(README.read_text(encoding="utf-8"))
    assert blocks[:2] == [RUN_COMMAND, TEST_COMMAND]


@pytest.mark.parametrize("page", [README, *sorted(DOCS.glob("*.md"))],
                         ids=lambda p: str(p.relative_to(REPO)))
def test_every_relative_link_points_to_an_existing_file(page):
    assert broken_links(page) == [], f"{page.relative_to(REPO)}: links to missing files or headings"


def test_the_link_check_finds_missing_files_and_headings(tmp_path):
    (tmp_path / "there.md").write_text("# Part: `one`\n\n## Part: `one`\n")
    page = tmp_path / "page.md"
    page.write_text("# Top\n[ok](there.md#part-one-1) [gone](missing.md) "
                    "[web](https://example.org) [anchor](#top) ![img](gone.png) "
                    "[no heading](there.md#part-two) [lost](#end)"
                    "\n```bash\necho [not](a-link.md)\n```\n")
    assert broken_links(page) == ["missing.md", "gone.png", "there.md#part-two", "#end"]

"""The README's quick start and its numbers: the first two commands stay as they are, each timing of the default run
and of the suite says on what machine and under what load it was measured (the default run's on the docs' home page,
docs/index.md), and the Python API says where a local model comes from and how to make offline failures instant.
The README stays a five-minute read that links to the pages under docs/, and the docs' home page repeats its
commands and stage table as they are."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
INDEX = ROOT / "docs" / "index.md"  # the docs' home page
FIRST_COMMANDS = [
    "bash .ci/install && . .venv/bin/activate && dvc repro",
    "bash .ci/install && . .venv/bin/activate && python -m pytest",
]


def paragraph(text: str, page: Path = README) -> str:
    """The paragraph (or code block) of `page` (the README unless named) that contains `text`."""
    found = [p for p in page.read_text().split("\n\n") if text in p]
    assert found, f"{page.relative_to(ROOT)}: no paragraph with {text!r}"
    return found[0]


def section(page: Path, title: str) -> str:
    """The text under `## title` of `page`, up to the next section."""
    return page.read_text().split(f"\n## {title}\n", 1)[1].split("\n## ", 1)[0].strip()


def first_bash_block(page: Path) -> str:
    return re.search(r"```bash\n(.*?)```", page.read_text(), re.S).group(1)


def test_the_readme_starts_with_the_two_commands_unchanged():
    first_block = first_bash_block(README)
    assert [line for line in first_block.splitlines() if line and not line.startswith("#")] == FIRST_COMMANDS
    assert "~4 min on 2 cores" in first_block


def test_the_quick_start_timing_says_on_what_machine_and_under_what_load_it_was_measured():
    after_block = README.read_text().split("```bash\n", 1)[1].split("```\n", 1)[1].strip().split("\n\n")[0]
    assert "~4 min" in after_block and "AMD EPYC" in after_block and "idle" in after_block, after_block


@pytest.mark.parametrize("timing, page", [("The suite takes about", README), ("the whole `dvc repro` takes", INDEX)])
def test_the_default_run_and_suite_timings_name_the_machine_and_its_load(timing, page):
    text = paragraph(timing, page)
    assert "AMD EPYC" in text and "idle" in text, text


def test_the_python_api_says_where_a_local_model_comes_from_and_how_offline_failures_become_instant():
    ways_in = README.read_text().split("## Three ways in")[1].split("\n## ")[0]
    assert "artifacts/base/model" in ways_in and "dvc repro" in ways_in
    assert "HF_HUB_OFFLINE=1" in ways_in


def test_the_readme_is_a_five_minute_read():
    assert len(README.read_bytes()) <= 12_000, "README.md over 12 KB: move the details to a page under docs/"


def test_every_docs_link_of_the_readme_names_a_page_that_exists():
    links = re.findall(r"\]\((docs/[^)#\s]+)", README.read_text())
    assert len(links) >= 10, links
    assert [link for link in links if not (ROOT / link).is_file()] == []


def test_the_docs_home_page_repeats_the_commands_and_the_stage_table_as_the_readme_has_them():
    assert first_bash_block(INDEX) == first_bash_block(README)
    table = section(README, "Stages and artifacts").split("\n\n")[0]
    assert table.startswith("| stage | reads | writes |") and table.count("\n") == 8, table
    assert section(INDEX, "Stages and artifacts").split("\n\n")[0] == table


def test_the_vision_default_is_named_by_its_own_dvc_project_everywhere():
    old = ("params-vision.yaml", "results/vision", "dvclive-vision", "artifacts/vision", "dvc repro vision/dvc.yaml")
    pages = [README, *sorted((ROOT / "docs").glob("*.md"))]
    assert [(p.name, o) for p in pages for o in old if o in p.read_text()] == []
    assert "cd vision && dvc repro" in (ROOT / "docs" / "vision.md").read_text()

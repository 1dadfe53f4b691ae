"""The README's quick start and its numbers: the first two commands stay as they are, each timing of the default run
and of the suite says on what machine and under what load it was measured, and the Python API says where a local
model comes from and how to make offline failures instant."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
FIRST_COMMANDS = [
    "bash .ci/install && . .venv/bin/activate && dvc repro",
    "bash .ci/install && . .venv/bin/activate && python -m pytest",
]


def paragraph(text: str) -> str:
    """The README paragraph (or code block) that contains `text`."""
    found = [p for p in README.read_text().split("\n\n") if text in p]
    assert found, f"README: no paragraph with {text!r}"
    return found[0]


def test_the_readme_starts_with_the_two_commands_unchanged():
    first_block = re.search(r"```bash\n(.*?)```", README.read_text(), re.S).group(1)
    assert [line for line in first_block.splitlines() if line and not line.startswith("#")] == FIRST_COMMANDS
    assert "~1-2 min on 2 cores" in first_block


def test_the_quick_start_timing_says_on_what_machine_and_under_what_load_it_was_measured():
    after_block = README.read_text().split("```bash\n", 1)[1].split("```\n", 1)[1].strip().split("\n\n")[0]
    assert "~1-2 min" in after_block and "AMD EPYC" in after_block and "idle" in after_block, after_block


@pytest.mark.parametrize("timing", ["The suite takes about 13 minutes", "the whole `dvc repro` takes"])
def test_the_default_run_and_suite_timings_name_the_machine_and_its_load(timing):
    text = paragraph(timing)
    assert "AMD EPYC" in text and "idle" in text, text


def test_the_python_api_says_where_a_local_model_comes_from_and_how_offline_failures_become_instant():
    ways_in = README.read_text().split("## Three ways in")[1].split("\n## ")[0]
    assert "artifacts/base/model" in ways_in and "dvc repro" in ways_in
    assert "HF_HUB_OFFLINE=1" in ways_in

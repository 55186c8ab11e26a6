"""Every ```python block in README.md and docs/*.md runs as written."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"^```python\n(.*?)^```", re.DOTALL | re.MULTILINE)


def python_blocks():
    for path in DOCS:
        for number, match in enumerate(BLOCK.finditer(path.read_text()), 1):
            yield pytest.param(match.group(1), id=f"{path.relative_to(ROOT)}#{number}")


@pytest.mark.parametrize("source", list(python_blocks()))
def test_documented_example_runs(source):
    exec(compile(source, "<doc example>", "exec"), {"__name__": "__doc_example__"})


def test_docs_have_examples():
    assert len(list(python_blocks())) >= 5

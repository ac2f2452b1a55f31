"""The documentation keeps up with the examples: every notebook in ``examples/`` is in a docs
toctree (so it is built, executed and linked), and every notebook runs small under CI."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "examples").glob("*.md"))
TOCTREE = re.compile(r"^```\{toctree\}[^\n]*\n(.*?)^```", re.MULTILINE | re.DOTALL)


def toctree_entries() -> set[str]:
    """Every document named in a ``{toctree}`` block of a page in ``docs/``, as a path relative
    to ``docs/`` without suffix (options such as ``:maxdepth:`` skipped)."""
    entries = set()
    for page in (ROOT / "docs").rglob("*.md"):
        if "_build" in page.parts or page.parent.name == "examples":
            continue
        for block in TOCTREE.findall(page.read_text(encoding="utf-8")):
            for line in block.splitlines():
                line = line.strip()
                if line and not line.startswith(":"):
                    base = page.parent.relative_to(ROOT / "docs")
                    entries.add((base / line).as_posix().removesuffix(".md"))
    return entries


def test_there_are_notebooks():
    assert NOTEBOOKS, "no MyST notebooks found in examples/"


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda path: path.stem)
def test_notebook_is_in_a_docs_toctree(notebook):
    entries = toctree_entries()
    assert f"examples/{notebook.stem}" in entries, (
        f"examples/{notebook.name} is in no toctree of docs/; add 'examples/{notebook.stem}' to "
        "the toctree in docs/examples.md"
    )


def test_every_toctree_example_exists():
    names = {path.stem for path in NOTEBOOKS}
    missing = [
        entry
        for entry in toctree_entries()
        if entry.startswith("examples/") and entry.removeprefix("examples/") not in names
    ]
    assert not missing, f"docs toctree names notebooks that examples/ lacks: {missing}"


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda path: path.stem)
def test_notebook_is_a_myst_notebook_with_ci_settings(notebook):
    text = notebook.read_text(encoding="utf-8")
    assert text.startswith("---\n") and "kernelspec:" in text.split("\n---\n", 1)[0], (
        f"examples/{notebook.name} lacks the jupytext/myst-nb front matter with a kernelspec"
    )
    assert "```{code-cell}" in text, f"examples/{notebook.name} has no code cells"
    assert 'SMOKE = "CI" in os.environ' in text, (
        f'examples/{notebook.name} must pick small settings under CI: SMOKE = "CI" in os.environ'
    )

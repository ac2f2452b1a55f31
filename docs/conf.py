"""Sphinx configuration for the diffprior documentation.

Build (from the repository root): ``sphinx-build -W --keep-going -b html docs docs/_build/html``.
The example notebooks live in ``examples/`` (MyST markdown); they are copied into
``docs/examples/`` here and executed by myst-nb at every build. With the environment variable
``CI`` set they run with small settings.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import diffprior

DOCS = Path(__file__).resolve().parent
ROOT = DOCS.parent


def _copy_notebooks() -> None:
    """Mirror ``examples/*.md`` into ``docs/examples/`` (a generated, git-ignored folder)."""
    target = DOCS / "examples"
    target.mkdir(exist_ok=True)
    sources = {path.name: path for path in (ROOT / "examples").glob("*.md")}
    for stale in target.glob("*.md"):
        if stale.name not in sources:
            stale.unlink()
    for name, source in sources.items():
        destination = target / name
        if not destination.exists() or destination.read_bytes() != source.read_bytes():
            shutil.copy2(source, destination)


_copy_notebooks()

project = "diffprior"
author = "the diffprior authors"
copyright = "the diffprior authors, Apache-2.0"
release = diffprior.__version__
version = ".".join(release.split(".")[:2])

extensions = [
    "myst_nb",
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
]

exclude_patterns = ["_build", "jupyter_execute", "**.ipynb_checkpoints", "Thumbs.db", ".DS_Store"]

# -- MyST and notebooks ---------------------------------------------------------------------------
myst_enable_extensions = ["dollarmath", "amsmath", "colon_fence"]
myst_heading_anchors = 3
# Every build executes every notebook (outputs are never stale); NB_EXECUTION_MODE=cache or off
# speeds up local iterations on the prose.
nb_execution_mode = os.environ.get("NB_EXECUTION_MODE", "force")
nb_execution_timeout = 900
nb_execution_raise_on_error = True
nb_execution_show_tb = True
nb_merge_streams = True

# -- autodoc --------------------------------------------------------------------------------------
autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_typehints_description_target = "documented_params"
autodoc_default_options = {"members": True}
autoclass_content = "class"
napoleon_google_docstring = False
napoleon_numpy_docstring = True
napoleon_use_rtype = False

# -- HTML -----------------------------------------------------------------------------------------
html_theme = "sphinx_book_theme"
html_title = f"diffprior {release}"
html_theme_options = {
    "show_toc_level": 2,
    "navigation_with_keys": False,
}
html_static_path: list[str] = []

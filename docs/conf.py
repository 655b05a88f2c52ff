"""Sphinx configuration of the fastxent documentation.

Build: ``python -m sphinx -W -b html docs docs/_build/html`` (``.ci/run`` does,
with ``-W``: a warning fails the build). Pages are MyST Markdown, one per
topic; ``index.md`` lists the guide pages in order and picks up every other
page of this folder by a glob, so a new page needs no edit here.

The API reference is autodoc over the installed package (or ``src/`` of a
source tree whose extension is built). The optional modules
(``fastxent.torch``, ``fastxent.jax``, ``fastxent.dask``, ``fastxent.cem``,
...) are documented when they exist; the frameworks they need are mocked when
not installed, and a module that still cannot be imported is left out with
a message, not a warning.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import pkgutil
import sys

from docutils import nodes
from docutils.statemachine import StringList
from sphinx.ext.autodoc.mock import mock
from sphinx.util import logging
from sphinx.util.docutils import SphinxDirective

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
try:
    import fastxent  # the installed package
except ImportError:  # a source tree: the extension built in place
    sys.path.insert(0, os.path.join(ROOT, "src"))
    import fastxent

try:
    import tomllib
except ImportError:  # Python < 3.11
    import tomli as tomllib

with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
    release = tomllib.load(f)["project"]["version"]  # the one version of the project
version = release

project = "fastxent"
author = "the fastxent developers"
copyright = "the fastxent developers"

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "matplotlib.sphinxext.plot_directive",
]
source_suffix = {".md": "markdown", ".rst": "restructuredtext"}
root_doc = "index"
exclude_patterns = ["_build", "README.md", "Thumbs.db", ".DS_Store"]

myst_enable_extensions = ["colon_fence", "deflist", "dollarmath"]
myst_heading_anchors = 3  # [text](#a-heading) links within and across pages

autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_default_options = {"members": True}
napoleon_google_docstring = False
napoleon_numpy_docstring = True

# Frameworks of the optional modules that are not installed: mocked, so that
# their modules can be imported for their docstrings.
OPTIONAL_DEPS = ["torch", "jax", "jaxlib", "optax", "dask", "distributed", "tqdm", "ml_dtypes"]
autodoc_mock_imports = [m for m in OPTIONAL_DEPS if importlib.util.find_spec(m) is None]

# The plot directive runs the code of a page's ```{plot}``` block at build
# time: figures are drawn from the numbers in the page, never committed.
plot_include_source = False
plot_html_show_source_link = False
plot_html_show_formats = False
plot_formats = [("png", 110)]

html_theme = "alabaster"
html_title = f"fastxent {release}"
html_static_path: list[str] = []
html_theme_options = {"description": "Fast, exact CPU cross entropy", "fixed_sidebar": True}

logger = logging.getLogger(__name__)

# Modules documented on a page of their own, by hand, rather than by the
# optional-modules directive.
DOCUMENTED_ELSEWHERE = {"reference"}


class OptionalModules(SphinxDirective):
    """Autodoc of every public submodule of fastxent that exists in this tree.

    ``fastxent.torch``, ``fastxent.jax``, ... are found by walking the
    package, so the reference grows with the package; a module that cannot
    be imported even with its frameworks mocked is skipped (logged).
    """

    has_content = False

    def run(self):
        with mock(autodoc_mock_imports):  # walking imports the subpackages
            names = sorted(
                m.name
                for m in pkgutil.walk_packages(fastxent.__path__, prefix="fastxent.",
                                               onerror=lambda name: None)
                if not any(part.startswith("_") for part in m.name.split("."))
                and m.name.split(".", 1)[1] not in DOCUMENTED_ELSEWHERE
            )
        lines = []
        for name in names:
            with mock(autodoc_mock_imports):
                try:
                    importlib.import_module(name)
                except Exception as exc:  # noqa: BLE001 - any failure: leave it out
                    logger.info(f"[fastxent] {name} left out of the API reference: {exc!r}")
                    continue
            lines += [f".. rubric:: {name}", "", f".. automodule:: {name}", ""]
        return _parse_rst(self, lines, "<optional modules>")


def _parse_rst(directive, lines, source):
    """The nodes of reStructuredText ``lines`` parsed where ``directive`` stands.

    Autodoc writes reStructuredText, so in a MyST page its directives go
    through an eval-rst block.
    """
    if not lines:
        return []
    node = nodes.section()
    node.document = directive.state.document
    fenced = ["```{eval-rst}", *lines, "```"]
    directive.state.nested_parse(StringList(fenced, source=source), directive.content_offset, node)
    return node.children


class RemainingPublicNames(SphinxDirective):
    """Autodoc of every name in ``fastxent.__all__`` not documented above it.

    The reference lists the public functions by hand, in groups; a name
    added to the package since is documented here rather than missing.
    """

    has_content = False

    def run(self):
        documented = set(self.env.get_domain("py").objects)
        lines = []
        for name in fastxent.__all__:
            full = f"fastxent.{name}"
            if name.startswith("__") or full in documented:
                continue
            obj = getattr(fastxent, name)
            kind = "autoclass" if isinstance(obj, type) else "autofunction" if callable(obj) else "autodata"
            lines += [f".. {kind}:: {full}", ""]
        return _parse_rst(self, lines, "<remaining public names>")


def setup(app):
    app.add_directive("fastxent-optional-modules", OptionalModules)
    app.add_directive("fastxent-remaining-names", RemainingPublicNames)
    return {"parallel_read_safe": True}

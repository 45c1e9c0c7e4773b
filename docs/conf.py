"""Sphinx configuration for lime_attr."""
import os
import sys

sys.path.insert(0, os.path.abspath("../src"))
sys.path.insert(0, os.path.abspath("."))

project = "lime_attr"
author = "lime_attr developers"
copyright = "2026, lime_attr developers"
release = "0.1.0"

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.viewcode",
    "sphinx.ext.mathjax",
]
napoleon_google_docstring = False
napoleon_numpy_docstring = True
napoleon_use_rtype = False
autosummary_generate = True
autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_default_options = {"members": True, "show-inheritance": False}
nitpicky = False
suppress_warnings = ["autodoc.import_object"]
exclude_patterns = ["_build", "**/README.md"]
html_theme = "alabaster"
html_static_path = ["_static"]

# Generated pages (tables built from the registries) are written before the build.
try:
    import gen_architectures  # noqa: F401  (writes architectures_table.rst when present)
except ImportError:
    pass

"""Sphinx configuration for the django-scalekit documentation."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from django_scalekit import __version__  # noqa: E402

project = "django-scalekit"
author = "django-scalekit maintainers"
copyright = "2026, django-scalekit maintainers"
release = __version__
version = __version__

extensions = ["myst_parser"]
source_suffix = {".md": "markdown", ".rst": "restructuredtext"}
myst_enable_extensions = ["colon_fence", "deflist"]
myst_heading_anchors = 3
exclude_patterns = ["_build"]
html_theme = "furo"
html_title = f"django-scalekit {version}"
# Intersphinx is not used: its inventories are fetched over the network at
# build time, and the build must work (with -W) where only package indexes
# are reachable. Django's docs are linked by URL instead.

"""Sphinx configuration for the django-scalekit documentation."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sphinx.application import Sphinx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from django_scalekit import __version__  # noqa: E402

project = "django-scalekit"
author = "django-scalekit maintainers"
copyright = "2026, django-scalekit maintainers"
release = __version__
version = __version__

extensions = ["myst_parser", "sphinx.ext.intersphinx"]
source_suffix = {".md": "markdown", ".rst": "restructuredtext"}
myst_enable_extensions = ["colon_fence", "deflist"]
myst_heading_anchors = 3
exclude_patterns = ["_build"]
html_theme = "furo"
html_title = f"django-scalekit {version}"
# Links to Django's docs resolve against a committed copy of its inventory
# (docs/_inventories/django-5.2.inv, Django's objects.inv), not one fetched
# at build time: the build must work (with -W) where only package indexes are
# reachable. To refresh it: build Django's docs (`make dirhtml` in the
# docs/ of its sdist) or download https://docs.djangoproject.com/en/5.2/_objects/.
intersphinx_mapping = {
    "django": (
        "https://docs.djangoproject.com/en/5.2/",
        "_inventories/django-5.2.inv",
    ),
}
# Only explicit {external+django:...} roles and <inv:django:...> links go to
# Django's docs; a plain reference that does not resolve locally stays an error.
intersphinx_disabled_reftypes = ["*"]


def setup(app: Sphinx) -> None:
    # The object type Django's own docs declare for settings (its djangodocs
    # extension), so that {external+django:std:setting}`CACHES` resolves.
    app.add_crossref_type("setting", "setting", indextemplate="pair: %s; setting")

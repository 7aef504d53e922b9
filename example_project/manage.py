#!/usr/bin/env python
"""Django's command-line utility for the django-scalekit example project."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path


def main() -> None:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "example_project.settings")
    if importlib.util.find_spec("django_scalekit") is None:
        # Running from a checkout without `pip install -e .`: use the repo's copy.
        # Appended, so this directory's example_project package still wins.
        sys.path.append(str(Path(__file__).resolve().parent.parent))
    from django.core.management import execute_from_command_line

    execute_from_command_line(sys.argv)


if __name__ == "__main__":
    main()

"""Every ```python block of docs/*.md and README.md runs, so none rots.

Each block runs in a fresh namespace, with Django configured by
tests/settings.py; settings fragments (``MIDDLEWARE = [..., "x"]``) are plain
Python and run as they are. Markers, in an HTML comment right before a block
(only blank lines between), invisible in the rendered docs:

- ``<!-- skip-sample: reason -->``: not run (keep these rare, with a reason);
- ``<!-- sample-setup ... -->``: Python run first in the block's namespace,
  to define what the page assumes (a model, a Celery ``app``);
  ``<!-- sample-setup db ... -->`` also gives the block the test databases.

Models a block declares go to an isolated app registry, in ``testapp``.
"""

from __future__ import annotations

import re
import textwrap

import pytest
from django.test.utils import isolate_apps

from tests.conftest import ROOT

FILES = sorted((ROOT / "docs").glob("*.md")) + [ROOT / "README.md"]
FENCE = re.compile(
    r"^(?P<indent>[ \t]*)```python[ \t]*\n(?P<code>.*?)^(?P=indent)```[ \t]*$",
    re.S | re.M,
)
MARKER = re.compile(
    r"<!--\s*(?:skip-sample:(?P<skip>[^>]*?)|sample-setup(?P<db>[ \t]+db)?"
    r"(?P<setup>.*?))\s*-->\s*$",
    re.S,
)


def samples():
    for path in FILES:
        text = path.read_text()
        for match in FENCE.finditer(text):
            line = text.count("\n", 0, match.start()) + 1
            before = text[: match.start()].rstrip()
            marker = (
                MARKER.search(before[before.rfind("<!--") :])
                if before.endswith("-->")
                else None
            )
            code = textwrap.dedent(match["code"])
            marks = []
            setup = ""
            if marker and marker["skip"] is not None:
                reason = marker["skip"].strip()
                assert reason, f"{path.name}:{line}: skip-sample needs a reason"
                marks.append(pytest.mark.skip(reason=reason))
            elif marker:
                setup = textwrap.dedent(marker["setup"]).strip("\n")
                if marker["db"]:
                    marks.append(
                        pytest.mark.django_db(transaction=True, databases="__all__")
                    )
            yield pytest.param(
                path,
                line,
                setup,
                code,
                id=f"{path.relative_to(ROOT)}:{line}",
                marks=marks,
            )


def test_samples_are_found():
    found = list(samples())
    assert len(found) >= 20
    skipped = [p for p in found if p.marks and p.marks[0].name == "skip"]
    assert len(skipped) <= len(found) // 10, "skip-sample is for rare cases"


@pytest.mark.parametrize(("path", "line", "setup", "code"), list(samples()))
def test_sample_runs(path, line, setup, code):
    namespace = {"__name__": "tests.testapp.docs_sample"}
    with isolate_apps("tests.testapp"):
        if setup:
            exec(compile(setup, f"{path.name}:{line} (setup)", "exec"), namespace)
        # Line numbers in tracebacks match the file.
        exec(compile("\n" * line + code, str(path), "exec"), namespace)

"""The settings reference and the check list in docs/ must match the code."""

from __future__ import annotations

import re
from pathlib import Path

from django_scalekit import conf

ROOT = Path(__file__).resolve().parent.parent
ID = re.compile(r"scalekit\.[EW]\d{3}")


def test_every_check_id_is_documented_and_no_other():
    in_code = set()
    for path in (ROOT / "django_scalekit").rglob("*.py"):
        in_code |= set(ID.findall(path.read_text()))
    in_docs = set(ID.findall((ROOT / "docs" / "checks.md").read_text()))
    assert in_code == in_docs


def _settings_tables():
    """Rows of docs/settings.md per section: None for top-level keys, else the
    sub-dict named in a heading such as ``## ...: `SCALEKIT["CDN"]` ``."""
    tables = {None: {}}
    section = None
    for line in (ROOT / "docs" / "settings.md").read_text().splitlines():
        heading = re.match(r'#+ .*`SCALEKIT\["([A-Z_]+)"\]`', line)
        if heading:
            section = heading[1]
            tables.setdefault(section, {})
            continue
        match = re.match(r"\| `([A-Z][A-Z0-9_]*)` \| [^|]+ \| `([^`]*)` \|", line)
        if match:
            tables[section][match[1]] = match[2]
    return tables


def _assert_documented(rows, defaults):
    assert set(rows) == set(defaults)
    for key, (default, _meaning) in defaults.items():
        shown = rows[key]
        if isinstance(default, str):
            assert shown == f'"{default}"', key
        else:
            assert shown == repr(default), key


def test_every_subsection_setting_is_documented_with_its_default():
    tables = _settings_tables()
    _assert_documented(tables["CACHE"], conf.CACHE_DEFAULTS)
    _assert_documented(tables["CDN"], conf.CDN_DEFAULTS)
    _assert_documented(tables["HEALTH"], conf.HEALTH_DEFAULTS)
    _assert_documented(tables["SHARDING"], conf.SHARDING_DEFAULTS)


def test_every_setting_is_documented_with_its_default():
    rows = _settings_tables()[None]
    assert set(rows) == set(conf.DEFAULTS)
    for key, (default, _meaning) in conf.DEFAULTS.items():
        shown = rows[key]
        if isinstance(default, str):
            assert shown == f'"{default}"', key
        else:
            assert shown == repr(default), key

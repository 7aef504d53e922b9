"""The settings reference and the check list in docs/ must match the code."""

from __future__ import annotations

import re
import zlib
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


def _check_entries():
    """docs/checks.md entries: id -> its text (the ``: ...`` paragraph)."""
    entries = {}
    text = (ROOT / "docs" / "checks.md").read_text()
    for match in re.finditer(r"^`(scalekit\.[EW]\d{3})`\n((?:.+\n?)+)", text, re.M):
        assert match[1] not in entries, f"{match[1]} is listed twice"
        entries[match[1]] = match[2]
    return entries


def test_every_check_entry_says_how_to_fix_it():
    entries = _check_entries()
    assert set(entries) == set(ID.findall((ROOT / "docs" / "checks.md").read_text()))
    no_fix = [cid for cid, text in entries.items() if "Fix: " not in text]
    assert no_fix == []


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
    _assert_documented(tables["METRICS"], conf.METRICS_DEFAULTS)


def test_every_setting_is_documented_with_its_default():
    rows = _settings_tables()[None]
    assert set(rows) == set(conf.DEFAULTS)
    for key, (default, _meaning) in conf.DEFAULTS.items():
        shown = rows[key]
        if isinstance(default, str):
            assert shown == f'"{default}"', key
        else:
            assert shown == repr(default), key


def test_links_to_djangos_docs_resolve_in_the_committed_inventory():
    """docs/conf.py resolves {external+django:...} roles offline, against
    docs/_inventories/django-5.2.inv; a target missing there would fail the
    -W build only where Sphinx runs, so check it with the tests too."""
    # Sphinx's objects.inv, version 2: four header lines, then zlib-compressed
    # lines "name domain:role priority uri display-name".
    raw = (ROOT / "docs" / "_inventories" / "django-5.2.inv").read_bytes()
    header, _, body = raw.partition(b"zlib.\n")
    assert header.startswith(b"# Sphinx inventory version 2\n# Project: Django\n")
    data = {}
    for line in zlib.decompress(body).decode().splitlines():
        name, key, *_ = re.split(r"\s+", line, maxsplit=2)
        data.setdefault(key, set()).add(name)
    assert {"DATABASE_ROUTERS", "CACHES", "MIDDLEWARE"} <= set(data["std:setting"])
    role = re.compile(
        r"\{external\+django:(?:(std|py):)?(\w+)\}`(?:[^`<]*<)?~?([^`>]+)>?`"
    )
    found = 0
    for path in (ROOT / "docs").glob("*.md"):
        for domain, kind, target in role.findall(path.read_text()):
            domain = domain or "std"
            kinds = {"func": "function", "class": "class"}
            key = f"{domain}:{kinds.get(kind, kind)}"
            assert target in data.get(key, {}), f"{path.name}: {key} {target}"
            found += 1
    assert found >= 10

"""Read the example's settings from the environment: database and Redis URLs.

A tiny stand-in for dj-database-url, so the example needs nothing but Django:

* ``postgres://user:password@host:port/name?connect_timeout=2`` (or
  ``postgresql://``): PostgreSQL through psycopg;
* ``sqlite:///relative/path.sqlite3`` or ``sqlite:////absolute/path.sqlite3``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

_ENGINES = {
    "postgres": "django.db.backends.postgresql",
    "postgresql": "django.db.backends.postgresql",
    "pgsql": "django.db.backends.postgresql",
    "sqlite": "django.db.backends.sqlite3",
}


def database(url: str, base_dir: Path) -> dict[str, Any]:
    """A ``DATABASES`` entry from a URL (see the module docstring)."""
    parts = urlsplit(url)
    engine = _ENGINES.get(parts.scheme)
    if engine is None:
        raise ValueError(
            f"database URL {url!r}: scheme must be one of {sorted(_ENGINES)}"
        )
    if engine.endswith("sqlite3"):
        # sqlite:///db.sqlite3 is relative to the project, sqlite:////tmp/x absolute.
        path = unquote(parts.path)[1:]
        return {"ENGINE": engine, "NAME": base_dir / path if path else ":memory:"}
    entry: dict[str, Any] = {
        "ENGINE": engine,
        "NAME": unquote(parts.path.lstrip("/")),
        "USER": unquote(parts.username or ""),
        "PASSWORD": unquote(parts.password or ""),
        "HOST": parts.hostname or "",
        "PORT": str(parts.port or ""),
        # One connection per worker thread, kept between requests and checked
        # before reuse (scalekit.W022 under check --deploy).
        "CONN_MAX_AGE": 60,
        "CONN_HEALTH_CHECKS": True,
        "OPTIONS": dict(parse_qsl(parts.query)),
    }
    return entry


def flag(name: str, default: bool) -> bool:
    """A boolean environment variable: 1/true/yes/on."""
    value = os.environ.get(name)
    if value is None:
        return default
    return value.strip().lower() in {"1", "true", "yes", "on"}


def urls(name: str) -> list[str]:
    """A comma- or space-separated list of URLs (empty when unset)."""
    return os.environ.get(name, "").replace(",", " ").split()

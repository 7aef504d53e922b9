"""Settings of the test project under uvicorn: the test run's own databases."""

from __future__ import annotations

import os

from tests.settings import *  # noqa: F403
from tests.settings import DATABASES as _DATABASES

# The test database pytest-django created (the streaming replica carries it).
_NAME = os.environ["SCALEKIT_SERVE_DB"]
DATABASES = {
    alias: {**db, "NAME": _NAME}
    for alias, db in _DATABASES.items()
    if alias in ("default", "replica")
}
SCALEKIT = {"REPLICAS": ["replica"], "PINNING_SECONDS": 5}
MIDDLEWARE = [
    "tests.testapp.views.sync_only_middleware",
    "django_scalekit.middleware.PinningMiddleware",
    "tests.testapp.views.sync_only_middleware",
]

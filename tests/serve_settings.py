"""Settings of the Django instances the proxy tests serve with gunicorn."""

from __future__ import annotations

import os

from tests.settings import *  # noqa: F403
from tests.settings import DATABASES as _DATABASES

# The instances only run SELECT 1: the "postgres" database always exists.
DATABASES = {
    alias: {**db, "NAME": "postgres"}
    for alias, db in _DATABASES.items()
    if alias in ("default", "replica")
}
ROOT_URLCONF = "tests.serve_urls"
STATIC_URL = "/static/"
MIDDLEWARE = [
    "django_scalekit.middleware.HealthCheckMiddleware",
    # Above the CDN middleware on purpose (scalekit.W302): the order that lets
    # the pinning cookie arrive after the caching headers were decided.
    "django_scalekit.middleware.PinningMiddleware",
    "django_scalekit.middleware.CDNCacheMiddleware",
    # Validates the Host header (ALLOWED_HOSTS) for every other path.
    "django.middleware.common.CommonMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
]
SCALEKIT = {
    "REPLICAS": ["replica"],
    "PINNING_SECONDS": 5,
    "CDN": {
        "RULES": [
            {"PREFIX": "/api/", "CACHE": "public", "MAX_AGE": 0, "S_MAXAGE": 60},
            {"PREFIX": "/private/", "CACHE": "private", "MAX_AGE": 60},
        ],
        "TARGETED_HEADERS": ["CDN-Cache-Control"],
    },
    "HEALTH": {
        "CACHES": ["default"],
        "CHECKS": ["tests.serve_urls.flag_check"],
        "TIMEOUT": float(os.environ.get("SCALEKIT_HEALTH_TIMEOUT", "2")),
        "DRAIN_SECONDS": float(os.environ.get("SCALEKIT_HEALTH_DRAIN_SECONDS", "0")),
    },
}

if os.environ.get("SCALEKIT_SERVE_STRICT"):
    # Production-like: HTTPS only and a strict host list (issue 9's IP probe).
    SECURE_SSL_REDIRECT = True
    ALLOWED_HOSTS = ["shop.example.com"]
    MIDDLEWARE.insert(1, "django.middleware.security.SecurityMiddleware")

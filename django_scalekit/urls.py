"""Health endpoints as URL patterns: ``path("", include("django_scalekit.urls"))``.

Routed URLs go through host validation like any view; to answer load-balancer
probes addressed by IP, use ``HealthCheckMiddleware`` (first in MIDDLEWARE)
instead, which serves ``SCALEKIT["HEALTH"]["LIVE_PATH"]``/``["READY_PATH"]``.
"""

from __future__ import annotations

from django.urls import path

from django_scalekit import health

app_name = "scalekit"

urlpatterns = [
    path("health/live/", health.live, name="health-live"),
    path("health/", health.ready, name="health-ready"),
]

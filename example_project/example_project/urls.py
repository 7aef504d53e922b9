from __future__ import annotations

from django.conf import settings
from django.contrib.auth import views as auth_views
from django.urls import include, path, re_path
from django.views.static import serve

urlpatterns = [
    path("", include("shop.urls")),
    path("accounts/login/", auth_views.LoginView.as_view(), name="login"),
    path("accounts/logout/", auth_views.LogoutView.as_view(), name="logout"),
    # /health/ and /health/live/ (HealthCheckMiddleware answers them first;
    # the routed views are there for anyone who drops the middleware).
    path("", include("django_scalekit.urls")),
]

if not settings.DEBUG:
    # With DEBUG on, runserver serves static files itself. Without it, the
    # app serves the collected, fingerprinted files (CDNCacheMiddleware marks
    # them immutable, so Varnish or a CDN asks for each at most once); a real
    # deployment lets nginx serve STATIC_ROOT (deploy/nginx/).
    urlpatterns.append(
        re_path(
            r"^static/(?P<path>.*)$", serve, {"document_root": settings.STATIC_ROOT}
        )
    )

if settings.HAS_PROMETHEUS:
    # /metrics: django-prometheus' and django-scalekit's metrics (all
    # workers' when PROMETHEUS_MULTIPROC_DIR is set).
    urlpatterns.append(path("", include("django_prometheus.urls")))

"""WSGI application of the test project, served by gunicorn in tests/test_proxies.py."""

from __future__ import annotations

import os

from django.core.wsgi import get_wsgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.serve_settings")
application = get_wsgi_application()

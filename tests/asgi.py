"""ASGI application of the test project, served by uvicorn in tests/test_asgi.py."""

from __future__ import annotations

import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.asgi_settings")
application = get_asgi_application()

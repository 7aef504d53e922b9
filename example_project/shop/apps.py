from __future__ import annotations

import os
import sys

from django.apps import AppConfig


def _serving() -> bool:
    """True in the process of ``runserver`` that serves requests.

    With the autoreloader, ``runserver`` runs twice: a parent that only watches
    files, and a child (``RUN_MAIN=true``) that serves. Replicate in the child.
    """
    if "runserver" not in sys.argv:
        return False
    return os.environ.get("RUN_MAIN") == "true" or "--noreload" in sys.argv


class ShopConfig(AppConfig):
    name = "shop"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from django.conf import settings

        if _serving() and settings.SCALEKIT_EXAMPLE_SQLITE_REPLICA:
            from shop import replication

            replication.start(settings.SCALEKIT_EXAMPLE_REPLICA_LAG)

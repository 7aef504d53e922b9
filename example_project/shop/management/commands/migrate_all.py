"""``manage.py migrate_all``: ``migrate`` the primary, then every shard.

``manage.py migrate`` migrates one database (``--database``, default the
primary); the orders' tables and ID sequence live on the shards, which each
need their own run. The routers decide what goes where: ``ShardRouter`` puts
``Order`` on the shards only, and everything else on the primary only.
"""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.core.management import call_command
from django.core.management.base import BaseCommand


class Command(BaseCommand):
    help = "Migrate the primary, then every shard of the orders."

    def handle(self, *args: Any, **options: Any) -> None:
        verbosity = options["verbosity"]
        for alias in ["default", *settings.SHARDS]:
            if verbosity:
                self.stdout.write(f"migrate --database {alias}")
            call_command(
                "migrate", database=alias, interactive=False, verbosity=verbosity - 1
            )

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand

from shop import replication


class Command(BaseCommand):
    help = "Copy the primary and the shards onto their replicas once (what runserver does every few seconds)."

    def handle(self, *args: Any, **options: Any) -> None:
        if not settings.SCALEKIT_EXAMPLE_SQLITE_REPLICA:
            self.stdout.write("DATABASE_URL is set: replicas follow by themselves.")
            return
        for primary, replica in replication.pairs():
            replication.copy_to_replica(primary, replica)
            self.stdout.write(
                f"Copied {settings.DATABASES[primary]['NAME']} "
                f"onto {settings.DATABASES[replica]['NAME']}."
            )

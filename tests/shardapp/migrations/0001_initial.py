from __future__ import annotations

import uuid

import django.utils.timezone
from django.db import migrations, models

import django_scalekit.sharding


class Migration(migrations.Migration):
    initial = True

    dependencies: list[tuple[str, str]] = []

    operations = [
        # The sequence shard-aware IDs are drawn from, on every shard of the group.
        django_scalekit.sharding.CreateShardIdSequence("orders"),
        migrations.CreateModel(
            name="Event",
            fields=[
                (
                    "id",
                    django_scalekit.sharding.ShardedIDField(
                        primary_key=True, serialize=False
                    ),
                ),
                ("account", models.UUIDField(default=uuid.uuid4)),
                ("kind", models.CharField(max_length=20)),
            ],
            bases=(django_scalekit.sharding.ShardedModel, models.Model),
        ),
        migrations.CreateModel(
            name="Order",
            fields=[
                (
                    "id",
                    django_scalekit.sharding.ShardedIDField(
                        primary_key=True, serialize=False
                    ),
                ),
                ("customer_id", models.BigIntegerField(db_index=True)),
                ("amount", models.IntegerField(default=0)),
                ("status", models.CharField(default="new", max_length=20)),
                ("priority", models.IntegerField(blank=True, null=True)),
                ("created", models.DateTimeField(default=django.utils.timezone.now)),
            ],
            bases=(django_scalekit.sharding.ShardedModel, models.Model),
        ),
        migrations.CreateModel(
            name="Plain",
            fields=[
                (
                    "id",
                    models.BigAutoField(
                        auto_created=True,
                        primary_key=True,
                        serialize=False,
                        verbose_name="ID",
                    ),
                ),
                ("name", models.CharField(max_length=20)),
            ],
        ),
    ]

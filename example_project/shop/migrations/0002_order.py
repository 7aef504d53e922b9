from __future__ import annotations

import django.utils.timezone
from django.db import migrations, models

import django_scalekit.sharding


class Migration(migrations.Migration):
    dependencies = [("shop", "0001_initial")]

    operations = [
        # The ID sequence, on every shard of the "orders" group (a PostgreSQL
        # sequence, or a one-row table on SQLite shards).
        django_scalekit.sharding.CreateShardIdSequence("orders"),
        # On the shards only: ShardRouter.allow_migrate keeps it off the primary.
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
                ("product_id", models.BigIntegerField()),
                ("product_name", models.CharField(max_length=100)),
                ("quantity", models.PositiveIntegerField(default=1)),
                ("total", models.DecimalField(decimal_places=2, max_digits=10)),
                (
                    "created",
                    models.DateTimeField(default=django.utils.timezone.now),
                ),
            ],
            options={"ordering": ["-id"]},
            bases=(django_scalekit.sharding.ShardedModel, models.Model),
        ),
    ]

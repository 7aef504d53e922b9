from __future__ import annotations

import uuid

from django.db import models
from django.utils import timezone

from django_scalekit.sharding import ShardedIDField, ShardedManager, ShardedModel


class Order(ShardedModel, models.Model):
    shard_group = "orders"
    shard_key = "customer_id"

    id = ShardedIDField(primary_key=True)
    customer_id = models.BigIntegerField(db_index=True)
    amount = models.IntegerField(default=0)
    status = models.CharField(max_length=20, default="new")
    priority = models.IntegerField(null=True, blank=True)
    created = models.DateTimeField(default=timezone.now)

    objects = ShardedManager()

    class Meta:
        app_label = "shardapp"

    def __str__(self) -> str:
        return f"{type(self).__name__} {self.pk}"


class Event(ShardedModel, models.Model):
    """Keyed by a UUID, in the same group."""

    shard_group = "orders"
    shard_key = "account"

    id = ShardedIDField(primary_key=True)
    account = models.UUIDField(default=uuid.uuid4)
    kind = models.CharField(max_length=20)

    objects = ShardedManager()

    class Meta:
        app_label = "shardapp"

    def __str__(self) -> str:
        return f"{type(self).__name__} {self.pk}"


class Plain(models.Model):
    """An unsharded model: stays on the primary."""

    name = models.CharField(max_length=20)

    class Meta:
        app_label = "shardapp"

    def __str__(self) -> str:
        return self.name

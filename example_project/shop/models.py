from __future__ import annotations

from django.db import models
from django.utils import timezone

from django_scalekit.sharding import ShardedIDField, ShardedManager, ShardedModel


class Product(models.Model):
    """The catalog: unsharded, read-heavy, served from replicas and the cache."""

    name = models.CharField(max_length=100)
    price = models.DecimalField(max_digits=8, decimal_places=2)

    class Meta:
        ordering = ["-id"]  # newest first, so a new product is at the top

    def __str__(self) -> str:
        return self.name


class Order(ShardedModel, models.Model):
    """A customer's order, on the shard its customer hashes to.

    Sharded by ``customer_id`` (a ``django.contrib.auth`` user's pk, which
    stays on the primary): all of a customer's orders are on one shard, so
    ``Order.objects.for_key(customer_id)`` reads them with one query there.
    The product's id and name are plain values, not foreign keys: a relation
    cannot cross databases. The ID is a ``ShardedIDField``: 64 bits holding
    the time, the customer's bucket and a per-shard sequence, so
    ``Order.objects.get_by_id(pk)`` finds the shard from the ID alone.
    """

    shard_group = "orders"
    shard_key = "customer_id"

    id = ShardedIDField(primary_key=True)
    customer_id = models.BigIntegerField(db_index=True)
    product_id = models.BigIntegerField()
    product_name = models.CharField(max_length=100)
    quantity = models.PositiveIntegerField(default=1)
    total = models.DecimalField(max_digits=10, decimal_places=2)
    created = models.DateTimeField(default=timezone.now)

    objects = ShardedManager()

    class Meta:
        ordering = ["-id"]  # IDs start with the time: newest first

    def __str__(self) -> str:
        return f"Order {self.pk} of customer {self.customer_id}"

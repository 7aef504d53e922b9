"""``manage.py seed_demo``: demo customers, products and orders, in batches.

Sizes: ``small`` (default: 200 products, 10 customers, 300 orders) and
``large`` (100,000 products, 1,000 customers, 1,000,000 orders); ``--products``,
``--customers`` and ``--orders`` override one number. Rows are written with
``bulk_create`` in batches, with a progress line per few batches; orders on
the shards of their customers. ``--if-empty`` skips products when the primary
has some, and orders when the shards have some.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from decimal import Decimal
from typing import Any

from django.conf import settings
from django.contrib.auth.hashers import make_password
from django.contrib.auth.models import User
from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import transaction

from django_scalekit.routers import use_primary
from shop.models import Order, Product

SIZES = {
    "small": {"products": 200, "customers": 10, "orders": 300},
    "large": {"products": 100_000, "customers": 1_000, "orders": 1_000_000},
}
BATCH = 5_000
#: Every demo customer's password.
PASSWORD = "demo"

_ADJECTIVES = ["Sturdy", "Tiny", "Shiny", "Quiet", "Rapid", "Cosy", "Bold", "Handy"]
_NOUNS = ["Kettle", "Lamp", "Notebook", "Backpack", "Mug", "Scarf", "Clock", "Chair"]


class Command(BaseCommand):
    help = (
        "Create demo customers (customerN / demo), products and orders on the primary."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--size", choices=sorted(SIZES), default="small")
        for name in ("products", "customers", "orders"):
            parser.add_argument(
                f"--{name}", type=int, default=None, help=f"How many {name}."
            )
        parser.add_argument(
            "--if-empty",
            action="store_true",
            help="Add no products if there are some, and no orders if there are some.",
        )

    def handle(self, *args: Any, size: str, if_empty: bool, **options: Any) -> None:
        counts = dict(SIZES[size])
        for name in counts:
            if options[name] is not None:
                if options[name] < 0:
                    raise CommandError(f"--{name} {options[name]}: must be >= 0")
                counts[name] = options[name]
        # Outside use_primary() these reads would go to the replicas, which
        # may be stale or not created yet.
        with use_primary():
            have_products = if_empty and Product.objects.exists()
            # Orders are on the shards: count them on every shard.
            have_orders = if_empty and Order.objects.fan_out_count() > 0
            if have_products and have_orders:
                self.stdout.write(
                    f"The primary already has {Product.objects.count()} products and "
                    f"the shards {Order.objects.fan_out_count()} orders; not seeding."
                )
                return
            rng = random.Random()
            if have_products:
                self.stdout.write("The primary already has products; adding none.")
            else:
                self._products(rng, counts["products"])
            customer_ids = self._customers(counts["customers"])
            if have_orders:
                return
            products = list(
                Product.objects.order_by("-id").values_list("pk", "name", "price")[
                    :10_000
                ]
            )
            if counts["orders"] and not (customer_ids and products):
                raise CommandError("orders need at least one customer and one product")
            self._orders(rng, counts["orders"], customer_ids, products)

    def _products(self, rng: random.Random, count: int) -> None:
        def make(n: int) -> Iterator[Product]:
            for _ in range(n):
                yield Product(
                    name=f"{rng.choice(_ADJECTIVES)} {rng.choice(_NOUNS)}",
                    price=Decimal(rng.randrange(199, 9999)) / 100,
                )

        self._bulk("products", Product, count, make)

    def _customers(self, count: int) -> list[int]:
        existing = set(
            User.objects.filter(username__startswith="customer").values_list(
                "username", flat=True
            )
        )
        password = make_password(PASSWORD)  # hashed once, shared by all

        def make(n: int) -> Iterator[User]:
            for i in range(1, count + 1):
                name = f"customer{i}"
                if name not in existing:
                    yield User(username=name, password=password)

        self._bulk("customers", User, count - len(existing & _names(count)), make)
        return list(
            User.objects.filter(username__in=_names(count)).values_list("pk", flat=True)
        )

    def _orders(
        self,
        rng: random.Random,
        count: int,
        customer_ids: list[int],
        products: list[tuple[int, str, Decimal]],
    ) -> None:
        def make(n: int) -> Iterator[Order]:
            for _ in range(n):
                pk, name, price = rng.choice(products)
                quantity = rng.randint(1, 3)
                yield Order(
                    customer_id=rng.choice(customer_ids),
                    product_id=pk,
                    product_name=name,
                    quantity=quantity,
                    total=price * quantity,
                )

        # Each order goes to its customer's shard (ShardedQuerySet.bulk_create
        # splits a batch by shard); each ID is drawn from that shard.
        self._bulk("orders", Order, count, make, using=settings.SHARDS)

    def _bulk(
        self,
        label: str,
        model: Any,
        count: int,
        make: Callable[[int], Iterator[Any]],
        using: list[str] | None = None,
    ) -> None:
        """bulk_create ``count`` rows from ``make(count)`` in batches, reporting progress."""
        started = time.monotonic()
        done = 0
        rows = make(count)
        every = max(1, count // 20)
        next_report = every
        while True:
            batch = [row for _, row in zip(range(BATCH), rows, strict=False)]
            if not batch:
                break
            # One transaction per batch on every database written (on SQLite
            # shards, drawing IDs in it spares a commit per row).
            with ExitStack() as stack:
                for alias in using or ["default"]:
                    stack.enter_context(transaction.atomic(using=alias))
                model.objects.bulk_create(batch, batch_size=BATCH)
            done += len(batch)
            if done >= next_report or done == count:
                self._progress(label, done, count, started)
                next_report = done + every
        if done == 0:
            self.stdout.write(f"{label}: nothing to create")
        self.stdout.flush()

    def _progress(self, label: str, done: int, count: int, started: float) -> None:
        width = 30
        filled = width * done // max(count, 1)
        self.stdout.write(
            f"{label:>9} [{'#' * filled}{'.' * (width - filled)}] "
            f"{done:>9,}/{count:,} {time.monotonic() - started:6.1f} s"
        )


def _names(count: int) -> set[str]:
    return {f"customer{i}" for i in range(1, count + 1)}

"""Routing cost of ``ShardRouter`` beside the unsharded ``PrimaryReplicaRouter``.

Run from the repository root (pytest-benchmark is in the ``benchmark``
dependency group)::

    /work/venv312/bin/python -m pytest benchmarks/bench_sharding.py --benchmark-only

Like ``bench_router.py``, this module configures its own settings: SQLite
``:memory:`` databases (``default`` + ``replica``, and two shards with one
replica each), so no server is needed. Every case runs inside one routing
scope after its first read chose the replicas (the steady state of a request).
Groups compare, per query, what Django's ``router`` does for an unsharded
model with only ``PrimaryReplicaRouter`` installed against the same call with
``ShardRouter`` in front, for an unsharded and for a sharded model.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import django
import pytest
from django.conf import settings

_SQLITE = {"ENGINE": "django.db.backends.sqlite3", "NAME": ":memory:"}
settings.configure(
    SECRET_KEY="django-scalekit-benchmarks",
    USE_TZ=True,
    INSTALLED_APPS=["django.contrib.contenttypes", "django_scalekit"],
    DATABASES={
        alias: dict(_SQLITE)
        for alias in ("default", "replica", "shard0", "shard1", "shard0_r", "shard1_r")
    },
    DATABASE_ROUTERS=[],  # routers are built below and called directly
    SCALEKIT={
        "PRIMARY": "default",
        "REPLICAS": ["replica"],
        "SHARDING": {
            "GROUPS": {
                "orders": {
                    "MAP": {"0-511": "shard0", "512-1023": "shard1"},
                    "REPLICAS": {"shard0": ["shard0_r"], "shard1": ["shard1_r"]},
                }
            }
        },
    },
)
django.setup()

from django.apps import apps  # noqa: E402
from django.db import models  # noqa: E402
from django.db.utils import ConnectionRouter  # noqa: E402

from django_scalekit import conf, routers, sharding  # noqa: E402


class Order(sharding.ShardedModel, models.Model):  # noqa: DJ008
    shard_group = "orders"
    shard_key = "customer_id"
    id = sharding.ShardedIDField(primary_key=True)
    customer_id = models.BigIntegerField()
    objects = sharding.ShardedManager()

    class Meta:
        app_label = "django_scalekit"


PLAIN = apps.get_model("contenttypes", "ContentType")
UNSHARDED = ConnectionRouter(["django_scalekit.routers.PrimaryReplicaRouter"])
SHARDED = ConnectionRouter(
    [
        "django_scalekit.routers.ShardRouter",
        "django_scalekit.routers.PrimaryReplicaRouter",
    ]
)
KEY = 42  # bucket 122 -> shard0
ORDER = Order(id=sharding.compose_id(sharding.ID_EPOCH_MS, 122, 1), customer_id=KEY)


@pytest.fixture(autouse=True)
def _scope() -> Iterator[None]:
    conf.get()  # built once per settings change, not per call: build it now
    routers.reset_replica_state()
    with routers.routing_scope():
        # The scope's first reads choose the replicas and connect to them.
        assert UNSHARDED.db_for_read(PLAIN) == "replica"
        assert SHARDED.db_for_read(Order, shard_key=KEY) == "shard0_r"
        yield
    routers.reset_replica_state()


def read(router: ConnectionRouter, model: Any, **hints: Any) -> str:
    return router.db_for_read(model, **hints)


# --- 1. A read of an unsharded model: what ShardRouter in front costs -------


@pytest.mark.benchmark(group="1 read, unsharded model")
def test_unsharded_read_without_shard_router(benchmark):
    assert benchmark(UNSHARDED.db_for_read, PLAIN) == "replica"


@pytest.mark.benchmark(group="1 read, unsharded model")
def test_unsharded_read_with_shard_router(benchmark):
    assert benchmark(SHARDED.db_for_read, PLAIN) == "replica"


# --- 2. A read of a sharded model ------------------------------------------


@pytest.mark.benchmark(group="2 read, sharded model")
def test_sharded_read_for_key(benchmark):
    # Order.objects.for_key(42): hash the key, index the bucket table, route_read.
    assert benchmark(SHARDED.db_for_read, Order, shard_key=KEY) == "shard0_r"


@pytest.mark.benchmark(group="2 read, sharded model")
def test_sharded_read_by_id(benchmark):
    # Order.objects.get_by_id(id): the bucket comes from the ID, no hash.
    assert benchmark(SHARDED.db_for_read, Order, shard_bucket=122) == "shard0_r"


@pytest.mark.benchmark(group="2 read, sharded model")
def test_sharded_read_baseline_unsharded(benchmark):
    assert benchmark(UNSHARDED.db_for_read, PLAIN) == "replica"


# --- 3. A write -------------------------------------------------------------


@pytest.mark.benchmark(group="3 write")
def test_sharded_write_instance(benchmark):
    # Model.save(): the key read from the instance, hashed, routed.
    assert benchmark(SHARDED.db_for_write, Order, instance=ORDER) == "shard0"


@pytest.mark.benchmark(group="3 write")
def test_unsharded_write(benchmark):
    assert benchmark(UNSHARDED.db_for_write, PLAIN) == "default"


# --- 4. The hash alone --------------------------------------------------------


@pytest.mark.benchmark(group="4 shard_bucket()")
def test_hash_int(benchmark):
    assert benchmark(sharding.shard_bucket, KEY, 1024) == 122


@pytest.mark.benchmark(group="4 shard_bucket()")
def test_hash_str(benchmark):
    assert benchmark(sharding.shard_bucket, "customer-42", 1024) == 42

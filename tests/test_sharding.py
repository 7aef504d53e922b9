from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter

import pytest
from django.core.management import call_command
from django.db import connections, models
from django.db.models import Avg, Count, Max, Min, Sum
from django.test import override_settings
from django.test.utils import isolate_apps

from django_scalekit import checks, conf, sharding
from django_scalekit.routers import ShardRouter, routing_scope, use_primary
from django_scalekit.sharding import (
    ShardedIDField,
    ShardedManager,
    ShardedModel,
    ShardingError,
    ShardKeyRequired,
    id_bucket,
    id_time_ms,
    shard_bucket,
)
from tests.conftest import wait_until
from tests.shardapp.models import Event, Order, Plain

SHARDS = ["shard0", "shard1", "shard2"]
TWO = {"0-511": "shard0", "512-1023": "shard1"}
#: A third shard taking a third of each existing shard's buckets.
THREE = {
    "0-340": "shard0",
    "341-511": "shard2",
    "512-853": "shard1",
    "854-1023": "shard2",
}
router = ShardRouter()


def sharding_settings(**group):
    spec = {"SHARDS": SHARDS, "MAP": TWO, **group}
    return {"SHARDING": {"GROUPS": {"orders": spec}}}


def ids(messages):
    return [m.id for m in messages]


def problems(raw):
    return [p.id for p in conf.build(raw).problems]


def table(alias, model=Order):
    """(id, shard key) of every row physically in ``alias``: a raw cursor."""
    key = model._meta.get_field(model.shard_key).column
    with connections[alias].cursor() as cursor:
        cursor.execute(f"SELECT id, {key} FROM {model._meta.db_table} ORDER BY id")
        return cursor.fetchall()


def has_table(alias, name):
    with connections[alias].cursor() as cursor:
        cursor.execute("SELECT to_regclass(%s) IS NOT NULL", [name])
        return cursor.fetchone()[0]


# --- Hashing and the bucket map ---------------------------------------------


def test_hash_is_pinned_to_published_values():
    # BLAKE2b-64 of the key's canonical bytes, modulo the bucket count: these
    # values must never change, or every row would move.
    assert shard_bucket(42) == 122
    assert shard_bucket("customer-42") == 42
    assert shard_bucket(uuid.UUID("12345678-1234-5678-1234-567812345678")) == 989
    assert shard_bucket("12345678-1234-5678-1234-567812345678") == 989
    assert shard_bucket(2**70) == 481
    assert shard_bucket(-1, 7) == 3


def test_hash_is_the_same_in_another_process_with_another_hash_seed():
    keys = [*range(200), *(f"k{i}" for i in range(200))]
    code = (
        "from django_scalekit.sharding import shard_bucket;"
        f"print([shard_bucket(k) for k in {keys!r}])"
    )
    for seed in ("1", "12345"):
        out = subprocess.run(
            [sys.executable, "-c", code],
            env={**os.environ, "PYTHONHASHSEED": seed},
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        assert out.strip() == str([shard_bucket(k) for k in keys])


@pytest.mark.parametrize("bad", [1.5, None, True, object()])
def test_hash_refuses_other_types(bad):
    with pytest.raises(TypeError, match="shard key"):
        shard_bucket(bad)


def test_ten_thousand_keys_spread_evenly_over_two_shards():
    group = conf.get().sharding.groups["orders"]
    counts = Counter(group.alias_by_bucket[shard_bucket(k)] for k in range(10_000))
    assert set(counts) == {"shard0", "shard1"}
    for n in counts.values():
        assert abs(n - 5_000) <= 250, counts  # within 5% of even
    assert counts == {"shard0": 4969, "shard1": 5031}


def test_adding_a_third_shard_moves_a_third_of_keys_and_only_to_it():
    old = conf.get().sharding.groups["orders"].alias_by_bucket
    new = sharding.parse_map("orders", THREE)
    moved = [(old[b], new[b]) for b in (shard_bucket(k) for k in range(10_000))]
    moved = [(a, z) for a, z in moved if a != z]
    assert {z for _, z in moved} == {"shard2"}  # none moves between old shards
    assert abs(len(moved) - 10_000 / 3) <= 300, len(moved)
    assert len(moved) == 3315


# --- Settings (scalekit.E1xx / W1xx) -------------------------------------------


def test_test_settings_are_clean():
    assert conf.build().problems == ()
    group = conf.get().sharding.groups["orders"]
    assert group.buckets == 1024 and group.shards == tuple(SHARDS)
    assert (
        group.alias_by_bucket[511] == "shard0"
        and group.alias_by_bucket[512] == "shard1"
    )
    assert group.read_by_bucket[0] == conf.ReplicaGroup(
        "shard:shard0", "shard0", ("shard0_replica",), (1.0,), (1.0,)
    )
    assert conf.get().sharding.shard_of["shard1_replica"] == "shard1"


@pytest.mark.parametrize(
    ("group", "expected"),
    [
        ({"MAP": {"0-500": "shard0", "512-1023": "shard1"}}, ["scalekit.E104"]),
        ({"MAP": {"0-600": "shard0", "512-1023": "shard1"}}, ["scalekit.E105"]),
        ({"MAP": {"0-511": "shard0", "512-1023": "ghost"}}, ["scalekit.E106"]),
        ({"MAP": {"0-511": "shard0", "512-2000": "shard1"}}, ["scalekit.E103"]),
        ({"MAP": ["shard0"]}, ["scalekit.E103"]),
        ({"BUCKETS": 5000}, ["scalekit.E102"]),
        ({"BUCKETS": 0}, ["scalekit.E102"]),
        ({"SHARDS": ["shard0"]}, ["scalekit.E107"]),
        ({"SHARDS": [*SHARDS, "ghost"]}, ["scalekit.E106"]),
        ({"REPLICAS": {"shard0": ["shard1"]}}, ["scalekit.E108"]),
        ({"REPLICAS": {"shard9": ["shard0_replica"]}}, ["scalekit.E108"]),
        ({"REPLICAS": {"shard0": ["nowhere"]}}, ["scalekit.E106"]),
        ({"TYPO": 1}, ["scalekit.W102"]),
    ],
)
def test_group_misconfigurations(group, expected):
    assert problems(sharding_settings(**group)) == expected


def test_bucket_counts_and_single_buckets():
    raw = {
        "SHARDING": {
            "GROUPS": {"g": {"BUCKETS": 3, "MAP": {"0": "shard0", "1-2": "shard1"}}}
        }
    }
    built = conf.build(raw)
    assert built.problems == ()
    assert built.sharding.groups["g"].alias_by_bucket == ("shard0", "shard1", "shard1")


def test_section_misconfigurations():
    assert problems({"SHARDING": {"GROUPS": [], "X": 1}}) == [
        "scalekit.W101",
        "scalekit.E101",
    ]
    assert problems({"SHARDING": {"FANOUT_MAX_WORKERS": 0}}) == ["scalekit.E109"]
    assert problems({"SHARDING": {"RESHARD_BATCH_SIZE": "many"}}) == ["scalekit.E109"]
    # A shard must not be a database of the primary/replica router.
    clash = {
        "REPLICAS": ["replica"],
        "SHARDING": {"GROUPS": {"g": {"MAP": {"0-1023": "replica"}}}},
    }
    assert problems(clash) == ["scalekit.E117"]
    two_groups = {
        "SHARDING": {
            "GROUPS": {
                "a": {"MAP": {"0-1023": "shard0"}},
                "b": {"MAP": {"0-1023": "shard0"}},
            }
        }
    }
    assert problems(two_groups) == ["scalekit.E108"]


def test_error_message_says_what_to_change():
    (problem,) = conf.build(
        sharding_settings(MAP={"0-500": "shard0", "512-1023": "shard1"})
    ).problems
    assert "leaves buckets 501-511 unmapped" in problem.msg
    assert problem.hint == "Map every bucket 0-1023 to one alias."


# --- Model checks ---------------------------------------------------------------


def test_model_checks_clean():
    assert checks.check_sharding() == []


def test_checks_are_registered():
    with (
        override_settings(SCALEKIT={"SHARDING": {}}),
        pytest.raises(Exception, match=r"scalekit\.E110"),
    ):
        call_command("check", "--fail-level", "ERROR")


@override_settings(SCALEKIT={"SHARDING": {}})
def test_sharded_model_of_an_unknown_group():
    assert ids(checks.check_sharding()) == ["scalekit.E110", "scalekit.E110"]


@override_settings(DATABASE_ROUTERS=["django_scalekit.routers.PrimaryReplicaRouter"])
def test_sharding_without_shard_router():
    assert ids(checks.check_sharding()) == ["scalekit.E116"]


@override_settings(
    DATABASE_ROUTERS=[
        "django_scalekit.routers.PrimaryReplicaRouter",
        "django_scalekit.routers.ShardRouter",
    ]
)
def test_shard_router_after_replica_router():
    assert ids(checks.check_sharding()) == ["scalekit.E116"]


@isolate_apps("tests.shardapp")
def test_misdeclared_sharded_models():
    cfg = conf.get().sharding

    class NoKey(ShardedModel, models.Model):  # noqa: DJ008
        shard_group = "orders"
        shard_key = "customer"
        name = models.CharField(max_length=5)

        class Meta:
            app_label = "shardapp"

    class NoGroup(ShardedModel, models.Model):  # noqa: DJ008
        shard_key = "name"
        name = models.CharField(max_length=5)

        class Meta:
            app_label = "shardapp"

    class CrossDb(ShardedModel, models.Model):  # noqa: DJ008
        shard_group = "orders"
        shard_key = "customer_id"
        id = ShardedIDField(primary_key=True)
        customer_id = models.BigIntegerField()
        plain = models.ForeignKey(Plain, on_delete=models.CASCADE)
        objects = ShardedManager()

        class Meta:
            app_label = "shardapp"

    class PointsIn(models.Model):  # noqa: DJ008
        order = models.ForeignKey(Order, on_delete=models.CASCADE)

        class Meta:
            app_label = "shardapp"

    assert ids(checks.check_sharded_model(NoKey, cfg)) == [
        "scalekit.E111",
        "scalekit.E112",
        "scalekit.E113",
    ]
    assert ids(checks.check_sharded_model(NoGroup, cfg)) == ["scalekit.E110"]
    (error,) = checks.check_sharded_model(CrossDb, cfg)
    assert error.id == "scalekit.E114" and "unsharded" in error.msg
    assert ids(checks.check_sharded_model(PointsIn, cfg)) == ["scalekit.E115"]
    assert checks.check_sharded_model(Order, cfg) == []


@isolate_apps("tests.shardapp")
def test_foreign_keys_within_a_group_need_the_same_kind_of_key():
    cfg = conf.get().sharding

    class Line(ShardedModel, models.Model):  # noqa: DJ008
        shard_group = "orders"
        shard_key = "customer_id"
        id = ShardedIDField(primary_key=True)
        customer_id = models.BigIntegerField()
        order = models.ForeignKey(Order, on_delete=models.CASCADE)
        objects = ShardedManager()

        class Meta:
            app_label = "shardapp"

    class ByText(ShardedModel, models.Model):  # noqa: DJ008
        shard_group = "orders"
        shard_key = "customer"
        id = ShardedIDField(primary_key=True)
        customer = models.CharField(max_length=20)
        order = models.ForeignKey(Order, on_delete=models.CASCADE)
        event = models.ForeignKey(Event, on_delete=models.CASCADE)  # UUID: text
        objects = ShardedManager()

        class Meta:
            app_label = "shardapp"

    assert checks.check_sharded_model(Line, cfg) == []
    (error,) = checks.check_sharded_model(ByText, cfg)
    assert error.id == "scalekit.E118"
    assert "ByText.order" in error.msg and "BigIntegerField" in error.msg
    # At save: a child whose key sends it to another bucket than its
    # parent's ID is refused before anything is written.
    a, b = keys_on("shard0", 2)
    parent_id = sharding.compose_id(sharding.ID_EPOCH_MS + 5, shard_bucket(a), 1)
    with pytest.raises(ShardingError, match=r"Line.order is shardapp.Order .*E118"):
        Line(customer_id=b, order_id=parent_id).save()


# --- Routing ----------------------------------------------------------------


def test_unsharded_models_fall_through():
    assert router.db_for_read(Plain) is None
    assert router.db_for_write(Plain) is None
    assert router.allow_relation(Plain(), Plain()) is None


def test_router_decisions_without_a_database():
    with routing_scope():
        key0 = next(k for k in range(100) if shard_for(k) == "shard0")
        assert router.db_for_write(Order, instance=Order(customer_id=key0)) == "shard0"
        assert router.db_for_write(Order, shard_key=key0) == "shard0"
        with use_primary():
            assert router.db_for_read(Order, shard_bucket=600) == "shard1"


def test_unkeyed_query_is_refused():
    with pytest.raises(ShardKeyRequired, match=r"for_key\(key\)"):
        list(Order.objects.filter(status="new"))


def test_save_without_key_is_refused_and_writes_nothing():
    with pytest.raises(ShardKeyRequired, match="customer_id is None"):
        Order(amount=1).save()
    with pytest.raises(ShardKeyRequired):
        router.db_for_write(Order, instance=Order())


def test_for_key_validates_the_key():
    with pytest.raises(ValueError, match="key must not be empty"):
        Order.objects.for_key(None)
    with pytest.raises(
        ValueError, match=r"for_key\(key='abc'\): not a valid Order.customer_id"
    ):
        Order.objects.for_key("abc")
    with pytest.raises(ValueError, match=r"on_shard_of\(key='abc'\)"):
        Order.objects.on_shard_of("abc")
    with pytest.raises(
        ValueError, match=r"for_key\(key='nope'\): not a valid Event.account"
    ):
        Event.objects.for_key("nope")
    with pytest.raises(TypeError, match="get_by_id"):
        Order.objects.get_by_id("12")


def shard_for(key, model=Order):
    return sharding.shard_for_key(model, key)


def keys_on(alias, n, start=1):
    out, k = [], start
    while len(out) < n:
        if shard_for(k) == alias:
            out.append(k)
        k += 1
    return out


@pytest.mark.django_db(transaction=True, databases="__all__")
class TestPlacement:
    def test_rows_land_physically_on_their_shard_and_are_found_by_key_and_id(self):
        orders = [Order.objects.create(customer_id=k, amount=k) for k in range(1, 41)]
        for alias in ("shard0", "shard1"):
            rows = table(alias)
            assert rows, alias
            assert all(shard_for(key) == alias for _, key in rows)
        assert table("shard2") == []
        assert not has_table("default", "shardapp_order")  # never on the primary
        on_disk = sorted(row for alias in ("shard0", "shard1") for row in table(alias))
        assert on_disk == sorted((o.pk, o.customer_id) for o in orders)
        for order in orders:
            assert order._state.db == shard_for(order.customer_id)
            assert id_bucket(order.pk) == shard_bucket(order.customer_id)
            assert Order.objects.for_key(order.customer_id).get(pk=order.pk) == order
            found = Order.objects.get_by_id(order.pk)
            assert (found.customer_id, found._state.db) == (
                order.customer_id,
                order._state.db,
            )

    def test_for_key_returns_only_that_keys_rows(self):
        a, b = keys_on("shard0", 2)
        for k, n in ((a, 3), (b, 2)):
            Order.objects.bulk_create([Order(customer_id=k) for _ in range(n)])
        with use_primary():
            assert Order.objects.for_key(a).count() == 3
            assert Order.objects.for_key(str(b)).count() == 2
            assert {o.customer_id for o in Order.objects.for_key(a)} == {a}
            assert Order.objects.for_key(a).filter(status="new").count() == 3
            assert Order.objects.for_key(a).update(status="paid") == 3
            assert Order.objects.for_key(b).filter(status="paid").count() == 0
            # The shard-only routing: every row on a's shard, whatever its key.
            assert Order.objects.on_shard_of(a).count() == 5
            assert Order.objects.on_shard_of(a).db == "shard0"
            assert Order.objects.for_key(a).delete()[0] == 3
        assert sorted(k for _, k in table("shard0")) == [b, b]

    def test_uuid_keys(self):
        event = Event.objects.create(kind="signup")
        assert [row[0] for row in table(shard_for(event.account, Event), Event)] == [
            event.pk
        ]
        assert Event.objects.for_key(str(event.account)).get().pk == event.pk

    def test_reads_use_the_shard_replica_with_read_your_writes(self, replica):
        key0 = keys_on("shard0", 1)[0]
        key1 = keys_on("shard1", 1)[0]
        with routing_scope():
            order = Order.objects.create(customer_id=key0)
            # Pinned after the write: this shard's reads go to its primary ...
            assert Order.objects.for_key(key0).db == "shard0"
            assert Order.objects.get_by_id(order.pk)._state.db == "shard0"
            # ... the other shard's still go to its replica.
            assert Order.objects.for_key(key1).db == "shard1_replica"
        with routing_scope():  # the next request
            assert Order.objects.for_key(key0).db == "shard0_replica"
            assert wait_until(
                lambda: Order.objects.for_key(key0).filter(pk=order.pk).exists()
            )
            assert Order.objects.get_by_id(order.pk)._state.db == "shard0_replica"
            with use_primary():
                assert Order.objects.for_key(key0).db == "shard0"

    def test_ids_embed_the_bucket_and_sort_by_time(self):
        before = time.time() * 1000
        orders = [Order.objects.create(customer_id=k) for k in keys_on("shard0", 5)]
        after = time.time() * 1000
        pks = [o.pk for o in orders]
        times = [id_time_ms(pk) for pk in pks]
        assert times == sorted(times) and len(set(pks)) == 5
        for o in orders:
            assert 0 < o.pk < 2**63
            assert before - 2000 <= id_time_ms(o.pk) <= after + 2000

    def test_ids_do_not_collide_across_concurrent_sessions(self):
        drawn, errors = [], []

        def draw():
            try:
                drawn.extend(sharding.new_id(Order, 7) for _ in range(300))
            except Exception as exc:  # pragma: no cover - reported below
                errors.append(exc)
            finally:
                connections.close_all()

        threads = [threading.Thread(target=draw) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == []
        assert len(drawn) == 1800 and len(set(drawn)) == 1800
        assert {id_bucket(i) for i in drawn} == {shard_bucket(7)}

    def test_wrong_database_and_key_changes_are_refused(self):
        key0, key1 = keys_on("shard0", 1)[0], keys_on("shard1", 1)[0]
        with pytest.raises(ShardingError, match="sends it to 'shard0'"):
            Order(customer_id=key0).save(using="shard1")
        with pytest.raises(ValueError, match="another bucket"):
            Order.objects.for_key(key0).create(customer_id=key1)
        order = Order.objects.create(customer_id=key0)
        order.customer_id = key1
        with pytest.raises(ShardingError, match="cannot change"):
            order.save()
        assert table("shard1") == []
        assert table("shard0") == [(order.pk, key0)]

    def test_updates_and_deletes_stay_on_the_shard(self):
        key = keys_on("shard1", 1)[0]
        order = Order.objects.create(customer_id=key, amount=1)
        order.amount = 5
        order.save()
        assert Order.objects.for_key(key).filter(pk=order.pk).update(status="paid") == 1
        with use_primary():
            assert Order.objects.get_by_id(order.pk).amount == 5
        order.refresh_from_db()
        assert order.status == "paid"
        order.delete()
        assert table("shard1") == []

    def test_bulk_create_splits_rows_by_shard(self):
        objs = Order.objects.bulk_create(
            [Order(customer_id=k) for k in range(100, 130)]
        )
        assert len({o.pk for o in objs}) == 30
        for alias in ("shard0", "shard1"):
            assert sorted(k for _, k in table(alias)) == sorted(
                k for k in range(100, 130) if shard_for(k) == alias
            )

    def test_tables_exist_only_where_they_belong(self):
        for alias in SHARDS:
            assert has_table(alias, "shardapp_order") and has_table(
                alias, "shardapp_event"
            )
            assert not has_table(alias, "shardapp_plain")
            assert not has_table(alias, "django_content_type")
        assert has_table("default", "shardapp_plain")
        assert not has_table("default", "shardapp_event")
        assert router.allow_migrate("shard0_replica", "shardapp", "order") is False
        assert router.allow_migrate("shard0", "shardapp", "plain") is False
        assert router.allow_migrate("default", "shardapp", "plain") is None
        assert router.allow_migrate("default", "shardapp", "order") is False

    def test_relations_only_within_one_shard(self):
        a, b = keys_on("shard0", 2)
        c = keys_on("shard1", 1)[0]
        oa, ob, oc = (Order.objects.create(customer_id=k) for k in (a, b, c))
        assert router.allow_relation(oa, ob) is True
        assert router.allow_relation(oa, oc) is False
        plain = Plain.objects.create(name="p")
        assert router.allow_relation(oa, plain) is False


# --- Fan-out --------------------------------------------------------------------


@pytest.mark.django_db(transaction=True, databases="__all__")
class TestFanOut:
    @pytest.fixture
    def orders(self):
        rows = [
            Order(
                customer_id=k,
                amount=(k * 37) % 101,
                priority=None if k % 5 == 0 else k % 3,
            )
            for k in range(1, 61)
        ]
        return Order.objects.bulk_create(rows)

    def test_merges_respecting_order_and_slicing(self, orders):
        assert {shard_for(o.customer_id) for o in orders} == {"shard0", "shard1"}
        expected = sorted(orders, key=lambda o: (-o.amount, o.pk))
        got = Order.objects.order_by("-amount", "id")[3:17].fan_out()
        assert [o.pk for o in got] == [o.pk for o in expected[3:17]]
        # The scope wrote to both shards: their primaries answered.
        assert {o._state.db for o in got} == {"shard0", "shard1"}

    def test_nulls_sort_last_as_in_postgresql(self, orders):
        got = list(
            Order.objects.order_by("priority", "id")
            .values_list("priority", "id")
            .fan_out()
        )
        expected = sorted(
            ((o.priority, o.pk) for o in orders),
            key=lambda r: (r[0] is None, r[0] or 0, r[1]),
        )
        assert got == expected

    def test_values_and_filters(self, orders):
        got = (
            Order.objects.filter(amount__gte=50)
            .order_by("customer_id")
            .values("customer_id")
            .fan_out()
        )
        assert [r["customer_id"] for r in got] == sorted(
            o.customer_id for o in orders if o.amount >= 50
        )

    def test_count_and_aggregates_are_combined(self, orders):
        assert Order.objects.fan_out_count() == 60
        assert Order.objects.filter(amount__lt=50).fan_out_count() == sum(
            o.amount < 50 for o in orders
        )
        assert Order.objects.all()[10:25].fan_out_count() == 15
        assert Order.objects.fan_out_aggregate(
            n=Count("id"), total=Sum("amount"), low=Min("amount"), high=Max("amount")
        ) == {
            "n": 60,
            "total": sum(o.amount for o in orders),
            "low": min(o.amount for o in orders),
            "high": max(o.amount for o in orders),
        }
        assert Order.objects.filter(amount__lt=0).fan_out_aggregate(
            total=Sum("amount")
        ) == {"total": None}

    def test_uncombinable_aggregates_are_refused(self):
        with pytest.raises(ValueError, match="Sum / Count"):
            Order.objects.fan_out_aggregate(avg=Avg("amount"))
        with pytest.raises(ValueError, match="order_by"):
            Order.objects.order_by("?").fan_out()

    def test_worker_connections_are_closed(self, orders):
        def backends():
            with connections["default"].cursor() as cursor:
                cursor.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = %s",
                    [connections["shard0"].settings_dict["NAME"]],
                )
                return cursor.fetchone()[0]

        connections["shard0"].close()
        before = backends()
        with use_primary():
            for _ in range(3):
                assert len(Order.objects.fan_out()) == 60
        # <=: a connection another test left open may close meanwhile.
        assert wait_until(lambda: backends() <= before, timeout=5)


# --- Shard-aware IDs on SQLite ----------------------------------------------------


def test_id_sql_per_vendor():
    assert sharding.id_sql("postgresql") == [sharding._ID_SQL]
    assert "nextval" in sharding.id_sql("postgresql")[0]
    [sql] = sharding.id_sql("sqlite")
    assert sql.startswith("UPDATE scalekit_shard_id_seq SET value = value + 1")
    assert "RETURNING value" in sql
    assert [s.split()[0] for s in sharding.id_sql("sqlite", returning=False)] == [
        "UPDATE",
        "SELECT",
    ]
    assert sharding.create_sequence_sql("postgresql") == [
        "CREATE SEQUENCE IF NOT EXISTS scalekit_shard_id_seq"
    ]
    assert [s.split()[0] for s in sharding.create_sequence_sql("sqlite")] == [
        "CREATE",
        "INSERT",
    ]


@pytest.mark.parametrize("returning", [True, False])
def test_sqlite_sequence_counts_up_with_the_clock(tmp_path, returning):
    import sqlite3

    if returning and sqlite3.sqlite_version_info < (3, 35):  # pragma: no cover
        pytest.skip(f"SQLite {sqlite3.sqlite_version} has no RETURNING")
    db = sqlite3.connect(tmp_path / "shard.sqlite3", isolation_level=None)
    for _ in range(2):  # idempotent, as a migration re-run must be
        for sql in sharding.create_sequence_sql("sqlite"):
            db.execute(sql)
    drawn = []
    for _ in range(3):
        before = time.time() * 1000
        db.execute("BEGIN IMMEDIATE")
        for sql in sharding.id_sql("sqlite", returning=returning):
            row = db.execute(sql).fetchone()
        db.execute("COMMIT")
        assert before - 5 <= row[1] <= time.time() * 1000 + 5
        drawn.append(row[0])
    assert drawn == [1, 2, 3]


#: A Django project on two SQLite shard files, run in subprocesses (the test
#: settings' DATABASES are PostgreSQL and fixed at startup).
_SQLITE_PROJECT = """
import json, sys
import django
from django.conf import settings

tmp = sys.argv[1]
settings.configure(
    DATABASES={
        alias: {"ENGINE": "django.db.backends.sqlite3", "NAME": f"{tmp}/{alias}.sqlite3",
                "OPTIONS": {"timeout": 30}}
        for alias in ("default", "shard0", "shard1")
    },
    INSTALLED_APPS=["django.contrib.contenttypes", "django_scalekit", "tests.shardapp"],
    DATABASE_ROUTERS=["django_scalekit.routers.ShardRouter",
                      "django_scalekit.routers.PrimaryReplicaRouter"],
    SCALEKIT={"PRIMARY": "default", "REPLICAS": [], "SHARDING": {"GROUPS": {"orders": {
        "SHARDS": ["shard0", "shard1"], "MAP": {"0-511": "shard0", "512-1023": "shard1"}}}}},
    USE_TZ=True,
)
django.setup()
from django.core.management import call_command
from tests.shardapp.models import Order

if sys.argv[2] == "migrate":
    for alias in ("default", "shard0", "shard1"):
        call_command("migrate", database=alias, verbosity=0)
else:
    keys = json.loads(sys.argv[3])
    orders = [Order.objects.create(customer_id=k, amount=1) for k in keys]
    found = [Order.objects.get_by_id(o.pk)._state.db for o in orders]
    print(json.dumps([[o.pk, o.customer_id, o._state.db, db] for o, db in zip(orders, found)]))
"""


@pytest.mark.slow
def test_sqlite_shards_draw_unique_ids_across_concurrent_processes(tmp_path):
    import json
    import sqlite3

    script = tmp_path / "project.py"
    script.write_text(_SQLITE_PROJECT)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": root}
    env.pop("DJANGO_SETTINGS_MODULE", None)

    def run(*args):
        return subprocess.Popen(
            [sys.executable, str(script), str(tmp_path), *args],
            env=env,
            cwd=root,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    migrate = run("migrate")
    _, err = migrate.communicate(timeout=60)
    assert migrate.returncode == 0, err
    # Four writers at once, most keys on shard0: one SQLite file, concurrent writers.
    keys = keys_on("shard0", 400) + keys_on("shard1", 40)
    procs = [run("create", json.dumps(keys[i::4])) for i in range(4)]
    rows = []
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        rows += json.loads(out)
    pks = [pk for pk, *_ in rows]
    assert len(rows) == 440 and len(set(pks)) == 440
    now = time.time() * 1000
    for pk, key, db, found_on in rows:
        assert id_bucket(pk) == shard_bucket(key)
        assert db == found_on == shard_for(key)
        assert now - 120_000 <= id_time_ms(pk) <= now + 1000
    for alias in ("shard0", "shard1"):
        with sqlite3.connect(tmp_path / f"{alias}.sqlite3") as db:
            on_disk = db.execute(
                "SELECT id, customer_id FROM shardapp_order"
            ).fetchall()
            (drawn,) = db.execute("SELECT value FROM scalekit_shard_id_seq").fetchone()
        assert sorted(on_disk) == sorted((pk, k) for pk, k, d, _ in rows if d == alias)
        assert drawn == len(on_disk)  # one number per row, none lost or repeated
    with sqlite3.connect(tmp_path / "default.sqlite3") as db:
        tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master")}
    assert "shardapp_order" not in tables and "scalekit_shard_id_seq" not in tables

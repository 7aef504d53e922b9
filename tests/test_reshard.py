from __future__ import annotations

import json
from io import StringIO

import pytest
from django.conf import settings
from django.core.management import call_command
from django.core.management.base import CommandError
from django.db import connections
from django.test import override_settings

from django_scalekit import sharding
from django_scalekit.routers import use_primary
from django_scalekit.sharding import shard_bucket
from tests.shardapp.models import Event, Order
from tests.test_sharding import SHARDS, THREE, TWO, table

pytestmark = pytest.mark.django_db(transaction=True, databases="__all__")

ROWS = 600


def three_shards():
    raw = dict(settings.SCALEKIT)
    raw["SHARDING"] = {
        "GROUPS": {"orders": {**raw["SHARDING"]["GROUPS"]["orders"], "MAP": THREE}}
    }
    return override_settings(SCALEKIT=raw)


@pytest.fixture
def rows():
    orders = Order.objects.bulk_create(
        [Order(customer_id=k, amount=k % 97) for k in range(1, ROWS + 1)]
    )
    events = Event.objects.bulk_create([Event(kind=f"e{k}") for k in range(50)])
    return orders, events


def everywhere(model=Order):
    """Every (id, key) row on every shard, with duplicates kept."""
    return sorted(row for alias in SHARDS for row in table(alias, model))


def placement_is(new_map, model=Order):
    table_ = sharding.parse_map("orders", new_map)
    for alias in SHARDS:
        for _id, key in table(alias, model):
            assert table_[shard_bucket(key)] == alias, (alias, key)


def test_plan_lists_moves_with_row_counts_and_changes_nothing(rows):
    orders, events = rows
    before = everywhere()
    out = StringIO()
    call_command("scalekit_reshard", "--plan", json.dumps(THREE), stdout=out)
    text = out.getvalue()
    new = sharding.parse_map("orders", THREE)
    moving = [o for o in orders if new[shard_bucket(o.customer_id)] == "shard2"]
    from_0 = sum(1 for o in moving if shard_bucket(o.customer_id) < 512)
    from_1 = len(moving) - from_0
    ev0 = sum(1 for e in events if 341 <= shard_bucket(e.account) <= 511)
    ev1 = sum(1 for e in events if shard_bucket(e.account) >= 854)
    assert "341 of 1024 buckets change database" in text
    assert f"{len(moving) + ev0 + ev1} rows move" in text
    assert (
        f"buckets 341-511: shard0 -> shard2: {from_0 + ev0} rows "
        f"(shardapp.Event {ev0}, shardapp.Order {from_0})" in text
    )
    assert f"buckets 854-1023: shard1 -> shard2: {from_1 + ev1} rows" in text
    assert "nothing was changed" in text
    assert everywhere() == before


def test_plan_moves_per_bucket(rows):
    moves = sharding.plan_reshard("orders", sharding.parse_map("orders", THREE))
    assert len(moves) == 341
    assert {(m.source, m.target) for m in moves} == {
        ("shard0", "shard2"),
        ("shard1", "shard2"),
    }
    assert sum(m.rows.get("shardapp.Order", 0) for m in moves) == sum(
        1
        for k in range(1, ROWS + 1)
        if sharding.parse_map("orders", THREE)[shard_bucket(k)] == "shard2"
    )


def test_apply_moves_every_row_once_and_the_new_map_finds_them(rows):
    orders, events = rows
    before = everywhere()
    out = StringIO()
    call_command(
        "scalekit_reshard",
        "--apply",
        json.dumps(THREE),
        "--batch-size",
        "50",
        stdout=out,
    )
    assert everywhere() == before  # none lost, none duplicated
    assert everywhere(Event) == sorted((e.pk, e.account) for e in events)
    placement_is(THREE)
    placement_is(THREE, Event)
    assert table("shard2")
    assert "rows/s" in out.getvalue() and "Now set" in out.getvalue()
    # (From the primaries: the replicas may not have replayed the move yet.)
    with three_shards(), use_primary():
        for order in orders[::25]:
            found = Order.objects.get_by_id(order.pk)
            assert found.customer_id == order.customer_id
            assert Order.objects.for_key(order.customer_id).filter(pk=order.pk).exists()
        # Run again under the new map: nothing is left to move.
        out = StringIO()
        call_command("scalekit_reshard", "--apply", stdout=out)
        assert "No rows to move." in out.getvalue()


def test_interrupted_apply_loses_nothing_and_a_rerun_finishes(rows):
    before = everywhere()
    new_map = sharding.parse_map("orders", THREE)

    def crash(batches):
        if batches == 3:
            raise RuntimeError("killed after 3 batches")

    with pytest.raises(RuntimeError, match="3 batches"):
        sharding.apply_reshard("orders", new_map, batch_size=20, after_batch=crash)
    # Mid-way: every row exactly once, some already moved.
    assert everywhere() == before
    moved = len(table("shard2"))
    assert moved == 60
    result = sharding.apply_reshard("orders", new_map, batch_size=20)
    assert everywhere() == before
    placement_is(THREE)
    assert (
        result.rows
        == sum(1 for _ in table("shard2")) + len(table("shard2", Event)) - moved
    )


def test_rows_on_both_databases_after_a_crash_are_not_duplicated(rows):
    # A crash between the target's commit and the source's delete leaves a
    # row on both databases: copy some rows to shard2 by hand, then re-run.
    before = everywhere()
    new_map = sharding.parse_map("orders", THREE)
    stranded = [
        o
        for o in Order.objects.using("shard0").order_by("pk")
        if new_map[shard_bucket(o.customer_id)] == "shard2"
    ][:10]
    Order._base_manager.using("shard2").bulk_create(stranded)
    assert len(everywhere()) == len(before) + 10
    sharding.apply_reshard("orders", new_map, batch_size=7)
    assert everywhere() == before
    placement_is(THREE)


def test_bad_maps_fail_with_a_non_zero_exit():
    with pytest.raises(CommandError, match="unmapped"):
        call_command("scalekit_reshard", "--plan", json.dumps({"0-100": "shard0"}))
    with pytest.raises(CommandError, match="not in SHARDS"):
        call_command("scalekit_reshard", "--plan", json.dumps({"0-1023": "replica"}))
    with pytest.raises(CommandError, match="not JSON"):
        call_command("scalekit_reshard", "--apply", "{0-1")
    with pytest.raises(CommandError, match="--group"):
        call_command("scalekit_reshard", "--plan", json.dumps(TWO), "--group", "nope")


def test_connections_untouched_by_plan():
    out = StringIO()
    call_command("scalekit_reshard", "--plan", json.dumps(TWO), stdout=out)
    assert "0 of 1024 buckets change database; 0 rows move." in out.getvalue()
    assert connections["shard0"].in_atomic_block is False

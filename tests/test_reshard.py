from __future__ import annotations

import json
import re
import uuid
from io import StringIO

import psycopg
import pytest
from django.conf import settings
from django.core.management import call_command
from django.core.management.base import CommandError
from django.db import connections
from django.test import override_settings
from django.test.utils import CaptureQueriesContext

from django_scalekit import conf, sharding
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
        "--noinput",
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
        call_command("scalekit_reshard", "--apply", "--noinput", stdout=out)
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


def test_batches_page_by_primary_key(rows):
    # Each batch after the first starts after the last ID of the one before
    # (an index range scan), rather than scanning the table again.
    with CaptureQueriesContext(connections["shard0"]) as queries:
        sharding.apply_reshard(
            "orders", sharding.parse_map("orders", THREE), batch_size=25
        )
    scans = [
        q["sql"]
        for q in queries.captured_queries
        if "FOR UPDATE" in q["sql"] and "shardapp_order" in q["sql"]
    ]
    assert len(scans) > 3
    after = re.compile(r'"shardapp_order"\."id" > \d+')
    assert not after.search(scans[0])
    assert all(after.search(sql) for sql in scans[1:])
    assert all("LIMIT 25" in sql for sql in scans)


def test_apply_prints_progress_with_totals(rows):
    out = StringIO()
    call_command(
        "scalekit_reshard",
        "--apply",
        json.dumps(THREE),
        "--batch-size",
        "40",
        "--noinput",
        stdout=out,
    )
    text = out.getvalue()
    lines = re.findall(
        r"shardapp\.Order: shard0 -> shard2: (\d+) of (\d+) rows moved \((\d+)%\)", text
    )
    assert len(lines) > 1
    done, total, pct = lines[-1]
    assert done == total and pct == "100"
    assert int(lines[0][0]) == 40 and lines[0][2] == str(round(4000 / int(total)))
    assert re.search(
        r"Moved \d+ rows \(shardapp\.Event \d+, shardapp\.Order \d+\)", text
    )


class FakeTTY(StringIO):
    def isatty(self):
        return True


def test_apply_runs_unattended_after_printing_the_plan(rows):
    # A script or call_command(): nobody to ask, so no prompt that would hang.
    before = everywhere()
    out = StringIO()
    call_command("scalekit_reshard", "--apply", json.dumps(THREE), stdout=out)
    text = out.getvalue()
    assert text.index("341 of 1024 buckets change database") < text.index(
        "stdin is not a terminal: going ahead"
    )
    assert table("shard2") and everywhere() == before


def test_apply_asks_for_confirmation(rows, monkeypatch):
    before = everywhere()
    monkeypatch.setattr("sys.stdin", FakeTTY())
    answers = iter(["no", "yes"])
    asked = []

    def answer(prompt):
        asked.append(prompt)
        return next(answers)

    monkeypatch.setattr("builtins.input", answer)
    with pytest.raises(CommandError, match="Cancelled: nothing was changed"):
        call_command(
            "scalekit_reshard", "--apply", json.dumps(THREE), stdout=StringIO()
        )
    assert table("shard2") == []
    out = StringIO()
    call_command("scalekit_reshard", "--apply", json.dumps(THREE), stdout=out)
    assert "Type 'yes'" in asked[0] and len(asked) == 2
    assert table("shard2") and everywhere() == before


def test_apply_without_a_map_says_it_uses_the_settings_map(rows):
    # The settings map (TWO) is where the rows already are: nothing moves,
    # and the command says which map it used.
    out = StringIO()
    call_command("scalekit_reshard", "--apply", stdout=out)
    assert "No NEW_MAP given" in out.getvalue() and "No rows to move." in out.getvalue()


def test_keep_source_then_deploy_then_cleanup(rows):
    orders, events = rows
    before = everywhere()
    out = StringIO()
    call_command(
        "scalekit_reshard",
        "--apply",
        json.dumps(THREE),
        "--keep-source",
        "--noinput",
        stdout=out,
    )
    assert "rows copied" in out.getvalue() and "--cleanup" in out.getvalue()
    moving = [row for row in before if row in table("shard2")]
    assert moving and everywhere() == sorted(before + moving)  # copies, no loss
    # Reads under the old map (still deployed) find every row where it was.
    with use_primary():
        for order in orders[::20]:
            assert Order.objects.for_key(order.customer_id).filter(pk=order.pk).exists()
    # Running it again before the deploy refreshes the copies: nothing doubles.
    sharding.apply_reshard(
        "orders", sharding.parse_map("orders", THREE), keep_source=True
    )
    assert everywhere() == sorted(before + moving)
    with three_shards():
        with use_primary():  # the new map finds the copies at once
            for order in orders[::20]:
                assert (
                    Order.objects.get_by_id(order.pk).customer_id == order.customer_id
                )
        out = StringIO()
        call_command("scalekit_reshard", "--cleanup", "--noinput", stdout=out)
        assert f"{len(moving) + len(table('shard2', Event))} rows are on a" in (
            out.getvalue()
        )
        assert "Deleted" in out.getvalue()
        assert everywhere() == before
        placement_is(THREE)
        placement_is(THREE, Event)
        out = StringIO()
        call_command("scalekit_reshard", "--cleanup", "--noinput", stdout=out)
        assert "Nothing to clean up." in out.getvalue()


def test_cleanup_keeps_and_reports_copies_that_differ_or_are_missing(rows):
    new_map = sharding.parse_map("orders", THREE)
    sharding.apply_reshard("orders", new_map, keep_source=True)
    on_new = [pk for pk, _ in table("shard2")]
    changed, gone = on_new[0], on_new[1]
    # A write on the old database after the copy, and a row deleted on the
    # new one: neither old copy may be deleted.
    src = (
        "shard0"
        if Order.objects.using("shard0").filter(pk=changed).exists()
        else "shard1"
    )
    Order._base_manager.using(src).filter(pk=changed).update(amount=-1)
    Order._base_manager.using("shard2").filter(pk=gone).delete()
    with three_shards():
        out = StringIO()
        with pytest.raises(CommandError, match="1 shardapp.Order rows differ") as exc:
            call_command("scalekit_reshard", "--cleanup", "--noinput", stdout=out)
        assert "1 shardapp.Order rows have no copy" in str(exc.value)
        assert f"shardapp.Order {changed}" in str(exc.value)
        left = {pk for alias in ("shard0", "shard1") for pk, _ in table(alias)}
        assert changed in left and gone in left
        assert not (set(on_new) - {changed, gone}) & left  # the rest were deleted


def test_sweep_after_deploy_does_not_overwrite_the_live_row(rows):
    # After the deploy the new database is the live one: a stale row left on
    # the old database is reported, not copied over the newer one.
    new_map = sharding.parse_map("orders", THREE)
    sharding.apply_reshard("orders", new_map)
    (pk, key), *_ = table("shard2")
    stale = Order._base_manager.using("shard2").get(pk=pk)
    old = "shard0" if shard_bucket(key) < 512 else "shard1"
    Order._base_manager.using(old).bulk_create([stale])  # a stale copy
    with three_shards():
        Order.objects.for_key(key).filter(pk=pk).update(amount=12345)
        with pytest.raises(CommandError, match="1 shardapp.Order rows differ"):
            call_command("scalekit_reshard", "--apply", "--noinput", stdout=StringIO())
        assert Order._base_manager.using("shard2").get(pk=pk).amount == 12345
        assert Order._base_manager.using(old).filter(pk=pk).exists()


def test_a_second_run_is_refused_while_one_holds_the_lock(rows):
    before = {alias: table(alias) for alias in SHARDS}
    db = connections["shard1"].settings_dict
    lock = sharding.reshard_lock_id("orders")
    with psycopg.connect(
        host=db["HOST"], port=db["PORT"], user=db["USER"], dbname=db["NAME"]
    ) as other:
        assert other.execute("SELECT pg_try_advisory_lock(%s)", [lock]).fetchone()[0]
        with pytest.raises(
            CommandError, match="another scalekit_reshard of group 'orders'"
        ):
            call_command(
                "scalekit_reshard",
                "--apply",
                json.dumps(THREE),
                "--noinput",
                stdout=StringIO(),
            )
        with (
            three_shards(),
            pytest.raises(CommandError, match="holds the advisory lock .* on 'shard1'"),
        ):
            call_command(
                "scalekit_reshard", "--cleanup", "--noinput", stdout=StringIO()
            )
        assert {alias: table(alias) for alias in SHARDS} == before
        # Our own lock on shard0 was released when shard1 refused.
        assert advisory_locks("shard0") == []
    call_command(
        "scalekit_reshard", "--apply", json.dumps(THREE), "--noinput", stdout=StringIO()
    )
    placement_is(THREE)


def test_ctrl_c_says_it_is_safe_to_run_again(rows, monkeypatch):
    before = everywhere()
    real = sharding.apply_reshard

    def interrupted(*args, **kwargs):
        def stop(batches):
            if batches == 2:
                raise KeyboardInterrupt

        return real(*args, after_batch=stop, **kwargs)

    monkeypatch.setattr(sharding, "apply_reshard", interrupted)
    with pytest.raises(CommandError, match="safe to run the same command again") as exc:
        call_command(
            "scalekit_reshard",
            "--apply",
            json.dumps(THREE),
            "--batch-size",
            "30",
            "--noinput",
            stdout=StringIO(),
        )
    assert exc.value.returncode == 130
    assert everywhere() == before and len(table("shard2")) == 60
    monkeypatch.setattr(sharding, "apply_reshard", real)
    call_command(
        "scalekit_reshard", "--apply", json.dumps(THREE), "--noinput", stdout=StringIO()
    )
    assert everywhere() == before
    placement_is(THREE)


# --- The lock: a transaction of its own -------------------------------------


def advisory_locks(alias):
    """(pid, state) of every backend holding an advisory lock on ``alias``'s database."""
    db = connections[alias].settings_dict
    with psycopg.connect(
        host=db["HOST"], port=db["PORT"], user=db["USER"], dbname=db["NAME"]
    ) as other:
        return other.execute(
            "SELECT l.pid, a.state FROM pg_locks l JOIN pg_stat_activity a "
            "USING (pid) WHERE l.locktype = 'advisory' "
            "AND l.database = (SELECT oid FROM pg_database "
            "WHERE datname = current_database())"
        ).fetchall()


def lock_is_free(alias):
    db = connections[alias].settings_dict
    lock = sharding.reshard_lock_id("orders")
    with psycopg.connect(
        host=db["HOST"], port=db["PORT"], user=db["USER"], dbname=db["NAME"]
    ) as other:
        return other.execute("SELECT pg_try_advisory_xact_lock(%s)", [lock]).fetchone()[
            0
        ]


def test_the_lock_is_held_in_an_open_transaction_of_a_connection_of_its_own(rows):
    # Behind PgBouncer (pool_mode=transaction) only a lock inside an open
    # transaction stays on one server connection until it is released.
    seen = {}

    def look(batches):
        if batches == 1:
            with connections["shard0"].cursor() as cursor:
                cursor.execute("SELECT pg_backend_pid()")
                seen["django"] = cursor.fetchone()[0]
            seen["locks"] = {alias: advisory_locks(alias) for alias in SHARDS}

    sharding.apply_reshard(
        "orders", sharding.parse_map("orders", THREE), batch_size=50, after_batch=look
    )
    for alias in SHARDS:
        ((pid, state),) = seen["locks"][alias]
        assert state == "idle in transaction", alias
    assert seen["locks"]["shard0"][0][0] != seen["django"]


def test_the_lock_is_gone_after_a_run_and_after_a_failure(rows):
    new_map = sharding.parse_map("orders", THREE)

    def crash(batches):
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError, match="killed"):
        sharding.apply_reshard("orders", new_map, batch_size=50, after_batch=crash)
    assert all(lock_is_free(alias) for alias in SHARDS)
    assert all(advisory_locks(alias) == [] for alias in SHARDS)
    sharding.apply_reshard("orders", new_map, batch_size=50)
    assert all(lock_is_free(alias) for alias in SHARDS)
    assert all(advisory_locks(alias) == [] for alias in SHARDS)
    placement_is(THREE)


# --- After the deploy: the new copy is the live one -------------------------


def test_rerun_after_deploy_does_not_bring_back_a_row_deleted_on_the_new_shard(rows):
    # An interrupted batch left a row on both databases; the new map was
    # deployed; a user deleted the row on the new shard: a re-run must not
    # copy the stale old row back.
    new_map = sharding.parse_map("orders", THREE)
    sharding.apply_reshard("orders", new_map, keep_source=True)
    (pk, key), *_ = table("shard2")
    old = "shard0" if shard_bucket(key) < 512 else "shard1"
    # Only this row is left on both databases.
    sharding.apply_reshard("orders", new_map)
    Order._base_manager.using(old).bulk_create(
        [Order._base_manager.using("shard2").get(pk=pk)]
    )
    with three_shards():
        Order.objects.for_key(key).filter(pk=pk).delete()
        with pytest.raises(CommandError, match="1 shardapp.Order rows have no copy"):
            call_command("scalekit_reshard", "--apply", "--noinput", stdout=StringIO())
        assert not Order._base_manager.using("shard2").filter(pk=pk).exists()
        assert Order._base_manager.using(old).filter(pk=pk).exists()
        # The operator knows it was a write the new database missed.
        call_command(
            "scalekit_reshard",
            "--apply",
            "--copy-missing",
            "--noinput",
            stdout=StringIO(),
        )
        assert Order._base_manager.using("shard2").filter(pk=pk).exists()
        assert not Order._base_manager.using(old).filter(pk=pk).exists()


def test_cleanup_says_the_live_copy_was_kept_and_discard_stale_deletes_old_ones(rows):
    new_map = sharding.parse_map("orders", THREE)
    sharding.apply_reshard("orders", new_map, keep_source=True)
    before = everywhere()
    (pk, key), *_ = table("shard2")
    old = "shard0" if shard_bucket(key) < 512 else "shard1"
    with three_shards():
        Order.objects.for_key(key).filter(pk=pk).update(amount=777)
        with pytest.raises(CommandError) as exc:
            call_command(
                "scalekit_reshard", "--cleanup", "--noinput", stdout=StringIO()
            )
        assert "That copy is the live one and was kept" in str(exc.value)
        assert "--discard-stale" in str(exc.value)
        assert Order._base_manager.using(old).filter(pk=pk).exists()
        call_command(
            "scalekit_reshard",
            "--cleanup",
            "--discard-stale",
            "--noinput",
            stdout=StringIO(),
        )
        assert not Order._base_manager.using(old).filter(pk=pk).exists()
        assert Order._base_manager.using("shard2").get(pk=pk).amount == 777
        placement_is(THREE)
        assert everywhere() == sorted(set(before))
    with pytest.raises(CommandError, match="--discard-stale goes with --cleanup"):
        call_command("scalekit_reshard", "--apply", "--discard-stale")


# --- Rows written during the run ---------------------------------------------


def account_in(low, high):
    return next(
        a
        for a in (uuid.uuid4() for _ in range(100_000))
        if low <= shard_bucket(a) <= high
    )


def test_a_model_empty_at_plan_time_is_moved_too():
    Order.objects.bulk_create(
        [Order(customer_id=k, amount=1) for k in range(1, ROWS + 1)]
    )
    assert table("shard0", Event) == [] and table("shard1", Event) == []
    written = []

    def write(batches):
        if batches == 1:  # into a moving bucket of shard0 (341-511)
            written.append(Event.objects.create(account=account_in(341, 511), kind="x"))

    sharding.apply_reshard(
        "orders", sharding.parse_map("orders", THREE), batch_size=50, after_batch=write
    )
    (event,) = written
    assert table("shard0", Event) == []
    assert [pk for pk, _ in table("shard2", Event)] == [event.pk]
    placement_is(THREE)


def test_a_row_written_into_a_bucket_already_done_fails_the_run(rows):
    before = everywhere()
    customer = next(k for k in range(10**6, 2 * 10**6) if 341 <= shard_bucket(k) <= 511)

    written = []

    def write(batches):
        # Once shard1's buckets are moving, shard0's are done: write into one.
        if not written and any(shard_bucket(key) >= 854 for _, key in table("shard2")):
            written.append(Order.objects.create(customer_id=customer))

    with pytest.raises(sharding.ReshardError, match="still on 'shard0'"):
        sharding.apply_reshard(
            "orders",
            sharding.parse_map("orders", THREE),
            batch_size=50,
            after_batch=write,
        )
    assert written and everywhere() == sorted([*before, (written[0].pk, customer)])
    sharding.apply_reshard("orders", sharding.parse_map("orders", THREE))
    placement_is(THREE)


# --- A database the new map retires -----------------------------------------


def without_shards(new_map):
    raw = dict(settings.SCALEKIT)
    spec = {
        k: v for k, v in raw["SHARDING"]["GROUPS"]["orders"].items() if k != "SHARDS"
    }
    raw["SHARDING"] = {"GROUPS": {"orders": {**spec, "MAP": new_map}}}
    return override_settings(SCALEKIT=raw)


def test_a_retired_database_is_scanned_when_named():
    # SHARDS unset: the group's databases are its MAP's. Once a MAP that
    # drops shard2 is deployed, only --retired finds the copies left there.
    with without_shards(THREE):
        Order.objects.bulk_create(
            [Order(customer_id=k, amount=1) for k in range(1, ROWS + 1)]
        )
        before = everywhere()
        assert table("shard2")
        out = StringIO()
        call_command(
            "scalekit_reshard",
            "--apply",
            json.dumps(TWO),
            "--keep-source",
            "--noinput",
            stdout=out,
        )
        assert "gives no buckets to shard2" in out.getvalue()
        assert "--retired shard2" in out.getvalue()
    with without_shards(TWO):
        assert conf.get().sharding.groups["orders"].shards == ("shard0", "shard1")
        out = StringIO()
        call_command("scalekit_reshard", "--cleanup", "--noinput", stdout=out)
        assert "Nothing to clean up." in out.getvalue()
        assert table("shard2")
        out = StringIO()
        call_command(
            "scalekit_reshard",
            "--cleanup",
            "--retired",
            "shard2",
            "--noinput",
            stdout=out,
        )
        assert "Deleted" in out.getvalue()
        assert table("shard2") == []
        assert everywhere() == before
        placement_is(TWO)
        with pytest.raises(CommandError, match="--retired 'nope' is not in DATABASES"):
            call_command("scalekit_reshard", "--cleanup", "--retired", "nope")

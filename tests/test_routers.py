from __future__ import annotations

import asyncio
import contextvars
import threading
import time
import uuid
from collections import Counter
from unittest import mock

import pytest
from asgiref.sync import async_to_sync
from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.core.signals import request_started
from django.db import connections, transaction
from django.http import HttpRequest, HttpResponse
from django.test import AsyncClient, Client, override_settings

from django_scalekit import metrics, routers
from django_scalekit.middleware import _PIN_SALT
from django_scalekit.routers import (
    PrimaryReplicaRouter,
    ShardRouter,
    routing_scope,
    use_primary,
)
from tests.conftest import services, wait_until
from tests.testapp.models import Event, Item

router = PrimaryReplicaRouter()

SCALEKIT = {"REPLICAS": ["replica"], "PINNING_SECONDS": 5, "REPLICA_RETRY_SECONDS": 30}


def unique(prefix: str = "item") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


# --- Routing decisions ------------------------------------------------------


@pytest.fixture(params=["with GROUPS", "without GROUPS"])
def either_settings(request):
    """The test settings (which have GROUPS), and the plain primary/replica
    setup, whose default-group reads take the router's fast path."""
    if request.param == "with GROUPS":
        yield
    else:
        with override_settings(SCALEKIT=SCALEKIT):
            yield


@pytest.mark.django_db(transaction=True, databases="__all__")
@pytest.mark.usefixtures("either_settings")
class TestDecisions:
    def test_reads_go_to_a_replica(self, replica):
        assert router.db_for_read(Item) == "replica"

    def test_writes_go_to_the_primary(self):
        assert router.db_for_write(Item) == "default"

    @override_settings(SCALEKIT={"PRIMARY": "replica_closed"})
    def test_primary_is_configurable(self):
        assert router.db_for_write(Item) == "replica_closed"
        assert router.db_for_read(Item) == "replica_closed"

    def test_reads_after_a_write_in_the_same_scope_go_to_the_primary(self, replica):
        assert router.db_for_read(Item) == "replica"
        router.db_for_write(Item)
        assert router.db_for_read(Item) == "default"

    def test_a_new_scope_reads_from_replicas_again(self, replica):
        with routing_scope():
            router.db_for_write(Item)
            assert router.db_for_read(Item) == "default"
        with routing_scope():
            assert router.db_for_read(Item) == "replica"

    def test_request_started_gives_a_fresh_scope(self, replica):
        router.db_for_write(Item)
        request_started.send(sender=None)
        assert router.db_for_read(Item) == "replica"

    def test_reads_inside_atomic_go_to_the_primary(self, replica):
        with transaction.atomic():
            assert router.db_for_read(Item) == "default"
        assert router.db_for_read(Item) == "replica"

    def test_use_primary_as_context_manager(self, replica):
        with use_primary():
            assert router.db_for_read(Item) == "default"
        assert router.db_for_read(Item) == "replica"

    def test_use_primary_as_decorator(self, replica):
        @use_primary
        def bare():
            return router.db_for_read(Item)

        @use_primary()
        def called():
            return router.db_for_read(Item)

        assert bare() == called() == "default"
        assert bare.__name__ == "bare"
        assert router.db_for_read(Item) == "replica"

    def test_use_primary_on_async_functions(self, replica):
        @use_primary
        async def read():
            await asyncio.sleep(0)
            return router.db_for_read(Item)

        async def both():
            async with use_primary():
                inside = router.db_for_read(Item)
            return inside, await read(), router.db_for_read(Item)

        assert async_to_sync(both)() == ("default", "default", "replica")

    def test_use_primary_on_a_method(self, replica):
        class Service:
            @use_primary
            def read(self, suffix):
                return router.db_for_read(Item) + suffix

        assert Service().read("!") == "default!"

    def test_a_write_in_one_thread_does_not_pin_another(self, replica):
        seen = {}

        def worker(name, write):
            with routing_scope():
                if write:
                    router.db_for_write(Item)
                seen[name] = router.db_for_read(Item)
            connections.close_all()

        threads = [
            threading.Thread(target=worker, args=("writer", True)),
            threading.Thread(target=worker, args=("reader", False)),
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert seen == {"writer": "default", "reader": "replica"}

    def test_atomic_check_uses_each_threads_own_connection(self, replica):
        # One scope shared by two threads (as sync_to_async(thread_sensitive=False)
        # does): the atomic check must look at the calling thread's connection.
        assert router.db_for_read(Item) == "replica"  # caches this thread's primary
        context = contextvars.copy_context()
        seen = []

        def in_other_thread():
            with transaction.atomic():
                seen.append(router.db_for_read(Item))
            seen.append(router.db_for_read(Item))
            connections.close_all()

        thread = threading.Thread(target=context.run, args=(in_other_thread,))
        thread.start()
        thread.join()
        assert seen == ["default", "replica"]
        with transaction.atomic():
            assert router.db_for_read(Item) == "default"

    def test_concurrent_async_tasks_have_their_own_scopes(self, replica):
        async def task(write):
            token = routers.begin_scope()
            try:
                if write:
                    router.db_for_write(Item)
                await asyncio.sleep(0.01)
                return router.db_for_read(Item)
            finally:
                routers.end_scope(token)

        async def main():
            return await asyncio.gather(task(True), task(False))

        assert async_to_sync(main)() == ["default", "replica"]

    def test_all_reads_of_a_scope_use_one_replica(self, replica):
        seen = set()
        with override_settings(
            SCALEKIT={**SCALEKIT, "REPLICAS": {"replica": 1, "replica_b": 1}}
        ):
            for _ in range(40):
                with routing_scope():
                    first = router.db_for_read(Item)
                    assert {router.db_for_read(Item) for _ in range(10)} == {first}
                    seen.add(first)
        assert seen == {"replica", "replica_b"}

    def test_weights_spread_scopes_in_proportion(self, replica):
        with override_settings(
            SCALEKIT={**SCALEKIT, "REPLICAS": {"replica": 3, "replica_b": 1}}
        ):
            counts = Counter()
            for _ in range(2000):
                with routing_scope():
                    counts[router.db_for_read(Item)] += 1
        assert set(counts) == {"replica", "replica_b"}
        # Expected 1500 / 500; the bounds are many standard deviations wide.
        assert 1300 < counts["replica"] < 1700

    def test_no_replicas_means_reads_go_to_the_primary(self):
        with override_settings(SCALEKIT={"REPLICAS": []}):
            assert router.db_for_read(Item) == "default"


@pytest.mark.django_db(transaction=True, databases="__all__")
class TestSteadyState:
    """After a scope's first read, reads only look up prepared state
    (``Scope.fast``): each change below must still change the decision."""

    @pytest.fixture(autouse=True)
    def steady(self, replica):
        with override_settings(SCALEKIT=SCALEKIT), routing_scope() as scope:
            assert router.db_for_read(Item) == "replica"
            assert scope.fast is not None
            yield scope

    def test_steady_reads_stay_on_the_replica(self, steady):
        assert [router.db_for_read(Item) for _ in range(3)] == ["replica"] * 3

    def test_atomic_on_the_primary(self, steady):
        with transaction.atomic():
            assert router.db_for_read(Item) == "default"
        assert router.db_for_read(Item) == "replica"

    def test_use_primary(self, steady):
        with use_primary():
            assert router.db_for_read(Item) == "default"
        assert router.db_for_read(Item) == "replica"

    def test_use_primary_in_another_thread_leaves_this_scope_alone(self, steady):
        # A thread of its own starts with an empty context: its block marks
        # its own scope, and this one keeps its fast path.
        entered, release = threading.Event(), threading.Event()

        def hold():
            with use_primary():
                assert router.db_for_read(Item) == "default"
                entered.set()
                release.wait(10)
            connections.close_all()

        thread = threading.Thread(target=hold)
        thread.start()
        try:
            assert entered.wait(10)
            assert router.db_for_read(Item) == "replica"
            assert not steady.forced
        finally:
            release.set()
            thread.join()

    def test_a_context_copied_inside_use_primary_stays_forced(self, steady):
        # e.g. asyncio.create_task() or copy_context() inside the block: the
        # copy shares the scope and keeps use_primary() after the block ends,
        # while this context's reads set the fast path again.
        with use_primary():
            copied = contextvars.copy_context()
        assert router.db_for_read(Item) == "replica"
        assert router.db_for_read(Item) == "replica"
        assert steady.fast is not None
        assert copied.run(router.db_for_read, Item) == "default"
        assert router.db_for_read(Item) == "replica"

    def test_a_scope_begun_inside_use_primary_knows_it(self, steady):
        # A scope begun inside the block and used after it: a context copied
        # inside still shares it, and is still forced.
        force = use_primary()
        force.__enter__()
        token = routers.begin_scope()
        copied = contextvars.copy_context()
        force.__exit__(None, None, None)
        try:
            assert router.db_for_read(Item) == "replica"
            assert router.db_for_read(Item) == "replica"
            assert copied.run(router.db_for_read, Item) == "default"
        finally:
            routers.end_scope(token)

    def test_use_primary_left_by_an_exception(self, steady):
        with pytest.raises(ZeroDivisionError), use_primary():
            assert router.db_for_read(Item) == "default"
            1 / 0  # noqa: B018
        assert router.db_for_read(Item) == "replica"

    def test_a_settings_change_decides_writes_again(self):
        uncounted = {**SCALEKIT, "METRICS": {"ROUTING": False}}
        with override_settings(SCALEKIT=uncounted), routing_scope() as scope:
            assert router.db_for_write(Item) == "default"
            assert scope.write_to == "default"  # repeat writes look only this up
            with override_settings(SCALEKIT={**uncounted, "PRIMARY": "analytics"}):
                assert router.db_for_write(Item) == "analytics"
            assert router.db_for_write(Item) == "default"

    def test_repeat_writes_are_counted_with_routing_metrics(self, steady):
        with (
            override_settings(SCALEKIT={**SCALEKIT, "METRICS": {"ROUTING": True}}),
            routing_scope() as scope,
        ):
            if scope.tally is None:
                pytest.skip("prometheus_client is not installed")
            for _ in range(3):
                assert router.db_for_write(Item) == "default"
            assert scope.write_to is None
            assert scope.n_write == 3

    def test_a_write_pins_the_rest_of_the_scope(self, steady):
        assert router.db_for_write(Item) == "default"
        assert router.db_for_read(Item) == "default"
        assert router.db_for_write(Item) == "default"
        with transaction.atomic():
            assert router.db_for_read(Item) == "default"
        assert router.db_for_read(Item) == "default"
        assert steady.wrote and steady.pinned

    def test_the_replica_taken_out_of_rotation(self, steady):
        routers.mark_down("replica", seconds=30)
        assert router.db_for_read(Item) == "default"

    def test_a_settings_change_decides_again(self, steady):
        with override_settings(SCALEKIT={**SCALEKIT, "REPLICAS": []}):
            assert router.db_for_read(Item) == "default"

    def test_another_thread_sharing_the_scope_decides_for_itself(self, steady):
        context = contextvars.copy_context()
        seen = []

        def in_other_thread():
            with transaction.atomic():
                seen.append(router.db_for_read(Item))
            seen.append(router.db_for_read(Item))
            connections.close_all()

        with transaction.atomic():
            thread = threading.Thread(target=context.run, args=(in_other_thread,))
            thread.start()
            thread.join()
        assert seen == ["default", "replica"]
        assert router.db_for_read(Item) == "replica"

    def test_a_write_in_another_thread_sharing_the_scope_pins_it(self, steady):
        context = contextvars.copy_context()
        thread = threading.Thread(
            target=context.run, args=(lambda: router.db_for_write(Item),)
        )
        thread.start()
        thread.join()
        assert router.db_for_read(Item) == "default"


@pytest.mark.django_db(transaction=True, databases="__all__")
@pytest.mark.usefixtures("either_settings")
class TestRetryOnReplicaFailure:
    """A query running on a replica when its connection dies fails; a GET that
    wrote nothing runs again, reading elsewhere (RETRY_ON_REPLICA_FAILURE)."""

    def test_a_read_only_request_is_run_again_off_the_replica(self, replica, caplog):
        response = Client(raise_request_exception=False).get("/replica-dies/")
        assert response.status_code == 200
        body = response.json()
        assert body["first_read_from"] == "default"  # the second run's
        assert body["read_from"] == "default"
        assert body["runs"] == 2
        assert routers.is_down("replica")
        assert "replica 'replica' failed mid-query" in caplog.text

    def test_it_can_be_turned_off(self, replica):
        with override_settings(
            SCALEKIT={**SCALEKIT, "RETRY_ON_REPLICA_FAILURE": False}
        ):
            response = Client(raise_request_exception=False).get("/replica-dies/")
        assert response.status_code == 500

    def test_unsafe_methods_are_not_run_again(self, replica):
        response = Client(raise_request_exception=False).post("/replica-dies/")
        assert response.status_code == 500

    def test_a_view_that_changed_the_session_is_not_run_again(self, replica):
        client = Client(raise_request_exception=False)
        assert client.get("/replica-dies/?session=1").status_code == 500

    def test_a_healthy_replica_is_not_blamed_for_a_statement_timeout(
        self, replica, caplog
    ):
        client = Client(raise_request_exception=False)
        assert client.get("/replica-times-out/").status_code == 500
        assert not routers.is_down("replica")
        assert "failed mid-query" not in caplog.text


@pytest.mark.django_db(transaction=True, databases="__all__")
def test_a_request_that_wrote_is_not_run_again(replica):
    # The write goes to another group (analytics), so the default group's
    # reads still use the replica, and fail there after the write.
    response = Client(raise_request_exception=False).get("/replica-dies/?write=1")
    assert response.status_code == 500


def test_allow_relation():
    a, b, other = Item(), Item(), Item()
    a._state.db, b._state.db, other._state.db = "default", "replica", "elsewhere"
    assert router.allow_relation(a, b) is True
    assert router.allow_relation(a, other) is None


def test_allow_migrate_only_on_the_primary():
    assert router.allow_migrate("default", "testapp") is True
    assert router.allow_migrate("replica", "testapp") is False
    assert router.allow_migrate("elsewhere", "testapp") is None


# --- Failover ---------------------------------------------------------------


@pytest.mark.django_db(transaction=True, databases="__all__")
class TestFailover:
    @override_settings(SCALEKIT={**SCALEKIT, "REPLICAS": ["replica_closed"]})
    def test_refused_replica_falls_back_to_primary_and_leaves_rotation(self, caplog):
        Item.objects.create(name="x")
        with routing_scope():
            assert list(Item.objects.values_list("name", flat=True)) == ["x"]
        assert routers.is_down("replica_closed")
        assert "out of rotation" in caplog.text
        # Later scopes do not try it again while it is out of rotation.
        with mock.patch.object(routers, "_connection_ok", side_effect=AssertionError):
            for _ in range(3):
                with routing_scope():
                    assert router.db_for_read(Item) == "default"

    @override_settings(
        SCALEKIT={**SCALEKIT, "REPLICAS": {"replica_closed": 1e9, "replica": 1e-9}}
    )
    def test_refused_replica_falls_back_to_another_replica(self, replica):
        with routing_scope():
            assert router.db_for_read(Item) == "replica"
        assert routers.is_down("replica_closed")
        assert not routers.is_down("replica")

    @override_settings(
        SCALEKIT={
            **SCALEKIT,
            "REPLICAS": ["replica_closed"],
            "REPLICA_RETRY_SECONDS": 0.2,
        }
    )
    def test_replica_is_retried_after_retry_seconds(self):
        with routing_scope():
            router.db_for_read(Item)
        assert routers.is_down("replica_closed")
        time.sleep(0.3)
        assert not routers.is_down("replica_closed")
        with (
            mock.patch.object(routers, "_connection_ok", return_value=True) as probe,
            routing_scope(),
        ):
            assert router.db_for_read(Item) == "replica_closed"
        probe.assert_called_once_with("replica_closed")


@pytest.mark.outage
@pytest.mark.django_db(transaction=True, databases="__all__")
def test_reads_succeed_with_the_replica_cluster_stopped(replica):
    Item.objects.create(name="kept")
    assert wait_until(lambda: Item.objects.using("replica").exists())
    with routing_scope():
        assert router.db_for_read(Item) == "replica"  # a live connection now exists
    services("replica-stop")
    try:
        client = Client()
        started = time.monotonic()
        assert client.get("/items/").json()["names"] == ["kept"]
        assert routers.is_down("replica")
        first = time.monotonic() - started
        started = time.monotonic()
        for _ in range(5):
            assert client.get("/items/").json() == {
                "names": ["kept"],
                "read_from": "default",
            }
        later = (time.monotonic() - started) / 5
        assert first < 5  # bounded by connect_timeout (2 s) plus slack
        assert later < 0.5  # out of rotation: no new connection attempts
    finally:
        services("replica-start")
        connections["replica"].close()
    # The replica comes back once its retry time has passed.
    routers.reset_replica_state()
    assert wait_until(lambda: Client().get("/items/").json()["read_from"] == "replica")


# --- Read-your-writes against the real replica, with real replication lag --


@pytest.mark.replica
@pytest.mark.django_db(transaction=True, databases="__all__")
class TestReadYourWrites:
    def test_the_replica_really_lags(self, replica_delay, on_replica):
        replica_delay(1000)
        name = unique()
        Item.objects.create(name=name)
        assert name not in on_replica()
        assert wait_until(lambda: name in on_replica())

    def test_write_then_read_in_one_request(self, replica_delay, on_replica):
        replica_delay(1000)
        name = unique()
        body = Client().get("/write-then-read/", {"name": name}).json()
        assert name in body["names"]
        assert name not in on_replica()

    def test_write_then_stream_in_one_request(self, replica_delay, on_replica):
        replica_delay(2000)
        name = unique()
        response = Client().get("/write-then-stream/", {"name": name})
        body = b"".join(response.streaming_content).decode()
        assert name in body.split("\n")
        assert "read_from=default" in body
        assert name not in on_replica()

    def test_async_write_then_read_in_one_request(self, replica_delay, on_replica):
        replica_delay(1000)
        name = unique()
        response = async_to_sync(AsyncClient().get)(
            "/async/write-then-read/", {"name": name}
        )
        assert name in response.json()["names"]
        assert name not in on_replica()

    def test_pinned_client_reads_its_write_in_the_next_request(
        self, replica_delay, on_replica
    ):
        replica_delay(3000)
        name = unique()
        writer = Client()
        response = writer.post("/items/", {"name": name})
        assert "scalekit_pin" in response.cookies
        assert response.cookies["scalekit_pin"]["httponly"]
        assert name in writer.get("/items/").json()["names"]
        assert (
            name
            in async_to_sync(writer_async(writer).get)("/async/items/").json()["names"]
        )
        # An unpinned client is served by the replica, which has not replayed yet.
        body = Client().get("/items/").json()
        assert body["read_from"] == "replica"
        assert name not in body["names"]
        assert wait_until(lambda: name in Client().get("/items/").json()["names"])

    def test_forged_cookie_is_ignored(self, replica_delay):
        replica_delay(3000)
        name = unique()
        Client().post("/items/", {"name": name})
        forger = Client()
        forger.cookies["scalekit_pin"] = "1"
        body = forger.get("/items/").json()
        assert body["read_from"] == "replica"
        assert name not in body["names"]

    def test_expired_cookie_is_ignored(self, replica_delay):
        replica_delay(1000)
        name = unique()
        Client().post("/items/", {"name": name})
        client = Client()
        client.cookies["scalekit_pin"] = signed_pin("1", age=60)
        body = client.get("/items/").json()
        assert body["read_from"] == "replica"
        assert name not in body["names"]
        # The same cookie, signed now, does pin: only its age was wrong.
        client.cookies["scalekit_pin"] = signed_pin("1")
        assert client.get("/items/").json()["read_from"] == "default"

    def test_a_request_that_fails_after_writing_leaves_the_next_one_unpinned(
        self, replica
    ):
        client = Client(raise_request_exception=False)
        assert client.get("/write-then-fail/").status_code == 500
        # Same thread, next request: a fresh scope, reading the replica.
        assert Client().get("/items/").json()["read_from"] == "replica"
        assert (
            router.db_for_read(Item) == "replica"
        )  # nor does it leak out of the request

    def test_nested_use_primary_restores_what_was_before(self, replica):
        with use_primary():
            with use_primary():
                assert router.db_for_read(Item) == "default"
            assert router.db_for_read(Item) == "default"
        assert router.db_for_read(Item) == "replica"

    def test_safe_request_without_writes_does_not_pin(self, replica):
        response = Client().get("/items/")
        assert "scalekit_pin" not in response.cookies

    def test_safe_request_that_writes_pins(self, replica):
        response = Client().get("/write-then-read/", {"name": unique()})
        assert "scalekit_pin" in response.cookies

    @override_settings(SCALEKIT={**SCALEKIT, "PINNING_SECONDS": 0})
    def test_pinning_seconds_zero_disables_the_cookie(self, replica):
        response = Client().post("/items/", {"name": unique()})
        assert "scalekit_pin" not in response.cookies


def signed_pin(value: str, age: float = 0) -> str:
    """A pinning cookie value signed ``age`` seconds ago, as the middleware signs it."""
    response = HttpResponse()
    with mock.patch("django.core.signing.time.time", return_value=time.time() - age):
        response.set_signed_cookie("scalekit_pin", value, salt=_PIN_SALT)
    return response.cookies["scalekit_pin"].value


def read_pin(cookie: str) -> str:
    request = HttpRequest()
    request.COOKIES["scalekit_pin"] = cookie
    return request.get_signed_cookie("scalekit_pin", salt=_PIN_SALT, max_age=60)


def writer_async(client: Client) -> AsyncClient:
    async_client = AsyncClient()
    async_client.cookies = client.cookies
    return async_client


def outside_any_scope(work):
    """Run ``work`` as a management command or a thread of its own does: in a
    context no request, task or routing_scope() started a scope in."""
    return contextvars.Context().run(work)


@pytest.mark.replica
@pytest.mark.django_db(transaction=True, databases="__all__")
class TestScopesNothingEnds:
    """A write outside a request or task pins reads for PINNING_SECONDS, as
    the cookie pins a client: a worker loop is not pinned for its life."""

    def test_a_write_pins_for_pinning_seconds(self, replica, settings):
        settings.SCALEKIT = {**SCALEKIT, "PINNING_SECONDS": 0.5}

        def work():
            Item.objects.create(name=unique())
            pinned = router.db_for_read(Item)
            time.sleep(1)
            return pinned, router.db_for_read(Item)

        assert outside_any_scope(work) == ("default", "replica")

    def test_each_write_pins_again(self, replica, settings):
        settings.SCALEKIT = {**SCALEKIT, "PINNING_SECONDS": 1}

        def work():
            Item.objects.create(name=unique())
            router.db_for_read(Item)  # the first write's pin starts
            time.sleep(0.6)
            Item.objects.create(name=unique())
            router.db_for_read(Item)  # and the second's
            time.sleep(0.6)
            still = router.db_for_read(Item)  # 1.2 s after the first
            time.sleep(0.8)
            return still, router.db_for_read(Item)

        assert outside_any_scope(work) == ("default", "replica")

    def test_each_group_is_unpinned(self, replica, settings):
        settings.SCALEKIT = {**settings.SCALEKIT, "PINNING_SECONDS": 0.5}  # GROUPS

        def work():
            Event.objects.create(name=unique())
            Item.objects.create(name=unique())
            pinned = router.db_for_read(Event), router.db_for_read(Item)
            time.sleep(1)
            return pinned, (router.db_for_read(Event), router.db_for_read(Item))

        assert outside_any_scope(work) == (
            ("analytics", "default"),
            ("analytics_replica", "replica"),
        )

    def test_other_routers_groups_are_unpinned(self, replica, settings):
        # route_write()/route_read(): what the shard router calls for a shard.
        settings.SCALEKIT = {**settings.SCALEKIT, "PINNING_SECONDS": 0.5}  # GROUPS
        analytics = routers.conf.get().groups["analytics"]
        default = routers.conf.get().default_group

        def work():
            routers.route_write(analytics)
            pinned = routers.route_read(analytics), routers.route_read(default)
            time.sleep(1)
            return pinned, routers.route_read(analytics)

        assert outside_any_scope(work) == (
            ("analytics", "replica"),
            "analytics_replica",
        )

    def test_the_pin_counts_from_the_commit(self, replica, settings):
        settings.SCALEKIT = {**SCALEKIT, "PINNING_SECONDS": 0.5}

        def work():
            with transaction.atomic():
                Item.objects.create(name=unique())
                time.sleep(1)  # a transaction longer than PINNING_SECONDS
            after_commit = router.db_for_read(Item)
            time.sleep(1)
            return after_commit, router.db_for_read(Item)

        assert outside_any_scope(work) == ("default", "replica")

    def test_the_pin_counts_from_the_first_read_after_the_write(
        self, replica, settings
    ):
        # A statement can run for longer than PINNING_SECONDS after it was
        # routed; the thread's next read comes after it.
        settings.SCALEKIT = {**SCALEKIT, "PINNING_SECONDS": 0.5}

        def work():
            router.db_for_write(Item)
            time.sleep(1)
            first = router.db_for_read(Item)
            time.sleep(1)
            return first, router.db_for_read(Item)

        assert outside_any_scope(work) == ("default", "replica")

    def test_a_failover_pin_ends_too(self, replica, settings):
        # Without replay positions, losing the scope's replica sends reads to
        # the primary (monotonic reads); in a worker, not for good.
        settings.SCALEKIT = {
            **SCALEKIT,
            "REPLICAS": ["replica", "replica_b"],
            "PINNING_SECONDS": 0.5,
        }

        def work():
            first = router.db_for_read(Item)
            routers.mark_down(first, 30, "test")
            after_failover = router.db_for_read(Item)
            time.sleep(1)
            return first, after_failover, router.db_for_read(Item)

        first, after_failover, later = outside_any_scope(work)
        assert after_failover == "default"
        assert later == ({"replica", "replica_b"} - {first}).pop()

    def test_a_routing_scope_stays_pinned_to_its_end(self, replica, settings):
        settings.SCALEKIT = {**SCALEKIT, "PINNING_SECONDS": 0.5}

        def work():
            with routing_scope():
                Item.objects.create(name=unique())
                time.sleep(1)
                return router.db_for_read(Item)

        assert outside_any_scope(work) == "default"

    def test_without_pinning_seconds_the_pin_lasts(self, replica, settings):
        settings.SCALEKIT = {**SCALEKIT, "PINNING_SECONDS": 0}

        def work():
            Item.objects.create(name=unique())
            time.sleep(0.3)
            return router.db_for_read(Item), router.db_for_read(Item)

        assert outside_any_scope(work) == ("default", "default")

    def test_lsn_mode_reads_a_replica_that_replayed_the_write(self, replica, settings):
        settings.SCALEKIT = {**LSN, "PINNING_SECONDS": 60}

        def work():
            Item.objects.create(name=unique())
            return wait_until(lambda: router.db_for_read(Item) == "replica", timeout=10)

        assert outside_any_scope(work)


@pytest.mark.replica
@pytest.mark.django_db(transaction=True, databases="__all__")
class TestLagAwareness:
    def test_replica_lag_is_measured(self, replica_delay):
        replica_delay(2000)
        Item.objects.create(name=unique())
        time.sleep(0.5)
        assert routers.replica_lag("replica") > 0.3

    @pytest.mark.slow
    def test_lagging_replica_is_skipped_then_used_again(self, replica_delay, caplog):
        replica_delay(2000)
        settings = {
            **SCALEKIT,
            "REPLICA_MAX_LAG_SECONDS": 0.5,
            "REPLICA_LAG_CHECK_SECONDS": 0.1,
        }
        with override_settings(SCALEKIT=settings):
            name = unique()
            Item.objects.create(name=name)
            time.sleep(0.8)
            with routing_scope():
                assert router.db_for_read(Item) == "default"
            assert "lags" in caplog.text

            def back_on_replica():
                time.sleep(0.1)
                with routing_scope():
                    return router.db_for_read(Item) == "replica"

            assert wait_until(back_on_replica)

    def test_lag_skip_and_lag_gauge_are_exported(self, replica_delay):
        from prometheus_client import REGISTRY

        if not metrics.ENABLED:
            pytest.skip("prometheus_client is not installed")
        replica_delay(2000)
        settings = {
            **SCALEKIT,
            "REPLICA_MAX_LAG_SECONDS": 0.5,
            "REPLICA_LAG_CHECK_SECONDS": 0.1,
        }
        with override_settings(SCALEKIT=settings):
            Item.objects.create(name=unique())
            time.sleep(0.8)
            routers.flush_implicit_scopes()
            before = routed("default", "lag-skip")
            with routing_scope():
                assert router.db_for_read(Item) == "default"
            assert routed("default", "lag-skip") - before == 1
            lag = REGISTRY.get_sample_value(
                "scalekit_router_replica_lag_seconds", {"alias": "replica"}
            )
            assert lag is not None and lag > 0.5


# --- Several primary/replica groups (SCALEKIT["GROUPS"]) ---------------------


@pytest.mark.django_db(transaction=True, databases="__all__")
class TestGroups:
    def test_each_group_reads_its_own_replica_and_writes_its_own_primary(self, replica):
        assert router.db_for_read(Event) == "analytics_replica"
        assert router.db_for_read(Item) == "replica"
        assert router.db_for_write(Event) == "analytics"

    def test_a_write_pins_only_its_own_group(self, replica):
        router.db_for_write(Event)
        assert router.db_for_read(Event) == "analytics"
        assert router.db_for_read(Item) == "replica"
        router.db_for_write(Item)
        assert router.db_for_read(Item) == "default"

    def test_a_pinning_cookie_pins_every_group(self, replica):
        with routing_scope(pinned=True):
            assert router.db_for_read(Event) == "analytics"
            assert router.db_for_read(Item) == "default"

    def test_use_primary_and_atomic_apply_to_groups(self, replica):
        with use_primary():
            assert router.db_for_read(Event) == "analytics"
        with transaction.atomic(using="analytics"):
            assert router.db_for_read(Event) == "analytics"
            assert router.db_for_read(Item) == "replica"
        assert router.db_for_read(Event) == "analytics_replica"

    @pytest.mark.slow
    def test_rows_land_in_the_groups_database(self, replica_delay):
        replica_delay(3000)
        name = unique("event")
        Event.objects.create(name=name)
        assert list(Event.objects.values_list("name", flat=True)) == [name]
        with connections["analytics"].cursor() as cursor:
            cursor.execute("SELECT name FROM testapp_event")
            assert cursor.fetchall() == [(name,)]
        with connections["default"].cursor() as cursor:
            cursor.execute("SELECT to_regclass('testapp_event')")
            assert cursor.fetchone() == (
                None,
            )  # the table is not on the default primary
        with routing_scope():
            # A new scope reads the group's replica, which has not replayed yet.
            assert router.db_for_read(Event) == "analytics_replica"
            assert not Event.objects.filter(name=name).exists()
        with routing_scope():
            assert wait_until(lambda: Event.objects.filter(name=name).exists())

    def test_group_failover(self):
        settings = {
            **SCALEKIT,
            "GROUPS": {
                "analytics": {
                    "PRIMARY": "analytics",
                    "REPLICAS": ["replica_closed"],
                    "MODELS": ["testapp.Event"],
                }
            },
        }
        with override_settings(SCALEKIT=settings):
            assert router.db_for_read(Event) == "analytics"
            assert routers.is_down("replica_closed")

    def test_route_read_and_route_write_for_other_routers(self, replica):
        from django_scalekit import conf

        group = conf.get().groups["analytics"]
        assert routers.route_read(group) == "analytics_replica"
        assert routers.route_write(group) == "analytics"
        assert routers.route_read(group) == "analytics"
        assert routers.current_scope().wrote


def test_allow_migrate_places_each_groups_models():
    assert router.allow_migrate("analytics", "testapp", "event") is True
    assert router.allow_migrate("default", "testapp", "event") is False
    assert router.allow_migrate("analytics", "testapp", "item") is False
    assert router.allow_migrate("analytics_replica", "testapp", "event") is False
    assert router.allow_migrate("analytics", "auth") is False


def test_allow_relation_within_a_group_only():
    item, event, replica_event = Item(), Event(), Event()
    item._state.db, event._state.db, replica_event._state.db = (
        "default",
        "analytics",
        "analytics_replica",
    )
    assert router.allow_relation(event, replica_event) is True
    assert router.allow_relation(item, event) is False


# --- Causal reads by WAL position (READ_YOUR_WRITES = "lsn") -----------------

LSN = {**SCALEKIT, "READ_YOUR_WRITES": "lsn", "LSN_CHECK_SECONDS": 0.05}

#: PostgreSQL's WAL page size (XLOG_BLCKSZ; a build-time constant).
WAL_PAGE = 8192


def _wal_insert_position(cursor) -> int:
    cursor.execute("SELECT (pg_current_wal_insert_lsn() - '0/0')::bigint")
    return int(cursor.fetchone()[0])


def end_wal_on_a_page_boundary(cursor) -> int | None:
    """Emit WAL messages sized so that the last one ends exactly where a WAL
    page ends; return that boundary (None if other WAL kept getting in)."""
    overhead = 56  # record + message headers, before alignment; corrected below
    for _ in range(40):
        start = _wal_insert_position(cursor)
        room = WAL_PAGE - start % WAL_PAGE
        size = room - overhead
        if size < 16:
            size = 200  # too close to the end of this page: move to the next
        cursor.execute(
            "SELECT pg_logical_emit_message(false, 'scalekit', repeat('x', %s))", [size]
        )
        end = _wal_insert_position(cursor)
        if size != room - overhead:
            continue
        if end // WAL_PAGE == start // WAL_PAGE:  # too short: still on the page
            overhead -= WAL_PAGE - end % WAL_PAGE
        elif end % WAL_PAGE == 24 and end - start == room + 24:
            return end - 24
        elif end // WAL_PAGE == start // WAL_PAGE + 1:  # too long, by the excess
            overhead += max(end % WAL_PAGE - 24, 8)
    return None


def replica_reached_primary() -> bool:
    return (routers.replay_lsn("replica") or 0) >= routers.primary_lsn("default")


def replication_report() -> str:
    """Where the primary and the replica are, and what runs on the replica."""
    with connections["default"].cursor() as cursor:
        cursor.execute("SELECT pg_current_wal_insert_lsn(), pg_current_wal_lsn()")
        insert, write = cursor.fetchone()
    with connections["replica"].cursor() as cursor:
        cursor.execute(
            "SELECT pg_last_wal_receive_lsn(), pg_last_wal_replay_lsn(), "
            "pg_is_wal_replay_paused()"
        )
        received, replayed, paused = cursor.fetchone()
        cursor.execute(
            "SELECT pid, state, wait_event, left(query, 80) FROM pg_stat_activity "
            "WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()"
        )
        sessions = cursor.fetchall()
    return (
        f"primary insert={insert} write={write}; replica received={received} "
        f"replayed={replayed} paused={paused}; replica sessions={sessions}"
    )


@pytest.mark.replica
@pytest.mark.django_db(transaction=True, databases="__all__")
class TestCausalReads:
    @pytest.fixture(autouse=True)
    def _lsn_mode(self, settings):
        settings.SCALEKIT = LSN

    def test_the_cookie_carries_the_primarys_position(self, replica):
        response = Client().post("/items/", {"name": unique()})
        pinned, lsns = routers.parse_pin(
            read_pin(response.cookies["scalekit_pin"].value)
        )
        assert not pinned
        assert lsns["default"] <= routers.primary_lsn("default")
        assert lsns["default"] > 0

    def test_write_then_read_in_one_request(self, replica_delay):
        replica_delay(1000)
        name = unique()
        assert name in Client().get("/write-then-read/", {"name": name}).json()["names"]

    @pytest.mark.slow
    def test_next_request_waits_for_the_replica_then_uses_it(self, replica_delay):
        replica_delay(3000)
        name = unique()
        client = Client()
        client.post("/items/", {"name": name})
        body = client.get("/items/").json()
        # The replica has not replayed the write: the primary answers.
        assert body["read_from"] == "default" and name in body["names"]

        # Once it has, the same (still pinned) client reads the replica again.
        def served_by_replica():
            body = client.get("/items/").json()
            assert name in body["names"]  # never a stale read
            return body["read_from"] == "replica"

        assert wait_until(served_by_replica, timeout=10)

    def test_without_lag_the_next_request_reads_the_replica(self, replica, settings):
        # Time-based pinning would send the reads to the primary for 60 s.
        settings.SCALEKIT = {**LSN, "PINNING_SECONDS": 60}
        name = unique()
        client = Client()
        client.post("/items/", {"name": name})
        assert wait_until(
            lambda: client.get("/items/").json()["read_from"] == "replica", timeout=10
        ), replication_report()
        assert name in client.get("/items/").json()["names"]

    def test_a_commit_ending_on_a_wal_page_boundary_is_reachable(self, replica):
        # The insert position then points past the next page's header, which
        # the replica reaches only with some later, unrelated WAL record.
        with connections["default"].cursor() as cursor:
            boundary = end_wal_on_a_page_boundary(cursor)
            assert boundary is not None, "other WAL kept landing between our records"
            required = routers.primary_lsn("default")
            if _wal_insert_position(cursor) == boundary + 24:  # nothing else came
                assert required == boundary
        assert required >= boundary
        assert wait_until(replica_reached_primary, timeout=5), replication_report()

    def test_the_position_after_a_wal_segment_switch_is_reachable(self, replica):
        # The next segment's first page has a 40-byte header.
        with connections["default"].cursor() as cursor:
            cursor.execute("SELECT pg_logical_emit_message(false, 'scalekit', 'x')")
            cursor.execute("SELECT pg_switch_wal()")
            cursor.execute(
                "SELECT (lsn - '0/0')::bigint, (pg_walfile_name_offset(lsn)).file_offset "
                "FROM pg_current_wal_insert_lsn() AS lsn"
            )
            position, offset = cursor.fetchone()
            required = routers.primary_lsn("default")
            if offset == 40 and _wal_insert_position(cursor) == position:
                assert required == position - 40  # nothing else came
        assert required >= position - offset
        assert wait_until(replica_reached_primary, timeout=5), replication_report()

    def test_the_cookie_keeps_what_untouched_groups_required(self, replica):
        scope = routers.Scope(False, {"default": 50, "analytics": 100})
        token = routers._scope.set(scope)
        try:
            router.db_for_write(Item)  # writes the default group only
            value = routers.pin_value(scope, routers.conf.get())
        finally:
            routers._scope.reset(token)
        pinned, lsns = routers.parse_pin(value)
        assert not pinned
        assert lsns["analytics"] == 100
        assert lsns["default"] > 50

    def test_old_style_or_foreign_cookie_values_pin_to_the_primary(self):
        assert routers.parse_pin("1") == (True, {})
        assert routers.parse_pin("lsn:default=x") == (True, {})
        assert routers.parse_pin("lsn:default=\u00b2") == (True, {})
        assert routers.parse_pin("lsn:default=12,analytics=7") == (
            False,
            {"default": 12, "analytics": 7},
        )


@pytest.mark.django_db(transaction=True, databases="__all__")
class TestMonotonicReads:
    def test_failover_without_positions_moves_to_the_primary(self, replica):
        with override_settings(
            SCALEKIT={**SCALEKIT, "REPLICAS": ["replica", "replica_b"]}
        ):
            first = router.db_for_read(Item)
            routers.mark_down(first, 30, "test")
            assert router.db_for_read(Item) == "default"
            assert router.db_for_read(Item) == "default"

    def test_failover_with_positions_moves_to_a_replica_as_far_along(self, replica):
        with override_settings(SCALEKIT={**LSN, "REPLICAS": ["replica", "replica_b"]}):
            first = router.db_for_read(Item)
            other = ({"replica", "replica_b"} - {first}).pop()
            assert routers._position(first, routers.conf.get()) > 0  # sampled
            routers.mark_down(first, 30, "test")
            assert router.db_for_read(Item) == other


@pytest.mark.slow
@pytest.mark.django_db(transaction=True, databases="__all__")
def test_a_replica_dropping_packets_costs_one_connect_timeout(replica, blackhole):
    settings = {**SCALEKIT, "REPLICAS": {"replica_blackhole": 1000, "replica": 1}}
    Item.objects.create(name="x")
    latencies: dict[str, list[float]] = {"first": [], "later": []}
    errors = []

    def read(wave):
        started = time.monotonic()
        try:
            with routing_scope():
                assert list(Item.objects.values_list("name", flat=True)) == ["x"]
        except Exception as exc:  # collected, asserted below
            errors.append(exc)
        finally:
            latencies[wave].append(time.monotonic() - started)
            connections.close_all()

    with override_settings(SCALEKIT=settings):
        first = [threading.Thread(target=read, args=("first",)) for _ in range(4)]
        for t in first:
            t.start()
        # Once the first wave has been stuck connecting for a while (on a
        # loaded machine its threads may take time to get there) ...
        assert wait_until(lambda: "replica_blackhole" in routers._connecting, timeout=5)
        time.sleep(0.4)
        later = [threading.Thread(target=read, args=("later",)) for _ in range(16)]
        for t in later:
            t.start()
        for t in first + later:
            t.join()
        assert routers.is_down("replica_blackhole")
        started = time.monotonic()
        for _ in range(20):
            read("later")
        after = (time.monotonic() - started) / 20
    assert errors == []
    # connect_timeout is 2 s: the first wave waits for it once, in parallel.
    assert max(latencies["first"]) < 2 + 1.5
    # Threads arriving while it hangs do not queue behind it.
    assert max(latencies["later"]) < 1.5
    assert after < 0.3


# --- Metrics -------------------------------------------------------------------


def routed(alias: str, reason: str) -> float:
    from prometheus_client import REGISTRY

    value = REGISTRY.get_sample_value(
        "scalekit_router_queries_total", {"alias": alias, "reason": reason}
    )
    return value or 0.0


@pytest.mark.django_db(transaction=True, databases="__all__")
class TestMetrics:
    @pytest.fixture(autouse=True)
    def _flushed(self):
        # Counts pending in this thread's own scope from earlier tests must
        # not land in the middle of a test's before/after.
        routers.flush_implicit_scopes()

    def test_queries_are_counted_per_alias_and_reason_when_the_scope_ends(
        self, replica
    ):
        before = {
            key: routed(*key)
            for key in [
                ("replica", "read"),
                ("default", "write"),
                ("default", "pinned"),
                ("default", "in-transaction"),
            ]
        }
        with routing_scope():
            list(Item.objects.all())
            list(Item.objects.all())
            with transaction.atomic():
                list(Item.objects.all())
            Item.objects.create(name="x")
            list(Item.objects.all())
            # Not yet exported: counted in the scope, added when it ends.
            assert routed("replica", "read") == before["replica", "read"]
        assert routed("replica", "read") - before["replica", "read"] == 2
        assert (
            routed("default", "in-transaction") - before["default", "in-transaction"]
            == 1
        )
        assert routed("default", "write") - before["default", "write"] >= 1
        assert routed("default", "pinned") - before["default", "pinned"] == 1

    def test_failover_and_out_of_rotation(self):
        from prometheus_client import REGISTRY

        before = routed("default", "replica-failover")
        gauge = ("scalekit_router_replica_out_of_rotation", {"alias": "replica_closed"})
        with override_settings(SCALEKIT={**SCALEKIT, "REPLICAS": ["replica_closed"]}):
            with routing_scope():
                router.db_for_read(Item)
            assert REGISTRY.get_sample_value(*gauge) == 1
        # A settings change puts every replica back in rotation.
        assert REGISTRY.get_sample_value(*gauge) == 0
        assert routed("default", "replica-failover") - before == 1

    @pytest.mark.slow
    def test_queries_outside_any_scope_are_counted(self, replica):
        # A thread of its own (or a management command): no request and no
        # routing_scope() ends its scope.
        before = routed("replica", "read")
        done, release = threading.Event(), threading.Event()

        def work() -> None:
            for _ in range(3):
                list(Item.objects.all())
            done.set()
            release.wait(30)
            list(Item.objects.all())
            connections.close_all()

        thread = threading.Thread(target=work)
        thread.start()
        try:
            assert done.wait(30)
            # While the thread lives: the flusher adds its counts.
            deadline = time.monotonic() + routers.IMPLICIT_FLUSH_SECONDS + 5
            while routed("replica", "read") - before < 3:
                assert time.monotonic() < deadline, "implicit scope never flushed"
                time.sleep(0.05)
            assert routed("replica", "read") - before == 3
        finally:
            release.set()
            thread.join(30)
        # When it ends: the rest, without waiting for the flusher.
        assert routed("replica", "read") - before == 4

    @override_settings(SCALEKIT={**SCALEKIT, "METRICS": {"ROUTING": False}})
    def test_routing_metrics_can_be_turned_off(self, replica):
        before = routed("replica", "read")
        with routing_scope() as scope:
            router.db_for_read(Item)
            assert scope.tally is None
        assert routed("replica", "read") == before


@pytest.mark.parametrize("router_class", [PrimaryReplicaRouter, ShardRouter])
def test_the_routers_need_the_app_installed(router_class):
    # Without it no check reports a bad setting and no signal ends a
    # request's scope: refuse at the first query, saying what to add.
    without = [app for app in settings.INSTALLED_APPS if app != "django_scalekit"]
    assert len(without) < len(settings.INSTALLED_APPS)
    with (
        override_settings(INSTALLED_APPS=without),
        pytest.raises(
            ImproperlyConfigured, match='"django_scalekit" in INSTALLED_APPS'
        ),
    ):
        router_class()
    router_class()  # installed again


def test_a_new_scope_sets_every_field():
    # Scope.__init__ sets _GroupState's fields itself: a slot added there
    # must be set here too.
    scope = routers.Scope()
    slots = [
        name
        for cls in type(scope).__mro__
        for name in getattr(cls, "__slots__", ())
        if name != "__weakref__"
    ]
    assert len(slots) > 15
    for name in slots:
        getattr(scope, name)

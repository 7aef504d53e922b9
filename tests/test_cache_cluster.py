"""The two-level cache on a Redis Cluster (tests/settings.py ``cache_cluster``).

The real three-node cluster from ``scripts/services cluster-up`` (127.0.0.1
ports 7001-7003, no replicas), through
``django_scalekit.cluster.RedisClusterClient``.
"""

from __future__ import annotations

import io
import threading
import time

import pytest
import redis as redis_py
from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.core.management import call_command
from django.test import override_settings

from django_scalekit import cache, checks, health
from django_scalekit.cache import cached
from django_scalekit.cluster import RedisClusterClient
from tests import cache_worker
from tests.conftest import require_service
from tests.test_cache import (
    at_once,
    invalidation_reaches_another_process,
    l2_errors,
    result,
    subscribed,
    worker,
)

pytestmark = pytest.mark.slow

PORTS = (7001, 7002, 7003)
ALIAS = "cache_cluster"


def nodes():
    return {
        port: redis_py.Redis(host="127.0.0.1", port=port, socket_timeout=2)
        for port in PORTS
    }


def keys_by_node(pattern):
    return {
        port: sorted(k.decode() for k in node.scan_iter(match=pattern, count=1000))
        for port, node in nodes().items()
    }


@pytest.fixture
def prefix():
    """A key prefix of this test's own on the cluster L2; its keys are deleted after."""
    require_service("Redis", 6379)
    for port in PORTS:
        require_service("Redis Cluster node", port)  # or: scripts/services cluster-up
    with cache_worker.own_prefix(l2=ALIAS) as name:
        yield name
    for node in nodes().values():
        for key in node.scan_iter(match=f"*{name}*", count=1000):
            node.delete(key)


def l2_of(func):
    return func._scalekit.resolve().store.l2


def no_l2_errors(func):
    """The breaker never opened: no CROSSSLOT or other error reached L2 calls."""
    store = func._scalekit.resolve().store
    return store.breaker.open_until == 0 and store.breaker.down_since == 0


def test_l2_is_a_cluster_client(prefix):
    l2 = l2_of(cache_worker.square)
    assert isinstance(l2, cache.RedisL2) and l2.cluster
    assert isinstance(l2.client, redis_py.cluster.RedisCluster)
    assert len(l2.client.get_primaries()) == 3
    assert l2.channel.startswith("scalekit:cache:0:")


def test_a_value_and_its_lock_share_a_slot_and_keys_spread(prefix):
    l2 = l2_of(cache_worker.square)
    assert [cache_worker.square(i) for i in range(60)] == [i * i for i in range(60)]
    client = nodes()[PORTS[0]]
    slots = set()
    for i in range(60):
        key = l2.key(cache_worker.square.key(i))
        assert key.startswith("{") and "}" in key
        # The server's own hashing: all four keys a script touches, one slot.
        slot = client.cluster("KEYSLOT", key)
        for suffix in (":lock", ":gen", ":inv"):
            assert client.cluster("KEYSLOT", key + suffix) == slot
        slots.add(slot)
    assert len(slots) > 50
    found = keys_by_node(f"*{prefix}*")
    assert sum(map(len, found.values())) == 60
    assert all(len(keys) >= 5 for keys in found.values()), {
        port: len(keys) for port, keys in found.items()
    }
    cache.reset()  # a new L1: every value comes from L2, computed once
    assert [cache_worker.square(i) for i in range(60)] == [i * i for i in range(60)]
    assert cache_worker.computations("square") == 60
    assert no_l2_errors(cache_worker.square)


def test_read_or_lock_write_invalidate_refresh(prefix):
    data = cache_worker.redis()
    errors_before = l2_errors(ALIAS)
    data.set(f"{prefix}:data:x", "one")
    assert cache_worker.current("x") == "one"
    data.set(f"{prefix}:data:x", "two")
    assert cache_worker.current("x") == "one"  # cached
    cache_worker.current.invalidate("x")
    assert cache_worker.current("x") == "two"
    data.set(f"{prefix}:data:x", "three")
    assert cache_worker.current.refresh("x") == "three"
    cache.reset()
    assert cache_worker.current("x") == "three"  # refresh stored it in L2
    assert cache_worker.computations("current") == 3
    l2 = l2_of(cache_worker.current)
    skey = cache_worker.current.key("x")
    # One invalidate(): INCR of {key}:gen, and its time in {key}:inv.
    gen = l2.generation(skey)
    assert gen.startswith("1@")
    token = "a-token"
    assert l2.try_lock(skey, token, 1000) == gen
    assert l2.try_lock(skey, "another", 1000) is None
    l2.release(skey, token)
    assert l2.try_lock(skey, "another", 1000) == gen
    l2.release(skey, "another")
    # Several keys at once (one script call per key on a cluster).
    assert [cache_worker.square(i) for i in range(10)] == [i * i for i in range(10)]
    cache_worker.square._scalekit.resolve().store.invalidate(
        [cache_worker.square.key(i) for i in range(10)]
    )
    # The values are gone; what is left is each key's generation and time.
    left = [k for keys in keys_by_node(f"*{prefix}*square*").values() for k in keys]
    assert sorted(k.rpartition("}")[2] for k in left) == [":gen"] * 10 + [":inv"] * 10
    assert l2_errors(ALIAS) == errors_before
    assert no_l2_errors(cache_worker.current)


def test_lua_scripts_are_reloaded_on_every_node(prefix):
    calls = []

    @cached(name="tests.test_cache_cluster.plus", l1_timeout=0)
    def plus(x):
        calls.append(x)
        return x + 1

    for node in nodes().values():
        node.script_flush()
    assert [plus(i) for i in range(20)] == [i + 1 for i in range(20)]
    for node in nodes().values():
        node.script_flush()
    plus.invalidate(3)
    assert [plus(i) for i in range(20)] == [i + 1 for i in range(20)]
    assert calls == [*range(20), 3]
    assert no_l2_errors(plus)


def test_stampede_computes_once(prefix):
    assert at_once(lambda: cache_worker.slow_square(7), 20) == [49] * 20
    assert cache_worker.computations("slow_square") == 1


def test_stampede_across_processes_computes_once(prefix):
    procs = [worker("call", "slow_square", 9, 4, env_prefix=prefix) for _ in range(4)]
    outputs = [result(p) for p in procs]
    assert [o[0]["value"] for o in outputs] == [81] * 4
    assert cache_worker.computations("slow_square") == 1
    # Three of the four waited on the lock in Redis.
    assert sum(o[0]["lock_waits"] for o in outputs) == 3


def test_invalidate_reaches_another_process(prefix):
    assert invalidation_reaches_another_process(prefix, cache_worker.redis()) < 0.5


def test_invalidation_from_any_node_reaches_the_listener(prefix):
    """Keys on each node: the script PUBLISHes on the node owning the key, and
    the cluster bus carries it to the listener's node."""
    data = cache_worker.redis()
    store = subscribed(cache_worker.current)
    names = [f"n{i}" for i in range(12)]
    for name in names:
        data.set(f"{prefix}:data:{name}", "before")
        assert cache_worker.current(name) == "before"
    owners = {
        store.l2.client.get_node_from_key(
            store.l2.key(cache_worker.current.key(name))
        ).port
        for name in names
    }
    assert owners == set(PORTS)
    for name in names:
        data.set(f"{prefix}:data:{name}", "after")
    assert [cache_worker.current(name) for name in names] == ["before"] * 12  # L1
    for name in names:
        assert result(worker("invalidate", name, env_prefix=prefix)) == [
            {"invalidated": name}
        ]
    deadline = time.monotonic() + 2
    while time.monotonic() < deadline and len(cache_worker.current._scalekit.l1):
        time.sleep(0.01)
    assert [cache_worker.current(name) for name in names] == ["after"] * 12
    assert store.listener.subscribed.is_set()


def test_invalidate_all_deletes_keys_on_every_node(prefix):
    assert [cache_worker.square(i) for i in range(60)] == [i * i for i in range(60)]
    assert [cache_worker.product(i) for i in range(5)]
    before = keys_by_node(f"*{prefix}*square*")
    assert all(before.values())
    assert cache_worker.square.invalidate_all() == 60
    assert keys_by_node(f"*{prefix}*square*") == {port: [] for port in PORTS}
    assert len([k for ks in keys_by_node(f"*{prefix}*product*").values() for k in ks])
    assert [cache_worker.square(i) for i in range(3)] == [0, 1, 4]
    assert cache_worker.computations("square") == 63


def test_warm_cache(prefix):
    out = io.StringIO()
    call_command("warm_cache", "--only", "tests.cache_worker.product_pks", stdout=out)
    assert "tests.cache_worker.product_pks: 3/3" in out.getvalue()
    l2 = l2_of(cache_worker.product)
    stored = [l2.key(cache_worker.product.key(pk)) for pk in (1, 2, 3)]
    assert l2.client.exists(*stored) == 3
    fresh = worker("call", "product", 2, env_prefix=prefix)
    assert result(fresh) == [{"value": {"pk": 2, "name": "product 2"}}]
    assert cache_worker.computations("product") == 3


def test_unreachable_cluster_is_an_outage_not_an_exception(prefix, caplog):
    caches = {
        **settings.CACHES,
        "cluster_down": {
            **settings.CACHES[ALIAS],
            "LOCATION": ["redis://127.0.0.1:1", "redis://127.0.0.1:2"],
        },
    }
    scalekit = {
        **settings.SCALEKIT,
        "CACHE": {
            "L2": "cluster_down",
            "KEY_PREFIX": prefix,
            "L1_TIMEOUT": 0,
            "CIRCUIT_RETRY_SECONDS": 0.2,
        },
    }
    calls = []
    with override_settings(CACHES=caches, SCALEKIT=scalekit):

        @cached(name="tests.test_cache_cluster.down")
        def down(x):
            calls.append(x)
            return -x

        assert [down(1), down(1), down(2)] == [-1, -1, -2]
        down.invalidate(1)  # kept to replay when the cluster is back
        store = down._scalekit.resolve().store
        assert store.breaker.open_until > 0 and list(store.pending) == [down.key(1)]
        assert isinstance(store.l2.client, cache._Unconnected)
        # The nodes answer now (the alias's client is pointed at the real
        # cluster): the client is made on the next probe, the invalidation
        # replayed, and values are stored on the cluster again.
        store.l2.cache.client._server = settings.CACHES[ALIAS]["LOCATION"]
        time.sleep(0.3)
        assert down(3) == -3
        assert isinstance(store.l2.client, redis_py.cluster.RedisCluster)
        assert store.breaker.open_until == 0 and list(store.pending) == []
        assert store.l2.client.exists(store.l2.key(down.key(3))) == 1
        assert store.l2.client.exists(store.l2.key(down.key(1)) + ":gen") == 1
    assert calls == [1, 1, 2, 3]
    assert "L2 cache 'cluster_down' is unavailable" in caplog.text


# --- the django-redis client plugin on its own ------------------------------------


def test_django_cache_api_on_the_cluster(prefix):
    from django.core.cache import caches

    c = caches[ALIAS]
    assert isinstance(c.client, RedisClusterClient)
    data = {f"{prefix}:k{i}": i for i in range(30)}
    c.set_many(data, timeout=60)
    assert c.get_many(list(data)) == data  # one MGET per slot
    spread = keys_by_node(f"*{prefix}:k*")
    assert all(spread.values())
    assert sorted(c.keys(f"{prefix}:k*")) == sorted(data)  # every node's KEYS
    assert sorted(c.iter_keys(f"{prefix}:k*")) == sorted(data)
    assert c.delete_many([f"{prefix}:k{i}" for i in range(10)]) == 10
    assert c.incr(f"{prefix}:k10", 5) == 15
    assert c.ttl(f"{prefix}:k10") > 0
    assert c.delete_pattern(f"{prefix}:k*") == 20
    assert keys_by_node(f"*{prefix}:k*") == {port: [] for port in PORTS}
    with c.lock(f"{prefix}:lock", timeout=5):
        assert c.add(f"{prefix}:once", 1) and not c.add(f"{prefix}:once", 2)
    c.close()  # CLOSE_CONNECTION semantics: the client reconnects
    assert c.get(f"{prefix}:once") == 1


def test_one_cluster_client_per_process_and_database_zero_only(prefix):
    from django.core.cache import caches

    a = caches[ALIAS].client.get_client()
    b = threading.Thread(target=lambda: seen.append(caches[ALIAS].client.get_client()))
    seen = []
    b.start()
    b.join()
    assert seen == [a]  # another thread's cache instance, the same RedisCluster
    bad = {**settings.CACHES[ALIAS], "LOCATION": "redis://127.0.0.1:7001/3"}
    with (
        override_settings(CACHES={**settings.CACHES, "bad": bad}),
        pytest.raises(ImproperlyConfigured, match="scalekit.E209"),
    ):
        caches["bad"].client.get_client()


def test_health_check(prefix):
    assert health._cache_check(ALIAS)() is None


# --- checks -----------------------------------------------------------------------


def test_cluster_checks():
    def messages(location):
        cluster = {**settings.CACHES[ALIAS], "LOCATION": location}
        with override_settings(
            CACHES={**settings.CACHES, "c": cluster},
            SCALEKIT={"CACHE": {"L2": "c"}},
        ):
            return checks.check_cache()

    assert messages(settings.CACHES[ALIAS]["LOCATION"]) == []
    assert messages("redis://a:7001/0,redis://b:7001?db=0") == []
    found = messages(["redis://a:7001", "redis://b:7001/2", "redis://c:7001?db=1"])
    assert [m.id for m in found] == ["scalekit.E209", "scalekit.E209"]
    assert "'redis://b:7001/2'" in found[0].msg

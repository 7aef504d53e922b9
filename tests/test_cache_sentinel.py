"""The two-level cache on Redis Sentinel (tests/settings.py ``cache_sentinel``).

The real group from ``scripts/services sentinel-up``: a master and a replica
on 6390/6391 watched by one Sentinel on 26390 (service ``scalekit``).
``scripts/services sentinel-failover`` promotes the replica while callers keep
going; either server may be the master when a test starts.
"""

from __future__ import annotations

import fcntl
import pickle
import tempfile
import threading
import time

import pytest
import redis as redis_py
from django.conf import settings
from django.test import override_settings

from django_scalekit import cache, checks, health
from django_scalekit.cache import cached
from tests import cache_worker
from tests.conftest import require_service, services, wait_until
from tests.test_cache import (
    at_once,
    invalidation_reaches_another_process,
    l2_errors,
    result,
    subscribed,
    worker,
)

pytestmark = pytest.mark.slow

SENTINEL_PORT = 26390
SERVICE = "scalekit"
ALIAS = "cache_sentinel"


def require_sentinel():
    require_service("Redis", 6379)
    require_service("Redis Sentinel", SENTINEL_PORT)  # or: scripts/services sentinel-up


def sentinel():
    return redis_py.Redis(host="127.0.0.1", port=SENTINEL_PORT, socket_timeout=2)


def master_port():
    return int(sentinel().sentinel_get_master_addr_by_name(SERVICE)[1])


def server(port):
    return redis_py.Redis(host="127.0.0.1", port=port, socket_timeout=2)


def both_servers():
    master = master_port()
    (replica,) = {6390, 6391} - {master}
    return server(master), server(replica)


@pytest.fixture
def prefix():
    """A key prefix of this test's own on the Sentinel L2; its keys are deleted
    after. Test runs sharing the group take turns: a failover would move the
    master under another run's test."""
    require_sentinel()
    with open(f"{tempfile.gettempdir()}/scalekit-sentinel-tests.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        with cache_worker.own_prefix(l2=ALIAS) as name:
            yield name
        client = server(master_port())
        for key in client.scan_iter(match=f"*{name}*", count=1000):
            client.delete(key)


def l2_key(func, *args):
    store = func._scalekit.resolve().store
    return store.l2.key(func.key(*args))


def test_l2_is_the_master_sentinel_names(prefix):
    store = cache_worker.square._scalekit.resolve().store
    assert isinstance(store.l2, cache.RedisL2) and store.l2.sentinel_pool is not None
    assert [cache_worker.square(3) for _ in range(3)] == [9] * 3
    cache.reset()  # a new L1: the value comes from L2
    assert cache_worker.square(3) == 9
    assert cache_worker.computations("square") == 1
    master, replica = both_servers()
    key = l2_key(cache_worker.square, 3)
    assert pickle.loads(master.get(key))[1] == 9
    # The replica has it too (replication), never written to by us.
    assert wait_until(lambda: replica.exists(key) == 1, timeout=5)


def test_stampede_computes_once_through_sentinel(prefix):
    assert at_once(lambda: cache_worker.slow_square(7), 20) == [49] * 20
    # And across processes: a second process finds the value, computes nothing.
    assert result(worker("call", "slow_square", 7, env_prefix=prefix)) == [
        {"value": 49}
    ]
    assert cache_worker.computations("slow_square") == 1


def test_invalidate_reaches_another_process(prefix):
    assert invalidation_reaches_another_process(prefix, cache_worker.redis()) < 0.5


class Load:
    """Threads calling and invalidating cached functions, counting what callers see."""

    def __init__(self, funcs, threads=4):
        self.funcs = funcs
        self.threads = threads
        self.calls = 0
        self.errors: list[BaseException] = []
        self.wrong = 0
        self.stop = threading.Event()
        self.lock = threading.Lock()

    def worker(self, n):
        i = 0
        while not self.stop.is_set():
            func = self.funcs[i % len(self.funcs)]
            x = (n * 7 + i) % 20
            try:
                if i % 5 == 4:
                    func.invalidate(x)
                elif func(x) != x * x:
                    with self.lock:
                        self.wrong += 1
            except BaseException as exc:
                with self.lock:
                    self.errors.append(exc)
            with self.lock:
                self.calls += 1
            i += 1
            time.sleep(0.002)

    def __enter__(self):
        self.workers = [
            threading.Thread(target=self.worker, args=(n,)) for n in range(self.threads)
        ]
        for t in self.workers:
            t.start()
        return self

    def __exit__(self, *exc_info):
        self.stop.set()
        for t in self.workers:
            t.join(30)


@pytest.mark.faults
def test_failover_under_load(prefix, record):
    """SENTINEL FAILOVER (the old master keeps running and is demoted seconds
    later) while threads call and invalidate: no caller sees an exception, and
    our writes reach the new master within a few seconds."""
    scalekit = {
        **settings.SCALEKIT,
        "CACHE": {
            "L2": ALIAS,
            "KEY_PREFIX": prefix,
            "L1_TIMEOUT": 0.2,
            "CIRCUIT_RETRY_SECONDS": 1,
        },
    }
    with override_settings(SCALEKIT=scalekit):

        @cached(name="tests.test_cache_sentinel.sq_a")
        def sq_a(x):
            return x * x

        @cached(name="tests.test_cache_sentinel.sq_b")
        def sq_b(x):
            time.sleep(0.01)
            return x * x

        probe_runs = []

        @cached(name="tests.test_cache_sentinel.probe", l1_timeout=0)
        def probe():
            probe_runs.append(1)
            return len(probe_runs)

        store = subscribed(sq_a)
        old = master_port()
        (new,) = {6390, 6391} - {old}
        key = l2_key(probe)
        errors_before = l2_errors(ALIAS)

        def landed_on(port):
            """A fresh value of probe() is written to the master on ``port``
            (asked first: a replica would have it through replication)."""
            if server(port).role()[0] != b"master":
                return False
            probe.invalidate()
            value = probe()
            raw = server(port).get(key)
            return raw is not None and pickle.loads(raw)[1] == value

        assert landed_on(old)
        failover_error = []

        def failover():
            try:
                services("sentinel-failover")
            except BaseException as exc:
                failover_error.append(exc)

        with Load([sq_a, sq_b]) as load:
            time.sleep(1)
            started = time.monotonic()
            runner = threading.Thread(target=failover)
            runner.start()
            switched = recovered = None
            while time.monotonic() - started < 20:
                if switched is None and master_port() == new:
                    switched = time.monotonic() - started
                if landed_on(new):
                    recovered = time.monotonic() - started
                    break
                time.sleep(0.05)
            time.sleep(2)  # the load goes on after the switch
        # Later writes keep landing on the new master.
        assert [landed_on(new) for _ in range(5)] == [True] * 5
        runner.join(120)
        assert failover_error == []
        assert master_port() == new
        # The listener followed the master: subscribed there.
        listener = store.listener
        assert wait_until(
            lambda: (
                listener.subscribed.is_set()
                and listener.pubsub.connection is not None
                and listener.pubsub.connection.port == new
            ),
            timeout=10,
        )
        figures = {
            "calls": load.calls,
            "caller_errors": len(load.errors),
            "wrong_values": load.wrong,
            "l2_errors": int(l2_errors(ALIAS) - errors_before),
            "sentinel_switched_s": None if switched is None else round(switched, 2),
            "writes_on_new_master_s": None
            if recovered is None
            else round(recovered, 2),
        }
        record(
            "Sentinel failover under load, 4 threads calling and invalidating",
            **figures,
        )
    assert load.errors == []
    assert load.wrong == 0
    assert load.calls > 200
    assert recovered is not None and recovered < 10


@pytest.mark.faults
def test_a_quiet_process_follows_the_master_and_invalidates_again(prefix, monkeypatch):
    """Without load the pool opens no new connection (each would ask Sentinel
    for the master), and Sentinel demotes the old master only ~10 s after the
    switch: the listener's check moves this process to the new master, and
    makes again the invalidations that went to the old one meanwhile."""
    data = cache_worker.redis()
    data.set(f"{prefix}:data:q", "before")
    runs = []

    @cached(name="tests.test_cache_sentinel.quiet_probe", l1_timeout=0)
    def probe():
        runs.append(1)
        return len(runs)

    store = subscribed(probe)
    assert cache_worker.current("q") == "before"
    old = master_port()
    (new,) = {6390, 6391} - {old}
    stale_key = l2_key(cache_worker.current, "q")
    assert wait_until(lambda: server(new).exists(stale_key) == 1, timeout=5)
    # The listener does not look for the master until we let it.
    monkeypatch.setattr(cache, "_FOLLOW_MASTER_EVERY", 1000.0)
    failover = threading.Thread(target=services, args=("sentinel-failover",))
    failover.start()
    assert wait_until(lambda: master_port() == new, timeout=20)
    data.set(f"{prefix}:data:q", "after")
    cache_worker.current.invalidate("q")  # reaches the old master only
    assert server(new).exists(stale_key) == 1
    assert store.listener.pubsub.connection.port == old

    monkeypatch.setattr(cache, "_FOLLOW_MASTER_EVERY", 1.0)
    started = time.monotonic()
    key = l2_key(probe)
    moved = None
    while time.monotonic() - started < 10 and moved is None:
        probe.invalidate()
        value = probe()
        raw = server(new).get(key)
        if raw is not None and pickle.loads(raw)[1] == value:
            moved = time.monotonic() - started
        time.sleep(0.1)
    print("Sentinel failover, one quiet thread: writes moved after", moved, "s")
    assert moved is not None and moved < 3
    assert server(new).exists(stale_key) == 0  # invalidated again
    assert cache_worker.current("q") == "after"
    failover.join(120)


@pytest.mark.faults
def test_invalidation_crosses_processes_after_a_failover(prefix):
    """After a failover, an invalidation from a fresh process (it connects to
    the new master) reaches this process's listener."""
    data = cache_worker.redis()
    data.set(f"{prefix}:data:f", "before")
    store = subscribed(cache_worker.current)
    services("sentinel-failover")
    new = master_port()
    assert wait_until(
        lambda: (
            store.listener.subscribed.is_set()
            and store.listener.pubsub.connection is not None
            and store.listener.pubsub.connection.port == new
        ),
        timeout=10,
    )
    assert cache_worker.current("f") == "before"
    assert cache_worker.current("f") == "before"  # from L1 now
    data.set(f"{prefix}:data:f", "after")
    assert result(worker("invalidate", "f", env_prefix=prefix)) == [
        {"invalidated": "f"}
    ]
    assert wait_until(lambda: cache_worker.current("f") == "after", timeout=2)


def test_health_check_reads_back_from_the_master(prefix):
    """django-redis reads from the replica, which may lag (or stall) behind
    the write the check just made: the check reads the master."""
    _, replica = both_servers()
    replica.execute_command("CLIENT", "PAUSE", 1500, "ALL")  # a stalled replica
    started = time.monotonic()
    assert health._cache_check(ALIAS)() is None
    assert time.monotonic() - started < 0.5
    time.sleep(1.5)


# --- checks -----------------------------------------------------------------------


def test_sentinel_checks():
    def messages(**options):
        alias = {
            **settings.CACHES[ALIAS],
            "OPTIONS": {**settings.CACHES[ALIAS]["OPTIONS"], **options},
        }
        with override_settings(
            CACHES={**settings.CACHES, "s": alias}, SCALEKIT={"CACHE": {"L2": "s"}}
        ):
            return [m.id for m in checks.check_cache()]

    assert messages() == []
    assert messages(CONNECTION_FACTORY=None) == ["scalekit.E210"]
    assert messages(CONNECTION_FACTORY="nowhere.Factory") == ["scalekit.E210"]
    assert messages(SENTINELS=[]) == ["scalekit.E210"]
    with override_settings(
        DJANGO_REDIS_CONNECTION_FACTORY="django_redis.pool.SentinelConnectionFactory"
    ):
        assert messages(CONNECTION_FACTORY=None) == []

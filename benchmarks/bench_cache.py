"""Cost of ``django_scalekit.cache.cached`` beside its peers, on the real Redis.

Run from the repository root (pytest-benchmark and django-cacheops are in the
``benchmark`` dependency group; Redis must answer at SCALEKIT_BENCH_REDIS,
default ``redis://127.0.0.1:6379/12``)::

    /work/venv312/bin/python -m pytest benchmarks/bench_cache.py --benchmark-only

Groups, each measured in one run:

1. **L1 hit**: ``@cached`` served from this process's L1, against
   ``functools.lru_cache`` (the floor) and Django's local-memory ``cache.get``
   of the same value (targets: >= 2x faster than LocMemCache, within 10x of
   lru_cache).
2. **L2 hit**: ``@cached`` with L1 off, against a raw django-redis
   ``cache.get`` and django-cacheops' ``@cached`` on the same Redis (target:
   within 1.2x of django-redis).
3. **miss**: an uncontended miss of ``@cached`` (read-or-lock, compute,
   write-and-release: two round trips), against a django-redis ``get`` then
   ``set`` (two round trips, no lock) and cacheops' miss.

The cached value is a small dict, as a view would cache. django-cacheops 7.2
calls redis-py's deprecated ``setex``: that warning is ignored in this module.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterator
from typing import Any

import django
import pytest
from django.conf import settings

REDIS = os.environ.get("SCALEKIT_BENCH_REDIS", "redis://127.0.0.1:6379/12")

settings.configure(
    SECRET_KEY="django-scalekit-benchmarks",
    USE_TZ=True,
    INSTALLED_APPS=["django.contrib.contenttypes", "django_scalekit"],
    DATABASES={"default": {"ENGINE": "django.db.backends.sqlite3", "NAME": ":memory:"}},
    CACHES={
        "default": {
            "BACKEND": "django_redis.cache.RedisCache",
            "LOCATION": REDIS,
            "OPTIONS": {"SOCKET_CONNECT_TIMEOUT": 0.5, "SOCKET_TIMEOUT": 0.5},
        },
        "locmem": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"},
    },
    SCALEKIT={"CACHE": {"L2": "default", "KEY_PREFIX": "scalekit-bench"}},
    CACHEOPS_REDIS=REDIS,
    CACHEOPS_PREFIX=lambda query: "cacheops-bench:",
)
django.setup()

import cacheops  # noqa: E402  (reads settings at import)
from django.core.cache import caches  # noqa: E402

from django_scalekit import cache  # noqa: E402

pytestmark = pytest.mark.filterwarnings(
    "ignore:Call to deprecated setex:DeprecationWarning"
)

VALUE = {"id": 1, "name": "product 1", "price": "9.99", "tags": ["a", "b"]}


def compute(pk: int) -> dict[str, Any]:
    return VALUE


lru = functools.lru_cache(maxsize=None)(compute)
ours = cache.cached(timeout=600, l1_timeout=600)(compute)
ours_l2 = cache.cached(timeout=600, l1_timeout=0)(compute)
ops = cacheops.cached(timeout=600)(compute)


@cache.cached(timeout=600, l1_timeout=0)
def miss_target(pk: int) -> dict[str, Any]:
    return VALUE


@cacheops.cached(timeout=600)
def ops_miss_target(pk: int) -> dict[str, Any]:
    return VALUE


LOCMEM = caches["locmem"]
REDIS_CACHE = caches["default"]


@pytest.fixture(autouse=True, scope="module")
def _warm() -> Iterator[None]:
    from django_redis import get_redis_connection

    client = get_redis_connection("default")
    for key in client.scan_iter(match="*bench*"):
        client.delete(key)
    LOCMEM.set("bench-value", VALUE)
    REDIS_CACHE.set("bench-value", VALUE)
    assert ours(1) == ours_l2(1) == ops(1) == lru(1) == VALUE
    store = ours._scalekit.resolve().store
    store.ensure_listener()
    assert store.listener is not None and store.listener.subscribed.wait(5)
    assert ours(1) == VALUE  # in L1 now that invalidations arrive
    yield
    for key in client.scan_iter(match="*bench*"):
        client.delete(key)


# --- 1. L1 hit ------------------------------------------------------------------


@pytest.mark.benchmark(group="1 L1 hit")
def test_l1_lru_cache(benchmark: Any) -> None:
    assert benchmark(lru, 1) is VALUE


@pytest.mark.benchmark(group="1 L1 hit")
def test_l1_scalekit_cached(benchmark: Any) -> None:
    assert ours._scalekit.l1, "L1 is not in use"
    assert benchmark(ours, 1) == VALUE


@pytest.mark.benchmark(group="1 L1 hit")
def test_l1_django_locmem_get(benchmark: Any) -> None:
    assert benchmark(LOCMEM.get, "bench-value") == VALUE


# --- 2. L2 hit ---------------------------------------------------------------------


@pytest.mark.benchmark(group="2 L2 hit")
def test_l2_scalekit_cached(benchmark: Any) -> None:
    assert benchmark(ours_l2, 1) == VALUE


@pytest.mark.benchmark(group="2 L2 hit")
def test_l2_django_redis_get(benchmark: Any) -> None:
    assert benchmark(REDIS_CACHE.get, "bench-value") == VALUE


@pytest.mark.benchmark(group="2 L2 hit")
def test_l2_cacheops_cached(benchmark: Any) -> None:
    assert benchmark(ops, 1) == VALUE


# --- 3. miss --------------------------------------------------------------------------


def _keys() -> Iterator[int]:
    n = 0
    while True:
        n += 1
        yield n


@pytest.mark.benchmark(group="3 miss (new key each round)")
def test_miss_scalekit_cached(benchmark: Any) -> None:
    keys = _keys()
    benchmark.pedantic(lambda: miss_target(next(keys)), rounds=2000, warmup_rounds=20)


@pytest.mark.benchmark(group="3 miss (new key each round)")
def test_miss_django_redis_get_then_set(benchmark: Any) -> None:
    keys = _keys()

    def get_then_set() -> None:
        key = f"bench-miss-{next(keys)}"
        if REDIS_CACHE.get(key) is None:
            REDIS_CACHE.set(key, compute(1), 600)

    benchmark.pedantic(get_then_set, rounds=2000, warmup_rounds=20)


@pytest.mark.benchmark(group="3 miss (new key each round)")
def test_miss_cacheops_cached(benchmark: Any) -> None:
    keys = _keys()
    benchmark.pedantic(
        lambda: ops_miss_target(next(keys)), rounds=2000, warmup_rounds=20
    )

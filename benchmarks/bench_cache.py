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

pytest-benchmark measures one case after the other, so load from other
processes lands on whichever case runs then. The figures in docs/ come from
running the module as a script, which **interleaves** the cases: each round
times a batch of every case, in a new random order, and the ratios are taken
within a round (cases a few milliseconds apart) before their median::

    /work/venv312/bin/python benchmarks/bench_cache.py [ROUNDS]

It prints the median and minimum µs per call of each case, then each ratio
with its target and whether it is met.
"""

from __future__ import annotations

import functools
import itertools
import os
import random
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Iterator
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


# --- interleaved run (python benchmarks/bench_cache.py) -----------------------------------

_miss_keys = itertools.count(1_000_000)


def _get_then_set(n: int) -> None:
    key = f"bench-miss-{n}"
    if REDIS_CACHE.get(key) is None:
        REDIS_CACHE.set(key, compute(1), 600)


#: name -> (function, argument source, calls per batch). Every case is timed
#: with the same loop (``for a in args: f(a)``), so the loop's cost is shared.
CASES: dict[str, tuple[Callable[[Any], Any], Callable[[int], Iterable[Any]], int]] = {
    "functools.lru_cache hit": (lru, lambda n: itertools.repeat(1, n), 20_000),
    "@cached L1 hit": (ours, lambda n: itertools.repeat(1, n), 20_000),
    "Django LocMemCache.get": (
        LOCMEM.get,
        lambda n: itertools.repeat("bench-value", n),
        5_000,
    ),
    "django-redis cache.get": (
        REDIS_CACHE.get,
        lambda n: itertools.repeat("bench-value", n),
        200,
    ),
    "django-cacheops @cached hit": (ops, lambda n: itertools.repeat(1, n), 200),
    "@cached L2 hit (L1 off)": (ours_l2, lambda n: itertools.repeat(1, n), 200),
    "django-redis get + set (miss)": (
        _get_then_set,
        lambda n: itertools.islice(_miss_keys, n),
        100,
    ),
    "django-cacheops @cached miss": (
        ops_miss_target,
        lambda n: itertools.islice(_miss_keys, n),
        100,
    ),
    "@cached miss": (miss_target, lambda n: itertools.islice(_miss_keys, n), 100),
}

#: (ours, peer, target, direction): ``ours / peer`` must be <= target, or
#: ``peer / ours`` >= target for "faster".
TARGETS = [
    ("@cached L1 hit", "functools.lru_cache hit", 10.0, "within"),
    ("@cached L1 hit", "Django LocMemCache.get", 2.0, "faster"),
    ("@cached L2 hit (L1 off)", "django-redis cache.get", 1.2, "within"),
]


def _batch(func: Callable[[Any], Any], args: Iterable[Any], n: int) -> float:
    """µs per call of ``func`` over ``n`` arguments."""
    args = list(args)
    started = time.perf_counter()
    for a in args:
        func(a)
    return (time.perf_counter() - started) / n * 1e6


def interleaved(rounds: int) -> dict[str, list[float]]:
    """µs per call of each case in each round, the cases shuffled per round."""
    for func, args, n in CASES.values():  # warm up
        _batch(func, args(n), n)
    times: dict[str, list[float]] = {name: [] for name in CASES}
    names = list(CASES)
    for _ in range(rounds):
        random.shuffle(names)
        for name in names:
            func, args, n = CASES[name]
            times[name].append(_batch(func, args(n), n))
    return times


def report(times: dict[str, list[float]]) -> list[str]:
    """The table and the ratio verdicts, as printed lines."""
    lines = [f"{'case':<32} {'median µs':>10} {'min µs':>9}"]
    for name, values in times.items():
        lines.append(
            f"{name:<32} {statistics.median(values):>10.3f} {min(values):>9.3f}"
        )
    lines.append("")
    for ours_name, peer, target, direction in TARGETS:
        pairs = zip(times[ours_name], times[peer], strict=True)
        if direction == "within":
            paired = [o / p for o, p in pairs]
            by_min = min(times[ours_name]) / min(times[peer])
            met = statistics.median(paired) <= target
            goal = f"ours <= {target}x {peer}"
        else:
            paired = [p / o for o, p in pairs]
            by_min = min(times[peer]) / min(times[ours_name])
            met = statistics.median(paired) >= target
            goal = f"ours >= {target}x faster than {peer}"
        lines.append(
            f"{ours_name} vs {peer}: median of per-round ratios "
            f"{statistics.median(paired):.2f}x, ratio of minimums {by_min:.2f}x, "
            f"target {goal}: {'met' if met else 'NOT MET'}"
        )
    lines.append(
        "@cached miss: two L2 round trips (counted by "
        "tests/test_cache.py::test_uncontended_miss_costs_two_round_trips)"
    )
    return lines


def main() -> None:
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 51
    from django_redis import get_redis_connection

    client = get_redis_connection("default")
    warm = _warm.__wrapped__()  # type: ignore[attr-defined]
    next(warm)
    try:
        print("\n".join(report(interleaved(rounds))))
    finally:
        next(warm, None)
        for key in client.scan_iter(match="*bench*"):
            client.delete(key)


if __name__ == "__main__":
    main()

"""Cached functions shared by tests/test_cache.py and separately started processes.

Run as ``python -m tests.cache_worker COMMAND ...`` with
``DJANGO_SETTINGS_MODULE=tests.settings`` and ``SCALEKIT_TEST_CACHE_PREFIX``
set (and ``SCALEKIT_TEST_CACHE_L2`` to use another L2 alias than
``cache_l2``); each computation increments a counter in the ``cache_l2``
Redis, so a test can count them across processes. Prints one JSON line per
result.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
import uuid

from django_scalekit.cache import cached, warmer

PREFIX_ENV = "SCALEKIT_TEST_CACHE_PREFIX"
L2_ENV = "SCALEKIT_TEST_CACHE_L2"


def redis():
    from django_redis import get_redis_connection

    return get_redis_connection("cache_l2")


def prefix() -> str:
    return os.environ[PREFIX_ENV]


def computations(name: str) -> int:
    return int(redis().get(f"{prefix()}:count:{name}") or 0)


def _count(name: str) -> None:
    redis().incr(f"{prefix()}:count:{name}")


@cached(timeout=60)
def square(x):
    _count("square")
    return x * x


@cached(timeout=60)
def slow_square(x, delay=0.5):
    _count("slow_square")
    time.sleep(delay)
    return x * x


@cached(timeout=60)
def current(name):
    """The value of a Redis key: changes when a test sets it."""
    _count("current")
    raw = redis().get(f"{prefix()}:data:{name}")
    return None if raw is None else raw.decode()


@cached(timeout=300)
def product(pk):
    _count("product")
    return {"pk": pk, "name": f"product {pk}"}


@warmer(product)
def product_pks():
    """The products every page shows."""
    return [1, 2, 3]


def l2_alias() -> str:
    return os.environ.get(L2_ENV, "cache_l2")


@contextlib.contextmanager
def own_prefix(l2: str = "cache_l2"):
    """Settings for a key prefix of the caller's own, on the L2 alias ``l2``
    (also for workers started meanwhile); its ``cache_l2`` keys are deleted after."""
    from django.conf import settings
    from django.test import override_settings

    from django_scalekit import cache

    name = f"sktest-{uuid.uuid4().hex[:10]}"
    old = {env: os.environ.get(env) for env in (PREFIX_ENV, L2_ENV)}
    os.environ[PREFIX_ENV] = name
    os.environ[L2_ENV] = l2
    scalekit = {
        **settings.SCALEKIT,
        "CACHE": {"L2": l2, "KEY_PREFIX": name, "L1_TIMEOUT": 30},
    }
    try:
        with override_settings(SCALEKIT=scalekit):
            yield name
    finally:
        for env, value in old.items():
            if value is None:
                del os.environ[env]
            else:
                os.environ[env] = value
        client = redis()
        for key in client.scan_iter(match=f"*{name}*"):
            client.delete(key)
        cache.reset()


def _barrier(parties: int, timeout: float = 30.0) -> None:
    key = f"{prefix()}:barrier"
    redis().incr(key)
    deadline = time.monotonic() + timeout
    while int(redis().get(key) or 0) < parties:
        if time.monotonic() > deadline:
            raise SystemExit("barrier: the other processes never arrived")
        time.sleep(0.001)


def _lock_waits(func) -> float:
    """This process's cross-process lock waits for ``func`` (Prometheus)."""
    from prometheus_client import REGISTRY

    labels = {"function": func._scalekit.name, "scope": "process"}
    return REGISTRY.get_sample_value("scalekit_cache_lock_waits_total", labels) or 0


def settings_override():
    from django.conf import settings

    return {
        **settings.SCALEKIT,
        "CACHE": {"L2": l2_alias(), "KEY_PREFIX": prefix(), "L1_TIMEOUT": 30},
    }


def main(argv: list[str]) -> None:
    import django

    django.setup()
    from django.test import override_settings

    override_settings(SCALEKIT=settings_override()).enable()
    command = argv[0]
    if command == "call":
        # call FUNC ARG [N]: with N, wait until N processes reached this point
        # (a Redis barrier), then call and also print this process's lock waits.
        func = globals()[argv[1]]
        if len(argv) <= 3:
            print(json.dumps({"value": func(int(argv[2]))}), flush=True)
            return
        _barrier(int(argv[3]))
        waits_before = _lock_waits(func)
        value = func(int(argv[2]))
        waits = _lock_waits(func) - waits_before
        print(json.dumps({"value": value, "lock_waits": waits}), flush=True)
    elif command == "watch":
        # watch NAME: read current(NAME) until it changes; print when seen.
        name = argv[1]
        fn = current._scalekit
        first = current(name)
        listener = fn.resolve().store.listener
        assert listener is not None and listener.subscribed.wait(10)
        first = current(name)  # filled into L1 now that invalidations arrive
        assert current(name) == first and len(fn.l1) > 0, "L1 not in use"
        print(json.dumps({"ready": True, "value": first}), flush=True)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            value = current(name)
            if value != first:
                print(json.dumps({"value": value, "seen_at": time.time()}), flush=True)
                return
            time.sleep(0.002)
        print(json.dumps({"timeout": True}), flush=True)
    elif command == "invalidate":
        # invalidate NAME: current(NAME).invalidate() from this other process.
        current.invalidate(argv[1])
        print(json.dumps({"invalidated": argv[1]}), flush=True)
    else:
        raise SystemExit(f"unknown command {command!r}")


if __name__ == "__main__":
    # Run the functions as tests.cache_worker.*, not __main__.*: keys name
    # the module, and the test process imports it under that name.
    from tests.cache_worker import main as module_main

    module_main(sys.argv[1:])

"""``manage.py warm_cache`` against the real Redis."""

from __future__ import annotations

import io

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError
from django.test import override_settings

from django_scalekit import cache
from django_scalekit.cache import Args, cached, warmer
from tests import cache_worker
from tests.conftest import require_service
from tests.test_cache import cache_settings, result, worker

WORKER_WARMER = "tests.cache_worker.product_pks"


@pytest.fixture
def prefix():
    require_service("Redis", 6379)
    with cache_worker.own_prefix() as name:
        yield name


@pytest.fixture(autouse=True)
def _own_registry():
    """Warmers registered by a test do not leak into the next one."""
    saved = dict(cache._warmers)
    yield
    cache._warmers.clear()
    cache._warmers.update(saved)


def run(*args):
    out, err = io.StringIO(), io.StringIO()
    try:
        call_command("warm_cache", *args, stdout=out, stderr=err)
    except CommandError as exc:
        return 1, out.getvalue(), err.getvalue() + str(exc)
    return 0, out.getvalue(), err.getvalue()


def plain_warmer():
    """Warms by itself."""
    return 7


def test_list(prefix):
    code, out, _ = run("--list")
    assert code == 0
    assert (
        f"{WORKER_WARMER} -> tests.cache_worker.product [decorator]  The products every page shows."
        in out
    )


def test_warmed_key_is_served_by_a_fresh_process_without_computing(prefix):
    code, out, err = run("--only", WORKER_WARMER)
    assert code == 0, err
    assert f"{WORKER_WARMER}: 3/3" in out
    assert cache_worker.computations("product") == 3
    fresh = worker("call", "product", 2, env_prefix=prefix)
    assert result(fresh) == [{"value": {"pk": 2, "name": "product 2"}}]
    assert cache_worker.computations("product") == 3


def test_dry_run_computes_nothing(prefix):
    code, out, _ = run("--only", WORKER_WARMER, "--dry-run")
    assert code == 0
    assert out.count("would warm") == 3 and cache_worker.product.key(1) in out
    assert cache_worker.computations("product") == 0


def test_failing_warmer_does_not_stop_the_others(prefix):
    calls = []

    @cached(name="tests.warm.page")
    def page(n, lang="en"):
        calls.append((n, lang))
        if n == 2:
            raise ValueError("page 2 is broken")
        return n

    @warmer(page, name="pages")
    def pages():
        return [1, (2,), Args(3, lang="fr")]

    @warmer(name="exploding")
    def exploding():
        raise RuntimeError("no database")

    code, out, err = run(
        "--only", "exploding", "pages", WORKER_WARMER, "--workers", "3"
    )
    assert code == 1
    assert "2 of 3 warmer(s) failed: exploding, pages" in err
    assert "exploding: error: RuntimeError: no database" in err
    assert "pages: error: (2): ValueError: page 2 is broken" in err
    assert sorted(calls) == [(1, "en"), (2, "en"), (3, "fr")]
    summary = {line.split()[0]: line.split()[1:] for line in out.splitlines()[-3:]}
    assert summary["pages"][:2] == ["2", "1"]
    assert summary[WORKER_WARMER][:2] == ["3", "0"]
    assert cache_worker.computations("product") == 3


def test_warmers_setting(prefix):
    with override_settings(
        SCALEKIT=cache_settings(prefix, WARMERS=["tests.test_warm_cache.plain_warmer"])
    ):
        code, out, _ = run("--only", "tests.test_warm_cache.plain_warmer")
    assert code == 0
    assert "tests.test_warm_cache.plain_warmer       7         0" in out


def test_only_accepts_short_names(prefix):
    code, out, err = run("--only", "product_pks")  # the function's __qualname__
    assert code == 0, err
    assert f"{WORKER_WARMER}: 3/3" in out
    assert cache_worker.computations("product") == 3

    # Names no other module registers (the docs' samples register a
    # ``warm_menus`` of their own once imported).
    @warmer(name="shortname_test.menus")
    def warm_shortname_test_menus():
        return 1

    for name in ("shortname_test.menus", "menus", "warm_shortname_test_menus"):
        code, out, err = run("--only", name)
        assert code == 0, err
        assert out.splitlines()[0] == "shortname_test.menus: started"
        assert out.splitlines()[-1].split()[:3] == ["shortname_test.menus", "1", "0"]


def test_only_refuses_an_ambiguous_short_name(prefix):
    @warmer(name="shop.a.menus")
    def first():
        return 1

    @warmer(name="shop.b.menus")
    def second():
        return 1

    code, _, err = run("--only", "menus")
    assert code == 1
    assert "--only menus is ambiguous: it names shop.a.menus, shop.b.menus" in err
    assert run("--only", "shop.b.menus")[0] == 0


def test_verbosity_zero_prints_only_errors(prefix):
    code, out, err = run("--only", WORKER_WARMER, "--verbosity", "0")
    assert (code, out, err) == (0, "", "")
    assert cache_worker.computations("product") == 3

    @warmer(name="broken")
    def broken():
        raise RuntimeError("no database")

    code, out, err = run("--only", "broken", "-v", "0")
    assert code == 1 and out == ""
    assert "broken: error: RuntimeError: no database" in err


def test_unknown_warmer_and_bad_workers(prefix):
    assert "Unknown warmer(s): nope" in run("--only", "nope")[2]
    assert "--workers 0" in run("--workers", "0")[2]


def test_l2_down_is_a_failure(prefix):
    with override_settings(
        SCALEKIT={**cache_settings(prefix), "CACHE": {"L2": "cache_down"}}
    ):
        code, _, err = run("--only", WORKER_WARMER)
    assert code == 1
    assert "CacheUnavailable" in err and "'cache_down' is unavailable" in err

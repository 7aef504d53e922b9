"""Routing decision cost: ``PrimaryReplicaRouter`` beside django-multidb-router.

Run from the repository root (pytest-benchmark and django-multidb-router are
in the ``benchmark`` dependency group)::

    /work/venv312/bin/python -m pytest benchmarks/bench_router.py --benchmark-only

``benchmarks/pytest.ini`` is found before ``pyproject.toml`` for paths under
``benchmarks/``, so this run ignores ``DJANGO_SETTINGS_MODULE=tests.settings``
and loads neither pytest-django (``-p no:django``: no test databases, no
blocked connections) nor pytest-randomly. This module configures its own
settings: two SQLite ``:memory:`` databases, ``default`` and ``replica``, so no
server is needed. The project's test run never collects ``bench_*.py``.

Each case is measured for both routers in one group, so the table compares
them side by side; ``0 baseline`` is the floor (a call that returns a
constant). See ``benchmarks/README.md`` for what each case means.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import django
import multidb
import pytest
from django.apps import apps
from django.conf import settings
from django.db.utils import ConnectionRouter
from django.test import override_settings
from multidb import pinning

from django_scalekit import conf, routers

settings.configure(
    SECRET_KEY="django-scalekit-benchmarks",
    USE_TZ=True,
    INSTALLED_APPS=["django.contrib.contenttypes", "django_scalekit"],
    DATABASES={
        "default": {"ENGINE": "django.db.backends.sqlite3", "NAME": ":memory:"},
        "replica": {"ENGINE": "django.db.backends.sqlite3", "NAME": ":memory:"},
    },
    # Both routers are called directly; neither is installed for the ORM.
    DATABASE_ROUTERS=[],
    # Ours:
    # Routing metrics off for the comparison (multidb has none); group 5
    # measures them on.
    SCALEKIT={
        "PRIMARY": "default",
        "REPLICAS": ["replica"],
        "METRICS": {"ROUTING": False},
    },
    # django-multidb-router's:
    REPLICA_DATABASES=["replica"],
)
django.setup()

MODEL = apps.get_model("contenttypes", "ContentType")
SCALEKIT = routers.PrimaryReplicaRouter()
MULTIDB = multidb.PinningReplicaRouter()


def constant(model: Any, **hints: Any) -> str:
    """The floor: a call with the routers' signature that decides nothing."""
    return "default"


@pytest.fixture(autouse=True)
def _clean_state() -> Iterator[None]:
    """Every replica in rotation, no scope, multidb's thread unpinned."""
    conf.get()  # built once per settings change, not per call: build it now
    routers.reset_replica_state()
    pinning.unpin_this_thread()
    yield
    routers.reset_replica_state()
    pinning.unpin_this_thread()


# --- 1. db_for_read, steady state within one request ----------------------


@pytest.mark.benchmark(group="1 db_for_read, unpinned, steady state")
def test_read_steady_scalekit(benchmark):
    with routers.routing_scope():
        # The scope's first read chooses the replica and connects to it.
        assert SCALEKIT.db_for_read(MODEL) == "replica"
        assert benchmark(SCALEKIT.db_for_read, MODEL) == "replica"


@pytest.mark.benchmark(group="1 db_for_read, unpinned, steady state")
def test_read_steady_multidb(benchmark):
    assert benchmark(MULTIDB.db_for_read, MODEL) == "replica"


# --- 2. db_for_read after a write in the same request ---------------------


@pytest.mark.benchmark(group="2 db_for_read, pinned after a write")
def test_read_pinned_scalekit(benchmark):
    with routers.routing_scope():
        assert SCALEKIT.db_for_read(MODEL) == "replica"
        assert SCALEKIT.db_for_write(MODEL) == "default"
        assert benchmark(SCALEKIT.db_for_read, MODEL) == "default"


@pytest.mark.benchmark(group="2 db_for_read, pinned after a write")
def test_read_pinned_multidb(benchmark):
    # multidb pins in its middleware (or use_primary_db), not in db_for_write.
    pinning.pin_this_thread()
    assert benchmark(MULTIDB.db_for_read, MODEL) == "default"


# --- 3. db_for_write --------------------------------------------------------


@pytest.mark.benchmark(group="3 db_for_write")
def test_write_scalekit(benchmark):
    with routers.routing_scope():
        assert benchmark(SCALEKIT.db_for_write, MODEL) == "default"


@pytest.mark.benchmark(group="3 db_for_write")
def test_write_multidb(benchmark):
    assert benchmark(MULTIDB.db_for_write, MODEL) == "default"


# --- 4. A new request: fresh state, then its first read -----------------------


def new_request_scalekit() -> str | None:
    with routers.routing_scope():
        return SCALEKIT.db_for_read(MODEL)


def new_request_multidb() -> str | None:
    pinning.unpin_this_thread()
    return MULTIDB.db_for_read(MODEL)


@pytest.mark.benchmark(group="4 new request: first db_for_read")
def test_new_request_scalekit(benchmark):
    # Includes the per-scope replica choice: weighted pick, health and
    # connection check (SQLite: already connected after the first round).
    assert benchmark(new_request_scalekit) == "replica"


@pytest.mark.benchmark(group="4 new request: first db_for_read")
def test_new_request_multidb(benchmark):
    assert benchmark(new_request_multidb) == "replica"


# --- 6. Through django.db.router, as the ORM calls them ------------------------

# ConnectionRouter loops over DATABASE_ROUTERS and passes the hints on: what a
# query pays in all, of which the router's own decision is one part.
VIA_SCALEKIT = ConnectionRouter([SCALEKIT])
VIA_MULTIDB = ConnectionRouter([MULTIDB])


@pytest.mark.benchmark(group="6 django.db.router: steady read")
def test_orm_read_scalekit(benchmark):
    with routers.routing_scope():
        assert VIA_SCALEKIT.db_for_read(MODEL) == "replica"
        assert benchmark(VIA_SCALEKIT.db_for_read, MODEL) == "replica"


@pytest.mark.benchmark(group="6 django.db.router: steady read")
def test_orm_read_multidb(benchmark):
    assert benchmark(VIA_MULTIDB.db_for_read, MODEL) == "replica"


@pytest.mark.benchmark(group="7 django.db.router: db_for_write")
def test_orm_write_scalekit(benchmark):
    with routers.routing_scope():
        assert benchmark(VIA_SCALEKIT.db_for_write, MODEL) == "default"


@pytest.mark.benchmark(group="7 django.db.router: db_for_write")
def test_orm_write_multidb(benchmark):
    assert benchmark(VIA_MULTIDB.db_for_write, MODEL) == "default"


# --- The floor ----------------------------------------------------------------


@pytest.mark.benchmark(group="0 baseline")
def test_baseline_constant(benchmark):
    # Runs last: the first benchmark of a run on this machine reads high.
    assert benchmark(constant, MODEL) == "default"


# --- 5. Ours with routing metrics on (scalekit_router_queries_total) ---------

WITH_METRICS = {
    "PRIMARY": "default",
    "REPLICAS": ["replica"],
    "METRICS": {"ROUTING": True},
}


@pytest.mark.benchmark(group="5 with routing metrics: steady read, new request")
def test_read_steady_scalekit_with_metrics(benchmark):
    with override_settings(SCALEKIT=WITH_METRICS), routers.routing_scope():
        assert SCALEKIT.db_for_read(MODEL) == "replica"
        assert benchmark(SCALEKIT.db_for_read, MODEL) == "replica"


@pytest.mark.benchmark(group="5 with routing metrics: steady read, new request")
def test_new_request_scalekit_with_metrics(benchmark):
    with override_settings(SCALEKIT=WITH_METRICS):
        assert benchmark(new_request_scalekit) == "replica"

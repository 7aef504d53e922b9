from __future__ import annotations

import json
import socket
import threading
import time
from contextlib import ExitStack

import pytest
from django.db import connections
from django.db.utils import load_backend
from django.test import Client, override_settings

from django_scalekit import checks, conf, health, metrics
from tests.conftest import REPLICA_PORT

pytestmark = pytest.mark.filterwarnings(
    "ignore:Overriding setting DATABASES:UserWarning"
)

DATABASES = ["default", "replica"]
TOKEN = "t0ken-for-the-health-tests"
MIDDLEWARE = [
    "django_scalekit.middleware.HealthCheckMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
]


def site(**health_settings):
    return override_settings(
        ROOT_URLCONF="tests.serve_urls",
        MIDDLEWARE=MIDDLEWARE,
        SCALEKIT={
            "REPLICAS": ["replica"],
            "HEALTH": {"TOKEN": TOKEN, "CACHES": ["default"], **health_settings},
        },
    )


@pytest.fixture
def client():
    return Client()


@pytest.fixture
def dynamic_alias():
    """Add a PostgreSQL alias on a loopback port for the test.

    It is created like a connection made at run time (not in
    connections.settings), which the test runner lets threads use.
    """
    from django.conf import settings

    added = []
    stack = ExitStack()

    def add(alias, port, connect_timeout=2):
        db = {
            **settings.DATABASES["default"],
            "NAME": "postgres",
            "PORT": port,
            "OPTIONS": {"connect_timeout": connect_timeout},
        }
        db.pop("TEST", None)
        db = connections.configure_settings({"default": db})["default"]
        connections[alias] = load_backend(db["ENGINE"]).DatabaseWrapper(db, alias)
        added.append(alias)
        stack.enter_context(
            override_settings(DATABASES={**settings.DATABASES, alias: db})
        )
        return alias

    yield add
    stack.close()
    for alias in added:
        connections[alias].close()
        del connections[alias]


def get_ready(client, details=True, **extra):
    headers = {"HTTP_AUTHORIZATION": f"Bearer {TOKEN}"} if details else {}
    response = client.get("/health/", **headers, **extra)
    return response, json.loads(response.content)


def statuses(body):
    return {name: entries[0]["status"] for name, entries in body["checks"].items()}


# --- Liveness ----------------------------------------------------------------


def test_live_touches_nothing(client):
    # No django_db mark: a query would raise "Database access not allowed".
    with site(DATABASES=["replica"], NON_CRITICAL=[]):
        response = client.get("/health/live/")
    assert response.status_code == 200
    assert response["Content-Type"] == "application/health+json"
    assert response["Cache-Control"] == "no-store"
    assert json.loads(response.content) == {"status": "pass"}


# --- Readiness against the real services ------------------------------------


@pytest.fixture
def streaming(replica, dynamic_alias):
    """An alias on the real streaming replica (the "replica" alias of the
    test settings is a test mirror of the primary)."""
    return dynamic_alias("streaming", REPLICA_PORT)


def on_replica(alias, **health_settings):
    return override_settings(
        ROOT_URLCONF="tests.serve_urls",
        MIDDLEWARE=MIDDLEWARE,
        SCALEKIT={
            "REPLICAS": [alias],
            "HEALTH": {"TOKEN": TOKEN, "CACHES": ["default"], **health_settings},
        },
    )


@pytest.mark.django_db(databases=DATABASES)
def test_all_pass(client, streaming):
    with on_replica(streaming):
        response, body = get_ready(client)
    assert response.status_code == 200
    assert response["Content-Type"] == "application/health+json"
    assert response["Cache-Control"] == "no-store"
    assert body["status"] == "pass"
    assert statuses(body) == {
        "db:default": "pass",
        "db:streaming": "pass",
        "cache:default": "pass",
    }
    assert body["checks"]["db:default"][0]["componentId"] == "127.0.0.1:5432"
    assert body["checks"]["db:default"][0]["affectsServiceHealth"] is True
    assert body["checks"]["db:streaming"][0]["affectsServiceHealth"] is False
    lag = body["checks"]["db:streaming"][1]
    assert lag["measurement"] == "replicationLag" and lag["observedUnit"] == "s"
    assert 0 <= lag["observedValue"] < 30


@pytest.mark.django_db(databases=DATABASES)
def test_without_details_only_the_status(client, replica):
    with site():
        response, body = get_ready(client, details=False)
        assert body == {"status": "pass"}
        _, body = get_ready(client, details=False, HTTP_AUTHORIZATION="Bearer wrong")
        assert body == {"status": "pass"}
    with site(TOKEN=None, DETAILS_NETWORKS=["127.0.0.0/8"]):
        _, body = get_ready(client, details=False)
        assert "checks" in body
    with site(TOKEN=None, DETAILS_NETWORKS=["10.0.0.0/8"]):
        _, body = get_ready(client, details=False)
        assert "checks" not in body


@pytest.mark.django_db(databases=DATABASES)
def test_head_and_get(client, replica):
    with site():
        head = client.head("/health/")
        assert head.status_code == 200
        assert head.content == b""
        assert client.head("/health/live/").status_code == 200
        post = client.post("/health/")
        assert post.status_code == 405
        assert post["Allow"] == "GET, HEAD"


@pytest.mark.django_db(databases=DATABASES)
def test_critical_database_down_is_503(client, dynamic_alias):
    # A closed port, like the "replica_closed" alias of tests/settings.py.
    closed = dynamic_alias("closed", 1)
    with site(DATABASES=["default", closed], NON_CRITICAL=[]):
        response, body = get_ready(client)
        assert response.status_code == 503
        assert body["status"] == "fail"
        assert statuses(body)["db:closed"] == "fail"
        assert statuses(body)["db:default"] == "pass"
        assert "OperationalError" in body["checks"]["db:closed"][0]["output"]
        assert body["checks"]["db:closed"][0]["componentId"] == "127.0.0.1:1"
        # Without the token: no error messages, no hostnames.
        response, body = get_ready(client, details=False)
        assert (response.status_code, body) == (503, {"status": "fail"})


@pytest.mark.django_db(databases=DATABASES)
def test_replica_down_warns_by_default(client, dynamic_alias):
    # Replicas are non-critical by default: the router falls back to the
    # primary, so taking every app server out of rotation would be wrong.
    closed = dynamic_alias("closed", 1)
    with override_settings(
        ROOT_URLCONF="tests.serve_urls",
        MIDDLEWARE=MIDDLEWARE,
        SCALEKIT={"REPLICAS": [closed], "HEALTH": {"CACHES": ["default"]}},
    ):
        assert conf.get().health.non_critical == {"db:closed", "cache:default"}
        response, body = get_ready(client, details=False)
    assert response.status_code == 200
    assert body == {"status": "warn"}


@pytest.mark.outage
@pytest.mark.replica
@pytest.mark.django_db(databases=DATABASES)
def test_replica_cluster_stopped_warns_or_fails_when_critical(
    client, streaming, replica_stopped
):
    # The real streaming replica's cluster is stopped (tests/conftest.py).
    # Default NON_CRITICAL: a replica only warns, the instance stays in rotation.
    with on_replica(streaming, TIMEOUT=2):
        assert "db:streaming" in conf.get().health.non_critical
        started = time.monotonic()
        response, body = get_ready(client)
        elapsed = time.monotonic() - started
    assert response.status_code == 200
    assert body["status"] == "warn"
    assert statuses(body) == {
        "db:default": "pass",
        "db:streaming": "fail",
        "cache:default": "pass",
    }
    assert body["checks"]["db:streaming"][0]["affectsServiceHealth"] is False
    assert elapsed < 2 + 1
    # The replica made critical: 503 within the budget.
    with on_replica(streaming, TIMEOUT=2, NON_CRITICAL=["cache:default"]):
        started = time.monotonic()
        response, body = get_ready(client)
        elapsed = time.monotonic() - started
    assert response.status_code == 503
    assert body["status"] == "fail"
    assert statuses(body)["db:streaming"] == "fail"
    assert body["checks"]["db:streaming"][0]["affectsServiceHealth"] is True
    assert elapsed < 2 + 1


@pytest.mark.django_db(databases=DATABASES, transaction=True)
def test_replica_lag_above_threshold_warns(client, streaming, replica_delay):
    from tests.testapp.models import Item

    replica_delay(3000)
    Item.objects.create(name="lagging")  # committed: the replica holds it back
    time.sleep(1)
    with on_replica(streaming, REPLICA_LAG_WARN_SECONDS=0.5):
        response, body = get_ready(client)
    assert response.status_code == 200
    assert body["status"] == "warn"
    assert statuses(body)["db:streaming"] == "warn"
    assert "replication lag" in body["checks"]["db:streaming"][0]["output"]
    assert body["checks"]["db:streaming"][1]["observedValue"] > 0.5


@pytest.mark.django_db(databases=DATABASES)
def test_cache_down_warns_by_default(client):
    # "cache_down" in tests/settings.py: Redis on a closed port. The cache
    # keeps serving without Redis: one Redis down must not take every
    # instance out of the load balancer.
    with site(DATABASES=["default"], CACHES=["default", "cache_down"]):
        assert conf.get().health.non_critical == {"cache:default", "cache:cache_down"}
        response, body = get_ready(client)
    assert response.status_code == 200
    assert body["status"] == "warn"
    assert statuses(body) == {
        "db:default": "pass",
        "cache:default": "pass",
        "cache:cache_down": "fail",
    }
    assert body["checks"]["cache:cache_down"][0]["affectsServiceHealth"] is False


@pytest.mark.django_db(databases=DATABASES)
def test_cache_down_fails_when_critical(client):
    with site(DATABASES=["default"], CACHES=["default", "cache_down"], NON_CRITICAL=[]):
        response, body = get_ready(client)
    assert response.status_code == 503
    assert statuses(body)["cache:cache_down"] == "fail"


def failing_check():
    raise RuntimeError("queue unreachable")


def warning_check():
    raise health.HealthWarning("queue slow")


@pytest.mark.django_db(databases=DATABASES)
def test_custom_checks(client):
    with site(
        DATABASES=["default"],
        CHECKS={"queue": "tests.test_health.warning_check"},
    ):
        response, body = get_ready(client)
        assert (response.status_code, body["status"]) == (200, "warn")
    with site(DATABASES=["default"], CHECKS=["tests.test_health.failing_check"]):
        response, body = get_ready(client)
        assert response.status_code == 503
        assert (
            body["checks"]["failing_check"][0]["output"]
            == "RuntimeError: queue unreachable"
        )
    with site(
        DATABASES=["default"],
        CHECKS=["tests.test_health.failing_check"],
        NON_CRITICAL=["failing_check"],
    ):
        response, body = get_ready(client)
        assert (response.status_code, body["status"]) == (200, "warn")


_slow_calls: list[float] = []


def slow_counted_check():
    _slow_calls.append(time.monotonic())
    time.sleep(0.3)


def probe_flood(n):
    """``n`` concurrent probes, each with its own client; their statuses."""
    statuses_seen = []
    barrier = threading.Barrier(n)

    def probe():
        barrier.wait()
        statuses_seen.append(Client().get("/health/").status_code)

    threads = [threading.Thread(target=probe) for _ in range(n)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return statuses_seen


@pytest.mark.slow
@pytest.mark.django_db(databases=DATABASES)
def test_a_flood_of_probes_runs_the_checks_once_per_cache_period():
    _slow_calls.clear()
    with site(
        DATABASES=[],
        CACHES=[],
        CHECKS=["tests.test_health.slow_counted_check"],
        CACHE_SECONDS=1.5,
    ):
        # Concurrent probes share the one check in flight...
        assert probe_flood(20) == [200] * 20
        assert len(_slow_calls) == 1
        # ...and later ones its result, until it is CACHE_SECONDS old.
        assert probe_flood(5) == [200] * 5
        assert len(_slow_calls) == 1
        time.sleep(1.5)
        assert Client().get("/health/").status_code == 200
        assert len(_slow_calls) == 2
    _slow_calls.clear()
    with site(
        DATABASES=[],
        CACHES=[],
        CHECKS=["tests.test_health.slow_counted_check"],
        CACHE_SECONDS=0,  # the default
    ):
        for _ in range(3):
            assert Client().get("/health/").status_code == 200
        assert len(_slow_calls) == 3
        # Fresh for every probe, but concurrent ones still share a run.
        assert probe_flood(20) == [200] * 20
        assert len(_slow_calls) <= 3 + 2


def test_cached_result_is_forgotten_when_settings_change(client):
    with site(DATABASES=[], CACHES=[], CHECKS=["tests.test_health.failing_check"]):
        assert client.get("/health/").status_code == 503
    with site(DATABASES=[], CACHES=[], CHECKS=["tests.test_health.warning_check"]):
        assert client.get("/health/").status_code == 200


def test_prometheus_gauges(client):
    if not metrics.ENABLED:
        pytest.skip("prometheus_client is not installed")
    import prometheus_client

    with site(
        DATABASES=[], CACHES=[], CHECKS={"queue": "tests.test_health.failing_check"}
    ):
        client.get("/health/")
    value = prometheus_client.REGISTRY.get_sample_value(
        "scalekit_health_check_status", {"check": "queue"}
    )
    assert value == 0.0
    with site(
        DATABASES=[], CACHES=[], CHECKS={"queue": "tests.test_health.warning_check"}
    ):
        client.get("/health/")
    assert (
        prometheus_client.REGISTRY.get_sample_value(
            "scalekit_health_check_status", {"check": "queue"}
        )
        == 0.5
    )


# --- A database that accepts connections but never answers -------------------


@pytest.fixture
def silent_server():
    """A TCP server on loopback that accepts connections and never replies."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    accepted = []
    stop = threading.Event()

    def accept():
        server.settimeout(0.1)
        while not stop.is_set():
            try:
                accepted.append(server.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield server.getsockname()[1]
    stop.set()
    thread.join()
    for conn in accepted:
        conn.close()  # lets the hung health-check thread fail and end
    server.close()


@pytest.fixture
def hanging_alias(silent_server, dynamic_alias):
    return dynamic_alias("hanging", silent_server, connect_timeout=30)


@pytest.mark.django_db(databases=DATABASES)
def test_hanging_database_fails_within_the_budget(client, hanging_alias):
    with site(DATABASES=["default", hanging_alias], NON_CRITICAL=[], TIMEOUT=1):
        started = time.monotonic()
        response, body = get_ready(client)
        elapsed = time.monotonic() - started
        # A second probe while the first check still hangs: same budget, and
        # no second thread for the same check.
        started = time.monotonic()
        second, _ = get_ready(client)
        second_elapsed = time.monotonic() - started
    assert response.status_code == 503
    assert statuses(body) == {
        "db:default": "pass",
        "db:hanging": "fail",
        "cache:default": "pass",
    }
    assert (
        body["checks"]["db:hanging"][0]["output"] == "no answer within the 1 s budget"
    )
    # 1 s budget; the margin is for the HTTP call and thread start-up on a
    # loaded machine.
    assert 0.9 <= elapsed < 2.0
    assert second.status_code == 503
    assert second_elapsed < 2.0
    # Never two threads for the same check (the first may have ended: its
    # connect_timeout follows the budget).
    hung = [t for t in threading.enumerate() if t.name == "scalekit-health db:hanging"]
    assert len(hung) <= 1


@pytest.mark.slow
@pytest.mark.django_db(databases=DATABASES)
def test_hung_database_check_ends_and_readiness_recovers(client, hanging_alias):
    # The alias's own connect_timeout is 30 s: before, the first check's
    # thread hung that long and every probe meanwhile reused it (503).
    with site(DATABASES=["default", hanging_alias], NON_CRITICAL=[], TIMEOUT=1):
        response, _ = get_ready(client)
        assert response.status_code == 503
        # The database recovers: the alias points at the real primary again.
        connections[hanging_alias].settings_dict["PORT"] = 5432
        started = time.monotonic()
        while get_ready(client)[0].status_code != 200:
            assert time.monotonic() - started < 8, "readiness did not recover"
            time.sleep(0.2)
        recovered = time.monotonic() - started
    # libpq waits at least 2 s for connect_timeout=1: the hung check ends then.
    assert recovered < 8
    hung = [t for t in threading.enumerate() if t.name == "scalekit-health db:hanging"]
    assert hung == []


_released = threading.Event()
_blocking_calls = []


def blocking_check():
    """Hangs on its first call only, like a connection that never answers."""
    _blocking_calls.append(time.monotonic())
    if len(_blocking_calls) == 1:
        _released.wait(30)


@pytest.mark.slow
def test_check_still_running_after_stale_factor_budgets_is_restarted(client):
    _released.clear()
    _blocking_calls.clear()
    try:
        with site(
            DATABASES=[],
            CACHES=[],
            CHECKS=["tests.test_health.blocking_check"],
            TIMEOUT=0.2,
        ):
            started = time.monotonic()
            assert client.get("/health/").status_code == 503
            while client.get("/health/").status_code != 200:
                assert time.monotonic() - started < 5, "a hung check is reused forever"
                time.sleep(0.05)
            recovered = time.monotonic() - started
    finally:
        _released.set()
    # Reused (no new thread) for STALE_FACTOR budgets, then started afresh.
    assert health.STALE_FACTOR * 0.2 <= recovered < 5
    assert len(_blocking_calls) == 2


# --- Probes addressed by IP ----------------------------------------------------


@pytest.mark.django_db(databases=DATABASES)
def test_host_not_in_allowed_hosts_is_answered(client, replica):
    # Only a header: nothing is sent to 10.0.0.5.
    with site():
        response = client.get("/health/", HTTP_HOST="10.0.0.5")
        assert response.status_code == 200
        assert client.get("/health/live/", HTTP_HOST="10.0.0.5").status_code == 200
        # Every other path still validates the host.
        assert client.get("/page/", HTTP_HOST="10.0.0.5").status_code == 400
        # Routed health URLs (django_scalekit.urls) validate it too.
        assert (
            client.get("/routed/health/live/", HTTP_HOST="10.0.0.5").status_code == 400
        )
        assert client.get("/routed/health/live/").status_code == 200


@pytest.mark.django_db(databases=DATABASES)
def test_ip_probe_over_plain_http_with_ssl_redirect(client, replica):
    # Issue 9: a probe must never get 301 (the load balancer would follow or
    # fail) nor 400, while every other path keeps both protections.
    def strict():
        return override_settings(
            SECURE_SSL_REDIRECT=True,
            ALLOWED_HOSTS=["shop.example.com"],
            MIDDLEWARE=[
                MIDDLEWARE[0],
                "django.middleware.security.SecurityMiddleware",
                *MIDDLEWARE[1:],
            ],
        )

    with site(), strict():
        for path in ("/health/", "/health/live/"):
            for method in (client.get, client.head):
                response = method(path, HTTP_HOST="10.0.0.5")
                assert response.status_code in (200, 503), (path, response)
        assert client.get("/health/", HTTP_HOST="10.0.0.5").status_code == 200
        # Unready: 503, still not a redirect.
        with site(CHECKS=["tests.test_health.failing_check"]), strict():
            assert client.get("/health/", HTTP_HOST="10.0.0.5").status_code == 503
        for path in ("/page/", "/health", "/health/x", "/routed/health/"):
            assert client.get(path, HTTP_HOST="10.0.0.5").status_code == 400, path
        response = client.get("/page/", HTTP_HOST="shop.example.com")
        assert response.status_code == 301
        assert response["Location"] == "https://shop.example.com/page/"
        secure = client.get("/page/", HTTP_HOST="shop.example.com", secure=True)
        assert secure.status_code == 200


# --- Draining (through gunicorn and HAProxy: tests/test_proxies.py) ----------


@pytest.fixture
def draining(monkeypatch):
    monkeypatch.setattr(health, "_draining_since", None)
    health.start_draining()


def test_draining_readiness_fails_at_once_and_the_rest_serves(client, draining):
    # No django_db mark: while draining, readiness runs no check at all.
    with site():
        response = client.get("/health/", HTTP_HOST="10.0.0.5")
        assert response.status_code == 503
        assert response["Cache-Control"] == "no-store"
        assert json.loads(response.content) == {"status": "fail", "output": "draining"}
        assert client.get("/health/live/").status_code == 200
        assert client.get("/page/").status_code == 200
    assert health.is_draining()


def test_drain_seconds_default():
    assert conf.get().health.drain_seconds == 5.0


# --- Settings and checks --------------------------------------------------------


def ids(health_settings):
    return [
        p.id
        for p in conf.build(
            {"REPLICAS": ["replica"], "HEALTH": health_settings}
        ).problems
    ]


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ({}, []),
        ({"TYPO": 1}, ["scalekit.W401"]),
        ({"DATABASES": ["ghost"]}, ["scalekit.E401"]),
        ({"DATABASES": "default"}, ["scalekit.E401"]),
        ({"CACHES": ["ghost"]}, ["scalekit.E402"]),
        ({"CHECKS": ["no.such.check"]}, ["scalekit.E403"]),
        ({"CHECKS": ["django_scalekit.health.CONTENT_TYPE"]}, ["scalekit.E403"]),
        ({"CHECKS": "tests.test_health.failing_check"}, ["scalekit.E403"]),
        ({"TIMEOUT": 0}, ["scalekit.E404"]),
        ({"TIMEOUT": "2"}, ["scalekit.E404"]),
        ({"TOKEN": ""}, ["scalekit.E405"]),
        ({"TOKEN": "short"}, ["scalekit.W402"]),
        ({"DETAILS_NETWORKS": ["10.0.0.0/33"]}, ["scalekit.E406"]),
        ({"NON_CRITICAL": ["db:ghost"]}, ["scalekit.E407"]),
        ({"LIVE_PATH": "health"}, ["scalekit.E408"]),
        ({"LIVE_PATH": "/h/", "READY_PATH": "/h/"}, ["scalekit.E408"]),
        ({"REPLICA_LAG_WARN_SECONDS": -1}, ["scalekit.E409"]),
        ({"DRAIN_SECONDS": 0}, []),
        ({"DRAIN_SECONDS": -1}, ["scalekit.E410"]),
        ({"DRAIN_SECONDS": "5"}, ["scalekit.E410"]),
        ({"CACHE_SECONDS": 0}, []),
        ({"CACHE_SECONDS": -1}, ["scalekit.E411"]),
        ({"CACHE_SECONDS": "1"}, ["scalekit.E411"]),
    ],
)
def test_health_settings_validation(value, expected):
    assert ids(value) == expected


def test_defaults():
    from django.conf import settings

    cfg = conf.build({"REPLICAS": ["replica"]}).health
    assert cfg.databases == ("default", "replica")
    assert cfg.caches == tuple(settings.CACHES)
    assert cfg.non_critical == {"db:replica", *(f"cache:{a}" for a in settings.CACHES)}
    assert cfg.timeout == 2.0


def test_defaults_include_groups_and_shards():
    from django.conf import settings

    # tests/settings.py: a GROUPS group and a shard group with shard replicas.
    cfg = conf.build(settings.SCALEKIT).health
    assert cfg.databases == (
        "default",
        "analytics",
        "shard0",
        "shard1",
        "shard2",
        "replica",
        "analytics_replica",
        "shard0_replica",
        "shard1_replica",
    )
    replicas = {"replica", "analytics_replica", "shard0_replica", "shard1_replica"}
    assert cfg.replicas == replicas
    assert cfg.non_critical == {
        *(f"db:{a}" for a in replicas),
        *(f"cache:{a}" for a in settings.CACHES),
    }


def test_middleware_check_registered():
    from django.core.management import call_command
    from django.core.management.base import SystemCheckError

    with (
        override_settings(MIDDLEWARE=[*reversed(MIDDLEWARE)]),
        pytest.raises(SystemCheckError, match="scalekit.W403"),
    ):
        call_command("check", "--fail-level", "WARNING", "--tag", "scalekit")
    assert checks.check_cdn_and_health_middleware() == []


@pytest.mark.django_db(databases=DATABASES)
def test_async_stack(replica):
    from asgiref.sync import async_to_sync
    from django.test import AsyncClient

    client = AsyncClient()
    with site(DATABASES=["default"]):
        live = async_to_sync(client.get)("/health/live/", headers={"Host": "10.0.0.5"})
        ready = async_to_sync(client.get)(
            "/health/", headers={"Host": "10.0.0.5", "Authorization": f"Bearer {TOKEN}"}
        )
    assert live.status_code == 200
    assert ready.status_code == 200
    assert statuses(json.loads(ready.content)) == {
        "db:default": "pass",
        "cache:default": "pass",
    }

from __future__ import annotations

import pytest
from django.conf import settings
from django.core.management import call_command
from django.core.management.base import SystemCheckError
from django.test import override_settings

from django_scalekit import checks

# The checks only read DATABASES; no connection is made with the overrides.
pytestmark = pytest.mark.filterwarnings(
    "ignore:Overriding setting DATABASES:UserWarning"
)

ROUTER = "django_scalekit.routers.PrimaryReplicaRouter"
PINNING = "django_scalekit.middleware.PinningMiddleware"


def ids(messages):
    return [m.id for m in messages]


def test_check_settings_clean():
    assert checks.check_settings() == []


@override_settings(SCALEKIT={"REPLICAS": {"replica": 0, "ghost": 1}, "TYPO": 1})
def test_check_settings_reports_every_problem():
    messages = checks.check_settings()
    assert ids(messages) == ["scalekit.W001", "scalekit.E006", "scalekit.E005"]
    assert "'ghost'" in messages[2].msg and "not in DATABASES" in messages[2].msg


def test_replica_router_clean():
    assert checks.check_replica_router() == []


@override_settings(SCALEKIT={"REPLICAS": []})
def test_router_without_replicas():
    assert ids(checks.check_replica_router()) == ["scalekit.W002"]


@pytest.mark.parametrize(
    "replicas", [{"replica": 0}, ["replcia"], "replica"], ids=["E006", "E005", "E004"]
)
def test_invalid_replicas_are_not_called_empty(replicas):
    # The settings check says what is wrong with them; W002 would contradict it.
    with override_settings(SCALEKIT={"REPLICAS": replicas}):
        assert checks.check_settings()
        assert "scalekit.W002" not in ids(checks.check_replica_router())


def test_groups_without_any_replica():
    groups = {"analytics": {"PRIMARY": "analytics", "APPS": ["auth"]}}
    with override_settings(SCALEKIT={"REPLICAS": [], "GROUPS": groups}):
        assert checks.check_settings() == []
        assert ids(checks.check_replica_router()) == ["scalekit.W002"]


@override_settings(DATABASE_ROUTERS=[])
def test_replicas_without_router():
    assert ids(checks.check_replica_router()) == ["scalekit.W003"]


@override_settings(MIDDLEWARE=[])
def test_replicas_without_pinning_middleware():
    assert ids(checks.check_replica_router()) == ["scalekit.W004"]


@override_settings(
    MIDDLEWARE=[], SCALEKIT={"REPLICAS": ["replica"], "PINNING_SECONDS": 0}
)
def test_pinning_disabled_needs_no_middleware():
    assert checks.check_replica_router() == []


@override_settings(
    SCALEKIT={"REPLICAS": ["replica_closed"], "REPLICA_MAX_LAG_SECONDS": 5}
)
def test_lag_on_non_postgresql_replica():
    from django.conf import settings

    dbs = {
        **settings.DATABASES,
        "replica_closed": {"ENGINE": "django.db.backends.sqlite3", "NAME": ":memory:"},
    }
    with override_settings(DATABASES=dbs):
        assert ids(checks.check_replica_router()) == ["scalekit.W005"]


def test_postgresql_replica_without_connect_timeout():
    from django.conf import settings

    replica = {k: v for k, v in settings.DATABASES["replica"].items() if k != "OPTIONS"}
    with override_settings(DATABASES={**settings.DATABASES, "replica": replica}):
        messages = checks.check_replica_router()
    assert ids(messages) == ["scalekit.W006"]
    assert "connect_timeout" in messages[0].hint


def test_scaling_readiness_clean_settings():
    from django.conf import settings

    dbs = {
        alias: {**db, "CONN_MAX_AGE": 60} for alias, db in settings.DATABASES.items()
    }
    with override_settings(DATABASES=dbs):
        assert checks.check_scaling_readiness() == []


def test_scaling_readiness_warnings():
    from django.conf import settings

    dbs = {alias: dict(db) for alias, db in settings.DATABASES.items()}
    dbs["replica"]["TEST"] = {}
    for db in dbs.values():
        db["CONN_MAX_AGE"] = 60
    dbs["replica_b"]["CONN_MAX_AGE"] = 0
    with override_settings(
        DATABASES=dbs,
        DEBUG=True,
        SESSION_ENGINE="django.contrib.sessions.backends.file",
        CACHES={
            "default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"}
        },
    ):
        messages = checks.check_scaling_readiness()
    assert ids(messages) == [
        "scalekit.W020",
        "scalekit.W021",
        "scalekit.W022",
        "scalekit.W023",
        "scalekit.W024",
    ]
    assert "'replica_b'" in messages[2].msg


@pytest.mark.parametrize("mirror", ["replica", "nope"])
def test_replica_mirroring_something_else_than_its_primary(mirror):
    dbs = {
        alias: {**db, "CONN_MAX_AGE": 60} for alias, db in settings.DATABASES.items()
    }
    dbs["replica"]["TEST"] = {"MIRROR": mirror}
    with override_settings(DATABASES=dbs):
        messages = checks.check_scaling_readiness()
    assert ids(messages) == ["scalekit.W025"]
    assert f"{mirror!r}}}, but its primary 'default' is tested as" in messages[0].msg
    assert (
        messages[0].hint
        == "Set DATABASES['replica'][\"TEST\"] = {\"MIRROR\": 'default'}."
    )


def test_a_replica_may_mirror_what_its_primary_mirrors():
    # Every database tested as "default": tests read their own writes.
    dbs = {
        alias: {**db, "CONN_MAX_AGE": 60} for alias, db in settings.DATABASES.items()
    }
    dbs["analytics"] = {**dbs["analytics"], "TEST": {"MIRROR": "default"}}
    dbs["analytics_replica"] = {
        **dbs["analytics_replica"],
        "TEST": {"MIRROR": "default"},
    }
    with override_settings(DATABASES=dbs):
        assert checks.check_scaling_readiness() == []
        dbs["analytics_replica"]["TEST"] = {"MIRROR": "analytics"}  # a chain
        assert checks.check_scaling_readiness() == []
        dbs["analytics_replica"]["TEST"] = {"MIRROR": "analytics_replica"}
        (message,) = checks.check_scaling_readiness()
    assert message.id == "scalekit.W025"
    assert message.hint == (
        "Set DATABASES['analytics_replica'][\"TEST\"] = {\"MIRROR\": 'default'}."
    )


def test_conn_max_age_on_postgis():
    dbs = {
        alias: {**db, "CONN_MAX_AGE": 60} for alias, db in settings.DATABASES.items()
    }
    dbs["analytics"] = {
        **dbs["analytics"],
        "ENGINE": "django.contrib.gis.db.backends.postgis",
        "CONN_MAX_AGE": 0,
    }
    with override_settings(DATABASES=dbs):
        messages = checks.check_scaling_readiness()
    assert ids(messages) == ["scalekit.W022"]
    assert "'analytics'" in messages[0].msg


def test_dummy_default_cache_is_said_to_store_nothing():
    backend = "django.core.cache.backends.dummy.DummyCache"
    with override_settings(CACHES={"default": {"BACKEND": backend}}):
        (message,) = [
            m for m in checks.check_scaling_readiness() if m.id == "scalekit.W021"
        ]
    assert "stores nothing" in message.msg


@pytest.mark.parametrize(
    "backend",
    [
        "django.core.cache.backends.dummy.DummyCache",
        "django.core.cache.backends.locmem.LocMemCache",
    ],
)
def test_process_local_default_cache(backend):
    with override_settings(CACHES={"default": {"BACKEND": backend}}):
        assert "scalekit.W021" in ids(checks.check_scaling_readiness())


def test_process_local_default_cache_behind_django_prometheus():
    pytest.importorskip("django_prometheus")
    backend = "django_prometheus.cache.backends.locmem.LocMemCache"
    with override_settings(CACHES={"default": {"BACKEND": backend}}):
        assert "scalekit.W021" in ids(checks.check_scaling_readiness())


def test_checks_are_registered():
    with (
        override_settings(SCALEKIT={"REPLICAS": ["ghost"]}),
        pytest.raises(SystemCheckError, match=r"scalekit\.E005"),
    ):
        call_command("check", tags=["scalekit"])


def test_deploy_checks_only_with_deploy(capsys):
    with override_settings(DEBUG=True):
        call_command("check", tags=["scalekit"])
        assert "scalekit.W023" not in capsys.readouterr().err
        call_command("check", "--deploy", tags=["scalekit"])
        assert "scalekit.W023" in capsys.readouterr().err


def test_lsn_mode_on_a_non_postgresql_replica():
    from django.conf import settings

    dbs = {
        **settings.DATABASES,
        "replica_closed": {"ENGINE": "django.db.backends.sqlite3", "NAME": ":memory:"},
    }
    scalekit = {"REPLICAS": ["replica", "replica_closed"], "READ_YOUR_WRITES": "lsn"}
    with override_settings(DATABASES=dbs, SCALEKIT=scalekit):
        messages = checks.check_replica_router()
    assert ids(messages) == ["scalekit.W007"]
    assert "'replica_closed'" in messages[0].msg


def test_all_checks_report_a_bad_setting_instead_of_crashing():
    # Model checks call the routers' allow_migrate(): they must not raise on
    # the misconfiguration the scalekit checks are about to report.
    with (
        override_settings(SCALEKIT={"REPLICAS": {"replica": 0}}),
        pytest.raises(SystemCheckError, match=r"scalekit\.E006"),
    ):
        call_command("check")


def test_replicas_only_in_groups_count_as_replicas():
    scalekit = {
        "GROUPS": {"a": {"PRIMARY": "analytics", "REPLICAS": ["analytics_replica"]}}
    }
    with override_settings(SCALEKIT=scalekit):
        assert checks.check_replica_router() == []
    with override_settings(SCALEKIT=scalekit, MIDDLEWARE=[]):
        assert ids(checks.check_replica_router()) == ["scalekit.W004"]


def test_pinning_middleware_after_session_middleware():
    from django.conf import settings

    session = "django.contrib.sessions.middleware.SessionMiddleware"
    with override_settings(MIDDLEWARE=[session, PINNING]):
        assert ids(checks.check_replica_router()) == ["scalekit.W008"]
    assert settings.MIDDLEWARE.index(PINNING) < settings.MIDDLEWARE.index(session)


@pytest.mark.parametrize("name", ["a,b", "a=b", "shard:x"])
def test_group_names_that_cannot_travel_in_the_cookie(name):
    scalekit = {"REPLICAS": ["replica"], "GROUPS": {name: {"PRIMARY": "analytics"}}}
    with override_settings(SCALEKIT=scalekit):
        assert ids(checks.check_replica_router()) == ["scalekit.W009"]


PROMETHEUS_REDIS = "django_prometheus.cache.backends.redis.RedisCache"


def test_cache_checks_see_django_prometheus_backends_as_what_they_subclass():
    pytest.importorskip("django_prometheus")
    redis_url = settings.CACHES["default"]["LOCATION"]
    caches = {
        **settings.CACHES,
        # Socket timeouts set: nothing to say.
        "prom": {
            "BACKEND": PROMETHEUS_REDIS,
            "LOCATION": redis_url,
            "OPTIONS": {"SOCKET_CONNECT_TIMEOUT": 0.5, "SOCKET_TIMEOUT": 0.5},
        },
        # The Redis client checks still run: no timeouts (W204), a Sentinel
        # client without its connection factory (E210).
        "prom_bare": {"BACKEND": PROMETHEUS_REDIS, "LOCATION": redis_url},
        "prom_sentinel": {
            "BACKEND": PROMETHEUS_REDIS,
            "LOCATION": "redis://scalekit/0",
            "OPTIONS": {
                "CLIENT_CLASS": "django_redis.client.SentinelClient",
                "SOCKET_CONNECT_TIMEOUT": 0.5,
                "SOCKET_TIMEOUT": 0.5,
            },
        },
        "prom_local": {
            "BACKEND": "django_prometheus.cache.backends.locmem.LocMemCache"
        },
        "missing": {"BACKEND": "nowhere.cache.Backend"},
    }
    cases = {
        "prom": [],
        "prom_bare": ["scalekit.W204"],
        "prom_sentinel": ["scalekit.E210"],
        "prom_local": ["scalekit.W202"],
        # Cannot be imported: not django-redis, and no crash.
        "missing": ["scalekit.W203"],
    }
    with override_settings(CACHES=caches):
        for alias, expected in cases.items():
            with override_settings(SCALEKIT={"CACHE": {"L2": alias}}):
                assert ids(checks.check_cache()) == expected, alias

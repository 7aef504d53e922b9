from __future__ import annotations

import os
from typing import Any

SECRET_KEY = "django-scalekit-tests"
DEBUG = False
ALLOWED_HOSTS = ["testserver", "localhost", "127.0.0.1"]
USE_TZ = True

_PG: dict[str, Any] = {
    "ENGINE": "django.db.backends.postgresql",
    "NAME": os.environ.get("SCALEKIT_TEST_DB", "scalekit"),
    "USER": "postgres",
    "HOST": "127.0.0.1",
    "CONN_MAX_AGE": 0,
}
DATABASES = {
    "default": {**_PG, "PORT": 5432},
    # The real hot-standby replica started by `scripts/services up`.
    "replica": {
        **_PG,
        "PORT": int(os.environ.get("SCALEKIT_REPLICA_PORT", "5433")),
        "OPTIONS": {"connect_timeout": 2},
        "TEST": {"MIRROR": "default"},
    },
    # A second alias for the same replica, to test weights and stickiness.
    "replica_b": {
        **_PG,
        "PORT": int(os.environ.get("SCALEKIT_REPLICA_PORT", "5433")),
        "OPTIONS": {"connect_timeout": 2},
        "TEST": {"MIRROR": "default"},
    },
    # A second primary/replica group (SCALEKIT["GROUPS"]): another database
    # on the same servers, so the streaming replica carries it too.
    "analytics": {**_PG, "NAME": _PG["NAME"] + "_analytics", "PORT": 5432},
    "analytics_replica": {
        **_PG,
        "NAME": _PG["NAME"] + "_analytics",
        "PORT": int(os.environ.get("SCALEKIT_REPLICA_PORT", "5433")),
        "OPTIONS": {"connect_timeout": 2},
        "TEST": {"MIRROR": "analytics"},
    },
    # Shards of the "orders" shard group (SCALEKIT["SHARDING"]): databases on
    # the same servers; shard2 holds the tables but no buckets until a reshard.
    **{
        f"shard{n}": {**_PG, "NAME": f"{_PG['NAME']}_shard{n}", "PORT": 5432}
        for n in range(3)
    },
    **{
        f"shard{n}_replica": {
            **_PG,
            "NAME": f"{_PG['NAME']}_shard{n}",
            "PORT": int(os.environ.get("SCALEKIT_REPLICA_PORT", "5433")),
            "OPTIONS": {"connect_timeout": 2},
            "TEST": {"MIRROR": f"shard{n}"},
        }
        for n in range(2)
    },
    # A replica that drops packets: tests turn on an iptables DROP rule for
    # this port (scripts/services blackhole-on 5439), so connects time out.
    "replica_blackhole": {
        **_PG,
        "PORT": 5439,
        # libpq waits at least 2 s whatever connect_timeout says below 2.
        "OPTIONS": {"connect_timeout": 2},
        "TEST": {"MIRROR": "default"},
    },
    # Nothing listens on port 1: connections are refused at once.
    "replica_closed": {
        **_PG,
        "PORT": 1,
        "OPTIONS": {"connect_timeout": 2},
        "TEST": {"MIRROR": "default"},
    },
}
DATABASE_ROUTERS = [
    "django_scalekit.routers.ShardRouter",
    "django_scalekit.routers.PrimaryReplicaRouter",
]

SCALEKIT = {
    "REPLICAS": ["replica"],
    "PINNING_SECONDS": 5,
    "REPLICA_RETRY_SECONDS": 30,
    "GROUPS": {
        "analytics": {
            "PRIMARY": "analytics",
            "REPLICAS": ["analytics_replica"],
            "MODELS": ["testapp.Event"],
        },
    },
    "SHARDING": {
        "GROUPS": {
            "orders": {
                "SHARDS": ["shard0", "shard1", "shard2"],
                "MAP": {"0-511": "shard0", "512-1023": "shard1"},
                "REPLICAS": {
                    "shard0": ["shard0_replica"],
                    "shard1": ["shard1_replica"],
                },
            },
        },
    },
}

INSTALLED_APPS = [
    "django.contrib.contenttypes",
    "django.contrib.auth",
    "django.contrib.sessions",
    "django_scalekit",
    "tests.testapp",
    "tests.shardapp",
]
MIDDLEWARE = [
    "django_scalekit.middleware.PinningMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
]
ROOT_URLCONF = "tests.urls"
CACHES = {
    "default": {
        "BACKEND": "django_redis.cache.RedisCache",
        "LOCATION": os.environ.get("SCALEKIT_TEST_REDIS", "redis://127.0.0.1:6379/15"),
    },
    # The two-level cache's L2 in tests: the same Redis, failing fast.
    "cache_l2": {
        "BACKEND": "django_redis.cache.RedisCache",
        "LOCATION": os.environ.get("SCALEKIT_TEST_REDIS", "redis://127.0.0.1:6379/15"),
        "OPTIONS": {"SOCKET_CONNECT_TIMEOUT": 0.5, "SOCKET_TIMEOUT": 0.5},
    },
    # Redis Sentinel (`scripts/services sentinel-up`): service "scalekit", a
    # master and a replica on 6390/6391 that tests fail over.
    "cache_sentinel": {
        "BACKEND": "django_redis.cache.RedisCache",
        "LOCATION": "redis://scalekit/0",
        "OPTIONS": {
            "CLIENT_CLASS": "django_redis.client.SentinelClient",
            "CONNECTION_FACTORY": "django_redis.pool.SentinelConnectionFactory",
            "SENTINELS": [("127.0.0.1", 26390)],
            "SOCKET_CONNECT_TIMEOUT": 0.5,
            "SOCKET_TIMEOUT": 0.5,
        },
    },
    # A three-node Redis Cluster (`scripts/services cluster-up`); two startup
    # nodes are enough to find the third.
    "cache_cluster": {
        "BACKEND": "django_redis.cache.RedisCache",
        "LOCATION": ["redis://127.0.0.1:7001", "redis://127.0.0.1:7002"],
        "OPTIONS": {
            "CLIENT_CLASS": "django_scalekit.cluster.RedisClusterClient",
            "SOCKET_CONNECT_TIMEOUT": 0.5,
            "SOCKET_TIMEOUT": 0.5,
        },
    },
    # Nothing listens on port 1: a Redis outage (connections refused at once).
    "cache_down": {
        "BACKEND": "django_redis.cache.RedisCache",
        "LOCATION": "redis://127.0.0.1:1/0",
        "OPTIONS": {"SOCKET_CONNECT_TIMEOUT": 0.5, "SOCKET_TIMEOUT": 0.5},
    },
}

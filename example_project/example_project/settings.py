"""Settings of the example shop: embedded SQLite by default, real services by URL.

With no environment variables set, everything runs with Python and Django
alone: a SQLite primary, a SQLite replica copied from it every few seconds by
``shop/replication.py``, and a local-memory cache. Point the shop at real
services (``scripts/topology up`` does) with:

* ``DATABASE_URL``: the primary (``postgres://user@host:5432/name``, see
  ``env.py``); ``REPLICA_URLS``: its replicas, comma-separated (aliases
  ``replica``, ``replica2``, ...). With ``DATABASE_URL`` and no replicas, reads
  go to the primary.
* ``REDIS_URL``: the shared cache (django-redis): L2 of the two-level cache,
  Django's cache (``cache_page``) and, when installed, django-cacheops
  (``SCALEKIT_EXAMPLE_CACHEOPS=0`` turns it off).
* ``DJANGO_DEBUG`` (default ``1``), ``DJANGO_SECRET_KEY``,
  ``DJANGO_ALLOWED_HOSTS`` (comma-separated, default ``127.0.0.1,localhost``);
* ``SHARD_URLS``: the shards of the orders (aliases ``shard0``, ``shard1``,
  ...; default two SQLite files), ``SHARD_REPLICA_URLS``: one replica each;
* ``SCALEKIT_EXAMPLE_REPLICA_LAG``: seconds between two copies of the SQLite
  primary onto the SQLite replica (default 2);
* ``SCALEKIT_EXAMPLE_PINNING_SECONDS``: ``SCALEKIT["PINNING_SECONDS"]``
  (default 5; set 0 to watch a POST-redirect-GET miss its own write).
* ``SCALEKIT_EXAMPLE_DB_DIR``: the folder of the SQLite files (default: the
  project's, ``example_project/``);
* ``SCALEKIT_EXAMPLE_STATIC_ROOT``: where ``collectstatic`` writes and
  ``DJANGO_DEBUG=0`` serves static files from (default ``staticfiles/``).

When django-prometheus is installed, its middleware, database backends
(``django_prometheus.db.backends.postgresql``/``sqlite3``) and cache backends
(``django_prometheus.cache.backends.redis.RedisCache``/``locmem``) are used and
``/metrics`` appears (with ``PROMETHEUS_MULTIPROC_DIR`` set, it sums the
workers of a gunicorn).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from example_project import env

BASE_DIR = Path(__file__).resolve().parent.parent
# SCALEKIT_EXAMPLE_DB_DIR: where the SQLite files and relative sqlite:/// URLs
# live (tests/test_proxies.py gives each run its own folder).
DB_DIR = Path(os.environ.get("SCALEKIT_EXAMPLE_DB_DIR") or BASE_DIR)

SECRET_KEY = os.environ.get("DJANGO_SECRET_KEY", "django-scalekit-example-not-a-secret")
DEBUG = env.flag("DJANGO_DEBUG", True)
ALLOWED_HOSTS = os.environ.get("DJANGO_ALLOWED_HOSTS", "127.0.0.1,localhost").split(",")

HAS_PROMETHEUS = importlib.util.find_spec("django_prometheus") is not None
REDIS_URL = os.environ.get("REDIS_URL", "")
HAS_CACHEOPS = (
    bool(REDIS_URL)
    and importlib.util.find_spec("cacheops") is not None
    and env.flag("SCALEKIT_EXAMPLE_CACHEOPS", True)
)

INSTALLED_APPS = [
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.staticfiles",
    "django_scalekit",
    "shop",
]
if HAS_PROMETHEUS:
    INSTALLED_APPS.append("django_prometheus")
if HAS_CACHEOPS:
    INSTALLED_APPS.append("cacheops")

MIDDLEWARE = [
    # First: load-balancer probes are answered before host validation.
    "django_scalekit.middleware.HealthCheckMiddleware",
    "django.middleware.security.SecurityMiddleware",
    # Above everything that sets cookies or Vary (the pinning cookie too), so
    # it sees them.
    "django_scalekit.middleware.CDNCacheMiddleware",
    # Before the rest, so that writes made by any later middleware pin the client.
    "django_scalekit.middleware.PinningMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]
if HAS_PROMETHEUS:
    MIDDLEWARE.insert(1, "django_prometheus.middleware.PrometheusBeforeMiddleware")
    MIDDLEWARE.append("django_prometheus.middleware.PrometheusAfterMiddleware")

ROOT_URLCONF = "example_project.urls"
WSGI_APPLICATION = "example_project.wsgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [],
        "APP_DIRS": True,
        "OPTIONS": {
            # No auth context processor: catalog pages must not touch the
            # session (Vary: Cookie would make them private for the CDN).
            "context_processors": ["django.template.context_processors.request"]
        },
    }
]

# --- databases ------------------------------------------------------------------

DATABASE_URL = os.environ.get("DATABASE_URL", "")
if DATABASE_URL:
    DATABASES = {"default": env.database(DATABASE_URL, DB_DIR)}
    REPLICAS = []
    for i, url in enumerate(env.urls("REPLICA_URLS")):
        alias = "replica" if i == 0 else f"replica{i + 1}"
        replica = env.database(url, DB_DIR)
        # Fail fast when a replica stops answering; tests read the primary.
        replica["OPTIONS"].setdefault("connect_timeout", "2")
        replica["TEST"] = {"MIRROR": "default"}
        DATABASES[alias] = replica
        REPLICAS.append(alias)
else:
    DATABASES = {
        # The primary: writes, migrations, and reads of pinned clients.
        "default": {
            "ENGINE": "django.db.backends.sqlite3",
            "NAME": DB_DIR / "db.sqlite3",
        },
        # The replica: a copy of db.sqlite3 refreshed every REPLICA_LAG seconds
        # by shop/replication.py. Read-only, as a hot standby is.
        "replica": {
            "ENGINE": "django.db.backends.sqlite3",
            "NAME": DB_DIR / "replica.sqlite3",
            "OPTIONS": {"init_command": "PRAGMA query_only = ON"},
            "TEST": {"MIRROR": "default"},
        },
    }
    REPLICAS = ["replica"]

#: True when the replica is the simulated SQLite one (shop/replication.py).
SCALEKIT_EXAMPLE_SQLITE_REPLICA = not DATABASE_URL

# Orders live on shards keyed by customer (shop.models.Order, shard group
# "orders"): SHARD_URLS, one URL per shard (aliases shard0, shard1, ...), and
# optionally SHARD_REPLICA_URLS, one replica per shard in the same order
# (aliases shard0_replica, ...). Unset: two SQLite files, shard0.sqlite3 and
# shard1.sqlite3, with replicas copied from them like the primary's when
# DATABASE_URL is unset too.
SHARDS: list[str] = []
SHARD_REPLICAS: dict[str, list[str]] = {}
_shard_urls = env.urls("SHARD_URLS") or [
    f"sqlite:///shard{i}.sqlite3" for i in range(2)
]
_shard_replica_urls = env.urls("SHARD_REPLICA_URLS")
if not env.urls("SHARD_URLS") and SCALEKIT_EXAMPLE_SQLITE_REPLICA:
    _shard_replica_urls = [
        f"sqlite:///shard{i}_replica.sqlite3" for i in range(len(_shard_urls))
    ]
if _shard_replica_urls and len(_shard_replica_urls) != len(_shard_urls):
    raise ValueError(
        f"SHARD_REPLICA_URLS has {len(_shard_replica_urls)} URLs for "
        f"{len(_shard_urls)} SHARD_URLS: give one replica per shard, in order."
    )
for i, url in enumerate(_shard_urls):
    alias = f"shard{i}"
    DATABASES[alias] = env.database(url, DB_DIR)
    SHARDS.append(alias)
    if _shard_replica_urls:
        replica = env.database(_shard_replica_urls[i], DB_DIR)
        if replica["ENGINE"].endswith("sqlite3"):
            replica["OPTIONS"] = {"init_command": "PRAGMA query_only = ON"}
        else:
            replica["OPTIONS"].setdefault("connect_timeout", "2")
        replica["TEST"] = {"MIRROR": alias}
        DATABASES[f"{alias}_replica"] = replica
        SHARD_REPLICAS[alias] = [f"{alias}_replica"]
for _alias in SHARDS:
    if DATABASES[_alias]["ENGINE"].endswith("sqlite3"):
        # Writers of one SQLite file queue (up to 20 s) instead of failing.
        DATABASES[_alias].setdefault("OPTIONS", {})["timeout"] = 20

#: 1,024 buckets split evenly over the shards.
SHARD_MAP = {
    f"{i * 1024 // len(SHARDS)}-{(i + 1) * 1024 // len(SHARDS) - 1}": alias
    for i, alias in enumerate(SHARDS)
}

if HAS_PROMETHEUS:
    # django-prometheus's database backends: Django's, counting connections,
    # queries and errors per alias (django_db_*). Routing still goes by
    # connection.vendor, so the router sees no difference.
    for _db in DATABASES.values():
        _db["ENGINE"] = _db["ENGINE"].replace(
            "django.db.backends.", "django_prometheus.db.backends."
        )

# The shard router first: it routes the sharded Order and passes on the rest.
DATABASE_ROUTERS = [
    "django_scalekit.routers.ShardRouter",
    "django_scalekit.routers.PrimaryReplicaRouter",
]
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

# --- caches ----------------------------------------------------------------------

if REDIS_URL:
    CACHES = {
        "default": {
            "BACKEND": "django_redis.cache.RedisCache",
            "LOCATION": REDIS_URL,
            # A call to a Redis that stopped answering waits at most this long.
            "OPTIONS": {"SOCKET_CONNECT_TIMEOUT": 0.25, "SOCKET_TIMEOUT": 0.25},
        }
    }
else:
    # One process, so a local-memory cache is enough here (never in
    # production: see scalekit.W021 under `manage.py check --deploy`).
    CACHES = {"default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"}}
    # The two-level cache works on any L2, without cross-process invalidation:
    # that is what W202/W203 say, and all this single process needs.
    SILENCED_SYSTEM_CHECKS = ["scalekit.W202", "scalekit.W203"]
if HAS_PROMETHEUS:
    # django-prometheus's cache backends: subclasses of django-redis's and
    # Django's, counting gets, hits and misses (django_cache_*). The two-level
    # cache and its checks treat them as what they subclass.
    _PROMETHEUS_CACHES = {
        "django_redis.cache.RedisCache": "django_prometheus.cache.backends.redis.RedisCache",
        "django.core.cache.backends.locmem.LocMemCache": (
            "django_prometheus.cache.backends.locmem.LocMemCache"
        ),
    }
    for _cache in CACHES.values():
        _cache["BACKEND"] = _PROMETHEUS_CACHES.get(_cache["BACKEND"], _cache["BACKEND"])

if HAS_CACHEOPS:
    CACHEOPS_REDIS = REDIS_URL
    # Nothing is cached implicitly: the catalog's cacheops page calls .cache().
    CACHEOPS = {"shop.*": {"ops": (), "timeout": 300}}
    # Serve from the database while Redis is down, as our cache does.
    CACHEOPS_DEGRADE_ON_FAILURE = True

# --- django-scalekit ----------------------------------------------------------------

SCALEKIT = {
    "PRIMARY": "default",
    "REPLICAS": REPLICAS,
    "PINNING_SECONDS": float(os.environ.get("SCALEKIT_EXAMPLE_PINNING_SECONDS", "5")),
    "CACHE": {"L2": "default", "TIMEOUT": 300},
    "CDN": {
        "RULES": [
            # Public, short-lived for browsers, 30 s in the CDN (Varnish).
            {
                "PREFIX": "/api/",
                "CACHE": "public",
                "MAX_AGE": 0,
                "S_MAXAGE": 30,
                "STALE_WHILE_REVALIDATE": 30,
                "TAGS": ["api", "catalog"],
            },
            {
                "REGEX": r"^/(catalog|products)/",
                "CACHE": "public",
                "MAX_AGE": 0,
                "S_MAXAGE": 30,
                "STALE_WHILE_REVALIDATE": 30,
                "TAGS": ["catalog"],
            },
            {"PREFIX": "/orders/", "CACHE": "private", "MAX_AGE": 0},
        ],
        "TARGETED_HEADERS": ["CDN-Cache-Control"],
    },
    "SHARDING": {
        "GROUPS": {
            "orders": {"SHARDS": SHARDS, "MAP": SHARD_MAP, "REPLICAS": SHARD_REPLICAS}
        }
    },
    "HEALTH": {
        # The primary, the shards and every replica. Redis down degrades the
        # cache (circuit breaker) but the shop still serves: take no instance
        # out of rotation for it, nor for a replica.
        "DATABASES": [
            "default",
            *REPLICAS,
            *SHARDS,
            *(r for rs in SHARD_REPLICAS.values() for r in rs),
        ],
        "NON_CRITICAL": [
            *(f"db:{alias}" for alias in REPLICAS),
            *(f"db:{r}" for rs in SHARD_REPLICAS.values() for r in rs),
            "cache:default",
        ],
        "TIMEOUT": 2.0,
        # `Authorization: Bearer <token>` shows which check failed and why.
        "TOKEN": os.environ.get("SCALEKIT_EXAMPLE_HEALTH_TOKEN") or None,
    },
}

#: Seconds between two copies of the SQLite primary onto the SQLite replica.
SCALEKIT_EXAMPLE_REPLICA_LAG = float(
    os.environ.get("SCALEKIT_EXAMPLE_REPLICA_LAG", "2")
)

# --- auth, static files ----------------------------------------------------------------

# Sessions in a signed cookie: no session table to read on every request,
# and so no session read from a replica that has not seen the login yet.
SESSION_ENGINE = "django.contrib.sessions.backends.signed_cookies"
LOGIN_URL = "login"
LOGIN_REDIRECT_URL = "shop:order_list"
LOGOUT_REDIRECT_URL = "shop:catalog"

STATIC_URL = "/static/"
# SCALEKIT_EXAMPLE_STATIC_ROOT: collect elsewhere than the checkout (the
# real-proxy tests in tests/test_proxies.py collect into their own folder).
STATIC_ROOT = Path(
    os.environ.get("SCALEKIT_EXAMPLE_STATIC_ROOT") or BASE_DIR / "staticfiles"
)
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    # Fingerprinted names (shop.3f2a9c1b7d0e.css): CDNCacheMiddleware marks
    # them immutable for a year. Needs `manage.py collectstatic` when DEBUG is off.
    "staticfiles": {
        "BACKEND": "django.contrib.staticfiles.storage.ManifestStaticFilesStorage"
    },
}

USE_TZ = True
TIME_ZONE = "UTC"
LANGUAGE_CODE = "en-us"

# Show the replication thread's and the router's notes (a replica taken out of
# rotation logs a WARNING) in the console.
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"console": {"class": "logging.StreamHandler"}},
    "loggers": {
        "shop": {"handlers": ["console"], "level": "INFO"},
        "django_scalekit": {"handlers": ["console"], "level": "INFO"},
    },
}

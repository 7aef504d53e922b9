"""System checks, tag ``scalekit``.

Id ranges: 0xx settings and the replica router (W02x: scaling readiness,
``--deploy`` only), 1xx sharding, 2xx cache, 3xx CDN, 4xx health, 5xx metrics.
An id keeps its meaning for good; docs/checks.rst lists them all.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any, cast
from urllib.parse import parse_qs, urlsplit

from django.conf import settings
from django.core.checks import CheckMessage, Error, Warning
from django.core.exceptions import FieldDoesNotExist

from django_scalekit import conf

ROUTER_PATH = "django_scalekit.routers.PrimaryReplicaRouter"
PINNING_MIDDLEWARE_PATH = "django_scalekit.middleware.PinningMiddleware"

_PROCESS_LOCAL_CACHES = {
    "django.core.cache.backends.locmem.LocMemCache",
    "django.core.cache.backends.dummy.DummyCache",
}
_FILE_SESSIONS = {
    "django.contrib.sessions.backends.file",
}
# Substrings of ENGINE: Django's backends and their GIS variants
# (django.contrib.gis.db.backends.postgis, .mysql).
_SERVER_VENDORS = ("postgresql", "postgis", "mysql")


def _message(problem: conf.Problem) -> CheckMessage:
    cls = Error if problem.level == "error" else Warning
    return cls(problem.msg, hint=problem.hint, id=problem.id)


def check_settings(
    app_configs: Sequence[Any] | None = None, **kwargs: Any
) -> list[CheckMessage]:
    """Report every problem found while reading ``settings.SCALEKIT``."""
    return [_message(p) for p in conf.build().problems]


def _primaries(cfg: conf.Settings) -> dict[str, str]:
    """Each replica of every group -> its group's primary."""
    return {
        replica: group.primary
        for group in (cfg.default_group, *cfg.groups.values())
        for replica in group.replicas
    }


def _all_replicas(cfg: conf.Settings) -> list[str]:
    """Replicas of the default group and of every group in SCALEKIT["GROUPS"]."""
    return list(_primaries(cfg))


def _mirrored(alias: str) -> str:
    """The database ``alias`` is tested as: its TEST MIRROR, followed through
    mirrors of mirrors (a loop or an unknown alias ends the walk)."""
    seen = {alias}
    while True:
        test = settings.DATABASES.get(alias, {}).get("TEST") or {}
        mirror = test.get("MIRROR") if isinstance(test, Mapping) else None
        if not mirror or mirror in seen or mirror not in settings.DATABASES:
            return str(mirror) if mirror and mirror not in seen else alias
        seen.add(mirror)
        alias = mirror


def _engine(alias: str) -> str:
    return str(settings.DATABASES.get(alias, {}).get("ENGINE", ""))


def check_replica_router(
    app_configs: Sequence[Any] | None = None, **kwargs: Any
) -> list[CheckMessage]:
    """Check that the replica router's pieces are wired together."""
    cfg = conf.build()
    messages: list[CheckMessage] = []
    routers = [
        r if isinstance(r, str) else type(r).__module__ + "." + type(r).__qualname__
        for r in getattr(settings, "DATABASE_ROUTERS", [])
    ]
    router_on = ROUTER_PATH in routers
    any_replicas = bool(_primaries(cfg))
    # With errors in SCALEKIT (replicas given but invalid: E004-E007),
    # check_settings says what is wrong; "empty" would contradict it.
    settings_ok = not any(p.level == "error" for p in cfg.problems)
    if router_on and not any_replicas and settings_ok:
        messages.append(
            Warning(
                f'{ROUTER_PATH} is in DATABASE_ROUTERS but SCALEKIT["REPLICAS"] is '
                "empty, so every read goes to the primary.",
                hint='Set SCALEKIT["REPLICAS"] to the aliases of your replicas, e.g. '
                '["replica"], or remove the router from DATABASE_ROUTERS.',
                id="scalekit.W002",
            )
        )
    if any_replicas and not router_on:
        messages.append(
            Warning(
                'SCALEKIT["REPLICAS"] is set but DATABASE_ROUTERS does not include '
                f"{ROUTER_PATH}, so the replicas are never read.",
                hint=f'Add "{ROUTER_PATH}" to DATABASE_ROUTERS.',
                id="scalekit.W003",
            )
        )
    if (
        router_on
        and any_replicas
        and cfg.pinning_seconds > 0
        and PINNING_MIDDLEWARE_PATH not in getattr(settings, "MIDDLEWARE", [])
    ):
        messages.append(
            Warning(
                f"{PINNING_MIDDLEWARE_PATH} is not in MIDDLEWARE: a client redirected "
                "after a POST may read from a replica that has not yet replayed its write.",
                hint=f'Add "{PINNING_MIDDLEWARE_PATH}" to MIDDLEWARE, or set '
                'SCALEKIT["PINNING_SECONDS"] = 0 to say you do not want cross-request pinning.',
                id="scalekit.W004",
            )
        )
    middleware = list(getattr(settings, "MIDDLEWARE", []))
    session = "django.contrib.sessions.middleware.SessionMiddleware"
    if (
        PINNING_MIDDLEWARE_PATH in middleware
        and session in middleware
        and middleware.index(PINNING_MIDDLEWARE_PATH) > middleware.index(session)
    ):
        messages.append(
            Warning(
                f"{PINNING_MIDDLEWARE_PATH} comes after {session}: a session saved "
                "on a GET is written outside the request's routing scope and does not "
                "pin the client, so the next request may read the old session from "
                "a replica.",
                hint=f"Move {PINNING_MIDDLEWARE_PATH} above {session} in MIDDLEWARE.",
                id="scalekit.W008",
            )
        )
    for name in cfg.groups:
        if "," in name or "=" in name or name.startswith("shard:"):
            messages.append(
                Warning(
                    f'SCALEKIT["GROUPS"] has a group named {name!r}: names with "," or '
                    '"=" cannot travel in the pinning cookie, and "shard:" names belong '
                    "to the shard router's groups.",
                    hint="Use letters, digits and underscores in group names.",
                    id="scalekit.W009",
                )
            )
    if cfg.lsn_mode:
        primaries = _primaries(cfg)
        for alias in sorted({*primaries, *primaries.values()}):
            if "postgresql" not in _engine(alias):
                messages.append(
                    Warning(
                        f'SCALEKIT["READ_YOUR_WRITES"] is "lsn" but {alias!r} uses '
                        f"{_engine(alias)!r}: WAL positions exist only on PostgreSQL, "
                        "so its reads after a write go to the primary.",
                        hint='Use PostgreSQL, or set SCALEKIT["READ_YOUR_WRITES"] = "time".',
                        id="scalekit.W007",
                    )
                )
    for alias in _all_replicas(cfg):
        engine = _engine(alias)
        if cfg.replica_max_lag_seconds is not None and "postgresql" not in engine:
            messages.append(
                Warning(
                    f'SCALEKIT["REPLICA_MAX_LAG_SECONDS"] is set but replica {alias!r} '
                    f"uses {engine!r}; lag is only measured on PostgreSQL, so it is "
                    "never skipped for lag.",
                    hint="Use PostgreSQL replicas or unset REPLICA_MAX_LAG_SECONDS.",
                    id="scalekit.W005",
                )
            )
        options = cast(dict[str, Any], settings.DATABASES[alias].get("OPTIONS", {}))
        if "postgresql" in engine and "connect_timeout" not in options:
            messages.append(
                Warning(
                    f'DATABASES[{alias!r}]["OPTIONS"] has no "connect_timeout": a replica '
                    "that stops answering can hold a request until the operating "
                    "system gives up on the connection (minutes).",
                    hint=f'Set DATABASES[{alias!r}]["OPTIONS"]["connect_timeout"] = 2 '
                    "(seconds); the router then takes it out of rotation quickly.",
                    id="scalekit.W006",
                )
            )
    return messages


def check_scaling_readiness(
    app_configs: Sequence[Any] | None = None, **kwargs: Any
) -> list[CheckMessage]:
    """Warn about stateful habits that break running several app servers."""
    messages: list[CheckMessage] = []
    engine = getattr(settings, "SESSION_ENGINE", "")
    if engine in _FILE_SESSIONS:
        messages.append(
            Warning(
                f"SESSION_ENGINE is {engine!r}: sessions stored on one server's disk "
                "are lost when the load balancer sends the user to another.",
                hint='Use "django.contrib.sessions.backends.cached_db" or '
                '"django.contrib.sessions.backends.cache" with a shared cache.',
                id="scalekit.W020",
            )
        )
    default_cache = getattr(settings, "CACHES", {}).get("default", {})
    backend = default_cache.get("BACKEND", "")
    if backend and _backend_is(backend, _PROCESS_LOCAL_CACHES):
        kept = (
            "which stores nothing: every process recomputes everything"
            if _backend_is(backend, {"django.core.cache.backends.dummy.DummyCache"})
            else "which each process keeps for itself: processes disagree and "
            "invalidations do not spread"
        )
        messages.append(
            Warning(
                f'CACHES["default"] uses {backend!r}, {kept}.',
                hint='Use a shared cache such as "django_redis.cache.RedisCache" or '
                '"django.core.cache.backends.redis.RedisCache".',
                id="scalekit.W021",
            )
        )
    for alias, db in getattr(settings, "DATABASES", {}).items():
        db_engine = str(db.get("ENGINE", ""))
        if (
            any(v in db_engine for v in _SERVER_VENDORS)
            and db.get("CONN_MAX_AGE", 0) == 0
        ):
            messages.append(
                Warning(
                    f'DATABASES[{alias!r}]["CONN_MAX_AGE"] is 0: every request opens a '
                    "new database connection, which costs a round trip and server work "
                    "at scale.",
                    hint=f'Set DATABASES[{alias!r}]["CONN_MAX_AGE"] = 60 with '
                    '"CONN_HEALTH_CHECKS": True, or put PgBouncer in front and keep 0.',
                    id="scalekit.W022",
                )
            )
    if getattr(settings, "DEBUG", False):
        messages.append(
            Warning(
                "DEBUG is True: Django keeps every query of a request in memory and "
                "shows tracebacks, which is slow and unsafe under production load.",
                hint="Set DEBUG = False in production settings.",
                id="scalekit.W023",
            )
        )
    cfg = conf.build()
    for alias, primary in _primaries(cfg).items():
        test = cast(dict[str, Any], settings.DATABASES[alias].get("TEST", {}))
        mirror = test.get("MIRROR")
        # Tests write to the database the primary mirrors (itself if none).
        target = _mirrored(primary)
        if mirror and _mirrored(alias) != target:
            messages.append(
                Warning(
                    f'Replica DATABASES[{alias!r}] has "TEST": {{"MIRROR": {mirror!r}}}, '
                    f"but its primary {primary!r} is tested as {target!r}: tests would "
                    "read from a database their writes never reach.",
                    hint=f'Set DATABASES[{alias!r}]["TEST"] = {{"MIRROR": {target!r}}}.',
                    id="scalekit.W025",
                )
            )
        if not mirror:
            messages.append(
                Warning(
                    f'Replica DATABASES[{alias!r}] has no "TEST": {{"MIRROR": ...}}: '
                    "the test runner creates a separate, empty test database for it, so "
                    "tests read from a database their writes never reach.",
                    hint=f'Set DATABASES[{alias!r}]["TEST"] = {{"MIRROR": {primary!r}}}.',
                    id="scalekit.W024",
                )
            )
    return messages


# --- CDN (3xx) and health (4xx) middleware placement ------------------------

CDN_MIDDLEWARE_PATH = "django_scalekit.middleware.CDNCacheMiddleware"
HEALTH_MIDDLEWARE_PATH = "django_scalekit.middleware.HealthCheckMiddleware"
#: Middleware that set cookies or Vary on the way out: the CDN middleware
#: must sit above them to see their headers.
_COOKIE_MIDDLEWARE = (
    "django_scalekit.middleware.PinningMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.locale.LocaleMiddleware",
)


def check_cdn_and_health_middleware(
    app_configs: Sequence[Any] | None = None, **kwargs: Any
) -> list[CheckMessage]:
    """Check where CDNCacheMiddleware and HealthCheckMiddleware sit in MIDDLEWARE."""
    middleware = list(getattr(settings, "MIDDLEWARE", None) or [])
    messages: list[CheckMessage] = []
    if CDN_MIDDLEWARE_PATH in middleware:
        position = middleware.index(CDN_MIDDLEWARE_PATH)
        below = [m for m in _COOKIE_MIDDLEWARE if m in middleware[:position]]
        if below:
            messages.append(
                Warning(
                    f"{CDN_MIDDLEWARE_PATH} comes after {', '.join(below)} in "
                    "MIDDLEWARE, so it decides cache headers before they add their "
                    "cookies and Vary headers.",
                    hint=f'Move "{CDN_MIDDLEWARE_PATH}" above them, e.g. right after '
                    "SecurityMiddleware.",
                    id="scalekit.W302",
                )
            )
    if HEALTH_MIDDLEWARE_PATH in middleware and middleware[0] != HEALTH_MIDDLEWARE_PATH:
        messages.append(
            Warning(
                f"{HEALTH_MIDDLEWARE_PATH} is not first in MIDDLEWARE: the middleware "
                f"above it ({middleware[0]}, ...) runs on every probe and may reject it "
                "(host validation, HTTPS redirects) or slow it down.",
                hint=f'Put "{HEALTH_MIDDLEWARE_PATH}" first in MIDDLEWARE.',
                id="scalekit.W403",
            )
        )
    return messages


# --- cache (2xx) ------------------------------------------------------------

_DJANGO_REDIS_BACKEND = "django_redis.cache.RedisCache"
_SOCKET_OPTIONS = ("SOCKET_CONNECT_TIMEOUT", "SOCKET_TIMEOUT")
_CLUSTER_CLIENT = "django_scalekit.cluster.RedisClusterClient"
_SENTINEL_CLIENT = "django_redis.client.SentinelClient"
_SENTINEL_FACTORY = "django_redis.pool.SentinelConnectionFactory"


def _backend_is(path: str, bases: Iterable[str]) -> bool:
    """Whether the cache ``BACKEND`` at ``path`` is one of ``bases`` or a
    subclass (django-prometheus's backends subclass django-redis's and Django's).
    A path that cannot be imported matches only by name."""
    from django.utils.module_loading import import_string

    if path in bases:
        return True
    try:
        cls = import_string(path)
    except ImportError:
        return False
    for base in bases:
        try:
            base_cls = import_string(base)
        except ImportError:
            continue
        if (
            isinstance(cls, type)
            and isinstance(base_cls, type)
            and issubclass(cls, base_cls)
        ):
            return True
    return False


def _url_db(url: str) -> int | None:
    """The database a ``redis://`` URL names (path or ``?db=``), None if unreadable."""
    parsed = urlsplit(url)
    raw = parse_qs(parsed.query).get("db", [parsed.path.strip("/") or "0"])[0]
    try:
        return int(raw)
    except ValueError:
        return None


def _check_redis_client(alias: str, l2: Mapping[str, Any]) -> list[CheckMessage]:
    """Sentinel and Cluster clients of a django-redis L2 (E209, E210)."""
    from django.utils.module_loading import import_string

    options = l2.get("OPTIONS", {})
    client = options.get("CLIENT_CLASS", "")
    location = l2.get("LOCATION", "")
    urls = location.split(",") if isinstance(location, str) else list(location)
    messages: list[CheckMessage] = []
    if client == _CLUSTER_CLIENT:
        for url in urls:
            if _url_db(url) != 0:
                messages.append(
                    Error(
                        f'CACHES[{alias!r}]["LOCATION"] names {url!r}: a Redis Cluster '
                        "has only database 0.",
                        hint="Drop the database number from the URL (or make it /0); "
                        "keep sites apart with KEY_PREFIX.",
                        id="scalekit.E209",
                    )
                )
    if client == _SENTINEL_CLIENT:
        path = options.get("CONNECTION_FACTORY") or getattr(
            settings, "DJANGO_REDIS_CONNECTION_FACTORY", ""
        )
        try:
            from django_redis.pool import (  # type: ignore[import-untyped]
                SentinelConnectionFactory,
            )

            factory_ok = issubclass(import_string(path), SentinelConnectionFactory)
        except (ImportError, TypeError):
            factory_ok = False
        if not factory_ok or not options.get("SENTINELS"):
            messages.append(
                Error(
                    f'CACHES[{alias!r}]["OPTIONS"] uses {_SENTINEL_CLIENT}, which needs '
                    f'["CONNECTION_FACTORY"] = "{_SENTINEL_FACTORY}" and '
                    '["SENTINELS"], a list of (host, port); it fails on first use '
                    "otherwise.",
                    hint=f'Set CACHES[{alias!r}]["OPTIONS"]["CONNECTION_FACTORY"] = '
                    f'"{_SENTINEL_FACTORY}" and ["SENTINELS"] = [("sentinel-1", 26379)].',
                    id="scalekit.E210",
                )
            )
    return messages


def check_cache(
    app_configs: Sequence[Any] | None = None, **kwargs: Any
) -> list[CheckMessage]:
    """Check the caches named by ``SCALEKIT["CACHE"]`` and its warmers."""
    from django.utils.module_loading import import_string

    cfg = conf.build().cache
    raw = getattr(settings, "SCALEKIT", {})
    if not isinstance(raw, dict) or "CACHE" not in raw:
        # The cache piece is not configured: say nothing about CACHES (a
        # per-process default cache is W021's business, under --deploy).
        return []
    caches = getattr(settings, "CACHES", {})
    messages: list[CheckMessage] = []
    l2 = caches.get(cfg.l2, {})
    backend = l2.get("BACKEND", "")
    is_redis = bool(backend) and _backend_is(backend, (_DJANGO_REDIS_BACKEND,))
    if backend and not is_redis and _backend_is(backend, _PROCESS_LOCAL_CACHES):
        messages.append(
            Warning(
                f'SCALEKIT["CACHE"]["L2"] is {cfg.l2!r}, which uses {backend!r}: each '
                "process keeps its own, so processes compute the same values and "
                "invalidate() does not reach the others.",
                hint=f'Point CACHES[{cfg.l2!r}] at Redis with "{_DJANGO_REDIS_BACKEND}".',
                id="scalekit.W202",
            )
        )
    elif backend and not is_redis:
        messages.append(
            Warning(
                f'SCALEKIT["CACHE"]["L2"] is {cfg.l2!r}, which uses {backend!r}, not '
                "django-redis: invalidate() reaches other processes' L1 only when "
                'their copies expire after SCALEKIT["CACHE"]["L1_TIMEOUT"].',
                hint=f'Use "{_DJANGO_REDIS_BACKEND}" (the [redis] extra), or keep '
                "L1_TIMEOUT as short as the staleness you accept.",
                id="scalekit.W203",
            )
        )
    if is_redis:
        messages.extend(_check_redis_client(cfg.l2, l2))
        options = l2.get("OPTIONS", {})
        missing = [o for o in _SOCKET_OPTIONS if o not in options]
        if missing:
            messages.append(
                Warning(
                    f'CACHES[{cfg.l2!r}]["OPTIONS"] has no {" or ".join(missing)}: when '
                    "Redis stops answering, the call that probes it waits for the "
                    "operating system to give up (minutes).",
                    hint=f'Set CACHES[{cfg.l2!r}]["OPTIONS"]["SOCKET_CONNECT_TIMEOUT"] '
                    'and ["SOCKET_TIMEOUT"] to e.g. 0.25 (seconds).',
                    id="scalekit.W204",
                )
            )
    if cfg.l1 is not None:
        l1_backend = caches.get(cfg.l1, {}).get("BACKEND", "")
        if (
            cfg.l1 == cfg.l2
            or l1_backend != "django.core.cache.backends.locmem.LocMemCache"
        ):
            messages.append(
                Warning(
                    f'SCALEKIT["CACHE"]["L1"] is {cfg.l1!r} ({l1_backend!r}); L1 should be '
                    "a cache of its own in each process's memory, distinct from L2.",
                    hint='Remove SCALEKIT["CACHE"]["L1"] to use the built-in per-process '
                    "store (fastest), or name a LocMemCache alias used for nothing else.",
                    id="scalekit.W205",
                )
            )
    for path in cfg.warmers:
        try:
            obj = import_string(path)
        except ImportError as exc:
            messages.append(
                Error(
                    f'SCALEKIT["CACHE"]["WARMERS"] lists {path!r}, which cannot be '
                    f"imported: {exc}",
                    hint="Give the dotted path of a warmer function, e.g. "
                    '"shop.cache.warm_products".',
                    id="scalekit.E208",
                )
            )
            continue
        if not callable(obj):
            messages.append(
                Error(
                    f'SCALEKIT["CACHE"]["WARMERS"] lists {path!r}, which is a '
                    f"{type(obj).__name__}, not a function.",
                    hint="Name a function decorated with @django_scalekit.cache.warmer "
                    "or a plain function that warms the cache.",
                    id="scalekit.E208",
                )
            )
    return messages


# --- sharding (1xx): settings checks are in conf.py; models and routers here --

SHARD_ROUTER_PATH = "django_scalekit.routers.ShardRouter"


def check_sharding(
    app_configs: Sequence[Any] | None = None, **kwargs: Any
) -> list[CheckMessage]:
    """Check sharded models against ``SCALEKIT["SHARDING"]`` and the router order."""
    from django.apps import apps

    cfg = conf.build().sharding
    messages: list[CheckMessage] = []
    routers = [
        r if isinstance(r, str) else type(r).__module__ + "." + type(r).__qualname__
        for r in getattr(settings, "DATABASE_ROUTERS", [])
    ]
    if cfg.groups and SHARD_ROUTER_PATH not in routers:
        messages.append(
            Error(
                'SCALEKIT["SHARDING"]["GROUPS"] is set but DATABASE_ROUTERS does not '
                f"include {SHARD_ROUTER_PATH}, so sharded rows would go to the default "
                "database.",
                hint=f'Add "{SHARD_ROUTER_PATH}" to DATABASE_ROUTERS, before '
                f'"{ROUTER_PATH}".',
                id="scalekit.E116",
            )
        )
    elif (
        ROUTER_PATH in routers
        and SHARD_ROUTER_PATH in routers
        and routers.index(ROUTER_PATH) < routers.index(SHARD_ROUTER_PATH)
    ):
        messages.append(
            Error(
                f"{ROUTER_PATH} comes before {SHARD_ROUTER_PATH} in DATABASE_ROUTERS: "
                "it answers for every model, so sharded models never reach their shard.",
                hint=f'Put "{SHARD_ROUTER_PATH}" first.',
                id="scalekit.E116",
            )
        )

    for model in apps.get_models(include_auto_created=True):
        messages.extend(check_sharded_model(model, cfg))
    return messages


def _sharded(model: Any) -> bool:
    return getattr(model, "shard_group", None) is not None


def check_sharded_model(model: Any, cfg: conf.ShardingSettings) -> list[CheckMessage]:
    """Check one model's shard declaration and its relations (E110-E115, E118)."""
    from django_scalekit import sharding

    messages: list[CheckMessage] = []
    label = model._meta.label
    group = getattr(model, "shard_group", None)
    relations = [
        f
        for f in model._meta.get_fields()
        if f.is_relation and f.concrete and f.related_model is not None
    ]
    if group is None:
        if isinstance(model, type) and issubclass(model, sharding.ShardedModel):
            messages.append(
                Error(
                    f"{label} is a ShardedModel without a shard_group.",
                    hint='Set shard_group = "<a group of SCALEKIT["SHARDING"]["GROUPS"]>".',
                    obj=model,
                    id="scalekit.E110",
                )
            )
        for f in relations:
            if _sharded(f.related_model):
                messages.append(
                    Error(
                        f"{label}.{f.name} relates an unsharded model (on the primary) "
                        f"to the sharded {f.related_model._meta.label}, whose rows "
                        "live on other databases.",
                        hint="Keep the sharded row's ID in a plain "
                        "models.BigIntegerField and load it with get_by_id().",
                        obj=model,
                        id="scalekit.E115",
                    )
                )
        return messages
    if group not in cfg.groups:
        messages.append(
            Error(
                f"{label}.shard_group is {group!r}, which is not in "
                'SCALEKIT["SHARDING"]["GROUPS"].',
                hint="Name one of: " + ", ".join(map(repr, cfg.groups)) + "."
                if cfg.groups
                else 'Configure the group in SCALEKIT["SHARDING"]["GROUPS"].',
                obj=model,
                id="scalekit.E110",
            )
        )
    key = getattr(model, "shard_key", None)
    try:
        key_field = model._meta.get_field(key) if isinstance(key, str) else None
    except FieldDoesNotExist:
        key_field = None
    if key_field is None or not key_field.concrete or key_field.is_relation:
        messages.append(
            Error(
                f"{label}.shard_key is {key!r}, which is not a field of {label}.",
                hint="Set shard_key to the name of a concrete, non-relational field, "
                'e.g. shard_key = "customer_id" with customer_id = '
                "models.BigIntegerField().",
                obj=model,
                id="scalekit.E111",
            )
        )
    if not isinstance(model._meta.pk, sharding.ShardedIDField):
        messages.append(
            Error(
                f"{label}'s primary key is a {type(model._meta.pk).__name__}, not a "
                "ShardedIDField: each shard would number rows on its own (IDs "
                "collide), and get_by_id() and resharding cannot find a row's bucket.",
                hint="Declare id = django_scalekit.sharding.ShardedIDField("
                "primary_key=True).",
                obj=model,
                id="scalekit.E112",
            )
        )
    if not isinstance(model._default_manager, sharding.ShardedManager):
        messages.append(
            Error(
                f"{label}'s default manager is a "
                f"{type(model._default_manager).__name__}, not a ShardedManager: "
                "it has no for_key(), get_by_id() or fan_out().",
                hint="Declare objects = django_scalekit.sharding.ShardedManager().",
                obj=model,
                id="scalekit.E113",
            )
        )
    for f in relations:
        target = f.related_model
        if getattr(target, "shard_group", None) != group:
            messages.append(
                Error(
                    f"{label}.{f.name} relates the sharded {label} to "
                    f"{target._meta.label}, which "
                    + (
                        "is unsharded (on the primary, another database)."
                        if not _sharded(target)
                        else f"is in shard group {target.shard_group!r}."
                    ),
                    hint="Keep the other row's ID in a plain models.BigIntegerField, "
                    "or shard both models in one group by the same key.",
                    obj=model,
                    id="scalekit.E114",
                )
            )
        elif (
            key_field is not None
            and not key_field.is_relation
            and not _same_key_kind(key_field, target)
        ):
            other = getattr(target, "shard_key", None)
            messages.append(
                Error(
                    f"{label}.{f.name} relates {label} (shard key {key!r}, a "
                    f"{key_field.get_internal_type()}) to {target._meta.label} (shard "
                    f"key {other!r}, {_key_kind_label(target)}): a child and its parent "
                    "stay on one database through a reshard only when the child's shard "
                    "key holds its parent's key value, which these two kinds of field "
                    "cannot.",
                    hint=f"Give {label} the same kind of shard key field as "
                    f"{target._meta.label} and set it to the parent's key, or keep the "
                    "parent's ID in a plain models.BigIntegerField.",
                    obj=model,
                    id="scalekit.E118",
                )
            )
    return messages


_INT_KEYS = {
    "IntegerField",
    "BigIntegerField",
    "SmallIntegerField",
    "PositiveIntegerField",
    "PositiveBigIntegerField",
    "PositiveSmallIntegerField",
}
_TEXT_KEYS = {"CharField", "TextField", "SlugField", "EmailField", "UUIDField"}


def _key_kind(field: Any) -> str:
    # Which values hash alike (sharding.key_bytes): ints by their digits,
    # text and UUIDs by their text.
    kind = field.get_internal_type()
    return "int" if kind in _INT_KEYS else "text" if kind in _TEXT_KEYS else kind


def _target_key_field(target: Any) -> Any:
    try:
        return target._meta.get_field(getattr(target, "shard_key", None) or "")
    except FieldDoesNotExist:
        return None


def _key_kind_label(target: Any) -> str:
    field = _target_key_field(target)
    return "missing" if field is None else f"a {field.get_internal_type()}"


def _same_key_kind(key_field: Any, target: Any) -> bool:
    field = _target_key_field(target)
    # A missing key on the target is its own E111.
    return field is None or _key_kind(field) == _key_kind(key_field)

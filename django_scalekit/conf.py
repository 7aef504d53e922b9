"""The one place where django-scalekit reads ``settings.SCALEKIT``.

``get()`` returns a frozen, typed :class:`Settings` built from the ``SCALEKIT``
dict plus documented defaults. It is cached and rebuilt when Django sends
``setting_changed`` (so ``override_settings(SCALEKIT=...)`` just works).

Validation happens while building: every problem becomes a :class:`Problem`
carrying the system check id that ``checks.py`` reports. Runtime code calls
``get()``, which raises :class:`~django.core.exceptions.ImproperlyConfigured`
naming the key and the check id rather than failing later with a ``KeyError``.
"""

from __future__ import annotations

import ipaddress
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from itertools import accumulate
from typing import Any, Literal

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured

#: Top-level keys, their defaults and a one-line meaning (the settings
#: reference in docs/settings.rst is tested against this table).
DEFAULTS: dict[str, tuple[object, str]] = {
    "PRIMARY": ("default", "Alias in DATABASES that receives writes and migrations."),
    "REPLICAS": (
        (),
        "Aliases that serve reads: a list, or a mapping alias -> positive weight.",
    ),
    "PINNING_SECONDS": (
        5.0,
        "After a write or an unsafe request, the client reads from the primary for this long.",
    ),
    "PINNING_COOKIE_NAME": ("scalekit_pin", "Name of the signed pinning cookie."),
    "PINNING_COOKIE_SECURE": (
        None,
        "Secure flag of the pinning cookie; None follows SESSION_COOKIE_SECURE.",
    ),
    "REPLICA_RETRY_SECONDS": (
        15.0,
        "A replica that fails to connect is left out of rotation for this long.",
    ),
    "RETRY_ON_REPLICA_FAILURE": (
        True,
        "When a replica fails mid-query in a GET/HEAD request that wrote nothing, "
        "run the view once more, reading elsewhere.",
    ),
    "REPLICA_MAX_LAG_SECONDS": (
        None,
        "Skip PostgreSQL replicas whose replication lag exceeds this; None disables.",
    ),
    "REPLICA_LAG_CHECK_SECONDS": (
        5.0,
        "How often one process samples each replica's lag.",
    ),
    "READ_YOUR_WRITES": (
        "time",
        '"time": pin a client to the primary for PINNING_SECONDS after a write; '
        '"lsn": read replicas that have replayed the write (PostgreSQL).',
    ),
    "LSN_CHECK_SECONDS": (
        0.2,
        "How often one process samples each replica's replay position (lsn mode).",
    ),
    "GROUPS": (
        {},
        "More primary/replica groups: name -> {PRIMARY, REPLICAS, APPS, MODELS}.",
    ),
    "SHARDING": ({}, "Shard router settings."),
    "CACHE": ({}, "Two-level cache settings."),
    "CDN": ({}, "CDN cache-header middleware settings."),
    "HEALTH": ({}, "Health check settings."),
    "METRICS": ({}, "Metrics settings."),
}

SUBSECTIONS = ("SHARDING", "CACHE", "CDN", "HEALTH", "METRICS")


@dataclass(frozen=True)
class Problem:
    """A configuration problem, reported by a system check with ``id``."""

    level: Literal["error", "warning"]
    id: str
    msg: str
    hint: str | None = None


@dataclass(frozen=True)
class ReplicaGroup:
    """A primary and the replicas that serve its reads."""

    name: str
    primary: str
    replicas: tuple[str, ...] = ()
    weights: tuple[float, ...] = ()
    #: Running totals of ``weights``, for ``random.choices``.
    cum_weights: tuple[float, ...] = ()

    @classmethod
    def of(cls, name: str, primary: str, replicas: Mapping[str, float]) -> ReplicaGroup:
        weights = tuple(replicas.values())
        return cls(name, primary, tuple(replicas), weights, tuple(accumulate(weights)))


#: Name of the group made of the top-level PRIMARY and REPLICAS.
DEFAULT_GROUP = "default"


@dataclass(frozen=True)
class Settings:
    """The validated ``SCALEKIT`` settings, with derived lookup tables."""

    primary: str = "default"
    replicas: tuple[str, ...] = ()
    #: The group of the top-level PRIMARY and REPLICAS (with their weights).
    default_group: ReplicaGroup = ReplicaGroup(DEFAULT_GROUP, "default")
    #: Groups from SCALEKIT["GROUPS"], and which app labels and models
    #: ("app_label.modelname") each one serves.
    groups: Mapping[str, ReplicaGroup] = field(default_factory=dict)
    app_groups: Mapping[str, ReplicaGroup] = field(default_factory=dict)
    model_groups: Mapping[str, ReplicaGroup] = field(default_factory=dict)
    #: Every alias of every group (primaries and replicas) -> its group's name.
    alias_groups: Mapping[str, str] = field(default_factory=dict)
    pinning_seconds: float = 5.0
    #: Count routed queries in scalekit_router_queries_total
    #: (SCALEKIT["METRICS"]["ROUTING"], on when prometheus_client is installed).
    routing_metrics: bool = False
    #: READ_YOUR_WRITES == "lsn": causal reads by WAL position.
    lsn_mode: bool = False
    #: No GROUPS and time-based read-your-writes: a write only pins the
    #: scope (db_for_write's fast path).
    simple_writes: bool = True
    lsn_check_seconds: float = 0.2
    pinning_cookie_name: str = "scalekit_pin"
    pinning_cookie_secure: bool = False
    replica_retry_seconds: float = 15.0
    retry_on_replica_failure: bool = True
    replica_max_lag_seconds: float | None = None
    replica_lag_check_seconds: float = 5.0
    #: Raw sub-dicts of pieces that have no typed settings yet.
    sections: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    cache: CacheSettings = field(default_factory=lambda: CacheSettings())
    cdn: CDNSettings = field(default_factory=lambda: CDNSettings())
    health: HealthSettings = field(default_factory=lambda: HealthSettings())
    sharding: ShardingSettings = field(default_factory=lambda: ShardingSettings())
    problems: tuple[Problem, ...] = ()


#: The settings when they have no errors: what the hot paths read.
_settings: Settings | None = None
#: The settings as built, errors or not (``get(strict=False)``).
_lenient: Settings | None = None


def get(strict: bool = True) -> Settings:
    """Return the current settings; raise ImproperlyConfigured on an error.

    ``strict=False`` returns them anyway, with defaults in place of the bad
    values: for code that Django runs while reporting system checks
    (``allow_migrate``, ``allow_relation``), so that ``manage.py check`` lists
    the problems instead of crashing on the first.
    """
    global _settings, _lenient
    if _settings is not None:
        return _settings
    if _lenient is None:
        _lenient = build()
    errors = [p for p in _lenient.problems if p.level == "error"]
    if not errors:
        _settings = _lenient
        return _settings
    if not strict:
        return _lenient
    problem = errors[0]
    raise ImproperlyConfigured(
        f"{problem.msg} ({problem.id})"
        + (f" Hint: {problem.hint}" if problem.hint else "")
    )


def clear() -> None:
    """Forget the cached settings; the next ``get()`` rebuilds them."""
    global _settings, _lenient
    _settings = _lenient = None


def _is_number(value: object) -> bool:
    return (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and math.isfinite(value)
    )


class _Builder:
    """Collects problems while reading the raw dict, falling back to defaults."""

    def __init__(self, raw: Mapping[str, Any]) -> None:
        self.raw = raw
        self.problems: list[Problem] = []

    def error(self, id: str, msg: str, hint: str | None = None) -> None:
        self.problems.append(Problem("error", id, msg, hint))

    def warning(self, id: str, msg: str, hint: str | None = None) -> None:
        self.problems.append(Problem("warning", id, msg, hint))

    def unknown_keys(
        self,
        raw: Mapping[str, Any],
        known: Iterable[str],
        where: str,
        id: str,
        what: str,
    ) -> None:
        """Warn (check ``id``) about each key of ``raw`` not in ``known``."""
        known = tuple(known)
        for key in raw:
            if key not in known:
                self.warning(
                    id,
                    f'{where}["{key}"] is not {what} and is ignored.',
                    "Check the spelling; known keys: " + ", ".join(known) + ".",
                )

    def seconds(
        self, key: str, id: str, *, allow_zero: bool, allow_none: bool = False
    ) -> float | None:
        default = DEFAULTS[key][0]
        value = self.raw.get(key, default)
        if value is None and allow_none:
            return None
        if not _is_number(value) or value < 0 or (value == 0 and not allow_zero):
            expected = "a number of seconds " + (">= 0" if allow_zero else "> 0")
            if allow_none:
                expected += " or None"
            self.error(
                id,
                f'SCALEKIT["{key}"] is {value!r}; expected {expected}.',
                f'Set SCALEKIT["{key}"] to, for example, {DEFAULTS[key][0] or 2}.',
            )
            return None if default is None else float(default)  # type: ignore[arg-type]
        return float(value)


def build(raw: object = None) -> Settings:
    """Build Settings from ``raw`` (default: ``settings.SCALEKIT``), never raising."""
    if raw is None:
        raw = getattr(settings, "SCALEKIT", {})
    if not isinstance(raw, Mapping):
        return Settings(
            problems=(
                Problem(
                    "error",
                    "scalekit.E001",
                    f"settings.SCALEKIT is a {type(raw).__name__}; expected a dict.",
                    'Set SCALEKIT = {"REPLICAS": ["replica"]} or remove it.',
                ),
            )
        )
    b = _Builder(raw)
    databases: Mapping[str, Any] = getattr(settings, "DATABASES", {})

    b.unknown_keys(
        raw, DEFAULTS, "SCALEKIT", "scalekit.W001", "a django-scalekit setting"
    )

    primary = raw.get("PRIMARY", "default")
    if not isinstance(primary, str) or not primary:
        b.error(
            "scalekit.E002",
            f'SCALEKIT["PRIMARY"] is {primary!r}; expected a DATABASES alias (a string).',
            'Set SCALEKIT["PRIMARY"] = "default".',
        )
        primary = "default"
    elif primary not in databases:
        b.error(
            "scalekit.E003",
            f'SCALEKIT["PRIMARY"] names {primary!r}, which is not in DATABASES.',
            "Add it to DATABASES or name one of: " + ", ".join(map(repr, databases)),
        )

    replicas, weights = _replicas(b, raw.get("REPLICAS", ()), primary, databases)
    groups, app_groups, model_groups = _groups(b, raw.get("GROUPS", {}), databases)
    for group in groups.values():
        shared = {group.primary, *group.replicas} & {primary, *replicas}
        if shared:
            b.error(
                "scalekit.E016",
                f'SCALEKIT["GROUPS"][{group.name!r}] uses {sorted(shared)!r}, which the '
                "top-level PRIMARY/REPLICAS also use.",
                "Each database belongs to one group: give the group its own aliases.",
            )

    pinning = b.seconds("PINNING_SECONDS", "scalekit.E008", allow_zero=True)
    retry = b.seconds("REPLICA_RETRY_SECONDS", "scalekit.E009", allow_zero=False)
    max_lag = b.seconds(
        "REPLICA_MAX_LAG_SECONDS", "scalekit.E010", allow_zero=False, allow_none=True
    )
    lag_check = b.seconds(
        "REPLICA_LAG_CHECK_SECONDS", "scalekit.E011", allow_zero=False
    )

    mode = raw.get("READ_YOUR_WRITES", "time")
    if mode not in ("time", "lsn"):
        b.error(
            "scalekit.E018",
            f'SCALEKIT["READ_YOUR_WRITES"] is {mode!r}; expected "time" or "lsn".',
            '"lsn" needs PostgreSQL; "time" works with every database.',
        )
        mode = "time"
    lsn_check = b.seconds("LSN_CHECK_SECONDS", "scalekit.E019", allow_zero=False)

    cookie_name = raw.get("PINNING_COOKIE_NAME", "scalekit_pin")
    if not isinstance(cookie_name, str) or not cookie_name.isidentifier():
        b.error(
            "scalekit.E012",
            f'SCALEKIT["PINNING_COOKIE_NAME"] is {cookie_name!r}; expected a cookie name '
            "made of letters, digits and underscores.",
            'Set SCALEKIT["PINNING_COOKIE_NAME"] = "scalekit_pin".',
        )
        cookie_name = "scalekit_pin"
    secure = raw.get("PINNING_COOKIE_SECURE")
    if secure is None:
        secure = bool(getattr(settings, "SESSION_COOKIE_SECURE", False))
    elif not isinstance(secure, bool):
        b.error(
            "scalekit.E012",
            f'SCALEKIT["PINNING_COOKIE_SECURE"] is {secure!r}; expected True, False or None.',
            "None follows SESSION_COOKIE_SECURE.",
        )
        secure = False

    retry_requests = raw.get("RETRY_ON_REPLICA_FAILURE", True)
    if not isinstance(retry_requests, bool):
        b.error(
            "scalekit.E020",
            f'SCALEKIT["RETRY_ON_REPLICA_FAILURE"] is {retry_requests!r}; '
            "expected True or False.",
            "True re-runs a read-only request's view once when its replica fails.",
        )
        retry_requests = True

    sections: dict[str, Mapping[str, Any]] = {}
    for name in SUBSECTIONS:
        value = raw.get(name, {})
        if not isinstance(value, Mapping):
            b.error(
                "scalekit.E013",
                f'SCALEKIT["{name}"] is a {type(value).__name__}; expected a dict.',
                f'Set SCALEKIT["{name}"] = {{...}} or remove the key.',
            )
            value = {}
        sections[name] = value

    # Before health: its default DATABASES include the shards.
    sharding = _build_sharding(b, sections["SHARDING"])
    default_group = ReplicaGroup.of(
        DEFAULT_GROUP, primary, dict(zip(replicas, weights, strict=True))
    )
    return Settings(
        primary=primary,
        replicas=replicas,
        default_group=default_group,
        groups=groups,
        alias_groups={
            alias: group.name
            for group in (default_group, *groups.values())
            for alias in (group.primary, *group.replicas)
        },
        app_groups=app_groups,
        model_groups=model_groups,
        pinning_seconds=pinning if pinning is not None else 5.0,
        routing_metrics=_routing_metrics(b, sections["METRICS"]),
        lsn_mode=mode == "lsn",
        simple_writes=not groups and mode != "lsn",
        lsn_check_seconds=lsn_check if lsn_check is not None else 0.2,
        pinning_cookie_name=cookie_name,
        pinning_cookie_secure=secure,
        replica_retry_seconds=retry if retry is not None else 15.0,
        retry_on_replica_failure=retry_requests,
        replica_max_lag_seconds=max_lag,
        replica_lag_check_seconds=lag_check if lag_check is not None else 5.0,
        sections=sections,
        cache=_build_cache(b, sections["CACHE"]),
        cdn=_build_cdn(b, sections["CDN"]),
        health=_build_health(b, sections["HEALTH"], groups, sharding),
        sharding=sharding,
        problems=tuple(b.problems),
    )


def _replicas(
    b: _Builder,
    value: object,
    primary: str,
    databases: Mapping[str, Any],
    key: str = 'SCALEKIT["REPLICAS"]',
) -> tuple[tuple[str, ...], tuple[float, ...]]:
    if isinstance(value, str) or not isinstance(value, (list, tuple, Mapping)):
        b.error(
            "scalekit.E004",
            f"{key} is {value!r}; expected a list of DATABASES aliases "
            "or a dict alias -> weight.",
            f'For example {key} = ["replica"] or {{"replica1": 2, "replica2": 1}}.',
        )
        return (), ()
    items: list[tuple[object, object]] = (
        list(value.items()) if isinstance(value, Mapping) else [(a, 1) for a in value]
    )
    aliases: list[str] = []
    weights: list[float] = []
    for alias, weight in items:
        if not isinstance(alias, str) or not alias:
            b.error(
                "scalekit.E004",
                f"{key} contains {alias!r}; expected DATABASES aliases (strings).",
                f'For example {key} = ["replica"].',
            )
            continue
        if alias not in databases:
            b.error(
                "scalekit.E005",
                f"{key} names {alias!r}, which is not in DATABASES.",
                f"Add DATABASES[{alias!r}] or remove it from the replicas.",
            )
            continue
        if alias == primary or alias in aliases:
            b.error(
                "scalekit.E007",
                f"{key} lists {alias!r} "
                + ("which is the primary." if alias == primary else "twice."),
                "List each replica once, and never the primary.",
            )
            continue
        if not _is_number(weight) or weight <= 0:  # type: ignore[operator]
            b.error(
                "scalekit.E006",
                f"{key}[{alias!r}] has weight {weight!r}; expected a positive number.",
                "Use weights like 1, 2 or 0.5; remove a replica instead of weighting it 0.",
            )
            continue
        aliases.append(alias)
        weights.append(float(weight))  # type: ignore[arg-type]
    return tuple(aliases), tuple(weights)


#: SCALEKIT["METRICS"] keys, their defaults and meaning (docs/settings.md).
METRICS_DEFAULTS: dict[str, tuple[object, str]] = {
    "ROUTING": (
        True,
        "Count routed queries in scalekit_router_queries_total "
        "(when prometheus_client is installed).",
    ),
}


def _routing_metrics(b: _Builder, raw: Mapping[str, Any]) -> bool:
    from django_scalekit import metrics

    b.unknown_keys(
        raw,
        METRICS_DEFAULTS,
        'SCALEKIT["METRICS"]',
        "scalekit.W501",
        "a metrics setting",
    )
    value = raw.get("ROUTING", METRICS_DEFAULTS["ROUTING"][0])
    if not isinstance(value, bool):
        b.error(
            "scalekit.E501",
            f'SCALEKIT["METRICS"]["ROUTING"] is {value!r}; expected True or False.',
            "False stops counting routed queries (scalekit_router_queries_total).",
        )
        return False
    return value and metrics.ENABLED


_GROUP_KEYS = ("PRIMARY", "REPLICAS", "APPS", "MODELS")


def _groups(
    b: _Builder, value: object, databases: Mapping[str, Any]
) -> tuple[dict[str, ReplicaGroup], dict[str, ReplicaGroup], dict[str, ReplicaGroup]]:
    groups: dict[str, ReplicaGroup] = {}
    apps: dict[str, ReplicaGroup] = {}
    models: dict[str, ReplicaGroup] = {}
    if not isinstance(value, Mapping):
        b.error(
            "scalekit.E014",
            f'SCALEKIT["GROUPS"] is a {type(value).__name__}; expected a dict '
            "group name -> {PRIMARY, REPLICAS, APPS, MODELS}.",
            'For example SCALEKIT["GROUPS"] = {"analytics": {"PRIMARY": "analytics", '
            '"REPLICAS": ["analytics_replica"], "APPS": ["reports"]}}.',
        )
        return groups, apps, models
    used: set[str] = set()
    for name, spec in value.items():
        key = f'SCALEKIT["GROUPS"][{name!r}]'
        if (
            not isinstance(name, str)
            or name == DEFAULT_GROUP
            or not isinstance(spec, Mapping)
        ):
            b.error(
                "scalekit.E014",
                f"{key} must be a dict under a name other than {DEFAULT_GROUP!r}.",
                f'For example {key} = {{"PRIMARY": "analytics", "APPS": ["reports"]}}.',
            )
            continue
        b.unknown_keys(spec, _GROUP_KEYS, key, "scalekit.W001", "a group setting")
        primary = spec.get("PRIMARY")
        if not isinstance(primary, str) or primary not in databases:
            b.error(
                "scalekit.E015",
                f'{key}["PRIMARY"] is {primary!r}; expected an alias in DATABASES.',
                "Name the database that receives this group's writes.",
            )
            continue
        replicas, weights = _replicas(
            b, spec.get("REPLICAS", ()), primary, databases, key=f'{key}["REPLICAS"]'
        )
        group = ReplicaGroup.of(
            name, primary, dict(zip(replicas, weights, strict=True))
        )
        aliases = {primary, *replicas}
        if aliases & used:
            b.error(
                "scalekit.E016",
                f"{key} uses {sorted(aliases & used)!r}, which another group also uses.",
                "Each database belongs to one group: give each group its own aliases.",
            )
            continue
        used |= aliases
        groups[name] = group
        for option, table in (("APPS", apps), ("MODELS", models)):
            labels = spec.get(option, ())
            if isinstance(labels, str) or not isinstance(labels, (list, tuple)):
                labels = [labels]
            for label in labels:
                if not isinstance(label, str) or (
                    option == "MODELS" and "." not in label
                ):
                    b.error(
                        "scalekit.E017",
                        f"{key}[{option!r}] contains {label!r}; expected "
                        + (
                            "app labels."
                            if option == "APPS"
                            else '"app_label.ModelName" strings.'
                        ),
                        f'For example {key}["APPS"] = ["reports"] or '
                        f'{key}["MODELS"] = ["shop.Event"].',
                    )
                    continue
                label = label.lower()
                if label in table:
                    b.error(
                        "scalekit.E017",
                        f"{label!r} is in the {option} of two groups: "
                        f"{table[label].name!r} and {name!r}.",
                        "Give each app or model to one group.",
                    )
                    continue
                table[label] = group
    return groups, apps, models


# --- SCALEKIT["CACHE"]: two-level cache (checks scalekit.E2xx/W2xx) ---------


#: ``SCALEKIT["CACHE"]`` keys, defaults and meanings (docs/cache.md's
#: settings table is tested against this).
CACHE_DEFAULTS: dict[str, tuple[object, str]] = {
    "L2": ("default", "CACHES alias of the shared cache (django-redis)."),
    "L1": (
        None,
        "None: a per-process dict set up by django-scalekit; or a CACHES alias.",
    ),
    "TIMEOUT": (300.0, "Default L2 lifetime of a value in seconds; None: no expiry."),
    "L1_TIMEOUT": (
        5.0,
        "How long a process keeps its own copy; bounds staleness; 0 disables L1.",
    ),
    "L1_MAX_ENTRIES": (10_000, "Entries kept in each process's L1 before evicting."),
    "KEY_PREFIX": ("scalekit", "Start of every key this cache writes in L2."),
    "LOCK_TIMEOUT": (
        5.0,
        "Life of the lock that lets one process compute a missing value, "
        "renewed while it computes: how long a crashed holder delays others; "
        "callers wait for a live holder up to 6 times this.",
    ),
    "CIRCUIT_RETRY_SECONDS": (
        5.0,
        "After an L2 error, calls skip L2 this long before one retries.",
    ),
    "EARLY_REFRESH_BETA": (
        1.0,
        "Probabilistic early refresh strength (XFetch beta); 0 disables.",
    ),
    "WARMERS": ((), "Dotted paths of cache warmers run by manage.py warm_cache."),
    "PRIMARY_AFTER_INVALIDATE_SECONDS": (
        None,
        "Recompute a key on the primary this long after its invalidate(); "
        "None: PINNING_SECONDS; 0: off.",
    ),
}


@dataclass(frozen=True)
class CacheSettings:
    """Typed ``SCALEKIT["CACHE"]``."""

    l2: str = "default"
    l1: str | None = None
    timeout: float | None = 300.0
    l1_timeout: float = 5.0
    l1_max_entries: int = 10_000
    key_prefix: str = "scalekit"
    lock_timeout: float = 5.0
    circuit_retry_seconds: float = 5.0
    early_refresh_beta: float = 1.0
    warmers: tuple[str, ...] = ()
    #: None: the top-level PINNING_SECONDS (resolved by the cache).
    primary_after_invalidate: float | None = None


def _build_cache(b: _Builder, raw: Mapping[str, Any]) -> CacheSettings:
    caches: Mapping[str, Any] = getattr(settings, "CACHES", {})
    default = CacheSettings()

    b.unknown_keys(
        raw, CACHE_DEFAULTS, 'SCALEKIT["CACHE"]', "scalekit.W201", "a cache setting"
    )

    l2 = raw.get("L2", "default")
    if not isinstance(l2, str) or l2 not in caches:
        b.error(
            "scalekit.E201",
            f'SCALEKIT["CACHE"]["L2"] is {l2!r}, which is not an alias in CACHES.',
            "Name one of: " + ", ".join(map(repr, caches)) + " (a django-redis cache).",
        )
        l2 = "default"
    l1 = raw.get("L1")
    if l1 is not None and (not isinstance(l1, str) or l1 not in caches):
        b.error(
            "scalekit.E202",
            f'SCALEKIT["CACHE"]["L1"] is {l1!r}; expected None (a per-process store '
            "set up by django-scalekit) or an alias in CACHES.",
            'Remove SCALEKIT["CACHE"]["L1"] to use the built-in store.',
        )
        l1 = None

    def seconds(key: str, *, allow_zero: bool, allow_none: bool = False) -> Any:
        value = raw.get(key, CACHE_DEFAULTS[key][0])
        if value is None and allow_none:
            return None
        if not _is_number(value) or value < 0 or (value == 0 and not allow_zero):
            expected = "a number of seconds " + (">= 0" if allow_zero else "> 0")
            b.error(
                "scalekit.E203",
                f'SCALEKIT["CACHE"]["{key}"] is {value!r}; expected {expected}'
                + (" or None." if allow_none else "."),
                f'Set SCALEKIT["CACHE"]["{key}"] to, for example, {CACHE_DEFAULTS[key][0]}.',
            )
            return CACHE_DEFAULTS[key][0]
        return float(value)

    timeout = seconds("TIMEOUT", allow_zero=False, allow_none=True)
    l1_timeout = seconds("L1_TIMEOUT", allow_zero=True)
    lock_timeout = seconds("LOCK_TIMEOUT", allow_zero=False)
    retry = seconds("CIRCUIT_RETRY_SECONDS", allow_zero=False)
    primary_after = seconds(
        "PRIMARY_AFTER_INVALIDATE_SECONDS", allow_zero=True, allow_none=True
    )

    max_entries = raw.get("L1_MAX_ENTRIES", default.l1_max_entries)
    if (
        not isinstance(max_entries, int)
        or isinstance(max_entries, bool)
        or max_entries < 1
    ):
        b.error(
            "scalekit.E204",
            f'SCALEKIT["CACHE"]["L1_MAX_ENTRIES"] is {max_entries!r}; expected an int >= 1.',
            'Set SCALEKIT["CACHE"]["L1_MAX_ENTRIES"] = 10000, or L1_TIMEOUT = 0 to disable L1.',
        )
        max_entries = default.l1_max_entries
    prefix = raw.get("KEY_PREFIX", default.key_prefix)
    if not isinstance(prefix, str) or not prefix or any(c.isspace() for c in prefix):
        b.error(
            "scalekit.E205",
            f'SCALEKIT["CACHE"]["KEY_PREFIX"] is {prefix!r}; expected a non-empty '
            "string without spaces.",
            'Set SCALEKIT["CACHE"]["KEY_PREFIX"] = "scalekit".',
        )
        prefix = default.key_prefix
    beta = raw.get("EARLY_REFRESH_BETA", default.early_refresh_beta)
    if not _is_number(beta) or beta < 0:
        b.error(
            "scalekit.E206",
            f'SCALEKIT["CACHE"]["EARLY_REFRESH_BETA"] is {beta!r}; expected a number >= 0.',
            "1.0 refreshes hot keys shortly before they expire; 0 disables early refresh.",
        )
        beta = default.early_refresh_beta
    warmers = raw.get("WARMERS", ())
    if (
        isinstance(warmers, str)
        or not isinstance(warmers, (list, tuple))
        or not all(isinstance(w, str) and w for w in warmers)
    ):
        b.error(
            "scalekit.E207",
            f'SCALEKIT["CACHE"]["WARMERS"] is {warmers!r}; expected a list of dotted '
            "paths to warmer functions.",
            'For example SCALEKIT["CACHE"]["WARMERS"] = ["shop.cache.warm_products"].',
        )
        warmers = ()

    return CacheSettings(
        l2=l2,
        l1=l1,
        timeout=timeout,
        l1_timeout=l1_timeout,
        l1_max_entries=max_entries,
        key_prefix=prefix,
        lock_timeout=lock_timeout,
        circuit_retry_seconds=retry,
        early_refresh_beta=float(beta),
        warmers=tuple(warmers),
        primary_after_invalidate=primary_after,
    )


# --- SCALEKIT["CDN"]: cache-header middleware (checks scalekit.E3xx/W3xx) ---

CDN_CACHE_MODES = ("public", "private", "no-cache", "no-store")
CDN_TARGETED_HEADERS = ("CDN-Cache-Control", "Surrogate-Control")
CDN_TAG_HEADERS = ("Surrogate-Key", "Cache-Tag")
#: Tags go into headers and Varnish ban expressions: keep them plain tokens.
CDN_TAG_RE = re.compile(r"^[A-Za-z0-9_.:\-]{1,128}$")

CDN_DEFAULTS: dict[str, tuple[object, str]] = {
    "RULES": (
        [
            {
                "PREFIX": "/api/",
                "CACHE": "public",
                "MAX_AGE": 60,
                "STALE_WHILE_REVALIDATE": 30,
            }
        ],
        "Ordered rules (first match wins): a PREFIX or REGEX and a policy.",
    ),
    "DEFAULT": ({"CACHE": "no-cache"}, "Policy of paths no rule matches (HTML pages)."),
    "STATIC_PREFIX": (None, "Path prefix of static files; None follows STATIC_URL."),
    "STATIC_MAX_AGE": (
        60,
        "max-age of static files whose names carry no content hash.",
    ),
    "FINGERPRINT_REGEX": (
        r"\.[0-9a-f]{12}\.[A-Za-z0-9]+$",
        "Matches static file names that carry a content hash.",
    ),
    "CACHEABLE_STATUSES": (
        [200, 203, 204, 300, 301, 304, 308],
        "Statuses a rule may make cacheable; others get no-store.",
    ),
    "PRIVATE_REQUEST_HEADERS": (
        ["Authorization"],
        "A request carrying one of these never gets a public response.",
    ),
    "TARGETED_HEADERS": ([], "Also emit CDN-Cache-Control and/or Surrogate-Control."),
    "TAG_HEADER": ("Surrogate-Key", "Header carrying cache tags, or None."),
    "PURGE": (
        {"BACKEND": "django_scalekit.cdn.NoOpPurgeBackend", "OPTIONS": {}},
        "Purge backend (dotted path) and its options.",
    ),
}

_POLICY_KEYS = (
    "CACHE",
    "MAX_AGE",
    "S_MAXAGE",
    "STALE_WHILE_REVALIDATE",
    "STALE_IF_ERROR",
    "IMMUTABLE",
    "TAGS",
)


@dataclass(frozen=True)
class CDNPolicy:
    """One caching policy, with its header values rendered once."""

    cache: str = "no-cache"
    max_age: int | None = None
    s_maxage: int | None = None
    stale_while_revalidate: int | None = None
    stale_if_error: int | None = None
    immutable: bool = False
    tags: tuple[str, ...] = ()
    #: ``Cache-Control`` when nothing makes the response per-user.
    cache_control: str = "no-cache"
    #: ``Cache-Control`` for a per-user response: never public, no s-maxage.
    private_cache_control: str = "private, no-cache"
    #: ``CDN-Cache-Control``/``Surrogate-Control`` value (public policies only).
    targeted: str | None = None

    @property
    def public(self) -> bool:
        return self.cache == "public"


def cdn_policy(
    cache: str = "no-cache",
    *,
    max_age: int | None = None,
    s_maxage: int | None = None,
    stale_while_revalidate: int | None = None,
    stale_if_error: int | None = None,
    immutable: bool = False,
    tags: tuple[str, ...] = (),
) -> CDNPolicy:
    """Build a :class:`CDNPolicy` with its header values rendered."""
    age = f"max-age={max_age}" if max_age is not None else ""
    shared = f"s-maxage={s_maxage}" if s_maxage is not None else ""
    extra = [
        f"stale-while-revalidate={stale_while_revalidate}"
        if stale_while_revalidate is not None
        else "",
        f"stale-if-error={stale_if_error}" if stale_if_error is not None else "",
    ]
    tail = [age, *extra, "immutable" if immutable else ""]
    if cache == "no-store":
        cc = private_cc = "no-store"
    else:
        cc = ", ".join(d for d in [cache, age, shared, *tail[1:]] if d)
        # Decided here, before any header exists: a per-user response is
        # private and never carries s-maxage (RFC 9111 section 5.2.2.10).
        private = ["private", "no-cache"] if cache == "no-cache" else ["private"]
        private_cc = ", ".join(d for d in [*private, *tail] if d)
    targeted = None
    if cache == "public" and (s_maxage is not None or max_age is not None):
        cdn_age = s_maxage if s_maxage is not None else max_age
        targeted = ", ".join(d for d in [f"max-age={cdn_age}", *extra] if d)
    return CDNPolicy(
        cache,
        max_age,
        s_maxage,
        stale_while_revalidate,
        stale_if_error,
        immutable,
        tags,
        cc,
        private_cc,
        targeted,
    )


@dataclass(frozen=True)
class CDNRule:
    """A path matcher (prefix or compiled regex) and its policy."""

    prefix: str | None
    regex: re.Pattern[str] | None
    policy: CDNPolicy

    def matches(self, path: str) -> bool:
        if self.prefix is not None:
            return path.startswith(self.prefix)
        assert self.regex is not None
        return self.regex.search(path) is not None


@dataclass(frozen=True)
class CDNSettings:
    """Typed ``SCALEKIT["CDN"]``, with rules compiled and headers rendered."""

    rules: tuple[CDNRule, ...] = ()
    default: CDNPolicy = field(default_factory=lambda: cdn_policy("no-cache"))
    static_prefix: str | None = "/static/"
    fingerprinted: CDNPolicy = field(
        default_factory=lambda: cdn_policy("public", max_age=31536000, immutable=True)
    )
    unfingerprinted: CDNPolicy = field(
        default_factory=lambda: cdn_policy("public", max_age=60)
    )
    fingerprint_regex: re.Pattern[str] = re.compile(r"\.[0-9a-f]{12}\.[A-Za-z0-9]+$")
    cacheable_statuses: frozenset[int] = frozenset({200, 203, 204, 300, 301, 304, 308})
    #: Request headers (``request.META`` keys) that make a response per-user.
    private_request_meta: tuple[str, ...] = ("HTTP_AUTHORIZATION",)
    #: Lower-cased header names that, in ``Vary``, make a response per-user
    #: when the request carried them.
    private_vary: frozenset[str] = frozenset({"cookie", "authorization"})
    #: ``PRIVATE_REQUEST_HEADERS`` as written, added to ``Vary`` of shared
    #: responses so no cache answers a request carrying one with them.
    vary_on_private: tuple[str, ...] = ("Authorization",)
    targeted_headers: tuple[str, ...] = ()
    tag_header: str | None = "Surrogate-Key"
    purge_backend: type[Any] | None = None
    purge_options: Mapping[str, Any] = field(default_factory=dict)


def _non_negative_int(
    b: _Builder, value: object, where: str, *, allow_none: bool = True
) -> int | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        b.error(
            "scalekit.E305",
            f"{where} is {value!r}; expected a whole number of seconds >= 0"
            + (" or None." if allow_none else "."),
            f"Set {where} = 60, for example.",
        )
        return None
    return value


def _cdn_tags(b: _Builder, value: object, where: str) -> tuple[str, ...]:
    if isinstance(value, str) or not isinstance(value, (list, tuple)):
        b.error(
            "scalekit.E307",
            f"{where} is {value!r}; expected a list of tags.",
            f'Set {where} = ["products"], for example.',
        )
        return ()
    bad = [t for t in value if not isinstance(t, str) or not CDN_TAG_RE.fullmatch(t)]
    if bad:
        b.error(
            "scalekit.E307",
            f"{where} contains {bad!r}; tags are 1-128 letters, digits, '_', '.', ':' or '-'.",
            "Use plain tokens such as 'product:42'.",
        )
    return tuple(t for t in value if t not in bad)


def _cdn_policy(b: _Builder, raw: object, where: str, *, rule: bool) -> CDNPolicy:
    if not isinstance(raw, Mapping):
        b.error(
            "scalekit.E301",
            f"{where} is {raw!r}; expected a dict.",
            f'For example {where} = {{"CACHE": "public", "MAX_AGE": 60}}.',
        )
        return cdn_policy("no-store")
    known = (*_POLICY_KEYS, "PREFIX", "REGEX") if rule else _POLICY_KEYS
    b.unknown_keys(raw, known, where, "scalekit.W301", "a CDN policy key")
    cache = raw.get("CACHE", "no-cache")
    if cache not in CDN_CACHE_MODES:
        b.error(
            "scalekit.E304",
            f'{where}["CACHE"] is {cache!r}; expected one of '
            + ", ".join(map(repr, CDN_CACHE_MODES))
            + ".",
            'Use "public" for shared pages, "private" for per-user ones.',
        )
        cache = "no-store"
    ages = {
        key: _non_negative_int(b, raw.get(key), f'{where}["{key}"]')
        for key in ("MAX_AGE", "S_MAXAGE", "STALE_WHILE_REVALIDATE", "STALE_IF_ERROR")
    }
    if ages["S_MAXAGE"] is not None and cache != "public":
        b.error(
            "scalekit.E306",
            f'{where} sets "S_MAXAGE" with CACHE {cache!r}: s-maxage lets shared '
            "caches store the response, which only a public policy may allow.",
            f'Set {where}["CACHE"] = "public" or remove "S_MAXAGE".',
        )
        ages["S_MAXAGE"] = None
    immutable = raw.get("IMMUTABLE", False)
    if not isinstance(immutable, bool):
        b.error(
            "scalekit.E305",
            f'{where}["IMMUTABLE"] is {immutable!r}; expected True or False.',
        )
        immutable = False
    return cdn_policy(
        cache,
        max_age=ages["MAX_AGE"],
        s_maxage=ages["S_MAXAGE"],
        stale_while_revalidate=ages["STALE_WHILE_REVALIDATE"],
        stale_if_error=ages["STALE_IF_ERROR"],
        immutable=immutable,
        tags=_cdn_tags(b, raw.get("TAGS", ()), f'{where}["TAGS"]'),
    )


def _cdn_regex(b: _Builder, value: object, where: str) -> re.Pattern[str] | None:
    try:
        if not isinstance(value, str):
            raise TypeError("not a string")
        return re.compile(value)
    except (re.error, TypeError) as exc:
        b.error(
            "scalekit.E303",
            f"{where} is {value!r}, which is not a regular expression: {exc}.",
            "Fix the pattern; it is matched with re.search against request.path.",
        )
        return None


def _cdn_rules(b: _Builder, value: object) -> tuple[CDNRule, ...]:
    if isinstance(value, (str, Mapping)) or not isinstance(value, (list, tuple)):
        b.error(
            "scalekit.E301",
            f'SCALEKIT["CDN"]["RULES"] is {value!r}; expected a list of dicts.',
            'For example [{"PREFIX": "/api/", "CACHE": "public", "MAX_AGE": 60}].',
        )
        return ()
    rules = []
    for index, raw in enumerate(value):
        where = f'SCALEKIT["CDN"]["RULES"][{index}]'
        policy = _cdn_policy(b, raw, where, rule=True)
        if not isinstance(raw, Mapping):
            continue
        prefix, regex = raw.get("PREFIX"), raw.get("REGEX")
        if (prefix is None) == (regex is None):
            b.error(
                "scalekit.E302",
                f'{where} needs exactly one of "PREFIX" and "REGEX".',
                'For example {"PREFIX": "/api/", ...} or {"REGEX": r"^/p/\\d+/$", ...}.',
            )
            continue
        if prefix is not None:
            if not isinstance(prefix, str) or not prefix.startswith("/"):
                b.error(
                    "scalekit.E302",
                    f'{where}["PREFIX"] is {prefix!r}; expected a path starting with "/".',
                    'For example "/api/".',
                )
                continue
            rules.append(CDNRule(prefix, None, policy))
        else:
            compiled = _cdn_regex(b, regex, f'{where}["REGEX"]')
            if compiled is not None:
                rules.append(CDNRule(None, compiled, policy))
    return tuple(rules)


def _static_prefix(b: _Builder, value: object) -> str | None:
    if value is None:
        static_url = getattr(settings, "STATIC_URL", None)
        if not static_url:
            return None
        # A STATIC_URL on another host (a CDN) is not served by Django.
        path = str(static_url)
        if "://" in path or path.startswith("//"):
            return None
        return path if path.startswith("/") else "/" + path
    if value is False or value == "":
        return None
    if not isinstance(value, str) or not value.startswith("/"):
        b.error(
            "scalekit.E302",
            f'SCALEKIT["CDN"]["STATIC_PREFIX"] is {value!r}; expected a path starting '
            'with "/", False or None.',
            "None follows STATIC_URL.",
        )
        return None
    return value


def _build_cdn(b: _Builder, raw: Mapping[str, Any]) -> CDNSettings:
    b.unknown_keys(
        raw, CDN_DEFAULTS, 'SCALEKIT["CDN"]', "scalekit.W301", "a CDN setting"
    )

    def get(key: str) -> Any:
        return raw.get(key, CDN_DEFAULTS[key][0])

    rules = _cdn_rules(b, get("RULES"))
    default = _cdn_policy(b, get("DEFAULT"), 'SCALEKIT["CDN"]["DEFAULT"]', rule=False)
    static_max_age = _non_negative_int(
        b, get("STATIC_MAX_AGE"), 'SCALEKIT["CDN"]["STATIC_MAX_AGE"]', allow_none=False
    )
    fingerprint = _cdn_regex(
        b, get("FINGERPRINT_REGEX"), 'SCALEKIT["CDN"]["FINGERPRINT_REGEX"]'
    )

    statuses = get("CACHEABLE_STATUSES")
    if (
        isinstance(statuses, str)
        or not isinstance(statuses, (list, tuple, set, frozenset))
        or not all(
            isinstance(s, int) and not isinstance(s, bool) and 100 <= s <= 599
            for s in statuses
        )
    ):
        b.error(
            "scalekit.E310",
            f'SCALEKIT["CDN"]["CACHEABLE_STATUSES"] is {statuses!r}; expected a list '
            "of HTTP status codes.",
            "For example [200, 203, 204, 300, 301, 304, 308].",
        )
        statuses = CDN_DEFAULTS["CACHEABLE_STATUSES"][0]
    bad_errors = sorted(s for s in statuses if s >= 500)
    if bad_errors:
        b.error(
            "scalekit.E310",
            f'SCALEKIT["CDN"]["CACHEABLE_STATUSES"] contains {bad_errors}: a server '
            "error must never be cached as a page.",
            "Remove the 5xx statuses; stale-if-error covers errors.",
        )
        statuses = [s for s in statuses if s < 500]

    private_headers = get("PRIVATE_REQUEST_HEADERS")
    if isinstance(private_headers, str) or not (
        isinstance(private_headers, (list, tuple))
        and all(isinstance(h, str) and h for h in private_headers)
    ):
        b.error(
            "scalekit.E312",
            f'SCALEKIT["CDN"]["PRIVATE_REQUEST_HEADERS"] is {private_headers!r}; '
            "expected a list of header names.",
            'For example ["Authorization", "X-Api-Key"].',
        )
        private_headers = ["Authorization"]
    if "authorization" not in {h.lower() for h in private_headers}:
        # RFC 9111 section 3.5: a public directive would let shared caches
        # store answers to authenticated requests.
        private_headers = ["Authorization", *private_headers]
    vary_on_private: dict[str, str] = {}
    for header in private_headers:
        vary_on_private.setdefault(header.lower(), header)

    targeted = get("TARGETED_HEADERS")
    if isinstance(targeted, str) or not (
        isinstance(targeted, (list, tuple))
        and all(h in CDN_TARGETED_HEADERS for h in targeted)
    ):
        b.error(
            "scalekit.E308",
            f'SCALEKIT["CDN"]["TARGETED_HEADERS"] is {targeted!r}; expected a list '
            "made of " + " and ".join(map(repr, CDN_TARGETED_HEADERS)) + ".",
            'For example ["CDN-Cache-Control"] (RFC 9213).',
        )
        targeted = []
    tag_header = get("TAG_HEADER")
    if tag_header is not None and tag_header not in CDN_TAG_HEADERS:
        b.error(
            "scalekit.E309",
            f'SCALEKIT["CDN"]["TAG_HEADER"] is {tag_header!r}; expected '
            + " or ".join(map(repr, CDN_TAG_HEADERS))
            + " or None.",
            '"Surrogate-Key" for Fastly and Varnish, "Cache-Tag" for Cloudflare.',
        )
        tag_header = None

    purge = get("PURGE")
    backend_cls: type[Any] | None = None
    options: Mapping[str, Any] = {}
    if not isinstance(purge, Mapping) or not isinstance(
        purge.get("OPTIONS", {}), Mapping
    ):
        b.error(
            "scalekit.E311",
            f'SCALEKIT["CDN"]["PURGE"] is {purge!r}; expected a dict with "BACKEND" '
            'and "OPTIONS".',
            'For example {"BACKEND": "django_scalekit.cdn.HTTPPurgeBackend", '
            '"OPTIONS": {"ENDPOINTS": ["http://127.0.0.1:6081"]}}.',
        )
    else:
        from django.utils.module_loading import import_string

        path = purge.get("BACKEND", "django_scalekit.cdn.NoOpPurgeBackend")
        options = purge.get("OPTIONS", {})
        try:
            backend_cls = import_string(path)
        except ImportError as exc:
            b.error(
                "scalekit.E311",
                f'SCALEKIT["CDN"]["PURGE"]["BACKEND"] is {path!r}, which cannot be '
                f"imported: {exc}.",
                'Use "django_scalekit.cdn.HTTPPurgeBackend" or a dotted path to a class.',
            )

    fingerprinted = cdn_policy("public", max_age=31536000, immutable=True)
    return CDNSettings(
        rules=rules,
        default=default,
        static_prefix=_static_prefix(b, get("STATIC_PREFIX")),
        fingerprinted=fingerprinted,
        unfingerprinted=cdn_policy(
            "public", max_age=static_max_age if static_max_age is not None else 60
        ),
        fingerprint_regex=fingerprint or CDNSettings.fingerprint_regex,
        cacheable_statuses=frozenset(statuses),
        private_request_meta=tuple(
            "HTTP_" + h.upper().replace("-", "_") for h in private_headers
        ),
        private_vary=frozenset({"cookie", *(h.lower() for h in private_headers)}),
        vary_on_private=tuple(vary_on_private.values()),
        targeted_headers=tuple(targeted),
        tag_header=tag_header,
        purge_backend=backend_cls,
        purge_options=dict(options),
    )


# --- SCALEKIT["HEALTH"]: health checks (checks scalekit.E4xx/W4xx) ----------

HEALTH_DEFAULTS: dict[str, tuple[object, str]] = {
    "DATABASES": (
        None,
        "Aliases checked with SELECT 1; None: PRIMARY, REPLICAS, GROUPS and shards.",
    ),
    "CACHES": (
        None,
        "Cache aliases checked with a set/get; None: every alias in CACHES.",
    ),
    "CHECKS": ([], "Custom checks: dotted paths, or a dict name -> dotted path."),
    "NON_CRITICAL": (
        None,
        "Checks that only warn when failing; None: every replica and cache.",
    ),
    "TIMEOUT": (2.0, "One budget in seconds for all checks, which run concurrently."),
    "CACHE_SECONDS": (
        0.0,
        "Readiness reuses its last result this long (per process); 0 checks every probe.",
    ),
    "REPLICA_LAG_WARN_SECONDS": (30.0, "A replica lagging more than this warns."),
    "TOKEN": (None, "Requests with `Authorization: Bearer <TOKEN>` see details."),
    "DETAILS_NETWORKS": ([], "Clients in these networks (CIDR) see details."),
    "LIVE_PATH": ("/health/live/", "Path of the liveness endpoint."),
    "READY_PATH": ("/health/", "Path of the readiness endpoint."),
    "DRAIN_SECONDS": (
        5.0,
        "After SIGTERM, readiness answers 503 while requests are still served "
        "this long; above the balancer's inter x fall.",
    ),
}


@dataclass(frozen=True)
class HealthSettings:
    """Typed ``SCALEKIT["HEALTH"]``, with custom checks imported."""

    databases: tuple[str, ...] = ("default",)
    caches: tuple[str, ...] = ()
    #: (name, callable) of each custom check.
    checks: tuple[tuple[str, Any], ...] = ()
    #: Names of checks whose failure only warns ("db:replica", "cache:default", ...).
    non_critical: frozenset[str] = frozenset()
    replicas: frozenset[str] = frozenset()
    timeout: float = 2.0
    cache_seconds: float = 0.0
    replica_lag_warn_seconds: float = 30.0
    token: str | None = None
    details_networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    live_path: str = "/health/live/"
    ready_path: str = "/health/"
    #: Both paths, for the middleware's one lookup.
    paths: frozenset[str] = frozenset({"/health/live/", "/health/"})
    drain_seconds: float = 5.0


def _health_aliases(
    b: _Builder, value: object, key: str, known: Mapping[str, Any], id: str
) -> tuple[str, ...] | None:
    if value is None:
        return None
    if isinstance(value, str) or not isinstance(value, (list, tuple)):
        b.error(
            id,
            f'SCALEKIT["HEALTH"]["{key}"] is {value!r}; expected a list of aliases or None.',
            f'For example SCALEKIT["HEALTH"]["{key}"] = ["default"].',
        )
        return None
    aliases = []
    for alias in value:
        if alias not in known:
            b.error(
                id,
                f'SCALEKIT["HEALTH"]["{key}"] names {alias!r}, which is not in {key}.',
                f"Name one of: {', '.join(map(repr, known))}.",
            )
        else:
            aliases.append(alias)
    return tuple(aliases)


def _health_checks(b: _Builder, value: object) -> tuple[tuple[str, Any], ...]:
    from django.utils.module_loading import import_string

    if isinstance(value, Mapping):
        items = list(value.items())
    elif isinstance(value, (list, tuple)):
        items = [(p.rpartition(".")[2] if isinstance(p, str) else p, p) for p in value]
    else:
        b.error(
            "scalekit.E403",
            f'SCALEKIT["HEALTH"]["CHECKS"] is {value!r}; expected a list of dotted '
            "paths or a dict name -> dotted path.",
            'For example ["myproject.health.queue_reachable"].',
        )
        return ()
    checks = []
    for name, path in items:
        try:
            if not isinstance(path, str) or not isinstance(name, str):
                raise ImportError("expected a dotted path (a string)")
            func = import_string(path)
            if not callable(func):
                raise ImportError("it is not callable")
        except ImportError as exc:
            b.error(
                "scalekit.E403",
                f'SCALEKIT["HEALTH"]["CHECKS"] entry {path!r} cannot be used: {exc}.',
                "Give the dotted path to a function taking no arguments.",
            )
            continue
        checks.append((name, func))
    return tuple(checks)


def _health_path(b: _Builder, value: object, key: str) -> str:
    default = str(HEALTH_DEFAULTS[key][0])
    if not isinstance(value, str) or not value.startswith("/"):
        b.error(
            "scalekit.E408",
            f'SCALEKIT["HEALTH"]["{key}"] is {value!r}; expected a path starting with "/".',
            f'For example "{default}".',
        )
        return default
    return value


def _build_health(
    b: _Builder,
    raw: Mapping[str, Any],
    groups: Mapping[str, ReplicaGroup],
    sharding: ShardingSettings,
) -> HealthSettings:
    b.unknown_keys(
        raw, HEALTH_DEFAULTS, 'SCALEKIT["HEALTH"]', "scalekit.W401", "a health setting"
    )

    def get(key: str) -> Any:
        return raw.get(key, HEALTH_DEFAULTS[key][0])

    databases: Mapping[str, Any] = getattr(settings, "DATABASES", {})
    caches: Mapping[str, Any] = getattr(settings, "CACHES", {})
    # The router's aliases, as build() validated them (errors reported there).
    primary = b.raw.get("PRIMARY", "default")
    raw_replicas = b.raw.get("REPLICAS", ())
    replicas = tuple(
        a
        for a in (
            raw_replicas if isinstance(raw_replicas, (list, tuple, Mapping)) else ()
        )
        if isinstance(a, str) and a in databases and a != primary
    )
    # Every database the routers use: GROUPS, then shards; replicas of all.
    primaries = [primary, *(g.primary for g in groups.values())]
    for shard_group in sharding.groups.values():
        primaries.extend(shard_group.shards)
    replicas += tuple(r for g in groups.values() for r in g.replicas)
    replicas += tuple(
        r
        for shard_group in sharding.groups.values()
        for replica_group in shard_group.replica_groups.values()
        for r in replica_group.replicas
    )
    replicas = tuple(dict.fromkeys(a for a in replicas if a not in primaries))
    db_aliases = _health_aliases(
        b, get("DATABASES"), "DATABASES", databases, "scalekit.E401"
    )
    if db_aliases is None:
        db_aliases = tuple(
            a for a in dict.fromkeys((*primaries, *replicas)) if a in databases
        )
    cache_aliases = _health_aliases(b, get("CACHES"), "CACHES", caches, "scalekit.E402")
    if cache_aliases is None:
        cache_aliases = tuple(caches)
    checks = _health_checks(b, get("CHECKS"))

    names = {f"db:{a}" for a in db_aliases} | {f"cache:{a}" for a in cache_aliases}
    names |= {name for name, _ in checks}
    non_critical = get("NON_CRITICAL")
    if non_critical is None:
        # Replicas (the router falls back to the primary) and caches (the
        # two-level cache serves without Redis): their failure must not take
        # every instance out of the load balancer at once.
        non_critical = [f"db:{a}" for a in replicas if a in db_aliases]
        non_critical += [f"cache:{a}" for a in cache_aliases]
    elif isinstance(non_critical, str) or not isinstance(non_critical, (list, tuple)):
        b.error(
            "scalekit.E407",
            f'SCALEKIT["HEALTH"]["NON_CRITICAL"] is {non_critical!r}; expected a list '
            "of check names or None.",
            'For example ["db:replica", "cache:default"].',
        )
        non_critical = []
    else:
        unknown = [n for n in non_critical if n not in names]
        if unknown:
            b.error(
                "scalekit.E407",
                f'SCALEKIT["HEALTH"]["NON_CRITICAL"] names {unknown!r}, which are not checks.',
                "Checks: " + ", ".join(sorted(names)) + ".",
            )

    timeout = get("TIMEOUT")
    if not _is_number(timeout) or timeout <= 0:
        b.error(
            "scalekit.E404",
            f'SCALEKIT["HEALTH"]["TIMEOUT"] is {timeout!r}; expected a number of seconds > 0.',
            "Keep it below the load balancer's probe timeout, e.g. 2.",
        )
        timeout = 2.0
    cache_seconds = get("CACHE_SECONDS")
    if not _is_number(cache_seconds) or cache_seconds < 0:
        b.error(
            "scalekit.E411",
            f'SCALEKIT["HEALTH"]["CACHE_SECONDS"] is {cache_seconds!r}; expected a '
            "number of seconds >= 0.",
            "Below the load balancer's check interval, e.g. 1; 0 checks every probe.",
        )
        cache_seconds = 0.0
    lag = get("REPLICA_LAG_WARN_SECONDS")
    if not _is_number(lag) or lag <= 0:
        b.error(
            "scalekit.E409",
            f'SCALEKIT["HEALTH"]["REPLICA_LAG_WARN_SECONDS"] is {lag!r}; expected a '
            "number of seconds > 0.",
            "For example 30.",
        )
        lag = 30.0

    token = get("TOKEN")
    if token is not None and (not isinstance(token, str) or not token):
        b.error(
            "scalekit.E405",
            f'SCALEKIT["HEALTH"]["TOKEN"] is {token!r}; expected a non-empty string or None.',
            "Read it from the environment, e.g. os.environ['HEALTH_TOKEN'].",
        )
        token = None
    elif token is not None and len(token) < 16:
        b.warning(
            "scalekit.W402",
            'SCALEKIT["HEALTH"]["TOKEN"] is shorter than 16 characters: it can be '
            "guessed, and it reveals hostnames and error messages.",
            'Use a random one: python -c "import secrets; print(secrets.token_urlsafe())".',
        )

    networks = []
    raw_networks = get("DETAILS_NETWORKS")
    if isinstance(raw_networks, str) or not isinstance(raw_networks, (list, tuple)):
        raw_networks = [raw_networks]
    for net in raw_networks:
        try:
            networks.append(ipaddress.ip_network(net))
        except (TypeError, ValueError) as exc:
            b.error(
                "scalekit.E406",
                f'SCALEKIT["HEALTH"]["DETAILS_NETWORKS"] contains {net!r}: {exc}.',
                'Use networks like "10.0.0.0/8" or "127.0.0.1/32".',
            )

    drain = get("DRAIN_SECONDS")
    if not _is_number(drain) or drain < 0:
        b.error(
            "scalekit.E410",
            f'SCALEKIT["HEALTH"]["DRAIN_SECONDS"] is {drain!r}; expected a number of '
            "seconds >= 0.",
            "Above the load balancer's check interval x fall count, e.g. 5; "
            "0 stops at once.",
        )
        drain = 5.0

    live = _health_path(b, get("LIVE_PATH"), "LIVE_PATH")
    ready = _health_path(b, get("READY_PATH"), "READY_PATH")
    if live == ready:
        b.error(
            "scalekit.E408",
            f'SCALEKIT["HEALTH"]["LIVE_PATH"] and ["READY_PATH"] are both {live!r}.',
            'Use "/health/live/" and "/health/".',
        )
    return HealthSettings(
        databases=db_aliases,
        caches=cache_aliases,
        checks=checks,
        non_critical=frozenset(n for n in non_critical if isinstance(n, str)),
        replicas=frozenset(replicas),
        timeout=float(timeout),
        cache_seconds=float(cache_seconds),
        replica_lag_warn_seconds=float(lag),
        token=token,
        details_networks=tuple(networks),
        live_path=live,
        ready_path=ready,
        paths=frozenset({live, ready}),
        drain_seconds=float(drain),
    )


# --- SCALEKIT["SHARDING"]: shard router (checks scalekit.E1xx/W1xx) ---------

#: ``SCALEKIT["SHARDING"]`` keys, defaults and meanings (docs/settings.md's
#: table is tested against this; a group's own keys are in docs/sharding.md).
SHARDING_DEFAULTS: dict[str, tuple[object, str]] = {
    "GROUPS": (
        {},
        "Shard groups: name -> {MAP, SHARDS, BUCKETS, REPLICAS} (docs/sharding.md).",
    ),
    "FANOUT_MAX_WORKERS": (8, "Threads one fan-out query uses at most."),
    "RESHARD_BATCH_SIZE": (1000, "Rows moved per batch by manage.py scalekit_reshard."),
}
SHARD_GROUP_KEYS = ("MAP", "SHARDS", "BUCKETS", "REPLICAS")
DEFAULT_BUCKETS = 1024
#: A shard-aware ID has 12 bits for the logical bucket.
MAX_BUCKETS = 4096


@dataclass(frozen=True)
class ShardGroup:
    """One shard group: its logical buckets and the databases holding them."""

    name: str
    buckets: int
    #: Every alias holding the group's tables (migrated there), in order.
    shards: tuple[str, ...]
    #: ``alias_by_bucket[bucket]``: the shard a bucket lives on.
    alias_by_bucket: tuple[str, ...]
    #: Shard alias -> its replica group (primary: the shard), for
    #: ``routers.route_read()``/``route_write()``.
    replica_groups: Mapping[str, ReplicaGroup]
    #: ``read_by_bucket[bucket]``: the replica group of the bucket's shard.
    read_by_bucket: tuple[ReplicaGroup, ...]


@dataclass(frozen=True)
class ShardingSettings:
    """Typed ``SCALEKIT["SHARDING"]``, with the bucket tables prepared."""

    groups: Mapping[str, ShardGroup] = field(default_factory=dict)
    #: Every shard alias and shard replica alias -> its shard's alias.
    shard_of: Mapping[str, str] = field(default_factory=dict)
    #: Shard aliases (primaries) of every group.
    shard_aliases: frozenset[str] = frozenset()
    #: Replica aliases of every shard.
    replica_aliases: frozenset[str] = frozenset()
    fanout_max_workers: int = 8
    reshard_batch_size: int = 1000


_RANGE = re.compile(r"^\s*(\d+)\s*(?:-\s*(\d+)\s*)?$")


def bucket_map(
    b: _Builder,
    raw: object,
    buckets: int,
    where: str,
    databases: Mapping[str, Any],
) -> tuple[str, ...] | None:
    """Parse a MAP ``{"0-511": "shard0", "512-1023": "shard1"}`` into a tuple
    bucket -> alias, reporting gaps, overlaps and unknown aliases on ``b``."""
    if not isinstance(raw, Mapping) or not raw:
        b.error(
            "scalekit.E103",
            f"{where} is {raw!r}; expected a dict bucket range -> alias.",
            f'For example {where} = {{"0-{buckets // 2 - 1}": "shard0", '
            f'"{buckets // 2}-{buckets - 1}": "shard1"}}.',
        )
        return None
    owner: list[str | None] = [None] * buckets
    ok = True
    for key, alias in raw.items():
        match = _RANGE.match(key) if isinstance(key, str) else None
        if isinstance(key, int) and not isinstance(key, bool):
            start = end = key
        elif match:
            start = int(match[1])
            end = int(match[2]) if match[2] is not None else start
        else:
            start, end = -1, -1
        if not 0 <= start <= end < buckets:
            b.error(
                "scalekit.E103",
                f"{where} has the key {key!r}; expected a bucket range "
                f'"start-end" (or one bucket) within 0-{buckets - 1}.',
                f'Use keys like "0-{buckets // 2 - 1}"; the group has {buckets} buckets.',
            )
            ok = False
            continue
        if not isinstance(alias, str) or alias not in databases:
            b.error(
                "scalekit.E106",
                f"{where}[{key!r}] names {alias!r}, which is not in DATABASES.",
                f"Add DATABASES[{alias!r}] or name one of: "
                + ", ".join(map(repr, databases))
                + ".",
            )
            ok = False
            continue
        overlap = sorted({o for o in owner[start : end + 1] if o is not None})
        if overlap:
            b.error(
                "scalekit.E105",
                f"{where}[{key!r}] overlaps buckets already mapped to "
                f"{', '.join(map(repr, overlap))}.",
                "Give each bucket exactly one database: make the ranges disjoint.",
            )
            ok = False
        owner[start : end + 1] = [alias] * (end - start + 1)
    gaps = _ranges(i for i, o in enumerate(owner) if o is None)
    if ok and gaps:
        b.error(
            "scalekit.E104",
            f"{where} leaves buckets {', '.join(gaps)} unmapped: keys hashing "
            "there would have no database.",
            f"Map every bucket 0-{buckets - 1} to one alias.",
        )
    if not ok or gaps:
        return None
    return tuple(o for o in owner if o is not None)


def _ranges(numbers: Any) -> list[str]:
    """``[0, 1, 2, 7]`` -> ``["0-2", "7"]``."""
    out: list[list[int]] = []
    for n in numbers:
        if out and out[-1][1] == n - 1:
            out[-1][1] = n
        else:
            out.append([n, n])
    return [f"{a}-{z}" if a != z else str(a) for a, z in out]


def _positive_int(
    b: _Builder, value: object, where: str, id: str, maximum: int | None = None
) -> int | None:
    if (
        not isinstance(value, int)
        or isinstance(value, bool)
        or value < 1
        or (maximum is not None and value > maximum)
    ):
        b.error(
            id,
            f"{where} is {value!r}; expected a whole number >= 1"
            + (f" and <= {maximum}." if maximum is not None else "."),
            "Use the default unless you know why not (docs/sharding.md).",
        )
        return None
    return value


def _shard_group(
    b: _Builder, name: str, raw: Mapping[str, Any], databases: Mapping[str, Any]
) -> ShardGroup | None:
    where = f'SCALEKIT["SHARDING"]["GROUPS"][{name!r}]'
    b.unknown_keys(
        raw, SHARD_GROUP_KEYS, where, "scalekit.W102", "a shard group setting"
    )
    buckets = _positive_int(
        b,
        raw.get("BUCKETS", DEFAULT_BUCKETS),
        f'{where}["BUCKETS"]',
        "scalekit.E102",
        MAX_BUCKETS,
    )
    if buckets is None:
        return None
    alias_by_bucket = bucket_map(
        b, raw.get("MAP"), buckets, f'{where}["MAP"]', databases
    )
    mapped = list(dict.fromkeys(alias_by_bucket or ()))
    shards_raw = raw.get("SHARDS")
    if shards_raw is None:
        shards = mapped
    elif isinstance(shards_raw, (list, tuple)) and all(
        isinstance(a, str) for a in shards_raw
    ):
        shards = list(dict.fromkeys(shards_raw))
        for alias in shards:
            if alias not in databases:
                b.error(
                    "scalekit.E106",
                    f'{where}["SHARDS"] names {alias!r}, which is not in DATABASES.',
                    f"Add DATABASES[{alias!r}] or remove it from the shards.",
                )
        missing = [a for a in mapped if a not in shards]
        if missing:
            b.error(
                "scalekit.E107",
                f'{where}["MAP"] sends buckets to {missing!r}, which {where}["SHARDS"] '
                "does not list: their tables would not be migrated there.",
                f'Add {missing!r} to {where}["SHARDS"].',
            )
    else:
        b.error(
            "scalekit.E107",
            f'{where}["SHARDS"] is {shards_raw!r}; expected a list of DATABASES aliases.',
            'For example ["shard0", "shard1", "shard2"]; omit it to use the MAP\'s aliases.',
        )
        shards = mapped

    replicas_raw = raw.get("REPLICAS", {})
    replica_groups: dict[str, ReplicaGroup] = {}
    if not isinstance(replicas_raw, Mapping):
        b.error(
            "scalekit.E108",
            f'{where}["REPLICAS"] is {replicas_raw!r}; expected a dict shard alias -> '
            "list of replica aliases (or dict replica -> weight).",
            'For example {"shard0": ["shard0_replica"]}.',
        )
        replicas_raw = {}
    for shard, value in replicas_raw.items():
        if shard not in shards:
            b.error(
                "scalekit.E108",
                f'{where}["REPLICAS"] has replicas for {shard!r}, which is not a shard '
                "of the group.",
                "Key REPLICAS by the shard aliases: "
                + ", ".join(map(repr, shards))
                + ".",
            )
            continue
        items = (
            list(value.items())
            if isinstance(value, Mapping)
            else [(a, 1.0) for a in value]
            if isinstance(value, (list, tuple))
            else [(value, 1.0)]
        )
        weights: dict[str, float] = {}
        for alias, weight in items:
            if not isinstance(alias, str) or alias not in databases:
                b.error(
                    "scalekit.E106",
                    f'{where}["REPLICAS"][{shard!r}] names {alias!r}, which is not in '
                    "DATABASES.",
                    f"Add DATABASES[{alias!r}] or remove it.",
                )
            elif alias in shards or not _is_number(weight) or weight <= 0:
                b.error(
                    "scalekit.E108",
                    f'{where}["REPLICAS"][{shard!r}] lists {alias!r} with weight '
                    f"{weight!r}: a replica must not be a shard, and weighs > 0.",
                    "List each shard's read-only replicas, with positive weights.",
                )
            else:
                weights[alias] = float(weight)
        replica_groups[shard] = ReplicaGroup.of(f"shard:{shard}", shard, weights)
    for shard in (*shards, *mapped):
        if shard not in replica_groups:
            replica_groups[shard] = ReplicaGroup(f"shard:{shard}", shard)
    if alias_by_bucket is None:
        return None
    return ShardGroup(
        name=name,
        buckets=buckets,
        shards=tuple(shards),
        alias_by_bucket=alias_by_bucket,
        replica_groups=replica_groups,
        read_by_bucket=tuple(replica_groups[a] for a in alias_by_bucket),
    )


def _build_sharding(b: _Builder, raw: Mapping[str, Any]) -> ShardingSettings:
    databases: Mapping[str, Any] = getattr(settings, "DATABASES", {})
    b.unknown_keys(
        raw,
        SHARDING_DEFAULTS,
        'SCALEKIT["SHARDING"]',
        "scalekit.W101",
        "a sharding setting",
    )
    workers = _positive_int(
        b,
        raw.get("FANOUT_MAX_WORKERS", 8),
        'SCALEKIT["SHARDING"]["FANOUT_MAX_WORKERS"]',
        "scalekit.E109",
    )
    batch = _positive_int(
        b,
        raw.get("RESHARD_BATCH_SIZE", 1000),
        'SCALEKIT["SHARDING"]["RESHARD_BATCH_SIZE"]',
        "scalekit.E109",
    )
    groups_raw = raw.get("GROUPS", {})
    if not isinstance(groups_raw, Mapping):
        b.error(
            "scalekit.E101",
            f'SCALEKIT["SHARDING"]["GROUPS"] is {groups_raw!r}; expected a dict group '
            "name -> {MAP, SHARDS, BUCKETS, REPLICAS}.",
            'For example {"orders": {"MAP": {"0-511": "shard0", "512-1023": "shard1"}}}.',
        )
        groups_raw = {}
    groups: dict[str, ShardGroup] = {}
    shard_of: dict[str, str] = {}
    for name, spec in groups_raw.items():
        if not isinstance(name, str) or not name or not isinstance(spec, Mapping):
            b.error(
                "scalekit.E101",
                f'SCALEKIT["SHARDING"]["GROUPS"][{name!r}] is {spec!r}; expected a dict '
                "under a non-empty name.",
                'For example {"MAP": {"0-1023": "shard0"}}.',
            )
            continue
        group = _shard_group(b, name, spec, databases)
        if group is None:
            continue
        for shard, rg in group.replica_groups.items():
            for alias in (shard, *rg.replicas):
                if alias in shard_of:
                    b.error(
                        "scalekit.E108",
                        f'SCALEKIT["SHARDING"]["GROUPS"][{name!r}] uses {alias!r}, which '
                        "another shard group also uses.",
                        "Each database holds the shards of one group: give each group "
                        "its own aliases.",
                    )
                shard_of[alias] = shard
        groups[name] = group
    # The replica router's aliases (as build() read them) must not be shards.
    top = b.raw.get("REPLICAS", ())
    router_aliases = {
        b.raw.get("PRIMARY", "default"),
        *(top if isinstance(top, (list, tuple, Mapping)) else ()),
    }
    lead_groups = b.raw.get("GROUPS", {})
    if isinstance(lead_groups, Mapping):
        for spec in lead_groups.values():
            if isinstance(spec, Mapping):
                router_aliases.add(spec.get("PRIMARY"))
                reps = spec.get("REPLICAS", ())
                router_aliases.update(
                    reps if isinstance(reps, (list, tuple, Mapping)) else ()
                )
    clash = sorted(a for a in shard_of if a in router_aliases)
    if clash:
        b.error(
            "scalekit.E117",
            f'SCALEKIT["SHARDING"] uses {clash!r} as shards or shard replicas, which the '
            "primary/replica router also routes to.",
            "Give the shards databases of their own (they may live on the same server).",
        )
    return ShardingSettings(
        groups=groups,
        shard_of=shard_of,
        shard_aliases=frozenset(s for g in groups.values() for s in g.shards),
        replica_aliases=frozenset(
            r
            for g in groups.values()
            for rg in g.replica_groups.values()
            for r in rg.replicas
        ),
        fanout_max_workers=workers or 8,
        reshard_batch_size=batch or 1000,
    )

"""Horizontal sharding: logical buckets, shard-aware IDs, fan-out, resharding.

A shard group (``SCALEKIT["SHARDING"]["GROUPS"]``) has a fixed number of
logical buckets (default 1024), mapped onto ``DATABASES`` aliases by its MAP.
A shard key maps to a bucket by :func:`shard_bucket`, a stable hash (BLAKE2b,
the same in every process, machine and Python version), and the bucket to a
database by the MAP; conf.py prepares the bucket -> alias tables once per
settings change, so routing only hashes and indexes.

Models join a group declaratively::

    class Order(ShardedModel, models.Model):
        shard_group = "orders"
        shard_key = "customer_id"

        id = ShardedIDField(primary_key=True)
        customer_id = models.BigIntegerField()
        objects = ShardedManager()

``ShardedIDField`` IDs are 64-bit (63 used, always positive)::

    | 41 bits: ms since 2024-01-01 UTC | 12 bits: bucket | 10 bits: sequence |

The time and the sequence come from the shard's PostgreSQL server in one round
trip (``nextval`` of a per-database sequence and ``clock_timestamp()``), so
IDs do not collide across processes (unless one database hands out more than
1024 of them in one millisecond) and sort roughly by creation time; the bucket
lets ``get_by_id()`` and resharding find a row's shard without a lookup table.
On SQLite (development, tests, the example's embedded default) the sequence
is a one-row table, incremented with ``UPDATE ... RETURNING`` together with
the clock read: SQLite serializes writers on a file, so every process writing
to a shard file gets its own number. Resharding (``apply_reshard``) needs
PostgreSQL.
"""

from __future__ import annotations

import json
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from hashlib import blake2b
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

from django.apps import apps
from django.core.exceptions import ImproperlyConfigured, ValidationError
from django.db import DatabaseError, Error, connections, models, transaction
from django.db.migrations.operations.special import RunSQL
from django.db.models import Count, F, Max, Min, Sum

from django_scalekit import conf, metrics

_FANOUTS = metrics.counter(
    "shard_fanout_queries_total",
    "Queries run on every shard of a group by fan_out(), by outcome.",
    ["group", "outcome"],
)
_FANOUT_SECONDS = metrics.histogram(
    "shard_fanout_seconds",
    "How long a fan_out() took, all shards together.",
    ["group"],
)

if TYPE_CHECKING:
    from django.db.backends.base.base import BaseDatabaseWrapper
    from django.db.models import Model

_M = TypeVar("_M", bound="Model")

# --- Errors ------------------------------------------------------------------


class ShardingError(Exception):
    """A sharded model was used in a way that would put or look for rows in
    the wrong database."""


class ShardKeyRequired(ShardingError):
    """A query or save of a sharded model did not say which shard it is for."""


class ReshardError(ShardingError):
    """A resharding step failed its verification; nothing was deleted."""


# --- Hashing ------------------------------------------------------------------


def key_bytes(key: object) -> bytes:
    """The canonical bytes of a shard key: what :func:`shard_bucket` hashes.

    ``int`` -> its decimal digits, ``str`` -> UTF-8, ``uuid.UUID`` -> its
    canonical string (so a UUID and its lowercase text hash alike), ``bytes``
    as they are.
    """
    if isinstance(key, str):
        return key.encode()
    if isinstance(key, int) and not isinstance(key, bool):
        return str(key).encode()
    if isinstance(key, uuid.UUID):
        return str(key).encode()
    if isinstance(key, bytes):
        return key
    raise TypeError(
        f"shard key {key!r} is a {type(key).__name__}; expected an int, str, UUID or bytes"
    )


def shard_bucket(key: object, buckets: int = conf.DEFAULT_BUCKETS) -> int:
    """The logical bucket of ``key`` among ``buckets``: BLAKE2b-64 modulo buckets.

    Stable across processes, machines and Python versions (``hash()`` is
    salted per process for strings, so it is never used).
    """
    digest = blake2b(key_bytes(key), digest_size=8).digest()
    return int.from_bytes(digest, "big") % buckets


# --- Shard-aware IDs --------------------------------------------------------

#: 2024-01-01T00:00:00Z in ms: IDs count milliseconds from here (41 bits: until 2093).
ID_EPOCH_MS = 1_704_067_200_000
ID_TIME_SHIFT = 22
ID_BUCKET_SHIFT = 10
ID_BUCKET_MASK = 0xFFF
ID_SEQUENCE_MASK = 0x3FF
#: The per-database sequence IDs draw from (created by CreateShardIdSequence).
ID_SEQUENCE = "scalekit_shard_id_seq"
_ID_SQL = (
    f"SELECT nextval('{ID_SEQUENCE}'), "
    "(EXTRACT(EPOCH FROM clock_timestamp()) * 1000)::bigint"
)
#: SQLite has no sequences: a one-row table stands in (created by
#: CreateShardIdSequence on SQLite shards). ``julianday('now')`` is SQLite's
#: clock in ms precision; ROUND undoes the float's error.
_SQLITE_NOW_MS = "CAST(ROUND((julianday('now') - 2440587.5) * 86400000) AS INTEGER)"
_SQLITE_CREATE_SQL = [
    f"CREATE TABLE IF NOT EXISTS {ID_SEQUENCE} "
    "(id INTEGER PRIMARY KEY CHECK (id = 1), value INTEGER NOT NULL)",
    f"INSERT OR IGNORE INTO {ID_SEQUENCE} (id, value) VALUES (1, 0)",
]
_SQLITE_NEXT_SQL = (
    f"UPDATE {ID_SEQUENCE} SET value = value + 1 WHERE id = 1 "
    f"RETURNING value, {_SQLITE_NOW_MS}"
)
#: SQLite before 3.35 has no RETURNING: UPDATE, then SELECT in the same
#: transaction (which holds the write lock from the UPDATE on).
_SQLITE_OLD_NEXT_SQL = [
    f"UPDATE {ID_SEQUENCE} SET value = value + 1 WHERE id = 1",
    f"SELECT value, {_SQLITE_NOW_MS} FROM {ID_SEQUENCE} WHERE id = 1",
]


def id_sql(vendor: str, returning: bool = True) -> list[str]:
    """The statements that draw (sequence, Unix ms) on a database of ``vendor``.

    The last statement returns the row. On SQLite they run in one transaction
    (see :func:`new_id`); ``returning=False`` is for SQLite older than 3.35.
    """
    if vendor == "sqlite":
        return [_SQLITE_NEXT_SQL] if returning else list(_SQLITE_OLD_NEXT_SQL)
    return [_ID_SQL]


def create_sequence_sql(vendor: str) -> list[str]:
    """The statements that create the ID sequence on a database of ``vendor``."""
    if vendor == "sqlite":
        return list(_SQLITE_CREATE_SQL)
    return [f"CREATE SEQUENCE IF NOT EXISTS {ID_SEQUENCE}"]


def _draw(alias: str) -> tuple[int, int] | None:
    connection = connections[alias]
    statements = id_sql(
        connection.vendor, connection.features.can_return_columns_from_insert
    )
    if len(statements) == 1:
        # One statement: atomic on its own (on SQLite, the UPDATE holds the
        # file's write lock until it is done).
        with connection.cursor() as cursor:
            cursor.execute(statements[0])
            return cursor.fetchone()  # type: ignore[no-any-return]
    with transaction.atomic(using=alias), connection.cursor() as cursor:
        for sql in statements:
            cursor.execute(sql)
        return cursor.fetchone()  # type: ignore[no-any-return]


def compose_id(ms: int, bucket: int, sequence: int) -> int:
    """Build an ID from a Unix time in ms, a bucket and a sequence number."""
    if not 0 <= bucket <= ID_BUCKET_MASK:
        raise ValueError(f"compose_id(bucket={bucket!r}): bucket must be in 0-4095")
    return (
        ((ms - ID_EPOCH_MS) << ID_TIME_SHIFT)
        | (bucket << ID_BUCKET_SHIFT)
        | (sequence & ID_SEQUENCE_MASK)
    )


def id_bucket(id: int) -> int:
    """The logical bucket embedded in a shard-aware ID."""
    return (id >> ID_BUCKET_SHIFT) & ID_BUCKET_MASK


def id_time_ms(id: int) -> int:
    """The Unix time in ms at which a shard-aware ID was made."""
    return (id >> ID_TIME_SHIFT) + ID_EPOCH_MS


def new_id(model: type[Model], key: object) -> int:
    """A new ID for a row of ``model`` with shard key ``key``, from its shard."""
    group = group_of(model)
    bucket = shard_bucket(key, group.buckets)
    alias = group.alias_by_bucket[bucket]
    hint = (
        f"Is the shard down, or its sequence {ID_SEQUENCE!r} missing? If missing, add "
        f'django_scalekit.sharding.CreateShardIdSequence("{group.name}") to a '
        "migration and migrate every shard."
    )
    try:
        row = _draw(alias)
    except DatabaseError as exc:
        raise ShardingError(
            f"Cannot draw an ID for {model._meta.label} from {alias!r}: {exc}. {hint}"
        ) from exc
    if row is None:  # SQLite: the table is there but its row is not
        raise ShardingError(
            f"Cannot draw an ID for {model._meta.label} from {alias!r}: "
            f"{ID_SEQUENCE} is empty. {hint}"
        )
    sequence, ms = row
    return compose_id(int(ms), bucket, int(sequence))


class CreateShardIdSequence(RunSQL):
    """Migration operation: create the ID sequence on every shard of a group.

    Put it in the migration that creates a group's first sharded model; it is
    idempotent, and its reverse keeps the sequence (other models share it).
    A PostgreSQL sequence on PostgreSQL shards, a one-row table on SQLite
    shards (:func:`create_sequence_sql`).
    """

    def __init__(self, group: str) -> None:
        self.group = group
        super().__init__(
            f"CREATE SEQUENCE IF NOT EXISTS {ID_SEQUENCE}",
            reverse_sql=RunSQL.noop,
            hints={"shard_group": group},
            elidable=False,
        )

    def database_forwards(
        self, app_label: str, schema_editor: Any, from_state: Any, to_state: Any
    ) -> None:
        # RunSQL's, with the SQL of the shard's vendor.
        from django.db import router

        if router.allow_migrate(
            schema_editor.connection.alias, app_label, **self.hints
        ):
            for sql in create_sequence_sql(schema_editor.connection.vendor):
                schema_editor.execute(sql, params=None)

    def deconstruct(self) -> tuple[str, list[Any], dict[str, Any]]:
        return (self.__class__.__qualname__, [self.group], {})

    def describe(self) -> str:
        return f"Create the shard ID sequence on the shards of {self.group!r}"


# --- Models -----------------------------------------------------------------


def group_of(model: type[Model] | Model) -> conf.ShardGroup:
    """The shard group of a sharded model (class or instance)."""
    name = getattr(model, "shard_group", None)
    cfg = conf._settings or conf.get()
    try:
        return cfg.sharding.groups[name]  # type: ignore[index]
    except KeyError:
        label = model._meta.label
        raise ImproperlyConfigured(
            f"{label}.shard_group is {name!r}, which is not in "
            'SCALEKIT["SHARDING"]["GROUPS"] (scalekit.E110).'
        ) from None


def shard_for_key(model: type[Model], key: object) -> str:
    """The shard alias (primary) holding rows of ``model`` with shard key ``key``."""
    group = group_of(model)
    return group.alias_by_bucket[shard_bucket(key, group.buckets)]


def _key_of(instance: Model) -> object:
    key = getattr(instance, instance.shard_key)  # type: ignore[attr-defined]
    if key is None or key == "":
        raise ShardKeyRequired(
            f"{instance._meta.label}.{instance.shard_key} is {key!r}: a sharded row "  # type: ignore[attr-defined]
            "needs its shard key to choose its database; set it before saving."
        )
    return key


_PARENTS: dict[type[Any], list[Any]] = {}


def _same_group_parents(model: type[Model]) -> list[Any]:
    """Foreign keys of ``model`` to the ID of a sharded model of its group.

    A child must share its parent's bucket (the bucket is what a reshard
    moves), which the parent's ID tells without a query.
    """
    found = _PARENTS.get(model)
    if found is not None:
        return found
    group = getattr(model, "shard_group", None)
    found = _PARENTS[model] = [
        f
        for f in model._meta.concrete_fields
        if f.is_relation
        and f.related_model is not None
        and getattr(f.related_model, "shard_group", None) == group
        and isinstance(getattr(f, "target_field", None), ShardedIDField)
    ]
    return found


class ShardedModel:
    """Mixin for a model whose rows live on the shards of ``shard_group``.

    ``class Order(ShardedModel, models.Model)``; set ``shard_group`` (a group
    of ``SCALEKIT["SHARDING"]["GROUPS"]``) and ``shard_key`` (the name of a
    field, e.g. ``"customer_id"``), give it ``id = ShardedIDField(
    primary_key=True)`` and ``objects = ShardedManager()``. The system checks
    (``scalekit.E110``-``E116``) verify all of it.
    """

    shard_group: ClassVar[str | None] = None
    shard_key: ClassVar[str]

    def save(self, *args: Any, **kwargs: Any) -> None:
        # Refuse to put a row where its key does not send it: an explicit
        # using=, or a key changed after the ID (which embeds the bucket) was made.
        instance: Any = self
        group = group_of(instance)
        bucket = shard_bucket(_key_of(instance), group.buckets)
        if instance.pk is not None and id_bucket(instance.pk) != bucket:
            raise ShardingError(
                f"{instance._meta.label} {instance.pk}: its shard key "
                f"{instance.shard_key} now hashes to bucket {bucket}, but the row was "
                f"created in bucket {id_bucket(instance.pk)}; the shard key of a saved "
                "row cannot change (create a new row instead)."
            )
        for fk in _same_group_parents(type(instance)):
            parent = getattr(instance, fk.attname)
            if parent is not None and id_bucket(parent) != bucket:
                raise ShardingError(
                    f"{instance._meta.label}.{fk.name} is {fk.related_model._meta.label} "
                    f"{parent}, in bucket {id_bucket(parent)}, but this row's "
                    f"{instance.shard_key} sends it to bucket {bucket}: a reshard would "
                    "put them on different databases. Set the shard key to the parent's "
                    "(scalekit.E118 in docs/checks.md)."
                )
        using = kwargs.get("using")
        if using is not None:
            sharding = (conf._settings or conf.get()).sharding
            if sharding.shard_of.get(using, using) != group.alias_by_bucket[bucket]:
                raise ShardingError(
                    f"{instance._meta.label}.save(using={using!r}): its shard key sends "
                    f"it to {group.alias_by_bucket[bucket]!r}."
                )
            # using= bypasses the router: record the write for read-your-writes.
            routers.route_write(group.replica_groups[group.alias_by_bucket[bucket]])
        super().save(*args, **kwargs)  # type: ignore[misc]


class ShardedIDField(models.BigIntegerField):  # type: ignore[type-arg]
    """A 64-bit primary key embedding its row's bucket, drawn from the shard."""

    description = "Shard-aware 64-bit ID"

    def get_pk_value_on_save(self, instance: Model) -> int:
        return new_id(type(instance), _key_of(instance))


class ShardedQuerySet(models.QuerySet[_M]):
    """QuerySet of a sharded model: ``for_key()``, ``get_by_id()``, fan-out."""

    def _with_hint(self, **hint: object) -> ShardedQuerySet[_M]:
        # _chain() and _hints are private in django-stubs, public in spirit:
        # Django's own related managers set hints this way.
        this: Any = self
        clone: ShardedQuerySet[_M] = this._chain()
        hints = {
            k: v
            for k, v in this._hints.items()
            if k not in ("shard_key", "shard_bucket")
        }
        clone._hints = {**hints, **hint}  # type: ignore[attr-defined]
        return clone

    def _key_value(self, method: str, key: object) -> Any:
        # The key as the shard key field holds it (so "42" and 42, or a UUID
        # and its text, hash alike), or an error naming the method and key.
        name = self.model.shard_key  # type: ignore[attr-defined]
        field: Any = self.model._meta.get_field(name)
        try:
            value = field.to_python(key)
        except ValidationError as exc:
            raise ValueError(
                f"{method}(key={key!r}): not a valid {self.model.__name__}.{name} "
                f"value ({field.__class__.__name__}): {' '.join(exc.messages)}"
            ) from None
        if value is None or value == "":
            raise ValueError(f"{method}(key={key!r}): key must not be empty")
        return value

    def for_key(self, key: object) -> ShardedQuerySet[_M]:
        """The rows with shard key ``key``, read from the one shard holding them.

        Filters on the shard key as well as routing: ``for_key(42).count()``
        counts customer 42's rows only. For every row of that shard, use
        :meth:`on_shard_of`.
        """
        value = self._key_value("for_key", key)
        name = self.model.shard_key  # type: ignore[attr-defined]
        return self._with_hint(shard_key=value).filter(**{name: value})

    def on_shard_of(self, key: object) -> ShardedQuerySet[_M]:
        """This query, unfiltered, on the shard holding rows with shard key ``key``.

        Every row of that shard matches, whatever its key (the buckets sharing
        the database): for maintenance scans, not for one key's rows.
        """
        return self._with_hint(shard_key=self._key_value("on_shard_of", key))

    def get_by_id(self, id: int) -> _M:
        """The row with this shard-aware ID, read from the shard its bucket names."""
        if not isinstance(id, int) or isinstance(id, bool) or id < 0:
            raise TypeError(f"get_by_id(id={id!r}): id must be a non-negative int")
        bucket = id_bucket(id)
        if bucket >= group_of(self.model).buckets:
            raise self.model.DoesNotExist(  # type: ignore[attr-defined]
                f"{self.model._meta.label} {id}: bucket {bucket} does not exist"
            )
        return self._with_hint(shard_bucket=bucket).get(pk=id)

    def create(self, **kwargs: Any) -> _M:
        this: Any = self
        key = this._hints.get("shard_key")
        own = kwargs.get(self.model.shard_key)  # type: ignore[attr-defined]
        if key is not None and own is not None:
            buckets = group_of(self.model).buckets
            if shard_bucket(own, buckets) != shard_bucket(key, buckets):
                raise ValueError(
                    f"for_key({key!r}).create({self.model.shard_key}={own!r}): the row's "  # type: ignore[attr-defined]
                    "shard key belongs to another bucket"
                )
        elif key is not None:
            kwargs[self.model.shard_key] = key  # type: ignore[attr-defined]
        # Like QuerySet.create(), but routed by the new row itself (its key),
        # not by the queryset's hints.
        obj = self.model(**kwargs)
        self._for_write = True
        obj.save(force_insert=True, using=this._db)
        return obj

    def bulk_create(self, objs: Iterable[_M], *args: Any, **kwargs: Any) -> list[_M]:
        """Insert ``objs``, each on the shard its key sends it to (one INSERT per shard)."""
        objs = list(objs)
        db = self._db  # type: ignore[attr-defined]
        by_alias: dict[str, list[_M]] = defaultdict(list)
        for obj in objs:
            by_alias[shard_for_key(self.model, _key_of(obj))].append(obj)
        for alias, group in by_alias.items():
            if db is not None and db != alias:
                raise ShardingError(
                    f"bulk_create on {db!r}: some rows belong to {alias!r}"
                )
            super(ShardedQuerySet, self.using(alias)).bulk_create(
                group, *args, **kwargs
            )
            # using() bypasses the router: record the write ourselves, so the
            # scope's reads of this shard see it (read-your-writes).
            routers.route_write(group_of(self.model).replica_groups[alias])
        return objs

    def fan_out(self) -> list[Any]:
        """Run this query on every shard of the group; merge (see :func:`fan_out`)."""
        return fan_out(self)

    def fan_out_count(self) -> int:
        return fan_out_count(self)

    def fan_out_aggregate(self, **aggregates: Any) -> dict[str, Any]:
        return fan_out_aggregate(self, **aggregates)


class ShardedManager(models.Manager[_M]):
    """Manager of a sharded model: ``for_key()``, ``get_by_id()``, fan-out."""

    def get_queryset(self) -> ShardedQuerySet[_M]:
        return ShardedQuerySet(self.model, using=self._db, hints=self._hints)  # type: ignore[attr-defined]

    def for_key(self, key: object) -> ShardedQuerySet[_M]:
        return self.get_queryset().for_key(key)

    def on_shard_of(self, key: object) -> ShardedQuerySet[_M]:
        return self.get_queryset().on_shard_of(key)

    def get_by_id(self, id: int) -> _M:
        return self.get_queryset().get_by_id(id)

    def fan_out(self) -> list[Any]:
        return self.get_queryset().fan_out()

    def fan_out_count(self) -> int:
        return self.get_queryset().fan_out_count()

    def fan_out_aggregate(self, **aggregates: Any) -> dict[str, Any]:
        return self.get_queryset().fan_out_aggregate(**aggregates)


# --- Router -----------------------------------------------------------------


def _bucket(
    model: type[Model], group: conf.ShardGroup, hints: Mapping[str, Any]
) -> int:
    key = hints.get("shard_key")
    if key is not None:
        return shard_bucket(key, group.buckets)
    bucket = hints.get("shard_bucket")
    if bucket is not None:
        return bucket  # type: ignore[no-any-return]
    instance = hints.get("instance")
    if instance is not None:
        if isinstance(instance, model):
            return shard_bucket(_key_of(instance), group.buckets)
        # A related manager's instance: stay on its shard.
        db = instance._state.db
        shard = (conf._settings or conf.get()).sharding.shard_of.get(db)
        if shard is not None and shard in group.replica_groups:
            return group.alias_by_bucket.index(shard)
    raise ShardKeyRequired(
        f"{model._meta.label} is sharded (group {group.name!r}): say which shard a "
        f"query is for with {model.__name__}.objects.for_key(key) or .get_by_id(id), "
        "run it on every shard with .fan_out(), or name the database with .using()."
    )


class ShardRouter:
    """Routes sharded models to their shard; returns None for everything else.

    Put it before ``PrimaryReplicaRouter`` in ``DATABASE_ROUTERS``. Reads of a
    shard use its replicas with the same read-your-writes rules as the
    primary/replica router (``routers.route_read()``, per shard).
    """

    # db_for_read and db_for_write run before every query of every model:
    # unsharded models cost one getattr (see benchmarks/bench_sharding.py).

    def __init__(self) -> None:
        routers.require_app(type(self).__name__)

    def db_for_read(self, model: type[Model], **hints: Any) -> str | None:
        name = getattr(model, "shard_group", None)
        if name is None:
            return None
        group = group_of(model)
        return routers.route_read(group.read_by_bucket[_bucket(model, group, hints)])

    def db_for_write(self, model: type[Model], **hints: Any) -> str | None:
        name = getattr(model, "shard_group", None)
        if name is None:
            return None
        group = group_of(model)
        return routers.route_write(group.read_by_bucket[_bucket(model, group, hints)])

    def allow_relation(self, obj1: Model, obj2: Model, **hints: Any) -> bool | None:
        sharded1 = getattr(obj1, "shard_group", None) is not None
        sharded2 = getattr(obj2, "shard_group", None) is not None
        if not (sharded1 or sharded2):
            return None
        if sharded1 != sharded2:
            return False
        shard_of = conf.get(strict=False).sharding.shard_of
        db1, db2 = obj1._state.db, obj2._state.db
        if db1 is None or db2 is None:
            return False
        return shard_of.get(db1, db1) == shard_of.get(db2, db2)

    def allow_migrate(
        self, db: str, app_label: str, model_name: str | None = None, **hints: Any
    ) -> bool | None:
        sharding = conf.get(strict=False).sharding  # runs during system checks
        name = hints.get("shard_group")
        if name is None and model_name is not None:
            try:
                model: Any = apps.get_model(app_label, model_name)
            except LookupError:  # deleted since: its historical model
                model = hints.get("model")
            name = getattr(model, "shard_group", None)
        if name is not None:
            group = sharding.groups.get(name)
            return group is not None and db in group.shards
        if db in sharding.shard_aliases or db in sharding.replica_aliases:
            return False
        return None


# --- Fan-out ------------------------------------------------------------------


def _fan(
    queryset: models.QuerySet[Any], run: Callable[[models.QuerySet[Any]], Any]
) -> list[Any]:
    """``run(queryset.using(alias))`` on every shard of the group, in threads."""
    group = group_of(queryset.model)
    # Chosen here, in the caller's routing scope: its pinning applies.
    aliases = [routers.route_read(group.replica_groups[s]) for s in group.shards]

    def one(alias: str) -> Any:
        try:
            return run(queryset.using(alias))
        finally:
            connections[alias].close()

    workers = min(
        len(aliases), (conf._settings or conf.get()).sharding.fanout_max_workers
    )
    started = time.monotonic()
    try:
        with ThreadPoolExecutor(
            max_workers=workers, thread_name_prefix="scalekit-fanout"
        ) as pool:
            results = list(pool.map(one, aliases))
    except Exception:
        _FANOUTS.labels(group.name, "error").inc()
        raise
    _FANOUTS.labels(group.name, "ok").inc()
    _FANOUT_SECONDS.labels(group.name).observe(time.monotonic() - started)
    return results


def _order_getter(queryset: models.QuerySet[Any], name: str) -> Callable[[Any], Any]:
    meta = queryset.model._meta
    if "__" in name or name == "?":
        raise ValueError(
            f"fan_out(): cannot merge by order_by({name!r}); order by fields of the model"
        )
    fields = getattr(queryset, "_fields", None)
    iterable = queryset._iterable_class
    if iterable is models.query.ModelIterable:
        attname = meta.pk.attname if name == "pk" else meta.get_field(name).attname
        return lambda row: getattr(row, attname)
    if iterable is models.query.ValuesIterable:
        return lambda row: row[name]
    if (
        fields
        and name in fields
        and iterable is not models.query.FlatValuesListIterable
    ):
        index = list(fields).index(name)
        return lambda row: row[index]
    if iterable is models.query.FlatValuesListIterable and fields == (name,):
        return lambda row: row
    raise ValueError(f"fan_out(): the rows do not include the order_by field {name!r}")


def _null_last(getter: Callable[[Any], Any]) -> Callable[[Any], tuple[bool, Any]]:
    return lambda row: (getter(row) is None, getter(row))


def fan_out(queryset: models.QuerySet[Any]) -> list[Any]:
    """Run ``queryset`` on every shard of its group concurrently and merge rows.

    Ordering (``order_by`` or ``Meta.ordering``, by plain fields, NULLs last
    ascending as PostgreSQL does) and slicing apply to the merged rows: each
    shard returns at most ``stop`` rows, the merge sorts and slices them.
    """
    query = queryset.query
    low, high = query.low_mark, query.high_mark
    base: models.QuerySet[Any] = queryset._chain()  # type: ignore[attr-defined]
    base.query.clear_limits()
    if high is not None:
        base.query.set_limits(0, high)
    ordering: Sequence[Any] = query.order_by or (
        queryset.model._meta.ordering if query.default_ordering else ()
    )
    keys = []
    for item in ordering:
        if not isinstance(item, str):
            raise ValueError(f"fan_out(): cannot merge by the expression {item!r}")
        keys.append((_order_getter(queryset, item.lstrip("-")), item.startswith("-")))
    rows = [row for part in _fan(base, list) for row in part]
    for getter, descending in reversed(keys):
        rows.sort(key=_null_last(getter), reverse=descending)
    return rows[low:high]


def fan_out_count(queryset: models.QuerySet[Any]) -> int:
    """``count()`` summed over every shard (slicing applies to the total)."""
    query = queryset.query
    low, high = query.low_mark, query.high_mark
    base: models.QuerySet[Any] = queryset._chain()  # type: ignore[attr-defined]
    base.query.clear_limits()
    total: int = sum(_fan(base, lambda qs: qs.count()))
    end = total if high is None else min(high, total)
    return max(0, end - low)


_COMBINE: dict[type[Any], Callable[[list[Any]], Any]] = {
    Count: lambda values: sum(v or 0 for v in values),
    Sum: lambda values: (
        sum(v for v in values if v is not None)
        if any(v is not None for v in values)
        else None
    ),
    Min: lambda values: min((v for v in values if v is not None), default=None),
    Max: lambda values: max((v for v in values if v is not None), default=None),
}


def fan_out_aggregate(
    queryset: models.QuerySet[Any], **aggregates: Any
) -> dict[str, Any]:
    """``aggregate()`` on every shard, combined: Count and Sum added, Min/Max of the parts.

    Averages and distinct counts cannot be combined from the parts: ask for
    ``Sum`` and ``Count`` and divide.
    """
    for name, agg in aggregates.items():
        if type(agg) not in _COMBINE or getattr(agg, "distinct", False):
            raise ValueError(
                f"fan_out_aggregate({name}={agg!r}): only Count, Sum, Min and Max "
                "(not distinct) combine across shards; for an average use Sum / Count"
            )
    parts = _fan(queryset, lambda qs: qs.aggregate(**aggregates))
    return {
        name: _COMBINE[type(agg)]([p[name] for p in parts])
        for name, agg in aggregates.items()
    }


# --- Resharding ---------------------------------------------------------------


@dataclass(frozen=True)
class BucketMove:
    """Rows of one bucket that must move from ``source`` to ``target``."""

    bucket: int
    source: str
    target: str
    #: Model label -> rows of the bucket on ``source``.
    rows: Mapping[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(self.rows.values())


def parse_map(group: str, value: str | Mapping[str, Any]) -> tuple[str, ...]:
    """A MAP as given to ``scalekit_reshard`` (JSON text or a dict), checked
    like the settings' MAP; raises ValueError with every problem."""
    cfg = (conf._settings or conf.get()).sharding.groups.get(group)
    if cfg is None:
        raise ValueError(f"group={group!r}: not in SCALEKIT['SHARDING']['GROUPS']")
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise ValueError(f"new map is not JSON: {exc}") from exc
    b = conf._Builder({})
    from django.conf import settings

    table = conf.bucket_map(b, value, cfg.buckets, "new MAP", settings.DATABASES)
    problems = [p.msg for p in b.problems]
    if table is not None:
        problems += [
            f"new MAP names {alias!r}, which is not in SHARDS of group {group!r}: its "
            "tables were not migrated there (add it to SHARDS and run migrate first)."
            for alias in dict.fromkeys(table)
            if alias not in cfg.shards
        ]
    if problems or table is None:
        raise ValueError(" ".join(problems))
    return table


def sharded_models(group: str) -> list[type[Model]]:
    """Installed concrete models of a shard group."""
    return [
        m
        for m in apps.get_models()
        if getattr(m, "shard_group", None) == group and not m._meta.proxy
    ]


def _bucket_sql(model: type[Model], alias: str) -> str:
    pk: Any = model._meta.pk
    column = connections[alias].ops.quote_name(pk.column)
    return f"(({column} >> {ID_BUCKET_SHIFT}) & {ID_BUCKET_MASK})"


def bucket_rows(model: type[Model], alias: str) -> dict[int, int]:
    """Rows of ``model`` per bucket on ``alias`` (from the IDs, one scan)."""
    table = connections[alias].ops.quote_name(model._meta.db_table)
    with connections[alias].cursor() as cursor:
        cursor.execute(
            f"SELECT {_bucket_sql(model, alias)}, COUNT(*) FROM {table} GROUP BY 1"
        )
        return {int(b): int(n) for b, n in cursor.fetchall()}


def reshard_databases(
    group: str, new_map: Sequence[str] = (), retired: Sequence[str] = ()
) -> tuple[str, ...]:
    """Every database a reshard of ``group`` scans for rows: the group's
    ``SHARDS`` (the settings' MAP's aliases when unset), ``new_map``'s, and
    ``retired``: databases neither map names any more (a MAP deployed that
    dropped one while ``SHARDS`` is unset) that may still hold rows."""
    cfg = (conf._settings or conf.get()).sharding.groups[group]
    from django.conf import settings

    for alias in retired:
        if alias not in settings.DATABASES:
            raise ValueError(f"retired={alias!r}: not in DATABASES")
    return tuple(dict.fromkeys((*cfg.shards, *new_map, *retired)))


def plan_reshard(
    group: str, new_map: Sequence[str], *, retired: Sequence[str] = ()
) -> list[BucketMove]:
    """What moving ``group`` to ``new_map`` does: every bucket whose database
    changes, and every bucket with rows on a database other than its new one
    (e.g. left there by an interrupted run), with row counts. Reads only.
    Scans :func:`reshard_databases`."""
    cfg = (conf._settings or conf.get()).sharding.groups[group]
    models_ = sharded_models(group)
    moves: dict[tuple[int, str, str], Counter[str]] = {}
    for bucket, (old, new) in enumerate(zip(cfg.alias_by_bucket, new_map, strict=True)):
        if old != new:
            moves[(bucket, old, new)] = Counter()
    for alias in reshard_databases(group, new_map, retired):
        for model in models_:
            for bucket, n in bucket_rows(model, alias).items():
                target = new_map[bucket] if bucket < len(new_map) else None
                if target is None:
                    raise ReshardError(
                        f"{model._meta.label} has {n} rows on {alias!r} in bucket {bucket}, "
                        f"beyond the group's {cfg.buckets} buckets"
                    )
                if target != alias:
                    moves.setdefault((bucket, alias, target), Counter())[
                        model._meta.label
                    ] += n
    return [
        BucketMove(bucket, source, target, dict(rows))
        for (bucket, source, target), rows in sorted(moves.items())
    ]


# --- Resharding: locking ------------------------------------------------------


class ReshardLocked(ReshardError):
    """Another ``scalekit_reshard`` run of the same group holds its lock."""


def reshard_lock_id(group: str) -> int:
    """The PostgreSQL advisory lock key of resharding ``group`` (a signed bigint)."""
    digest = blake2b(f"scalekit_reshard:{group}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


@contextmanager
def reshard_lock(group: str, databases: Iterable[str] | None = None) -> Iterator[None]:
    """Hold ``pg_try_advisory_xact_lock`` on every PostgreSQL shard of ``group``.

    Two runs moving the same rows at once would each delete what the other
    just verified; the second one raises :class:`ReshardLocked` instead.
    Each lock is taken on a connection of its own, in a transaction kept
    open for the whole run and rolled back at its end: behind PgBouncer in
    transaction pooling a session-level lock would be taken and released on
    different server connections, while an open transaction keeps its one.
    ``databases``: those to lock (default :func:`reshard_databases`). Shards
    on other backends are not locked.
    """
    key = reshard_lock_id(group)
    held: list[BaseDatabaseWrapper] = []
    try:
        for alias in reshard_databases(group) if databases is None else databases:
            if connections[alias].vendor != "postgresql":
                continue
            holder = connections.create_connection(alias)
            held.append(holder)
            holder.set_autocommit(False)
            with holder.cursor() as cursor:
                # The server's idle-in-transaction timeout would end the
                # transaction, and the lock with it, between two batches.
                cursor.execute("SET LOCAL idle_in_transaction_session_timeout = 0")
                cursor.execute("SELECT pg_try_advisory_xact_lock(%s)", [key])
                (ok,) = cursor.fetchone()
            if not ok:
                raise ReshardLocked(
                    f"another scalekit_reshard of group {group!r} is running: it holds "
                    f"the advisory lock {key} on {alias!r} (pg_locks, locktype "
                    "'advisory'). Wait for it to finish, or stop it, then run again."
                )
        yield
    finally:
        for holder in reversed(held):
            # Each holder on its own: one failing (InterfaceError on a
            # connection already closed) must not leave the others' locks.
            with suppress(Error):  # the connection is gone: so is its lock
                holder.rollback()
            with suppress(Error):
                holder.close()


# --- Resharding: moving rows ----------------------------------------------------


@dataclass
class ReshardResult:
    """What ``apply_reshard`` or ``cleanup_reshard`` did."""

    rows: int = 0
    batches: int = 0
    seconds: float = 0.0
    by_model: Counter[str] = field(default_factory=Counter)
    #: Old copies left where they were, label -> rows: the copy on the
    #: bucket's database under the deployed MAP (the live one) differs, or
    #: there is none (not copied: see ``copy_missing``).
    differ: Counter[str] = field(default_factory=Counter)
    missing: Counter[str] = field(default_factory=Counter)
    #: A few of those rows, "label pk on alias", for the report.
    examples: list[str] = field(default_factory=list)

    @property
    def conflicts(self) -> int:
        return sum(self.differ.values()) + sum(self.missing.values())


def _batch_size(function: str, batch_size: int | None, default: int) -> int:
    """``batch_size``, or the settings' default; a ValueError naming it if bad."""
    if batch_size is None:
        return default
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"{function}(batch_size={batch_size!r}): must be an int >= 1")
    return batch_size


def apply_reshard(
    group: str,
    new_map: Sequence[str],
    *,
    batch_size: int | None = None,
    progress: Callable[[str], None] | None = None,
    after_batch: Callable[[int], None] | None = None,
    keep_source: bool = False,
    copy_missing: bool = False,
    retired: Sequence[str] = (),
) -> ReshardResult:
    """Move every row of ``group`` onto the database ``new_map`` gives its bucket.

    Per batch (the next ``batch_size`` rows by ID, an index range scan on the
    primary key): lock them on the source (``FOR UPDATE``), copy them to the
    target by primary key, verify the target holds them all, delete them from
    the source, commit. A run that stops anywhere leaves each row on its
    source, or on both (the source commit had not happened): running again
    finishes the job without losing or duplicating a row.

    Which copy wins when a row is on both: the source's while the deployed
    MAP (settings) still sends the bucket there (it is the live one; the
    target copy is overwritten), the target's once the deployed MAP sends the
    bucket to the target. Then nothing is copied: a source row identical to
    its target copy is deleted, one whose target copy differs is left in
    place (``result.differ``), and one with no target copy too
    (``result.missing``): it may have been deleted on the live database
    since, and copying it would bring it back. ``copy_missing=True`` copies
    those instead, for when writes went to the old database after the copy.

    Every sharded model of the group is moved, whatever the plan counted,
    and at the end no row of a moved bucket may be left on its source
    (:class:`ReshardError` otherwise: written during the run; run again).
    ``keep_source=True`` copies and verifies but deletes nothing: deploy the
    new MAP, then :func:`cleanup_reshard` deletes the old copies.
    ``retired``: see :func:`reshard_databases`. Holds :func:`reshard_lock`
    throughout.
    """
    sharding = (conf._settings or conf.get()).sharding
    batch_size = _batch_size("apply_reshard", batch_size, sharding.reshard_batch_size)
    say = progress or (lambda line: None)
    started = time.monotonic()
    result = ReshardResult()
    home = sharding.groups[group].alias_by_bucket
    databases = reshard_databases(group, new_map, retired)
    with reshard_lock(group, databases):
        # (source, target, whether the deployed MAP already sends there) -> buckets
        jobs: dict[tuple[str, str, bool], list[int]] = defaultdict(list)
        planned: Counter[tuple[str, str, bool, str]] = Counter()
        # Every move, even of buckets (or models) with no rows at plan time:
        # rows written into them since must move too.
        for move in plan_reshard(group, new_map, retired=retired):
            job = (move.source, move.target, home[move.bucket] == move.target)
            jobs[job].append(move.bucket)
            for label, n in move.rows.items():
                planned[(*job, label)] += n
        left_on_purpose: Counter[tuple[str, str]] = Counter()
        for (source, target, live_target), buckets in jobs.items():
            for model in sharded_models(group):
                label = model._meta.label
                kept = result.differ[label] + result.missing[label]
                moved = _copy_rows(
                    model,
                    source,
                    target,
                    buckets,
                    batch_size=batch_size,
                    overwrite=not live_target,
                    delete=not keep_source,
                    copy=not live_target or copy_missing,
                    total=planned[(source, target, live_target, label)],
                    say=say,
                    result=result,
                    after_batch=after_batch,
                )
                left_on_purpose[label, source] += (
                    result.differ[label] + result.missing[label] - kept
                )
                if moved:
                    verb = "copied" if keep_source else "moved"
                    say(f"{label}: {source} -> {target}: {moved} rows {verb}, verified")
        if not keep_source:
            # Last, so that rows written into a bucket after its model was
            # done are found too.
            for source in dict.fromkeys(source for source, _, _ in jobs):
                wanted = {
                    b for (s, _, _), bs in jobs.items() if s == source for b in bs
                }
                for model in sharded_models(group):
                    label = model._meta.label
                    left = sum(
                        n for b, n in bucket_rows(model, source).items() if b in wanted
                    )
                    left -= left_on_purpose[label, source]
                    if left > 0:
                        raise ReshardError(
                            f"{label}: {left} rows of the moved buckets are still on "
                            f"{source!r} (written during the move?); run again."
                        )
    result.seconds = time.monotonic() - started
    return result


def cleanup_reshard(
    group: str,
    *,
    batch_size: int | None = None,
    progress: Callable[[str], None] | None = None,
    discard_stale: bool = False,
    retired: Sequence[str] = (),
) -> ReshardResult:
    """Delete the copies ``apply_reshard(keep_source=True)`` left behind.

    Under the deployed MAP (settings), on every database of the group: a row
    whose bucket maps to another database is deleted when an identical row
    (every column equal) is on that database; otherwise it stays and is
    counted in ``result.differ`` (the copies differ: written on the old
    database after the copy?) or ``result.missing`` (no copy there: written
    on the old database after the copy, or deleted on the new one since).
    ``discard_stale=True`` also deletes the rows that differ: the copy on
    the bucket's database is the live one. Scans :func:`reshard_databases`
    (``retired`` included). Holds :func:`reshard_lock`.
    """
    sharding = (conf._settings or conf.get()).sharding
    batch_size = _batch_size("cleanup_reshard", batch_size, sharding.reshard_batch_size)
    say = progress or (lambda line: None)
    started = time.monotonic()
    result = ReshardResult()
    home = sharding.groups[group].alias_by_bucket
    databases = reshard_databases(group, retired=retired)
    with reshard_lock(group, databases):
        for alias in databases:
            for model in sharded_models(group):
                strays: dict[str, list[int]] = defaultdict(list)
                total: Counter[str] = Counter()
                for bucket, n in sorted(bucket_rows(model, alias).items()):
                    if bucket < len(home) and home[bucket] != alias:
                        strays[home[bucket]].append(bucket)
                        total[home[bucket]] += n
                for target, buckets in strays.items():
                    _copy_rows(
                        model,
                        alias,
                        target,
                        buckets,
                        batch_size=batch_size,
                        overwrite=False,
                        delete=True,
                        copy=False,
                        discard_stale=discard_stale,
                        total=total[target],
                        say=say,
                        result=result,
                        after_batch=None,
                    )
    result.seconds = time.monotonic() - started
    return result


def _copy_rows(
    model: type[Model],
    source: str,
    target: str,
    buckets: list[int],
    *,
    batch_size: int,
    overwrite: bool,
    delete: bool,
    total: int,
    say: Callable[[str], None],
    result: ReshardResult,
    after_batch: Callable[[int], None] | None,
    copy: bool = True,
    discard_stale: bool = False,
) -> int:
    """Copy (or with ``copy=False`` only compare) the rows of ``buckets`` from
    ``source`` to ``target`` in keyset batches, and delete the verified ones.

    ``overwrite``: the source is the live copy; upsert it over the target's.
    Otherwise the target's copy is the live one: missing rows are inserted
    (unless ``copy=False``), and a source row is deleted only when an
    identical row (with ``discard_stale``: any row) is on the target.
    Returns the rows verified on the target.
    """
    meta = model._meta
    pk: Any = meta.pk
    columns = [f.attname for f in meta.concrete_fields]
    key_at = columns.index(pk.attname)
    fields = [f.name for f in meta.concrete_fields if not f.primary_key]
    base = model._base_manager
    conn = connections[source]
    delete_sql = (
        f"DELETE FROM {conn.ops.quote_name(meta.db_table)} "
        f"WHERE {conn.ops.quote_name(pk.column)} = ANY(%s)"
    )
    label = meta.label
    scan = (
        base.using(source)
        .annotate(
            _scalekit_bucket=F("pk")
            .bitrightshift(ID_BUCKET_SHIFT)
            .bitand(ID_BUCKET_MASK)
        )
        .filter(_scalekit_bucket__in=buckets)
        .order_by("pk")
    )
    done = scanned = 0
    last_pk: int | None = None
    while True:
        with transaction.atomic(using=source):
            # Keyset paging: the primary key index from where the last batch
            # ended, not a scan and sort of the whole table per batch.
            page = scan if last_pk is None else scan.filter(pk__gt=last_pk)
            rows = list(page.select_for_update()[:batch_size])
            if not rows:
                return done
            last_pk = rows[-1].pk
            pks = [row.pk for row in rows]
            if copy:
                with transaction.atomic(using=target):
                    if overwrite and fields:
                        base.using(target).bulk_create(
                            rows,
                            update_conflicts=True,
                            unique_fields=[pk.name],
                            update_fields=fields,
                        )
                    else:
                        base.using(target).bulk_create(rows, ignore_conflicts=True)
            there = {
                values[key_at]: values
                for values in base.using(target)
                .filter(pk__in=pks)
                .values_list(*columns)
                .order_by()
            }
            if copy and len(there) != len(pks):
                raise ReshardError(
                    f"{label}: {len(pks)} rows copied from {source!r} but {len(there)} "
                    f"found on {target!r}; nothing deleted from {source!r}."
                )
            verified = []
            for row in rows:
                theirs = there.get(row.pk)
                if (
                    overwrite
                    or (discard_stale and theirs is not None)
                    or theirs == tuple(getattr(row, c) for c in columns)
                ):
                    verified.append(row.pk)
                    continue
                (result.missing if theirs is None else result.differ)[label] += 1
                if len(result.examples) < 10:
                    how = "missing" if theirs is None else "differs"
                    result.examples.append(
                        f"{label} {row.pk} on {source!r} ({how} on {target!r})"
                    )
            if delete and verified:
                with conn.cursor() as cursor:
                    cursor.execute(delete_sql, [verified])
                    deleted = cursor.rowcount
                if deleted != len(verified):
                    raise ReshardError(
                        f"{label}: deleting {len(verified)} verified rows from {source!r} "
                        f"removed {deleted}; rolled back."
                    )
        done += len(verified)
        result.rows += len(verified)
        result.batches += 1
        result.by_model[label] += len(verified)
        scanned += len(pks)
        seen = max(total, scanned)
        verb = ("moved" if copy else "deleted") if delete else "copied"
        say(
            f"{label}: {source} -> {target}: {done} of {seen} rows {verb} "
            f"({100 * done / seen:.0f}%)"
        )
        if after_batch is not None:
            after_batch(result.batches)


# Last: routers.py re-exports ShardRouter from here at its end, so either
# module may be imported first.
from django_scalekit import routers  # noqa: E402

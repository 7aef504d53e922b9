"""Two-level cache: a per-process L1 in front of a shared L2 (Redis).

A call of a ``@cached`` function goes, in this order:

1. **L1**, a dict in this process keyed on the call's arguments (as
   ``functools.lru_cache`` does), each entry with a short expiry
   (``L1_TIMEOUT``). A hit costs a dict lookup.
2. On an L1 miss, the arguments become a stable key (module-qualified name,
   canonical encoding of the arguments, hashed). Threads of this process that
   miss the same key at the same time wait for the first one (the "leader").
3. The leader makes **one** L2 round trip: a Lua script that returns the value,
   or else takes a short lock (``SET NX PX``) so that one process computes.
   A process that finds the lock taken polls the same script until the value
   appears, or the lock expires and it takes it over, and computes without
   the lock only after ``6 * LOCK_TIMEOUT``.
4. The lock holder computes while this process's ``LockKeeper`` thread
   renews its lock every ``LOCK_TIMEOUT / 3`` (a crashed holder's lock
   expires within ``LOCK_TIMEOUT``), then writes the value and releases the
   lock in **one** more round trip (not written if ``invalidate()`` ran
   meanwhile; inside ``transaction.atomic()`` only after the commit).

``invalidate()`` deletes the L2 entry and publishes its key on a Redis
pub/sub channel; a listener thread in each process drops the key from its L1.
Inside ``transaction.atomic()`` it does so again after the commit: until
then other connections still read the old rows and may store them.
A value is refreshed before it expires by probabilistic early expiration
(XFetch: Vattani et al., "Optimal Probabilistic Cache Stampede Prevention",
VLDB 2015).

Any L2 error opens a circuit breaker: for ``CIRCUIT_RETRY_SECONDS`` no call
touches L2 (values come from L1 or are computed), one WARNING is logged per
outage, then a single call probes L2 again.

L2 is one Redis, a Sentinel-managed master (django-redis ``SentinelClient``)
or a Redis Cluster (``django_scalekit.cluster.RedisClusterClient``).

L2 values are the project's own, pickled by the cache backend (django-redis's
default serializer); nothing else is ever unpickled: invalidation messages
carry plain key strings.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import decimal
import enum
import functools
import hashlib
import inspect
import itertools
import logging
import math
import os
import pickle
import random
import re
import threading
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Generic, TypeVar, cast

from asgiref.sync import sync_to_async
from django.conf import settings
from django.core.cache import BaseCache, caches
from django.db import connections, transaction
from django.http import HttpRequest, HttpResponse, HttpResponseBase
from django.utils import timezone, translation
from django.utils.functional import LazyObject, empty
from django.utils.module_loading import import_string

from django_scalekit import cdn, conf, metrics, routers

logger = logging.getLogger("django_scalekit.cache")

F = TypeVar("F", bound=Callable[..., Any])
T = TypeVar("T")

# --- metrics ----------------------------------------------------------------
# Labels: ``function`` is a decorated function's or view's qualified name (a
# fixed set per code base), ``alias`` a CACHES alias.

HITS = metrics.counter(
    "cache_hits_total", "Calls answered from the cache.", ["function", "level"]
)
MISSES = metrics.counter(
    "cache_misses_total", "Calls that found the value in neither level.", ["function"]
)
COMPUTATIONS = metrics.counter(
    "cache_computations_total",
    "Times a cached function or view actually ran.",
    ["function", "reason"],
)
LOCK_WAITS = metrics.counter(
    "cache_lock_waits_total",
    "Calls that waited for another thread or process to compute a value.",
    ["function", "scope"],
)
L2_ERRORS = metrics.counter(
    "cache_l2_errors_total", "Errors talking to the L2 cache.", ["alias"]
)
L2_AVAILABLE = metrics.gauge(
    "cache_l2_available",
    "1 while the L2 circuit breaker is closed, 0 while it is open.",
    ["alias"],
    multiprocess_mode="livemin",
)
INVALIDATIONS = metrics.counter(
    "cache_invalidations_total", "invalidate() calls.", ["function"]
)

#: L1 hits are counted in a plain integer and handed to the metric in batches
#: of this size (and on every call that goes past L1): a Prometheus
#: ``inc()`` would triple the cost of an L1 hit.
L1_HIT_BATCH = 64


class CacheUnavailable(Exception):
    """The L2 cache could not store a value (``refresh(strict=True)``, warm_cache)."""


# --- keys ---------------------------------------------------------------------


def _type_name(value: object) -> str:
    cls = type(value)
    return f"{cls.__module__}.{cls.__qualname__}"


def _encode(value: object, out: list[str], path: str) -> None:
    """Append a canonical, process-independent text form of ``value`` to ``out``.

    Numbers that compare equal encode alike (``1``, ``1.0`` and ``True``), as
    they share an entry in ``functools.lru_cache`` and in our L1.
    """
    if value is None:
        out.append("N")
    elif isinstance(value, str):
        out.append("s" + repr(value))
    elif isinstance(value, (bool, int)):
        out.append("i" + str(int(value)))
    elif isinstance(value, float):
        if value.is_integer():
            out.append("i" + str(int(value)))
        else:
            out.append("f" + repr(value))
    elif isinstance(value, bytes):
        out.append("b" + value.hex())
    elif isinstance(value, decimal.Decimal):
        if value.is_finite() and value == value.to_integral_value():
            out.append("i" + str(int(value)))
        else:
            out.append("d" + str(value.normalize()))
    elif isinstance(value, enum.Enum):
        out.append("e" + _type_name(value) + "." + value.name)
    elif isinstance(value, uuid.UUID):
        out.append("u" + value.hex)
    elif isinstance(
        value, (datetime.datetime, datetime.date, datetime.time, datetime.timedelta)
    ):
        out.append("t" + type(value).__name__ + repr(value))
    elif isinstance(value, (tuple, list)):
        out.append("(" if isinstance(value, tuple) else "[")
        for i, item in enumerate(value):
            _encode(item, out, f"{path}[{i}]")
            out.append(",")
        out.append(")")
    elif isinstance(value, (set, frozenset)):
        parts = []
        for item in value:
            sub: list[str] = []
            _encode(item, sub, f"{path} item")
            parts.append("".join(sub))
        out.append("{" + ",".join(sorted(parts)) + "}")
    elif isinstance(value, dict):
        items = []
        for k, v in value.items():
            ks: list[str] = []
            _encode(k, ks, f"{path} key")
            vs: list[str] = []
            _encode(v, vs, f"{path}[{k!r}]")
            items.append("".join(ks) + ":" + "".join(vs))
        out.append("<" + ",".join(sorted(items)) + ">")
    elif hasattr(value, "__cache_key__"):
        _encode(value.__cache_key__(), out, path)
    elif (
        hasattr(value, "_meta") and hasattr(value, "pk") and not isinstance(value, type)
    ):
        if value.pk is None:
            raise TypeError(
                f"argument {path!r} is an unsaved {_type_name(value)} (pk is None) "
                "and cannot be part of a cache key; save it first or pass its fields."
            )
        out.append("m" + value._meta.label_lower + ":")
        _encode(value.pk, out, path)
    elif isinstance(value, type):
        out.append("c" + value.__module__ + "." + value.__qualname__)
    else:
        raise TypeError(
            f"argument {path!r} is a {_type_name(value)} and cannot be part of a "
            "cache key; pass str, int, float, bytes, Decimal, UUID, date/time, "
            "Enum, model instances or tuples/lists/dicts/sets of them, or give "
            "the class a __cache_key__() method."
        )


def _digest(text: str) -> str:
    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()


def _readable_name(name: str, limit: int = 80) -> str:
    """The function's name in a key, bounded: long names keep their tail and a hash."""
    if len(name) <= limit:
        return name
    return name[-(limit - 9) :] + "~" + _digest(name)[:8]


# --- L1: a bounded dict in this process ----------------------------------------


class LocalL1:
    """Per-process store: ``key -> (expires_monotonic, value, l2_key)``.

    Bounded to ``max_entries``, evicting expired then oldest-inserted entries.
    ``index`` maps each L2 key to the L1 keys holding it, so that an
    invalidation message (which names the L2 key) finds them.
    """

    def __init__(self, max_entries: int) -> None:
        self.data: dict[Any, tuple[float, Any, str]] = {}
        self.index: dict[str, set[Any]] = {}
        self.max_entries = max_entries
        self.lock = threading.Lock()
        #: Bumped by every invalidation and clear: a value read from L2 before
        #: a bump may already be stale, so it is not put into L1.
        self.epoch = 0

    def set(
        self, key: Any, value: Any, skey: str, ttl: float, epoch: int | None = None
    ) -> None:
        """Store ``value``, unless an invalidation came after ``epoch`` was read."""
        with self.lock:
            if epoch is not None and epoch != self.epoch:
                return
            data = self.data
            if len(data) >= self.max_entries:
                self._evict()
            old = data.get(key)
            if old is not None and old[2] != skey:
                self._unindex(key, old[2])
            data[key] = (time.monotonic() + ttl, value, skey)
            self.index.setdefault(skey, set()).add(key)

    def _unindex(self, key: Any, skey: str) -> None:
        keys = self.index.get(skey)
        if keys is not None:
            keys.discard(key)
            if not keys:
                del self.index[skey]

    def _evict(self) -> None:
        now = time.monotonic()
        data = self.data
        expired = [k for k, e in data.items() if e[0] <= now]
        for k in expired:
            self._unindex(k, data.pop(k)[2])
        excess = len(data) - self.max_entries + max(1, self.max_entries // 10)
        if excess > 0:
            for k in list(itertools.islice(data, excess)):
                self._unindex(k, data.pop(k)[2])

    def drop(self, skey: str, extra: Any = None) -> None:
        with self.lock:
            self.epoch += 1
            for key in self.index.pop(skey, ()):
                self.data.pop(key, None)
            if extra is not None:
                entry = self.data.pop(extra, None)
                if entry is not None:
                    self._unindex(extra, entry[2])

    def drop_prefix(self, prefix: str) -> None:
        with self.lock:
            self.epoch += 1
            for skey in [s for s in self.index if s.startswith(prefix)]:
                for key in self.index.pop(skey):
                    self.data.pop(key, None)

    def clear(self) -> None:
        with self.lock:
            self.epoch += 1
            self.data.clear()
            self.index.clear()


class DjangoL1:
    """L1 in a Django cache alias (``SCALEKIT["CACHE"]["L1"]``), keyed by the L2 key."""

    def __init__(self, alias: str) -> None:
        self.alias = alias
        self.cache = caches[alias]
        self.epoch = 0
        self.lock = threading.Lock()

    def get(self, skey: str) -> Any:
        entry = self.cache.get(skey, _MISS)
        if entry is _MISS or not (isinstance(entry, tuple) and len(entry) == 2):
            return _MISS
        expires, value = entry
        return value if expires > time.time() else _MISS

    def set(self, skey: str, value: Any, ttl: float) -> None:
        self.cache.set(skey, (time.time() + ttl, value), timeout=math.ceil(ttl))

    def drop(self, skey: str, extra: Any = None) -> None:
        self.epoch += 1
        self.cache.delete(skey)

    def drop_prefix(self, prefix: str) -> None:
        self.clear()

    def clear(self) -> None:
        # We cannot list our keys in a Django cache: the alias should be ours.
        self.epoch += 1
        self.cache.clear()


# --- L2 ---------------------------------------------------------------------------

_MISS: Any = object()
_token_base = os.urandom(8).hex()
_token_count = itertools.count()


def _token() -> str:
    """A lock token unique across processes (random base) and calls (counter)."""
    return f"{_token_base}{next(_token_count)}"


_ENVELOPE_TAG = "scalekit.cache/1"


def _envelope(value: Any, timeout: float | None, delta: float) -> tuple[Any, ...]:
    """What L2 stores: a tag (so ``None`` is a value, not a miss), expiry, cost."""
    expires = time.time() + timeout if timeout is not None else 0.0
    return (_ENVELOPE_TAG, value, expires, delta)


def _is_envelope(obj: object) -> bool:
    return isinstance(obj, tuple) and len(obj) == 4 and obj[0] == _ENVELOPE_TAG


# Results of L2Adapter.read_or_lock (PENDING: the holder handed the lock
# back, see _HAND_BACK):
HIT, LOCKED, BUSY, PENDING, DOWN = "hit", "locked", "busy", "pending", "down"

#: How long a key's generation outlives its last invalidate(): a computation
#: that started before that invalidation and runs longer than this could
#: still write its value (then the value only lives until its timeout).
_GEN_TTL_MS = 24 * 3600 * 1000

# Each key has a generation, ``key:gen`` (absent = '0'), that invalidate()
# increments. A computation reads it together with taking its lock and writes
# only if it has not changed, so a value computed across an invalidate() is
# never stored, even when the computation outlives its lock.
#
# ``key:inv`` holds the time (ms) of the key's last invalidate() for
# PRIMARY_AFTER_INVALIDATE_SECONDS; the scripts hand it out with the
# generation, as ``"gen@ms"``, so that whichever process recomputes the key
# knows to read from the primary (Store.needs_primary).
#
# KEYS[1] value, KEYS[2] lock, KEYS[3] generation, KEYS[4] invalidation time;
# ARGV[1] token, ARGV[2] lock ms. Returns the value (a bulk string), or
# {1, generation} (lock taken) or {0, generation, lock} (someone else holds
# it; a lock starting with '!' was handed back by a holder that computed
# inside a transaction and stores the value only after its commit).
_READ_OR_LOCK = """
local v = redis.call('GET', KEYS[1])
if v then return v end
local gen = redis.call('GET', KEYS[3]) or '0'
local inv = redis.call('GET', KEYS[4])
if inv then gen = gen .. '@' .. inv end
if redis.call('SET', KEYS[2], ARGV[1], 'NX', 'PX', ARGV[2]) then return {1, gen} end
return {0, gen, redis.call('GET', KEYS[2]) or ''}
"""
# KEYS[1] lock, KEYS[2] generation, KEYS[3] invalidation time; ARGV[1] token,
# ARGV[2] lock ms: the lock for an early refresh. Returns the generation, or
# false if the lock is taken.
_LOCK = """
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  local gen = redis.call('GET', KEYS[2]) or '0'
  local inv = redis.call('GET', KEYS[3])
  if inv then gen = gen .. '@' .. inv end
  return gen
end
return false
"""
# KEYS[1] value, KEYS[2] lock, KEYS[3] generation; ARGV[1] token ('' = no
# lock), ARGV[2] value, ARGV[3] ttl ms ('0' = none), ARGV[4] generation read
# before computing ('' = write whatever it is now). Releases our lock; writes
# unless the generation changed or the lock now belongs to someone else.
_WRITE_AND_RELEASE = """
local lock = redis.call('GET', KEYS[2])
if ARGV[1] ~= '' and lock then
  if lock ~= ARGV[1] then return 0 end
  redis.call('DEL', KEYS[2])
end
if ARGV[4] ~= '' and (redis.call('GET', KEYS[3]) or '0') ~= ARGV[4] then return 0 end
if ARGV[3] == '0' then redis.call('SET', KEYS[1], ARGV[2])
else redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3]) end
return 1
"""
# KEYS[1] lock; ARGV[1] token, ARGV[2] lock ms: extend the lock if it is
# ours (LockKeeper). Returns 1, or 0 if it expired or another caller holds it.
_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""
# KEYS[1] lock; ARGV[1] token, ARGV[2] lock ms: if the lock is ours, make it
# '!' .. token for ARGV[2] ms: "computed inside a transaction, stored after
# the commit": waiters compute by themselves rather than wait for it.
_HAND_BACK = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('SET', KEYS[1], '!' .. ARGV[1], 'PX', ARGV[2])
end
return 1
"""
# KEYS[1] lock; ARGV[1] token: delete the lock if it is ours.
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end
return 1
"""
# KEYS[1] value, KEYS[2] generation, KEYS[3] invalidation time; ARGV[1]
# channel, ARGV[2] message, ARGV[3] generation ttl ms, ARGV[4] now (ms),
# ARGV[5] primary window ms ('0': none). A computation in flight keeps its
# lock (others still wait for it) but will not write.
_INVALIDATE = """
redis.call('INCR', KEYS[2])
redis.call('PEXPIRE', KEYS[2], ARGV[3])
if ARGV[5] ~= '0' then redis.call('SET', KEYS[3], ARGV[4], 'PX', ARGV[5]) end
redis.call('DEL', KEYS[1])
if ARGV[1] ~= '' then redis.call('PUBLISH', ARGV[1], ARGV[2]) end
return 1
"""


class _Script:
    """A Lua script run by its SHA1 (EVALSHA), loaded again on NOSCRIPT.

    No client is needed to make one: a cluster client may not exist yet."""

    __slots__ = ("text", "sha")

    def __init__(self, text: str) -> None:
        self.text = text
        self.sha = hashlib.sha1(text.encode()).hexdigest()


_READ_OR_LOCK_SCRIPT = _Script(_READ_OR_LOCK)
_LOCK_SCRIPT = _Script(_LOCK)
_WRITE_SCRIPT = _Script(_WRITE_AND_RELEASE)
_INVALIDATE_SCRIPT = _Script(_INVALIDATE)
_RELEASE_SCRIPT = _Script(_RELEASE)
_RENEW_SCRIPT = _Script(_RENEW)
_HAND_BACK_SCRIPT = _Script(_HAND_BACK)


class Unstorable(TypeError):
    """A value the L2 serializer cannot encode (e.g. it holds a lock or a socket)."""


_unstorable_logged: set[str] = set()


def _log_unstorable(name: str, exc: BaseException) -> None:
    """One WARNING per function: its values are returned but never stored."""
    if name not in _unstorable_logged:
        _unstorable_logged.add(name)
        logger.warning(
            "%s: a value could not be serialized for L2 (%s: %s); it is returned "
            "but not cached.",
            name,
            type(exc.__cause__ or exc).__name__,
            exc.__cause__ or exc,
        )


def _log_undecodable(alias: str, key: str, exc: BaseException) -> None:
    logger.warning(
        "L2 cache %r: %s could not be decoded (%s: %s); deleted, recomputing.",
        alias,
        key,
        type(exc).__name__,
        exc,
    )


class RedisL2:
    """L2 on a django-redis cache: raw redis-py client for scripts and pub/sub.

    The client may be a single server's, a Sentinel-managed master's
    (django-redis ``SentinelClient``) or a cluster's
    (:class:`django_scalekit.cluster.RedisClusterClient`). On a cluster every
    key a script touches must be in one slot, so keys are wrapped in a hash
    tag: ``{<made key>}``, ``{<made key>}:lock``, ``:gen``, ``:inv``.
    """

    pubsub = True
    #: How long ``key:inv`` lives: the store's PRIMARY_AFTER_INVALIDATE_SECONDS.
    primary_ms = 0

    def __init__(self, alias: str, cache: Any) -> None:
        from redis.exceptions import NoScriptError
        from redis.sentinel import SentinelConnectionPool

        from django_scalekit.cluster import RedisClusterClient

        self.alias = alias
        self.cache = cache
        self.errors: tuple[type[BaseException], ...] = _redis_errors()
        self.no_script = NoScriptError
        self.cluster = isinstance(cache.client, RedisClusterClient)
        try:
            self.client: Any = cache.client.get_client(write=True)
        except self.errors:
            # A cluster client asks its nodes for the slot map when it is
            # made: while none answers, each use tries again (paced by the
            # breaker, as any L2 error is).
            self.client = _Unconnected(self)
        self.encode = cache.client.encode
        self.decode = cache.client.decode
        self.fast_pickle = _plain_pickle(cache.client)
        pool = (
            None
            if isinstance(self.client, _Unconnected)
            else getattr(self.client, "connection_pool", None)
        )
        #: The Sentinel-managed pool of the master, which the listener keeps
        #: on the current master (``follow_master``).
        self.sentinel_pool = pool if isinstance(pool, SentinelConnectionPool) else None
        # A cluster has only database 0.
        db = 0 if pool is None else pool.connection_kwargs.get("db", 0)
        # Pub/sub channels are server-wide, not per database: name the db
        # and the cache's KEY_PREFIX/VERSION so sites sharing a server stay apart.
        self.channel = f"scalekit:cache:{db}:{cache.make_key('invalidate')}"

    def key(self, skey: str) -> str:
        """The L2 key of ``skey``; its lock, generation and invalidation time
        add ``:lock``, ``:gen`` and ``:inv``."""
        key: str = self.cache.make_key(skey)
        # A hash tag puts the four in one cluster slot (CLUSTER KEYSLOT
        # hashes only what is inside the first {...}).
        return "{" + key + "}" if self.cluster else key

    def _eval(self, script: _Script, keys: list[str], args: list[Any]) -> Any:
        try:
            return self.client.evalsha(script.sha, len(keys), *keys, *args)
        except self.no_script:
            # Redis restarted or ran SCRIPT FLUSH. On a cluster this loads the
            # script on every primary.
            self.client.script_load(script.text)
            return self.client.evalsha(script.sha, len(keys), *keys, *args)

    def read_or_lock(self, skey: str, token: str, lock_ms: int) -> tuple[str, Any]:
        """``(HIT, value)``, or ``(LOCKED, BUSY or PENDING, generation)``."""
        # The hot path of every L1 miss: EVALSHA straight, loading the script
        # only when Redis lost its script cache (NOSCRIPT).
        key = self.key(skey)
        keys = [key, key + ":lock", key + ":gen", key + ":inv"]
        try:
            raw = self.client.execute_command(
                "EVALSHA", _READ_OR_LOCK_SCRIPT.sha, 4, *keys, token, lock_ms
            )
        except self.no_script:
            raw = self._eval(_READ_OR_LOCK_SCRIPT, keys, [token, lock_ms])
        if isinstance(raw, bytes):
            try:
                if self.fast_pickle and raw[:1] == b"\x80":
                    # What the backend's decode() ends in, without its int()
                    # attempt (our values are never stored as integers).
                    return HIT, pickle.loads(raw)
                return HIT, self.decode(raw)
            except self.errors:
                raise
            except Exception as exc:  # e.g. the pickled class was renamed
                _log_undecodable(self.alias, key, exc)
                self.client.delete(key)
                return self.read_or_lock(skey, token, lock_ms)
        if raw[0] == 1:
            return LOCKED, raw[1].decode()
        return (PENDING if raw[2][:1] == b"!" else BUSY), raw[1].decode()

    def try_lock(self, skey: str, token: str, lock_ms: int) -> str | None:
        """Take the lock: the generation, or None if someone holds it."""
        key = self.key(skey)
        gen = self._eval(
            _LOCK_SCRIPT, [key + ":lock", key + ":gen", key + ":inv"], [token, lock_ms]
        )
        return None if gen is None else cast(bytes, gen).decode()

    def generation(self, skey: str) -> str:
        """The key's generation, with ``@ms`` if it was invalidated recently."""
        key = self.key(skey)
        gen, inv = self.client.mget([key + ":gen", key + ":inv"])
        text = "0" if gen is None else cast(bytes, gen).decode()
        return text if inv is None else f"{text}@{cast(bytes, inv).decode()}"

    def write(
        self,
        skey: str,
        envelope: tuple[Any, ...],
        timeout: float | None,
        token: str,
        gen: str = "",
    ) -> bool:
        try:
            payload = self.encode(envelope, allow_int=False)
        except Exception as exc:
            raise Unstorable(str(exc)) from exc
        # '0' tells the script "no expiry": only for None (timeout=0 values
        # never get here, see _compute_and_store).
        ms = max(1, int(timeout * 1000)) if timeout is not None else 0
        key = self.key(skey)
        return bool(
            self._eval(
                _WRITE_SCRIPT,
                [key, key + ":lock", key + ":gen"],
                [token, payload, ms, gen.partition("@")[0]],
            )
        )

    def release(self, skey: str, token: str) -> None:
        self._eval(_RELEASE_SCRIPT, [self.key(skey) + ":lock"], [token])

    def renew(self, skey: str, token: str, lock_ms: int) -> bool:
        """Extend our lock by ``lock_ms``; False if it is no longer ours."""
        return bool(
            self._eval(_RENEW_SCRIPT, [self.key(skey) + ":lock"], [token, lock_ms])
        )

    def hand_back(self, skey: str, token: str, lock_ms: int) -> str:
        """Our value waits for a commit: waiters stop waiting (``PENDING``).
        The token that ``write()`` must then use."""
        self._eval(_HAND_BACK_SCRIPT, [self.key(skey) + ":lock"], [token, lock_ms])
        return "!" + token

    def get(self, skey: str) -> Any:
        key = self.key(skey)
        raw = self.client.get(key)
        if raw is None:
            return _MISS
        try:
            return self.decode(raw)
        except self.errors:
            raise
        except Exception as exc:
            _log_undecodable(self.alias, key, exc)
            self.client.delete(key)
            return _MISS

    def invalidate(self, skeys: Iterable[str]) -> None:
        now_ms = int(time.time() * 1000)
        calls = []
        for skey in skeys:
            key = self.key(skey)
            calls.append(
                (
                    [key, key + ":gen", key + ":inv"],
                    [self.channel, skey, _GEN_TTL_MS, now_ms, self.primary_ms],
                )
            )
        if self.cluster:
            # redis-py's cluster pipelines refuse EVALSHA: one call per key.
            for keys, args in calls:
                self._eval(_INVALIDATE_SCRIPT, keys, args)
            return
        for attempt in (1, 2):
            pipe = self.client.pipeline(transaction=False)
            for keys, args in calls:
                pipe.execute_command("EVALSHA", _INVALIDATE_SCRIPT.sha, 3, *keys, *args)
            try:
                pipe.execute()
                return
            except self.no_script:
                # Running the calls again is harmless: a second INCR of a
                # generation, a second DEL and PUBLISH.
                if attempt == 2:
                    raise
                self.client.script_load(_INVALIDATE_SCRIPT.text)

    def invalidate_prefix(self, prefix: str) -> int:
        if self.cluster:
            deleted = self._delete_tagged(prefix)
        else:
            deleted = int(self.cache.delete_pattern(prefix + "*"))
        self.publish("*" + prefix)
        return deleted

    def _delete_tagged(self, prefix: str) -> int:
        """Delete every cluster node's keys of ``prefix`` (a SCAN of each primary)."""
        pattern = "{" + self.cache.client.make_pattern(prefix + "*")
        deleted = 0
        batch: list[bytes] = []
        for key in self.client.scan_iter(match=pattern, count=1000):
            batch.append(key)
            if len(batch) == 500:
                deleted += int(self.client.delete(*batch))
                batch = []
        if batch:
            deleted += int(self.client.delete(*batch))
        return deleted

    def publish(self, message: str) -> None:
        """Send an invalidation message to every process's listener."""
        self.client.publish(self.channel, message)

    def ping(self) -> bool:
        return bool(self.client.ping())

    def follow_master(self, pubsub: Any) -> bool:
        """Sentinel: ask for the master's address; True if ``pubsub`` is on
        another server.

        When the address changes redis-py drops the pool's connections to the
        old master. Asking matters after a failover that leaves the old master
        running: Sentinel reconfigures it as a replica (and closes its clients)
        only seconds later, and until then it accepts writes nobody will read.
        """
        pool: Any = self.sentinel_pool
        if pool is None:
            return False
        address = tuple(pool.get_master_address())
        connection = pubsub.connection
        return connection is not None and (connection.host, connection.port) != address


class _Unconnected:
    """Stands for an L2 client that could not be made yet; made on first use."""

    def __init__(self, l2: RedisL2) -> None:
        self.l2 = l2

    def __getattr__(self, name: str) -> Any:
        client = self.l2.cache.client.get_client(write=True)  # or raises
        self.l2.client = client
        return getattr(client, name)


class GenericL2:
    """L2 on any other Django cache: ``get``/``add``/``set``/``delete``.

    No pub/sub: other processes' L1 entries age out after ``L1_TIMEOUT``
    (check ``scalekit.W203``), and a computation finishing after an
    ``invalidate()`` may still write its value.
    """

    pubsub = False
    channel = ""

    def __init__(self, alias: str, cache: BaseCache) -> None:
        self.alias = alias
        self.cache = cache
        # Backends raise their own client libraries' errors; these cover
        # sockets, memcached, redis-py and database caches.
        self.errors: tuple[type[BaseException], ...] = _backend_errors()

    def read_or_lock(self, skey: str, token: str, lock_ms: int) -> tuple[str, Any]:
        value = self.get(skey)
        if value is not _MISS:
            return HIT, value
        if self.try_lock(skey, token, lock_ms) is not None:
            return LOCKED, ""
        return BUSY, ""

    def try_lock(self, skey: str, token: str, lock_ms: int) -> str | None:
        """'' (no generations here) once the lock is ours, None if it is taken."""
        timeout = max(1, lock_ms // 1000)
        return "" if self.cache.add(skey + ":lock", token, timeout=timeout) else None

    def generation(self, skey: str) -> str:
        return ""

    def write(
        self,
        skey: str,
        envelope: tuple[Any, ...],
        timeout: float | None,
        token: str,
        gen: str = "",
    ) -> bool:
        try:
            self.cache.set(skey, envelope, timeout=timeout)
        except self.errors:
            raise
        except Exception as exc:  # the backend's serializer refused the value
            if token:
                self.release(skey, token)
            raise Unstorable(str(exc)) from exc
        if token:
            self.release(skey, token)
        return True

    def release(self, skey: str, token: str) -> None:
        # Not atomic: a Django cache has no compare-and-delete. A lock that
        # expired in between and was taken by another process may be deleted.
        if self.cache.get(skey + ":lock") == token:
            self.cache.delete(skey + ":lock")

    def hand_back(self, skey: str, token: str, lock_ms: int) -> str:
        self.release(skey, token)
        return ""

    def renew(self, skey: str, token: str, lock_ms: int) -> bool:
        # Not atomic either (see release()).
        if self.cache.get(skey + ":lock") != token:
            return False
        return bool(self.cache.touch(skey + ":lock", max(1, lock_ms // 1000)))

    def get(self, skey: str) -> Any:
        try:
            return self.cache.get(skey, _MISS)
        except self.errors:
            raise
        except Exception as exc:  # e.g. the pickled class was renamed
            _log_undecodable(self.alias, skey, exc)
            self.cache.delete(skey)
            return _MISS

    def invalidate(self, skeys: Iterable[str]) -> None:
        keys = []
        for skey in skeys:
            keys += [skey, skey + ":lock"]
        self.cache.delete_many(keys)

    def invalidate_prefix(self, prefix: str) -> int:
        raise TypeError(
            f"invalidate_all() needs a django-redis L2; CACHES[{self.alias!r}] is "
            f"{_type_name(self.cache)}."
        )


def _backend_errors() -> tuple[type[BaseException], ...]:
    from django.db import DatabaseError

    errors: list[type[BaseException]] = [OSError, DatabaseError]
    try:
        import redis

        errors.append(redis.exceptions.RedisError)
    except ImportError:  # pragma: no cover - redis-py is not installed
        pass
    return tuple(errors)


def _redis_errors() -> tuple[type[BaseException], ...]:
    import redis
    from django_redis.exceptions import (  # type: ignore[import-untyped]
        ConnectionInterrupted,
    )

    return (
        redis.exceptions.RedisError,
        # Not a RedisError: e.g. no cluster node answers.
        redis.exceptions.RedisClusterException,
        ConnectionInterrupted,
        OSError,
    )


def _plain_pickle(client: Any) -> bool:
    """Whether a django-redis client stores values as plain pickles: its
    default serializer, no compressor. Then a pickle (protocol 2 and up, so
    starting with PROTO, never an integer) decodes with pickle.loads alone."""
    from django_redis.compressors.identity import (  # type: ignore[import-untyped]
        IdentityCompressor,
    )
    from django_redis.serializers.pickle import (  # type: ignore[import-untyped]
        PickleSerializer,
    )

    return (
        type(getattr(client, "_serializer", None)) is PickleSerializer
        and type(getattr(client, "_compressor", None)) is IdentityCompressor
    )


def _is_django_redis(cache: object) -> bool:
    try:
        from django_redis.cache import RedisCache  # type: ignore[import-untyped]
        from django_redis.client import DefaultClient  # type: ignore[import-untyped]
    except ImportError:  # the [redis] extra is not installed
        return False
    # Sharded clients spread keys over servers: our scripts need one server.
    return (
        isinstance(cache, RedisCache)
        and isinstance(cache.client, DefaultClient)
        and "Shard" not in type(cache.client).__name__
    )


# --- circuit breaker ----------------------------------------------------------------


class Breaker:
    """Open after an L2 error; after ``retry`` seconds let one call probe L2."""

    def __init__(self, alias: str, retry: float) -> None:
        self.alias = alias
        self.retry = retry
        #: 0 while closed, else the monotonic time of the next probe.
        self.open_until = 0.0
        self.down_since = 0.0
        self.probing = False
        self.lock = threading.Lock()
        L2_AVAILABLE.labels(alias).set(1)

    def allow(self) -> bool:
        if not self.open_until:
            return True
        with self.lock:
            if not self.open_until:
                return True
            if self.probing or time.monotonic() < self.open_until:
                return False
            self.probing = True
            return True

    def end_probe(self) -> None:
        """A probe ended without telling whether L2 is back: allow another."""
        if self.probing:
            with self.lock:
                self.probing = False

    def success(self) -> None:
        if not self.open_until:
            return
        with self.lock:
            if not self.open_until:
                return
            self.open_until = 0.0
            self.probing = False
            down_for = time.monotonic() - self.down_since
        L2_AVAILABLE.labels(self.alias).set(1)
        logger.info(
            "L2 cache %r is available again after %.1f s.", self.alias, down_for
        )

    def failure(self, exc: BaseException) -> None:
        L2_ERRORS.labels(self.alias).inc()
        with self.lock:
            was_closed = not self.open_until
            now = time.monotonic()
            if was_closed:
                self.down_since = now
            self.open_until = now + self.retry
            self.probing = False
        if was_closed:
            L2_AVAILABLE.labels(self.alias).set(0)
            logger.warning(
                "L2 cache %r is unavailable (%s: %s); serving from L1 and computing "
                "values, retrying every %.0f s.",
                self.alias,
                type(exc).__name__,
                exc,
                self.retry,
            )


# --- invalidation listener -------------------------------------------------------------

_PING_EVERY = 5.0
#: How often a listener on a Sentinel-managed L2 asks Sentinel for the master.
_FOLLOW_MASTER_EVERY = 1.0
#: First wait before subscribing again after the link dropped (doubling to 5 s).
_RESUBSCRIBE_BACKOFF = 0.1


class Listener(threading.Thread):
    """Subscribes to the L2's invalidation channel and drops keys from L1.

    Messages published while we are not subscribed are lost. So when the link
    drops while Redis answers, L1 is cleared and not filled again (every call
    goes to L2: ``Store.fill_l1``) until the subscription is confirmed; on
    every (re)subscription L1 is cleared once more.
    """

    def __init__(self, store: Store) -> None:
        super().__init__(name=f"scalekit-cache-{store.l2_alias}", daemon=True)
        self.store = store
        self.stopped = threading.Event()
        self.subscribed = threading.Event()
        #: Set when run() returns: cheaper for every L1 miss than is_alive().
        self.finished = False
        self.pubsub: Any = None

    def run(self) -> None:
        try:
            self._run()
        finally:
            self.finished = True

    def _run(self) -> None:
        backoff = _RESUBSCRIBE_BACKOFF
        l2 = cast(RedisL2, self.store.l2)
        while not self.stopped.is_set():
            pubsub = None
            try:
                pubsub = self.pubsub = l2.client.pubsub()
                pubsub.subscribe(l2.channel)
                last_rx = last_ping = last_follow = time.monotonic()
                while not self.stopped.is_set():
                    message = pubsub.get_message(timeout=0.5)
                    now = time.monotonic()
                    if message is not None:
                        last_rx = now
                        self.handle(message)
                        backoff = _RESUBSCRIBE_BACKOFF
                    elif now - last_rx > 3 * _PING_EVERY:
                        raise ConnectionError("no answer to PING on the pub/sub link")
                    if now - last_ping > _PING_EVERY:
                        pubsub.ping()
                        last_ping = now
                    if l2.sentinel_pool and now - last_follow > _FOLLOW_MASTER_EVERY:
                        last_follow = now
                        if self.on_old_master(l2, pubsub):
                            self.store.master_moved()
                            # Messages published on the new master do not
                            # reach the old one: subscribe there.
                            raise ConnectionError("the master moved (Sentinel)")
            except Exception as exc:
                if self.subscribed.is_set():
                    self.subscribed.clear()
                    self.store.link_dropped()
                logger.debug("invalidation listener for %r: %r", l2.alias, exc)
                self.stopped.wait(backoff)
                backoff = min(backoff * 2, 5.0)
            finally:
                if pubsub is not None:
                    with contextlib.suppress(Exception):
                        pubsub.close()
        self.subscribed.clear()

    def on_old_master(self, l2: RedisL2, pubsub: Any) -> bool:
        try:
            return l2.follow_master(pubsub)
        except l2.errors as exc:
            # Sentinel unreachable: the link to the master may still be fine.
            logger.debug("invalidation listener for %r: %r", l2.alias, exc)
            return False

    def handle(self, message: dict[str, Any]) -> None:
        kind = message.get("type")
        if kind == "subscribe":
            self.store.l1.clear()
            self.subscribed.set()
        elif kind == "message":
            data = message["data"]
            skey = data.decode() if isinstance(data, bytes) else str(data)
            if skey.startswith("*"):
                self.store.l1.drop_prefix(skey[1:])
            else:
                self.store.l1.drop(skey)
                self.store.note_invalidated(skey)


# --- lock keeper ---------------------------------------------------------------------------------


class _Held:
    """A lock this process holds while it computes the key's value."""

    __slots__ = ("store", "skey", "token", "due")

    def __init__(self, store: Store, skey: str, token: str, due: float) -> None:
        self.store = store
        self.skey = skey
        self.token = token
        self.due = due


class LockKeeper(threading.Thread):
    """Extends the L2 locks of this process's computations in progress.

    One daemon thread per process: every ``LOCK_TIMEOUT / 3`` it renews each
    lock held (only if its token is still ours), so a computation slower than
    ``LOCK_TIMEOUT`` keeps the other processes waiting for it instead of
    computing too. A crashed process renews nothing: its locks expire within
    ``LOCK_TIMEOUT``.
    """

    def __init__(self) -> None:
        super().__init__(name="scalekit-cache-lock-keeper", daemon=True)
        self.held: dict[int, _Held] = {}
        self.ids = itertools.count(1)
        self.wake = threading.Condition()

    def hold(self, store: Store, skey: str, token: str) -> int:
        """Start renewing ``skey``'s lock; the id to pass to ``drop()``."""
        due = time.monotonic() + store.lock_ms / 3000
        with self.wake:
            ident = next(self.ids)
            self.held[ident] = _Held(store, skey, token, due)
            self.wake.notify()
        return ident

    def drop(self, ident: int) -> None:
        with self.wake:
            self.held.pop(ident, None)

    def run(self) -> None:
        while True:
            with self.wake:
                now = time.monotonic()
                due = [h for h in self.held.values() if h.due <= now]
                if not due:
                    soonest = min((h.due for h in self.held.values()), default=None)
                    self.wake.wait(None if soonest is None else soonest - now)
                    continue
                for h in due:
                    h.due = now + h.store.lock_ms / 3000
            for h in due:
                self.renew(h)

    def renew(self, held: _Held) -> None:
        store = held.store
        try:
            kept = store.l2_call(store.l2.renew, held.skey, held.token, store.lock_ms)
        except Exception:  # never let one failure stop the thread
            logger.debug("renewing the lock of %s failed", held.skey, exc_info=True)
            return
        if kept is False:
            # Expired (the process stalled) and maybe taken by another
            # caller: our write will be refused if so (_WRITE_AND_RELEASE).
            with self.wake:
                for ident, h in list(self.held.items()):
                    if h is held:
                        del self.held[ident]


_keeper: LockKeeper | None = None
_keeper_lock = threading.Lock()


def _keeper_hold(store: Store, skey: str, token: str) -> tuple[LockKeeper, int]:
    """Have this process's lock keeper renew ``skey``'s lock (started on first use)."""
    global _keeper
    keeper = _keeper
    if keeper is None:
        with _keeper_lock:
            keeper = _keeper
            if keeper is None:
                keeper = _keeper = LockKeeper()
                keeper.start()
    return keeper, keeper.hold(store, skey, token)


# --- the store: one per (L1, L2) pair -----------------------------------------------------


class Flight:
    """A computation in progress in this process, waited for by other threads.

    The future is made by the first waiter: most computations have none.
    """

    __slots__ = ("owner", "future")

    def __init__(self, owner: object) -> None:
        self.owner = owner
        self.future: Future[Any] | None = None


_COMPUTE_YOURSELF: Any = object()
#: Store.max_wait in LOCK_TIMEOUTs (30 s by default).
_MAX_WAIT_LOCKS = 6
#: Bound of Store.recent (keys invalidated within the primary window).
_RECENT_MAX = 10_000


class Uncacheable(Generic[T]):
    """Returned by a compute function whose result must not be stored."""

    __slots__ = ("value",)

    def __init__(self, value: T) -> None:
        self.value = value


class Store:
    """L1, L2, breaker, listener and in-flight table for one (L1, L2) pair."""

    def __init__(
        self, cfg: conf.CacheSettings, l1_alias: str | None, l2_alias: str
    ) -> None:
        self.l1_alias = l1_alias
        self.l2_alias = l2_alias
        self.lock_ms = int(cfg.lock_timeout * 1000)
        #: How long a caller waits for another process's computation while
        #: its lock is held (renewed), before it computes by itself.
        self.max_wait = _MAX_WAIT_LOCKS * cfg.lock_timeout
        self.beta = cfg.early_refresh_beta
        self.l1: LocalL1 | DjangoL1 = (
            LocalL1(cfg.l1_max_entries) if l1_alias is None else DjangoL1(l1_alias)
        )
        backend = caches[l2_alias]
        self.l2: RedisL2 | GenericL2 = (
            RedisL2(l2_alias, backend)
            if _is_django_redis(backend)
            else GenericL2(l2_alias, backend)
        )
        self.breaker = Breaker(l2_alias, cfg.circuit_retry_seconds)
        window = cfg.primary_after_invalidate
        #: PRIMARY_AFTER_INVALIDATE_SECONDS (None: the router's PINNING_SECONDS).
        self.primary_window = conf.get().pinning_seconds if window is None else window
        if isinstance(self.l2, RedisL2):
            self.l2.primary_ms = math.ceil(self.primary_window * 1000)
        #: L2 key -> monotonic time until which it is recomputed on the
        #: primary: invalidations seen by this process (its own, and those
        #: received by pub/sub), for L2s without ``key:inv`` or while L2 is down.
        self.recent: dict[str, float] = {}
        self.flights: dict[str, Flight] = {}
        self.flights_lock = threading.Lock()
        #: invalidations that could not reach L2, replayed when it is back.
        self.pending: deque[str] = deque(maxlen=10_000)
        self.listener: Listener | None = None

    # -- L2 calls through the breaker --

    def l2_call(self, method: Callable[..., T], *args: Any) -> T | None:
        """Call an L2 method; None (and the breaker opens) if L2 fails or is out."""
        breaker = self.breaker
        # A closed breaker (open_until == 0) needs neither allow() nor
        # success(): the hit path saves both calls.
        if breaker.open_until and not breaker.allow():
            return None
        try:
            if self.pending and breaker.open_until:
                # L2 is back (this is the probe): invalidations made during
                # the outage go first, before anything is read or written.
                self.replay_invalidations()
            result = method(*args)
        except self.l2.errors as exc:
            breaker.failure(exc)
            return None
        except BaseException:
            # Not an L2 failure (an unstorable value, a cancelled thread): if
            # this call was the probe, let the next one probe again.
            breaker.end_probe()
            raise
        if breaker.open_until:
            # Back after an outage: values kept in L1 meanwhile may have been
            # invalidated by processes that could still reach L2.
            breaker.success()
            self.l1.clear()
        return result

    def link_dropped(self) -> None:
        """The pub/sub link dropped: invalidations may be missed from now on.

        If Redis answers (others can invalidate), L1 is cleared now, and
        ``fill_l1`` keeps it empty until the listener subscribes again. If it
        does not, the breaker opens and L1 keeps serving (nobody's invalidation
        can reach L2 either; they are replayed, and L1 is cleared, when it is
        back)."""
        if self.l2_call(cast(RedisL2, self.l2).ping) is not None:
            self.l1.clear()

    def master_moved(self) -> None:
        """Sentinel names a new master: invalidations of the last
        ``primary_window`` seconds may have reached only the old one (it takes
        writes until Sentinel demotes it, seconds later), so they are made
        again on the new one."""
        now = time.monotonic()
        keys = [skey for skey, until in list(self.recent.items()) if until > now]
        if keys and self.l2_call(self.l2.invalidate, keys) is None:
            self.pending.extend(keys)

    def ensure_listener(self) -> None:
        listener = self.listener
        if self.l2.pubsub and (listener is None or listener.finished):
            with self.flights_lock:
                if self.listener is None or not self.listener.is_alive():
                    self.listener = Listener(self)
                    self.listener.start()

    def stop(self) -> None:
        if self.listener is not None:
            self.listener.stopped.set()

    def note_invalidated(self, skey: str) -> None:
        """Recompute ``skey`` on the primary for the next ``primary_window`` s."""
        if self.primary_window <= 0:
            return
        recent = self.recent
        now = time.monotonic()
        if len(recent) >= _RECENT_MAX:
            for key, until in list(recent.items()):
                if until <= now:
                    recent.pop(key, None)
            if len(recent) >= _RECENT_MAX:
                recent.clear()  # a burst of invalidations: L2's key:inv remains
        recent[skey] = now + self.primary_window

    def needs_primary(self, skey: str, gen: str | None) -> bool:
        """Whether ``skey`` was invalidated within ``primary_window``: its
        recomputation must not read a replica that may not have the write yet."""
        window = self.primary_window
        if window <= 0:
            return False
        if gen and "@" in gen:
            try:
                at = int(gen.rpartition("@")[2]) / 1000
            except ValueError:
                return True
            if time.time() - at < window:
                return True
        until = self.recent.get(skey)
        return until is not None and until > time.monotonic()

    def invalidate(self, skeys: list[str], l1keys: Iterable[Any] = ()) -> None:
        for skey, l1key in itertools.zip_longest(skeys, l1keys):
            self.l1.drop(skey, l1key)
            self.note_invalidated(skey)
        if self.l2_call(self.l2.invalidate, skeys) is None:
            pending = self.pending
            if len(pending) + len(skeys) > cast(int, pending.maxlen):
                # The oldest are dropped: their L2 values stay until they expire.
                logger.warning(
                    "L2 cache %r: more than %d invalidations are waiting for it to "
                    "come back; the oldest are dropped and their L2 entries will be "
                    "served until they expire.",
                    self.l2_alias,
                    pending.maxlen,
                )
            pending.extend(skeys)

    def replay_invalidations(self) -> None:
        keys = []
        while self.pending:
            keys.append(self.pending.popleft())
        try:
            self.l2.invalidate(keys)
        except BaseException:
            self.pending.extendleft(reversed(keys))
            raise

    # -- the miss path --

    def fill_l1(
        self, l1key: Any, skey: str, value: Any, ttl: float, epoch: int
    ) -> None:
        if ttl <= 0:
            return
        listener = self.listener
        if (
            listener is not None
            and not listener.subscribed.is_set()
            and not self.breaker.open_until
        ):
            # Redis answers but we are not subscribed: an invalidation could
            # be missed, so L1 stays empty until the listener subscribes.
            return
        if isinstance(self.l1, LocalL1):
            # Unhashable arguments have no L1 key: such calls are not kept.
            if l1key is not None:
                self.l1.set(l1key, value, skey, ttl, epoch)
        elif self.l1.epoch == epoch:
            self.l1.set(skey, value, ttl)

    def l1_ttl(self, spec: Spec, envelope: tuple[Any, ...]) -> float:
        ttl = spec.l1_timeout
        if envelope[2]:
            ttl = min(ttl, envelope[2] - time.time())
        return ttl

    def join_flight(self, skey: str, owner: object) -> tuple[Flight, bool]:
        with self.flights_lock:
            flight = self.flights.get(skey)
            if flight is None:
                flight = self.flights[skey] = Flight(owner)
                return flight, True
            if flight.future is None and flight.owner != owner:
                flight.future = Future()
            return flight, False

    def end_flight(
        self,
        skey: str,
        flight: Flight,
        result: Any = None,
        error: BaseException | None = None,
    ) -> None:
        """Remove the flight and hand its outcome to the threads waiting for it."""
        with self.flights_lock:
            if self.flights.get(skey) is flight:
                del self.flights[skey]
            future = flight.future
        if future is not None:
            if error is not None:
                future.set_exception(error)
            else:
                future.set_result(result)

    def early(self, envelope: tuple[Any, ...]) -> bool:
        """XFetch: recompute early with a probability rising towards expiry."""
        expires, delta = envelope[2], envelope[3]
        if not expires or not self.beta or delta <= 0:
            return False
        return bool(
            time.time() - delta * self.beta * math.log(random.random() or 1e-12)
            >= expires
        )


class Spec:
    """A decorated function's or view's options, resolved against settings."""

    __slots__ = ("name", "timeout", "l1_timeout", "store", "primary")

    def __init__(
        self,
        name: str,
        timeout: float | None,
        l1_timeout: float,
        store: Store,
        primary: bool = False,
    ) -> None:
        self.name = name
        self.timeout = timeout
        self.l1_timeout = l1_timeout
        self.store = store
        #: ``read_from="primary"``: always compute under ``use_primary()``.
        self.primary = primary


# --- registry of stores, reset on settings changes and after fork -----------------------

_stores: dict[tuple[str | None, str], Store] = {}
_stores_lock = threading.Lock()
_NO_L1: dict[Any, Any] = {}
_functions: list[CachedFunction] = []


def _store(l1_alias: str | None, l2_alias: str) -> Store:
    key = (l1_alias, l2_alias)
    store = _stores.get(key)
    if store is None:
        with _stores_lock:
            store = _stores.get(key)
            if store is None:
                store = _stores[key] = Store(conf.get().cache, l1_alias, l2_alias)
    return store


def reset() -> None:
    """Forget every store, L1 entry and listener (settings changed, or tests)."""
    with _stores_lock:
        for store in _stores.values():
            store.stop()
        _stores.clear()
        for fn in _functions:
            fn._unbind()


def _after_fork() -> None:
    # Threads do not survive fork(): a child starts with no listener, no
    # in-flight computations and locks that nobody holds.
    global _stores_lock, _token_base, _keeper, _keeper_lock
    _stores_lock = threading.Lock()
    _token_base = os.urandom(8).hex()
    _keeper, _keeper_lock = None, threading.Lock()
    _stores.clear()
    for fn in _functions:
        fn._unbind()


if hasattr(os, "register_at_fork"):  # pragma: no branch
    os.register_at_fork(after_in_child=_after_fork)


# --- @cached ---------------------------------------------------------------------------------

_DEFAULT: Any = object()
_fids = itertools.count(1)


def _check_timeout(
    name: str, value: object, *, allow_none: bool, decorator: str = "cached"
) -> None:
    """ValueError naming the argument unless ``value`` is a number >= 0
    (or None, if allowed). 0 is Django's "do not cache", None "no expiry"."""
    if value is _DEFAULT or (value is None and allow_none):
        return
    if (
        not isinstance(value, (int, float))
        or isinstance(value, bool)
        or not math.isfinite(value)
        or value < 0
    ):
        expected = ">= 0" + (" or None" if allow_none else "")
        raise ValueError(
            f"{decorator}({name}={value!r}): {name} must be a number {expected}"
        )


class CachedFunction:
    """State behind one ``@cached`` function (``wrapper._scalekit``)."""

    def __init__(
        self,
        func: Callable[..., Any],
        *,
        timeout: float | None,
        l1_timeout: float | None,
        key_prefix: str | None,
        version: int | str | None,
        l1: str | None,
        l2: str | None,
        key: Callable[..., Any] | None,
        name: str | None = None,
        read_from: str | None = None,
    ) -> None:
        _check_name(
            "cached",
            func,
            name is not None or key_prefix is not None or version is not None,
        )
        self.func = func
        self.name = name or f"{func.__module__}.{func.__qualname__}"
        self.fid = next(_fids)
        self._timeout = timeout
        self._l1_timeout = l1_timeout
        self._key_prefix = key_prefix
        self.version = version
        self._l1 = l1
        self._l2 = l2
        self.key_func = key
        self.read_from = read_from
        self.signature = inspect.signature(func)
        self.is_async = inspect.iscoroutinefunction(func)
        self.l1: dict[Any, Any] = _NO_L1
        self.spec: Spec | None = None
        self._prefix: str | None = None
        self.l1_pending = 0
        params = list(self.signature.parameters.values())
        #: Parameter names when every one is plain positional-or-keyword:
        #: a call with exactly that many positional arguments needs no bind().
        self._plain_names: tuple[str, ...] | None = (
            tuple(p.name for p in params)
            if all(p.kind is p.POSITIONAL_OR_KEYWORD for p in params)
            else None
        )
        #: For make_key's fast path: what precedes the arguments' encoding,
        #: and each argument's ``name=`` (None: a key() function decides).
        self._key_head = f"{self.name}|{self.version}|"
        self._arg_heads: tuple[str, ...] | None = (
            tuple(n + "=" for n in self._plain_names)
            if self._plain_names is not None and key is None
            else None
        )
        self._hits_l1 = HITS.labels(self.name, "l1")
        self._hits_l2 = HITS.labels(self.name, "l2")
        self._misses = MISSES.labels(self.name)
        _functions.append(self)

    def _unbind(self) -> None:
        self.l1 = _NO_L1
        self.spec = None
        self._prefix = None

    def resolve(self) -> Spec:
        spec = self.spec
        if spec is None:
            cfg = conf.get().cache
            l1_alias = self._l1 if self._l1 is not _DEFAULT else cfg.l1
            store = _store(l1_alias, self._l2 if self._l2 is not None else cfg.l2)
            timeout = cfg.timeout if self._timeout is _DEFAULT else self._timeout
            l1_timeout = (
                cfg.l1_timeout if self._l1_timeout is None else self._l1_timeout
            )
            spec = self.spec = Spec(
                self.name, timeout, l1_timeout, store, self.read_from == "primary"
            )
            if l1_timeout > 0 and isinstance(store.l1, LocalL1):
                self.l1 = store.l1.data
        return spec

    def prefix(self) -> str:
        if self._prefix is None:
            cfg = conf.get().cache
            prefix = (
                self._key_prefix if self._key_prefix is not None else cfg.key_prefix
            )
            version = f":v{self.version}" if self.version is not None else ""
            self._prefix = f"{prefix}:{_readable_name(self.name)}{version}:"
        return self._prefix

    def make_key(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
        """The stable L2 key of a call; TypeError naming an unkeyable argument."""
        heads = self._arg_heads
        if heads is not None and not kwargs and len(args) == len(heads):
            # The common call, plain str/int positional arguments: the text
            # _encode() would make, without its dispatch (the same key).
            text = self._key_head
            for head, value in zip(heads, args):  # noqa: B905 - same lengths
                kind = type(value)
                if kind is int:
                    text += f"{head}i{value};"
                elif kind is str:
                    text += f"{head}s{value!r};"
                else:
                    break
            else:
                return (self._prefix or self.prefix()) + _digest(text)
        out: list[str] = [self.name, "|", str(self.version), "|"]
        if self.key_func is not None:
            _encode(self.key_func(*args, **kwargs), out, "key()")
        else:
            names = self._plain_names
            if not kwargs and names is not None and len(args) == len(names):
                arguments: Any = zip(names, args, strict=True)
            else:
                bound = self.signature.bind(*args, **kwargs)
                bound.apply_defaults()
                arguments = bound.arguments.items()
            try:
                for name, value in arguments:
                    out.append(name + "=")
                    _encode(value, out, name)
                    out.append(";")
            except TypeError as exc:
                raise TypeError(f"{self.name}(): {exc}") from None
        return self.prefix() + _digest("".join(out))

    def flush_hits(self) -> None:
        pending, self.l1_pending = self.l1_pending, 0
        if pending:
            self._hits_l1.inc(pending)

    # -- sync --

    def fetch(self, l1key: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """The L1-miss path of a call."""
        if self.l1_pending:
            self.flush_hits()
        spec = self.spec or self.resolve()
        store = spec.store
        try:
            skey = self.make_key(args, kwargs)
        except TypeError:
            if not _binds(self.signature, args, kwargs):
                return self.func(*args, **kwargs)  # raise the function's own TypeError
            raise
        if isinstance(store.l1, DjangoL1) and spec.l1_timeout > 0:
            value = store.l1.get(skey)
            if value is not _MISS:
                self._hits_l1.inc()
                return value
        return _obtain(self, spec, skey, l1key, lambda: self.func(*args, **kwargs))

    def refresh(
        self, args: tuple[Any, ...], kwargs: dict[str, Any], strict: bool
    ) -> Any:
        if not strict and _in_atomic():
            # The value may read uncommitted rows (and be rolled back), so it
            # is stored only after the commit: one recomputation then, however
            # many connections are in atomic() and refresh() calls were made.
            _AfterCommit(
                functools.partial(self.refresh_after_commit, args, kwargs),
                ("refresh", self.fid, self.make_key(args, kwargs)),
            ).schedule()
            return self.func(*args, **kwargs)
        spec = self.resolve()
        skey = self.make_key(args, kwargs)
        gen = spec.store.l2_call(spec.store.l2.generation, skey)
        started = time.perf_counter()
        if spec.primary or spec.store.needs_primary(skey, gen):
            with routers.use_primary():
                value = self.func(*args, **kwargs)
        else:
            value = self.func(*args, **kwargs)
        COMPUTATIONS.labels(self.name, "refresh").inc()
        _store_refreshed(
            self,
            spec,
            skey,
            _l1key(self.fid, args, kwargs),
            value,
            started,
            strict,
            gen,
        )
        return value

    async def arefresh(
        self, args: tuple[Any, ...], kwargs: dict[str, Any], strict: bool
    ) -> Any:
        spec = self.resolve()
        skey = self.make_key(args, kwargs)
        gen = await _l2_async(spec.store, spec.store.l2.generation, skey)
        started = time.perf_counter()
        if spec.primary or spec.store.needs_primary(skey, gen):
            async with routers.use_primary():
                value = await self.func(*args, **kwargs)
        else:
            value = await self.func(*args, **kwargs)
        COMPUTATIONS.labels(self.name, "refresh").inc()
        await sync_to_async(_store_refreshed, thread_sensitive=False)(
            self,
            spec,
            skey,
            _l1key(self.fid, args, kwargs),
            value,
            started,
            strict,
            gen,
        )
        return value

    def invalidate(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self.invalidate_now(args, kwargs)
        _after_commit(functools.partial(self.invalidate_now, args, kwargs))

    def invalidate_now(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        spec = self.resolve()
        INVALIDATIONS.labels(self.name).inc()
        spec.store.invalidate(
            [self.make_key(args, kwargs)], [_l1key(self.fid, args, kwargs)]
        )

    def refresh_after_commit(
        self, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> None:
        """On commit of the transaction ``refresh()`` ran in: invalidate (so
        the recomputation reads the primary) and store the committed value."""
        self.invalidate_now(args, kwargs)
        self.refresh(args, kwargs, strict=False)

    def invalidate_all(self) -> int:
        return _invalidate_all(self)


def _invalidate_all(owner: CachedFunction | _ViewCache) -> int:
    """Drop every entry of ``owner`` now, and again on commit (``_after_commit``)."""

    def now() -> int:
        return _invalidate_prefix(owner.resolve(), owner.prefix())

    deleted = now()
    _after_commit(now)
    return deleted


def _invalidate_prefix(spec: Spec, prefix: str) -> int:
    """Delete every L2 key under ``prefix`` and drop them from every process's L1."""
    INVALIDATIONS.labels(spec.name).inc()
    spec.store.l1.drop_prefix(prefix)
    deleted = spec.store.l2_call(spec.store.l2.invalidate_prefix, prefix)
    if deleted is None:
        raise CacheUnavailable(f"L2 cache {spec.store.l2_alias!r} is unavailable.")
    return deleted


def _after_commit(callback: Callable[[], Any]) -> bool:
    """Run ``callback`` again after the commit of each of this thread's
    connections that is inside ``transaction.atomic()``; False if none is.

    Invalidating only before the commit leaves a window: another request may
    recompute from the still-committed old row and store it for the whole
    timeout. ``robust``: a failing callback does not stop the others.
    """
    aliases = [
        c.alias for c in connections.all(initialized_only=True) if _in_transaction(c)
    ]
    for alias in aliases:
        transaction.on_commit(callback, using=alias, robust=True)
    return bool(aliases)


class _AfterCommit:
    """A callback run once, after every atomic block of this thread's
    connections has committed (nothing on a rollback).

    Registered on each connection inside ``atomic()``; it runs when the last
    of them commits. A connection that rolls back drops its registration, so
    the callback never runs: a value read from the rows of a transaction that
    rolled back on one database is not stored because another committed.
    With a ``key``, a callback of the same key already waiting in the same or
    an enclosing block is not registered again (``refresh()`` called twice
    recomputes once).
    """

    __slots__ = ("callback", "key", "pending")

    def __init__(self, callback: Callable[[], Any], key: object = None) -> None:
        self.callback = callback
        self.key = key
        self.pending: set[str] = set()

    def __eq__(self, other: object) -> bool:
        if self.key is None or not isinstance(other, _AfterCommit):
            return self is other
        return self.key == other.key

    def __hash__(self) -> int:
        return id(self) if self.key is None else hash(self.key)

    def schedule(self) -> bool:
        """Register on every connection inside atomic(); False if none is."""
        inside = [
            c for c in connections.all(initialized_only=True) if _in_transaction(c)
        ]
        if not inside:
            return False
        if self.key is not None:
            first = inside[0]
            blocks = set(first.savepoint_ids)
            for sids, func, *_ in first.run_on_commit:
                if (
                    isinstance(func, _Committed)
                    and func.owner == self
                    and sids <= blocks
                ):
                    return True  # already waiting: rolled back only with us
        self.pending = {c.alias for c in inside}
        for conn in inside:
            transaction.on_commit(
                _Committed(self, conn.alias), using=conn.alias, robust=True
            )
        return True

    def committed(self, alias: str) -> None:
        self.pending.discard(alias)
        if not self.pending:
            self.callback()


class _Committed:
    """One connection's commit of an ``_AfterCommit``."""

    __slots__ = ("alias", "owner")

    def __init__(self, owner: _AfterCommit, alias: str) -> None:
        self.owner = owner
        self.alias = alias

    def __call__(self) -> None:
        self.owner.committed(self.alias)


def _l1key(fid: int, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    key = (fid, args) if not kwargs else (fid, args, tuple(kwargs.items()))
    try:
        hash(key)
    except TypeError:
        return None
    return key


def _binds(
    signature: inspect.Signature, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> bool:
    try:
        signature.bind(*args, **kwargs)
    except TypeError:
        return False
    return True


def _store_refreshed(
    fn: CachedFunction,
    spec: Spec,
    skey: str,
    l1key: Any,
    value: Any,
    started: float,
    strict: bool,
    gen: str | None,
) -> None:
    """Store a refreshed value; ``gen``: the key's generation before computing."""
    store = spec.store
    if spec.timeout == 0:  # not stored, as in Django
        return
    envelope = _envelope(value, spec.timeout, time.perf_counter() - started)
    try:
        written = store.l2_call(
            store.l2.write, skey, envelope, spec.timeout, "", gen or ""
        )
    except Unstorable as exc:
        _log_unstorable(spec.name, exc)
        if strict:
            raise CacheUnavailable(
                f"{fn.name}: the value could not be serialized for L2 ({exc})."
            ) from exc
        return
    # Other processes drop their L1 copy and read the new value from L2.
    if written and store.l2.pubsub:
        store.l2_call(cast(RedisL2, store.l2).publish, skey)
    store.l1.drop(skey, l1key)
    if written is False:  # invalidated while we computed: do not keep it
        return
    store.fill_l1(l1key, skey, value, store.l1_ttl(spec, envelope), store.l1.epoch)
    if written is None and strict:
        raise CacheUnavailable(
            f"{fn.name}: L2 cache {store.l2_alias!r} is unavailable; the value was "
            "computed but not stored."
        )


def _obtain(
    fn: CachedFunction | _ViewCache,
    spec: Spec,
    skey: str,
    l1key: Any,
    compute: Callable[[], Any],
) -> Any:
    """Sync L1-miss path: coalesce threads, then L2 read-or-lock, compute, write."""
    store = spec.store
    owner = threading.get_ident()
    flight, leader = store.join_flight(skey, owner)
    if not leader:
        if flight.owner == owner:  # a recursive call with the same arguments
            return _unwrap(compute())
        LOCK_WAITS.labels(spec.name, "thread").inc()
        result = cast(Future[Any], flight.future).result()
        if result is _COMPUTE_YOURSELF:
            return _unwrap(compute())
        return result
    try:
        result = _lead(fn, spec, skey, l1key, compute)
    except Exception as exc:
        store.end_flight(skey, flight, error=exc)
        raise
    except BaseException:
        # Interrupted (KeyboardInterrupt, SystemExit): nothing to hand on,
        # the waiting threads compute for themselves.
        store.end_flight(skey, flight, _COMPUTE_YOURSELF)
        raise
    return _land(store, skey, flight, result)


def _land(store: Store, skey: str, flight: Flight, result: Any) -> Any:
    """Hand the leader's ``result`` to the threads and tasks waiting on
    ``flight``; return what the leader's caller gets.

    A value only this caller may see (``Uncacheable``: computed inside a
    transaction) sends the waiters to compute their own."""
    if isinstance(result, Uncacheable):
        store.end_flight(skey, flight, _COMPUTE_YOURSELF)
        return result.value
    store.end_flight(skey, flight, result)
    return result


def _unwrap(value: Any) -> Any:
    return value.value if isinstance(value, Uncacheable) else value


def _lead(
    fn: CachedFunction | _ViewCache,
    spec: Spec,
    skey: str,
    l1key: Any,
    compute: Callable[[], Any],
) -> Any:
    store = spec.store
    store.ensure_listener()
    epoch = store.l1.epoch
    token = _token()
    delay = 0.002
    deadline = 0.0
    while True:
        found = store.l2_call(store.l2.read_or_lock, skey, token, store.lock_ms)
        kind, envelope = found if found is not None else (DOWN, _MISS)
        if kind == HIT and _is_envelope(envelope):
            fn._hits_l2.inc()
            if store.early(envelope):
                gen = store.l2_call(store.l2.try_lock, skey, token, store.lock_ms)
                if gen is not None:
                    return _compute_and_store(
                        fn,
                        spec,
                        skey,
                        l1key,
                        compute,
                        token,
                        gen,
                        epoch,
                        "early",
                        envelope,
                    )
            if spec.l1_timeout > 0:
                ttl = store.l1_ttl(spec, envelope)
                store.fill_l1(l1key, skey, envelope[1], ttl, epoch)
            return envelope[1]
        if kind == BUSY:
            # The holder renews its lock while it computes; if it crashed, the
            # lock expires and the next read_or_lock of exactly one waiter
            # takes it over. Only past max_wait does a waiter compute too.
            if not deadline:
                LOCK_WAITS.labels(spec.name, "process").inc()
                deadline = time.monotonic() + store.max_wait
            if time.monotonic() < deadline:
                time.sleep(delay)
                delay = min(delay * 1.5, 0.05)
                continue
            # Still held after max_wait: compute without the lock, and write
            # unless the key was invalidated since (``envelope`` is the generation).
            kind, token = LOCKED, ""
        elif kind == PENDING:
            # Waiting would serialize callers that are all inside transactions
            # (ATOMIC_REQUESTS): compute without the lock.
            kind, token = LOCKED, ""
        fn._misses.inc()
        if kind == HIT:  # not our envelope: overwrite it, unless invalidated
            kind, token, envelope = LOCKED, "", store.l2_call(store.l2.generation, skey)
        return _compute_and_store(
            fn,
            spec,
            skey,
            l1key,
            compute,
            token if kind == LOCKED else "",
            envelope if kind == LOCKED else "",
            epoch,
            "miss" if kind != DOWN else "l2_down",
        )


def _compute_and_store(
    fn: CachedFunction | _ViewCache,
    spec: Spec,
    skey: str,
    l1key: Any,
    compute: Callable[[], Any],
    token: str,
    gen: str | None,
    epoch: int,
    reason: str,
    stale: tuple[Any, ...] | None = None,
) -> Any:
    """Compute; store unless the key's generation moved past ``gen`` meanwhile.

    Inside ``transaction.atomic()`` the value may come from uncommitted rows:
    it is returned to this caller only (``Uncacheable``: threads waiting for
    it compute their own) and stored after the commit, not on rollback."""
    store = spec.store
    keeper, held = _keeper_hold(store, skey, token) if token else (None, 0)
    started = time.perf_counter()
    try:
        if spec.primary or store.needs_primary(skey, gen):
            with routers.use_primary():
                value = compute()
        else:
            value = compute()
    except BaseException as exc:
        if keeper is not None:
            keeper.drop(held)
        if token:
            store.l2_call(store.l2.release, skey, token)
        if stale is not None and isinstance(exc, Exception):
            # An early refresh failed: the value is still valid.
            logger.warning("early refresh of %s failed", spec.name, exc_info=True)
            return stale[1]
        raise
    if keeper is not None:
        keeper.drop(held)
    COMPUTATIONS.labels(spec.name, reason).inc()
    if not isinstance(value, Uncacheable) and _in_atomic():
        # Handed back now: holding the lock until the commit could deadlock
        # (our transaction waiting for a row lock of a transaction waiting for
        # this lock), and releasing it would let waiters take it one by one.
        if token:
            token = store.l2_call(store.l2.hand_back, skey, token, store.lock_ms) or ""
        if spec.timeout != 0 and reason != "l2_down":
            _AfterCommit(
                functools.partial(
                    _store_committed,
                    spec,
                    skey,
                    l1key,
                    value,
                    time.perf_counter() - started,
                    token,
                    "?" if gen is None else gen,
                    epoch,
                )
            ).schedule()
        return Uncacheable(value)
    if isinstance(value, Uncacheable) or spec.timeout == 0:
        # timeout=0, as in Django: not stored (concurrent callers still share
        # this computation).
        if token:
            store.l2_call(store.l2.release, skey, token)
        return value
    envelope = _envelope(value, spec.timeout, time.perf_counter() - started)
    if reason != "l2_down":
        if gen is None:  # L2 failed after the lock was taken
            gen = "?"  # match no generation: do not write over an invalidation
        try:
            written = store.l2_call(
                store.l2.write, skey, envelope, spec.timeout, token, gen
            )
        except Unstorable as exc:
            if token:
                store.l2_call(store.l2.release, skey, token)
            _log_unstorable(spec.name, exc)
            return value
        if written is False:  # invalidated while we computed: do not keep it
            return value
    store.fill_l1(l1key, skey, value, store.l1_ttl(spec, envelope), epoch)
    return value


def _in_transaction(conn: Any) -> bool:
    """Whether ``conn`` is inside an ``atomic()`` that will commit some day.

    The transaction a ``TestCase`` (or pytest-django's ``django_db``) wraps
    each test in never commits: code under test there behaves as outside any
    transaction (as Django's ``durable`` check does), or no miss would ever
    be stored in a test.
    """
    return conn.in_atomic_block and any(
        not getattr(block, "_from_testcase", False) for block in conn.atomic_blocks
    )


def _in_atomic() -> bool:
    """Whether one of this thread's database connections is inside atomic()."""
    return any(_in_transaction(c) for c in connections.all(initialized_only=True))


def _store_committed(
    spec: Spec,
    skey: str,
    l1key: Any,
    value: Any,
    delta: float,
    token: str,
    gen: str,
    epoch: int,
) -> None:
    """Store a value computed inside a transaction, now committed, unless the
    key was invalidated since it was computed (its generation moved) or
    another caller holds its lock (``token``: our handed-back lock, deleted)."""
    store = spec.store
    envelope = _envelope(value, spec.timeout, delta)
    try:
        written = store.l2_call(
            store.l2.write, skey, envelope, spec.timeout, token, gen
        )
    except Unstorable as exc:
        _log_unstorable(spec.name, exc)
        return
    if written is not False:
        store.fill_l1(l1key, skey, value, store.l1_ttl(spec, envelope), epoch)


# --- async --------------------------------------------------------------------------------


def _l2_async(
    store: Store, method: Callable[..., T], *args: Any
) -> Awaitable[T | None]:
    return sync_to_async(store.l2_call, thread_sensitive=False)(method, *args)


async def _afill_l1(
    store: Store, l1key: Any, skey: str, value: Any, ttl: float, epoch: int
) -> None:
    """``fill_l1`` from async code: an L1 in a Django cache alias is written
    in a thread (a dict, the default L1, is not I/O)."""
    if isinstance(store.l1, DjangoL1) and ttl > 0:
        await sync_to_async(store.fill_l1, thread_sensitive=False)(
            l1key, skey, value, ttl, epoch
        )
    else:
        store.fill_l1(l1key, skey, value, ttl, epoch)


def _release_soon(store: Store, skey: str, token: str) -> None:
    """Release a lock from a cancelled task without awaiting (one more
    cancellation must not leave the lock held)."""
    asyncio.get_running_loop().run_in_executor(
        None, store.l2_call, store.l2.release, skey, token
    )


async def _aobtain(
    fn: CachedFunction | _ViewCache,
    spec: Spec,
    skey: str,
    l1key: Any,
    compute: Callable[[], Awaitable[Any]],
) -> Any:
    store = spec.store
    owner = asyncio.current_task()
    flight, leader = store.join_flight(skey, owner)
    if not leader:
        if flight.owner is owner:
            return _unwrap(await compute())
        LOCK_WAITS.labels(spec.name, "thread").inc()
        result = await asyncio.wrap_future(cast(Future[Any], flight.future))
        if result is _COMPUTE_YOURSELF:
            return _unwrap(await compute())
        return result
    try:
        result = await _alead(fn, spec, skey, l1key, compute)
    except Exception as exc:
        store.end_flight(skey, flight, error=exc)
        raise
    except BaseException:
        # Cancelled (e.g. the client went away): the waiting tasks were not,
        # so they compute for themselves rather than getting CancelledError.
        store.end_flight(skey, flight, _COMPUTE_YOURSELF)
        raise
    return _land(store, skey, flight, result)


async def _alead(
    fn: CachedFunction | _ViewCache,
    spec: Spec,
    skey: str,
    l1key: Any,
    compute: Callable[[], Awaitable[Any]],
) -> Any:
    store = spec.store
    store.ensure_listener()
    epoch = store.l1.epoch
    token = _token()
    delay = 0.002
    deadline = 0.0
    while True:
        found = await _l2_async(
            store, store.l2.read_or_lock, skey, token, store.lock_ms
        )
        kind, envelope = found if found is not None else (DOWN, _MISS)
        if kind == HIT and _is_envelope(envelope):
            fn._hits_l2.inc()
            if store.early(envelope):
                gen = await _l2_async(
                    store, store.l2.try_lock, skey, token, store.lock_ms
                )
                if gen is not None:
                    return await _acompute_and_store(
                        fn,
                        spec,
                        skey,
                        l1key,
                        compute,
                        token,
                        gen,
                        epoch,
                        "early",
                        envelope,
                    )
            await _afill_l1(
                store, l1key, skey, envelope[1], store.l1_ttl(spec, envelope), epoch
            )
            return envelope[1]
        if kind == BUSY:
            if not deadline:  # as in _lead
                LOCK_WAITS.labels(spec.name, "process").inc()
                deadline = time.monotonic() + store.max_wait
            if time.monotonic() < deadline:
                await asyncio.sleep(delay)
                delay = min(delay * 1.5, 0.05)
                continue
            kind, token = LOCKED, ""
        elif kind == PENDING:
            kind, token = LOCKED, ""
        fn._misses.inc()
        if kind == HIT:
            kind, token = LOCKED, ""
            envelope = await _l2_async(store, store.l2.generation, skey)
        return await _acompute_and_store(
            fn,
            spec,
            skey,
            l1key,
            compute,
            token if kind == LOCKED else "",
            envelope if kind == LOCKED else "",
            epoch,
            "miss" if kind != DOWN else "l2_down",
        )


async def _acompute_and_store(
    fn: CachedFunction | _ViewCache,
    spec: Spec,
    skey: str,
    l1key: Any,
    compute: Callable[[], Awaitable[Any]],
    token: str,
    gen: str | None,
    epoch: int,
    reason: str,
    stale: tuple[Any, ...] | None = None,
) -> Any:
    store = spec.store
    keeper, held = _keeper_hold(store, skey, token) if token else (None, 0)
    started = time.perf_counter()
    try:
        if spec.primary or store.needs_primary(skey, gen):
            async with routers.use_primary():
                value = await compute()
        else:
            value = await compute()
    except Exception:
        if keeper is not None:
            keeper.drop(held)
        if token:
            await _l2_async(store, store.l2.release, skey, token)
        if stale is not None:
            logger.warning("early refresh of %s failed", spec.name, exc_info=True)
            return stale[1]
        raise
    except BaseException:  # cancelled: release without awaiting again
        if keeper is not None:
            keeper.drop(held)
        if token:
            _release_soon(store, skey, token)
        raise
    if keeper is not None:
        keeper.drop(held)
    COMPUTATIONS.labels(spec.name, reason).inc()
    if isinstance(value, Uncacheable) or spec.timeout == 0:
        if token:
            await _l2_async(store, store.l2.release, skey, token)
        return value
    envelope = _envelope(value, spec.timeout, time.perf_counter() - started)
    if reason != "l2_down":
        try:
            written = await _l2_async(
                store,
                store.l2.write,
                skey,
                envelope,
                spec.timeout,
                token,
                "?" if gen is None else gen,
            )
        except Unstorable as exc:
            if token:
                await _l2_async(store, store.l2.release, skey, token)
            _log_unstorable(spec.name, exc)
            return value
        if written is False:
            return value
    await _afill_l1(store, l1key, skey, value, store.l1_ttl(spec, envelope), epoch)
    return value


# --- the decorator ------------------------------------------------------------------------------


def cached(
    func: Callable[..., Any] | None = None,
    *,
    timeout: float | None = _DEFAULT,
    l1_timeout: float | None = None,
    key_prefix: str | None = None,
    version: int | str | None = None,
    l1: str | None = _DEFAULT,
    l2: str | None = None,
    key: Callable[..., Any] | None = None,
    name: str | None = None,
    read_from: str | None = None,
) -> Any:
    """Cache a function's results in this process (L1) and in Redis (L2).

    ``timeout`` (seconds) bounds the L2 entry, as in Django: ``None`` = no
    expiry, ``0`` = not stored (concurrent misses still compute once),
    ``l1_timeout`` how long this process keeps its copy (``0`` disables L1):
    it bounds staleness when an invalidation cannot be delivered. ``version``
    goes into the key: bump it when the function's results change shape.
    ``l1``/``l2`` name CACHES aliases (defaults: ``SCALEKIT["CACHE"]``; ``l1``
    ``None`` is the built-in per-process store). ``key`` maps the call's
    arguments to what identifies the result, when not all of them do.
    ``name`` replaces ``module.qualname`` in keys and metrics; a function
    defined inside another function (or a lambda) must have one (or a
    ``key_prefix``/``version``), else its copies would share keys: TypeError.
    ``read_from="primary"`` computes every value under ``routers.use_primary()``
    (by default only recomputations within ``PRIMARY_AFTER_INVALIDATE_SECONDS``
    of the key's ``invalidate()`` do).

    The result gains ``invalidate(*args, **kwargs)`` (every process),
    ``refresh(*args, **kwargs)``, ``invalidate_all()`` and ``key(*args, **kwargs)``.
    """
    _check_timeout("timeout", timeout, allow_none=True)
    _check_timeout("l1_timeout", l1_timeout, allow_none=True)
    if key is not None and not callable(key):
        raise TypeError(f"cached(key={key!r}): key must be a callable")
    if version is not None and not isinstance(version, (int, str)):
        raise TypeError(f"cached(version={version!r}): version must be an int or str")
    if name is not None and (not isinstance(name, str) or not name):
        raise TypeError(f"cached(name={name!r}): name must be a non-empty str")
    if read_from not in (None, "primary"):
        raise ValueError(
            f"cached(read_from={read_from!r}): read_from must be None (the router "
            'decides) or "primary"'
        )

    def decorate(f: Callable[..., Any]) -> Any:
        if not callable(f):
            raise TypeError(f"cached() decorates functions, not {_type_name(f)}")
        fn = CachedFunction(
            f,
            timeout=timeout,
            l1_timeout=l1_timeout,
            key_prefix=key_prefix,
            version=version,
            l1=l1,
            l2=l2,
            key=key,
            name=name,
            read_from=read_from,
        )
        fid = fn.fid
        fetch = fn.fetch
        monotonic = time.monotonic

        if fn.is_async:

            @functools.wraps(f)
            async def awrapper(*args: Any, **kwargs: Any) -> Any:
                l1key: Any = (
                    (fid, args) if not kwargs else (fid, args, tuple(kwargs.items()))
                )
                try:
                    entry = fn.l1.get(l1key)
                except TypeError:
                    l1key, entry = None, None
                if entry is not None and entry[0] > monotonic():
                    fn.l1_pending += 1
                    if fn.l1_pending >= L1_HIT_BATCH:
                        fn.flush_hits()
                    return entry[1]
                return await _afetch(fn, l1key, args, kwargs)

            wrapper: Any = awrapper
        else:

            @functools.wraps(f)
            def wrapper(*args: Any, **kwargs: Any) -> Any:
                l1key: Any = (
                    (fid, args) if not kwargs else (fid, args, tuple(kwargs.items()))
                )
                try:
                    entry = fn.l1.get(l1key)
                except TypeError:  # unhashable arguments: keyed by the L2 key
                    l1key, entry = None, None
                if entry is not None and entry[0] > monotonic():
                    fn.l1_pending += 1
                    if fn.l1_pending >= L1_HIT_BATCH:
                        fn.flush_hits()
                    return entry[1]
                return fetch(l1key, args, kwargs)

        def invalidate(*args: Any, **kwargs: Any) -> None:
            """Remove this call's value from L2 and from every process's L1;
            inside ``transaction.atomic()``, again after the commit."""
            fn.invalidate(args, kwargs)

        def refresh(*args: Any, **kwargs: Any) -> Any:
            """Recompute this call's value and store it, whatever is cached
            (inside ``transaction.atomic()``: stored after the commit)."""
            if fn.is_async:
                return fn.arefresh(args, kwargs, strict=False)
            return fn.refresh(args, kwargs, strict=False)

        def make_key(*args: Any, **kwargs: Any) -> str:
            """The L2 key of this call (before the cache's KEY_PREFIX/VERSION)."""
            return fn.make_key(args, kwargs)

        async def ainvalidate(*args: Any, **kwargs: Any) -> None:
            """``invalidate()`` for async code: the L2 call runs in a thread."""
            # The transaction, if any, is the caller's (its connections), not
            # the worker thread's.
            _after_commit(functools.partial(fn.invalidate_now, args, kwargs))
            await sync_to_async(fn.invalidate_now, thread_sensitive=False)(args, kwargs)

        wrapper.invalidate = invalidate
        wrapper.ainvalidate = ainvalidate
        wrapper.refresh = refresh
        wrapper.invalidate_all = fn.invalidate_all
        wrapper.key = make_key
        wrapper.uncached = f
        wrapper._scalekit = fn
        return wrapper

    if func is not None:
        return decorate(func)
    return decorate


async def _afetch(
    fn: CachedFunction, l1key: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> Any:
    fn.flush_hits()
    spec = fn.resolve()
    store = spec.store
    try:
        skey = fn.make_key(args, kwargs)
    except TypeError:
        if not _binds(fn.signature, args, kwargs):
            return await fn.func(*args, **kwargs)
        raise
    if isinstance(store.l1, DjangoL1) and spec.l1_timeout > 0:
        value = await sync_to_async(store.l1.get, thread_sensitive=False)(skey)
        if value is not _MISS:
            fn._hits_l1.inc()
            return value
    return await _aobtain(fn, spec, skey, l1key, lambda: fn.func(*args, **kwargs))


# --- @cached_view ---------------------------------------------------------------------------------

_SAFE_METHODS = frozenset({"GET", "HEAD"})
_CDN_TAGS_ATTR = "_scalekit_cdn_tags"  # django_scalekit.cdn.add_tags
_COMMA = re.compile(r"\s*,\s*")


def _freeze(
    response: HttpResponseBase,
) -> Uncacheable[HttpResponseBase] | tuple[Any, ...]:
    """The storable form of a response, or Uncacheable when it must not be stored."""
    if (
        response.streaming
        or response.status_code != 200
        or response.cookies
        or "Set-Cookie" in response.headers
    ):
        return Uncacheable(response)
    cache_control = {
        part.split("=", 1)[0].strip().lower()
        for part in _COMMA.split(response.headers.get("Cache-Control", ""))
    }
    if cache_control & {"private", "no-store", "no-cache"}:
        return Uncacheable(response)
    vary = _vary(response)
    if "*" in vary:
        return Uncacheable(response)
    content = cast(HttpResponse, response).content
    return (
        "response",
        response.status_code,
        response.reason_phrase,
        tuple(response.headers.items()),
        content,
        vary,
        # cdn.add_tags()/@cache_tags: the CDN middleware emits them on hits too.
        tuple(getattr(response, _CDN_TAGS_ATTR, ())),
    )


def _thaw(frozen: tuple[Any, ...]) -> HttpResponse:
    status, reason, headers, content = frozen[1:5]
    response = HttpResponse(content, status=status, reason=reason)
    for name, value in headers:
        response.headers[name] = value
    if len(frozen) > 6 and frozen[6]:
        setattr(response, _CDN_TAGS_ATTR, frozen[6])
    return response


def _vary(response: HttpResponseBase) -> tuple[str, ...]:
    header = response.headers.get("Vary", "")
    return tuple(sorted({h.strip().lower() for h in _COMMA.split(header) if h.strip()}))


def _check_name(kind: str, func: Callable[..., Any], explicit: bool) -> None:
    """A function made inside another has one qualname for every copy: keyed by
    it alone, ``make_loader("orders")`` would read ``make_loader("products")``'s
    values. Such a function must be given a name of its own."""
    qualname = getattr(func, "__qualname__", "")
    if explicit or ("<locals>" not in qualname and "<lambda>" not in qualname):
        return
    raise TypeError(
        f"{kind}(): {func.__module__}.{qualname} is defined inside a function or "
        "is a lambda, so every function made by that code would share one set of "
        f"cache keys. Pass {kind}(name=...) with a name unique to each one (e.g. "
        "built from the enclosing function's arguments), or key_prefix=/version=."
    )


async def _auser(request: HttpRequest) -> Any:
    """``request.user`` without loading it on the event loop."""
    auser = getattr(request, "auser", None)
    if auser is not None:  # AuthenticationMiddleware
        return await auser()
    user = getattr(request, "user", None)
    if isinstance(user, LazyObject):

        def load() -> Any:
            user.is_authenticated  # noqa: B018 - evaluates the lazy object
            return user

        return await sync_to_async(load)()
    return user


class _ViewCache:
    """State behind one ``@cached_view`` view (``view._scalekit``)."""

    def __init__(
        self,
        view: Callable[..., Any],
        timeout: float | None,
        l1_timeout: float | None,
        per_user: bool,
        key_prefix: str | None,
        l1: str | None,
        l2: str | None,
        name: str | None = None,
    ) -> None:
        _check_name("cached_view", view, name is not None or key_prefix is not None)
        self.view = view
        self.name = name or f"{view.__module__}.{view.__qualname__}"
        self.timeout = timeout
        self._l1_timeout = l1_timeout
        self.per_user = per_user
        self._key_prefix = key_prefix
        self._l1 = l1
        self._l2 = l2
        self.spec: Spec | None = None
        self._hits_l1 = HITS.labels(self.name, "l1")
        self._hits_l2 = HITS.labels(self.name, "l2")
        self._misses = MISSES.labels(self.name)
        self.is_async = inspect.iscoroutinefunction(view)

    def resolve(self) -> Spec:
        cfg = conf.get().cache
        l1_alias = self._l1 if self._l1 is not _DEFAULT else cfg.l1
        store = _store(l1_alias, self._l2 if self._l2 is not None else cfg.l2)
        timeout = cfg.timeout if self.timeout is _DEFAULT else self.timeout
        l1_timeout = cfg.l1_timeout if self._l1_timeout is None else self._l1_timeout
        return Spec(self.name, timeout, l1_timeout, store)

    def prefix(self) -> str:
        cfg = conf.get().cache
        prefix = self._key_prefix if self._key_prefix is not None else cfg.key_prefix
        return f"{prefix}:view:{_readable_name(self.name)}:"

    def credentials(self, request: HttpRequest) -> tuple[str | None, list[str]]:
        """The session cookie and the private headers (``Authorization``...) sent."""
        meta = request.META
        private = [meta[k] for k in conf.get().cdn.private_request_meta if meta.get(k)]
        return request.COOKIES.get(settings.SESSION_COOKIE_NAME), private

    def needs_user(self, request: HttpRequest) -> bool:
        """Whether the (async) view must load ``request.user`` before ``user_part``.

        Only per-user views do: without a session cookie the session-based
        user is anonymous, and loading it would read the session, which makes
        the page per-visitor for the CDN rules.
        """
        return self.per_user

    def user_part(self, request: HttpRequest, user: Any = _DEFAULT) -> str | None:
        """'' for an anonymous request, the user or session, or None: do not cache.

        A request with a session cookie or a private header (``Authorization``:
        a view may authenticate it itself, e.g. DRF) is cached only per_user.
        ``user``: ``request.user``, already loaded (async views).
        """
        session_cookie, private = self.credentials(request)
        if (session_cookie or private) and not self.per_user:
            return None
        if user is _DEFAULT:
            user = getattr(request, "user", None)
            if (
                isinstance(user, LazyObject)
                and user._wrapped is empty
                and not session_cookie
                and not self.per_user
            ):
                # AuthenticationMiddleware's user needs the session cookie to be
                # anyone: leave it unloaded (loading reads the session).
                user = None
        if user is not None and user.is_authenticated:
            return f"user:{user.pk}" if self.per_user else None
        if session_cookie:
            return f"session:{_digest(session_cookie)}"
        if private:
            return "auth:" + _digest("\n".join(private))
        return ""

    def is_per_visitor(self, request: HttpRequest, response: HttpResponseBase) -> bool:
        """After rendering: the response carries state for this visitor only
        (CSRF token, session, messages, cookies), or depends on the user in
        a way the key does not capture. The CDN middleware's rules."""
        if cdn.sets_visitor_state(request, response):
            return True
        return not self.per_user and cdn.is_per_user(request, response, conf.get().cdn)

    def url_key(self, method: str, url: str, user: str) -> str:
        return self.prefix() + "h:" + _digest(f"{method}|{url}|{user}")

    def invalidate(self, url: str, user: str = "") -> None:
        self.invalidate_now(url, user)
        _after_commit(functools.partial(self.invalidate_now, url, user))

    def invalidate_now(self, url: str, user: str = "") -> None:
        spec = self.resolve()
        INVALIDATIONS.labels(self.name).inc()
        spec.store.invalidate([self.url_key(m, url, user) for m in ("GET", "HEAD")])

    def invalidate_all(self) -> int:
        return _invalidate_all(self)


def cached_view(
    view: Callable[..., Any] | None = None,
    *,
    timeout: float | None = _DEFAULT,
    l1_timeout: float | None = None,
    per_user: bool = False,
    key_prefix: str | None = None,
    l1: str | None = _DEFAULT,
    l2: str | None = None,
    name: str | None = None,
) -> Any:
    """Cache a view's GET/HEAD 200 responses in L1 and L2, keyed on method,
    full URL, language, time zone and the request headers named in the
    response's ``Vary``.

    Never caches for an authenticated user or a request carrying a session
    cookie or ``Authorization`` (``SCALEKIT["CDN"]["PRIVATE_REQUEST_HEADERS"]``),
    unless ``per_user=True`` (then each user, session or credential has its
    own entries); never caches streaming responses (they pass through, as with
    Django's ``cache_page``), responses that set a cookie, hand out a CSRF
    token, touch the session or show flash messages, or
    ``Cache-Control: private/no-store/no-cache``. Concurrent misses of one
    page render it once. ``view.invalidate(url)`` drops a URL's pages in
    every process, ``view.invalidate_all()`` every page of the view. ``name``
    replaces ``module.qualname`` in keys and metrics
    (required for a view defined inside a function).
    """
    _check_timeout("timeout", timeout, allow_none=True, decorator="cached_view")
    _check_timeout("l1_timeout", l1_timeout, allow_none=True, decorator="cached_view")

    def decorate(v: Callable[..., Any]) -> Any:
        vc = _ViewCache(v, timeout, l1_timeout, per_user, key_prefix, l1, l2, name)
        wrapped: Any
        if inspect.iscoroutinefunction(v):

            @functools.wraps(v)
            async def wrapped(request: HttpRequest, *args: Any, **kwargs: Any) -> Any:
                user: Any = _DEFAULT
                if request.method in _SAFE_METHODS and vc.needs_user(request):
                    user = await _auser(request)
                page = _ViewCall(vc, request, user)
                if page.url_key is None:
                    return await v(request, *args, **kwargs)

                async def render() -> Any:
                    return page.rendered(await v(request, *args, **kwargs))

                async def learn() -> Any:
                    return await page.alearn(await render())

                entry = await page.alocal(page.url_key)
                if entry is _MISS:
                    entry = await _aobtain(
                        vc, page.spec, page.url_key, page.url_key, learn
                    )
                if page.response is not None or isinstance(entry, HttpResponseBase):
                    return page.response or entry
                page_key = page.page_key(entry)
                frozen = await page.alocal(page_key)
                if frozen is _MISS:

                    async def render_page() -> Any:
                        return await page.acheck_vary(entry, await render())

                    frozen = await _aobtain(
                        vc, page.spec, page_key, page_key, render_page
                    )
                else:
                    vc._hits_l1.inc()
                if page.response is not None or isinstance(frozen, HttpResponseBase):
                    return page.response or frozen
                return _thaw(frozen)

        else:

            @functools.wraps(v)
            def wrapped(request: HttpRequest, *args: Any, **kwargs: Any) -> Any:
                page = _ViewCall(vc, request)
                if page.url_key is None:
                    return v(request, *args, **kwargs)

                def render() -> Any:
                    return page.rendered(v(request, *args, **kwargs))

                entry = page.local(page.url_key)
                if entry is _MISS:
                    entry = _obtain(
                        vc,
                        page.spec,
                        page.url_key,
                        page.url_key,
                        lambda: page.learn(render()),
                    )
                if page.response is not None or isinstance(entry, HttpResponseBase):
                    return page.response or entry
                page_key = page.page_key(entry)
                frozen = page.local(page_key)
                if frozen is _MISS:
                    frozen = _obtain(
                        vc,
                        page.spec,
                        page_key,
                        page_key,
                        lambda: page.check_vary(entry, render()),
                    )
                else:
                    vc._hits_l1.inc()
                if page.response is not None or isinstance(frozen, HttpResponseBase):
                    return page.response or frozen
                return _thaw(frozen)

        def invalidate(url: str, *, user: Any = None) -> None:
            """Drop the cached pages of an absolute URL (GET and HEAD, every Vary value)."""
            vc.invalidate(url, "" if user is None else f"user:{user.pk}")

        def invalidate_all() -> int:
            """Drop every cached page of this view (every URL, user and Vary
            value) in every process: the L2 keys deleted."""
            return vc.invalidate_all()

        wrapped.invalidate = invalidate
        wrapped.invalidate_all = invalidate_all
        wrapped._scalekit = vc
        return wrapped

    if view is not None:
        return decorate(view)
    return decorate


class _ViewCall:
    """One request through a ``cached_view``.

    Two entries per page, as Django's cache middleware keeps: the URL entry
    ``(Vary header names, generation)`` and, under a key made of the URL entry,
    the active language and time zone and those headers' values, the frozen
    response. ``invalidate(url)`` drops the URL entry; the next render starts
    a new generation.
    """

    __slots__ = ("vc", "request", "spec", "url_key", "response", "locale")

    def __init__(
        self, vc: _ViewCache, request: HttpRequest, user: Any = _DEFAULT
    ) -> None:
        self.vc = vc
        self.request = request
        self.url_key: str | None = None
        #: The response this request rendered itself, if it did.
        self.response: HttpResponseBase | None = None
        if request.method in _SAFE_METHODS and vc.timeout != 0:
            part = vc.user_part(request, user)
            if part is not None:
                self.spec = vc.resolve()
                self.url_key = vc.url_key(
                    request.method, request.build_absolute_uri(), part
                )
                # LocaleMiddleware adds ``Vary: Accept-Language`` after we
                # return, and the language may come from the URL or a cookie:
                # key on what is active, as Django's _i18n_cache_key_suffix.
                self.locale = (
                    f"{translation.get_language()}|"
                    f"{timezone.get_current_timezone_name()}"
                )

    def local(self, key: str) -> Any:
        if self.spec.l1_timeout <= 0:
            return _MISS
        l1 = self.spec.store.l1
        if isinstance(l1, LocalL1):
            entry = l1.data.get(key)
            return (
                entry[1] if entry is not None and entry[0] > time.monotonic() else _MISS
            )
        return l1.get(key)

    async def alocal(self, key: str) -> Any:
        if self.spec.l1_timeout <= 0 or isinstance(self.spec.store.l1, LocalL1):
            return self.local(key)
        return await sync_to_async(self.local, thread_sensitive=False)(key)

    def page_key(self, entry: tuple[tuple[str, ...], str]) -> str:
        names, gen = entry
        values = [f"{n}={self.request.headers.get(n, '')}" for n in names]
        return (
            cast(str, self.url_key)
            + ":"
            + _digest(gen + "|" + self.locale + "|" + "\n".join(values))
        )

    def rendered(self, response: Any) -> Any:
        if hasattr(response, "render") and callable(response.render):
            response = response.render()
        self.response = response
        if self.vc.is_per_visitor(self.request, response):
            return Uncacheable(response)
        return _freeze(response)

    def _entry(self, frozen: tuple[Any, ...]) -> tuple[Any, ...]:
        """A new URL entry for a first render, and the page write it needs."""
        entry = (frozen[5], uuid.uuid4().hex[:12])
        envelope = _envelope(frozen, self.spec.timeout, 0.0)
        return entry, (self.page_key(entry), envelope, self.spec.timeout, "")

    def learn(self, frozen: Any) -> Any:
        """After a first render: store the page, return the URL entry to store."""
        if isinstance(frozen, Uncacheable):
            return frozen
        entry, write = self._entry(frozen)
        store = self.spec.store
        store.l2_call(store.l2.write, *write)
        return entry

    async def alearn(self, frozen: Any) -> Any:
        if isinstance(frozen, Uncacheable):
            return frozen
        entry, write = self._entry(frozen)
        store = self.spec.store
        await _l2_async(store, store.l2.write, *write)
        return entry

    def check_vary(self, entry: tuple[tuple[str, ...], str], frozen: Any) -> Any:
        """A page whose Vary changed is not stored; its URL entry is relearned."""
        if isinstance(frozen, Uncacheable) or frozen[5] == entry[0]:
            return frozen
        self.spec.store.invalidate([cast(str, self.url_key)])
        return Uncacheable(self.response)

    async def acheck_vary(self, entry: tuple[tuple[str, ...], str], frozen: Any) -> Any:
        if isinstance(frozen, Uncacheable) or frozen[5] == entry[0]:
            return frozen
        await sync_to_async(self.spec.store.invalidate, thread_sensitive=False)(
            [cast(str, self.url_key)]
        )
        return Uncacheable(self.response)


# --- warmers ------------------------------------------------------------------------------------------


class Args:
    """The arguments of one call to warm: ``Args(pk, lang="en")``."""

    __slots__ = ("args", "kwargs")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args = args
        self.kwargs = kwargs

    def __repr__(self) -> str:
        parts = [repr(a) for a in self.args] + [
            f"{k}={v!r}" for k, v in self.kwargs.items()
        ]
        return f"({', '.join(parts)})"


@dataclass
class Warmer:
    """A registered warmer: ``calls()`` yields the calls to warm, or does the work."""

    name: str
    func: Callable[[], Any]
    target: Any = None
    source: str = "decorator"

    @property
    def description(self) -> str:
        doc = inspect.getdoc(self.func) or ""
        return doc.splitlines()[0] if doc else ""

    def calls(self) -> Iterator[Args]:
        """The argument lists to warm (a target warmer only)."""
        for item in self.func():
            if isinstance(item, Args):
                yield item
            elif isinstance(item, tuple):
                yield Args(*item)
            else:
                yield Args(item)

    def warm_one(self, call: Args) -> None:
        fn: CachedFunction = self.target._scalekit
        if fn.is_async:
            from asgiref.sync import async_to_sync

            async_to_sync(fn.arefresh)(call.args, call.kwargs, True)
        else:
            fn.refresh(call.args, call.kwargs, strict=True)


_warmers: dict[str, Warmer] = {}


def warmer(target: Callable[..., Any] | None = None, *, name: str | None = None) -> Any:
    """Register a cache warmer for ``manage.py warm_cache``.

    ``@warmer(product_data)`` on a function returning the argument lists of
    ``product_data`` to warm (a value, a tuple of positional arguments, or
    ``Args(...)``): the command fills exactly the keys the code reads.
    Bare ``@warmer`` on a function that warms by itself (it may return the
    number of keys it filled).
    """
    if target is not None and not hasattr(target, "_scalekit"):
        # Bare @warmer on a plain function.
        return warmer(name=name)(target)
    if target is not None and isinstance(target._scalekit, _ViewCache):
        raise TypeError("warmer() targets @cached functions, not views")

    def register(func: F) -> F:
        full = name or f"{func.__module__}.{func.__qualname__}"
        _warmers[full] = Warmer(full, func, target)
        func.warmer = _warmers[full]  # type: ignore[attr-defined]
        return func

    return register


def get_warmers() -> dict[str, Warmer]:
    """Warmers registered by decorator plus ``SCALEKIT["CACHE"]["WARMERS"]``."""
    found = dict(_warmers)
    for path in conf.get().cache.warmers:
        obj = import_string(path)
        registered = getattr(obj, "warmer", None)
        if isinstance(registered, Warmer):
            found[registered.name] = registered
        elif isinstance(obj, Warmer):
            found[obj.name] = obj
        else:
            found[path] = Warmer(path, obj, None, source="settings")
    return found

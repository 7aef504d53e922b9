"""Database routers.

``PrimaryReplicaRouter`` sends writes and migrations to ``SCALEKIT["PRIMARY"]``
and reads to ``SCALEKIT["REPLICAS"]``, with read-your-writes:

* within a *scope* (one request, task or ``routing_scope()`` block), reads after a
  write go to the primary, and all replica reads use one replica;
* reads inside ``transaction.atomic()`` on the primary go to the primary;
* across requests, ``PinningMiddleware`` pins a client after a write with a
  signed cookie.

Per-scope state lives in a ``ContextVar``, so it is correct in threads, async
views and under ASGI. Replica health (down, lagging) is per process.
"""

from __future__ import annotations

import atexit
import functools
import logging
import math
import os
import random
import select
import threading
import time
import weakref
from asyncio import _get_running_loop
from collections.abc import Callable, Sequence
from contextlib import suppress
from contextvars import ContextVar, Token
from threading import get_ident
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeVar, overload

from asgiref.sync import iscoroutinefunction, markcoroutinefunction
from django.apps import apps as django_apps
from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.db import DatabaseError, InterfaceError, OperationalError, connections
from django.db.backends.base.base import BaseDatabaseWrapper
from django.db.models import Model

from django_scalekit import conf, metrics

if TYPE_CHECKING:
    from django.http import HttpRequest

logger = logging.getLogger("django_scalekit.routers")

# Reasons in scalekit_router_queries_total: why a query went where it went.
WRITE = "write"
READ = "read"
PINNED = "pinned"  # a write or cookie pinned the scope, or use_primary()
IN_TRANSACTION = "in-transaction"
REPLICA_FAILOVER = "replica-failover"  # no replica reachable: the primary
LAG_SKIP = "lag-skip"  # every reachable replica lags: the primary

_QUERIES = metrics.counter(
    "router_queries_total",
    "Queries routed, by database alias and reason.",
    ["alias", "reason"],
)
# (alias, reason) -> _QUERIES.labels(alias, reason): a labels() lookup
# costs three times the inc(), once per label pair and scope. Bounded:
# aliases times reasons.
_QUERY_CHILDREN: dict[tuple[str, str], Any] = {}
_OUT_OF_ROTATION = metrics.gauge(
    "router_replica_out_of_rotation",
    "1 while a replica is out of rotation (down) in a process, else 0.",
    ["alias"],
    multiprocess_mode="max",
)
_LAG = metrics.gauge(
    "router_replica_lag_seconds",
    "Replication lag last measured for a replica.",
    ["alias"],
    multiprocess_mode="max",
)

F = TypeVar("F", bound=Callable[..., Any])


_NO_CONNECTION: tuple[conf.Settings | None, int, Any] = (None, 0, None)


class _GroupState:
    """Routing state of one replica group within a scope."""

    __slots__ = (
        "_conn",
        "causal",
        "lsn_pending",
        "min_lsn",
        "pinned",
        "pinned_until",
        "primary_alias",
        "rechecked_lsn",
        "replica",
    )

    def __init__(self, pinned: bool = False, min_lsn: int = 0) -> None:
        #: Reads of the group go to its primary for the rest of the scope.
        self.pinned = pinned
        #: The replica chosen for this scope: monotonic reads within a request.
        self.replica: str | None = None
        # READ_YOUR_WRITES = "lsn": a replica may serve a read once it has
        # replayed min_lsn; lsn_pending means a write happened since the
        # primary's position was last read. ``causal`` is "either is set",
        # so the hot path reads one attribute.
        self.min_lsn = min_lsn
        self.lsn_pending = False
        self.causal = min_lsn > 0
        self.rechecked_lsn = 0
        #: Expiring scopes only: reads go to the primary until this
        #: time.monotonic() (_PENDING: a write whose clock has not started).
        self.pinned_until = 0.0
        self.primary_alias = ""
        # The primary's connection wrapper, for the settings and thread it was
        # looked up for (a scope can be shared with worker threads).
        # Stored as one tuple (settings, thread id, wrapper) so that threads
        # sharing a scope never read one thread's id with another's wrapper.
        self._conn: tuple[conf.Settings | None, int, Any] = _NO_CONNECTION

    def primary_connection(self, cfg: conf.Settings, alias: str) -> BaseDatabaseWrapper:
        """The primary's connection in this thread, looked up once per scope."""
        cached = self._conn
        if cached[0] is cfg and cached[1] == get_ident():
            return cached[2]  # type: ignore[no-any-return]
        connection = _connection(alias)
        if _get_running_loop() is None:
            self._conn = (cfg, get_ident(), connection)
        return connection


class Scope(_GroupState):
    """Routing state of one request or task; it is the default group's state."""

    #: Its writes pin reads for PINNING_SECONDS (``pinned_until``), not to
    #: its end: an _ImplicitScope, which nothing ends.
    expiring = False

    __slots__ = (
        "_cookie_lsns",
        "_groups",
        "fast",
        "forced",
        "n_pinned",
        "n_read",
        "n_transaction",
        "n_write",
        "pinned_all",
        "tally",
        "write_to",
        "wrote",
    )

    def __init__(
        self, pinned: bool = False, lsns: dict[str, int] | None = None
    ) -> None:
        # _GroupState.__init__(self, pinned, min_lsn), inlined: every
        # request creates a scope.
        min_lsn = lsns.get(conf.DEFAULT_GROUP, 0) if lsns else 0
        self.pinned = pinned
        self.replica = None
        self.min_lsn = min_lsn
        self.rechecked_lsn = 0
        self.lsn_pending = False
        self.causal = min_lsn > 0
        self.pinned_until = 0.0
        self.primary_alias = ""
        self._conn = _NO_CONNECTION
        #: Every group reads from its primary (a pinning cookie came with the request).
        self.pinned_all = pinned
        #: A write was routed in this scope (the pinning cookie is then set).
        self.wrote = False
        self._groups: dict[str, _GroupState] | None = None
        # Positions each group must have replayed, from the pinning cookie.
        self._cookie_lsns = lsns or {}
        #: (alias, reason) -> queries routed in this scope, counted here and
        #: added to the Prometheus counter when the scope ends (one labelled
        #: increment per query would cost more than the routing decision).
        self.tally: dict[tuple[str, str], int] | None = (
            {} if (conf._settings or conf.get()).routing_metrics else None
        )
        # The default group's hot paths count in plain integers (a dict
        # update would cost as much as the routing decision): reads from
        # ``self.replica``, and pinned, in-transaction and write queries on
        # the primary.
        self.n_read = self.n_pinned = self.n_transaction = self.n_write = 0
        #: (thread id, that thread's primary connection, replica) while reads
        #: of the default group go to ``replica`` with nothing else to decide:
        #: db_for_read's fast path. Anything that changes the decision (a
        #: write, a failover, a settings change) sets it back to None.
        #: The fourth item is a _STEADY state (plus _COUNTED with routing
        #: metrics, plus _CHECK_FORCED once ``forced``), _PINNED, or _WROTE
        #: (pinned by a write of this scope: db_for_write then has nothing
        #: to record).
        self.fast: tuple[int, Any, str, int] | None = None
        #: A use_primary() block was open in a context that sees this scope.
        #: Its fast path then asks ``_forced`` on every read: a context
        #: copied inside the block (a task, a thread) stays forced after it.
        self.forced = _forced.get()
        #: db_for_write's fast path: the primary, once this scope's write is
        #: recorded and later writes have nothing to record or count.
        self.write_to: str | None = None

    def retire_reads(self) -> None:
        """Move the reads counted for the current replica into the tally
        (before the scope's replica changes)."""
        if self.n_read and self.replica is not None and self.tally is not None:
            key = (self.replica, READ)
            self.tally[key] = self.tally.get(key, 0) + self.n_read
        self.n_read = 0

    def flush(self) -> None:
        """Add this scope's query counts to ``scalekit_router_queries_total``."""
        if self.tally is None:
            return
        self.retire_reads()
        # Swap before reading: a thread sharing the scope may still count.
        tally, self.tally = self.tally, {}
        primary = (conf._settings or conf.get()).primary
        for reason, count in (
            (PINNED, self.n_pinned),
            (IN_TRANSACTION, self.n_transaction),
            (WRITE, self.n_write),
        ):
            if count:
                tally[primary, reason] = tally.get((primary, reason), 0) + count
        self.n_pinned = self.n_transaction = self.n_write = 0
        # A copy taken at once (under the GIL): a thread of this scope may
        # still count into the old dict while we add it up.
        for key, count in list(tally.items()):
            child = _QUERY_CHILDREN.get(key)
            if child is None:
                child = _QUERY_CHILDREN[key] = _QUERIES.labels(*key)
            child.inc(count)

    def group(self, name: str) -> _GroupState:
        """The state of group ``name`` (``conf.DEFAULT_GROUP``: the scope itself)."""
        if name == conf.DEFAULT_GROUP:
            return self
        if self._groups is None:
            self._groups = {}
        state = self._groups.get(name)
        if state is None:
            state = self._groups[name] = _GroupState(
                self.pinned_all, self._cookie_lsns.get(name, 0)
            )
        return state

    def states(self) -> list[tuple[str, _GroupState]]:
        """Every group state this scope has touched, the default group's first."""
        return [(conf.DEFAULT_GROUP, self), *(self._groups or {}).items()]


def _written(state: _GroupState, primary: str, cfg: conf.Settings) -> None:
    """Record a write to a group: pin it (time mode) or require its position (lsn)."""
    if cfg.lsn_mode:
        state.lsn_pending = state.causal = True
        state.primary_alias = primary
    else:
        state.pinned = True


class _NoTransaction:
    """Stands for the primary's connection in a pinned scope's fast path."""

    in_atomic_block = False


_NO_TRANSACTION = _NoTransaction()
# Scope.fast states: below _PINNED, the replica read of a steady scope, with
# flags for counting it and for asking use_primary()'s variable first.
_STEADY, _COUNTED, _CHECK_FORCED, _PINNED, _WROTE = 0, 1, 2, 4, 5

_scope: ContextVar[Scope | None] = ContextVar("scalekit_scope", default=None)
_get_scope = _scope.get  # one attribute lookup less per query
_forced: ContextVar[bool] = ContextVar("scalekit_forced", default=False)


def _force() -> Token[bool]:
    """Enter a use_primary() block in the running context."""
    token = _forced.set(True)
    scope = _scope.get()
    if scope is not None:
        # Before clearing the fast path: a thread sharing the scope that
        # sets it meanwhile sees the flag when it checks again.
        scope.forced = True
        scope.fast = None
    return token


def current_scope() -> Scope:
    """Return the routing scope of the running context, creating it if needed."""
    scope = _scope.get()
    if scope is None:
        scope = _ImplicitScope()
        _scope.set(scope)
        if scope.tally is not None:
            _track_implicit(scope)
    return scope


#: _GroupState.pinned_until of a write whose clock has not started yet.
_PENDING = math.inf


def _pins_for_a_while(scope: Scope, cfg: conf.Settings) -> bool:
    """Whether a write of ``scope`` pins for PINNING_SECONDS rather than to the
    scope's end (lsn mode needs neither; PINNING_SECONDS = 0 keeps the pin)."""
    return scope.expiring and bool(cfg.pinning_seconds) and not cfg.lsn_mode


def _pin_a_while(scope: Scope, state: _GroupState) -> None:
    """Record a write of an expiring scope: the group reads its primary from
    now until PINNING_SECONDS after the write committed."""
    state.pinned_until = _PENDING
    scope.fast = None


def _still_pinned(state: _GroupState, cfg: conf.Settings) -> bool:
    """Whether a write pin of an expiring scope still holds. Its clock starts
    at the first read outside any transaction of the thread: the write may
    commit long after it was routed (a slow statement, an atomic block)."""
    until = state.pinned_until
    if until is _PENDING:
        if _in_a_transaction():
            return True
        until = state.pinned_until = time.monotonic() + cfg.pinning_seconds
    return time.monotonic() < until


def _in_a_transaction() -> bool:
    """Whether a connection of this thread has a transaction open."""
    return any(
        connection.in_atomic_block
        or (connection.connection is not None and not connection.autocommit)
        for connection in connections.all(initialized_only=True)
    )


class _ImplicitScope(Scope):
    """A scope nothing ends: its counts are added when it is collected too,
    and (READ_YOUR_WRITES = "time") a write pins its group's reads for
    PINNING_SECONDS after it committed, as the cookie pins a client, not for
    the thread's life."""

    __slots__ = ("__weakref__",)

    expiring = True

    def __del__(self) -> None:
        with suppress(Exception):  # e.g. at interpreter shutdown
            self.flush()


# Scopes started by a query outside any request or routing_scope() (a
# management command, a thread of its own): nothing ends them, so a daemon
# thread adds their counts to scalekit_router_queries_total every few
# seconds, and at exit; a thread's scope also when the thread ends.
IMPLICIT_FLUSH_SECONDS = 5.0
_implicit: weakref.WeakSet[_ImplicitScope] = weakref.WeakSet()
_flusher: threading.Thread | None = None
_flusher_lock = threading.Lock()


def flush_implicit_scopes() -> None:
    """Add the counts of scopes nothing ends to the Prometheus counter now."""
    with _flusher_lock:  # another thread may be adding a scope
        scopes = list(_implicit)
    for scope in scopes:
        scope.flush()


def _flush_implicit_forever() -> None:
    while True:
        time.sleep(IMPLICIT_FLUSH_SECONDS)
        try:
            flush_implicit_scopes()
        except Exception:  # never let the flusher die for the process's life
            logger.exception("Flushing routing metrics failed")


def _track_implicit(scope: _ImplicitScope) -> None:
    global _flusher
    with _flusher_lock:
        _implicit.add(scope)
    if _flusher is None:
        with _flusher_lock:
            if _flusher is None:
                _flusher = threading.Thread(
                    target=_flush_implicit_forever,
                    name="scalekit-metrics-flush",
                    daemon=True,
                )
                _flusher.start()


def _forget_flusher() -> None:
    # A forked child (a gunicorn worker) has no copy of the parent's thread,
    # and the parent adds up the counts its scopes held at the fork.
    global _flusher, _flusher_lock
    _flusher = None
    _flusher_lock = threading.Lock()
    for scope in list(_implicit):
        scope.n_read = scope.n_pinned = scope.n_transaction = scope.n_write = 0
        if scope.tally is not None:
            scope.tally = {}


atexit.register(flush_implicit_scopes)
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_flusher)


def begin_scope(
    pinned: bool = False, lsns: dict[str, int] | None = None
) -> Token[Scope | None]:
    """Start a fresh scope; pass the token to ``end_scope()``."""
    return _scope.set(Scope(pinned, lsns))


def end_scope(token: Token[Scope | None]) -> None:
    scope = _scope.get()
    if scope is not None:
        scope.flush()
    _scope.reset(token)


class routing_scope:
    """Run a block as its own scope, e.g. one job of a worker process.

    Requests get a scope from ``PinningMiddleware`` (and ``request_started``),
    Celery tasks from their task signals; use this in other long-running
    workers (RQ, a loop of your own) so that one job's writes do not pin the
    next job's reads to the primary. (A class, not ``@contextmanager``: it
    costs half as much.)
    """

    __slots__ = ("_pinned", "_token")

    def __init__(self, pinned: bool = False) -> None:
        self._pinned = pinned

    def __enter__(self) -> Scope:
        scope = Scope(self._pinned)
        self._token = _scope.set(scope)
        return scope

    def __exit__(self, *exc_info: object) -> None:
        end_scope(self._token)


def pin_value(scope: Scope, cfg: conf.Settings) -> str | None:
    """The pinning cookie's value after ``scope``, or None when it needs none.

    Time mode: ``"1"`` (read the primary for PINNING_SECONDS). LSN mode: the
    WAL position each written group's replicas must have replayed, e.g.
    ``"lsn:default=23494112"``; the primary's position is read here once if
    the scope wrote since its last read.
    """
    if not scope.wrote:
        return None
    if not cfg.lsn_mode:
        return "1"
    # Keep what the request's own cookie required of groups it did not touch.
    merged = dict(scope._cookie_lsns)
    for name, state in scope.states():
        if state.lsn_pending:
            try:
                state.min_lsn = max(state.min_lsn, primary_lsn(state.primary_alias))
            except DatabaseError:
                return "1"
            state.lsn_pending = False
        if state.min_lsn:
            merged[name] = max(merged.get(name, 0), state.min_lsn)
    return (
        "lsn:" + ",".join(f"{n}={lsn}" for n, lsn in merged.items()) if merged else "1"
    )


def parse_pin(value: str) -> tuple[bool, dict[str, int]]:
    """Read a pinning cookie's value: (pinned, required position per group)."""
    if not value.startswith("lsn:"):
        return True, {}
    lsns: dict[str, int] = {}
    for part in value[4:].split(","):
        name, _, lsn = part.partition("=")
        if not (lsn.isascii() and lsn.isdigit()):
            return True, {}  # not ours after all: be safe
        lsns[name] = int(lsn)
    return False, lsns


def _reset_scope_on_request_started(**kwargs: object) -> None:
    # Threads are reused between WSGI requests: never carry a scope over.
    previous = _scope.get()
    if previous is not None:
        previous.flush()
    _scope.set(Scope())


def _flush_scope_on_request_finished(**kwargs: object) -> None:
    # Without PinningMiddleware nothing else ends a request's scope.
    scope = _scope.get()
    if scope is not None:
        scope.flush()


# Where a Celery task's scope token is kept: on the task's request, which
# Celery pushes before task_prerun and pops after task_postrun, per thread.
_TASK_TOKEN = "_scalekit_scope_token"


def _begin_scope_on_task_prerun(task: Any = None, **kwargs: object) -> None:
    """Give each Celery task a fresh scope (``celery.signals.task_prerun``).

    An eager task (``apply()``, ``task_always_eager``) runs inside its caller,
    like a function call: it shares the caller's scope, so that each sees the
    other's writes.
    """
    request = getattr(task, "request", None)
    if request is None or getattr(request, "is_eager", False):
        return
    setattr(request, _TASK_TOKEN, begin_scope())


def _end_scope_on_task_postrun(task: Any = None, **kwargs: object) -> None:
    """End the task's scope and count its queries (``task_postrun``, sent
    whether the task succeeded or raised)."""
    request = getattr(task, "request", None)
    token: Token[Scope | None] | None = getattr(request, _TASK_TOKEN, None)
    if token is None:
        return
    delattr(request, _TASK_TOKEN)
    try:
        end_scope(token)
    except (ValueError, RuntimeError) as exc:
        # The token belongs to another context, or was used already: never
        # fail the task for it; the next query starts a scope of its own.
        logger.debug("Could not reset the scope of task %r: %s", task, exc)
        _scope.set(None)


class use_primary:
    """Force reads to the primary: ``with use_primary():`` or ``@use_primary``.

    Works as a sync or async context manager and decorates sync and ``async
    def`` functions alike.
    """

    def __init__(self, func: Callable[..., Any] | None = None) -> None:
        self._func = func
        self._tokens: list[Token[bool]] = []
        if func is not None:
            functools.update_wrapper(self, func)
            if iscoroutinefunction(func):
                markcoroutinefunction(self)

    def __enter__(self) -> None:
        self._tokens.append(_force())

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        _forced.reset(self._tokens.pop())

    async def __aenter__(self) -> None:
        self.__enter__()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.__exit__(exc_type, exc, tb)

    @overload
    def __call__(self, func: F) -> F: ...
    @overload
    def __call__(self, *args: Any, **kwargs: Any) -> Any: ...

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self._func is None:
            # ``@use_primary()``: the single argument is the function to wrap.
            (func,) = args
            return use_primary(func)
        func = self._func
        if iscoroutinefunction(func):
            return _call_async_forced(func, args, kwargs)
        token = _force()
        try:
            return func(*args, **kwargs)
        finally:
            _forced.reset(token)

    def __get__(self, obj: object, objtype: type | None = None) -> Any:
        # Decorating a method: bind like a function would.
        if obj is None or self._func is None:
            return self
        return functools.partial(self.__call__, obj)


async def _call_async_forced(
    func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
) -> Any:
    token = _force()
    try:
        return await func(*args, **kwargs)
    finally:
        _forced.reset(token)


# --- Connections, looked up once per thread ---------------------------------


class _ThreadConnections(threading.local):
    generation = -1
    by_alias: dict[str, BaseDatabaseWrapper]


_thread_connections = _ThreadConnections()
_connections_generation = 0


def forget_connections() -> None:
    """Drop the per-thread connection cache (when DATABASES changes)."""
    global _connections_generation
    _connections_generation += 1


def _connection(alias: str) -> BaseDatabaseWrapper:
    """``connections[alias]``, at a tenth of the cost on the hot path.

    Django keeps database connections per thread (an asgiref ``Local`` with
    ``thread_critical=True``: a plain thread-local in sync code), but each
    lookup through it first asks asyncio for a running loop, which costs
    about 0.4 us. In sync code, cache the wrapper per thread; in an event-loop
    thread, where the storage behaves like a context variable, always ask.
    """
    if _get_running_loop() is not None:
        return connections[alias]
    local = _thread_connections
    if local.generation != _connections_generation:
        local.by_alias = {}
        local.generation = _connections_generation
    try:
        return local.by_alias[alias]
    except KeyError:
        connection = local.by_alias[alias] = connections[alias]
        return connection


# --- Replica health: per process, shared by all threads -------------------

#: alias -> time.monotonic() until which the replica is out of rotation.
_down_until: dict[str, float] = {}
#: alias -> (time.monotonic() of the sample, lag in seconds or None).
_lag_samples: dict[str, tuple[float, float | None]] = {}
_lagging: set[str] = set()
_lag_lock = threading.Lock()

# Lag as PostgreSQL reports it: zero when everything received is replayed
# (an idle primary sends nothing, so replay time alone would grow forever).
_PG_LAG_SQL = (
    "SELECT CASE WHEN NOT pg_is_in_recovery() THEN 0 "
    "WHEN pg_last_wal_receive_lsn() = pg_last_wal_replay_lsn() THEN 0 "
    "ELSE COALESCE(EXTRACT(EPOCH FROM now() - pg_last_xact_replay_timestamp()), 0) "
    "END"
)


def reset_replica_state() -> None:
    """Put every replica back in rotation and forget lag samples (tests, settings changes)."""
    for alias in _down_until:
        _OUT_OF_ROTATION.labels(alias).set(0)
    _down_until.clear()
    _lag_samples.clear()
    _lagging.clear()
    _positions.clear()
    # A scope that outlives a settings change (a test's override_settings)
    # must decide again. Scopes of other threads are not reachable from here;
    # settings change at run time only in tests, which route in this thread.
    scope = _scope.get()
    if scope is not None:
        scope.fast = None
        scope.write_to = None


def fail_over(scope: Scope) -> list[str]:
    """Take out of rotation the replicas whose connection failed in this scope.

    For a request whose query failed on a replica (the server went away
    mid-query, which no routing decision can prevent): each failed replica's
    connection in this thread is closed and the replica leaves rotation, and
    the scope's next reads go to a replica at least as far along, or to the
    primary (monotonic reads). Returns the aliases taken out.
    """
    failed = []
    for _name, state in scope.states():
        alias = state.replica
        if alias is None:
            continue
        connection = _connection(alias)
        # errors_occurred: Django saw a DatabaseError (not a Data or Integrity
        # error) on this connection since it opened; still open: in this scope.
        if connection.connection is None or not connection.errors_occurred:
            continue
        # A statement timeout or a recovery conflict also raises an
        # OperationalError, on a replica that is fine: not those.
        if connection.is_usable():
            continue
        with suppress(DatabaseError):
            connection.close()
        mark_down(alias, reason="a query failed on it")
        failed.append(alias)
    if failed:
        scope.fast = None
    return failed


_RETRYABLE_METHODS = frozenset({"GET", "HEAD"})


def fail_over_request(request: HttpRequest, exception: Exception) -> list[str]:
    """Fail over for a request whose view raised ``exception``; return the
    replicas taken out, when the view may run once more, else ``[]``.

    A query already running on a replica that goes away fails with it. A
    GET or HEAD that wrote nothing, changed no session and queued no message
    can run again: its second run reads from a replica at least as far
    along, or from the primary (``SCALEKIT["RETRY_ON_REPLICA_FAILURE"]``).
    """
    if (
        not isinstance(exception, (OperationalError, InterfaceError))
        or request.method not in _RETRYABLE_METHODS
        or not conf.get().retry_on_replica_failure
        # The handler wraps such views in atomic(); a second run would not be.
        or any(db.get("ATOMIC_REQUESTS") for db in settings.DATABASES.values())
    ):
        return []
    scope = current_scope()
    if scope.wrote or _changed_request_state(request):
        return []
    return fail_over(scope)


def _changed_request_state(request: HttpRequest) -> bool:
    """Whether the view changed what a second run would change again: the
    session, or messages queued for the user."""
    session = getattr(request, "session", None)
    if session is not None and getattr(session, "modified", False):
        return True
    messages = getattr(request, "_messages", None)
    return bool(getattr(messages, "_queued_messages", None))


def mark_down(alias: str, seconds: float | None = None, reason: str = "") -> None:
    """Take ``alias`` out of rotation for ``seconds`` (default REPLICA_RETRY_SECONDS)."""
    if seconds is None:
        seconds = conf.get().replica_retry_seconds
    was_down = _down_until.get(alias, 0.0) > time.monotonic()
    _down_until[alias] = time.monotonic() + seconds
    _OUT_OF_ROTATION.labels(alias).set(1)
    if not was_down:
        logger.warning(
            "Replica %r is out of rotation for %.0f s: %s", alias, seconds, reason
        )


def is_down(alias: str) -> bool:
    until = _down_until.get(alias)
    if until is None:
        return False
    return until > time.monotonic()


def _replica_value(alias: str, sql: str) -> Any:
    """The single value ``sql`` returns on ``alias`` now; None unless PostgreSQL."""
    connection = _connection(alias)
    if connection.vendor != "postgresql":
        return None
    with connection.cursor() as cursor:
        cursor.execute(sql)
        row = cursor.fetchone()
    return row[0] if row else None


def replica_lag(alias: str) -> float | None:
    """Measure ``alias``'s replication lag in seconds now (PostgreSQL only)."""
    lag = _replica_value(alias, _PG_LAG_SQL)
    return float(lag) if lag is not None else None


_FAILED = object()


def _sample(
    samples: dict[str, tuple[float, Any]],
    lock: threading.Lock,
    alias: str,
    max_age: float,
    measure: Callable[[str], Any],
    what: str,
    force: bool = False,
) -> tuple[bool, Any]:
    """One measurement of ``alias`` shared by the process for ``max_age`` s.

    Returns (measured now, value). A thread that finds another one measuring
    uses the previous value (None if there is none) instead of waiting;
    ``force`` measures now regardless. A failed query marks the replica
    down and returns ``_FAILED``.
    """
    now = time.monotonic()
    sample = samples.get(alias)
    if not force:
        if sample is not None and now - sample[0] < max_age:
            return False, sample[1]
        if not lock.acquire(blocking=False):
            return False, sample[1] if sample is not None else None
    try:
        value = measure(alias)
    except DatabaseError as exc:
        mark_down(alias, reason=f"{what} failed: {exc}")
        return True, _FAILED
    finally:
        if not force:
            lock.release()
    samples[alias] = (now, value)
    return True, value


#: alias -> (time.monotonic() of the sample, replay position or None).
_positions: dict[str, tuple[float, int | None]] = {}
_position_lock = threading.Lock()


# The end of the last WAL record inserted on the primary. The insert position,
# not the write position: with synchronous_commit = off the write position can
# still be behind a commit record. When that record ended exactly at a WAL page
# boundary, the insert position already points past the next page's header
# (24 bytes, or 40 at the start of a segment), which a replica reaches only
# with the next, unrelated record; so the header is taken off again.
_PRIMARY_LSN_SQL = (
    "SELECT (lsn - '0/0')::bigint - CASE "
    "WHEN (pg_walfile_name_offset(lsn)).file_offset = 40 THEN 40 "
    "WHEN (lsn - '0/0')::bigint % current_setting('wal_block_size')::bigint = 24 "
    "THEN 24 ELSE 0 END "
    "FROM (SELECT pg_current_wal_insert_lsn() AS lsn) AS p"
)


def primary_lsn(alias: str) -> int:
    """The primary's WAL position a replica must replay to have seen every
    write committed so far, as a number of bytes."""
    with _connection(alias).cursor() as cursor:
        cursor.execute(_PRIMARY_LSN_SQL)
        return int(cursor.fetchone()[0])


def replay_lsn(alias: str) -> int | None:
    """How far ``alias`` has replayed the primary's WAL, now (PostgreSQL only)."""
    lsn = _replica_value(alias, "SELECT (pg_last_wal_replay_lsn() - '0/0')::bigint")
    return int(lsn) if lsn is not None else None


def _position(alias: str, cfg: conf.Settings, fresh: bool = False) -> int:
    """``alias``'s replay position, sampled at most every LSN_CHECK_SECONDS per
    process (all queries share the sample); -1 when unknown or unreachable."""
    _, lsn = _sample(
        _positions,
        _position_lock,
        alias,
        cfg.lsn_check_seconds,
        replay_lsn,
        "position check",
        force=fresh,
    )
    return -1 if lsn is None or lsn is _FAILED else int(lsn)


def _too_laggy(alias: str, cfg: conf.Settings) -> bool:
    max_lag = cfg.replica_max_lag_seconds
    if max_lag is None:
        return False
    measured, lag = _sample(
        _lag_samples,
        _lag_lock,
        alias,
        cfg.replica_lag_check_seconds,
        replica_lag,
        "lag check",
    )
    if lag is _FAILED:
        return True
    if measured:
        if lag is not None:
            _LAG.labels(alias).set(lag)
        laggy = lag is not None and lag > max_lag
        if laggy and alias not in _lagging:
            _lagging.add(alias)
            logger.warning(
                "Replica %r lags %.1f s (> %s s): reads skip it", alias, lag, max_lag
            )
        elif not laggy and alias in _lagging:
            _lagging.discard(alias)
            logger.info("Replica %r caught up: back in rotation", alias)
    return alias in _lagging


#: alias -> time.monotonic() at which an unfinished connect to it began.
_connecting: dict[str, float] = {}
#: A connect still unfinished after this long makes other threads skip the
#: replica (a connect on a LAN takes milliseconds).
_SUSPECT_CONNECT = 0.25


def _connect(alias: str, connection: BaseDatabaseWrapper) -> None:
    started = time.monotonic()
    _connecting.setdefault(alias, started)
    try:
        connection.ensure_connection()
    finally:
        if _connecting.get(alias) == started:
            del _connecting[alias]


def _server_closed(connection: BaseDatabaseWrapper, raw: Any) -> bool:
    """Whether the server has closed ``connection`` (e.g. the replica restarted).

    An idle connection whose socket is readable was closed by the server:
    check it before a query fails on it. The driver raises its own errors
    here (not Django's), e.g. psycopg's "the connection is lost".
    """
    try:
        fileno = raw.fileno()
    except Exception:  # the driver says the connection is gone
        return True
    return bool(select.select([fileno], [], [], 0)[0]) and not connection.is_usable()


def _connection_ok(alias: str) -> bool:
    """Connect to ``alias`` if needed; a refused or timed-out connect marks it down."""
    if _get_running_loop() is not None:
        # Called from an event loop (not through the ORM, which runs queries in
        # a worker thread): no blocking I/O here; the query itself will connect.
        return True
    connection = _connection(alias)
    try:
        raw = connection.connection
        if (
            raw is not None
            and connection.vendor != "sqlite"
            and _server_closed(connection, raw)
        ):
            with suppress(DatabaseError):
                connection.close()
        connection.close_if_health_check_failed()
        if connection.connection is None:
            # Another thread has been connecting for a while: the replica may
            # be dropping packets. Do not queue up behind it; read elsewhere.
            started = _connecting.get(alias)
            if started is not None and time.monotonic() - started > _SUSPECT_CONNECT:
                return False
            _connect(alias, connection)
    except (DatabaseError, OSError, ValueError) as exc:
        with suppress(DatabaseError):
            connection.close()
        mark_down(alias, reason=f"connection failed: {exc}")
        return False
    if _down_until.pop(alias, None) is not None:
        _OUT_OF_ROTATION.labels(alias).set(0)
        logger.info("Replica %r is reachable again: back in rotation", alias)
    return True


def choose_replica(
    group: conf.ReplicaGroup, cfg: conf.Settings, need: int = 0, fresh: bool = False
) -> str | None:
    """Pick a healthy replica of ``group`` by weight, or None when none is usable.

    With ``need``, only a replica whose replay position (sampled, or measured
    now with ``fresh``) has reached that WAL position is usable.
    """
    # The group's own sequences: copied only when a replica is passed over.
    aliases: Sequence[str] = group.replicas
    weights: Sequence[float] = group.weights
    cum_weights: tuple[float, ...] | None = group.cum_weights
    while aliases:
        if len(aliases) == 1:
            index = 0
        elif cum_weights is not None:
            index = random.choices(range(len(aliases)), cum_weights=cum_weights)[0]
        else:
            index = random.choices(range(len(aliases)), weights)[0]
        alias = aliases[index]
        if (
            not is_down(alias)
            and _connection_ok(alias)
            and not _too_laggy(alias, cfg)
            and (not need or _position(alias, cfg, fresh) >= need)
        ):
            return alias
        aliases = [*aliases[:index], *aliases[index + 1 :]]
        weights = [*weights[:index], *weights[index + 1 :]]
        cum_weights = None
    return None


def _read(
    state: _GroupState, scope: Scope, group: conf.ReplicaGroup, cfg: conf.Settings
) -> str:
    if (
        state.pinned
        or scope.pinned_all
        or _forced.get()
        or (state.pinned_until and _still_pinned(state, cfg))
    ):
        alias, reason = group.primary, PINNED
    elif not group.replicas:
        alias, reason = group.primary, READ
    else:
        # Inlined _GroupState.primary_connection(): this runs before every read.
        cached = state._conn
        if cached[0] is cfg and cached[1] == get_ident():
            primary = cached[2]
        else:
            primary = state.primary_connection(cfg, group.primary)
        if primary.in_atomic_block:
            alias, reason = group.primary, IN_TRANSACTION
        elif state.causal:
            alias = _read_causal(state, group, cfg)
            reason = READ if alias != group.primary else PINNED
        elif (replica := state.replica) is not None and not (
            _down_until and is_down(replica)
        ):
            alias, reason = replica, READ
        else:
            alias = _choose_for_scope(state, group, cfg, scope.expiring)
            reason = READ if alias != group.primary else _fallback_reason(group)
    return _count(scope, alias, reason)


def _count(scope: Scope, alias: str, reason: str) -> str:
    """Count one query routed to ``alias`` for ``reason``; return ``alias``."""
    tally = scope.tally
    if tally is not None:
        tally[alias, reason] = tally.get((alias, reason), 0) + 1
    return alias


def _fallback_reason(group: conf.ReplicaGroup) -> str:
    """Why a read that wanted a replica of ``group`` got the primary."""
    return (
        LAG_SKIP
        if _lagging and _lagging.intersection(group.replicas)
        else REPLICA_FAILOVER
    )


def _choose_for_scope(
    state: _GroupState,
    group: conf.ReplicaGroup,
    cfg: conf.Settings,
    expiring: bool = False,
) -> str:
    """Choose the scope's replica; after a failover only a replica at least as
    far along as the lost one (PostgreSQL positions), or else the primary."""
    lost = state.replica
    if lost is None:
        replica = state.replica = choose_replica(group, cfg)
        return replica if replica is not None else group.primary
    floor = _positions.get(lost, (0.0, None))[1]
    if floor is None:
        # Positions unknown: the primary is the only read that cannot go back
        # in time; in a scope nothing ends, for PINNING_SECONDS, as after a
        # write (then a replica is chosen afresh).
        state.replica = None
        if expiring and cfg.pinning_seconds:
            state.pinned_until = max(
                state.pinned_until, time.monotonic() + cfg.pinning_seconds
            )
        else:
            state.pinned = True
        return group.primary
    state.min_lsn, state.causal = max(state.min_lsn, floor), True
    return _read_causal(state, group, cfg)


def _read_causal(
    state: _GroupState, group: conf.ReplicaGroup, cfg: conf.Settings
) -> str:
    """A replica that has replayed ``state.min_lsn``, or the primary."""
    if (
        state.lsn_pending
        and not state.primary_connection(cfg, group.primary).get_autocommit()
    ):
        # A transaction opened with set_autocommit(False) has not committed:
        # reading the position now would not cover its writes.
        return group.primary
    if state.lsn_pending:
        try:
            state.min_lsn = max(state.min_lsn, primary_lsn(group.primary))
        except DatabaseError:
            return group.primary
        state.lsn_pending = False
    need = state.min_lsn
    replica = state.replica
    if replica is not None and not is_down(replica) and _position(replica, cfg) >= need:
        return replica
    replica = choose_replica(group, cfg, need)
    if replica is None and state.rechecked_lsn < need:
        # The samples may be up to LSN_CHECK_SECONDS old: ask again, once per
        # required position, before giving the read to the primary.
        state.rechecked_lsn = need
        replica = choose_replica(group, cfg, need, fresh=True)
    if replica is None:
        return group.primary
    if isinstance(state, Scope):
        state.retire_reads()
    state.replica = replica
    return replica


def route_read(group: conf.ReplicaGroup) -> str:
    """The alias a read of ``group`` goes to now, with read-your-writes.

    For other routers (e.g. the shard router, whose shards are groups): the
    scope's pinning, ``use_primary()``, atomic blocks on the group's primary,
    one replica per scope and failover all apply, per group.
    """
    cfg = conf._settings or conf.get()
    scope = _scope.get() or current_scope()
    return _read(scope.group(group.name), scope, group, cfg)


def route_write(group: conf.ReplicaGroup) -> str:
    """The alias a write of ``group`` goes to (its primary); pins the group's reads."""
    cfg = conf._settings or conf.get()
    scope = _scope.get() or current_scope()
    scope.wrote = True
    return _write_group(scope, group, cfg)


def _write_group(scope: Scope, group: conf.ReplicaGroup, cfg: conf.Settings) -> str:
    """Record a write of ``group`` in ``scope``; return the group's primary."""
    if _pins_for_a_while(scope, cfg):
        _pin_a_while(scope, scope.group(group.name))
    else:
        _written(scope.group(group.name), group.primary, cfg)
        # After the state it guards: a thread sharing the scope that sets the
        # fast path meanwhile sees the new state when it checks again.
        scope.fast = None
    return _count(scope, group.primary, WRITE)


def group_of(model: type[Model], cfg: conf.Settings) -> conf.ReplicaGroup:
    """The replica group serving ``model``: by model, then app label, else the default."""
    meta = model._meta
    return (
        cfg.model_groups.get(meta.label_lower)
        or cfg.app_groups.get(meta.app_label)
        or cfg.default_group
    )


def require_app(router: str) -> None:
    """Refuse to route without the app: its checks and its request signals
    (which end each request's scope) are registered in ``ready()``."""
    if django_apps.apps_ready and not django_apps.is_installed("django_scalekit"):
        raise ImproperlyConfigured(
            f'{router} needs "django_scalekit" in INSTALLED_APPS: the system '
            "checks of its settings and the signals that end each request's "
            "routing scope are set up there."
        )


class PrimaryReplicaRouter:
    """Writes and migrations to the primary, reads to replicas, read-your-writes."""

    def __init__(self) -> None:
        require_app(type(self).__name__)

    # db_for_read and db_for_write run before every query: they only look up
    # prepared state (see benchmarks/bench_router.py).

    def db_for_read(self, model: type[Model], **hints: Any) -> str | None:
        scope = _get_scope()
        if scope is not None:
            fast = scope.fast
            if fast is not None:
                thread, primary, alias, state = fast
                if state >= _PINNED:
                    # Pinned: the primary, whatever the thread or transaction.
                    if scope.tally is not None:
                        scope.n_pinned += 1
                    return alias
                # The steady state of a request: same thread, same replica,
                # not in an atomic block, no replica newly down, no
                # use_primary() (never opened where this scope is seen, or
                # not in force here).
                if (
                    thread == get_ident()
                    and not primary.in_atomic_block
                    and not _down_until
                ):
                    if not state:  # _STEADY: nothing to count or ask
                        return alias
                    if state is _COUNTED:
                        scope.n_read += 1
                        return alias
                    if not _forced.get():  # _CHECK_FORCED, maybe _COUNTED
                        if state & _COUNTED:
                            scope.n_read += 1
                        return alias
        return self._read_slow(model, scope or current_scope())

    def _read_slow(self, model: type[Model], scope: Scope) -> str:
        cfg = conf._settings or conf.get()
        scope.fast = None
        if cfg.groups:
            group = group_of(model, cfg)
            return _read(scope.group(group.name), scope, group, cfg)
        # _read(scope, scope, cfg.default_group, cfg), inlined: one call less
        # per query (the scope is the default group's state). Counting is in
        # integers on the scope; Scope.flush() labels them.
        if scope.pinned:
            # Pinned for the rest of the scope, whatever the thread.
            scope.fast = (
                0,
                _NO_TRANSACTION,
                cfg.primary,
                _WROTE if scope.wrote and cfg.simple_writes else _PINNED,
            )
            scope.n_pinned += 1
            return cfg.primary
        if scope.pinned_until and _still_pinned(scope, cfg):
            scope.n_pinned += 1  # no fast path: the pin ends in time
            return cfg.primary
        if _forced.get():
            scope.forced = True  # a context copied from one that is forced
            scope.n_pinned += 1
            return cfg.primary
        if not cfg.replicas:
            return _count(scope, cfg.primary, READ)
        cached = scope._conn
        ident = get_ident()
        if cached[0] is cfg and cached[1] == ident:
            primary = cached[2]
        else:
            primary = scope.primary_connection(cfg, cfg.primary)
        if primary.in_atomic_block:
            scope.n_transaction += 1
            return cfg.primary
        if scope.causal:
            alias = _read_causal(scope, cfg.default_group, cfg)
            return _count(scope, alias, READ if alias != cfg.primary else PINNED)
        replica = scope.replica
        if replica is None or (_down_until and is_down(replica)):
            scope.retire_reads()
            replica = _choose_for_scope(scope, cfg.default_group, cfg, scope.expiring)
            if replica == cfg.primary:
                return _count(scope, replica, _fallback_reason(cfg.default_group))
        if scope._conn[2] is primary and not scope.causal and not scope.pinned:
            # The primary's connection is cached for this thread (not an event
            # loop): later reads may take the fast path.
            forced = scope.forced
            scope.fast = (
                ident,
                primary,
                replica,
                (_STEADY if scope.tally is None else _COUNTED)
                | (_CHECK_FORCED if forced else _STEADY),
            )
            if (
                scope.pinned
                or scope.causal
                or scope.forced is not forced
                or scope.pinned_until is _PENDING
            ):
                # A thread sharing the scope wrote or entered use_primary()
                # meanwhile.
                scope.fast = None
        scope.n_read += 1
        return replica

    def db_for_write(self, model: type[Model], **hints: Any) -> str | None:
        scope = _get_scope()
        if scope is not None:
            alias = scope.write_to
            if alias is not None:
                return alias
            fast = scope.fast
            if fast is not None and fast[3] is _WROTE:
                if scope.tally is not None:
                    scope.n_write += 1
                return fast[2]
        else:
            scope = current_scope()
        cfg = conf._settings or conf.get()
        scope.wrote = True
        if cfg.groups or _pins_for_a_while(scope, cfg):
            return _write_group(scope, group_of(model, cfg), cfg)
        if cfg.simple_writes:
            scope.pinned = True
            # Later reads and writes of the scope only look this up.
            scope.fast = (0, _NO_TRANSACTION, cfg.primary, _WROTE)
            if scope.tally is not None:
                scope.n_write += 1
            else:
                scope.write_to = cfg.primary
            return cfg.primary
        _written(scope, cfg.primary, cfg)
        scope.fast = None  # after the state it guards (see route_write)
        scope.n_write += 1
        return cfg.primary

    def allow_relation(self, obj1: Model, obj2: Model, **hints: Any) -> bool | None:
        groups = conf.get(strict=False).alias_groups
        group1 = groups.get(obj1._state.db or "")
        group2 = groups.get(obj2._state.db or "")
        if group1 is None or group2 is None:
            return None
        return group1 == group2

    def allow_migrate(
        self, db: str, app_label: str, model_name: str | None = None, **hints: Any
    ) -> bool | None:
        cfg = conf.get(strict=False)  # runs during system checks
        if db not in cfg.alias_groups:
            return None
        group = (
            (
                cfg.model_groups.get(f"{app_label}.{model_name}".lower())
                if model_name
                else None
            )
            or cfg.app_groups.get(app_label)
            or cfg.default_group
        )
        return db == group.primary


from django_scalekit.sharding import ShardRouter  # noqa: E402,F401

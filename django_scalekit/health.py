"""Liveness and readiness endpoints for load balancers.

``live`` answers while the process can serve and touches no backend.
``ready`` runs every check of ``SCALEKIT["HEALTH"]`` concurrently, each in its
own thread, and waits for them at most ``TIMEOUT`` seconds in all: a check
still running then fails as timed out, so a database that accepts connections
but never answers costs the probe the budget, not the probe's own timeout. A
check still running from an earlier probe is waited for again rather than
started twice, which bounds the threads a hanging backend can hold; once it
has run ``STALE_FACTOR`` budgets it is given up and a fresh one starts, so a
hung connection cannot keep readiness failing after the backend recovered.
Database checks connect with ``connect_timeout`` (and TCP keepalives) set from
the budget, so their threads end too. Probes arriving during a run wait for
it (and with ``CACHE_SECONDS`` the report is reused that long), so a flood
of probes does not become a flood of connections.

Status: 503 and ``fail`` when a critical check fails; 200 and ``warn`` when
only non-critical ones fail or warn (a lagging or stopped replica, which the
router already avoids); 200 and ``pass`` otherwise. Bodies follow the
``application/health+json`` draft; details only for the configured token or
networks. Never cached.

Draining: ``drain_on_sigterm()`` (called by ``deploy/gunicorn.conf.py`` in
each worker) turns a SIGTERM into ``start_draining()``: readiness answers 503
at once while the process keeps serving every request for
``DRAIN_SECONDS``, so the load balancer takes it out of rotation before it
stops; then the server's own SIGTERM handling (graceful shutdown) runs.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import logging
import math
import os
import signal
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Future, wait
from dataclasses import dataclass
from types import FrameType
from typing import Any, Literal

from django.core.cache import caches
from django.core.signals import setting_changed
from django.db import connections
from django.db.utils import load_backend
from django.http import HttpRequest, HttpResponse

from django_scalekit import conf, metrics, routers

logger = logging.getLogger("django_scalekit.health")

Status = Literal["pass", "warn", "fail"]
CONTENT_TYPE = "application/health+json"
_STATUS_VALUE = {"pass": 1.0, "warn": 0.5, "fail": 0.0}

_check_status = metrics.gauge(
    "health_check_status",
    "Last result of each readiness check: 1 pass, 0.5 warn, 0 fail.",
    ["check"],
    multiprocess_mode="livemostrecent",
)
_check_duration = metrics.gauge(
    "health_check_duration_seconds",
    "Duration of each readiness check's last run.",
    ["check"],
    multiprocess_mode="livemostrecent",
)
_replica_lag = metrics.gauge(
    "health_replica_lag_seconds",
    "Replication lag of each replica at the last readiness check.",
    ["alias"],
    multiprocess_mode="livemostrecent",
)


class HealthWarning(Exception):
    """Raised by a check to report ``warn``: degraded, but able to serve."""

    def __init__(self, message: str, observed: Any = None) -> None:
        super().__init__(message)
        #: The measured value behind the warning (a replica's lag).
        self.observed = observed


@dataclass(frozen=True)
class CheckResult:
    """The outcome of one check."""

    name: str
    status: Status
    critical: bool
    duration: float
    output: str = ""
    #: Replication lag in seconds, for replica checks.
    lag: float | None = None
    component_id: str = ""


@dataclass(frozen=True)
class Report:
    """All check results and the overall status."""

    status: Status
    checks: tuple[CheckResult, ...]

    @property
    def http_status(self) -> int:
        return 503 if self.status == "fail" else 200


# --- Checks: each runs in its own thread -----------------------------------


def _database_check(
    alias: str, settings_dict: dict[str, Any], cfg: conf.HealthSettings
) -> Callable[[], Any]:
    def check() -> float | None:
        wrapper = load_backend(settings_dict["ENGINE"]).DatabaseWrapper(
            settings_dict, alias
        )
        connections[alias] = wrapper
        try:
            with wrapper.cursor() as cursor:
                cursor.execute("SELECT 1")
                cursor.fetchone()
            if alias not in cfg.replicas:
                return None
            lag = routers.replica_lag(alias)
            if lag is not None:
                _replica_lag.labels(alias).set(lag)
                if lag > cfg.replica_lag_warn_seconds:
                    raise HealthWarning(
                        f"replication lag {lag:.1f} s > {cfg.replica_lag_warn_seconds:g} s",
                        observed=lag,
                    )
            return lag
        finally:
            wrapper.close()
            del connections[alias]

    return check


def _read_back(cache: Any, key: str) -> Any:
    """Read ``key`` where it was written: django-redis reads from a replica
    when it has one (Sentinel, several ``LOCATION`` entries), which may not
    have the write yet."""
    get_client = getattr(getattr(cache, "client", None), "get_client", None)
    if get_client is None:
        return cache.get(key)
    return cache.get(key, client=get_client(write=True))


def _cache_check(alias: str) -> Callable[[], Any]:
    def check() -> None:
        cache = caches[alias]
        key = f"scalekit:health:{uuid.uuid4().hex}"
        value = uuid.uuid4().hex
        try:
            cache.set(key, value, 30)
            got = _read_back(cache, key)
            cache.delete(key)
        finally:
            cache.close()
        if got != value:
            # django-redis with IGNORE_EXCEPTIONS answers None instead of raising.
            raise RuntimeError(f"set/get round trip returned {got!r}")

    return check


#: A check still running after this many budgets is given up, not reused.
STALE_FACTOR = 10

#: Check name -> (time.monotonic() it started, its future).
_inflight: dict[str, tuple[float, Future[tuple[Status, str, float, Any]]]] = {}
_inflight_lock = threading.Lock()
_last_status: dict[str, Status] = {}


def _start(
    name: str, func: Callable[[], Any], timeout: float
) -> Future[tuple[Status, str, float, Any]]:
    now = time.monotonic()
    with _inflight_lock:
        started, future = _inflight.get(name, (0.0, None))
        if (
            future is not None
            and not future.done()
            and now - started < STALE_FACTOR * timeout
        ):
            return future
        future = Future()
        _inflight[name] = (now, future)

    def run() -> None:
        start = time.monotonic()
        status: Status = "pass"
        output = ""
        observed: Any = None
        try:
            observed = func()
        except HealthWarning as exc:
            status, output, observed = "warn", str(exc), exc.observed
        except BaseException as exc:
            status, output = "fail", f"{type(exc).__name__}: {exc}".strip()
        future.set_result((status, output, time.monotonic() - start, observed))

    threading.Thread(target=run, name=f"scalekit-health {name}", daemon=True).start()
    return future


def _bounded(db: dict[str, Any], timeout: float) -> dict[str, Any]:
    """A copy of ``db`` whose connection attempt and socket waits end.

    Without it a server that accepts connections but never answers holds the
    check's thread for the driver's own timeout, often forever.
    """
    seconds = max(1, math.ceil(timeout))
    engine = str(db.get("ENGINE", ""))
    options = dict(db.get("OPTIONS") or {})
    current = options.get("connect_timeout")
    if ("postgresql" in engine or "mysql" in engine) and not (
        isinstance(current, (int, float)) and 0 < current <= seconds
    ):
        options["connect_timeout"] = seconds
    if "postgresql" in engine:
        # libpq: keepalives end a connection whose peer vanished, and
        # tcp_user_timeout one whose sent data stays unacknowledged.
        options.setdefault("keepalives", 1)
        options.setdefault("keepalives_idle", seconds)
        options.setdefault("keepalives_interval", 1)
        options.setdefault("keepalives_count", 2)
        options.setdefault("tcp_user_timeout", seconds * 1000)
    elif "mysql" in engine:
        options.setdefault("read_timeout", seconds)
        options.setdefault("write_timeout", seconds)
    return {**db, "OPTIONS": options}


def _component_id(db: dict[str, Any]) -> str:
    host = db.get("HOST") or "localhost"
    return f"{host}:{db['PORT']}" if db.get("PORT") else str(host)


def run_checks() -> Report:
    """Run every configured check concurrently within ``TIMEOUT`` seconds."""
    cfg = conf.get().health
    started = time.monotonic()
    jobs: list[tuple[str, Callable[[], Any], str]] = []
    for alias in cfg.databases:
        # The calling thread's settings, which under the test runner point to
        # the test database (and a replica alias to its mirror).
        db = _bounded(dict(connections[alias].settings_dict), cfg.timeout)
        jobs.append((f"db:{alias}", _database_check(alias, db, cfg), _component_id(db)))
    for alias in cfg.caches:
        jobs.append((f"cache:{alias}", _cache_check(alias), ""))
    for name, func in cfg.checks:
        jobs.append((name, func, ""))
    futures = [_start(name, func, cfg.timeout) for name, func, _ in jobs]
    wait(futures, timeout=max(0.0, started + cfg.timeout - time.monotonic()))

    results = []
    for (name, _, component), future in zip(jobs, futures, strict=True):
        critical = name not in cfg.non_critical
        if future.done():
            status, output, duration, observed = future.result()
        else:
            status, duration, observed = "fail", time.monotonic() - started, None
            output = f"no answer within the {cfg.timeout:g} s budget"
        lag = observed if name.startswith("db:") and observed is not None else None
        results.append(
            CheckResult(name, status, critical, duration, output, lag, component)
        )
        _record(name, status, output, duration)
    if any(r.status == "fail" and r.critical for r in results):
        overall: Status = "fail"
    elif any(r.status != "pass" for r in results):
        overall = "warn"
    else:
        overall = "pass"
    return Report(overall, tuple(results))


#: The last report, its settings and time.monotonic() when it was made; and
#: the check in flight, which concurrent probes wait for instead of starting
#: their own (a flood of probes costs one round of checks per CACHE_SECONDS).
_report: tuple[conf.HealthSettings, float, Report] | None = None
_report_running: Future[Report] | None = None
_report_lock = threading.Lock()


def current_report() -> Report:
    """The readiness report: fresh, or at most ``CACHE_SECONDS`` old.

    Each probe would otherwise open a fresh connection to every database: a
    burst of probes (many balancers, a retry storm) must not become a burst
    of connections. A probe arriving while the checks run waits for them.
    """
    global _report, _report_running
    cfg = conf.get().health
    future: Future[Report] = Future()
    with _report_lock:
        if (
            cfg.cache_seconds > 0
            and _report is not None
            and _report[0] is cfg
            and time.monotonic() - _report[1] < cfg.cache_seconds
        ):
            return _report[2]
        running = _report_running
        if running is None:
            _report_running = future
    if running is not None:
        try:
            # Bounded: run_checks() returns within TIMEOUT.
            return running.result(timeout=cfg.timeout + 1)
        except Exception:
            return run_checks()
    try:
        report = run_checks()
    except BaseException as exc:
        with _report_lock:
            _report_running = None
        future.set_exception(exc)
        raise
    with _report_lock:
        _report = (cfg, time.monotonic(), report)
        _report_running = None
    future.set_result(report)
    return report


def _forget_report(**kwargs: object) -> None:
    global _report
    with _report_lock:
        _report = None


setting_changed.connect(_forget_report, weak=False)


def _record(name: str, status: Status, output: str, duration: float) -> None:
    _check_status.labels(name).set(_STATUS_VALUE[status])
    _check_duration.labels(name).set(duration)
    previous = _last_status.get(name, "pass")
    _last_status[name] = status
    if status != previous:
        log = logger.info if status == "pass" else logger.warning
        log("Health check %s: %s -> %s %s", name, previous, status, output)


# --- Draining ----------------------------------------------------------------

#: time.monotonic() when draining started, or None while serving normally.
_draining_since: float | None = None
#: Set once the drain period is over: the next SIGTERM goes to the server.
_drained = threading.Event()


def start_draining() -> None:
    """Make readiness answer 503 from now on; requests are still served."""
    global _draining_since
    if _draining_since is None:
        _draining_since = time.monotonic()
        logger.warning("Draining: readiness answers 503 until this process stops")


def is_draining() -> bool:
    """Whether ``start_draining()`` was called in this process."""
    return _draining_since is not None


def drain_on_sigterm(signum: int = signal.SIGTERM) -> None:
    """Delay the server's own handling of ``signum`` by ``DRAIN_SECONDS``.

    Call it in each worker after the server installed its handlers (under
    gunicorn: the ``post_worker_init`` hook, as ``deploy/gunicorn.conf.py``
    does), from the main thread. The first signal starts draining; once the
    period is over the signal is sent again and reaches the server's handler
    (gunicorn: stop accepting, finish in-flight requests, exit). Gunicorn's
    ``graceful_timeout`` must exceed ``DRAIN_SECONDS`` plus the longest request.
    """
    previous = signal.getsignal(signum)
    # Read now, not in the handler: a settings error surfaces at start-up.
    seconds = conf.get().health.drain_seconds

    def handler(sig: int, frame: FrameType | None) -> None:
        if _drained.is_set() or seconds <= 0:
            _drained.set()
            if callable(previous):
                previous(sig, frame)
            elif previous == signal.SIG_DFL:
                signal.signal(sig, signal.SIG_DFL)
                os.kill(os.getpid(), sig)
            return
        if is_draining():
            return  # a repeated signal: the timer is already running
        start_draining()

        def resend() -> None:
            _drained.set()
            # Handlers run in the main thread, where the server expects them.
            os.kill(os.getpid(), sig)

        timer = threading.Timer(seconds, resend)
        timer.daemon = True
        timer.name = "scalekit-drain"
        timer.start()

    signal.signal(signum, handler)


# --- HTTP ------------------------------------------------------------------


def shows_details(request: HttpRequest, cfg: conf.HealthSettings) -> bool:
    """Whether ``request`` may see error messages and hostnames."""
    if cfg.token is not None:
        auth = request.META.get("HTTP_AUTHORIZATION", "")
        scheme, _, credentials = auth.partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(
            credentials.strip().encode(), cfg.token.encode()
        ):
            return True
    if cfg.details_networks:
        try:
            address = ipaddress.ip_address(request.META.get("REMOTE_ADDR", ""))
        except ValueError:
            return False
        return any(address in network for network in cfg.details_networks)
    return False


def _body(report: Report, details: bool) -> dict[str, Any]:
    body: dict[str, Any] = {"status": report.status}
    if not details:
        return body
    checks: dict[str, list[dict[str, Any]]] = {}
    for result in report.checks:
        entry: dict[str, Any] = {
            "status": result.status,
            "observedValue": round(result.duration * 1000, 3),
            "observedUnit": "ms",
            "affectsServiceHealth": result.critical,
        }
        if result.component_id:
            entry["componentId"] = result.component_id
        if result.output:
            entry["output"] = result.output
        entries = [entry]
        if result.lag is not None:
            entries.append(
                {
                    "measurement": "replicationLag",
                    "status": result.status,
                    "observedValue": round(result.lag, 3),
                    "observedUnit": "s",
                }
            )
        checks[result.name] = entries
    body["checks"] = checks
    return body


def _respond(request: HttpRequest, status: int, body: dict[str, Any]) -> HttpResponse:
    content = b"" if request.method == "HEAD" else json.dumps(body).encode()
    response = HttpResponse(content, status=status, content_type=CONTENT_TYPE)
    response.headers["Cache-Control"] = "no-store"
    return response


def _method_not_allowed() -> HttpResponse:
    response = HttpResponse(status=405)
    response.headers["Allow"] = "GET, HEAD"
    response.headers["Cache-Control"] = "no-store"
    return response


def live(request: HttpRequest) -> HttpResponse:
    """Liveness: 200 while the process can serve; touches no backend."""
    if request.method not in ("GET", "HEAD"):
        return _method_not_allowed()
    return _respond(request, 200, {"status": "pass"})


def ready(request: HttpRequest) -> HttpResponse:
    """Readiness: 200 when every critical check passes, 503 otherwise."""
    if request.method not in ("GET", "HEAD"):
        return _method_not_allowed()
    if _draining_since is not None:
        # Shutting down: out of rotation before the server stops accepting.
        return _respond(request, 503, {"status": "fail", "output": "draining"})
    report = current_report()
    details = shows_details(request, conf.get().health)
    return _respond(request, report.http_status, _body(report, details))


def endpoint_for(path: str) -> Callable[[HttpRequest], HttpResponse] | None:
    """The health view serving ``path``, or None; used by HealthCheckMiddleware."""
    cfg = conf.get().health
    if path not in cfg.paths:
        return None
    return live if path == cfg.live_path else ready

"""gunicorn settings for the example shop (scripts/topology, docker-compose.yml).

Environment: GUNICORN_BIND (default 127.0.0.1:8000), GUNICORN_WORKERS (2),
GUNICORN_THREADS (1: sync workers), PROMETHEUS_MULTIPROC_DIR (set it, to an
empty directory of this instance's own, so that /metrics sums all workers).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

wsgi_app = "example_project.wsgi:application"
bind = os.environ.get("GUNICORN_BIND", "127.0.0.1:8000")
workers = int(os.environ.get("GUNICORN_WORKERS", "2"))
threads = int(os.environ.get("GUNICORN_THREADS", "1"))
# Behind HAProxy, which keeps connections open to each instance.
keepalive = 5
timeout = 30
# Above SCALEKIT["HEALTH"]["DRAIN_SECONDS"] (5) plus the longest request: a
# worker serves for the drain period after SIGTERM, then finishes in-flight
# requests; the master kills it at graceful_timeout.
graceful_timeout = 10
# Restart workers now and then, as a guard against leaks.
max_requests = 100_000
max_requests_jitter = 10_000
accesslog = os.environ.get("GUNICORN_ACCESSLOG") or None
errorlog = "-"

_MULTIPROC_DIR = os.environ.get("PROMETHEUS_MULTIPROC_DIR")


def on_starting(server: Any) -> None:
    # prometheus_client's multiprocess mode keeps one file per worker pid:
    # start from an empty directory, or old workers' counters add up.
    if _MULTIPROC_DIR:
        shutil.rmtree(_MULTIPROC_DIR, ignore_errors=True)
        Path(_MULTIPROC_DIR).mkdir(parents=True, exist_ok=True)


def post_worker_init(worker: Any) -> None:
    # After gunicorn installed the worker's signal handlers: on SIGTERM,
    # readiness turns 503 and the worker keeps serving DRAIN_SECONDS, so the
    # load balancer takes it out before it stops accepting (issue 9).
    from django_scalekit import health

    health.drain_on_sigterm()


def child_exit(server: Any, worker: Any) -> None:
    # A dead worker's live gauges stop counting (counters are kept).
    if _MULTIPROC_DIR:
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(worker.pid)

"""Read-your-writes by time versus by WAL position, on the same workload.

Needs the real PostgreSQL primary and streaming replica (``scripts/services
up``); run from the repository root::

    python benchmarks/bench_causal_reads.py [--writes 40] [--reads 10] [--interval 0.05]

For each replica apply delay (0 and 200 ms, set with ``scripts/services
replica-delay``) and each mode, one client writes a row and then reads it
back ``--reads`` times, ``--interval`` seconds apart, through Django's test
client with ``PinningMiddleware`` carrying the cookie between requests. Each
read reports which database served it; a read that does not see the client's
own row is stale. Modes:

- ``none``: no cross-request read-your-writes (``PINNING_SECONDS = 0``), to
  show that the workload does catch stale reads;
- ``time``: the default, pinning to the primary for ``PINNING_SECONDS``;
- ``lsn``: ``READ_YOUR_WRITES = "lsn"``.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
import uuid
from pathlib import Path

import django
import psycopg
from django.conf import settings

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
DB = "scalekit_bench_causal"

settings.configure(
    SECRET_KEY="django-scalekit-benchmarks",
    USE_TZ=True,
    ALLOWED_HOSTS=["testserver"],
    INSTALLED_APPS=["django.contrib.contenttypes", "django_scalekit", "tests.testapp"],
    DATABASES={
        "default": {
            "ENGINE": "django.db.backends.postgresql",
            "NAME": DB,
            "USER": "postgres",
            "HOST": "127.0.0.1",
            "PORT": 5432,
            "CONN_MAX_AGE": 60,
        },
        "replica": {
            "ENGINE": "django.db.backends.postgresql",
            "NAME": DB,
            "USER": "postgres",
            "HOST": "127.0.0.1",
            "PORT": 5433,
            "CONN_MAX_AGE": 60,
            "OPTIONS": {"connect_timeout": 2},
        },
    },
    DATABASE_ROUTERS=["django_scalekit.routers.PrimaryReplicaRouter"],
    MIDDLEWARE=["django_scalekit.middleware.PinningMiddleware"],
    ROOT_URLCONF=__name__,
    SCALEKIT={"REPLICAS": ["replica"]},
)
django.setup()

from django.core.management import call_command  # noqa: E402
from django.http import HttpRequest, JsonResponse  # noqa: E402
from django.test import Client, override_settings  # noqa: E402
from django.urls import path  # noqa: E402
from django.views.decorators.csrf import csrf_exempt  # noqa: E402

from django_scalekit.routers import PrimaryReplicaRouter  # noqa: E402
from tests.testapp.models import Item  # noqa: E402

_router = PrimaryReplicaRouter()


@csrf_exempt
def write(request: HttpRequest) -> JsonResponse:
    Item.objects.create(name=request.POST["name"])
    return JsonResponse({})


def read(request: HttpRequest) -> JsonResponse:
    seen = Item.objects.filter(name=request.GET["name"]).exists()
    return JsonResponse({"seen": seen, "read_from": _router.db_for_read(Item)})


urlpatterns = [path("write/", write), path("read/", read)]

MODES = {
    "none": {"REPLICAS": ["replica"], "PINNING_SECONDS": 0},
    "time": {"REPLICAS": ["replica"], "PINNING_SECONDS": 5},
    "lsn": {"REPLICAS": ["replica"], "PINNING_SECONDS": 5, "READ_YOUR_WRITES": "lsn"},
}


def prepare() -> None:
    with psycopg.connect(
        host="127.0.0.1", port=5432, user="postgres", dbname="postgres", autocommit=True
    ) as conn:
        if not conn.execute(
            "SELECT 1 FROM pg_database WHERE datname = %s", [DB]
        ).fetchone():
            conn.execute(f'CREATE DATABASE "{DB}"')
    call_command("migrate", database="default", verbosity=0)
    deadline = time.monotonic() + 30
    while True:  # the replica replays CREATE DATABASE and the migrations
        try:
            with psycopg.connect(
                host="127.0.0.1", port=5433, user="postgres", dbname=DB
            ) as conn:
                if conn.execute("SELECT to_regclass('testapp_item')").fetchone()[0]:
                    return
        except psycopg.OperationalError:
            pass
        if time.monotonic() > deadline:
            sys.exit("the replica did not replay the benchmark database within 30 s")
        time.sleep(0.2)


def run(mode: str, writes: int, reads: int, interval: float) -> dict[str, float]:
    served = {"default": 0, "replica": 0}
    stale = 0
    with override_settings(SCALEKIT=MODES[mode]):
        client = Client()
        for _ in range(writes):
            name = uuid.uuid4().hex
            client.post("/write/", {"name": name})
            for _ in range(reads):
                body = client.get("/read/", {"name": name}).json()
                served[body["read_from"]] += 1
                stale += not body["seen"]
                time.sleep(interval)
    total = sum(served.values())
    return {"reads": total, "replica": served["replica"] / total, "stale": stale}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--writes", type=int, default=40)
    parser.add_argument("--reads", type=int, default=10)
    parser.add_argument("--interval", type=float, default=0.05)
    args = parser.parse_args()
    prepare()
    services = str(ROOT / "scripts" / "services")
    print(
        f"{args.writes} writes, each followed by {args.reads} reads {args.interval * 1000:.0f} ms apart"
    )
    print(
        f"{'apply delay':>11}  {'mode':<5} {'reads':>6} {'from replica':>13} {'stale':>6}"
    )
    try:
        for delay in (0, 200):
            subprocess.run(
                [services, "replica-delay", str(delay)], check=True, capture_output=True
            )
            for mode in MODES:
                r = run(mode, args.writes, args.reads, args.interval)
                print(
                    f"{delay:>8} ms  {mode:<5} {r['reads']:>6} {r['replica']:>12.1%} {r['stale']:>6}"
                )
    finally:
        subprocess.run(
            [services, "replica-delay", "0"], check=True, capture_output=True
        )


if __name__ == "__main__":
    main()

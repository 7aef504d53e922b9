"""Fault scenarios for the replica router, counted as a client sees them.

Each scenario drives real requests through Django (PinningMiddleware, the
test views) against the real primary and streaming replica, and records
failed requests, stale reads and the worst latency. Run on their own with
``pytest -m faults``; ``docs/benchmarks.md`` has the table.
"""

from __future__ import annotations

import threading
import time
import uuid

import pytest
from django.db import connections
from django.test import Client, override_settings

from django_scalekit import routers
from tests.conftest import services, wait_until
from tests.testapp.models import Item

pytestmark = [
    pytest.mark.faults,
    pytest.mark.django_db(transaction=True, databases="__all__"),
]

SCALEKIT = {"REPLICAS": ["replica"], "PINNING_SECONDS": 5, "REPLICA_RETRY_SECONDS": 30}


class Load:
    """A bounded loop of requests from several threads, counting outcomes."""

    def __init__(self) -> None:
        self.failed = 0
        self.requests = 0
        self.worst = 0.0
        self.stale = 0
        self.lock = threading.Lock()
        self.stop = threading.Event()

    def run(self, client_loop, threads: int = 4, seconds: float = 4.0) -> None:
        def worker():
            client = Client(raise_request_exception=False)
            deadline = time.monotonic() + seconds
            while time.monotonic() < deadline and not self.stop.is_set():
                client_loop(client, self)
            connections.close_all()

        workers = [threading.Thread(target=worker) for _ in range(threads)]
        for t in workers:
            t.start()
        for t in workers:
            t.join()

    def timed(self, call) -> object:
        started = time.monotonic()
        response = call()
        took = time.monotonic() - started
        with self.lock:
            self.requests += 1
            self.worst = max(self.worst, took)
            if response.status_code != 200:
                self.failed += 1
        return response

    def figures(self) -> dict[str, object]:
        return {
            "requests": self.requests,
            "failed": self.failed,
            "stale": self.stale,
            "worst_ms": round(self.worst * 1000),
        }


def reads(client: Client, load: Load) -> None:
    load.timed(lambda: client.get("/items/"))


def write_then_read(client: Client, load: Load) -> None:
    name = uuid.uuid4().hex
    load.timed(lambda: client.post("/items/", {"name": name}))
    response = load.timed(lambda: client.get("/items/"))
    if response.status_code == 200 and name not in response.json()["names"]:
        with load.lock:
            load.stale += 1


def test_replica_dropping_packets(replica, blackhole, record):
    settings = {**SCALEKIT, "REPLICAS": {"replica_blackhole": 1, "replica": 1}}
    load = Load()
    with override_settings(SCALEKIT=settings):
        load.run(reads, threads=6, seconds=4)
    record("replica drops packets (iptables), 6 threads reading", **load.figures())
    assert load.failed == 0
    # One connect timeout (2 s, libpq's minimum) plus normal latency.
    assert load.worst < 2 + 1.0


@pytest.mark.outage
def test_replica_stopped_and_restarted(replica, record, caplog):
    load = Load()

    def outage():
        # The load runs until the replica has been down and back: a slow
        # stop or start command cannot leave the fault outside the load.
        try:
            time.sleep(1)
            services("replica-stop")
            time.sleep(2)
            services("replica-start")
            time.sleep(1)
        finally:
            load.stop.set()

    with override_settings(SCALEKIT={**SCALEKIT, "REPLICA_RETRY_SECONDS": 1}):
        chaos = threading.Thread(target=outage)
        chaos.start()
        try:
            load.run(reads, threads=4, seconds=120)
        finally:
            chaos.join()
            connections["replica"].close()
    retried = caplog.text.count("failed mid-query")
    # The fault was seen: the replica left rotation at least once.
    assert "is out of rotation" in caplog.text
    record(
        "replica stopped for 2 s and restarted, 4 threads reading",
        **load.figures(),
        retried=retried,
    )
    # A query running on the replica when it is shut down fails with it;
    # PinningMiddleware runs such a read-only request's view again, off the
    # replica (RETRY_ON_REPLICA_FAILURE), so the client sees no failure.
    assert load.failed == 0
    routers.reset_replica_state()
    assert wait_until(lambda: Client().get("/items/").json()["read_from"] == "replica")


@pytest.mark.parametrize("mode", ["time", "lsn"])
def test_read_your_writes_with_a_lagging_replica(replica_delay, record, mode):
    replica_delay(1000)
    settings = {**SCALEKIT, "READ_YOUR_WRITES": mode, "LSN_CHECK_SECONDS": 0.1}
    load = Load()
    with override_settings(SCALEKIT=settings):
        load.run(write_then_read, threads=4, seconds=4)
    record(
        f"read-your-writes ({mode}), replica 1 s behind, 4 writers", **load.figures()
    )
    assert load.failed == 0
    assert load.stale == 0


def test_stale_reads_are_caught_without_pinning(replica_delay, record):
    # The control: with pinning off the same loop does see stale reads, so
    # the zero above is a measurement, not an accident.
    replica_delay(1000)
    load = Load()
    with override_settings(SCALEKIT={**SCALEKIT, "PINNING_SECONDS": 0}):
        load.run(write_then_read, threads=2, seconds=2)
    record("control: no cross-request pinning, replica 1 s behind", **load.figures())
    assert load.stale > 0
    assert Item.objects.exists()

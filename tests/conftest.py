from __future__ import annotations

import fcntl
import json
import os
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
from django.db import connections

from django_scalekit import routers

ROOT = Path(__file__).resolve().parent.parent
SERVICES = ROOT / "scripts" / "services"
IN_CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}
REPLICA_PORT = int(os.environ.get("SCALEKIT_REPLICA_PORT", "5433"))


def _listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def require_service(name: str, port: int) -> None:
    """Skip (locally) or fail (CI=true) when a service the test needs is absent."""
    if _listening(port):
        return
    message = f"{name} is not answering on 127.0.0.1:{port}; start it with `scripts/services up`"
    if IN_CI:
        pytest.fail(message + " (CI=true: a missing service is a failure)")
    pytest.skip(message)


def pytest_configure(config):
    # Two runs sharing a test database would drop it under each other (e.g.
    # tox envs run by hand in parallel): the second one waits for the first.
    from django.conf import settings

    name = settings.DATABASES["default"]["NAME"]
    lock = open(f"{tempfile.gettempdir()}/scalekit-tests-{name}.lock", "w")  # noqa: SIM115
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        print(f"waiting for another test run using database {name!r} ...")
        fcntl.flock(lock, fcntl.LOCK_EX)
    config._scalekit_lock = lock


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    if item.get_closest_marker("django_db"):
        require_service("PostgreSQL (primary)", 5432)


def services(*args: str) -> None:
    subprocess.run([str(SERVICES), *args], check=True, capture_output=True, timeout=120)


@pytest.fixture(scope="session")
def django_db_setup(django_db_setup, django_db_blocker):
    """After creating the test databases, wait until the streaming replica has
    replayed them: a test that reads a replica first must not find it missing."""
    from django.conf import settings

    if not _listening(REPLICA_PORT):
        return
    names = {
        db["NAME"]
        for db in settings.DATABASES.values()
        if db.get("ENGINE", "").endswith("postgresql") and db.get("PORT") == 5432
    }
    with django_db_blocker.unblock():
        import psycopg

        # pytest-django creates only the databases the selected tests use.
        with psycopg.connect(
            host="127.0.0.1", port=5432, user="postgres", dbname="postgres"
        ) as conn:
            rows = conn.execute("SELECT datname FROM pg_database").fetchall()
        names &= {name for (name,) in rows}

        def replayed() -> bool:
            with psycopg.connect(
                host="127.0.0.1", port=REPLICA_PORT, user="postgres", dbname="postgres"
            ) as conn:
                rows = conn.execute("SELECT datname FROM pg_database").fetchall()
            return names <= {name for (name,) in rows}

        assert wait_until(replayed, timeout=60), (
            f"the replica never showed {sorted(names)}"
        )


@pytest.fixture(autouse=True)
def _fresh_routing_state():
    """Each test starts with every replica in rotation and a new routing scope."""
    routers.reset_replica_state()
    token = routers.begin_scope()
    yield
    routers.end_scope(token)
    routers.reset_replica_state()


@pytest.fixture
def replica():
    """The real streaming replica, with no apply delay."""
    require_service("PostgreSQL streaming replica", REPLICA_PORT)
    yield "replica"


@pytest.fixture
def replica_delay(replica):
    """Set the replica's recovery_min_apply_delay (ms) for the test, then clear it."""
    set_to: list[int] = []

    def set_delay(ms: int) -> None:
        services("replica-delay", str(ms))
        set_to.append(ms)

    yield set_delay
    if set_to:
        services("replica-delay", "0")


@pytest.fixture
def blackhole():
    """Port 5439 on loopback drops packets (iptables) for the test."""
    if os.geteuid() != 0:
        message = "dropping packets with iptables needs root"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    services("blackhole-on", "5439")
    try:
        yield 5439
    finally:
        services("blackhole-off", "5439")


@pytest.fixture
def replica_stopped(replica):
    """Stop the replica cluster for the test, and start it again afterwards."""
    for alias in ("replica",):
        connections[alias].close()
    services("replica-stop")
    try:
        yield
    finally:
        services("replica-start")
        connections["replica"].close()


def wait_until(predicate, timeout: float = 15.0, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return False


@pytest.fixture
def on_replica():
    """Read item names straight from the replica, bypassing the router."""

    def names() -> list[str]:
        from tests.testapp.models import Item

        return sorted(Item.objects.using("replica").values_list("name", flat=True))

    return names


# --- fault scenario figures ----------------------------------------------------------

#: One file per test session (pid), so concurrent runs do not mix their rows.
FAULT_RESULTS = Path(
    os.environ.get(
        "SCALEKIT_FAULTS_RESULTS",
        Path(tempfile.gettempdir()) / f"scalekit-faults-{os.getpid()}.json",
    )
)


@pytest.fixture
def record():
    """Record a fault scenario's figures; the session prints them as a table."""

    def add(scenario: str, **figures: object) -> None:
        rows = json.loads(FAULT_RESULTS.read_text()) if FAULT_RESULTS.exists() else {}
        rows[scenario] = figures
        FAULT_RESULTS.write_text(json.dumps(rows, indent=2))

    return add


def pytest_sessionstart(session):
    FAULT_RESULTS.unlink(missing_ok=True)


def pytest_terminal_summary(terminalreporter):
    if not FAULT_RESULTS.exists():
        return
    rows = json.loads(FAULT_RESULTS.read_text())
    FAULT_RESULTS.unlink()
    terminalreporter.section("fault scenarios")
    for scenario, figures in rows.items():
        shown = ", ".join(f"{k}={v}" for k, v in figures.items())
        terminalreporter.write_line(f"{scenario}: {shown}")

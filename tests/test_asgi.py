"""Routing state under a real ASGI server: no cross-talk between requests."""

from __future__ import annotations

import http.client
import json
import random
import socket
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from django.db import connections

from tests.conftest import wait_until

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.django_db(transaction=True, databases="__all__")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def uvicorn_server(replica):
    pytest.importorskip("uvicorn", reason="uvicorn is in the test dependency group")
    port = free_port()
    env = {
        "PATH": "/usr/bin:/bin",
        "PYTHONPATH": str(ROOT),
        "DJANGO_SETTINGS_MODULE": "tests.asgi_settings",
        "SCALEKIT_SERVE_DB": connections["default"].settings_dict["NAME"],
    }
    log = open(f"/tmp/scalekit-uvicorn-{port}.log", "w+")  # noqa: SIM115
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "uvicorn",
            "tests.asgi:application",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--log-level",
            "warning",
        ],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )

    def up():
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return True
        except OSError:
            return False

    try:
        assert wait_until(up, timeout=20), "uvicorn did not start"
        yield port, log
    finally:
        process.terminate()
        process.wait(timeout=10)
        log.close()


def request(
    port: int, method: str, path: str, body: str | None = None
) -> tuple[int, dict, str]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    headers = {"Content-Type": "application/x-www-form-urlencoded"} if body else {}
    conn.request(method, path, body=body, headers=headers)
    response = conn.getresponse()
    payload = response.read()
    cookie = response.getheader("Set-Cookie") or ""
    conn.close()
    return (
        response.status,
        json.loads(payload) if response.status == 200 else {},
        cookie,
    )


@pytest.mark.slow
def test_interleaved_sync_and_async_requests_do_not_share_routing_state(uvicorn_server):
    port, log = uvicorn_server
    rng = random.Random(1234)
    kinds = [rng.choice(["write", "read", "async_read"]) for _ in range(1000)]

    def one(i_kind):
        i, kind = i_kind
        if kind == "write":
            return kind, request(port, "POST", "/items/", f"name=item-{i}")
        if kind == "read":
            return kind, request(port, "GET", "/items/")
        return kind, request(port, "GET", "/async/items/")

    with ThreadPoolExecutor(max_workers=24) as pool:
        results = list(pool.map(one, enumerate(kinds)))

    statuses = [status for _, (status, _, _) in results]
    assert statuses.count(200) == 1000, sorted(set(statuses))
    wrong = [
        (kind, body["read_from"])
        for kind, (_, body, _) in results
        if body["read_from"] != ("default" if kind == "write" else "replica")
    ]
    # A write pins only its own request; nothing else in flight is pinned.
    assert wrong == []
    pinned = {(kind, bool(cookie)) for kind, (_, _, cookie) in results}
    assert pinned == {("write", True), ("read", False), ("async_read", False)}
    log.seek(0)
    server_log = log.read()
    assert "ValueError" not in server_log
    assert "Traceback" not in server_log

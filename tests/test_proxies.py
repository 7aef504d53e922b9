"""The real things in front of Django: Varnish as the CDN, HAProxy as the load
balancer, each started by scripts/proxies on loopback ports, in front of
Django served by gunicorn (tests/wsgi.py, settings tests/serve_settings.py).
"""

from __future__ import annotations

import csv
import io
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
from django.test import override_settings

from django_scalekit import cdn
from tests.conftest import IN_CI, ROOT, require_service, wait_until

PROXIES = ROOT / "scripts" / "proxies"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def proxies(*args):
    return subprocess.run(
        [str(PROXIES), *args], capture_output=True, text=True, timeout=600
    )


@pytest.fixture(scope="module")
def installed():
    result = proxies("install")
    if result.returncode != 0:
        message = f"varnish/haproxy cannot be installed: {result.stderr.strip()}"
        if IN_CI:
            pytest.fail(message + " (CI=true)")
        pytest.skip(message)


class Django:
    """gunicorn serving the test project on a loopback port."""

    def __init__(self, tmp_path, name, port=None, **env):
        require_service("PostgreSQL (primary)", 5432)
        require_service("Redis", 6379)
        self.port = port or free_port()
        self.flag = tmp_path / f"{name}.not-ready"
        env = {
            **os.environ,
            "DJANGO_SETTINGS_MODULE": "tests.serve_settings",
            "SCALEKIT_HEALTH_FLAG": str(self.flag),
            "PYTHONPATH": str(ROOT),
            **env,
        }
        self.log = open(tmp_path / f"{name}.log", "a")  # noqa: SIM115
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "gunicorn",
                # The shipped settings (and their draining hook), with the
                # test's address, workers and application below.
                "--config",
                str(ROOT / "deploy" / "gunicorn.conf.py"),
                "--bind",
                f"127.0.0.1:{self.port}",
                "--workers",
                "1",
                "--threads",
                "8",
                "--graceful-timeout",
                "2",
                "tests.wsgi",
            ],
            cwd=ROOT,
            env=env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        self.url = f"http://127.0.0.1:{self.port}"
        if not wait_until(self._live, timeout=20):
            self.stop()
            pytest.fail(f"gunicorn did not start; see {self.log.name}")

    def _live(self):
        try:
            return requests.get(self.url + "/health/live/", timeout=1).ok
        except requests.RequestException:
            # Refused while booting, or slow on the first request (imports).
            return self.process.poll() is not None

    def stop(self):
        if self.log.closed:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.log.close()


@pytest.fixture
def django_server(tmp_path):
    servers = []

    def start(name="app", **kwargs):
        server = Django(tmp_path, name, **kwargs)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


@pytest.fixture
def varnish(installed, django_server, tmp_path):
    app = django_server()
    port = free_port()
    run = tmp_path / "varnish"
    result = proxies("varnish-up", str(run), str(port), str(app.port))
    assert result.returncode == 0, result.stderr
    yield f"http://127.0.0.1:{port}"
    proxies("varnish-down", str(run))


# --- Varnish ------------------------------------------------------------------


def get(url, **headers):
    response = requests.get(url, headers=headers, timeout=5)
    assert response.status_code == 200, (url, response.status_code)
    return response


def test_varnish_caches_public_and_never_per_user(varnish):
    first = get(varnish + "/api/items/")
    second = get(varnish + "/api/items/")
    assert first.headers["Cache-Control"] == "public, max-age=0, s-maxage=60"
    assert second.headers["X-Hit"] == first.headers["X-Hit"]  # Django saw one
    assert len(second.headers["X-Varnish"].split()) == 2  # a hit names two
    assert "CDN-Cache-Control" not in second.headers  # stripped at the edge

    # A response that sets a cookie: never stored, the cookie never replayed.
    one, two = get(varnish + "/api/cookie/"), get(varnish + "/api/cookie/")
    assert "private" in one.headers["Cache-Control"]
    assert one.headers["X-Hit"] != two.headers["X-Hit"]
    assert "flavour=oatmeal" in two.headers["Set-Cookie"]

    # A GET that writes: PinningMiddleware (above the CDN middleware here)
    # adds its cookie; the response is private, never stored or replayed.
    one, two = get(varnish + "/api/writes/"), get(varnish + "/api/writes/")
    assert one.headers["Cache-Control"] == "private, max-age=0"
    assert "scalekit_pin=" in one.headers["Set-Cookie"]
    assert "CDN-Cache-Control" not in one.headers
    assert one.headers["X-Hit"] != two.headers["X-Hit"]
    assert "scalekit_pin=" in two.headers["Set-Cookie"]

    # A private rule: every request reaches Django.
    one, two = get(varnish + "/private/"), get(varnish + "/private/")
    assert one.headers["X-Hit"] != two.headers["X-Hit"]

    # An answer to an authenticated request is not kept for the next client.
    url = varnish + "/api/items/?fresh=1"
    authed = get(url, Authorization="Bearer alice")
    assert authed.headers["Cache-Control"].startswith("private")
    anonymous = get(url)
    assert anonymous.headers["X-Hit"] != authed.headers["X-Hit"]
    assert get(url).headers["X-Hit"] == anonymous.headers["X-Hit"]


def test_varnish_shares_pages_despite_analytics_cookies(varnish):
    # Issue 9: each visitor's own analytics cookies; the VCL looks requests
    # with cookies up, so the origin's headers alone decide.
    def visitor(n, url):
        return get(varnish + url, Cookie=f"_ga=GA1.1.{n}.{n}; _gid=GA1.1.{n}")

    responses = [visitor(n, "/api/items/") for n in range(5)]
    assert responses[0].headers["Cache-Control"] == "public, max-age=0, s-maxage=60"
    assert {r.headers["X-Hit"] for r in responses} == {responses[0].headers["X-Hit"]}
    assert [len(r.headers["X-Varnish"].split()) for r in responses] == [1, 2, 2, 2, 2]

    # The view reads the session, or the user: private, every one reaches Django.
    for url in ("/api/session/", "/api/user/"):
        responses = [visitor(n, url) for n in range(3)]
        assert responses[0].headers["Cache-Control"] == "private, max-age=0"
        assert len({r.headers["X-Hit"] for r in responses}) == 3
        assert all(len(r.headers["X-Varnish"].split()) == 1 for r in responses)


def test_varnish_never_answers_a_user_with_the_anonymous_copy(varnish):
    url = varnish + "/api/items/?anonymous-copy=1"
    cached = get(url)
    assert cached.headers["Vary"] == "Authorization"
    assert get(url).headers["X-Hit"] == cached.headers["X-Hit"]
    # A client carrying credentials, a session, pending messages or a pin
    # reaches Django every time (the VCL passes it), and is answered privately.
    for headers in (
        {"Authorization": "Bearer alice"},
        {"Cookie": "sessionid=abc; _ga=GA1.1.1.1"},
        {"Cookie": "_ga=GA1.1.1.1;messages=xyz"},
        {"Cookie": "scalekit_pin=1"},
    ):
        one, two = get(url, **headers), get(url, **headers)
        assert cached.headers["X-Hit"] != one.headers["X-Hit"] != two.headers["X-Hit"]
        assert len(one.headers["X-Varnish"].split()) == 1, headers
    # Analytics cookies alone still share the copy.
    assert get(url, Cookie="_ga=GA1.1.9.9").headers["X-Hit"] == cached.headers["X-Hit"]


def test_purge_and_ban_through_varnish(varnish):
    port = int(varnish.rsplit(":", 1)[1])
    cached = get(varnish + "/api/items/").headers["X-Hit"]
    tagged = get(varnish + "/api/tagged/").headers["X-Hit"]
    assert get(varnish + "/api/items/").headers["X-Hit"] == cached
    assert get(varnish + "/api/tagged/").headers["X-Hit"] == tagged
    purge = {
        "BACKEND": "django_scalekit.cdn.HTTPPurgeBackend",
        "OPTIONS": {"ENDPOINTS": [f"http://127.0.0.1:{port}"]},
    }
    with override_settings(SCALEKIT={"CDN": {"PURGE": purge}}):
        result = cdn.purge(urls=["http://shop.example.com/api/items/"])
        assert result.errors == [] and result.purged == 1
        # The Host header names the cached object: this one was cached for
        # 127.0.0.1:port, so purge it under that name too.
        result = cdn.purge(urls=[varnish + "/api/items/"], tags=["products"])
        assert result.errors == [] and result.purged == 2
    assert get(varnish + "/api/items/").headers["X-Hit"] != cached
    assert get(varnish + "/api/tagged/").headers["X-Hit"] != tagged


# --- Health through a real server ------------------------------------------------


def test_probe_by_ip_address_through_gunicorn(django_server):
    # SECURE_SSL_REDIRECT = True, ALLOWED_HOSTS = ["shop.example.com"].
    app = django_server(SCALEKIT_SERVE_STRICT="1")
    started = time.monotonic()
    # Only the Host header says 10.0.0.5: the connection goes to loopback.
    response = requests.get(
        app.url + "/health/", headers={"Host": "10.0.0.5"}, timeout=5
    )
    elapsed = time.monotonic() - started
    assert response.status_code == 200, response.text
    assert response.json() == {"status": "pass"}
    assert response.headers["Cache-Control"] == "no-store"
    assert elapsed < 2
    head = requests.head(app.url + "/health/", headers={"Host": "10.0.0.5"}, timeout=5)
    assert (head.status_code, head.content) == (200, b"")
    page = requests.get(app.url + "/page/", headers={"Host": "10.0.0.5"}, timeout=5)
    assert page.status_code == 400
    page = requests.get(
        app.url + "/page/",
        headers={"Host": "shop.example.com"},
        allow_redirects=False,
        timeout=5,
    )
    assert page.status_code == 301
    assert page.headers["Location"] == "https://shop.example.com/page/"
    app.flag.touch()

    def probe():
        return requests.get(
            app.url + "/health/",
            headers={"Host": "10.0.0.5"},
            allow_redirects=False,
            timeout=5,
        ).status_code

    # A probe in flight when the flag appeared may still answer 200.
    flagged = time.monotonic()
    assert wait_until(lambda: probe() == 503, timeout=3)
    assert time.monotonic() - flagged < 1 + 0.5
    assert probe() == 503


# --- HAProxy ----------------------------------------------------------------------


def server_states(socket_path):
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(str(socket_path))
        s.sendall(b"show stat\n")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    rows = csv.DictReader(io.StringIO(data.decode().lstrip("# ")))
    return {
        row["svname"]: row["status"] for row in rows if row["svname"].startswith("app")
    }


def test_haproxy_takes_an_unready_instance_out_and_back(
    installed, django_server, tmp_path
):
    one, two = django_server("one"), django_server("two")
    port = free_port()
    run = tmp_path / "haproxy"
    result = proxies("haproxy-up", str(run), str(port), str(one.port), str(two.port))
    assert result.returncode == 0, result.stderr
    sock = run / "haproxy.sock"
    url = f"http://127.0.0.1:{port}/page/"
    failures = []
    served = 0
    session = requests.Session()

    def client_requests(seconds):
        nonlocal served
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:  # bounded: a few hundred requests
            try:
                response = session.get(url, timeout=5)
                if response.status_code != 200:
                    failures.append(response.status_code)
            except requests.RequestException as exc:
                failures.append(repr(exc))
            served += 1
            time.sleep(0.01)

    try:
        assert wait_until(
            lambda: set(server_states(sock).values()) == {"UP"}, timeout=10
        )
        client_requests(0.5)

        one.flag.touch()  # instance one's readiness now fails
        started = time.monotonic()
        while server_states(sock)["app1"] != "DOWN":
            assert time.monotonic() - started < 10, server_states(sock)
            client_requests(0.05)
        down_after = time.monotonic() - started
        client_requests(1.0)
        assert server_states(sock) == {"app1": "DOWN", "app2": "UP"}

        one.flag.unlink()
        started = time.monotonic()
        while server_states(sock)["app1"] != "UP":
            assert time.monotonic() - started < 10, server_states(sock)
            client_requests(0.05)
        up_after = time.monotonic() - started
        client_requests(0.5)
    finally:
        proxies("haproxy-down", str(run))
    print(
        f"DOWN after {down_after:.2f} s, UP after {up_after:.2f} s, {served} requests"
    )
    assert failures == []
    assert served > 100
    # inter 200ms x fall/rise 2: detection takes well under the 10 s bound.
    assert down_after < 3 and up_after < 3


def test_rolling_restart_behind_haproxy_fails_no_request(
    installed, django_server, tmp_path
):
    # Issue 9: SIGTERM each instance in turn (gunicorn's graceful shutdown,
    # draining through deploy/gunicorn.conf.py), restart it once it exited,
    # under a client loop: HAProxy takes each out before it stops.
    drain = {"SCALEKIT_HEALTH_DRAIN_SECONDS": "1"}
    apps = [django_server("one", **drain), django_server("two", **drain)]
    port = free_port()
    run = tmp_path / "haproxy"
    result = proxies("haproxy-up", str(run), str(port), *(str(a.port) for a in apps))
    assert result.returncode == 0, result.stderr
    sock = run / "haproxy.sock"
    url = f"http://127.0.0.1:{port}/page/"
    failures, latencies = [], []
    stop = threading.Event()

    def client():
        session = requests.Session()
        deadline = time.monotonic() + 60  # bounded, whatever happens
        while not stop.is_set() and time.monotonic() < deadline:
            started = time.monotonic()
            try:
                response = session.get(url, timeout=5)
                if response.status_code != 200:
                    failures.append(response.status_code)
            except requests.RequestException as exc:
                failures.append(repr(exc))
            latencies.append(time.monotonic() - started)
            time.sleep(0.005)

    loop = threading.Thread(target=client)
    drained_before_exit = []
    try:
        assert wait_until(
            lambda: set(server_states(sock).values()) == {"UP"}, timeout=10
        )
        loop.start()
        time.sleep(0.3)
        for i, app in enumerate(list(apps)):
            name = f"app{i + 1}"
            # A request in flight when the signal arrives.
            slow = ThreadPoolExecutor(1).submit(
                requests.get, app.url + "/slow/?seconds=0.5", timeout=5
            )
            time.sleep(0.1)
            app.process.send_signal(signal.SIGTERM)
            time.sleep(0.05)
            # Readiness turns 503 first; new requests are still served.
            assert requests.get(app.url + "/health/", timeout=2).status_code == 503
            assert requests.get(app.url + "/health/live/", timeout=2).status_code == 200
            assert requests.get(app.url + "/page/", timeout=2).status_code == 200
            down = False
            while app.process.poll() is None:
                down = down or server_states(sock)[name].startswith("DOWN")
                time.sleep(0.02)
            drained_before_exit.append(down)
            assert slow.result().status_code == 200
            app.stop()
            apps[i] = django_server(f"{name}-restarted", port=app.port, **drain)
            assert wait_until(lambda n=name: server_states(sock)[n] == "UP", timeout=10)
        time.sleep(0.3)
    finally:
        stop.set()
        if loop.is_alive():
            loop.join()
        proxies("haproxy-down", str(run))
    worst = max(latencies)
    print(
        f"rolling restart: {len(latencies)} requests, {len(failures)} failed, "
        f"worst {worst * 1000:.0f} ms"
    )
    assert drained_before_exit == [True, True]
    assert failures == []
    assert len(latencies) > 200
    assert worst < 1.5

"""The real things in front of Django: Varnish as the CDN, HAProxy as the load
balancer, each started by scripts/proxies on loopback ports, in front of
Django served by gunicorn with deploy/gunicorn.conf.py: the example shop
(example_project/, on SQLite files of this module's own) for issue 5's
proofs, and the test project (tests/wsgi.py, settings tests/serve_settings.py)
for the cases the shop has no page for (purge, draining, strict hosts).
"""

from __future__ import annotations

import contextlib
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

pytestmark = pytest.mark.slow

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


#: gunicorn's quick shutdown, for tearing down: SIGTERM would drain first
#: (SCALEKIT["HEALTH"]["DRAIN_SECONDS"], deploy/gunicorn.conf.py).
QUICK_SHUTDOWN = signal.SIGQUIT


class Gunicorn:
    """gunicorn with deploy/gunicorn.conf.py on a loopback port; its access
    log says which requests reached Django."""

    def __init__(self, tmp_path, name, port, cwd, env, app=()):
        self.port = port or free_port()
        self.access_log = tmp_path / f"{name}.access.log"
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
                "--access-logfile",
                str(self.access_log),
                *app,
            ],
            cwd=cwd,
            env={**os.environ, **env},
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

    def served(self, method, path, expected):
        """How many times Django answered ``method path`` (query string
        included), once the log has ``expected`` (gunicorn logs a request
        just after answering it)."""
        line = f'"{method} {path} HTTP/1.1"'

        def count():
            return self.access_log.read_text().count(line)

        wait_until(lambda: count() >= expected, timeout=3)
        return count()

    def stop(self):
        if self.log.closed:
            return
        if self.process.poll() is None:
            self.process.send_signal(QUICK_SHUTDOWN)
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.log.close()


class Django(Gunicorn):
    """gunicorn serving the test project (tests/wsgi.py) on a loopback port."""

    def __init__(self, tmp_path, name, port=None, **env):
        require_service("PostgreSQL (primary)", 5432)
        require_service("Redis", 6379)
        self.flag = tmp_path / f"{name}.not-ready"
        env = {
            "DJANGO_SETTINGS_MODULE": "tests.serve_settings",
            "SCALEKIT_HEALTH_FLAG": str(self.flag),
            "PYTHONPATH": str(ROOT),
            **env,
        }
        super().__init__(tmp_path, name, port, ROOT, env, app=["tests.wsgi"])


SHOP = ROOT / "example_project"
#: `/health/` shows each check's result to `Authorization: Bearer <token>`.
SHOP_TOKEN = "proxies-test"


def shop_env(data, **env):
    """The example shop's settings, as scripts/example runs it (SQLite
    primary, replica and shards, local-memory cache), with DEBUG off and its
    files in ``data``."""
    return {
        "DJANGO_SETTINGS_MODULE": "example_project.settings",
        "PYTHONPATH": os.pathsep.join([str(SHOP), str(ROOT)]),
        "SCALEKIT_EXAMPLE_DB_DIR": str(data),
        "SCALEKIT_EXAMPLE_STATIC_ROOT": str(data / "static"),
        "SCALEKIT_EXAMPLE_HEALTH_TOKEN": SHOP_TOKEN,
        "DJANGO_DEBUG": "0",
        # Whatever the environment says, the SQLite default: no services.
        **dict.fromkeys(
            (
                "DATABASE_URL",
                "REPLICA_URLS",
                "SHARD_URLS",
                "SHARD_REPLICA_URLS",
                "REDIS_URL",
            ),
            "",
        ),
        "DJANGO_ALLOWED_HOSTS": "127.0.0.1,localhost",
        **env,
    }


@pytest.fixture(scope="module")
def shop_data(tmp_path_factory):
    """The example shop's databases, migrated and seeded as scripts/example
    does (fewer rows), and its fingerprinted static files: once per module."""
    data = tmp_path_factory.mktemp("shop")
    env = {**os.environ, **shop_env(data)}
    # What scripts/example runs, in one process (Django starts once).
    script = """if True:
        import django
        from django.core.management import call_command
        django.setup()
        call_command("migrate_all", verbosity=0)
        call_command("seed_demo", products=60, customers=2, orders=10)
        call_command("collectstatic", interactive=False, verbosity=0)
        call_command("sync_replica")
    """
    result = subprocess.run(
        [sys.executable, "-c", script],
        cwd=SHOP,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return data


class Shop(Gunicorn):
    """gunicorn serving the example shop (example_project/) on a loopback port."""

    def __init__(self, tmp_path, name, data, **env):
        super().__init__(tmp_path, name, None, SHOP, shop_env(data, **env))

    def health(self):
        response = requests.get(
            self.url + "/health/",
            headers={"Authorization": f"Bearer {SHOP_TOKEN}"},
            timeout=5,
        )
        return response.status_code, response.json()


def stop_all(servers):
    for server in servers:
        if server.process.poll() is None:
            server.process.send_signal(QUICK_SHUTDOWN)
    for server in servers:
        server.stop()


@pytest.fixture
def django_server(tmp_path):
    servers = []

    def start(name="app", **kwargs):
        server = Django(tmp_path, name, **kwargs)
        servers.append(server)
        return server

    yield start
    stop_all(servers)


@pytest.fixture
def shop_server(shop_data, tmp_path):
    """Start example-shop instances, all on the module's databases."""
    servers = []

    def start(name="shop", **env):
        server = Shop(tmp_path, name, shop_data, **env)
        servers.append(server)
        return server

    yield start
    stop_all(servers)


def start_varnish(app, run):
    port = free_port()
    result = proxies("varnish-up", str(run), str(port), str(app.port))
    assert result.returncode == 0, result.stderr
    return f"http://127.0.0.1:{port}"


@pytest.fixture
def varnish(installed, django_server, tmp_path):
    run = tmp_path / "varnish"
    yield start_varnish(django_server(), run)
    proxies("varnish-down", str(run))


@pytest.fixture
def shop_varnish(installed, shop_server, tmp_path):
    """Varnish in front of one example-shop instance: (its URL, the shop)."""
    shop = shop_server()
    run = tmp_path / "varnish"
    yield start_varnish(shop, run), shop
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


def hits(response):
    """Varnish names two transactions on a hit (this one and the one that
    stored the object), one on a miss or a pass."""
    return len(response.headers["X-Varnish"].split()) == 2


def test_varnish_in_front_of_the_shop(shop_varnish):
    # Issue 5's proof, on the example shop: public pages served from the
    # cache, private ones and any response setting a cookie never stored.
    edge, shop = shop_varnish

    # Public: the catalog, a product page, the API, the fingerprinted CSS.
    for path in ("/catalog/", "/products/1/", "/api/products/?page=2"):
        first, second = get(edge + path), get(edge + path)
        assert first.headers["Cache-Control"].startswith("public, max-age=0"), path
        assert "s-maxage=30" in first.headers["Cache-Control"], path
        assert "Set-Cookie" not in first.headers, path
        assert (hits(first), hits(second)) == (False, True), path
        assert "Age" in second.headers
        assert second.content == first.content
        assert "CDN-Cache-Control" not in second.headers  # stripped at the edge
        assert shop.served("GET", path, 1) == 1, path  # Django answered once
    stylesheet = get(edge + "/catalog/").text.split('href="/static/')[1].split('"')[0]
    assert stylesheet.startswith("shop/shop.") and stylesheet.count(".") == 2
    first, second = (
        get(edge + "/static/" + stylesheet),
        get(edge + "/static/" + stylesheet),
    )
    assert first.headers["Cache-Control"] == "public, max-age=31536000, immutable"
    assert (hits(first), hits(second)) == (False, True)
    # Analytics cookies do not make a public page private.
    assert hits(get(edge + "/catalog/", Cookie="_ga=GA1.1.1.1"))

    # A GET whose response sets a cookie (the CSRF token of a form): never
    # stored, so the next visitor never receives this one's token.
    for path in ("/", "/accounts/login/"):
        one, two = get(edge + path), get(edge + path)
        assert "csrftoken=" in one.headers["Set-Cookie"], path
        assert "public" not in one.headers["Cache-Control"], path
        assert (hits(one), hits(two)) == (False, False), path
        assert one.cookies["csrftoken"] != two.cookies["csrftoken"], path
        assert shop.served("GET", path, 2) == 2, path

    # Log in through Varnish: a POST, answered with the session cookie.
    client = requests.Session()
    login = client.get(edge + "/accounts/login/", timeout=5)
    token = login.text.split('name="csrfmiddlewaretoken" value="')[1].split('"')[0]
    answer = client.post(
        edge + "/accounts/login/",
        data={
            "username": "customer1",
            "password": "demo",
            "csrfmiddlewaretoken": token,
        },
        allow_redirects=False,
        timeout=5,
    )
    assert answer.status_code == 302, answer.text
    assert "sessionid=" in answer.headers["Set-Cookie"]
    assert "public" not in answer.headers["Cache-Control"]

    # A private page: the customer's orders, every time from Django.
    one = client.get(edge + "/orders/", timeout=5)
    two = client.get(edge + "/orders/", timeout=5)
    for response in (one, two):
        assert response.status_code == 200
        assert "customer1" in response.text
        assert response.headers["Cache-Control"].startswith("private")
        assert not hits(response)
    assert shop.served("GET", "/orders/", 2) == 2
    # Another visitor is sent to the login page, never shown the orders.
    anonymous = requests.get(edge + "/orders/", allow_redirects=False, timeout=5)
    assert anonymous.status_code == 302
    assert anonymous.headers["Location"].startswith("/accounts/login/")
    assert "customer1" not in anonymous.text
    # The logged-in customer still gets the shared catalog, which was not
    # stored again for them (their request passed).
    assert shop.served("GET", "/catalog/", 1) == 1
    catalog = client.get(edge + "/catalog/", timeout=5)
    assert catalog.status_code == 200 and not hits(catalog)
    assert shop.served("GET", "/catalog/", 2) == 2
    assert hits(get(edge + "/catalog/"))


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


def stats(socket_path):
    """HAProxy's statistics (``show stat``) of each instance, by server name."""
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(str(socket_path))
        s.sendall(b"show stat\n")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    rows = csv.DictReader(io.StringIO(data.decode().lstrip("# ")))
    return {row["svname"]: row for row in rows if row["svname"].startswith("app")}


def server_states(socket_path):
    return {name: row["status"] for name, row in stats(socket_path).items()}


def served_by(socket_path):
    """Requests sent to each instance so far (HAProxy's stot)."""
    return {name: int(row["stot"]) for name, row in stats(socket_path).items()}


class Forwarder:
    """A TCP forwarder on a loopback port to PostgreSQL: ``close()`` is the
    database's address refusing connections, ``open()`` its return."""

    def __init__(self, target_port):
        self.port = free_port()
        self.target = ("127.0.0.1", target_port)
        self.listener = None
        self.open()

    def open(self):
        # create_server sets SO_REUSEADDR: the port is bound again at once.
        self.listener = socket.create_server(("127.0.0.1", self.port))
        self.listener.settimeout(0.05)
        self.conns = []
        threading.Thread(
            target=self._accept, args=(self.listener,), daemon=True
        ).start()

    def _accept(self, listener):
        while listener.fileno() != -1:
            try:
                client, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            self.conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(source, sink):
        try:
            source.settimeout(None)
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for s in (source, sink):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def close(self):
        self.listener.close()
        for conn in self.conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
            conn.close()


def test_haproxy_takes_an_unready_shop_instance_out_and_back(
    installed, shop_server, tmp_path
):
    # Issue 5's proof: two example-shop instances behind HAProxy (option
    # httpchk GET /health/). The second one's first order shard is a
    # PostgreSQL database reached through a forwarder: closing it makes that
    # critical check, and so the instance's readiness, fail for real, while
    # its catalog (on the SQLite primary) keeps serving.
    require_service("PostgreSQL (primary)", 5432)
    forwarder = Forwarder(5432)
    shard0 = f"postgres://postgres@127.0.0.1:{forwarder.port}/postgres"
    one = shop_server("one")
    two = shop_server(
        "two", SHARD_URLS=f"{shard0},sqlite:///shard1.sqlite3", SHARD_REPLICA_URLS=""
    )
    port = free_port()
    run = tmp_path / "haproxy"
    result = proxies("haproxy-up", str(run), str(port), str(one.port), str(two.port))
    assert result.returncode == 0, result.stderr
    sock = run / "haproxy.sock"
    url = f"http://127.0.0.1:{port}/catalog/"
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

    def checks(app):
        status, body = app.health()
        return status, {name: c[0]["status"] for name, c in body["checks"].items()}

    try:
        assert wait_until(
            lambda: set(server_states(sock).values()) == {"UP"}, timeout=10
        )
        status, results = checks(two)
        assert (status, results["db:shard0"]) == (200, "pass"), results
        client_requests(0.5)
        before = served_by(sock)
        assert before["app1"] > 0 and before["app2"] > 0  # both in rotation

        forwarder.close()  # instance two's shard0 now refuses connections
        started = time.monotonic()
        while server_states(sock)["app2"] != "DOWN":
            assert time.monotonic() - started < 10, server_states(sock)
            client_requests(0.05)
        down_after = time.monotonic() - started
        status, results = checks(two)
        assert (status, results["db:shard0"]) == (503, "fail"), results
        assert checks(one)[0] == 200
        during = served_by(sock)
        client_requests(1.0)
        assert server_states(sock) == {"app1": "UP", "app2": "DOWN"}
        after = served_by(sock)
        # While it is down, every client request goes to instance one.
        assert after["app2"] == during["app2"]
        assert after["app1"] > during["app1"] + 10

        forwarder.open()
        started = time.monotonic()
        while server_states(sock)["app2"] != "UP":
            assert time.monotonic() - started < 10, server_states(sock)
            client_requests(0.05)
        up_after = time.monotonic() - started
        client_requests(0.5)
        assert served_by(sock)["app2"] > after["app2"]  # back in rotation
    finally:
        proxies("haproxy-down", str(run))
        forwarder.close()
    print(
        f"DOWN after {down_after:.2f} s, UP after {up_after:.2f} s, {served} requests"
    )
    assert failures == []
    assert served > 50
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

            def draining(app=app):
                try:
                    return requests.get(app.url + "/health/", timeout=2).status_code
                except requests.RequestException:
                    return None

            # Readiness turns 503 first (once the worker heard of the signal,
            # well within the 1 s drain); new requests are still served.
            assert wait_until(lambda: draining() == 503, timeout=0.8)
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

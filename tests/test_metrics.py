"""Metrics: names and labels, /metrics scraped and parsed, no-op without
prometheus_client, gunicorn workers summed in multiprocess mode, and the
table in docs/metrics.md kept in step with what the code declares."""

from __future__ import annotations

import importlib
import os
import re
import socket
import subprocess
import sys
import textwrap
import threading
import time
import urllib.request

import pytest
from django.conf import settings
from django.db import DatabaseError
from django.db.models import Count
from django.http import HttpResponse
from django.test import Client, override_settings
from django.urls import path

from django_scalekit import cdn, checks, conf, health, metrics, routers, sharding
from django_scalekit.cache import cached
from tests import cache_worker
from tests.conftest import ROOT, require_service

#: Every piece that declares metrics (routers and sharding included: their
#: metrics belong in docs/metrics.md too).
PIECES = (
    "django_scalekit.cache",
    "django_scalekit.cdn",
    "django_scalekit.health",
    "django_scalekit.middleware",
    "django_scalekit.routers",
    "django_scalekit.sharding",
)
needs_prometheus = pytest.mark.skipif(
    not metrics.ENABLED, reason="prometheus_client is not installed"
)


def declared():
    for module in PIECES:
        importlib.import_module(module)
    return metrics.declared()


# --- naming ------------------------------------------------------------------------


def test_declared_names_follow_prometheus_conventions():
    found = declared()
    assert found
    for name, metric in found.items():
        assert re.fullmatch(r"scalekit_[a-z][a-z0-9_]*", name), name
        assert (metric.kind == "counter") == name.endswith("_total"), name
        if metric.kind == "histogram" or "duration" in name or "lag" in name:
            assert name.endswith("_seconds"), name
        # Bounded labels only: never a key, argument, URL or path.
        assert not set(metric.labelnames) & {"key", "args", "url", "path"}, name


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: metrics.counter("requests", "x"), "ends in _total"),
        (lambda: metrics.counter("scalekit_x_total", "x"), "without the scalekit_"),
        (lambda: metrics.gauge("Bad-Name", "x"), "lower_snake_case"),
    ],
)
def test_declaring_a_badly_named_metric_raises(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_declaring_twice_returns_the_same_metric():
    first = metrics.counter("test_twice_total", "x", ["outcome"])
    assert metrics.counter("test_twice_total", "x", ["outcome"]) is first
    assert metrics.declared()["scalekit_test_twice_total"].labelnames == ("outcome",)


# --- settings ---------------------------------------------------------------------------


def test_metrics_settings_are_checked():
    problems = conf.build({"METRICS": {"ROUTNG": False, "ROUTING": "no"}}).problems
    assert [p.id for p in problems] == ["scalekit.W501", "scalekit.E501"]
    assert 'SCALEKIT["METRICS"]["ROUTNG"] is not a metrics setting' in problems[0].msg
    assert "ROUTING" in problems[0].hint
    assert conf.build({"METRICS": {"ROUTING": True}}).problems == ()
    with override_settings(SCALEKIT={**settings.SCALEKIT, "METRICS": {"ROUTNG": 1}}):
        assert [m.id for m in checks.check_settings()] == ["scalekit.W501"]


# --- without prometheus_client ------------------------------------------------------------

NO_PROMETHEUS = """
import sys
sys.modules["prometheus_client"] = None  # any `import prometheus_client` fails
import django
from django.conf import settings
settings.configure(
    SECRET_KEY="x",
    ALLOWED_HOSTS=["testserver"],
    INSTALLED_APPS=["django_scalekit"],
    DATABASES={"default": {"ENGINE": "django.db.backends.sqlite3", "NAME": ":memory:"}},
    CACHES={"default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"}},
    SCALEKIT={"HEALTH": {"DATABASES": [], "CACHES": ["default"]}},
)
django.setup()
from django.http import HttpResponse
from django.test import RequestFactory
from django_scalekit import cache, cdn, health, metrics, middleware, routers, sharding

assert metrics.ENABLED is False
calls = []

@cache.cached(timeout=60)
def double(x):
    calls.append(x)
    return 2 * x

assert [double(21), double(21)] == [42, 42] and calls == [21]
double.invalidate(21)
assert double(21) == 42 and calls == [21, 21]
response = HttpResponse("ok")
cdn.apply(RequestFactory().get("/api/x/", HTTP_AUTHORIZATION="Bearer t"), response)
assert response["Cache-Control"].startswith("private"), response["Cache-Control"]
assert health.run_checks().status == "pass"
assert all(d.metric is metrics._NOOP for d in metrics.declared().values())
print(len(metrics.declared()))
"""


def test_without_prometheus_client_metrics_are_no_ops():
    result = subprocess.run(
        [sys.executable, "-W", "error", "-c", NO_PROMETHEUS],
        cwd=ROOT,
        env={k: v for k, v in os.environ.items() if k != "DJANGO_SETTINGS_MODULE"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert int(result.stdout) >= 10


# --- /metrics scraped and parsed -------------------------------------------------------------


def _cdn_view(request):
    return HttpResponse("ok")


def _metrics_view(request):
    from django_prometheus.exports import ExportToDjangoView

    return ExportToDjangoView(request)


urlpatterns = [
    path("api/items/", _cdn_view),
    path("metrics", _metrics_view),
]


@cached(timeout=60)
def square(x):
    return x * x


@cached(timeout=60)
def cube(x):
    return x**3


def _families(text):
    from prometheus_client.parser import text_string_to_metric_families

    return {f.name: f for f in text_string_to_metric_families(text)}


@needs_prometheus
def test_metrics_endpoint_exports_every_piece(monkeypatch):
    require_service("Redis", 6379)
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    monkeypatch.delenv("prometheus_multiproc_dir", raising=False)

    with cache_worker.own_prefix():
        scalekit = {
            **settings.SCALEKIT,  # with own_prefix()'s CACHE
            "HEALTH": {"DATABASES": [], "CACHES": ["cache_l2"]},
        }
        middleware = ["django_scalekit.middleware.CDNCacheMiddleware"]
        with override_settings(
            SCALEKIT=scalekit, ROOT_URLCONF=__name__, MIDDLEWARE=middleware
        ):
            assert square(3) == 9 and square(3) == 9 and square(4) == 16
            client = Client()
            assert client.get("/api/items/").status_code == 200
            client.cookies["sessionid"] = "abc"
            response = client.get("/api/items/", HTTP_AUTHORIZATION="Bearer t")
            assert response["Cache-Control"].startswith("private")
            assert health.run_checks().status == "pass"
            scrape = client.get("/metrics")
    assert scrape.status_code == 200
    assert scrape["Content-Type"].startswith("text/plain")
    families = _families(scrape.content.decode())

    ours = {n: f for n, f in families.items() if n.startswith("scalekit_")}
    for name, metric in declared().items():
        # The parser names a counter family without its _total suffix.
        family = ours[name.removesuffix("_total") if metric.kind == "counter" else name]
        assert family.type == metric.kind, name
    label_sets = {}
    for family in ours.values():
        for sample in family.samples:
            if family.type == "counter":
                assert sample.name.endswith(("_total", "_created")), sample.name
            label_sets.setdefault(family.name, set()).add(
                frozenset(sample.labels) - {"le"}
            )
    assert label_sets["scalekit_cache_hits"] == {frozenset({"function", "level"})}
    assert label_sets["scalekit_cdn_responses"] == {frozenset({"policy"})}
    assert label_sets["scalekit_health_check_status"] == {frozenset({"check"})}

    def value(name, **labels):
        for sample in families[name.removesuffix("_total")].samples:
            if sample.name == name and sample.labels == labels:
                return sample.value
        return None

    fn = f"{__name__}.square"
    assert value("scalekit_cache_misses_total", function=fn) == 2
    assert value("scalekit_cache_computations_total", function=fn, reason="miss") == 2
    assert value("scalekit_cdn_responses_total", policy="/api/") >= 2
    assert value("scalekit_cdn_private_downgrades_total", policy="/api/") >= 1
    assert value("scalekit_health_check_status", check="cache:cache_l2") == 1
    assert value("scalekit_health_check_duration_seconds", check="cache:cache_l2") > 0


# --- gunicorn, several workers, one sum -------------------------------------------------------

SITE = """
import os, time
from django.http import HttpResponse
from django.urls import path

SECRET_KEY = "x"
ALLOWED_HOSTS = ["*"]
INSTALLED_APPS = ["django_scalekit", "django_prometheus"]
DATABASES = {"default": {"ENGINE": "django.db.backends.sqlite3", "NAME": ":memory:"}}
CACHES = {"default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"}}
MIDDLEWARE = ["django_scalekit.middleware.CDNCacheMiddleware"]
ROOT_URLCONF = "mp_site"
SCALEKIT = {
    "CDN": {"RULES": [{"PREFIX": "/hit/", "CACHE": "public", "MAX_AGE": 60}]},
    # deploy/gunicorn.conf.py drains on SIGTERM: stop at once in the test.
    "HEALTH": {"DATABASES": [], "CACHES": ["default"], "DRAIN_SECONDS": 0},
}


def hit(request):
    from django_scalekit import health

    # A gauge in "livemostrecent" mode, set by every worker.
    health.run_checks()
    time.sleep(0.5)  # keep this worker busy: the next request goes to another
    return HttpResponse(str(os.getpid()))


def ready(request):
    return HttpResponse("ok")


def metrics(request):
    from django_prometheus.exports import ExportToDjangoView

    return ExportToDjangoView(request)


urlpatterns = [path("hit/", hit), path("ready/", ready), path("metrics", metrics)]
"""
WSGI = """
import os
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "mp_site")
from django.core.wsgi import get_wsgi_application
application = get_wsgi_application()
"""


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url, timeout=10):
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return response.read().decode()


@pytest.mark.slow
@needs_prometheus
@pytest.mark.parametrize("preload", [False, True], ids=["fork-then-import", "preload"])
def test_gunicorn_workers_are_summed_in_multiprocess_mode(tmp_path, preload):
    pytest.importorskip("gunicorn")
    multiproc = tmp_path / "prometheus"
    multiproc.mkdir()
    # Left by an earlier run: deploy/gunicorn.conf.py empties the directory
    # on start (the collector would fail on it otherwise).
    (multiproc / "counter_1.db").write_bytes(b"not a metrics file")
    (tmp_path / "mp_site.py").write_text(textwrap.dedent(SITE))
    (tmp_path / "mp_wsgi.py").write_text(textwrap.dedent(WSGI))
    port = _free_port()
    env = {
        **{k: v for k, v in os.environ.items() if k != "DJANGO_SETTINGS_MODULE"},
        "PROMETHEUS_MULTIPROC_DIR": str(multiproc),
        "GUNICORN_BIND": f"127.0.0.1:{port}",
        "GUNICORN_WORKERS": "2",
        "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)]),
    }
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "gunicorn",
            "--config",
            str(ROOT / "deploy" / "gunicorn.conf.py"),
            *(["--preload"] if preload else []),
            "mp_wsgi:application",
        ],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                _get(f"{base}/ready/", timeout=2)
                break
            except OSError:
                if time.monotonic() > deadline or server.poll() is not None:
                    server.kill()
                    pytest.fail(f"gunicorn did not start: {server.communicate()[1]}")
                time.sleep(0.1)
        time.sleep(0.5)  # the second worker too
        pids = []
        threads = [
            threading.Thread(target=lambda: pids.append(_get(f"{base}/hit/")))
            for _ in range(6)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert len(pids) == 6
        assert len(set(pids)) == 2, pids  # both workers counted some
        families = _families(_get(f"{base}/metrics"))
        live_gauges = list(multiproc.glob("gauge_livemostrecent_*.db"))
    finally:
        server.terminate()
        server.communicate(timeout=30)  # waits and closes the stderr pipe

    samples = [
        s
        for s in families["scalekit_cdn_responses"].samples
        if s.labels == {"policy": "/hit/"}
    ]
    # One summed sample, not one per worker: counters are added up.
    assert [(s.name, s.value) for s in samples] == [
        ("scalekit_cdn_responses_total", 6.0)
    ]
    assert len(list(multiproc.glob("counter_*.db"))) >= 2
    assert not (multiproc / "counter_1.db").exists()
    # A gauge in "livemostrecent" mode: one value for all workers, no pid label.
    status = [
        (s.labels, s.value)
        for s in families["scalekit_health_check_status"].samples
        if s.labels.get("check") == "cache:default"
    ]
    assert status == [({"check": "cache:default"}, 1.0)]
    # One file per worker, removed by child_exit (mark_process_dead) when the
    # workers stop, so a dead worker's value no longer counts.
    assert len(live_gauges) == 2
    assert not any(path.exists() for path in live_gauges)


# --- docs/metrics.md ----------------------------------------------------------------------


def _documented():
    """Rows ``| `scalekit_...` | type | `label`, ... | meaning |`` of docs/metrics.md."""
    rows = {}
    for line in (ROOT / "docs" / "metrics.md").read_text().splitlines():
        match = re.match(
            r"\| `(scalekit_[a-z0-9_]+)` \| (\w+) \| ([^|]*) \| .+ \|$", line
        )
        if match:
            assert match[1] not in rows, f"{match[1]} is listed twice"
            rows[match[1]] = (match[2], frozenset(re.findall(r"`(\w+)`", match[3])))
    return rows


def test_docs_list_every_metric_with_its_type_and_labels():
    in_code = {
        name: (metric.kind, frozenset(metric.labelnames))
        for name, metric in declared().items()
        if metric.module.startswith("django_scalekit.")
    }
    assert _documented() == in_code


# --- each piece's counters, read back from the registry --------------------------------------


def sample(name, **labels):
    from prometheus_client import REGISTRY

    return REGISTRY.get_sample_value(name, labels) or 0.0


class Delta:
    """Samples' increase between construction and ``__call__``."""

    def __init__(self, *samples):
        self.before = {s: sample(s[0], **dict(s[1:])) for s in samples}

    def __call__(self):
        return {s: sample(s[0], **dict(s[1:])) - v for s, v in self.before.items()}


def s(name, **labels):
    return (name, *sorted(labels.items()))


@needs_prometheus
@pytest.mark.django_db(transaction=True, databases="__all__")
def test_fan_out_counts_queries_outcomes_and_duration():
    from tests.shardapp.models import Order

    ok = s("scalekit_shard_fanout_queries_total", group="orders", outcome="ok")
    error = s("scalekit_shard_fanout_queries_total", group="orders", outcome="error")
    runs = s("scalekit_shard_fanout_seconds_count", group="orders")
    seconds = s("scalekit_shard_fanout_seconds_sum", group="orders")
    fast = s("scalekit_shard_fanout_seconds_bucket", group="orders", le="5.0")
    delta = Delta(ok, error, runs, seconds, fast)
    with routers.routing_scope():
        # The scope wrote: reads go to the shards' primaries, not a lagging replica.
        Order.objects.bulk_create(Order(customer_id=k, amount=k) for k in range(1, 41))
        assert Order.objects.fan_out_count() == 40
        assert len(Order.objects.fan_out()) == 40
        assert Order.objects.fan_out_aggregate(n=Count("id")) == {"n": 40}
        with pytest.raises(DatabaseError):
            Order.objects.extra(where=["no_such_column = 1"]).fan_out()
    changed = delta()
    assert changed[ok] == 3
    assert changed[error] == 1
    # Only completed fan-outs are timed.
    assert changed[runs] == 3 and changed[fast] == 3
    assert 0 < changed[seconds] < 15


@needs_prometheus
@pytest.mark.django_db(transaction=True, databases="__all__")
def test_router_counts_queries_on_shard_aliases():
    from tests.shardapp.models import Order

    keys = {}
    for k in range(1, 200):
        keys.setdefault(sharding.shard_for_key(Order, k), k)
        if len(keys) == 2:
            break
    queries = "scalekit_router_queries_total"
    samples = {
        (alias, reason): s(queries, alias=alias, reason=reason)
        for alias in ("shard0", "shard1", "shard0_replica", "shard1_replica")
        for reason in ("read", "write", "pinned")
    }
    delta = Delta(*samples.values())
    with routers.routing_scope():
        # A read of each shard, from its replica.
        assert Order.objects.for_key(keys["shard0"]).count() >= 0
        assert Order.objects.for_key(keys["shard1"]).count() >= 0
    with routers.routing_scope():
        # A write to shard0, then a read there, pinned to its primary.
        Order.objects.create(customer_id=keys["shard0"], amount=1)
        assert Order.objects.for_key(keys["shard0"]).count() >= 1
    changed = {key: delta()[sample_] for key, sample_ in samples.items()}
    assert {key: n for key, n in changed.items() if n} == {
        ("shard0_replica", "read"): 1,
        ("shard1_replica", "read"): 1,
        ("shard0", "write"): 1,
        ("shard0", "pinned"): 1,
    }


@needs_prometheus
def test_cdn_purges_are_counted_by_outcome():
    import http.server

    class Answer(http.server.BaseHTTPRequestHandler):
        status = 200

        def do_PURGE(self):
            self.send_response(type(self).status)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Answer)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    ok = s("scalekit_cdn_purges_total", outcome="ok")
    error = s("scalekit_cdn_purges_total", outcome="error")
    delta = Delta(ok, error)
    try:
        purge = {
            "BACKEND": "django_scalekit.cdn.HTTPPurgeBackend",
            "OPTIONS": {"ENDPOINTS": [f"http://127.0.0.1:{server.server_address[1]}"]},
        }
        with override_settings(SCALEKIT={**settings.SCALEKIT, "CDN": {"PURGE": purge}}):
            assert cdn.purge(urls=["https://shop.example.com/a/"]).ok
            assert cdn.purge(urls=["/b/", "/c/"]).ok
            Answer.status = 500
            assert not cdn.purge(urls=["/d/"]).ok
            # Nothing to purge: no call, nothing counted.
            assert cdn.purge().ok
        closed = {
            "BACKEND": "django_scalekit.cdn.HTTPPurgeBackend",
            "OPTIONS": {"ENDPOINTS": ["http://127.0.0.1:1"]},
        }
        with override_settings(
            SCALEKIT={**settings.SCALEKIT, "CDN": {"PURGE": closed}}
        ):
            assert not cdn.purge(urls=["/e/"]).ok
    finally:
        server.shutdown()
        server.server_close()
    assert delta() == {ok: 2, error: 2}


@needs_prometheus
def test_cache_invalidations_are_counted_per_function():
    require_service("Redis", 6379)
    name = f"{__name__}.cube"
    invalidations = s("scalekit_cache_invalidations_total", function=name)
    other = s("scalekit_cache_invalidations_total", function=f"{__name__}.square")
    delta = Delta(invalidations, other)
    with cache_worker.own_prefix():
        assert cube(2) == 8
        cube.invalidate(2)
        cube.invalidate(3)  # nothing cached: still an invalidate() call
        cube.invalidate_all()
    assert delta() == {invalidations: 3, other: 0}

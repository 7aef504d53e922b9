"""Throughput, latency and faults through the scripts/topology shop, measured with wrk.

Run ``scripts/topology up`` first, then::

    python benchmarks/bench_topology.py                 # throughput table, then faults
    python benchmarks/bench_topology.py --only throughput --duration 10
    python benchmarks/bench_topology.py --only faults
    python benchmarks/bench_topology.py --only scaling   # /bench/db/ on 0, 1, 2 replicas
    python benchmarks/bench_topology.py --only primary   # /health/ with the primary unreachable
    python benchmarks/bench_topology.py --only ryw       # read-your-writes, replica 1 s behind

Every load run is bounded (``wrk -d``) and aims at 127.0.0.1 only. The
throughput runs go through HAProxy (``:8100``) except the Varnish one
(``:8180``). Each fault run loads a page through HAProxy for ``--fault-duration``
seconds, breaks one part a few seconds in, repairs it a few seconds later, and
counts failed requests (non-2xx/3xx answers and socket errors) and the worst
latency. The faults touch only the topology's own processes (its replica on
5434, its Redis on 6380, its gunicorn instances), never the shared primary.
Prints Markdown tables for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import contextlib
import http.cookiejar
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TOPOLOGY = ROOT / "scripts" / "topology"
RUN = Path(os.environ.get("SCALEKIT_TOPOLOGY_DIR", "/tmp/scalekit-topology"))
HAPROXY = "http://127.0.0.1:8100"
VARNISH = "http://127.0.0.1:8180"

#: (label, URL) of the throughput runs, all the same catalog page but the first.
PAGES = [
    ("bare Django view (`/bench/bare/`)", f"{HAPROXY}/bench/bare/"),
    ("catalog, uncached (`/catalog/`)", f"{HAPROXY}/catalog/"),
    ("catalog, `@cached_view`", f"{HAPROXY}/catalog/cached-view/"),
    ("catalog, `@cached` on the query", f"{HAPROXY}/catalog/cached-query/"),
    ("catalog behind Varnish (`/catalog/` via :8180)", f"{VARNISH}/catalog/"),
    ("peer: Django `cache_page` on django-redis", f"{HAPROXY}/catalog/cache-page/"),
    ("peer: django-cacheops `.cache()`", f"{HAPROXY}/catalog/cacheops/"),
]

_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3}


@dataclass
class Result:
    label: str
    requests: int
    rps: float
    avg_ms: float
    p99_ms: float
    max_ms: float
    failed: int
    #: What the failures were, as wrk counts them (e.g. "non-2xx 1").
    failures: str = ""


def _ms(text: str) -> float:
    value, unit = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text).groups()  # type: ignore[union-attr]
    return float(value) * _UNITS[unit]


def wrk(url: str, duration: float, connections: int, threads: int) -> Result:
    """One bounded wrk run; failed = non-2xx/3xx answers + socket errors."""
    out = subprocess.run(
        [
            "wrk",
            f"-t{threads}",
            f"-c{connections}",
            f"-d{duration:g}s",
            "--timeout",
            "5s",
            "--latency",
            url,
        ],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    latency = re.search(r"Latency\s+(\S+)\s+\S+\s+(\S+)", out)
    p99 = re.search(r"99%\s+(\S+)", out)
    requests = re.search(r"(\d+) requests in", out)
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if not (latency and p99 and requests and rps):
        raise RuntimeError(f"cannot parse wrk output:\n{out}")
    counts: dict[str, int] = {}
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if non2xx:
        counts["non-2xx/3xx"] = int(non2xx.group(1))
    errors = re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out
    )
    if errors:
        for kind, n in zip(
            ("connect", "read", "write", "timeout"), errors.groups(), strict=True
        ):
            counts[kind] = int(n)
    failed = sum(counts.values())
    return Result(
        label=url,
        requests=int(requests.group(1)),
        rps=float(rps.group(1)),
        avg_ms=_ms(latency.group(1)),
        p99_ms=_ms(p99.group(1)),
        max_ms=_ms(latency.group(2)),
        failed=failed,
        failures=", ".join(f"{kind} {n}" for kind, n in counts.items() if n),
    )


def _get(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return int(response.status)
    except OSError:
        return 0


def throughput(duration: float, connections: int, threads: int) -> list[Result]:
    results = []
    for label, url in PAGES:
        status = _get(url)
        if status != 200:
            print(f"skipping {label}: {url} answered {status}", file=sys.stderr)
            continue
        # A short warm-up fills L1 in every worker, Varnish, cacheops.
        wrk(url, 2, connections, threads)
        result = wrk(url, duration, connections, threads)
        result.label = label
        print(
            f"{label}: {result.rps:.0f} req/s, p99 {result.p99_ms:.1f} ms",
            file=sys.stderr,
        )
        results.append(result)
    return results


# --- faults -----------------------------------------------------------------


def topology(*args: str) -> None:
    subprocess.run([str(TOPOLOGY), *args], check=True, capture_output=True)


def kill_app(n: int) -> None:
    """SIGKILL one instance's gunicorn master and its workers: a crashed machine."""
    pidfile = RUN / f"app{n}" / "gunicorn.pid"
    master = int(pidfile.read_text())
    children = subprocess.run(
        ["ps", "-o", "pid=", "--ppid", str(master)], capture_output=True, text=True
    ).stdout.split()
    for pid in [master, *map(int, children)]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    pidfile.unlink(missing_ok=True)


@dataclass
class Fault:
    label: str
    url: str
    breaks: list[str] | None
    repairs: list[str]
    kill: int | None = None


FAULTS = [
    Fault(
        "replica stopped, then restarted",
        f"{HAPROXY}/catalog/",
        ["replica-stop"],
        ["replica-start"],
    ),
    Fault(
        "Redis stopped, then restarted",
        f"{HAPROXY}/catalog/cached-query/",
        ["redis-stop"],
        ["redis-start"],
    ),
    Fault(
        "one app instance killed (SIGKILL), then restarted",
        f"{HAPROXY}/catalog/",
        None,
        ["app-start", "1"],
        kill=1,
    ),
]


def fault_run(
    fault: Fault, duration: float, connections: int, threads: int
) -> tuple[Result, str]:
    notes: list[str] = []

    def inject() -> None:
        time.sleep(duration * 0.25)
        started = time.monotonic()
        if fault.kill is not None:
            kill_app(fault.kill)
        else:
            topology(*(fault.breaks or []))
        notes.append(f"broken at {duration * 0.25:.0f} s")
        time.sleep(max(0.0, duration * 0.35 - (time.monotonic() - started)))
        topology(*fault.repairs)
        notes.append(f"repaired after {time.monotonic() - started:.1f} s")

    thread = threading.Thread(target=inject)
    thread.start()
    result = wrk(fault.url, duration, connections, threads)
    thread.join()
    result.label = fault.label
    return result, ", ".join(notes)


# --- replica scaling ------------------------------------------------------------

DB_PAGE = f"{HAPROXY}/bench/db/"


def _wait_healthy(timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _get(f"{HAPROXY}/health/") == 200:
            time.sleep(2)  # both instances back in HAProxy (probe every 500 ms)
            return
        time.sleep(0.2)
    raise RuntimeError("the topology did not become healthy")


def scaling(duration: float, connections: int, threads: int) -> list[Result]:
    """The database-bound page with the apps reading from 0, 1 and 2 replicas."""
    results = []
    try:
        for n in (0, 1, 2):
            topology("replicas", str(n))
            _wait_healthy()
            wrk(DB_PAGE, 2, connections, threads)
            result = wrk(DB_PAGE, duration, connections, threads)
            result.label = f"{n} replica{'s' if n != 1 else ''}" + (
                " (reads on the primary)" if n == 0 else ""
            )
            print(f"{result.label}: {result.rps:.0f} req/s", file=sys.stderr)
            results.append(result)
    finally:
        topology("replicas", "1")
        _wait_healthy()
    return results


# --- the primary unreachable -----------------------------------------------------

SERVICES = ROOT / "scripts" / "services"


#: The topology's default SCALEKIT_EXAMPLE_HEALTH_TOKEN: /health/ details.
HEALTH_TOKEN = os.environ.get(
    "SCALEKIT_EXAMPLE_HEALTH_TOKEN", "scalekit-topology-health"
)


def _timed(
    url: str, data: bytes | None = None, timeout: float = 30
) -> tuple[int, float, str]:
    started = time.monotonic()
    request = urllib.request.Request(
        url, data=data, headers={"Authorization": f"Bearer {HEALTH_TOKEN}"}
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            status, body = int(response.status), response.read()
    except urllib.error.HTTPError as exc:
        status, body = exc.code, exc.read()
    except OSError as exc:
        status, body = 0, str(exc).encode()
    return status, (time.monotonic() - started) * 1000, body.decode(errors="replace")


def primary_unreachable() -> list[tuple[str, str, int, float, str]]:
    """An app instance outside HAProxy whose primary is a closed port, then a
    black-holed one: /health/ must say 503 fast, and say why."""
    rows = []
    cases = [
        ("closed port (connection refused)", 8191, 5499, False),
        ("black-holed port (SYNs dropped)", 8192, 5498, True),
    ]
    for label, port, dbport, blackhole in cases:
        if blackhole:
            subprocess.run(
                [str(SERVICES), "blackhole-on", str(dbport)],
                check=True,
                capture_output=True,
            )
        try:
            topology("probe-up", str(port), str(dbport))
            base = f"http://127.0.0.1:{port}"
            for i in range(3):
                status, ms, body = _timed(f"{base}/health/")
                rows.append((label, f"GET /health/ #{i + 1}", status, ms, body[:300]))
            status, ms, body = _timed(f"{base}/catalog/")
            rows.append((label, "GET /catalog/ (replica)", status, ms, ""))
            # A write: logging in updates last_login on the primary.
            opener, jar = _session()
            _open(opener, f"{base}/accounts/login/")
            started = time.monotonic()
            status, _ = _open(
                opener,
                f"{base}/accounts/login/",
                {
                    "csrfmiddlewaretoken": _cookie(jar, "csrftoken"),
                    "username": "customer1",
                    "password": "demo",
                },
            )
            ms = (time.monotonic() - started) * 1000
            rows.append((label, "POST /accounts/login/ (a write)", status, ms, ""))
            load = wrk(f"{base}/health/", 5, 4, 1)
            rows.append(
                (
                    label,
                    f"wrk -c4 -d5s /health/: {load.requests} answers, p99 "
                    f"{load.p99_ms:.0f} ms",
                    503 if load.failed == load.requests else 0,
                    load.max_ms,
                    f"{load.failed} non-2xx",
                )
            )
        finally:
            topology("probe-down", str(port))
            if blackhole:
                subprocess.run(
                    [str(SERVICES), "blackhole-off", str(dbport)],
                    check=True,
                    capture_output=True,
                )
    return rows


@dataclass
class PrimaryOutage:
    load: Result
    #: Seconds from the stop until HAProxy had no instance UP, and from the
    #: restart until it had one again (None: never seen).
    out_after: float | None
    back_after: float | None
    #: /health/ of each instance, polled directly during the outage.
    probe_statuses: dict[int, int]
    probe_worst_ms: float
    body: str


def _servers_up() -> int:
    """Instances HAProxy has UP, from its stats socket."""

    with socket.socket(socket.AF_UNIX) as sock:
        sock.connect(str(RUN / "haproxy" / "haproxy.sock"))
        sock.sendall(b"show stat\n")
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    rows = [line.split(",") for line in data.decode().splitlines()]
    header = rows[0]
    name, status = header.index("svname"), header.index("status")
    return sum(
        1
        for row in rows[1:]
        if len(row) > status
        and row[name] not in ("FRONTEND", "BACKEND")
        and row[status].startswith("UP")
    )


def primary_stopped_behind_haproxy(
    duration: float, connections: int, threads: int
) -> PrimaryOutage:
    """Stop the primary for every instance at once (``topology primary-stop``)
    under load through HAProxy: readiness must fail fast on every instance, so
    HAProxy answers at once instead of queueing, and recover on restart."""
    statuses: dict[int, int] = {}
    worst = 0.0
    body = ""
    marks: dict[str, float] = {}
    done = threading.Event()
    apps = int((RUN / "apps").read_text()) if (RUN / "apps").exists() else 2

    def poll() -> None:
        nonlocal worst, body
        while not done.is_set():
            now = time.monotonic()
            up = _servers_up()
            if "stop" in marks and "start" not in marks:
                if up == 0:
                    marks.setdefault("out", now)
                for n in range(1, apps + 1):
                    status, ms, text = _timed(
                        f"http://127.0.0.1:{8100 + n}/health/", timeout=10
                    )
                    statuses[status] = statuses.get(status, 0) + 1
                    worst = max(worst, ms)
                    body = body or text
            if "start" in marks and up > 0:
                marks.setdefault("back", now)
            time.sleep(0.1)

    def inject() -> None:
        time.sleep(duration * 0.25)
        marks["stop"] = time.monotonic()
        topology("primary-stop")
        time.sleep(duration * 0.35)
        marks["start"] = time.monotonic()
        topology("primary-start")

    poller = threading.Thread(target=poll)
    injector = threading.Thread(target=inject)
    poller.start()
    injector.start()
    try:
        load = wrk(f"{HAPROXY}/catalog/", duration, connections, threads)
    finally:
        injector.join()
        time.sleep(2)
        done.set()
        poller.join()
    load.label = "primary stopped (its endpoint, for every instance), then restarted"
    return PrimaryOutage(
        load=load,
        out_after=marks["out"] - marks["stop"] if "out" in marks else None,
        back_after=marks["back"] - marks["start"] if "back" in marks else None,
        probe_statuses=statuses,
        probe_worst_ms=worst,
        body=body[:400],
    )


# --- read-your-writes under load ----------------------------------------------------

_ORDER_ROW = re.compile(
    r'<tr class="order"><td>(\d+)</td><td>[^<]*\(#(\d+)\)</td><td>(\d+)</td>'
)


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: object, **kwargs: object) -> None:
        return None


def _session() -> tuple[urllib.request.OpenerDirector, http.cookiejar.CookieJar]:
    jar = http.cookiejar.CookieJar()
    opener = urllib.request.build_opener(
        urllib.request.HTTPCookieProcessor(jar), _NoRedirect()
    )
    return opener, jar


def _open(
    opener: urllib.request.OpenerDirector, url: str, form: dict[str, str] | None = None
) -> tuple[int, str]:
    data = urllib.parse.urlencode(form).encode() if form is not None else None
    try:
        with opener.open(url, data=data, timeout=10) as response:
            return int(response.status), response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(errors="replace")


def _cookie(jar: http.cookiejar.CookieJar, name: str) -> str:
    return next((c.value or "" for c in jar if c.name == name), "")


def _drop_cookie(jar: http.cookiejar.CookieJar, name: str) -> None:
    for c in list(jar):
        if c.name == name:
            jar.clear(c.domain, c.path, c.name)


@dataclass
class RywResult:
    label: str
    submissions: int = 0
    stale: int = 0
    errors: int = 0
    worst_ms: float = 0.0


def _customer_loop(
    customer: int, n: int, keep_pin: bool, result: RywResult, lock: threading.Lock
) -> None:
    opener, jar = _session()
    _open(opener, f"{HAPROXY}/accounts/login/")
    status, _ = _open(
        opener,
        f"{HAPROXY}/accounts/login/",
        {
            "csrfmiddlewaretoken": _cookie(jar, "csrftoken"),
            "username": f"customer{customer}",
            "password": "demo",
        },
    )
    if status != 302:
        raise RuntimeError(f"login of customer{customer} answered {status}")
    for i in range(n):
        product, quantity = 1 + (customer * 97 + i * 13) % 5000, 1 + i % 3
        started = time.monotonic()
        status, _ = _open(
            opener,
            f"{HAPROXY}/orders/new/",
            {
                "csrfmiddlewaretoken": _cookie(jar, "csrftoken"),
                "product": str(product),
                "quantity": str(quantity),
            },
        )
        if not keep_pin:  # the control: a client that drops the pinning cookie
            _drop_cookie(jar, "scalekit_pin")
        read_status, page = _open(opener, f"{HAPROXY}/orders/")
        elapsed = (time.monotonic() - started) * 1000
        top = _ORDER_ROW.search(page)
        with lock:
            result.submissions += 1
            result.worst_ms = max(result.worst_ms, elapsed)
            if status != 302 or read_status != 200:
                result.errors += 1
            elif top is None or (int(top.group(2)), int(top.group(3))) != (
                product,
                quantity,
            ):
                result.stale += 1
            # Only this thread writes this customer's orders: the newest row
            # must be the order just placed (product, quantity vary per order).


def read_your_writes(
    customers: int, per_customer: int, delay_ms: int
) -> list[RywResult]:
    """N order submissions, each followed at once by a read of the order list,
    with the replica applying WAL ``delay_ms`` late and /catalog/ under load."""
    results = []
    topology("replica-delay", str(delay_ms))
    try:
        for label, keep_pin in (
            ("with the pinning cookie", True),
            ("control: pinning cookie dropped before the read", False),
        ):
            result = RywResult(label)
            lock = threading.Lock()
            load = threading.Thread(
                target=wrk, args=(f"{HAPROXY}/catalog/", 12 + per_customer // 3, 8, 1)
            )
            load.start()
            workers = [
                threading.Thread(
                    target=_customer_loop,
                    args=(c, per_customer, keep_pin, result, lock),
                )
                # Customers 1..N, one thread each.
                for c in range(1, customers + 1)
            ]
            for w in workers:
                w.start()
            for w in workers:
                w.join()
            load.join()
            print(
                f"{label}: {result.stale} stale of {result.submissions}",
                file=sys.stderr,
            )
            results.append(result)
    finally:
        topology("replica-delay", "0")
    return results


def ensure_wrk() -> None:
    """wrk is the load generator: install Debian's package when missing (as root)."""
    if shutil.which("wrk"):
        return
    if os.geteuid() != 0:
        sys.exit("wrk is not installed: run `sudo apt-get install wrk`, then again")
    print("bench_topology: installing wrk (apt-get)", flush=True)
    for command in (["apt-get", "update"], ["apt-get", "install", "-y", "wrk"]):
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--only",
        choices=["throughput", "faults", "scaling", "primary", "primary-lb", "ryw"],
    )
    parser.add_argument("--customers", type=int, default=8)
    parser.add_argument("--orders-per-customer", type=int, default=25)
    parser.add_argument("--replica-delay-ms", type=int, default=1000)
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--fault-duration", type=float, default=20.0)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    if _get(f"{HAPROXY}/health/") != 200:
        sys.exit("the topology is not answering on :8100: run scripts/topology up")
    ensure_wrk()

    if args.only in (None, "throughput"):
        results = throughput(args.duration, args.connections, args.threads)
        base = next((r.rps for r in results if "uncached" in r.label), 0.0)
        print(
            f"\nwrk -t{args.threads} -c{args.connections} -d{args.duration:g}s, "
            "after a 2 s warm-up\n"
        )
        print("| Page | req/s | vs uncached | avg ms | p99 ms | max ms | failed |")
        print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
        for r in results:
            ratio = f"{r.rps / base:.1f}x" if base else "-"
            print(
                f"| {r.label} | {r.rps:,.0f} | {ratio} | {r.avg_ms:.1f} "
                f"| {r.p99_ms:.1f} | {r.max_ms:.0f} | {r.failed} |"
            )

    if args.only in (None, "scaling"):
        results = scaling(args.duration, args.connections, args.threads)
        base = results[0].rps if results else 0.0
        print(
            f"\n`/bench/db/` through HAProxy, wrk -t{args.threads} "
            f"-c{args.connections} -d{args.duration:g}s after a 2 s warm-up\n"
        )
        print("| Reads from | req/s | vs 0 replicas | avg ms | p99 ms | failed |")
        print("| --- | ---: | ---: | ---: | ---: | ---: |")
        for r in results:
            print(
                f"| {r.label} | {r.rps:,.0f} | {r.rps / base:.2f}x | {r.avg_ms:.1f} "
                f"| {r.p99_ms:.1f} | {r.failed} |"
            )

    if args.only in (None, "primary"):
        probes = primary_unreachable()
        print("\n| Primary | Request | status | ms | body |")
        print("| --- | --- | ---: | ---: | --- |")
        for label, what, status, ms, body in probes:
            body = body.replace("|", "\\|").replace("\n", " ")
            print(f"| {label} | {what} | {status} | {ms:.0f} | `{body}` |")

    if args.only in (None, "primary-lb"):
        outage = primary_stopped_behind_haproxy(
            args.fault_duration, args.connections, args.threads
        )
        _wait_healthy()
        r = outage.load

        def secs(value: float | None) -> str:
            return "never" if value is None else f"{value:.1f} s"

        print(
            f"\nwrk -t{args.threads} -c{args.connections} -d{args.fault_duration:g}s "
            "on /catalog/ through HAProxy; the primary's endpoint stopped at "
            f"{args.fault_duration * 0.25:.0f} s for {args.fault_duration * 0.35:.0f} s\n"
        )
        print(
            "| requests | failed | worst ms | p99 ms | HAProxy: none UP after "
            "| one UP again after | /health/ during | /health/ worst ms |"
        )
        print("| ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: |")
        probes = ", ".join(
            f"{n} x {s}" for s, n in sorted(outage.probe_statuses.items())
        )
        failures = f" ({r.failures})" if r.failures else ""
        print(
            f"| {r.requests:,} | {r.failed}{failures} | {r.max_ms:.0f} | {r.p99_ms:.1f} "
            f"| {secs(outage.out_after)} | {secs(outage.back_after)} | {probes} "
            f"| {outage.probe_worst_ms:.0f} |"
        )
        print(f"\n/health/ body during the outage: {outage.body}")

    if args.only in (None, "ryw"):
        total = args.customers * args.orders_per_customer
        ryw = read_your_writes(
            args.customers, args.orders_per_customer, args.replica_delay_ms
        )
        print(
            f"\n{total} order submissions ({args.customers} customers in parallel), "
            f"each followed at once by GET /orders/ through HAProxy; replica apply "
            f"delay {args.replica_delay_ms} ms; /catalog/ under wrk -c8 meanwhile\n"
        )
        print("| Client | submissions | stale reads | errors | worst POST+GET ms |")
        print("| --- | ---: | ---: | ---: | ---: |")
        for rr in ryw:
            print(
                f"| {rr.label} | {rr.submissions} | {rr.stale} | {rr.errors} "
                f"| {rr.worst_ms:.0f} |"
            )

    if args.only in (None, "faults"):
        rows = []
        for fault in FAULTS:
            print(f"fault: {fault.label} ...", file=sys.stderr)
            result, notes = fault_run(
                fault, args.fault_duration, args.connections, args.threads
            )
            rows.append((fault, result, notes))
            time.sleep(3)  # let HAProxy see every instance UP again
        print(
            f"\nwrk -t{args.threads} -c{args.connections} "
            f"-d{args.fault_duration:g}s through HAProxy per fault\n"
        )
        print("| Fault | Page | requests | failed | worst ms | p99 ms | timeline |")
        print("| --- | --- | ---: | ---: | ---: | ---: | --- |")
        for fault, r, notes in rows:
            path = fault.url.removeprefix(HAPROXY)
            print(
                f"| {r.label} | `{path}` | {r.requests:,} "
                f"| {r.failed}{f' ({r.failures})' if r.failures else ''} "
                f"| {r.max_ms:.0f} | {r.p99_ms:.1f} | {notes} |"
            )


if __name__ == "__main__":
    main()

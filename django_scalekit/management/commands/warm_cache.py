"""``manage.py warm_cache``: run the registered cache warmers.

Warmers come from ``@django_scalekit.cache.warmer`` (in modules imported by the
URLconf, or in an app's ``warmers`` module) and ``SCALEKIT["CACHE"]["WARMERS"]``.
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field
from importlib import import_module
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import connections
from django.utils.module_loading import autodiscover_modules

from django_scalekit import cache


@dataclass
class Outcome:
    name: str
    keys: int = 0
    failures: int = 0
    seconds: float = 0.0
    errors: list[str] = field(default_factory=list)


def discover() -> dict[str, cache.Warmer]:
    """Import what registers warmers, then return them by name."""
    urlconf = getattr(settings, "ROOT_URLCONF", None)
    if urlconf:
        import_module(urlconf)  # views (and their @cached functions) load here
    autodiscover_modules("warmers")
    return cache.get_warmers()


def short_names(name: str, w: cache.Warmer) -> set[str]:
    """What ``--only`` also accepts for a warmer: the last part of its name
    and its function's ``__qualname__`` and ``__name__``."""
    names = {name.rpartition(".")[2]}
    for attr in ("__qualname__", "__name__"):
        value = getattr(w.func, attr, None)
        if isinstance(value, str):
            names.add(value)
    return names


def select(
    warmers: dict[str, cache.Warmer], wanted: list[str]
) -> dict[str, cache.Warmer]:
    """The warmers ``--only`` names, by full or short name; CommandError for
    an unknown or ambiguous one."""
    chosen: dict[str, cache.Warmer] = {}
    unknown = []
    for wanted_name in wanted:
        if wanted_name in warmers:
            chosen[wanted_name] = warmers[wanted_name]
            continue
        matches = sorted(
            n for n, w in warmers.items() if wanted_name in short_names(n, w)
        )
        if len(matches) > 1:
            raise CommandError(
                f"--only {wanted_name} is ambiguous: it names {', '.join(matches)}. "
                "Give the full name."
            )
        if matches:
            chosen[matches[0]] = warmers[matches[0]]
        else:
            unknown.append(wanted_name)
    if unknown:
        raise CommandError(
            f"Unknown warmer(s): {', '.join(unknown)}. Known: "
            + (", ".join(sorted(warmers)) or "none")
            + "."
        )
    return chosen


class Command(BaseCommand):
    help = "Fill the two-level cache by running the registered cache warmers."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--list", action="store_true", help="List warmers and exit."
        )
        parser.add_argument(
            "--only",
            nargs="+",
            metavar="NAME",
            help="Run only these warmers: full dotted name, or the function's "
            "short name when it is unambiguous.",
        )
        parser.add_argument(
            "--dry-run",
            action="store_true",
            help="Show the keys each warmer would fill, computing nothing.",
        )
        parser.add_argument(
            "--workers",
            type=int,
            default=1,
            metavar="N",
            help="Compute up to N values at once (threads; default 1).",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        workers = options["workers"]
        if workers < 1:
            raise CommandError(f"--workers {workers}: expected a number >= 1.")
        #: 0: errors only; 1 (default): progress and the summary table.
        self.verbosity = options["verbosity"]
        warmers = discover()
        if options["only"]:
            warmers = select(warmers, options["only"])
        if options["list"]:
            for name, w in sorted(warmers.items()):
                target = (
                    f" -> {w.target._scalekit.name}" if w.target is not None else ""
                )
                desc = f"  {w.description}" if w.description else ""
                self.stdout.write(f"{name}{target} [{w.source}]{desc}")
            if not warmers:
                self.stdout.write("No warmers registered.")
            return
        if not warmers:
            if self.verbosity:
                self.stdout.write("No warmers registered.")
            return

        outcomes = []
        for name in sorted(warmers):
            outcomes.append(self.run_warmer(warmers[name], workers, options["dry_run"]))
        if self.verbosity:
            self.summary(outcomes, options["dry_run"])
        failed = [o for o in outcomes if o.failures]
        if failed:
            raise CommandError(
                f"{len(failed)} of {len(outcomes)} warmer(s) failed: "
                + ", ".join(o.name for o in failed)
            )

    def run_warmer(self, w: cache.Warmer, workers: int, dry_run: bool) -> Outcome:
        outcome = Outcome(w.name)
        started = time.perf_counter()
        self.progress(f"{w.name}: started")
        try:
            if w.target is None:
                if dry_run:
                    self.stdout.write(f"{w.name}: would run {w.func.__qualname__}()")
                else:
                    result = w.func()
                    outcome.keys = result if isinstance(result, int) else 0
            else:
                calls = list(w.calls())
                if dry_run:
                    for call in calls:
                        key = w.target.key(*call.args, **call.kwargs)
                        self.stdout.write(f"{w.name}: would warm {call!r} -> {key}")
                    outcome.keys = len(calls)
                else:
                    self.warm_calls(w, calls, workers, outcome)
        except Exception as exc:
            outcome.failures += 1
            outcome.errors.append(f"{type(exc).__name__}: {exc}")
        outcome.seconds = time.perf_counter() - started
        for error in outcome.errors[:5]:
            self.stderr.write(f"{w.name}: error: {error}")
        if len(outcome.errors) > 5:
            self.stderr.write(
                f"{w.name}: ... and {len(outcome.errors) - 5} more errors"
            )
        return outcome

    def warm_calls(
        self, w: cache.Warmer, calls: list[cache.Args], workers: int, outcome: Outcome
    ) -> None:
        total = len(calls)
        todo: queue.SimpleQueue[cache.Args] = queue.SimpleQueue()
        for call in calls:
            todo.put(call)
        lock = threading.Lock()
        step = max(1, total // 10)
        done = [0]

        def work() -> None:
            try:
                while True:
                    try:
                        call = todo.get_nowait()
                    except queue.Empty:
                        return
                    try:
                        w.warm_one(call)
                        error = None
                    except Exception as exc:
                        error = f"{call!r}: {type(exc).__name__}: {exc}"
                    with lock:
                        done[0] += 1
                        if error is None:
                            outcome.keys += 1
                        else:
                            outcome.failures += 1
                            outcome.errors.append(error)
                        if done[0] % step == 0 or done[0] == total:
                            self.progress(f"{w.name}: {done[0]}/{total}")
            finally:
                if threading.current_thread() is not threading.main_thread():
                    connections.close_all()

        if workers == 1 or total <= 1:
            work()
            return
        threads = [threading.Thread(target=work) for _ in range(min(workers, total))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    def progress(self, line: str) -> None:
        if self.verbosity:
            self.stdout.write(line)

    def summary(self, outcomes: list[Outcome], dry_run: bool) -> None:
        self.stdout.write("")
        width = max(len("warmer"), *(len(o.name) for o in outcomes))
        self.stdout.write(
            f"{'warmer':<{width}}  {'keys':>6}  {'failures':>8}  {'seconds':>8}"
        )
        for o in outcomes:
            line = f"{o.name:<{width}}  {o.keys:>6}  {o.failures:>8}  {o.seconds:>8.2f}"
            if o.failures:
                self.stdout.write(self.style.ERROR(line))
            else:
                self.stdout.write(self.style.SUCCESS(line) if not dry_run else line)

"""Prometheus metrics, or no-ops when prometheus_client is not installed.

Each piece declares its metrics here through ``counter()``, ``gauge()`` and
``histogram()``, once, at import. Names get the ``scalekit_`` prefix; label
values must come from a bounded set (aliases, function names, outcomes),
never from keys, arguments or URLs.

Under a server with several worker processes (gunicorn), set the
``PROMETHEUS_MULTIPROC_DIR`` environment variable before the workers start:
prometheus_client then keeps each process's values in files there, and a
``/metrics`` view built on ``prometheus_client.multiprocess.MultiProcessCollector``
sums them (docs/metrics.md). Gauges say how workers' values combine through
``multiprocess_mode``.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

try:
    import prometheus_client
except ImportError:  # pragma: no cover - exercised by the no-extra test env
    prometheus_client = None  # type: ignore[assignment]

ENABLED = prometheus_client is not None
PREFIX = "scalekit_"
_NAME = re.compile(r"^(?!scalekit_)[a-z][a-z0-9_]*$")


@dataclass(frozen=True)
class Declared:
    """A metric as declared, whether prometheus_client is installed or not."""

    name: str
    kind: str
    documentation: str
    labelnames: tuple[str, ...]
    metric: Any
    #: The module that declared it (``django_scalekit.cache``...).
    module: str


_registry: dict[str, Declared] = {}


def declared() -> dict[str, Declared]:
    """Every metric declared so far, by full name (``scalekit_...``)."""
    return dict(_registry)


class _NoOp:
    """Stands in for a metric when prometheus_client is missing."""

    def labels(self, *args: object, **kwargs: object) -> _NoOp:
        return self

    def inc(self, amount: float = 1) -> None:
        pass

    def dec(self, amount: float = 1) -> None:
        pass

    def set(self, value: float) -> None:
        pass

    def observe(self, value: float) -> None:
        pass


_NOOP = _NoOp()


def _declare(
    kind: str, name: str, documentation: str, labelnames: Sequence[str], **kwargs: Any
) -> Any:
    if not _NAME.match(name):
        raise ValueError(
            f"{kind.lower()}(name={name!r}): name must be lower_snake_case, "
            "without the scalekit_ prefix"
        )
    if kind == "Counter" and not name.endswith("_total"):
        raise ValueError(f"counter(name={name!r}): a counter's name ends in _total")
    full = PREFIX + name
    if full in _registry:
        return _registry[full].metric
    if prometheus_client is None:
        metric: Any = _NOOP
    else:
        metric = getattr(prometheus_client, kind)(
            full, documentation, labelnames=tuple(labelnames), **kwargs
        )
    caller = sys._getframe(2).f_globals.get("__name__", "")
    _registry[full] = Declared(
        full, kind.lower(), documentation, tuple(labelnames), metric, caller
    )
    return metric


def counter(name: str, documentation: str, labelnames: Sequence[str] = ()) -> Any:
    """A counter; ``name`` should end in ``_total``."""
    return _declare("Counter", name, documentation, labelnames)


def gauge(
    name: str,
    documentation: str,
    labelnames: Sequence[str] = (),
    multiprocess_mode: str = "liveall",
) -> Any:
    """A gauge; ``multiprocess_mode`` says how gunicorn workers' values combine."""
    return _declare(
        "Gauge", name, documentation, labelnames, multiprocess_mode=multiprocess_mode
    )


def histogram(
    name: str,
    documentation: str,
    labelnames: Sequence[str] = (),
    buckets: Sequence[float] = (
        0.001,
        0.0025,
        0.005,
        0.01,
        0.025,
        0.05,
        0.1,
        0.25,
        0.5,
        1,
        2.5,
        5,
    ),
) -> Any:
    """A histogram of durations in seconds."""
    return _declare(
        "Histogram", name, documentation, labelnames, buckets=tuple(buckets)
    )

"""Simulated replication: the replica is a copy of the primary, made every few seconds.

In production the replica would be a PostgreSQL hot standby fed by streaming
replication, usually a few milliseconds behind the primary; sometimes, under
load or after a network hiccup, seconds behind. This example has nothing but
Python, so it stands in for that with two SQLite files: a background thread
copies ``db.sqlite3`` onto ``replica.sqlite3`` (and each shard's
``shardN.sqlite3`` onto ``shardN_replica.sqlite3``) with the ``sqlite3`` backup API
every ``SCALEKIT_EXAMPLE_REPLICA_LAG`` seconds (default 2). A row written to
the primary is therefore missing from the replica for up to that long: long
enough to see, on the page, what ``PinningMiddleware`` protects a client from.

The thread runs in the serving process of ``runserver`` only (see
``ShopConfig.ready()``); ``manage.py sync_replica`` makes one copy by hand.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time

from django.conf import settings

logger = logging.getLogger(__name__)

#: time.monotonic() of the last completed copy in this process, or None.
last_copied: float | None = None

_started = threading.Event()


def copy_to_replica(primary: str = "default", replica: str = "replica") -> None:
    """Copy the primary's SQLite file onto the replica's, as one consistent snapshot."""
    global last_copied
    src = sqlite3.connect(settings.DATABASES[primary]["NAME"])
    try:
        dst = sqlite3.connect(settings.DATABASES[replica]["NAME"])
        try:
            # One step (pages=-1): readers of the replica see the old copy or
            # the new one, never half of each.
            src.backup(dst)
        finally:
            dst.close()
    finally:
        src.close()
    last_copied = time.monotonic()


def pairs() -> list[tuple[str, str]]:
    """(primary, replica) aliases of every simulated SQLite replica: the
    primary's, and each shard's (``shard0`` -> ``shard0_replica``)."""
    out = [("default", "replica")]
    for shard, replicas in settings.SHARD_REPLICAS.items():
        if settings.DATABASES[shard]["ENGINE"].endswith("sqlite3"):
            out += [(shard, replica) for replica in replicas]
    return out


def copy_all() -> None:
    """Copy the primary and every shard onto their replicas."""
    for primary, replica in pairs():
        copy_to_replica(primary, replica)


def _replicate_forever(interval: float) -> None:
    while True:
        try:
            copy_all()
        except sqlite3.Error:
            logger.exception("Copying the primary onto the replica failed")
        time.sleep(interval)


def start(interval: float) -> None:
    """Start the background copier once per process: a copy now, then every ``interval`` s."""
    if interval <= 0:
        raise ValueError(
            f"start(interval={interval!r}): SCALEKIT_EXAMPLE_REPLICA_LAG must be > 0"
        )
    if _started.is_set():
        return
    _started.set()
    threading.Thread(
        target=_replicate_forever,
        args=(interval,),
        name="example-replication",
        daemon=True,
    ).start()
    logger.info("Replica refreshed from the primary every %s s", interval)

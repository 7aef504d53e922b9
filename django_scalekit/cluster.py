"""A django-redis client for Redis Cluster.

django-redis talks to one Redis (or a Sentinel-managed master); with
``OPTIONS["CLIENT_CLASS"] = "django_scalekit.cluster.RedisClusterClient"`` a
cache shards its keys over a Redis Cluster through redis-py's
``RedisCluster``, which sends each command to the node owning its key's slot::

    CACHES = {
        "default": {
            "BACKEND": "django_redis.cache.RedisCache",
            "LOCATION": ["redis://10.0.0.1:6379", "redis://10.0.0.2:6379"],
            "OPTIONS": {"CLIENT_CLASS": "django_scalekit.cluster.RedisClusterClient"},
        },
    }

Every ``LOCATION`` entry is a startup node; one that answers is enough to
discover the others. ``get_many`` and ``delete_many`` are split by slot;
``keys``, ``iter_keys``, ``delete_pattern`` and ``clear`` visit every primary.
Commands naming several keys at once (set operations such as ``sunion``) work
only for keys sharing a hash tag (``{...}``).
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Collection
from typing import Any

from django.core.exceptions import ImproperlyConfigured
from django_redis.client import DefaultClient  # type: ignore[import-untyped]
from django_redis.exceptions import (  # type: ignore[import-untyped]
    ConnectionInterrupted,
)
from redis.cluster import ClusterNode, RedisCluster
from redis.connection import parse_url
from redis.exceptions import (
    ConnectionError as RedisConnectionError,
)
from redis.exceptions import (
    RedisClusterException,
    ResponseError,
)
from redis.exceptions import (
    TimeoutError as RedisTimeoutError,
)

# What django-redis turns into ConnectionInterrupted (so that its
# IGNORE_EXCEPTIONS applies), plus the cluster client's own errors.
_ERRORS = (
    RedisConnectionError,
    RedisTimeoutError,
    ResponseError,
    RedisClusterException,
    socket.timeout,
)


class RedisClusterClient(DefaultClient):  # type: ignore[misc]
    """A django-redis client whose raw client is a ``redis.cluster.RedisCluster``.

    ``LOCATION`` lists startup nodes (``redis://`` or ``rediss://``, database
    0 only); the first one's credentials apply to all. ``OPTIONS``
    ``SOCKET_CONNECT_TIMEOUT``, ``SOCKET_TIMEOUT``, ``USERNAME`` and
    ``PASSWORD`` apply as for any django-redis client, and
    ``REDIS_CLIENT_KWARGS`` go to ``RedisCluster`` (e.g.
    ``{"read_from_replicas": True}``). One ``RedisCluster`` per process serves
    every cache instance with the same settings, as django-redis shares its
    connection pools.
    """

    _clusters: dict[str, RedisCluster] = {}
    _clusters_lock = threading.Lock()

    def get_next_client_index(
        self, write: bool = True, tried: list[int] | None = None
    ) -> int:
        # One client for the whole cluster: it routes every command itself.
        return 0

    def connect(self, index: int = 0) -> RedisCluster:
        """The process's ``RedisCluster`` for these settings, made on first use.

        Making one asks the startup nodes for the slot map, so it fails
        (``RedisClusterException``) while none of them answers."""
        kwargs = self.cluster_kwargs()
        key = repr((sorted(self._server), sorted(kwargs.items(), key=repr)))
        with self._clusters_lock:
            cluster = self._clusters.get(key)
            if cluster is None:
                cluster = self._clusters[key] = RedisCluster(**kwargs)
        return cluster

    def cluster_kwargs(self) -> dict[str, Any]:
        """``RedisCluster`` arguments from ``LOCATION`` and ``OPTIONS``."""
        nodes = []
        first: dict[str, Any] = {}
        for url in self._server:
            parsed = parse_url(url)  # type: ignore[no-untyped-call]
            if parsed.pop("db", 0):
                raise ImproperlyConfigured(
                    f"CACHES LOCATION {url!r}: Redis Cluster has only database 0 "
                    "(scalekit.E209)."
                )
            host, port = parsed.pop("host", "localhost"), parsed.pop("port", 6379)
            nodes.append(ClusterNode(host, port))  # type: ignore[no-untyped-call]
            first = first or parsed
        params = self.connection_factory.make_connection_params(self._server[0])
        # The URL is given as startup nodes; the parser is the cluster's own.
        params.pop("url", None)
        params.pop("parser_class", None)
        return {
            **first,
            **params,
            **self._options.get("REDIS_CLIENT_KWARGS", {}),
            "startup_nodes": nodes,
        }

    def disconnect(self, index: int = 0, client: RedisCluster | None = None) -> None:
        """Close the sockets to every node; the client reconnects when used."""
        if client is None:
            client = self._clients[index]
        if client is not None:
            for node in client.get_nodes():
                if node.redis_connection is not None:
                    node.redis_connection.connection_pool.disconnect()

    def do_close_clients(self) -> None:
        # Keep the client (rediscovering the slots per request would be
        # costly); CLOSE_CONNECTION only closes its sockets.
        for client in self._clients:
            if client is not None:
                self.disconnect(client=client)

    def get_many(
        self,
        keys: Collection[str],
        version: int | None = None,
        client: RedisCluster | None = None,
    ) -> dict[str, Any]:
        """Values of ``keys``, one MGET per slot."""
        if client is None:
            client = self.get_client(write=False)
        if not keys:
            return {}
        made = {self.make_key(k, version=version): k for k in keys}
        try:
            values = client.mget_nonatomic(list(made))
        except _ERRORS as exc:
            raise ConnectionInterrupted(connection=client) from exc
        return {
            made[key]: self.decode(value)
            for key, value in zip(made, values, strict=True)
            if value is not None
        }

    def keys(
        self,
        search: str,
        version: int | None = None,
        client: RedisCluster | None = None,
    ) -> list[Any]:
        """Keys matching ``search`` on every primary (KEYS: mind large caches)."""
        if client is None:
            client = self.get_client(write=False)
        pattern = self.make_pattern(search, version=version)
        try:
            found = client.keys(pattern, target_nodes=RedisCluster.PRIMARIES)
        except _ERRORS as exc:
            raise ConnectionInterrupted(connection=client) from exc
        return [
            self.reverse_key(k.decode() if isinstance(k, bytes) else k) for k in found
        ]

"""Django middleware: thin glue that calls the policy in the piece's module."""

from __future__ import annotations

import inspect
import logging
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Any

from asgiref.sync import (
    async_to_sync,
    iscoroutinefunction,
    markcoroutinefunction,
    sync_to_async,
)
from django.http import HttpRequest, HttpResponseBase

from django_scalekit import cdn, conf, health, routers

logger = logging.getLogger("django_scalekit.routers")

_UNSAFE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
_PIN_SALT = "django_scalekit.pinning"


class _Middleware:
    """Sync and async capable: runs in the mode of the handler it wraps."""

    sync_capable = True
    async_capable = True

    def __init__(
        self,
        get_response: Callable[[HttpRequest], HttpResponseBase]
        | Callable[[HttpRequest], Awaitable[HttpResponseBase]],
    ) -> None:
        self.get_response = get_response
        self.async_mode = iscoroutinefunction(get_response)
        if self.async_mode:
            markcoroutinefunction(self)  # type: ignore[type-var]


class PinningMiddleware(_Middleware):
    """Read-your-writes across requests for the primary/replica router.

    Each request gets its own routing scope. A request carrying a valid pinning
    cookie reads from the primary; a response to an unsafe method, or to a
    request that wrote, sets the cookie (signed, with a timestamp checked
    against ``SCALEKIT["PINNING_SECONDS"]``, so forged or expired ones are
    ignored).
    """

    def __call__(self, request: HttpRequest) -> Any:
        if self.async_mode:
            return self.__acall__(request)
        token = routers.begin_scope(*self._pin_from(request))
        scope = routers.current_scope()
        try:
            response = self.get_response(request)
        except BaseException:
            routers.end_scope(token)
            raise
        self._pin(request, response, scope)  # type: ignore[arg-type]
        if getattr(response, "streaming", False):
            # A streamed body (a queryset iterated lazily) is read after we
            # return, in this thread: keep the request's scope until the
            # server closes the response.
            response._resource_closers.append(lambda: routers.end_scope(token))  # type: ignore[union-attr]
        else:
            routers.end_scope(token)
        return response

    async def __acall__(self, request: HttpRequest) -> HttpResponseBase:
        token = routers.begin_scope(*self._pin_from(request))
        scope = routers.current_scope()
        try:
            response = await self.get_response(request)  # type: ignore[misc]
        except BaseException:
            routers.end_scope(token)
            raise
        if response.streaming:
            # The body is read after we return, in this request's task, whose
            # context ends with it: leave the scope set for it.
            scope.flush()
        else:
            routers.end_scope(token)
        if conf.get().lsn_mode and scope.wrote:
            # Reading the primary's WAL position is a query: not on the loop.
            await sync_to_async(self._pin)(request, response, scope)
        else:
            self._pin(request, response, scope)
        return response  # type: ignore[no-any-return]

    def process_exception(
        self, request: HttpRequest, exception: Exception
    ) -> HttpResponseBase | None:
        """Run the view once more when a replica failed under a read-only request.

        A query already running on a replica that goes away (restarted,
        failed over, its connection cut) fails with it; routing can only move
        the next query. A GET or HEAD that wrote nothing can safely run again:
        the failed replica leaves rotation and the second run reads from
        another replica at least as far along, or from the primary
        (``SCALEKIT["RETRY_ON_REPLICA_FAILURE"]``).
        """
        match = request.resolver_match
        if match is None or getattr(request, "_scalekit_retried", False):
            return None
        failed = routers.fail_over_request(request, exception)
        if not failed:
            return None
        request._scalekit_retried = True  # type: ignore[attr-defined]
        logger.warning(
            "%s %s: replica %s failed mid-query (%s); running the view again "
            "without it.",
            request.method,
            request.path,
            ", ".join(repr(alias) for alias in failed),
            type(exception).__name__,
        )
        try:
            response = match.func(request, *match.args, **match.kwargs)
            if inspect.isawaitable(response):
                # process_exception runs in a worker thread under ASGI.
                response = async_to_sync(_awaited)(response)
            if getattr(request, "_scalekit_rendering", False):
                # The first run failed while rendering, after which the
                # handler does not render again; otherwise it renders this.
                response = response.render()
        except Exception:
            # The original exception goes on through the other middleware.
            logger.exception(
                "%s %s: the second run failed too", request.method, request.path
            )
            return None
        return response  # type: ignore[no-any-return]

    def process_template_response(self, request: HttpRequest, response: Any) -> Any:
        # Rendering comes next: an exception from now on is a rendering one.
        request._scalekit_rendering = True  # type: ignore[attr-defined]
        return response

    def _pin_from(self, request: HttpRequest) -> tuple[bool, dict[str, int]]:
        cfg = conf.get()
        name = cfg.pinning_cookie_name
        if name not in request.COOKIES or cfg.pinning_seconds <= 0:
            return False, {}
        value = request.get_signed_cookie(
            name,
            default=None,
            salt=_PIN_SALT,
            max_age=timedelta(seconds=cfg.pinning_seconds),
        )
        if value is None:
            return False, {}
        return routers.parse_pin(value)

    def _pin(
        self, request: HttpRequest, response: HttpResponseBase, scope: routers.Scope
    ) -> None:
        cfg = conf.get()
        if cfg.pinning_seconds <= 0:
            return
        value = routers.pin_value(scope, cfg)
        if value is None and request.method in _UNSAFE_METHODS:
            value = "1"
        if value is not None:
            response.set_signed_cookie(
                cfg.pinning_cookie_name,
                value,
                salt=_PIN_SALT,
                max_age=cfg.pinning_seconds,
                secure=cfg.pinning_cookie_secure,
                httponly=True,
                samesite="Lax",
            )
            # Above CDNCacheMiddleware (or a view's own headers), the caching
            # headers were decided before this cookie: Set-Cookie does not
            # stop a shared cache from storing a response (RFC 9111 section 7.3).
            if response.has_header("Cache-Control") and cdn.is_shared(response):
                cdn.make_private(response)


class CDNCacheMiddleware(_Middleware):
    """Cache headers a CDN can trust, per ``SCALEKIT["CDN"]`` (policy in ``cdn.py``).

    Place it above SessionMiddleware, CsrfViewMiddleware and anything else
    that sets cookies or ``Vary``, so it sees their headers (check
    ``scalekit.W302``).
    """

    def __call__(self, request: HttpRequest) -> Any:
        if self.async_mode:
            return self.__acall__(request)
        response: HttpResponseBase = self.get_response(request)  # type: ignore[assignment]
        cdn.apply(request, response)
        return response

    async def __acall__(self, request: HttpRequest) -> HttpResponseBase:
        response: HttpResponseBase = await self.get_response(request)  # type: ignore[misc]
        cdn.apply(request, response)
        return response


class HealthCheckMiddleware(_Middleware):
    """Serve the health endpoints before anything else (policy in ``health.py``).

    Placed first in MIDDLEWARE, it answers load-balancer probes addressed by
    IP (a ``Host`` not in ALLOWED_HOSTS) and over plain HTTP, for the two
    health paths only: every other request goes on, host validation intact.
    """

    def __call__(self, request: HttpRequest) -> Any:
        if self.async_mode:
            return self.__acall__(request)
        view = health.endpoint_for(request.path_info)
        if view is not None:
            return view(request)
        return self.get_response(request)

    async def __acall__(self, request: HttpRequest) -> HttpResponseBase:
        view = health.endpoint_for(request.path_info)
        if view is not None:
            # The checks block (threads, a deadline): keep them off the loop.
            return await sync_to_async(view, thread_sensitive=False)(request)
        return await self.get_response(request)  # type: ignore[misc, no-any-return]


async def _awaited(awaitable: Awaitable[Any]) -> Any:
    return await awaitable

"""Cache headers a CDN can trust, and purging.

``apply()`` decides a response's ``Cache-Control`` (and the CDN-targeted
``CDN-Cache-Control``/``Surrogate-Control`` and cache tags) from the first
``SCALEKIT["CDN"]["RULES"]`` entry matching the path. Order matters:

1. a response that already has ``Cache-Control`` or ``Expires`` (the view used
   ``cache_control``, ``never_cache``, ``cache_page``...) keeps the view's
   choice, unless that choice lets a shared cache store what the safety rule
   forbids (an unsafe method, a status outside ``CACHEABLE_STATUSES``, a
   per-user or streamed response): then ``private`` is added (``public`` and
   ``s-maxage`` dropped);
2. unsafe methods and statuses outside ``CACHEABLE_STATUSES`` get ``no-store``;
3. a response that sets a cookie, answers a request carrying
   ``Authorization``, read the session or loaded the user, varies on the
   request's cookies, or will carry the session, messages, CSRF or pinning
   cookie of a middleware below us, and a streamed body (generated after we
   decide; ``FileResponse`` excepted) is never shared: it gets the policy's
   private form (third-party cookies alone keep a page public);
4. otherwise the rule's policy applies as configured, with ``Vary:
   Authorization`` so no cache answers a request with credentials from it.

A path under the static prefix gets a static-file policy only when it names a
file the static files storage really serves (``serves_static_file``): a
dynamic view answering ``/static/account/x.css`` (web cache deception) gets
``DEFAULT`` like any other page.

Whatever decided, a response that ends up ``private`` or ``no-store`` carries
no ``CDN-Cache-Control``/``Surrogate-Control`` (a CDN follows them over
``Cache-Control``, RFC 9213) and no cache tags.

Public or private is decided before any header is written: Django's
``patch_cache_control(public=True)`` would silently drop an existing
``private``.
"""

from __future__ import annotations

import http.client
import logging
import re
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import wraps
from typing import Any, Protocol, TypeVar
from urllib.parse import unquote, urlsplit

from asgiref.sync import iscoroutinefunction
from django.conf import settings
from django.contrib.staticfiles import views as staticfiles_views
from django.contrib.staticfiles.storage import staticfiles_storage
from django.core.signals import setting_changed
from django.http import FileResponse, HttpRequest, HttpResponseBase
from django.utils.cache import patch_vary_headers
from django.utils.functional import LazyObject, empty

from django_scalekit import conf, metrics, routers

logger = logging.getLogger("django_scalekit.cdn")

F = TypeVar("F", bound=Callable[..., Any])

_SAFE_METHODS = frozenset({"GET", "HEAD"})
_TAGS_ATTR = "_scalekit_cdn_tags"
_VARY_SPLIT = re.compile(r"\s*,\s*")
#: Directives only a shared cache obeys: dropped from a per-user response.
_SHARED_DIRECTIVES = frozenset({"public", "s-maxage"})
#: Headers meant for the CDN alone: never on a private or no-store response.
_CDN_ONLY_HEADERS = (*conf.CDN_TARGETED_HEADERS, *conf.CDN_TAG_HEADERS)

_purges = metrics.counter(
    "cdn_purges_total",
    "CDN purge requests, by outcome (ok, error).",
    ["outcome"],
)
# ``policy`` label: a rule's PREFIX or REGEX as configured, "static",
# "static_fingerprinted", "default", "view" (the view set Cache-Control) or
# "uncacheable" (unsafe method or status): a set fixed by the settings.
_responses = metrics.counter(
    "cdn_responses_total",
    "Responses the CDN middleware handled, by the policy that decided them.",
    ["policy"],
)
_downgrades = metrics.counter(
    "cdn_private_downgrades_total",
    "Responses a shared policy would have let a CDN store, sent private "
    "because they depend on the user (cookie, Authorization, session, Vary).",
    ["policy"],
)


def policy_for(
    path: str,
    cfg: conf.CDNSettings,
    request: HttpRequest | None = None,
    response: HttpResponseBase | None = None,
) -> conf.CDNPolicy:
    """Return the policy of ``path``: first matching rule, static files, default."""
    return _match(path, cfg, request, response)[1]


def _match(
    path: str,
    cfg: conf.CDNSettings,
    request: HttpRequest | None = None,
    response: HttpResponseBase | None = None,
) -> tuple[str, conf.CDNPolicy]:
    """The policy of ``path`` and its metric label."""
    for rule in cfg.rules:
        if rule.matches(path):
            label = rule.prefix if rule.regex is None else rule.regex.pattern
            return str(label), rule.policy
    prefix = cfg.static_prefix
    if (
        prefix is not None
        and path.startswith(prefix)
        and serves_static_file(path, prefix, request, response)
    ):
        if cfg.fingerprint_regex.search(path):
            return "static_fingerprinted", cfg.fingerprinted
        return "static", cfg.unfingerprinted
    return "default", cfg.default


# --- Static files: only real ones (web cache deception) ---------------------

#: Path -> whether the static files storage holds it. Bounded: random paths
#: must not grow it forever. Emptied when the static settings change.
_static_files: dict[str, bool] = {}
_STATIC_FILES_MAX = 10_000


def serves_static_file(
    path: str,
    prefix: str,
    request: HttpRequest | None = None,
    response: HttpResponseBase | None = None,
) -> bool:
    """Whether ``path`` is a static file, not a view's page under the prefix.

    True for a response of ``django.contrib.staticfiles``' ``serve`` view or
    of WhiteNoise, and for a path naming a file of ``staticfiles_storage``
    (its manifest when it has one, else ``exists()``; looked up once per
    path). A catch-all view answering ``/static/account/x.css`` is not one:
    the extension and the prefix alone prove nothing (web cache deception).
    """
    if response is not None and type(response).__module__.startswith("whitenoise."):
        return True
    match = getattr(request, "resolver_match", None)
    if match is not None and match.func is staticfiles_views.serve:
        return True
    known = _static_files.get(path)
    if known is None:
        found = _in_storage(unquote(path[len(prefix) :]))
        if found is None:  # the storage failed: ask again next time
            return False
        if len(_static_files) >= _STATIC_FILES_MAX:
            _static_files.clear()
        _static_files[path] = known = found
    return known


def _in_storage(name: str) -> bool | None:
    """Whether the static files storage holds ``name``; None if it failed."""
    if not name or name.endswith("/"):
        return False
    try:
        # ManifestStaticFilesStorage: original and hashed names, no I/O.
        hashed = getattr(staticfiles_storage, "hashed_files", None)
        if hashed:
            return name in hashed or name in hashed.values()
        return bool(staticfiles_storage.exists(name))
    except Exception as exc:
        # No STATIC_ROOT (ImproperlyConfigured), a path leaving it
        # (SuspiciousFileOperation), a remote storage down: not a static file.
        if isinstance(exc, OSError):
            logger.warning("Static files storage lookup of %r failed: %s", name, exc)
            return None
        return False


def _forget_static_files(*, setting: str, **kwargs: object) -> None:
    if setting in {"STATIC_URL", "STATIC_ROOT", "STORAGES", "SCALEKIT"}:
        _static_files.clear()


setting_changed.connect(_forget_static_files, weak=False)


def is_per_user(
    request: HttpRequest, response: HttpResponseBase, cfg: conf.CDNSettings
) -> bool:
    """Whether ``response`` may differ per user, so no shared cache may keep it."""
    # RFC 9111 section 7.3: Set-Cookie does not stop a shared cache from
    # storing a response; a raw ``response["Set-Cookie"]`` is not in .cookies.
    if response.cookies or response.has_header("Set-Cookie"):
        return True
    meta = request.META
    for key in cfg.private_request_meta:
        if meta.get(key):
            return True
    # CsrfViewMiddleware and SessionMiddleware may set their cookie after us
    # when they sit above this middleware: look at what they will do.
    if meta.get("CSRF_COOKIE_NEEDS_UPDATE"):
        return True
    # Issue 9: touching the session or the user makes the page per-user, even
    # for an anonymous visitor without a session cookie (a CDN that ignores
    # Vary: Cookie would hand that page to logged-in users). Third-party
    # cookies (analytics) alone do not: a page that reads neither stays public.
    session = getattr(request, "session", None)
    if session is not None:
        if session.modified or session.accessed:
            return True
        # SessionMiddleware below us saves (and sets the cookie of) every
        # non-empty session when SESSION_SAVE_EVERY_REQUEST is on.
        if not session.is_empty() and settings.SESSION_SAVE_EVERY_REQUEST:
            return True
    # MessageMiddleware below us stores queued messages in a cookie (or the
    # session) and clears shown ones: a page that queued or showed one is
    # this visitor's, and its Set-Cookie comes after us.
    messages = request.__dict__.get("_messages")
    if messages is not None and (
        getattr(messages, "added_new", False)
        or getattr(messages, "_queued_messages", None)
        or getattr(messages, "_loaded_data", None)
    ):
        return True
    # AuthenticationMiddleware's lazy user once loaded (sync or async), or a
    # plain user object a token/JWT middleware or DRF set on the request.
    attrs = request.__dict__
    if "_cached_user" in attrs or "_acached_user" in attrs:
        return True
    user = attrs.get("user")
    if isinstance(user, LazyObject):
        if user._wrapped is not empty:
            return True
    elif getattr(user, "is_authenticated", False) is True:
        return True
    # PinningMiddleware, above us, sets its cookie after we answer when the
    # request wrote: look at what it will do (its scope is still open).
    if routers.current_scope().wrote and conf.get().pinning_seconds > 0:
        return True
    vary = response.get("Vary")
    if vary:
        for name in _VARY_SPLIT.split(vary.strip().lower()):
            if name == "*":
                return True
            if name in cfg.private_vary and meta.get(
                "HTTP_" + name.upper().replace("-", "_")
            ):
                return True
    return False


def _directives(cache_control: str) -> list[str]:
    return [d for d in _VARY_SPLIT.split(cache_control.strip()) if d]


def is_shared(response: HttpResponseBase) -> bool:
    """Whether ``Cache-Control`` lets a shared cache store ``response``.

    Only a bare ``private`` or ``no-store`` forbids it: ``private="Set-Cookie"``
    names fields, and the rest of the response may still be stored (RFC 9111
    section 5.2.2.7).
    """
    for directive in _directives(response.get("Cache-Control", "")):
        if directive.lower() in ("private", "no-store"):
            return False
    return True


def make_private(response: HttpResponseBase) -> None:
    """Make ``response`` unfit for shared caches, keeping the rest of its choice.

    Adds ``private`` unless it is already ``private`` or ``no-store``, drops
    ``public`` and ``s-maxage``, and removes the CDN-only headers. Used for a
    view's own headers on a per-user response, and by ``PinningMiddleware``
    when it adds its cookie to a response already decided.
    """
    if is_shared(response):
        kept = [
            d
            for d in _directives(response.get("Cache-Control", ""))
            if d.partition("=")[0].strip().lower() not in _SHARED_DIRECTIVES
        ]
        response.headers["Cache-Control"] = ", ".join(["private", *kept])
    _drop_cdn_headers(response)


def _drop_cdn_headers(response: HttpResponseBase) -> None:
    for header in _CDN_ONLY_HEADERS:
        if response.has_header(header):
            del response.headers[header]


def apply(request: HttpRequest, response: HttpResponseBase) -> None:
    """Set the caching headers of ``response`` (see the module docstring)."""
    cfg = conf.get().cdn
    uncacheable = (
        request.method not in _SAFE_METHODS
        or response.status_code not in cfg.cacheable_statuses
    )
    if response.has_header("Cache-Control") or response.has_header("Expires"):
        _responses.labels("view").inc()
        if not is_shared(response):
            _drop_cdn_headers(response)
        elif (
            uncacheable
            or _streams_unseen(response)
            or is_per_user(request, response, cfg)
        ):
            # The safety rule beats the view's choice: a CDN (one that
            # ignores Vary: Cookie) would hand this user's page to others
            # (a stream's generator may still read the user), or keep an
            # error page or the answer to a POST.
            make_private(response)
            _downgrades.labels("view").inc()
        else:
            patch_vary_headers(response, cfg.vary_on_private)
            view_tags = getattr(response, _TAGS_ATTR, ())
            if view_tags and cfg.tag_header:
                _set_tags(response, cfg.tag_header, view_tags)
        return
    if uncacheable:
        response.headers["Cache-Control"] = "no-store"
        _drop_cdn_headers(response)
        _responses.labels("uncacheable").inc()
        return
    label, policy = _match(request.path, cfg, request, response)
    _responses.labels(label).inc()
    if policy.cache in ("public", "no-cache") and (
        _streams_unseen(response) or is_per_user(request, response, cfg)
    ):
        response.headers["Cache-Control"] = policy.private_cache_control
        _drop_cdn_headers(response)
        _downgrades.labels(label).inc()
        return
    response.headers["Cache-Control"] = policy.cache_control
    if not is_shared(response):
        # A private or no-store rule: whatever the view meant for the CDN.
        _drop_cdn_headers(response)
        return
    # RFC 9111 section 3.5: "public" and "s-maxage" let a shared cache answer
    # a request carrying Authorization with this anonymous copy; Vary stops it.
    patch_vary_headers(response, cfg.vary_on_private)
    if policy.targeted is not None:
        for header in cfg.targeted_headers:
            if not response.has_header(header):
                response.headers[header] = policy.targeted
    if cfg.tag_header and policy.public:
        tags = (*policy.tags, *getattr(response, _TAGS_ATTR, ()))
        if tags:
            _set_tags(response, cfg.tag_header, tags)


def _streams_unseen(response: HttpResponseBase) -> bool:
    """Whether the body is generated after we decide (a streaming response).

    Its generator may still read the session or the user, which we cannot
    see yet: only a file's bytes (``FileResponse``, WhiteNoise's) are known
    not to depend on the visitor.
    """
    return response.streaming and not isinstance(response, FileResponse)


def _set_tags(response: HttpResponseBase, header: str, tags: Sequence[str]) -> None:
    unique = dict.fromkeys(tags)
    # Surrogate-Key is space-separated (Fastly, Varnish); Cache-Tag uses commas.
    separator = " " if header == "Surrogate-Key" else ","
    response.headers[header] = separator.join(unique)


def _check_tags(tags: Iterable[str], argument: str) -> tuple[str, ...]:
    if isinstance(tags, str):
        raise TypeError(f"{argument} must be an iterable of tags, not a str")
    checked = tuple(tags)
    for tag in checked:
        if not isinstance(tag, str) or not conf.CDN_TAG_RE.fullmatch(tag):
            raise ValueError(
                f"{argument}: {tag!r} is not a tag; use 1-128 letters, digits, "
                "'_', '.', ':' or '-'"
            )
    return checked


def add_tags(response: HttpResponseBase, *tags: str) -> HttpResponseBase:
    """Attach cache tags to ``response``; the middleware emits them if it is shared."""
    checked = _check_tags(tags, "tags")
    setattr(response, _TAGS_ATTR, (*getattr(response, _TAGS_ATTR, ()), *checked))
    return response


def cache_tags(*tags: str) -> Callable[[F], F]:
    """View decorator: tag the view's responses, e.g. ``@cache_tags("products")``."""
    checked = _check_tags(tags, "tags")

    def decorator(view: F) -> F:
        if iscoroutinefunction(view):

            @wraps(view)
            async def async_wrapper(*args: Any, **kwargs: Any) -> Any:
                return add_tags(await view(*args, **kwargs), *checked)

            return async_wrapper  # type: ignore[return-value]

        @wraps(view)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            return add_tags(view(*args, **kwargs), *checked)

        return wrapper  # type: ignore[return-value]

    return decorator


# --- Purging ---------------------------------------------------------------


@dataclass
class PurgeResult:
    """What a purge did: requests that succeeded and error messages."""

    purged: int = 0
    errors: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors


class PurgeBackend(Protocol):
    """A purge backend: built with ``SCALEKIT["CDN"]["PURGE"]["OPTIONS"]``."""

    def purge(self, urls: Sequence[str], tags: Sequence[str]) -> PurgeResult: ...


class NoOpPurgeBackend:
    """The default: purging does nothing (caches expire by their max-age)."""

    def __init__(self, **options: Any) -> None:
        pass

    def purge(self, urls: Sequence[str], tags: Sequence[str]) -> PurgeResult:
        return PurgeResult()


class HTTPPurgeBackend:
    """Purge over HTTP, as Varnish (deploy/varnish/default.vcl) and others accept.

    Each URL is sent as ``PURGE <path>`` with the URL's ``Host``; tags as one
    ``BAN /`` request carrying them in ``TAG_HEADER``. Options: ``ENDPOINTS``
    (cache addresses, e.g. ``["http://127.0.0.1:6081"]``), ``TIMEOUT``
    (seconds, default 2), ``URL_METHOD`` (``"PURGE"``), ``TAG_METHOD``
    (``"BAN"``), ``TAG_HEADER`` (``"Surrogate-Key"``).
    """

    def __init__(
        self,
        ENDPOINTS: Sequence[str] = (),
        TIMEOUT: float = 2.0,
        URL_METHOD: str = "PURGE",
        TAG_METHOD: str = "BAN",
        TAG_HEADER: str = "Surrogate-Key",
    ) -> None:
        if isinstance(ENDPOINTS, str) or not ENDPOINTS:
            raise ValueError(
                "ENDPOINTS must be a non-empty list of URLs like 'http://127.0.0.1:6081'"
            )
        self.endpoints = []
        for endpoint in ENDPOINTS:
            parts = urlsplit(endpoint)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise ValueError(f"ENDPOINTS: {endpoint!r} is not an http(s) URL")
            self.endpoints.append(parts)
        if isinstance(TIMEOUT, bool) or not isinstance(TIMEOUT, (int, float)):
            raise TypeError(f"TIMEOUT must be a number of seconds, not {TIMEOUT!r}")
        if TIMEOUT <= 0:
            raise ValueError(f"TIMEOUT must be > 0, not {TIMEOUT!r}")
        self.timeout = float(TIMEOUT)
        self.url_method = URL_METHOD
        self.tag_method = TAG_METHOD
        self.tag_header = TAG_HEADER

    def purge(self, urls: Sequence[str], tags: Sequence[str]) -> PurgeResult:
        # One deadline for the whole purge, and every endpoint at once: a
        # cache that never answers costs the request TIMEOUT, not TIMEOUT per
        # URL per endpoint, and does not starve the other caches.
        deadline = time.monotonic() + self.timeout
        results = [PurgeResult() for _ in self.endpoints]
        threads = [
            threading.Thread(
                target=self._purge_endpoint,
                args=(result, endpoint, urls, tags, deadline),
                name=f"scalekit-purge {endpoint.netloc}",
                daemon=True,
            )
            for result, endpoint in zip(results, self.endpoints, strict=True)
        ]
        for thread in threads:
            thread.start()
        merged = PurgeResult()
        for thread, result, endpoint in zip(
            threads, results, self.endpoints, strict=True
        ):
            thread.join(max(0.0, deadline - time.monotonic()))
            if thread.is_alive():
                merged.errors.append(
                    f"{endpoint.netloc}: no answer within the {self.timeout:g} s "
                    "purge deadline"
                )
                continue
            merged.purged += result.purged
            merged.errors.extend(result.errors)
        return merged

    def _purge_endpoint(
        self,
        result: PurgeResult,
        endpoint: Any,
        urls: Sequence[str],
        tags: Sequence[str],
        deadline: float,
    ) -> None:
        for url in urls:
            parts = urlsplit(url)
            path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
            headers = {"Host": parts.netloc} if parts.netloc else {}
            self._send(result, endpoint, self.url_method, path, headers, deadline)
        if tags:
            headers = {self.tag_header: " ".join(tags)}
            self._send(result, endpoint, self.tag_method, "/", headers, deadline)

    def _send(
        self,
        result: PurgeResult,
        endpoint: Any,
        method: str,
        path: str,
        headers: Mapping[str, str],
        deadline: float,
    ) -> None:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            result.errors.append(
                f"{method} {path} via {endpoint.netloc}: not sent, the "
                f"{self.timeout:g} s purge deadline passed"
            )
            return
        cls = (
            http.client.HTTPSConnection
            if endpoint.scheme == "https"
            else http.client.HTTPConnection
        )
        connection = cls(endpoint.hostname, endpoint.port, timeout=remaining)
        try:
            connection.request(method, path, headers=dict(headers))
            response = connection.getresponse()
            response.read()
        except (OSError, http.client.HTTPException, ValueError) as exc:
            # ValueError: a URL or header http.client refuses to send.
            result.errors.append(f"{method} {path} via {endpoint.netloc}: {exc}")
            return
        finally:
            connection.close()
        if 200 <= response.status < 300:
            result.purged += 1
        else:
            result.errors.append(
                f"{method} {path} via {endpoint.netloc}: HTTP {response.status} "
                f"{response.reason}"
            )


def purge(*, urls: Iterable[str] = (), tags: Iterable[str] = ()) -> PurgeResult:
    """Ask the CDN to drop ``urls`` and everything tagged with ``tags``.

    Failures (an unreachable cache, a refused request, a tag or URL no cache
    can take, such as ``"café"`` built from user data) are logged as a
    WARNING, counted and returned in the result, never raised: a purge runs
    in request paths, after the write that made it necessary. Only arguments
    of the wrong type (``urls`` given as one ``str``) raise ``TypeError``.
    """
    if isinstance(urls, str):
        raise TypeError("urls must be an iterable of URLs, not a str")
    if isinstance(tags, str):
        raise TypeError("tags must be an iterable of tags, not a str")
    errors: list[str] = []
    url_list = []
    for url in urls:
        if not isinstance(url, str):
            raise TypeError(f"urls: {url!r} is not a URL (a str)")
        if not url or not url.isascii() or any(c.isspace() for c in url):
            errors.append(f"urls: {url!r} skipped, not a URL a cache can take")
        else:
            url_list.append(url)
    tag_list = []
    for tag in tags:
        if not isinstance(tag, str):
            raise TypeError(f"tags: {tag!r} is not a tag (a str)")
        if conf.CDN_TAG_RE.fullmatch(tag):
            tag_list.append(tag)
        else:
            errors.append(
                f"tags: {tag!r} skipped; tags are 1-128 letters, digits, "
                "'_', '.', ':' or '-'"
            )
    result = PurgeResult()
    if url_list or tag_list:
        cfg = conf.get().cdn
        try:
            backend: PurgeBackend = (cfg.purge_backend or NoOpPurgeBackend)(
                **cfg.purge_options
            )
            result = backend.purge(url_list, tag_list)
        except Exception as exc:  # a backend bug must not break the request
            result = PurgeResult(errors=[f"{type(exc).__name__}: {exc}"])
    result.errors[:0] = errors
    if result.errors:
        _purges.labels("error").inc()
        logger.warning("CDN purge incomplete: %s", "; ".join(result.errors))
    elif url_list or tag_list:
        _purges.labels("ok").inc()
    return result


def sets_visitor_state(request: HttpRequest, response: HttpResponseBase) -> bool:
    """Whether producing ``response`` left state meant for this visitor only.

    A cookie to set, a CSRF token handed out, a modified session, flash
    messages queued or shown: replaying such a response from any shared cache
    (a CDN, ``cached_view``) would give one visitor's state to another, or
    lose it. Checked after the view ran, before the middleware that turns
    this state into ``Set-Cookie`` (CSRF, session, messages) has run.
    """
    if response.cookies or "Set-Cookie" in response.headers:
        return True
    if request.META.get("CSRF_COOKIE_NEEDS_UPDATE"):
        return True
    session = getattr(request, "session", None)
    if session is not None and getattr(session, "modified", False):
        return True
    # django.contrib.messages: messages added, or loaded (to be shown) from
    # this visitor's cookie or session.
    storage = getattr(request, "_messages", None)
    return storage is not None and bool(
        getattr(storage, "added_new", False)
        or getattr(storage, "_queued_messages", None)
        or getattr(storage, "_loaded_data", None)
    )

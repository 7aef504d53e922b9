"""Views for the CDN and health tests, in-process and behind real proxies."""

from __future__ import annotations

import itertools
import os
import time
from pathlib import Path

from django.contrib import messages
from django.contrib.auth.models import AnonymousUser
from django.contrib.staticfiles import views as staticfiles_views
from django.http import (
    FileResponse,
    Http404,
    HttpResponse,
    HttpResponseServerError,
    StreamingHttpResponse,
)
from django.urls import include, path, re_path
from django.utils.cache import patch_vary_headers
from django.views.decorators.cache import cache_control, cache_page, never_cache
from django.views.decorators.csrf import csrf_exempt, ensure_csrf_cookie

from django_scalekit import conf, routers
from django_scalekit.cdn import add_tags, cache_tags

# Counts the requests that reached Django: a response served from a cache
# repeats the number of the response it copies.
_hits = itertools.count(1)


def _page(text="page"):
    response = HttpResponse(text)
    response["X-Hit"] = str(next(_hits))
    return response


def page(request, pk=None):
    return _page()


def api(request):
    return _page("api")


def sets_cookie(request):
    response = _page("cookie")
    response.set_cookie("flavour", "oatmeal")
    return response


def sets_raw_cookie(request):
    response = _page("raw cookie")
    response["Set-Cookie"] = "flavour=raw; Path=/"
    return response


def writes(request):
    """A GET that writes, as any ORM write would route it: pins the client."""
    routers.route_write(conf.get().default_group)
    return _page("counted")


@cache_control(public=True, max_age=30)
def own_public_writes(request):
    return writes(request)


class _TokenUser:
    """A user a JWT/token middleware or DRF sets as a plain object, not lazily."""

    is_authenticated = True
    username = "token-user"


def token_user(request):
    # As the token middleware would: a plain object, anonymous or not.
    request.user = _TokenUser() if "jwt" in request.COOKIES else AnonymousUser()
    return _page(f"hello {getattr(request.user, 'username', '')}")


@cache_control(max_age=30)
def own_user(request):
    # Shareable headers of its own, a body that depends on the user.
    return _page(f"user {request.user.is_authenticated}")


def own_targeted(request):
    response = _page("own targeted")
    response["CDN-Cache-Control"] = "max-age=600"
    response["Surrogate-Key"] = "own"
    return response


@never_cache
def never_targeted(request):
    return own_targeted(request)


def error_targeted(request):
    response = own_targeted(request)
    response.status_code = 500
    return response


@ensure_csrf_cookie
def csrf_page(request):
    return _page("csrf")


def reads_session(request):
    return _page(f"hello {request.session.get('name', 'stranger')}")


def writes_session(request):
    request.session["name"] = "ada"
    return _page("written")


def reads_user(request):
    return _page(f"user {request.user.is_authenticated}")


async def reads_auser(request):
    user = await request.auser()
    return _page(f"auser {user.is_authenticated}")


def vary_cookie(request):
    response = _page("vary")
    patch_vary_headers(response, ["Cookie"])
    return response


@cache_control(private=True, max_age=5)
def own_private(request):
    return _page("own")


@cache_control(public=True, max_age=7)
def own_public(request):
    response = _page("own public")
    response.set_cookie("flavour", "oatmeal")
    return response


@never_cache
def never(request):
    return _page("never")


@cache_page(30)
def cached_page(request):
    return _page("cached")


def slow(request):
    """A request still in flight when the instance is told to stop."""
    time.sleep(float(request.GET.get("seconds", "0.5")))
    return _page("slow")


def missing(request):
    raise Http404("no such thing")


def error(request):
    return HttpResponseServerError("boom")


@cache_tags("products", "product:1")
def tagged(request):
    return add_tags(_page("tagged"), "extra")


@csrf_exempt
def post(request):
    return _page("posted")


def static(request, name):
    return _page(f"static {name}")


def account(request, rest):
    """A catch-all view: any path below it, ``x.css`` included, is a page."""
    return _page(f"account {rest}")


def streams_session(request):
    """The body reads the session while it is streamed, after the middleware ran."""

    def body():
        yield b"hello "
        yield request.session.get("name", "stranger").encode()

    return StreamingHttpResponse(body())


async def streams_session_async(request):
    async def body():
        yield b"hello "
        yield (await request.session.aget("name", "stranger")).encode()

    return StreamingHttpResponse(body())


@cache_control(public=True, max_age=60)
def streams_own_public(request):
    return StreamingHttpResponse(iter([b"chosen"]))


def streams_file(request):
    return FileResponse(open(__file__, "rb"))  # noqa: SIM115


@cache_control(public=True, max_age=600)
def own_public_error(request):
    return HttpResponseServerError("boom")


@cache_control(public=True, max_age=600)
def own_public_missing(request):
    response = _page("missing")
    response.status_code = 404
    return response


@csrf_exempt
@cache_control(public=True, s_maxage=600)
def own_public_post(request):
    response = _page("posted")
    response["CDN-Cache-Control"] = "max-age=600"
    response["Surrogate-Control"] = "max-age=600"
    return response


def flash(request):
    messages.info(request, "saved")
    return _page("flashed")


def shows_messages(request):
    return _page(" ".join(str(m) for m in messages.get_messages(request)))


def flag_check():
    """Custom readiness check: fails while the file named by SCALEKIT_HEALTH_FLAG exists."""
    flag = os.environ.get("SCALEKIT_HEALTH_FLAG")
    if flag and Path(flag).exists():
        raise RuntimeError(f"{flag} says this instance is not ready")


urlpatterns = [
    path("page/", page),
    path("slow/", slow),
    path("private/", page),
    path("products/<int:pk>/", page),
    path("api/items/", api),
    path("api/cookie/", sets_cookie),
    path("api/raw-cookie/", sets_raw_cookie),
    path("api/writes/", writes),
    path("api/own-public-writes/", own_public_writes),
    path("api/token-user/", token_user),
    path("api/own-user/", own_user),
    path("api/own-targeted/", own_targeted),
    path("api/never-targeted/", never_targeted),
    path("api/error-targeted/", error_targeted),
    path("private/targeted/", own_targeted),
    path("api/csrf/", csrf_page),
    path("api/session/", reads_session),
    path("api/session/write/", writes_session),
    path("api/user/", reads_user),
    path("api/auser/", reads_auser),
    path("api/vary-cookie/", vary_cookie),
    path("api/own-private/", own_private),
    path("api/own-public/", own_public),
    path("api/never/", never),
    path("api/cached-page/", cached_page),
    path("api/missing/", missing),
    path("api/error/", error),
    path("api/tagged/", tagged),
    path("api/post/", post),
    path("api/stream-session/", streams_session),
    path("api/stream-session-async/", streams_session_async),
    path("api/stream-own-public/", streams_own_public),
    path("api/stream-file/", streams_file),
    path("api/own-public-error/", own_public_error),
    path("api/own-public-missing/", own_public_missing),
    path("api/own-public-post/", own_public_post),
    path("api/flash/", flash),
    path("api/messages/", shows_messages),
    re_path(r"^static/(?P<name>.+)$", static),
    re_path(r"^account/(?P<rest>.*)$", account),
    re_path(r"^dev-static/(?P<path>.+)$", staticfiles_views.serve, {"insecure": True}),
    path("routed/", include("django_scalekit.urls")),
]

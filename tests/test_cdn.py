from __future__ import annotations

import http.server
import json
import threading

import pytest
from asgiref.sync import async_to_sync
from django.conf import settings
from django.test import AsyncClient, Client, override_settings

from django_scalekit import cdn, checks, conf

MIDDLEWARE = [
    "django_scalekit.middleware.HealthCheckMiddleware",
    "django_scalekit.middleware.CDNCacheMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
]
CDN = {
    "RULES": [
        {
            "PREFIX": "/api/",
            "CACHE": "public",
            "MAX_AGE": 10,
            "S_MAXAGE": 60,
            "STALE_WHILE_REVALIDATE": 30,
            "STALE_IF_ERROR": 600,
            "TAGS": ["api"],
        },
        {"PREFIX": "/private/", "CACHE": "private", "MAX_AGE": 60},
        {"REGEX": r"^/products/\d+/$", "CACHE": "public", "MAX_AGE": 120},
    ],
    "TARGETED_HEADERS": ["CDN-Cache-Control", "Surrogate-Control"],
}


def site(**cdn_overrides):
    return override_settings(
        ROOT_URLCONF="tests.serve_urls",
        MIDDLEWARE=MIDDLEWARE,
        STATIC_URL="/static/",
        SCALEKIT={"REPLICAS": ["replica"], "CDN": {**CDN, **cdn_overrides}},
    )


@pytest.fixture(autouse=True)
def _site():
    with site():
        yield


@pytest.fixture
def client():
    return Client()


API_PUBLIC = (
    "public, max-age=10, s-maxage=60, stale-while-revalidate=30, stale-if-error=600"
)
API_PRIVATE = "private, max-age=10, stale-while-revalidate=30, stale-if-error=600"


def assert_not_shared(response):
    """The safety invariant: nothing a shared cache may store or is told about."""
    cache_control = response["Cache-Control"]
    assert "public" not in cache_control
    assert "s-maxage" not in cache_control
    assert "private" in cache_control or "no-store" in cache_control
    assert "CDN-Cache-Control" not in response
    assert "Surrogate-Control" not in response
    assert "Surrogate-Key" not in response


# --- Rules ------------------------------------------------------------------


def test_prefix_rule_public_with_cdn_headers_and_tags(client):
    response = client.get("/api/items/")
    assert response["Cache-Control"] == API_PUBLIC
    assert (
        response["CDN-Cache-Control"]
        == "max-age=60, stale-while-revalidate=30, stale-if-error=600"
    )
    assert response["Surrogate-Control"] == response["CDN-Cache-Control"]
    assert response["Surrogate-Key"] == "api"


def test_regex_rule(client):
    assert client.get("/products/42/")["Cache-Control"] == "public, max-age=120"


def test_private_rule(client):
    response = client.get("/private/")
    assert response["Cache-Control"] == "private, max-age=60"
    assert "CDN-Cache-Control" not in response


def test_html_default_is_no_cache(client):
    response = client.get("/page/")
    assert response["Cache-Control"] == "no-cache"
    assert "CDN-Cache-Control" not in response


def test_first_matching_rule_wins(client):
    rules = [
        {"PREFIX": "/api/items/", "CACHE": "no-store"},
        {"PREFIX": "/api/", "CACHE": "public", "MAX_AGE": 5},
    ]
    with site(RULES=rules):
        assert client.get("/api/items/")["Cache-Control"] == "no-store"
        # A path of the second rule whose view sets no headers of its own.
        assert client.get("/api/tagged/")["Cache-Control"] == "public, max-age=5"


def test_default_rules_make_api_short_and_public(client):
    with override_settings(SCALEKIT={"REPLICAS": ["replica"]}):
        response = client.get("/api/items/")
        assert (
            response["Cache-Control"] == "public, max-age=60, stale-while-revalidate=30"
        )
        assert "CDN-Cache-Control" not in response
        assert client.get("/page/")["Cache-Control"] == "no-cache"


FINGERPRINTED = "css/site.3f2a9c1b7d0e.css"


@pytest.fixture
def static_root(tmp_path):
    """A STATIC_ROOT holding css/site.css and its fingerprinted copy."""
    root = tmp_path / "static"
    (root / "css").mkdir(parents=True)
    for name in ("css/site.css", FINGERPRINTED):
        (root / name).write_text("body {}")
    with override_settings(STATIC_ROOT=str(root)):
        yield root


def test_fingerprinted_static_file_is_immutable(client, static_root):
    response = client.get("/static/" + FINGERPRINTED)
    assert response["Cache-Control"] == "public, max-age=31536000, immutable"


def test_plain_static_file_is_short_lived(client, static_root):
    response = client.get("/static/css/site.css")
    assert response["Cache-Control"] == "public, max-age=60"
    with site(STATIC_MAX_AGE=5):
        assert (
            client.get("/static/css/site.css")["Cache-Control"] == "public, max-age=5"
        )


def test_static_prefix_follows_static_url(client, static_root):
    with override_settings(STATIC_URL="/assets/"):
        assert client.get("/static/css/site.css")["Cache-Control"] == "no-cache"
    with override_settings(STATIC_URL="https://cdn.example.com/static/"):
        assert conf.get().cdn.static_prefix is None


# Web cache deception: a dynamic page under a static-looking name must not be
# stored by the CDN for everyone (issue 9).
@pytest.mark.parametrize(
    "url",
    [
        "/static/account/settings/x.css",
        "/static/css/missing.3f2a9c1b7d0e.css",
        "/static/css/",
        "/static/../etc/passwd.css",
        "/account/settings/x.css",
        "/account/settings/x.3f2a9c1b7d0e.css",
    ],
)
def test_catch_all_view_is_not_a_static_file(client, static_root, url):
    response = client.get(url)
    assert response.status_code == 200
    assert response["Cache-Control"] == "no-cache"
    assert "CDN-Cache-Control" not in response


def test_catch_all_view_without_static_root_is_not_a_static_file(client):
    # No STATIC_ROOT: the storage holds nothing.
    response = client.get("/static/account/x.css")
    assert response["Cache-Control"] == "no-cache"


def test_manifest_names_are_static_files(client, static_root):
    (static_root / "staticfiles.json").write_text(
        json.dumps(
            {"paths": {"css/site.css": FINGERPRINTED}, "version": "1.1", "hash": "x"}
        )
    )
    manifest = {
        "staticfiles": {
            "BACKEND": "django.contrib.staticfiles.storage.ManifestStaticFilesStorage"
        }
    }
    with override_settings(STORAGES={**settings.STORAGES, **manifest}):
        assert client.get("/static/" + FINGERPRINTED)["Cache-Control"] == (
            "public, max-age=31536000, immutable"
        )
        assert client.get("/static/css/site.css")["Cache-Control"] == (
            "public, max-age=60"
        )
        # On disk, not in the manifest: not something collectstatic published.
        (static_root / "css" / "x.0123456789ab.css").write_text("")
        assert client.get("/static/css/x.0123456789ab.css")["Cache-Control"] == (
            "no-cache"
        )


def test_staticfiles_serve_view_is_a_static_file(client, static_root):
    with override_settings(
        STATIC_URL="/dev-static/", STATIC_ROOT=None, STATICFILES_DIRS=[static_root]
    ):
        response = client.get("/dev-static/css/site.css")
        response.close()  # a FileResponse: closes the file
        assert response.status_code == 200
        assert response["Cache-Control"] == "public, max-age=60"


def test_static_file_lookup_is_cached_per_path(client, static_root):
    assert client.get("/static/css/site.css")["Cache-Control"] == "public, max-age=60"
    (static_root / "css" / "site.css").unlink()
    # No storage I/O on the hot path once a path is known...
    assert client.get("/static/css/site.css")["Cache-Control"] == "public, max-age=60"
    # ...and forgotten when the static settings change.
    with override_settings(STATIC_ROOT=str(static_root)):
        assert client.get("/static/css/site.css")["Cache-Control"] == "no-cache"


def test_cache_tag_header_variant(client):
    with site(TAG_HEADER="Cache-Tag"):
        response = client.get("/api/tagged/")
    assert response["Cache-Tag"] == "api,extra,products,product:1"
    assert "Surrogate-Key" not in response


def test_view_tags(client):
    assert client.get("/api/tagged/")["Surrogate-Key"] == "api extra products product:1"


def test_head_is_like_get(client):
    assert client.head("/api/items/")["Cache-Control"] == API_PUBLIC


# --- The view's own headers win -----------------------------------------------


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("/api/own-private/", "private, max-age=5"),
        ("/api/never/", "max-age=0, no-cache, no-store, must-revalidate, private"),
        ("/api/cached-page/", "max-age=30"),
    ],
)
def test_view_with_its_own_headers_is_kept(client, url, expected):
    response = client.get(url)
    assert response["Cache-Control"] == expected
    assert "CDN-Cache-Control" not in response
    assert "Surrogate-Control" not in response


def test_explicit_public_from_the_view_is_kept_when_nothing_is_per_user(client):
    response = client.get("/api/cached-page/")
    assert response["Cache-Control"] == "max-age=30"
    # The view's own targeted header and tags on a shareable response: its choice.
    response = client.get("/api/own-targeted/")
    assert response["CDN-Cache-Control"] == "max-age=600"


def test_explicit_public_from_the_view_with_a_cookie_becomes_private(client):
    # The view said public itself and set a cookie: RFC 9111 section 7.3, a
    # shared cache may store it with the cookie, so it is never left public.
    response = client.get("/api/own-public/")
    assert response.cookies["flavour"].value == "oatmeal"
    assert response["Cache-Control"] == "private, max-age=7"
    assert_not_shared(response)


@pytest.mark.parametrize("url", ["/api/cached-page/", "/api/own-user/"])
def test_view_shareable_headers_answering_authorization_become_private(client, url):
    response = client.get(url, HTTP_AUTHORIZATION="Bearer alice")
    assert response["Cache-Control"] == "private, max-age=30"
    assert_not_shared(response)


@pytest.mark.django_db
def test_view_shareable_headers_for_a_logged_in_user_become_private(
    client, django_user_model
):
    client.force_login(django_user_model.objects.create_user("ada", password="pw"))
    response = client.get("/api/own-user/")
    assert response.content == b"user True"
    assert response["Cache-Control"] == "private, max-age=30"
    assert_not_shared(response)


@pytest.mark.parametrize(
    ("url", "headers", "cache_control"),
    [
        # Per-user (Authorization): the rule's private form.
        ("/api/own-targeted/", {"HTTP_AUTHORIZATION": "Bearer a"}, API_PRIVATE),
        # A private rule.
        ("/private/targeted/", {}, "private, max-age=60"),
        # The view's own no-store.
        (
            "/api/never-targeted/",
            {},
            "max-age=0, no-cache, no-store, must-revalidate, private",
        ),
        # Not cacheable.
        ("/api/error-targeted/", {}, "no-store"),
    ],
)
def test_view_targeted_headers_removed_when_not_shared(
    client, url, headers, cache_control
):
    # RFC 9213: a CDN follows CDN-Cache-Control over Cache-Control, so the
    # view's own one must not survive on a private or no-store response.
    response = client.get(url, **headers)
    assert response["Cache-Control"] == cache_control
    assert_not_shared(response)


# --- Safety: never public for a per-user or uncacheable response --------------


def test_cookie_set_by_the_view(client):
    response = client.get("/api/cookie/")
    assert response.cookies["flavour"].value == "oatmeal"
    assert response["Cache-Control"] == API_PRIVATE
    assert_not_shared(response)


def test_raw_set_cookie_header_set_by_the_view(client):
    response = client.get("/api/raw-cookie/")
    assert response["Set-Cookie"] == "flavour=raw; Path=/"
    assert response["Cache-Control"] == API_PRIVATE
    assert_not_shared(response)


def test_user_set_as_a_plain_object(client):
    # A token/JWT middleware (or DRF) sets request.user to a real object.
    assert client.get("/api/token-user/")["Cache-Control"] == API_PUBLIC
    client.cookies["jwt"] = "token"
    response = client.get("/api/token-user/")
    assert response.content == b"hello token-user"
    assert_not_shared(response)


PINNING_FIRST = ["django_scalekit.middleware.PinningMiddleware", *MIDDLEWARE]


@pytest.mark.parametrize(
    "middleware",
    [
        # As README and quickstart show it: PinningMiddleware first, so the
        # CDN middleware answers before the pinning cookie exists.
        PINNING_FIRST,
        # The recommended order: the CDN middleware sees the cookie.
        [
            *MIDDLEWARE[:2],
            "django_scalekit.middleware.PinningMiddleware",
            *MIDDLEWARE[2:],
        ],
    ],
)
def test_get_that_writes_sets_the_pinning_cookie_and_is_never_public(
    client, middleware
):
    with override_settings(MIDDLEWARE=middleware):
        assert conf.get().pinning_seconds > 0
        response = client.get("/api/writes/")
        assert "scalekit_pin" in response.cookies
        assert response["Cache-Control"] == API_PRIVATE
        assert_not_shared(response)
        # A GET that does not write stays public, pinning on.
        assert client.get("/api/items/")["Cache-Control"] == API_PUBLIC


def test_get_that_writes_async_with_pinning_first():
    with override_settings(MIDDLEWARE=PINNING_FIRST):
        response = async_to_sync(AsyncClient().get)("/api/writes/")
    assert "scalekit_pin" in response.cookies
    assert_not_shared(response)


def test_pinning_cookie_added_to_a_shared_response_makes_it_private(client):
    # No CDN middleware at all: the view's own public headers, then the
    # pinning cookie. PinningMiddleware itself withdraws "public".
    with override_settings(MIDDLEWARE=["django_scalekit.middleware.PinningMiddleware"]):
        response = client.get("/api/own-public-writes/")
    assert "scalekit_pin" in response.cookies
    assert response["Cache-Control"] == "private, max-age=30"


def test_pinning_below_cdn_is_a_cookie_setting_middleware():
    with override_settings(MIDDLEWARE=PINNING_FIRST):
        messages = checks.check_cdn_and_health_middleware()
    assert [m.id for m in messages] == ["scalekit.W302", "scalekit.W403"]
    assert "PinningMiddleware" in messages[0].msg


def test_csrf_cookie_set_later_by_csrf_middleware(client):
    response = client.get("/api/csrf/")
    assert "csrftoken" in response.cookies
    assert_not_shared(response)


def test_csrf_cookie_when_cdn_middleware_sits_below_csrf(client):
    below = [m for m in MIDDLEWARE if "CDNCache" not in m] + [
        "django_scalekit.middleware.CDNCacheMiddleware"
    ]
    with override_settings(MIDDLEWARE=below):
        response = client.get("/api/csrf/")
        assert "csrftoken" in response.cookies
        assert_not_shared(response)
        assert [m.id for m in checks.check_cdn_and_health_middleware()] == [
            "scalekit.W302"
        ]


@pytest.mark.django_db
def test_session_cookie_sent_and_session_read(client):
    client.get("/api/session/write/")
    assert "sessionid" in client.cookies
    response = client.get("/api/session/")
    assert response.content == b"hello ada"
    assert "Cookie" in response["Vary"]
    assert response["Cache-Control"] == API_PRIVATE
    assert_not_shared(response)


@pytest.mark.django_db
def test_session_read_when_cdn_middleware_sits_below_sessions(client):
    below = [m for m in MIDDLEWARE if "CDNCache" not in m] + [
        "django_scalekit.middleware.CDNCacheMiddleware"
    ]
    with override_settings(MIDDLEWARE=below):
        client.get("/api/session/write/")
        response = client.get("/api/session/")
        assert response.content == b"hello ada"
        assert_not_shared(response)


@pytest.mark.django_db
def test_session_written_sets_cookie(client):
    response = client.get("/api/session/write/")
    assert "sessionid" in response.cookies
    assert_not_shared(response)


def test_session_cookie_sent_but_not_used_stays_public(client):
    client.cookies["sessionid"] = "whatever"
    response = client.get("/api/items/")
    assert response["Cache-Control"] == API_PUBLIC


THIRD_PARTY = {"_ga": "GA1.1.123.456", "_gid": "GA1.1.789", "_fbp": "fb.1.2.3"}
CDN_BELOW_SESSIONS = [m for m in MIDDLEWARE if "CDNCache" not in m] + [
    "django_scalekit.middleware.CDNCacheMiddleware"
]


@pytest.mark.parametrize("below", [False, True], ids=["cdn-first", "cdn-below"])
def test_third_party_cookies_keep_a_page_public(client, below):
    # Issue 9: analytics cookies on anonymous traffic must not cost the CDN
    # its hit rate when the view reads neither the session nor the user.
    client.cookies.load(THIRD_PARTY)
    with override_settings(MIDDLEWARE=CDN_BELOW_SESSIONS if below else MIDDLEWARE):
        response = client.get("/api/items/")
        assert response["Cache-Control"] == API_PUBLIC
        assert response["Surrogate-Key"] == "api"
        assert "Vary" not in response or "Cookie" not in response["Vary"]
        assert client.get("/page/")["Cache-Control"] == "no-cache"


@pytest.mark.django_db
@pytest.mark.parametrize("below", [False, True], ids=["cdn-first", "cdn-below"])
@pytest.mark.parametrize("cookies", [THIRD_PARTY, {}], ids=["analytics", "none"])
@pytest.mark.parametrize("url", ["/api/session/", "/api/user/"])
def test_touching_the_session_or_the_user_makes_it_private(client, below, cookies, url):
    client.cookies.load(cookies)
    with override_settings(MIDDLEWARE=CDN_BELOW_SESSIONS if below else MIDDLEWARE):
        response = client.get(url)
    assert response.content in (b"hello stranger", b"user False")
    assert response["Cache-Control"] == API_PRIVATE
    assert_not_shared(response)


def test_async_user_touched_makes_it_private():
    client = AsyncClient()
    client.cookies.load(THIRD_PARTY)
    response = async_to_sync(client.get)("/api/auser/")
    assert response.content == b"auser False"
    assert_not_shared(response)


def test_authorization_sent(client):
    response = client.get("/api/items/", HTTP_AUTHORIZATION="Bearer secret")
    assert response["Cache-Control"] == API_PRIVATE
    assert_not_shared(response)


def test_configured_private_request_header(client):
    with site(PRIVATE_REQUEST_HEADERS=["X-Api-Key"]):
        response = client.get("/api/items/", HTTP_X_API_KEY="k")
        assert_not_shared(response)
        # Authorization stays private even when the list omits it.
        assert_not_shared(client.get("/api/items/", HTTP_AUTHORIZATION="Basic eDp5"))


@pytest.mark.django_db
def test_authenticated_user(client, django_user_model):
    user = django_user_model.objects.create_user("ada", password="pw")
    client.force_login(user)
    response = client.get("/api/user/")
    assert response.content == b"user True"
    assert_not_shared(response)


def test_vary_cookie_with_cookie_sent(client):
    assert client.get("/api/vary-cookie/")["Cache-Control"] == API_PUBLIC
    client.cookies["theme"] = "dark"
    assert_not_shared(client.get("/api/vary-cookie/"))


@pytest.mark.parametrize(
    ("url", "status"), [("/api/missing/", 404), ("/api/error/", 500)]
)
def test_uncacheable_status(client, url, status):
    response = client.get(url)
    assert response.status_code == status
    assert response["Cache-Control"] == "no-store"
    assert_not_shared(response)


def test_missing_static_file_is_not_cached(client):
    with override_settings(ROOT_URLCONF="tests.urls"):
        response = client.get("/static/css/site.3f2a9c1b7d0e.css")
    assert response.status_code == 404
    assert response["Cache-Control"] == "no-store"


def test_404_cacheable_only_when_configured(client):
    with site(CACHEABLE_STATUSES=[200, 404]):
        assert client.get("/api/missing/")["Cache-Control"] == API_PUBLIC


@pytest.mark.parametrize("method", ["post", "put", "patch", "delete"])
def test_unsafe_methods(client, method):
    response = getattr(client, method)("/api/post/")
    assert response.status_code == 200
    assert response["Cache-Control"] == "no-store"
    assert_not_shared(response)


# --- The view's own headers never beat the safety rule ------------------------


@pytest.mark.parametrize(
    ("method", "url", "status"),
    [
        ("get", "/api/own-public-error/", 500),
        ("get", "/api/own-public-missing/", 404),
        ("post", "/api/own-public-post/", 200),
        ("delete", "/api/own-public-post/", 200),
    ],
)
def test_view_public_on_uncacheable_status_or_method_becomes_private(
    client, method, url, status
):
    response = getattr(client, method)(url)
    assert response.status_code == status
    assert response["Cache-Control"].startswith("private")
    assert_not_shared(response)


def test_view_public_on_cacheable_404_is_kept():
    with site(CACHEABLE_STATUSES=[200, 404]):
        response = Client().get("/api/own-public-missing/")
    assert response["Cache-Control"] == "public, max-age=600"


def test_shared_responses_vary_on_private_request_headers(client):
    # RFC 9111 section 3.5: without it, a shared cache may answer a request
    # carrying Authorization with the anonymous copy ("public", "s-maxage").
    assert client.get("/api/items/")["Vary"] == "Authorization"
    assert client.get("/api/cached-page/")["Vary"] == "Authorization"
    with site(PRIVATE_REQUEST_HEADERS=["X-Api-Key"]):
        response = Client().get("/api/items/")
    assert response["Vary"] == "Authorization, X-Api-Key"


# --- Streaming: the body is generated after the middleware decided ------------


@pytest.mark.django_db
def test_streaming_body_reading_the_session_is_never_public(client):
    client.get("/api/session/write/")
    response = client.get("/api/stream-session/")
    assert b"".join(response.streaming_content) == b"hello ada"
    assert response["Cache-Control"] == API_PRIVATE
    assert_not_shared(response)


def test_streaming_response_is_private_even_for_an_anonymous_visitor(client):
    response = client.get("/api/stream-session/")
    assert response["Cache-Control"] == API_PRIVATE
    assert_not_shared(response)
    assert b"".join(response.streaming_content) == b"hello stranger"


def test_streaming_response_with_the_views_own_public_headers_becomes_private(
    client,
):
    # Its generator runs after the middleware: it may still read the user.
    response = client.get("/api/stream-own-public/")
    assert response["Cache-Control"] == "private, max-age=60"
    assert_not_shared(response)


def test_file_response_stays_public(client):
    response = client.get("/api/stream-file/")
    assert response["Cache-Control"] == API_PUBLIC
    assert b"".join(response.streaming_content).startswith(b'"""Views')


def test_async_streaming_body_reading_the_session_is_never_public():
    client = AsyncClient()
    response = async_to_sync(client.get)("/api/stream-session-async/")
    assert response["Cache-Control"] == API_PRIVATE
    assert_not_shared(response)


# --- CDN below the session and message middleware (scalekit.W302) -------------

MESSAGES = "django.contrib.messages.middleware.MessageMiddleware"
CDN_FIRST_WITH_MESSAGES = [*MIDDLEWARE, MESSAGES]
CDN_BELOW_ALL = [m for m in CDN_FIRST_WITH_MESSAGES if "CDNCache" not in m] + [
    "django_scalekit.middleware.CDNCacheMiddleware"
]


@pytest.mark.django_db
@pytest.mark.parametrize("below", [False, True], ids=["cdn-first", "cdn-below"])
def test_session_saved_every_request_is_never_public(client, below):
    order = CDN_BELOW_ALL if below else CDN_FIRST_WITH_MESSAGES
    # The client builds its middleware chain at its first request.
    with override_settings(MIDDLEWARE=order, SESSION_SAVE_EVERY_REQUEST=True):
        client.get("/api/session/write/")
        response = client.get("/api/items/")
        assert "sessionid" in response.cookies
        assert_not_shared(response)
        # Without a session cookie, nothing is saved: the page stays shared.
        assert Client().get("/api/items/")["Cache-Control"] == API_PUBLIC


@pytest.mark.parametrize("below", [False, True], ids=["cdn-first", "cdn-below"])
def test_flash_messages_queued_or_shown_are_never_public(client, below):
    order = CDN_BELOW_ALL if below else CDN_FIRST_WITH_MESSAGES
    with override_settings(MIDDLEWARE=order):
        queued = client.get("/api/flash/")
        assert "messages" in queued.cookies
        assert_not_shared(queued)
        shown = client.get("/api/messages/")
        assert shown.content == b"saved"
        assert "messages" in shown.cookies  # the shown message is cleared
        assert_not_shared(shown)
        # No message pending: the same page is shared.
        assert client.get("/api/messages/")["Cache-Control"] == API_PUBLIC


def test_per_user_html_is_private_no_cache(client):
    response = client.get("/page/", HTTP_AUTHORIZATION="Bearer x")
    assert response["Cache-Control"] == "private, no-cache"


def test_async_middleware():
    client = AsyncClient()
    response = async_to_sync(client.get)("/api/items/")
    assert response["Cache-Control"] == API_PUBLIC
    response = async_to_sync(client.get)(
        "/api/items/", headers={"Authorization": "Bearer x"}
    )
    assert_not_shared(response)


# --- Policies and settings ---------------------------------------------------


def test_policy_rendering_drops_s_maxage_when_private():
    policy = conf.cdn_policy("public", max_age=0, s_maxage=300, immutable=True)
    assert policy.cache_control == "public, max-age=0, s-maxage=300, immutable"
    assert policy.private_cache_control == "private, max-age=0, immutable"
    assert policy.targeted == "max-age=300"
    assert conf.cdn_policy("no-store").private_cache_control == "no-store"


def ids(cdn_settings):
    return [p.id for p in conf.build({"CDN": cdn_settings}).problems]


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ({}, []),
        ({"TYPO": 1}, ["scalekit.W301"]),
        ({"RULES": "/api/"}, ["scalekit.E301"]),
        ({"RULES": ["/api/"]}, ["scalekit.E301"]),
        ({"RULES": [{"CACHE": "public"}]}, ["scalekit.E302"]),
        ({"RULES": [{"PREFIX": "/a/", "REGEX": "x"}]}, ["scalekit.E302"]),
        ({"RULES": [{"PREFIX": "api/"}]}, ["scalekit.E302"]),
        ({"RULES": [{"REGEX": "("}]}, ["scalekit.E303"]),
        ({"FINGERPRINT_REGEX": "["}, ["scalekit.E303"]),
        ({"RULES": [{"PREFIX": "/a/", "CACHE": "shared"}]}, ["scalekit.E304"]),
        ({"RULES": [{"PREFIX": "/a/", "MAX_AGE": -1}]}, ["scalekit.E305"]),
        ({"RULES": [{"PREFIX": "/a/", "MAX_AGE": 1.5}]}, ["scalekit.E305"]),
        ({"RULES": [{"PREFIX": "/a/", "IMMUTABLE": "yes"}]}, ["scalekit.E305"]),
        ({"RULES": [{"PREFIX": "/a/", "WHEN": 1}]}, ["scalekit.W301"]),
        ({"STATIC_MAX_AGE": None}, ["scalekit.E305"]),
        ({"DEFAULT": {"CACHE": "private", "S_MAXAGE": 60}}, ["scalekit.E306"]),
        ({"DEFAULT": {"TAGS": "a"}}, ["scalekit.E307"]),
        ({"DEFAULT": {"TAGS": ["a b"]}}, ["scalekit.E307"]),
        ({"TARGETED_HEADERS": ["Cache-Control"]}, ["scalekit.E308"]),
        ({"TAG_HEADER": "X-Tags"}, ["scalekit.E309"]),
        ({"CACHEABLE_STATUSES": "200"}, ["scalekit.E310"]),
        ({"CACHEABLE_STATUSES": [200, 503]}, ["scalekit.E310"]),
        ({"PURGE": {"BACKEND": "no.such.Backend"}}, ["scalekit.E311"]),
        ({"PURGE": []}, ["scalekit.E311"]),
        ({"PRIVATE_REQUEST_HEADERS": "X-Api-Key"}, ["scalekit.E312"]),
        ({"STATIC_PREFIX": "static"}, ["scalekit.E302"]),
    ],
)
def test_cdn_settings_validation(value, expected):
    assert ids(value) == expected


def test_health_middleware_must_be_first():
    with override_settings(MIDDLEWARE=list(reversed(MIDDLEWARE))):
        assert sorted(m.id for m in checks.check_cdn_and_health_middleware()) == [
            "scalekit.W302",
            "scalekit.W403",
        ]
    assert checks.check_cdn_and_health_middleware() == []


# --- Purging -------------------------------------------------------------------


class _Recorder(http.server.BaseHTTPRequestHandler):
    seen: list = []
    status = 200

    def _any(self):
        type(self).seen.append(
            (
                self.command,
                self.path,
                self.headers.get("Host"),
                self.headers.get("Surrogate-Key"),
            )
        )
        self.send_response(type(self).status)
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_PURGE = do_BAN = _any

    def log_message(self, *args):
        pass


@pytest.fixture
def purge_server():
    _Recorder.seen = []
    _Recorder.status = 200
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Recorder)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def purge_settings(endpoints, **options):
    return site(
        PURGE={
            "BACKEND": "django_scalekit.cdn.HTTPPurgeBackend",
            "OPTIONS": {"ENDPOINTS": endpoints, **options},
        }
    )


def test_purge_default_is_noop():
    result = cdn.purge(urls=["https://example.com/a/"], tags=["products"])
    assert result.ok and result.purged == 0


def test_http_purge_sends_purge_and_ban(purge_server):
    port = purge_server.server_address[1]
    with purge_settings([f"http://127.0.0.1:{port}"]):
        result = cdn.purge(
            urls=["https://shop.example.com/api/items/?page=2"],
            tags=["products", "p:1"],
        )
    assert result.errors == []
    assert result.purged == 2
    assert _Recorder.seen == [
        ("PURGE", "/api/items/?page=2", "shop.example.com", None),
        ("BAN", "/", f"127.0.0.1:{port}", "products p:1"),
    ]


def test_purge_errors_are_reported_not_raised(purge_server, caplog):
    _Recorder.status = 405
    port = purge_server.server_address[1]
    with purge_settings([f"http://127.0.0.1:{port}", "http://127.0.0.1:1"], TIMEOUT=1):
        result = cdn.purge(urls=["/api/items/"])
    assert not result.ok
    assert result.purged == 0
    assert "HTTP 405" in result.errors[0]
    assert "127.0.0.1:1" in result.errors[1]
    assert "CDN purge incomplete" in caplog.text


def test_purge_backend_with_bad_options_is_reported():
    with purge_settings([]):
        result = cdn.purge(tags=["products"])
    assert result.errors == [
        "ValueError: ENDPOINTS must be a non-empty list of URLs like 'http://127.0.0.1:6081'"
    ]


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"urls": "/a/"}, TypeError),
        ({"urls": [None]}, TypeError),
        ({"tags": "products"}, TypeError),
        ({"tags": [None]}, TypeError),
    ],
)
def test_purge_bad_arguments(kwargs, error):
    with pytest.raises(error, match=next(iter(kwargs))):
        cdn.purge(**kwargs)


def test_cache_tags_bad_argument():
    with pytest.raises(ValueError, match="tags"):
        cdn.cache_tags("no spaces allowed")


def test_purge_skips_and_reports_tags_and_urls_no_cache_can_take(purge_server, caplog):
    # Tags built from data (a product's slug) must not break the request
    # that changed the data: the bad ones are skipped, the rest purged.
    port = purge_server.server_address[1]
    with purge_settings([f"http://127.0.0.1:{port}"]):
        result = cdn.purge(
            urls=["https://shop.example.com/café/", "https://shop.example.com/ok/"],
            tags=["café", "two words", "bad\n", "product:1"],
        )
    assert result.purged == 2
    assert len(result.errors) == 4
    assert all("skipped" in error for error in result.errors)
    assert _Recorder.seen == [
        ("PURGE", "/ok/", "shop.example.com", None),
        ("BAN", "/", f"127.0.0.1:{port}", "product:1"),
    ]
    assert "CDN purge incomplete" in caplog.text


@pytest.fixture
def silent_endpoint():
    """A port that accepts connections and never answers."""
    import socket

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    yield listener.getsockname()[1]
    listener.close()


def test_purge_has_one_deadline_for_all_urls_and_endpoints(
    purge_server, silent_endpoint
):
    import time

    port = purge_server.server_address[1]
    urls = [f"https://shop.example.com/{n}/" for n in range(5)]
    endpoints = [f"http://127.0.0.1:{silent_endpoint}", f"http://127.0.0.1:{port}"]
    with purge_settings(endpoints, TIMEOUT=0.5):
        started = time.monotonic()
        result = cdn.purge(urls=urls, tags=["products"])
        elapsed = time.monotonic() - started
    assert elapsed < 0.5 + 0.3
    # The answering cache got everything; the silent one is reported.
    assert result.purged == 6
    assert len(_Recorder.seen) == 6
    assert result.errors
    assert all(f"127.0.0.1:{silent_endpoint}" in error for error in result.errors)

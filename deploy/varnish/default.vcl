# Varnish in front of django-scalekit, as a CDN would be: it trusts the
# origin's caching headers instead of refusing every request with a cookie.
# That is only safe because CDNCacheMiddleware never marks a per-user
# response public (it gets "private" or "no-store", which Varnish's built-in
# rules do not store, nor anything with Set-Cookie).
#
# scripts/proxies fills in @BACKEND_HOST@, @BACKEND_PORT@ and @PURGERS@.
vcl 4.1;

import std;

backend default {
    .host = "@BACKEND_HOST@";
    .port = "@BACKEND_PORT@";
    .connect_timeout = 1s;
    .first_byte_timeout = 10s;
}

acl purgers {
    @PURGERS@;
}

sub vcl_recv {
    # django_scalekit.cdn.HTTPPurgeBackend: PURGE one URL, BAN by cache tag.
    if (req.method == "PURGE") {
        if (client.ip !~ purgers) {
            return (synth(405, "Not allowed"));
        }
        return (purge);
    }
    if (req.method == "BAN") {
        if (client.ip !~ purgers) {
            return (synth(405, "Not allowed"));
        }
        if (!req.http.Surrogate-Key || req.http.Surrogate-Key !~ "^[A-Za-z0-9_.:\- ]+$") {
            return (synth(400, "Surrogate-Key with plain tags required"));
        }
        std.ban("obj.http.Surrogate-Key ~ (^|\s)(" + regsuball(req.http.Surrogate-Key, "\s+", "|") + ")(\s|$)");
        return (synth(200, "Banned"));
    }
    if (req.method != "GET" && req.method != "HEAD") {
        return (pass);
    }
    # RFC 9111 section 3.5: a stored "public" answer may be reused for a
    # request carrying Authorization; the origin adds Vary: Authorization to
    # shared responses, and passing such requests makes sure they reach it.
    if (req.http.Authorization) {
        return (pass);
    }
    # A visitor with a session, pending flash messages or a read-your-writes
    # pin gets the origin's answer, never the anonymous copy (rename sessionid
    # and scalekit_pin here if SESSION_COOKIE_NAME or PINNING_COOKIE_NAME differ).
    if (req.http.Cookie ~ "(^|;)\s*(sessionid|messages|scalekit_pin)=") {
        return (pass);
    }
    # Unlike Varnish's default, other requests with cookies (analytics) are
    # looked up too: the origin's Cache-Control decides what is stored.
    return (hash);
}

sub vcl_backend_response {
    # RFC 9213: CDN-Cache-Control, when present, sets this cache's lifetime.
    if (beresp.http.CDN-Cache-Control ~ "(^|,)\s*max-age=\d+" &&
        beresp.http.Cache-Control !~ "(private|no-store)" && !beresp.http.Set-Cookie) {
        set beresp.ttl = std.duration(
            regsub(beresp.http.CDN-Cache-Control, "^(.*,)?\s*max-age=(\d+).*$", "\2") + "s", 0s);
    }
    # Varnish's built-in rules follow: no storing with Set-Cookie, private,
    # no-store, no-cache or a zero lifetime.
}

sub vcl_deliver {
    # Targeted at this cache only (RFC 9213 section 2.1); tags stay internal.
    unset resp.http.CDN-Cache-Control;
    unset resp.http.Surrogate-Control;
    unset resp.http.Surrogate-Key;
}

"""The shop's pages.

``/`` and ``/unpinned/`` show the replica router at work: each says which
database served its read (``/`` goes through the router, ``/unpinned/`` reads
the replica directly, as a visitor without the pinning cookie would).

``/catalog/`` and its variants serve the same page with and without caching,
for ``benchmarks/bench_topology.py``; ``/products/<pk>/`` and
``/api/products/`` read through the two-level cache. ``/orders/`` is the
read-your-writes page: an order placed at ``/orders/new/`` (written on the
customer's shard) is there at once.
"""

from __future__ import annotations

import time
from decimal import Decimal
from typing import Any

from django.conf import settings
from django.contrib.auth.decorators import login_required
from django.db.models import Avg, Count, Max
from django.http import Http404, HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import redirect, render
from django.urls import reverse
from django.views.decorators.cache import cache_page

from django_scalekit import conf
from django_scalekit.cache import cached_view
from django_scalekit.routers import PrimaryReplicaRouter, ShardRouter
from shop import replication
from shop.catalog import PAGE_SIZE, catalog_page, load_page, product_card
from shop.forms import OrderForm, ProductForm
from shop.models import Order, Product

# --- the replica router, visibly ----------------------------------------------------


def product_list(request: HttpRequest) -> HttpResponse:
    if request.method == "POST":
        form = ProductForm(request.POST)
        if form.is_valid():
            # A write: the router sends it to the primary, and PinningMiddleware
            # sets the pinning cookie on this redirect.
            form.save()
            # The new product is on the first catalog page: drop its cached copies.
            catalog_page.invalidate(1)
            catalog_cached_view.invalidate(
                request.build_absolute_uri(reverse("shop:catalog_cached_view"))
            )
            return redirect("shop:product_list")
    else:
        form = ProductForm()
    products = list(Product.objects.all()[:PAGE_SIZE])
    # The router keeps one database per request, so asking it again after the
    # query names the database that served it.
    served_by = PrimaryReplicaRouter().db_for_read(Product)
    return render(
        request,
        "shop/product_list.html",
        {"form": form, "products": products, **_routing(request, served_by)},
    )


def unpinned(request: HttpRequest) -> HttpResponse:
    # .using() bypasses the router, and so the pin: this is what a client
    # without the cookie (or a router without read-your-writes) would see.
    queryset = Product.objects.using(conf.get().replicas[0]).all()[:PAGE_SIZE]
    products = list(queryset)
    return render(
        request,
        "shop/unpinned.html",
        {"products": products, **_routing(request, queryset.db)},
    )


def _routing(request: HttpRequest, served_by: str) -> dict[str, Any]:
    cfg = conf.get()
    age = (
        None
        if replication.last_copied is None
        else time.monotonic() - replication.last_copied
    )
    return {
        "served_by": served_by,
        # The primary or a shard (a primary of its own), not a replica.
        "is_primary": served_by == cfg.primary or served_by in settings.SHARDS,
        "has_pin_cookie": cfg.pinning_cookie_name in request.COOKIES,
        "pin_cookie_name": cfg.pinning_cookie_name,
        "pinning_seconds": cfg.pinning_seconds,
        "sqlite_replica": settings.SCALEKIT_EXAMPLE_SQLITE_REPLICA,
        "replica_lag": settings.SCALEKIT_EXAMPLE_REPLICA_LAG,
        "replica_age": age,
    }


# --- the catalog: one page, five ways ------------------------------------------------


def _page(request: HttpRequest) -> int:
    try:
        return max(1, min(int(request.GET.get("page", "1")), 100_000))
    except ValueError:
        return 1


def _catalog(request: HttpRequest, data: dict[str, Any], how: str) -> HttpResponse:
    # No session, user or CSRF token here: the page is the same for everyone,
    # so CDNCacheMiddleware may mark it public for Varnish.
    return render(request, "shop/catalog.html", {**data, "how": how})


def catalog(request: HttpRequest) -> HttpResponse:
    """Uncached: two queries and a template render per request."""
    return _catalog(request, load_page(_page(request)), "uncached")


def catalog_cached_query(request: HttpRequest) -> HttpResponse:
    """The queries through ``@cached`` (``shop.catalog.catalog_page``); rendered each time."""
    return _catalog(request, catalog_page(_page(request)), "@cached on the query")


@cached_view(timeout=60)
def catalog_cached_view(request: HttpRequest) -> HttpResponse:
    """The whole response through ``@cached_view``."""
    return _catalog(request, load_page(_page(request)), "@cached_view")


@cache_page(60)
def catalog_cache_page(request: HttpRequest) -> HttpResponse:
    """The peer baseline: Django's ``cache_page`` on the default cache (django-redis)."""
    return _catalog(request, load_page(_page(request)), "Django cache_page")


def catalog_cacheops(request: HttpRequest) -> HttpResponse:
    """The peer baseline: django-cacheops' ``.cache()`` on the two queries."""
    if "cacheops" not in settings.INSTALLED_APPS:
        raise Http404("django-cacheops is not enabled (needs REDIS_URL and cacheops).")
    page = _page(request)
    start = (page - 1) * PAGE_SIZE
    queryset: Any = Product.objects.order_by("-id")
    total = queryset.cache().count()
    rows = queryset.values_list("pk", "name", "price")[start : start + PAGE_SIZE]
    data = {
        "page": page,
        "products": [
            {"pk": pk, "name": name, "price": str(price)}
            for pk, name, price in rows.cache()
        ],
        "total": total,
        "num_pages": max(1, -(-total // PAGE_SIZE)),
    }
    return _catalog(request, data, "django-cacheops")


def product_detail(request: HttpRequest, pk: int) -> HttpResponse:
    card = product_card(pk)
    if card is None:
        raise Http404("No such product.")
    return render(request, "shop/product_detail.html", {"product": card})


def api_products(request: HttpRequest) -> JsonResponse:
    """``/api/products/?page=N``: a catalog page as JSON, from the two-level cache."""
    return JsonResponse(catalog_page(_page(request)))


def db_bound(request: HttpRequest) -> JsonResponse:
    """A database-bound read: an aggregate over the whole catalog, a tiny
    response (the replica-scaling benchmark: the work is in the database)."""
    rows = (
        Product.objects.values("name")
        .annotate(n=Count("id"), avg=Avg("price"), top=Max("price"))
        .order_by("name")
    )
    served_by = PrimaryReplicaRouter().db_for_read(Product)
    return JsonResponse(
        {
            "served_by": served_by,
            "groups": [[r["name"], r["n"], str(r["avg"]), str(r["top"])] for r in rows],
        }
    )


def bare(request: HttpRequest) -> HttpResponse:
    """No database, no cache, no template: the floor for the benchmarks."""
    return HttpResponse(b"ok", content_type="text/plain")


# --- orders: read-your-writes ------------------------------------------------------------


@login_required
def order_list(request: HttpRequest) -> HttpResponse:
    # One query on the shard (or its replica) holding this customer's orders;
    # for_key() also filters by customer_id.
    orders = list(Order.objects.for_key(request.user.pk)[:50])
    served_by = ShardRouter().db_for_read(Order, shard_key=request.user.pk)
    return render(
        request,
        "shop/order_list.html",
        {"orders": orders, "user": request.user, **_routing(request, served_by)},
    )


@login_required
def order_new(request: HttpRequest) -> HttpResponse:
    card = None
    if request.method == "POST":
        form = OrderForm(request.POST)
        if form.is_valid():
            card = product_card(form.cleaned_data["product"])
            if card is None:
                form.add_error("product", "No such product.")
            else:
                quantity = form.cleaned_data["quantity"]
                # A write on the customer's shard: PinningMiddleware pins this
                # client, so the order list it is redirected to reads the
                # shard itself, not its replica.
                Order.objects.create(
                    customer_id=request.user.pk,
                    product_id=card["pk"],
                    product_name=card["name"],
                    quantity=quantity,
                    total=Decimal(card["price"]) * quantity,
                )
                return redirect("shop:order_list")
    else:
        form = OrderForm(initial={"product": request.GET.get("product")})
    return render(request, "shop/order_new.html", {"form": form, "user": request.user})

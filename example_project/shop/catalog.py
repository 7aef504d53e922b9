"""The catalog's reads, cached with django-scalekit's two-level cache.

The views and ``shop/warmers.py`` call these functions with the same
arguments (an ``int`` page number, an ``int`` pk), so ``manage.py warm_cache``
fills exactly the keys the views read.
"""

from __future__ import annotations

from typing import Any

from django_scalekit.cache import cached
from shop.models import Product

#: Products on one catalog page.
PAGE_SIZE = 50


def load_page(page: int) -> dict[str, Any]:
    """One catalog page from the database (a replica, through the router)."""
    total = Product.objects.count()
    start = (page - 1) * PAGE_SIZE
    products = [
        {"pk": pk, "name": name, "price": str(price)}
        for pk, name, price in Product.objects.order_by("-id").values_list(
            "pk", "name", "price"
        )[start : start + PAGE_SIZE]
    ]
    return {
        "page": page,
        "products": products,
        "total": total,
        "num_pages": max(1, -(-total // PAGE_SIZE)),
    }


def load_card(pk: int) -> dict[str, Any] | None:
    """One product's card, or None if there is no such product."""
    row = Product.objects.filter(pk=pk).values_list("pk", "name", "price").first()
    if row is None:
        return None
    return {"pk": row[0], "name": row[1], "price": str(row[2])}


@cached(timeout=300)
def catalog_page(page: int) -> dict[str, Any]:
    """``load_page`` through the two-level cache: L1 in each worker, L2 in Redis."""
    return load_page(page)


@cached(timeout=300)
def product_card(pk: int) -> dict[str, Any] | None:
    """``load_card`` through the two-level cache."""
    return load_card(pk)

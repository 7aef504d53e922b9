"""Cache warmers for ``manage.py warm_cache``: the keys the catalog views read."""

from __future__ import annotations

from collections.abc import Iterator

from django_scalekit.cache import warmer
from django_scalekit.routers import use_primary
from shop.catalog import PAGE_SIZE, catalog_page, product_card
from shop.models import Product

#: Catalog pages and product cards warmed (the ones most visitors see).
WARM_PAGES = 20
WARM_CARDS = 200


@warmer(catalog_page)
def first_catalog_pages() -> Iterator[int]:
    """The first catalog pages, as /catalog/?page=N reads them."""
    with use_primary():  # the replica may not have the newest products yet
        total = Product.objects.count()
    pages = max(1, -(-total // PAGE_SIZE))
    yield from range(1, min(pages, WARM_PAGES) + 1)


@warmer(product_card)
def newest_product_cards() -> Iterator[int]:
    """The cards of the newest products (the first catalog pages link to them)."""
    with use_primary():
        pks = list(
            Product.objects.order_by("-id").values_list("pk", flat=True)[:WARM_CARDS]
        )
    yield from pks

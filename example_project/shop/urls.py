from __future__ import annotations

from django.urls import path

from shop import views

app_name = "shop"
urlpatterns = [
    path("", views.product_list, name="product_list"),
    path("unpinned/", views.unpinned, name="unpinned"),
    path("catalog/", views.catalog, name="catalog"),
    path(
        "catalog/cached-query/",
        views.catalog_cached_query,
        name="catalog_cached_query",
    ),
    path("catalog/cached-view/", views.catalog_cached_view, name="catalog_cached_view"),
    path("catalog/cache-page/", views.catalog_cache_page, name="catalog_cache_page"),
    path("catalog/cacheops/", views.catalog_cacheops, name="catalog_cacheops"),
    path("products/<int:pk>/", views.product_detail, name="product_detail"),
    path("api/products/", views.api_products, name="api_products"),
    path("bench/bare/", views.bare, name="bare"),
    path("bench/db/", views.db_bound, name="db_bound"),
    path("orders/", views.order_list, name="order_list"),
    path("orders/new/", views.order_new, name="order_new"),
]

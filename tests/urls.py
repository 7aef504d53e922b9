from __future__ import annotations

from django.urls import path

from tests.testapp import views

urlpatterns = [
    path("items/", views.items),
    path("replica-dies/", views.replica_dies_mid_request),
    path("replica-times-out/", views.replica_times_out),
    path("write-then-read/", views.write_then_read),
    path("write-then-fail/", views.write_then_fail),
    path("write-then-stream/", views.write_then_stream),
    path("async/items/", views.async_items),
    path("async/write-then-read/", views.async_write_then_read),
]

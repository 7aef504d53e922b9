from __future__ import annotations

import psycopg
from asgiref.sync import sync_to_async
from django.db import connections
from django.http import HttpRequest, HttpResponse, JsonResponse, StreamingHttpResponse
from django.views.decorators.csrf import csrf_exempt

from django_scalekit.routers import PrimaryReplicaRouter

from .models import Event, Item

_router = PrimaryReplicaRouter()


def _payload() -> dict[str, object]:
    return {
        "names": sorted(Item.objects.values_list("name", flat=True)),
        "read_from": _router.db_for_read(Item),
    }


@csrf_exempt
def items(request: HttpRequest) -> JsonResponse:
    """GET lists item names; POST creates one (a write, then a redirect-style read)."""
    if request.method == "POST":
        Item.objects.create(name=request.POST["name"])
    return JsonResponse(_payload())


def write_then_read(request: HttpRequest) -> JsonResponse:
    """Write and read in one request: the read must see the write."""
    Item.objects.create(name=request.GET["name"])
    return JsonResponse(_payload())


def write_then_stream(request: HttpRequest) -> StreamingHttpResponse:
    """Write, then stream a queryset: its query runs while the body is read."""
    Item.objects.create(name=request.GET["name"])

    def rows():  # type: ignore[no-untyped-def]
        for name in Item.objects.values_list("name", flat=True):
            yield name + "\n"
        yield "read_from=" + _router.db_for_read(Item) + "\n"

    return StreamingHttpResponse(rows())


def write_then_fail(request: HttpRequest) -> JsonResponse:
    """A request that writes, pinning its scope, and then fails."""
    Item.objects.create(name="doomed")
    raise RuntimeError("the view failed after writing")


async def async_items(request: HttpRequest) -> JsonResponse:
    names = sorted([name async for name in Item.objects.values_list("name", flat=True)])
    read_from = await sync_to_async(_router.db_for_read)(Item)
    return JsonResponse({"names": names, "read_from": read_from})


async def async_write_then_read(request: HttpRequest) -> JsonResponse:
    await Item.objects.acreate(name=request.GET["name"])
    names = sorted([name async for name in Item.objects.values_list("name", flat=True)])
    return JsonResponse({"names": names})


def sync_only_middleware(get_response):  # type: ignore[no-untyped-def]
    """A plain sync middleware, as many projects have around the library's."""

    def middleware(request: HttpRequest) -> HttpResponse:
        return get_response(request)  # type: ignore[no-any-return]

    return middleware


def _cut_replica_connection() -> None:
    """Terminate this thread's replica backend from another session, as a
    replica restart or failover does to queries running on it."""
    pid = connections["replica"].connection.info.backend_pid
    params = connections["replica"].get_connection_params()
    with psycopg.connect(
        host=params["host"],
        port=params["port"],
        dbname=params["dbname"],
        user=params["user"],
        autocommit=True,
    ) as admin:
        admin.execute("SELECT pg_terminate_backend(%s)", [pid])


@csrf_exempt
def replica_dies_mid_request(request: HttpRequest) -> JsonResponse:
    """Read, lose the replica's connection, read again (the second read fails
    on the replica). ``?write=1`` writes an Event first, ``?session=1`` changes
    the session; the run count is in the reply."""
    request.runs = getattr(request, "runs", 0) + 1
    if request.GET.get("write"):
        Event.objects.create(name="written-before-the-failure")
    if request.GET.get("session"):
        request.session["visits"] = request.session.get("visits", 0) + 1
    first = _payload()
    if first["read_from"] == "replica":
        _cut_replica_connection()
    second = _payload()
    return JsonResponse(
        {**second, "first_read_from": first["read_from"], "runs": request.runs}
    )


def replica_times_out(request: HttpRequest) -> JsonResponse:
    """A statement timeout on the replica: an OperationalError on a replica
    that is fine."""
    request.runs = getattr(request, "runs", 0) + 1
    assert _payload()["read_from"] == "replica"
    with connections["replica"].cursor() as cursor:
        cursor.execute("SET statement_timeout = 10")
        cursor.execute("SELECT pg_sleep(1)")
    return JsonResponse({"runs": request.runs})

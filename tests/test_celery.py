"""Each Celery task runs in a routing scope of its own (task_prerun/postrun).

Tasks run in a real worker (``celery.contrib.testing.worker``, solo and threads
pools: every task in the same worker thread and context, as in a production
worker) with a Redis broker. Each task returns the alias its reads went to.
The worker runs in this process, so outcomes are collected from
``task_postrun`` rather than a result backend (celery's Redis result backend
calls redis-py's deprecated ``setex``: an error under ``-W error``).
"""

from __future__ import annotations

import contextvars
import logging
import os
import threading
import uuid
from typing import Any

import pytest

celery = pytest.importorskip(
    "celery", reason="celery is not installed: no task signals to test"
)

from celery.app.task import Context  # noqa: E402
from celery.contrib.testing.worker import start_worker  # noqa: E402
from celery.signals import setup_logging, task_postrun, task_prerun  # noqa: E402
from django.db import connections  # noqa: E402

from django_scalekit import routers  # noqa: E402
from django_scalekit.routers import PrimaryReplicaRouter  # noqa: E402
from tests.conftest import require_service  # noqa: E402
from tests.testapp.models import Item  # noqa: E402

REDIS_URL = os.environ.get("SCALEKIT_TEST_REDIS", "redis://127.0.0.1:6379/15")

app = celery.Celery("scalekit_tests", set_as_current=False)
app.conf.update(
    broker_url=REDIS_URL,
    task_ignore_result=True,
    # A queue of this run's own: another run's worker never takes its tasks.
    task_default_queue=f"scalekit-tests-{uuid.uuid4().hex[:8]}",
    worker_hijack_root_logger=False,
    broker_connection_retry_on_startup=False,
)

TIMEOUT = 10


def unique(prefix: str = "task") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def read_alias() -> str:
    alias = PrimaryReplicaRouter().db_for_read(Item)
    assert alias is not None
    return alias


@app.task
def write_then_read(name: str) -> str:
    try:
        Item.objects.create(name=name)
        return read_alias()
    finally:
        connections.close_all()


@app.task
def read() -> str:
    try:
        return read_alias()
    finally:
        connections.close_all()


@app.task
def write_then_raise(name: str) -> None:
    try:
        Item.objects.create(name=name)
        raise RuntimeError("the task failed after its write")
    finally:
        connections.close_all()


@app.task
def write_in_task(name: str) -> None:
    Item.objects.create(name=name)


class Outcomes:
    """(state, return value or exception) of each task the worker ran."""

    def __init__(self) -> None:
        self._done: dict[str, tuple[str, Any]] = {}
        self._changed = threading.Condition()

    def record(self, task_id: str, state: str, retval: Any, **kwargs: Any) -> None:
        with self._changed:
            self._done[task_id] = (state, retval)
            self._changed.notify_all()

    def wait(self, task_id: str) -> tuple[str, Any]:
        with self._changed:
            assert self._changed.wait_for(lambda: task_id in self._done, TIMEOUT), (
                f"task {task_id} did not run within {TIMEOUT} s"
            )
            return self._done.pop(task_id)


outcomes = Outcomes()


def _leave_logging_alone(**kwargs: Any) -> None:
    """A setup_logging receiver: celery then leaves the root logger as it is
    (it would set it to ERROR for the rest of the test run)."""


@pytest.fixture(scope="module", params=["solo", "threads"])
def worker(request):
    """A worker in this process: solo runs tasks in its consumer thread,
    threads in one pool thread; either way each task in the same context."""
    require_service("Redis", 6379)
    # Connected after django_scalekit's handler: a task's scope has ended when
    # its outcome is seen.
    task_postrun.connect(outcomes.record, weak=False)
    setup_logging.connect(_leave_logging_alone, weak=False)
    try:
        with start_worker(app, pool=request.param, perform_ping_check=False) as worker:
            logging.captureWarnings(False)  # turned on by start_worker()
            yield worker
    finally:
        setup_logging.disconnect(_leave_logging_alone)
        task_postrun.disconnect(outcomes.record)


@pytest.fixture
def handlers_disconnected():
    """The worker without django-scalekit's task signal handlers."""
    prerun, postrun = (
        routers._begin_scope_on_task_prerun,
        routers._end_scope_on_task_postrun,
    )
    assert task_prerun.disconnect(prerun, dispatch_uid="django_scalekit.task_prerun")
    assert task_postrun.disconnect(postrun, dispatch_uid="django_scalekit.task_postrun")
    try:
        yield
    finally:
        task_prerun.connect(
            prerun, weak=False, dispatch_uid="django_scalekit.task_prerun"
        )
        task_postrun.connect(
            postrun, weak=False, dispatch_uid="django_scalekit.task_postrun"
        )


def run(signature) -> tuple[str, Any]:
    """Send a task to the worker; its final state and return value (or error)."""
    return outcomes.wait(signature.apply_async().id)


def alias_read_by(signature) -> str:
    state, retval = run(signature)
    assert state == "SUCCESS", retval
    return retval


@pytest.mark.replica
@pytest.mark.django_db(transaction=True, databases="__all__")
class TestWorker:
    def test_reads_after_a_write_in_a_task_go_to_the_primary(self, worker, replica):
        assert alias_read_by(read.s()) == "replica"
        assert alias_read_by(write_then_read.s(unique())) == "default"

    def test_the_next_task_reads_from_the_replica_again(self, worker, replica):
        assert alias_read_by(write_then_read.s(unique())) == "default"
        assert alias_read_by(read.s()) == "replica"
        assert alias_read_by(read.s()) == "replica"

    def test_a_task_that_raises_leaves_the_next_task_unpinned(self, worker, replica):
        state, error = run(write_then_raise.s(unique()))
        assert state == "FAILURE"
        assert isinstance(error, RuntimeError)
        assert Item.objects.using("default").count() == 1  # it wrote, then raised
        assert alias_read_by(read.s()) == "replica"

    @pytest.mark.usefixtures("handlers_disconnected")
    def test_without_the_handlers_a_write_pins_every_later_task(self, worker, replica):
        # The worker reuses one context for all tasks: what the handlers fix.
        assert alias_read_by(write_then_read.s(unique())) == "default"
        assert alias_read_by(read.s()) == "default"


@pytest.mark.replica
@pytest.mark.django_db(transaction=True, databases="__all__")
class TestEager:
    """An eager task (``apply()``, ``task_always_eager``) is a function call:
    it shares its caller's scope, so each sees the other's writes."""

    def test_an_eager_task_reads_its_callers_writes_from_the_primary(self, replica):
        Item.objects.create(name=unique())
        assert read.apply().get() == "default"

    def test_the_caller_reads_an_eager_tasks_writes_from_the_primary(self, replica):
        assert read_alias() == "replica"
        write_in_task.apply(args=[unique()]).get()
        assert read_alias() == "default"


class TestHandlers:
    class FakeTask:
        def __init__(self, is_eager: bool = False) -> None:
            self.request = Context(id=unique(), is_eager=is_eager)

    def test_each_task_gets_a_scope_and_the_previous_one_is_restored(self):
        outer = routers.current_scope()
        task = self.FakeTask()
        routers._begin_scope_on_task_prerun(task=task)
        inside = routers.current_scope()
        assert inside is not outer
        routers._end_scope_on_task_postrun(task=task)
        assert routers.current_scope() is outer

    def test_a_token_from_another_context_does_not_fail_the_task(self):
        task = self.FakeTask()
        contextvars.copy_context().run(routers._begin_scope_on_task_prerun, task=task)
        routers.current_scope()  # this context has a scope of its own
        routers._end_scope_on_task_postrun(task=task)  # no ValueError
        assert routers._scope.get() is None  # the next query starts afresh

    def test_postrun_without_prerun_does_nothing(self):
        outer = routers.current_scope()
        routers._end_scope_on_task_postrun(task=self.FakeTask())
        routers._end_scope_on_task_postrun(task=None)
        assert routers.current_scope() is outer

    def test_eager_tasks_keep_their_callers_scope(self):
        outer = routers.current_scope()
        task = self.FakeTask(is_eager=True)
        routers._begin_scope_on_task_prerun(task=task)
        assert routers.current_scope() is outer
        routers._end_scope_on_task_postrun(task=task)
        assert routers.current_scope() is outer

    def test_the_handlers_are_connected(self):
        assert routers._begin_scope_on_task_prerun in [
            receiver for _, receiver in task_prerun.receivers
        ]
        assert routers._end_scope_on_task_postrun in [
            receiver for _, receiver in task_postrun.receivers
        ]

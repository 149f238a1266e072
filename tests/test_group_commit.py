"""Group commit (chatapi/group_commit.py) with real greenlets: who runs with
whom, in what order, and that no caller is left waiting whatever a batch does."""

from __future__ import annotations

import time

import gevent
import gevent.event
import pytest
from sqlalchemy.exc import DBAPIError

from chatapi.chat import certainly_rolled_back
from chatapi.group_commit import GroupCommit


class Recorder:
    """A `run` that records its batches; while `gate` is clear, a batch blocks like a slow transaction."""

    def __init__(self) -> None:
        self.batches: list[list[object]] = []
        self.gate = gevent.event.Event()
        self.gate.set()

    def __call__(self, items: list[object]) -> list[object]:
        self.batches.append(list(items))
        self.gate.wait()
        return [BadItem(item) if isinstance(item, str) and item.startswith("bad") else item * 10 for item in items]


class BadItem(Exception):
    pass


def submitting(group: GroupCommit, items: list[object]) -> list[gevent.Greenlet]:
    greenlets = []
    for item in items:
        greenlets.append(gevent.spawn(group.submit, item))
        gevent.sleep(0)  # each reaches the queue in this order
    return greenlets


def test_a_call_that_finds_the_database_idle_runs_at_once_and_alone() -> None:
    run = Recorder()
    group = GroupCommit(run, max_in_flight=1, max_batch=64, max_wait=5)
    assert group.submit(1) == 10
    assert group.submit(2) == 20
    assert run.batches == [[1], [2]]


def test_calls_that_arrive_while_a_batch_runs_go_together_in_arrival_order() -> None:
    run = Recorder()
    group = GroupCommit(run, max_in_flight=1, max_batch=64, max_wait=5)
    run.gate.clear()
    first = submitting(group, [1])
    waiting = submitting(group, [2, 3, 4, 5])
    gevent.sleep(0.05)
    assert run.batches == [[1]], "nothing else may start while the only slot is busy"
    released = time.monotonic()
    run.gate.set()
    gevent.joinall(first + waiting, timeout=5, raise_error=True)
    assert time.monotonic() - released < 1, "the freed slot must go to the waiting calls at once, not after max_wait"
    assert run.batches == [[1], [2, 3, 4, 5]]
    assert [g.value for g in first + waiting] == [10, 20, 30, 40, 50]


def test_each_batch_s_size_is_told_as_it_starts() -> None:
    run = Recorder()
    sizes: list[int] = []
    group = GroupCommit(run, max_in_flight=1, max_batch=64, max_wait=5, on_batch=sizes.append)
    run.gate.clear()
    greenlets = submitting(group, [1, 2, 3])
    gevent.sleep(0.05)
    assert sizes == [1]
    run.gate.set()
    gevent.joinall(greenlets, timeout=5, raise_error=True)
    assert sizes == [1, 2]


def test_a_batch_holds_at_most_max_batch_calls() -> None:
    run = Recorder()
    group = GroupCommit(run, max_in_flight=1, max_batch=2, max_wait=5)
    run.gate.clear()
    greenlets = submitting(group, [1, 2, 3, 4, 5])
    gevent.sleep(0.05)
    run.gate.set()
    gevent.joinall(greenlets, timeout=5, raise_error=True)
    assert run.batches == [[1], [2, 3], [4, 5]]
    assert [g.value for g in greenlets] == [10, 20, 30, 40, 50]


def test_each_caller_gets_its_own_outcome() -> None:
    run = Recorder()
    group = GroupCommit(run, max_in_flight=1, max_batch=64, max_wait=5)
    run.gate.clear()
    greenlets = submitting(group, [1, 2, "bad", 3])
    gevent.sleep(0.05)
    run.gate.set()
    gevent.joinall(greenlets, timeout=5)
    assert run.batches == [[1], [2, "bad", 3]]
    assert [g.value for g in greenlets if g.successful()] == [10, 20, 30]
    assert isinstance(greenlets[2].exception, BadItem)


def test_a_batch_that_fails_fails_each_of_its_callers_and_the_next_batch_still_runs() -> None:
    calls: list[list[int]] = []

    def run(items: list[int]) -> list[int]:
        calls.append(items)
        if len(calls) == 1:
            gevent.sleep(0.05)
            raise ConnectionError("lost the database")
        return items

    group = GroupCommit(run, max_in_flight=1, max_batch=64, max_wait=5)
    greenlets = submitting(group, [1, 2, 3])
    gevent.joinall(greenlets, timeout=5)
    assert isinstance(greenlets[0].exception, ConnectionError)
    assert [g.value for g in greenlets[1:]] == [2, 3]
    assert gevent.spawn(group.submit, 4).get(timeout=5) == 4


def test_a_killed_leader_does_not_leave_the_others_waiting() -> None:
    first_released = gevent.event.Event()
    batches: list[list[int]] = []

    def run(items: list[int]) -> list[int]:
        batches.append(items)
        if len(batches) == 1:
            first_released.wait()
        elif len(batches) == 2:
            gevent.sleep(60)  # until its leader is killed
        return items

    group = GroupCommit(run, max_in_flight=1, max_batch=64, max_wait=5)
    (first,) = submitting(group, [1])
    second, third = submitting(group, [2, 3])
    first_released.set()
    gevent.sleep(0.05)
    assert batches == [[1], [2, 3]] and first.value == 1
    # The second batch's leader is killed while its batch runs (a worker shutting down).
    second.kill(block=True, timeout=5)
    third.join(timeout=5)
    assert isinstance(third.exception, RuntimeError), "the other caller of that batch must not wait for ever"
    assert gevent.spawn(group.submit, 4).get(timeout=5) == 4, "the slot was given back"


def test_a_stuck_batch_holds_the_others_back_only_for_max_wait() -> None:
    """A send stuck on a row lock must not stall every other send of the worker."""
    stuck = gevent.event.Event()

    def run(items: list[str]) -> list[str]:
        if "stuck" in items:
            stuck.wait()
        return items

    group = GroupCommit(run, max_in_flight=1, max_batch=64, max_wait=0.1)
    (blocked,) = submitting(group, ["stuck"])
    started = time.monotonic()
    assert gevent.spawn(group.submit, "other").get(timeout=5) == "other"
    assert 0.1 <= time.monotonic() - started < 2
    assert not blocked.ready()
    stuck.set()
    assert blocked.get(timeout=5) == "stuck"


@pytest.mark.parametrize("max_in_flight", [1, 3])
def test_many_concurrent_callers_each_get_their_own_answer(max_in_flight: int) -> None:
    def run(items: list[int]) -> list[int]:
        gevent.sleep(0.001)
        return [item * 10 for item in items]

    group = GroupCommit(run, max_in_flight=max_in_flight, max_batch=8, max_wait=5)
    greenlets = [gevent.spawn(group.submit, n) for n in range(200)]
    gevent.joinall(greenlets, timeout=10, raise_error=True)
    assert [g.value for g in greenlets] == [n * 10 for n in range(200)]


class _DriverError(Exception):
    def __init__(self, pgcode: str | None) -> None:
        super().__init__(pgcode)
        self.pgcode = pgcode


@pytest.mark.parametrize(
    ("pgcode", "rolled_back"),
    [
        ("23505", True),  # unique violation
        ("23503", True),  # foreign key violation
        ("40001", True),  # serialization failure
        ("40P01", True),  # deadlock
        ("40003", False),  # statement completion unknown: it may have committed
        ("08006", False),  # connection failure: it may have committed
        (None, False),  # no SQLSTATE at all (the connection broke)
    ],
)
def test_a_batch_is_run_again_one_by_one_only_when_certainly_rolled_back(pgcode, rolled_back) -> None:
    """Running a batch's sends again after a commit that may have happened could store them twice."""
    error = DBAPIError("SELECT chatapi_send_batch(...)", {}, _DriverError(pgcode))
    assert certainly_rolled_back(error) is rolled_back

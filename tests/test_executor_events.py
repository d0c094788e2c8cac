"""Epoch events of a task reach the coordinator's callback whatever executes the task: this process,
a worker process, or a Ray task (the same events, in order, tagged with the task's member)."""

from __future__ import annotations

import pytest

from conftest import require
from transferlab.sweep.executors import InProcessExecutor, ProcessExecutor, RayExecutor


class CountingTask:
    """A picklable task reporting three epochs of member 1, then returning its member count."""

    threads = 1

    def __call__(self, on_epoch=None):
        for epoch in range(3):
            if on_epoch is not None:
                on_epoch(1, {"epoch": epoch, "val_xent": 1.0 / (epoch + 1)})
        return ["result"]


def collect(executor) -> tuple[list, list]:
    seen: list = []
    handles = [executor.submit(CountingTask(), lambda member, record, tag=tag: seen.append((tag, member, record["epoch"])))
               for tag in ("a", "b")]
    results = []
    while handles:
        h = executor.wait_any(handles)
        handles.remove(h)
        results.append(executor.result(h))
    return seen, results


def expected() -> list:
    return [(tag, 1, e) for tag in ("a", "b") for e in range(3)]


def test_in_process_events_reach_the_callback():
    seen, results = collect(InProcessExecutor())
    assert seen == expected() and results == [["result"], ["result"]]


def test_worker_process_events_reach_the_coordinator():
    ex = ProcessExecutor(1)
    try:
        seen, results = collect(ex)
    finally:
        ex.close()
    assert sorted(seen) == expected() and results == [["result"], ["result"]]
    # each task's own events arrive in the order it sent them
    assert [e for tag, _, e in seen if tag == "a"] == [0, 1, 2]


@pytest.mark.slow
def test_ray_task_events_reach_the_coordinator(tmp_path):
    require("ray")
    import sys

    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # Ray workers cannot import this test module
    ex = RayExecutor(tmp_path, None, cpus_per_run=1, gpus_per_run=0, num_cpus=2)
    try:
        seen, results = collect(ex)
    finally:
        ex.close()
    assert sorted(seen) == expected() and results == [["result"], ["result"]]
    assert [e for tag, _, e in seen if tag == "b"] == [0, 1, 2]

"""wait_for_slot: the driver's wait for a free CPU names what holds the cluster (no Ray started)."""
import logging

import pytest

from twa_ray.runtime import tasks


@pytest.fixture
def fake_cluster(monkeypatch):
    """A cluster whose one CPU is held by a placement group for three polls, then freed."""
    import ray

    free = iter([0.0, 0.0, 0.0, 1.0])
    monkeypatch.setattr(tasks, "cluster_gpus", lambda: 0)
    monkeypatch.setattr(ray, "available_resources", lambda: {"CPU": next(free)})
    monkeypatch.setattr(ray.util, "placement_group_table", lambda: {
        "pg1": {"name": "", "state": "CREATED", "bundles": {0: {"CPU": 0.9}}},
        "pg2": {"name": "done", "state": "REMOVED", "bundles": {0: {"CPU": 1.0}}}})
    return free


def test_wait_for_slot_names_the_placement_groups_holding_resources(fake_cluster, caplog):
    with caplog.at_level(logging.WARNING, logger=tasks.__name__):
        tasks.wait_for_slot(warn_every_s=0.0, poll_s=0.0)
    assert next(fake_cluster, "drained") == "drained"  # it polled until the CPU was free
    warnings = [r.getMessage() for r in caplog.records]
    assert warnings and all("pg1 (CREATED: [{'CPU': 0.9}])" in w and "done" not in w for w in warnings)


def test_wait_for_slot_is_silent_when_a_cpu_is_free(monkeypatch, caplog):
    import ray

    monkeypatch.setattr(tasks, "cluster_gpus", lambda: 0)
    monkeypatch.setattr(ray, "available_resources", lambda: {"CPU": 2.0})
    with caplog.at_level(logging.WARNING, logger=tasks.__name__):
        tasks.wait_for_slot(warn_every_s=0.0, poll_s=0.0)
    assert not caplog.records

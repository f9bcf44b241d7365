"""CPUs per Ray Train worker: base training and TWA reserve alike, so their epochs compare."""
import ray

from twa_ray.config import config_from_dict
from twa_ray.runtime.ray_env import default_cpus_per_worker
from twa_ray.tune.search_space import trial_concurrency, trial_cpus_per_worker


def _nodes(monkeypatch, *cpus):
    monkeypatch.setattr(ray, "nodes", lambda: [{"Alive": True, "Resources": {"CPU": c}} for c in cpus])


def test_one_node_shares_its_cpus_among_the_workers(monkeypatch):
    _nodes(monkeypatch, 2.0)
    assert default_cpus_per_worker(1) == 2.0
    assert default_cpus_per_worker(2) == 1.0
    assert default_cpus_per_worker(4) == 0.5
    _nodes(monkeypatch, 7.0)
    assert default_cpus_per_worker(2) == 3.0  # whole CPUs when there are enough


def test_a_multi_node_cluster_gives_one_cpu(monkeypatch):
    _nodes(monkeypatch, 8.0, 8.0)
    assert default_cpus_per_worker(1) == 1.0


def test_tune_trials_reserve_one_cpu_per_worker_unless_set():
    cfg = config_from_dict({"tune": {"trial_cpus": 0.1}})
    assert cfg.twa.cpus_per_worker is None
    assert trial_cpus_per_worker(cfg) == 1.0
    assert trial_concurrency(cfg, 2.0, 0) == 1  # 0.1 + 1 per trial on 2 CPUs
    cfg = config_from_dict({"twa": {"cpus_per_worker": 0.9}, "tune": {"trial_cpus": 0.1}})
    assert trial_cpus_per_worker(cfg) == 0.9
    assert trial_concurrency(cfg, 2.0, 0) == 2

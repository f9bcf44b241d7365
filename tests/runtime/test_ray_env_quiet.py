"""Ray's console switches (quiet_ray, train_logging_config), checked without starting Ray."""
import logging
import os
import subprocess
import sys

import pytest

from twa_ray.runtime.ray_env import QUIET_DRIVER_ENV, QUIET_WORKER_ENV, quiet_ray, train_logging_config

CLEANER = "ray.train.v2._internal.execution.controller.placement_group_cleaner"


class FakeContext:
    gcs_address = "127.0.0.1:61234"


@pytest.fixture
def clean_env(monkeypatch):
    import ray

    for key in [*QUIET_DRIVER_ENV, *QUIET_WORKER_ENV, "TWA_RAY_VERBOSE"]:
        monkeypatch.delenv(key, raising=False)
    # the worker hooks set RAY_ADDRESS directly, from the runtime context: setenv first, so
    # that the teardown restores it as it was (a leaked one would make every later ray.init
    # join a cluster that is not there), and no Ray is started for a context here
    monkeypatch.setenv("RAY_ADDRESS", "unset-below")
    monkeypatch.delenv("RAY_ADDRESS")
    monkeypatch.setattr(ray, "get_runtime_context", lambda: FakeContext())
    yield monkeypatch


def record(name: str, level: int, msg: str) -> logging.LogRecord:
    return logging.LogRecord(name, level, __file__, 1, msg, None, None)


def test_verbose_keeps_rays_defaults(clean_env):
    kwargs = quiet_ray(verbose=True)
    assert list(kwargs["runtime_env"]) == ["worker_process_setup_hook"]  # only the address pin below
    assert all(key not in os.environ for key in [*QUIET_DRIVER_ENV, *QUIET_WORKER_ENV])
    assert train_logging_config().log_level == "INFO"


@pytest.mark.parametrize("verbose", [True, False])
def test_workers_ask_their_own_cluster(clean_env, verbose):
    """With two Ray instances on the machine, an address-less State API lookup (Train's
    placement-group cleaner) fails; every worker pins RAY_ADDRESS to its own cluster."""
    import ray

    cleaner = logging.getLogger(CLEANER)
    filters = list(cleaner.filters)
    context = logging.getLogger(os.path.join(os.path.dirname(ray.__file__), "train", "v2", "_internal",
                                             "execution", "context.py"))
    level = context.level
    try:
        quiet_ray(verbose=verbose)["runtime_env"]["worker_process_setup_hook"]()
        assert os.environ["RAY_ADDRESS"] == "127.0.0.1:61234"
        clean_env.setenv("RAY_ADDRESS", "10.0.0.1:6379")  # a cluster the job joined keeps its address
        quiet_ray(verbose=verbose)["runtime_env"]["worker_process_setup_hook"]()
        assert os.environ["RAY_ADDRESS"] == "10.0.0.1:6379"
    finally:
        cleaner.filters[:] = filters
        context.setLevel(level)


def test_quiet_sets_the_switches_and_a_worker_hook(clean_env):
    kwargs = quiet_ray(verbose=False)
    assert os.environ["RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"] == "0"
    assert os.environ["RAY_DISABLE_WORKER_LOG_PREFIX"] == "1"
    assert os.environ["RAY_DEDUP_LOGS"] == "0"  # no "[repeated 2x across cluster]" lines
    assert kwargs["runtime_env"]["env_vars"] == {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}
    assert train_logging_config().log_level == "WARNING"
    assert train_logging_config(verbose=True).log_level == "INFO"

    import ray

    cleaner = logging.getLogger(CLEANER)
    context = logging.getLogger(os.path.join(os.path.dirname(ray.__file__), "train", "v2", "_internal",
                                             "execution", "context.py"))
    filters, level = list(cleaner.filters), context.level
    try:
        kwargs["runtime_env"]["worker_process_setup_hook"]()  # what every Ray worker runs first
        state_api = record(CLEANER, logging.WARNING, "Failed to query Ray Train Controller actor state. State API ...")
        stopped = record(CLEANER, logging.WARNING, "Detected that the Ray Train controller actor (x) is dead. "
                                                   "Cleaning up placement group = [y] created by this run.")
        failed = record(CLEANER, logging.WARNING, "Failed to clean up placement group: boom")
        # a trial Tune stopped early is no news; a cleanup that failed is
        assert not cleaner.filter(state_api) and not cleaner.filter(stopped) and cleaner.filter(failed)
        assert not context.isEnabledFor(logging.INFO) and context.isEnabledFor(logging.WARNING)
    finally:
        cleaner.filters[:] = filters
        context.setLevel(level)


def test_a_users_own_setting_wins(clean_env):
    clean_env.setenv("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "1")
    kwargs = quiet_ray(verbose=False)
    assert kwargs["runtime_env"]["env_vars"] == {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "1"}


def test_the_hook_runs_where_twa_ray_cannot_be_imported(clean_env, tmp_path):
    """Ray workers of a driver started outside the checkout run the hook without twa_ray."""
    from ray import cloudpickle  # what Ray pickles the hook with; no requirement names plain cloudpickle

    hook = quiet_ray(verbose=False)["runtime_env"]["worker_process_setup_hook"]
    (tmp_path / "hook.pkl").write_bytes(cloudpickle.dumps(hook))
    script = (
        "import logging, pickle, sys\n"
        "sys.modules['twa_ray'] = None  # any import of twa_ray now fails\n"
        "pickle.load(open('hook.pkl', 'rb'))()\n"
        f"print(len(logging.getLogger({CLEANER!r}).filters))\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "1"


def test_a_local_ray_with_a_dashboard_names_its_own_api_server(clean_env):
    """A RAY_API_SERVER_ADDRESS left from an earlier local Ray names a dashboard that is gone:
    Train's placement-group cleaner then never frees a stopped trial's CPUs (the sweep hung)."""
    import ray

    from twa_ray.runtime.ray_env import init_ray

    calls = []
    clean_env.setattr(ray, "is_initialized", lambda: False)
    clean_env.setattr(ray, "init", lambda **kwargs: calls.append(kwargs))
    clean_env.setenv("RAY_API_SERVER_ADDRESS", "http://127.0.0.1:1")
    init_ray(num_cpus=1, dashboard=True)
    (kwargs,) = calls
    assert os.environ["RAY_API_SERVER_ADDRESS"] == f"http://127.0.0.1:{kwargs['dashboard_port']}"
    assert kwargs["dashboard_port"] != 1 and kwargs["include_dashboard"]

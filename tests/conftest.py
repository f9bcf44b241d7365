"""Shared fixtures: tiny models and candidates, and a local Ray."""
import contextlib
import importlib
import os

# Ray reads these when it is imported: keep every Ray test on the loopback, quiet.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "30")
# Train's controller polls its workers this often (2 s by default): a run ends, or resumes after
# a lost worker, up to that long after the fact, and the tests run many short runs
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from twa_ray.parallel.local_ranks import free_port  # noqa: E402,F401  (tests import it from here)

ROOT = Path(__file__).resolve().parents[1]  # the repository: jobs/, configs/, twa_ray/


def tiny_mlp(seed: int = 0, bn: bool = False) -> nn.Module:
    torch.manual_seed(seed)
    layers = [nn.Linear(6, 12)]
    if bn:
        layers.append(nn.BatchNorm1d(12))
    layers += [nn.ReLU(), nn.Linear(12, 8), nn.Tanh(), nn.Linear(8, 3)]
    return nn.Sequential(*layers)


class UnevenNet(nn.Module):
    """Linear(6, 5), tanh, Linear(5, 3) (times a (1,) ``gain`` when ``gain``), seeded by
    ``seed``: rows 5, 5, 3, 3 (and 1 with gain): uneven row shards, and with gain a tensor
    some ranks hold nothing of; over 2 ranks the (5, 6) weight is cut on dim 1 (3 columns
    each). Input (B, 6), output (B, 3). At module level so that the processes
    ``spawn_ranks`` starts can import it by name."""

    def __init__(self, seed: int = 0, gain: bool = True):
        super().__init__()
        torch.manual_seed(seed)
        self.hidden = nn.Linear(6, 5)
        self.out = nn.Linear(5, 3)
        self.gain = nn.Parameter(torch.ones(1)) if gain else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.out(torch.tanh(self.hidden(x)))
        return y if self.gain is None else y * self.gain


def uneven_store(folder) -> str:
    """A candidate store of five ``UnevenNet`` candidates around its initial weights (noise of
    std 0.3, seeded), the last parameter (the gain) 1.0 in all of them; returns its URI."""
    from twa_ray.core import flatten_params
    from twa_ray.store import CandidateStore

    model = UnevenNet()
    store = CandidateStore.create_for_model(str(folder), model)
    gen = torch.Generator().manual_seed(1)
    base = flatten_params(model)
    for _ in range(5):
        w = base + 0.3 * torch.randn(base.numel(), generator=gen)
        w[-1] = 1.0
        store.append_flat(w)
    return store.uri


def small_cnn_shard_twa(rank: int, world: int, bits: int, exchange: str = "sharded", **twa_kwargs):
    """Rank ``rank`` of ``world`` (a process group is up) as a blocks-mode worker: the
    planner's small CNN (Fashion-MNIST shapes, seed 0), 4 candidates around it, this rank's
    balanced range (``plan_ranges``) at ``bits``, over the ``exchange`` (``parallel.exchanges``). Returns (net, twa, comm)."""
    from twa_ray.core import TWA, flatten_params
    import torch.distributed as dist

    from twa_ray.core.blocks import make_blocks, plan_ranges
    from twa_ray.core.params import ParamLayout
    from twa_ray.core.row_shards import build_row_projection
    from twa_ray.models import build_model
    from twa_ray.parallel.exchanges import EXCHANGES

    torch.manual_seed(0)
    net = build_model("small_cnn", 10, 1, 28)
    layout = ParamLayout.from_model(net)
    cands = flatten_params(net) + 0.1 * torch.randn(4, layout.num_params)
    blocks = make_blocks(layout.numels, "tensor")
    shards = plan_ranges(blocks, bits, world)  # balanced ranges, cut through blocks, as the blocks mode's
    (l0, l1), (start, end) = shards.block_runs[rank], shards.ranges[rank]
    sizes = [0] * len(blocks)
    sizes[l0:l1] = shards.parts[rank]
    comm = EXCHANGES[exchange](shards.ranges, rank, world)

    def all_reduce_max(t):
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return t

    proj = build_row_projection(cands[:, start:end].clone(), sizes, "normalized", bits,
                                lambda t: dist.all_reduce(t) or t, all_reduce_max, block_range=(l0, l1))
    return net, TWA(net, proj, len(blocks), (l0, l1), collectives=comm, **twa_kwargs), comm


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` are skipped where torch sees no CUDA device."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (marked gpu)")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)


FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")  # where dataset-fashion-mnist installs it


def skip_or_fail_under_ci(reason: str) -> None:
    """Skip the calling test with ``reason``, except under ``CI=true``, where it fails: there
    whatever it needs must have been installed (setup_env.sh, requirements*.txt), and a silent
    skip would hide that it was not."""
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"CI=true: {reason}", pytrace=False)
    pytest.skip(reason, allow_module_level=True)  # also from a test module's top level


def require_fashion_mnist(path: Path = FASHION_MNIST) -> Path:
    """``path`` when the offline Fashion-MNIST is there, else ``skip_or_fail_under_ci``."""
    if not path.is_dir():
        skip_or_fail_under_ci(f"needs Fashion-MNIST in {path}: setup_env.sh could not install it "
                              "(apt-get install dataset-fashion-mnist)")
    return path


def require_module(name: str):
    """The module ``name`` (an optional extra: lightning, transformers), else ``skip_or_fail_under_ci``."""
    try:
        return importlib.import_module(name)
    except ImportError:
        skip_or_fail_under_ci(f"needs {name} (pip install -r requirements-extras.txt)")


@pytest.fixture
def fashion_mnist():
    """The offline Fashion-MNIST folder (``require_fashion_mnist``)."""
    return require_fashion_mnist()


@pytest.fixture(autouse=True)
def _environ_restored():
    """Every test leaves ``os.environ`` as it found it: ``init_ray`` sets variables that a later
    test's job subprocess would inherit (a stale RAY_API_SERVER_ADDRESS sends ``ray job
    submit`` and Train's placement-group cleaner to a dashboard that is gone)."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture
def mlp():
    return tiny_mlp()


def twa_batches(steps: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``steps`` global batches of 16 for ``UnevenNet`` (x (16, 6), y (16,)), cycling over 48 examples."""
    gen = torch.Generator().manual_seed(5)
    x, y = torch.randn(48, 6, generator=gen), torch.randint(0, 3, (48,), generator=gen)
    return [(x[16 * (s % 3) : 16 * (s % 3 + 1)], y[16 * (s % 3) : 16 * (s % 3 + 1)]) for s in range(steps)]


def train_twa_steps(model: nn.Module, twa, steps: int, rank: int = 0, world: int = 1) -> None:
    """``steps`` TWA steps on ``twa_batches``; each rank back-propagates its slice's share of the
    global mean loss (so the ranks' gradients sum to the one-process gradient)."""
    from twa_ray.parallel.batches import local_slice

    for x, y in twa_batches(steps):
        lo, hi = local_slice(len(x), rank, world)
        for p in model.parameters():
            p.grad = None
        (nn.functional.cross_entropy(model(x[lo:hi]), y[lo:hi], reduction="sum") / len(x)).backward()
        twa.step()


class SavesEveryStep:
    """Rank 0's candidate writer as base training has it, deciding to save every step once."""

    def __init__(self, store):
        self.store, self.saved_infos = store, []

    def info_for(self, *, kind, step, lr, metrics):
        return {"kind": kind, "step": step}

    def saved(self, index, info):
        self.saved_infos.append((index, info))


def perturbed_candidates(model: nn.Module, n: int, seed: int = 1, spread: float = 0.3) -> torch.Tensor:
    """(n, D) candidates around the model's weights."""
    from twa_ray.core import flatten_params

    gen = torch.Generator().manual_seed(seed)
    base = flatten_params(model)
    return base + spread * torch.randn(n, base.numel(), generator=gen)


def perturbed_store(cfg, uri: str, n: int = 5) -> str:
    """A candidate store at ``uri`` of ``n`` candidates for ``cfg``'s model: its initial
    weights (seed 0), perturbed a little more for each; returns the store's URI."""
    from twa_ray.data.from_config import splits_from_config
    from twa_ray.models.from_config import model_from_config
    from twa_ray.store import CandidateStore

    torch.manual_seed(0)
    model = model_from_config(cfg, splits_from_config(cfg))
    store = CandidateStore.create_for_model(uri, model)
    for _ in range(n):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.1 * torch.randn_like(p))
        store.append_model(model, {})
    return store.uri


@pytest.fixture(scope="module")
def ray_local():
    """A local Ray on 127.0.0.1 with 2 CPUs for one test module, shut down afterwards."""
    from twa_ray.runtime.ray_env import init_ray

    import ray

    saved = dict(os.environ)
    init_ray(num_cpus=2)
    yield ray
    ray.shutdown()
    os.environ.clear()
    os.environ.update(saved)


def ray_subprocess_env(**extra: str) -> dict:
    """Environment for a job subprocess that starts its own local Ray on the loopback."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    env.update(RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0", **extra)
    return env


# ---------------------------------------------------------------- a real S3 API (moto's server)

S3_ENV = {  # fake credentials: moto accepts any; no lookups of instance metadata
    "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
}


@contextlib.contextmanager
def fake_process_group(rank: int, world: int):
    """torch.distributed as rank ``rank`` of ``world`` over a fake process group (collectives
    return at once, with no data moved): FSDP2's sharding of one rank, in this one process."""
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world)
    try:
        yield
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="session")
def s3_endpoint():
    """moto's S3 server on 127.0.0.1 (a free port) for the session, stopped after: "host:port"."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.stop()


def s3_bucket(endpoint: str) -> str:
    """A new, empty bucket on ``endpoint``; its URI with the endpoint in the query
    (``s3://twa-<hex>?endpoint_override=127.0.0.1:PORT&scheme=http``), so every process that
    gets a location under it reaches the server. Needs ``S3_ENV`` in the environment."""
    import uuid

    import pyarrow.fs as pafs

    bucket = f"twa-{uuid.uuid4().hex[:12]}"
    pafs.S3FileSystem(endpoint_override=endpoint, scheme="http", allow_bucket_creation=True).create_dir(bucket)
    return f"s3://{bucket}?endpoint_override={endpoint}&scheme=http"


@pytest.fixture
def s3_uri(s3_endpoint, monkeypatch):
    """A fresh bucket on moto's server (``s3_bucket``), with ``S3_ENV`` set for this test."""
    for key, value in S3_ENV.items():
        monkeypatch.setenv(key, value)
    return s3_bucket(s3_endpoint)

"""The config's schema: one dataclass per section, the YAML keys being their fields.

Base training (``train``) and TWA (``twa``) share their optimizer fields (``OptimConfig``)
and their worker fields (``WorkersConfig``) by inheritance, so the two stages take the same
keys (``train.lr``, ``twa.lr``, ``train.workers``, ``twa.workers``); a default that differs
between them is a field declared again in the stage's class.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

SHARDINGS = ("blocks", "fsdp")  # twa.sharding, train.sharding
CANDIDATES_FROM = ("weights", "ema")  # train.candidates_from: what base training saves as each candidate
PLACEMENT_STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")  # Ray placement groups


class ConfigError(ValueError):
    """Every problem found in a config, one per line."""


@dataclass
class SyntheticConfig:
    """Generated data for tests: class-dependent patterns plus noise."""

    num_train: int = 512
    num_test: int = 256
    num_classes: int = 4
    channels: int = 1
    image_size: int = 8


@dataclass
class DataConfig:
    name: str = "fashion_mnist"
    # where datasets are read from (or downloaded to, with download); a relative root is the
    # driver's working directory's, settled absolute with the other locations (``config.locations``)
    root: str = "data"
    val_ratio: float = 0.1  # part of the training set held out: TWA-v trains on it
    augment: bool = True
    download: bool = False
    batch_size: int = 128
    eval_batch_size: int = 512
    loader_workers: int = 0
    limit_train: int | None = None  # first K training examples only (quick runs)
    limit_val: int | None = None
    limit_test: int | None = None
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)


@dataclass
class ModelConfig:
    name: str = "small_cnn"
    kwargs: dict = field(default_factory=dict)  # extra arguments of the model builder
    sync_bn: bool = False  # SyncBatchNorm across workers (TWA and base training)


@dataclass
class WorkersConfig:
    """The Ray Train workers of a stage (``train``, ``twa``)."""

    workers: int = 1
    # how the workers share the model: "blocks" or "fsdp" (FSDP2: each holds its dim-0 rows of
    # every tensor); each stage's class says what that means for it
    sharding: str = "blocks"
    use_gpu: bool | None = None  # None: use GPUs when the cluster has them
    cpus_per_worker: float | None = None  # None: a single node's CPUs shared by the workers
    max_failures: int = 2  # worker-group restarts from the latest checkpoint
    # how Ray places the workers (its placement group strategy): PACK fills a node first;
    # STRICT_SPREAD puts each worker on a different node, SPREAD does so where it can
    placement_strategy: str = "PACK"


@dataclass
class OptimConfig:
    """The optimizer and learning-rate schedule of a stage (``train``, ``twa``)."""

    epochs: int = 10  # epochs actually run
    optimizer: str = "sgd"
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    nesterov: bool = False
    schedule: str = "step"
    warmup: float = 0.0  # fraction of the budget
    label_smoothing: float = 0.0
    grad_clip: float | None = None


@dataclass
class TrainConfig(OptimConfig, WorkersConfig):
    """Base training, which saves the candidates.

    ``sharding``: "blocks" (DDP: each worker holds the whole model) or "fsdp" (FSDP2: each
    holds its dim-0 rows of every parameter, of its gradient, optimizer state and EMA, and
    writes those rows of each candidate into the store, in parallel with the others; buffers
    such as BatchNorm's statistics are replicated, rank 0's broadcast before every forward
    pass as DDP does). The candidates are the same either way.
    """

    budget_epochs: int | None = None  # the full budget the schedule is laid out for (default: epochs)
    # step schedule: fractions of the budget, or None: the paper's epochs int(0.5 * E) and
    # int(0.75 * E + 0.9) of the E = schedule_epochs budget
    milestones: list[float] | None = None
    gamma: float = 0.1
    final_lr_factor: float = 0.0  # cosine/linear end, or swa_lr / lr for the swa schedule
    swa_start: float = 1.0  # swa schedule: fraction of the budget where the constant tail starts
    save_initial: bool = True  # the initial weights are candidate 0
    save_every_steps: int | None = None  # extra candidates every k steps (besides each epoch)
    save_from_epoch: int = 0  # keep candidates from this epoch on (tail stage)
    # what each candidate holds: "weights" (the iterate at that step) or "ema" (the EMA of the
    # weights at that step, baselines.ema_decay): TWA then learns in the smoothed trajectory's span
    candidates_from: str = "weights"

    @property
    def schedule_epochs(self) -> int:
        return self.budget_epochs or self.epochs


@dataclass
class TWAConfig(OptimConfig, WorkersConfig):
    """Training the coefficients of the candidates' subspace.

    ``sharding``: "blocks" (each worker holds the whole model and the projection of a run of
    whole blocks) or "fsdp" (FSDP2: each holds its dim-0 rows of every tensor, of the model,
    its gradient and the projection; journal bases only, no select_eval).
    ``cpus_per_worker``: None: as train.cpus_per_worker (Tune sweeps: 1).
    """

    epochs: int = 2
    lr: float = 0.1
    weight_decay: float = 0.0
    schedule: str = "cosine"
    bits: int = 8
    granularity: str = "tensor"
    # normalized, orthonormal, orthonormal-global: the journal algorithm (centred, X = 0 is SWA);
    # checkpoints: the ICLR'23 one (the raw candidates' span, weight decay on the weights)
    basis: str = "normalized"
    # checkpoints basis: where X starts: "mean", "last" or K, an index into the chosen
    # candidates (into the first round's with candidates_per_round)
    start: str | int = "mean"
    data: str = "train"  # "train" (TWA-t) or "val" (TWA-v)
    # share of the val split held back to select on (Tune): TWA-v trains on the rest;
    # 0: TWA-t selects on all of val, TWA-v has no selection data
    select_ratio: float = 0.0
    # score the selection data after each TWA epoch (BatchNorm recalibration + evaluation):
    # Tune sweeps always do (it is their metric); elsewhere it only adds a curve to the
    # history, and its time counts in TWA's compute
    select_eval: bool = False
    batch_size: int | None = None  # default: data.batch_size
    candidates: str = "all"  # "all", or comma-separated first:N, last:N, stride:K
    candidates_per_round: int | None = None
    # shuffled batches (of data.eval_batch_size) BatchNorm is recalibrated on (None: all); 50 halves
    # the spread of test accuracy over calibration draws that 20 leaves, at half the cost of all
    bn_batches: int | None = 50
    max_chunk_bytes: int = 8 << 20  # temporary memory of the projection kernels
    # projection kernels: auto (native C++ on CPU where it builds, else eager), eager, native
    # or triton (CUDA; opt-in until measured on a GPU); twa_ray.core.kernels says more
    kernel: str = "auto"
    # how twa.sharding: blocks exchanges the gradient and the weights each step: auto (ring on
    # gloo, sharded elsewhere), sharded (reduce-scatter + all-gather), all_reduce or ring;
    # twa_ray.parallel.exchanges says why
    exchange: str = "auto"
    checkpoint_every_steps: int | None = None  # besides each epoch


@dataclass
class BaselinesConfig:
    """The fixed-weight baselines every main-job run reports beside TWA."""

    # EMA of the weights, updated after every base-training optimizer step (timm ModelEmaV3):
    # decay_t = min(ema_decay, 1 - (1 + t) ** (-2/3)) after t earlier updates with ema_warmup,
    # so the default (timm train.py's) also suits runs of a few hundred steps
    ema_decay: float = 0.9998
    ema_warmup: bool = True
    best_k: int = 3  # best-k: the uniform average of the k candidates with the best val accuracy


@dataclass
class EvalConfig:
    """Test-split evaluation of the main job."""

    candidates: bool = False  # also evaluate every stored candidate (the plot's test-accuracy curve)
    workers: int | None = None  # parallel evaluation tasks (None: as many as the CPUs, or GPUs, allow)


@dataclass
class ReportConfig:
    """What the run folder holds beside its fixed files."""

    # TensorBoard event files under <run_dir>/tensorboard: one run per stage (and per sweep trial)
    tensorboard: bool = False


@dataclass
class DebugConfig:
    fail_at_step: int | None = None  # one TWA worker fails once at this step (drills, tests)
    fail_at_epoch: int | None = None  # same for base training
    nan_at_step: int | None = None  # the TWA loss becomes NaN at this step (drills, tests)
    pause_at_step: int | None = None  # one TWA worker stalls once at this step, up to 10 min (interruption drills)


@dataclass
class AshaConfig:
    enabled: bool = True
    grace_period: int = 1  # epochs before a trial may be stopped
    reduction_factor: int = 2


@dataclass
class TuneConfig:
    """A Ray Tune sweep over TWA settings (jobs/tune_twa.py).

    ``space`` maps dotted config keys (e.g. ``twa.lr``, ``twa.candidates``) to one of
    ``{grid: [...]}``, ``{choice: [...]}``, ``{loguniform: [low, high]}``,
    ``{uniform: [low, high]}``.
    """

    space: dict = field(default_factory=dict)
    num_samples: int = 1  # samples of the random keys (each grid point runs this often)
    # reported each TWA epoch on data that trained nothing; None: select_<the task's metric>
    # (select_acc for image classification), and mode as the task's metric selects (max for accuracy)
    metric: str | None = None
    mode: str | None = None
    max_concurrent_trials: int | None = None  # None: as many as the CPUs (or GPUs) allow
    trial_cpus: float = 0.1  # the trial's driver function; its TWA workers take twa.cpus_per_worker
    asha: AshaConfig = field(default_factory=AshaConfig)


@dataclass
class FinetuneConfig:
    """Make fine-tuned models for a soup: pretrain once, fine-tune N copies (jobs/soup_twa.py)."""

    pretrain_epochs: int = 2
    pretrain_classes: list[int] | None = None  # pretrain on these classes only (None: all)
    num_models: int = 8
    epochs: int = 2
    lrs: list[float] = field(default_factory=lambda: [0.003, 0.01, 0.03])
    weight_decays: list[float] = field(default_factory=lambda: [0.0, 5e-4])
    augment: list[bool] = field(default_factory=lambda: [True, False])
    label_smoothing: list[float] = field(default_factory=lambda: [0.0, 0.1])
    max_concurrent: int | None = None  # fine-tuning runs at a time (None: what the CPUs allow)


@dataclass
class Config:
    """A job's whole config. Its locations (``output_dir``, ``store``, ``data.root``,
    ``storage_root``) are as written until ``config.locations.settle_locations`` makes them
    absolute, once, where a job loads its config (``cli.common.load_job_config``); then
    ``run_dir``, ``store_uri`` and ``ray_storage`` are absolute too, and stay so through
    ``config_to_dict`` / ``config_from_dict`` (a Ray worker's rebuilt config)."""

    name: str = "run"
    output_dir: str | None = None  # default runs/<name>
    # where relative output_dir and store resolve (an absolute path or a URI such as s3://bucket/prefix);
    # default: the environment variable TWA_RAY_STORAGE_ROOT; on a Ray cluster one of them is needed
    storage_root: str | None = None
    seed: int = 0
    # the model, data, loss and metrics (``twa_ray.tasks``): the built-in one, configured by
    # data: and model:, or "package.module:Class", built as Class(**task_args)
    task: str = "image_classification"
    task_args: dict = field(default_factory=dict)
    store: str | None = None  # candidate store uri; default <output_dir>/candidates
    compare_full_budget: bool = False
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    twa: TWAConfig = field(default_factory=TWAConfig)
    baselines: BaselinesConfig = field(default_factory=BaselinesConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    report: ReportConfig = field(default_factory=ReportConfig)
    debug: DebugConfig = field(default_factory=DebugConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)
    checkpoints_dir: str | None = None  # soups: a folder of fine-tuned checkpoints
    finetune: FinetuneConfig | None = None  # soups: make the fine-tuned models first

    @property
    def run_dir(self) -> str:
        """The run folder: ``output_dir``, default runs/<name>."""
        return self.output_dir or f"runs/{self.name}"

    @property
    def store_uri(self) -> str:
        """The candidate store: ``store``, default <run_dir>/candidates."""
        if self.store:
            return self.store
        return _join(self.run_dir, "candidates")

    @property
    def ray_storage(self) -> str:
        """Ray Train's storage (checkpoints of base training and TWA): <run_dir>/ray."""
        return _join(self.run_dir, "ray")


def _join(location: str, name: str) -> str:
    if "://" in location:  # a URI: Path would fold its "//"; join keeps a query at the end
        from ..store.fs import join

        return join(location, name)
    return str(Path(location) / name)

"""What the Lightning and the Hugging Face TWA callbacks share; neither framework is imported here.

A callback's life in one fit, whatever the trainer:

1. fit begins (``begin``): the cadence is checked against the run's length, and rank 0
   opens the candidate store (``CandidateStore.create_for_model``, reusing one that exists);
2. after each optimizer step or epoch (``after_step`` / ``after_epoch``) rank 0 appends
   the trainable parameters as a candidate when the cadence says so;
3. fit ends (``average``): the raw weights are kept (``raw_state_dict``, and the last
   candidate of the store), the candidates of this fit are projected, sharded across the
   trainer's own ranks exactly as the Ray job shards them (``parallel.sharding.blocks.BlocksMode``,
   over the ``twa.exchange``), the coefficients are trained on the trainer's data and loss,
   the model is left at w(X) and BatchNorm is recalibrated.

The framework modules give ``average`` a :class:`FitData`: the batches of an epoch and the
loss of a batch, computed by the trainer's own code on the *unwrapped* module. Under DDP
each rank back-propagates its own batch's loss divided by the number of ranks and TWA's
reduce-scatter sums the gradients over the ranks (section 4 of DESIGN.md: the projection's
exchange replaces DDP's all-reduce, so the averaged gradient costs no extra traffic).
"""
from __future__ import annotations

import contextlib
import itertools
import logging
import math
import re
import warnings
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterable, Mapping

import torch
import torch.distributed as dist
from torch import nn

from ..config import ConfigError, TWAConfig, check_twa_start, config_from_dict
from ..core.baselines import has_batchnorm, recalibrate_bn_with
from ..core.params import flatten_params
from ..parallel.sharding.blocks import BlocksMode
from ..store import CandidateStore

log = logging.getLogger("twa_ray.integrations")

DEFAULT_STORE_FOLDER = "twa_candidates"  # under the trainer's log / output folder
_DEFAULTS = TWAConfig()  # the callbacks' TWA defaults are the Ray job's
_FIELD_OF_ARGUMENT = {"twa_epochs": "epochs"}  # constructor argument -> TWAConfig field, where they differ
_ARGUMENT_OF_FIELD = {field: argument for argument, field in _FIELD_OF_ARGUMENT.items()}


# ---------------------------------------------------------------- arguments


def twa_settings(owner: str, arguments: Mapping[str, Any]) -> TWAConfig:
    """The TWA settings of a callback's constructor ``arguments`` (twa_epochs, lr, bits, ...),
    checked as the Ray job checks ``twa.*`` in a config; every problem is named by its
    argument in one ValueError."""
    raw = {_FIELD_OF_ARGUMENT.get(name, name): value for name, value in arguments.items()}
    try:
        return config_from_dict({"twa": raw}, where=owner).twa
    except ConfigError as exc:
        raise ValueError(f"invalid {owner} arguments:\n  " + "\n  ".join(
            _argument_names(line.strip()) for line in str(exc).splitlines()[1:])) from None


def _argument_names(message: str) -> str:
    """A config message with ``twa.<field>`` written as the callback's argument name."""
    return re.sub(r"\btwa\.(\w+)", lambda m: _ARGUMENT_OF_FIELD.get(m[1], m[1]), message)


@dataclass(frozen=True)
class Cadence:
    """When a candidate is saved: after every ``every``-th ``unit`` ("epoch" or "step")
    counted from ``start`` (units completed), i.e. when ``done >= start`` and
    ``(done - start) % every == 0`` (``done`` >= 1: the initial weights are never saved)."""

    unit: str
    every: int
    start: int

    @classmethod
    def from_arguments(cls, every_n_epochs: int | None, every_n_steps: int | None,
                       start_epoch: int | None, start_step: int | None) -> "Cadence":
        """Exactly one of ``every_n_epochs`` / ``every_n_steps`` (neither: every epoch), with
        the start of its own unit; errors name the argument."""
        if every_n_epochs is not None and every_n_steps is not None:
            raise ValueError(f"every_n_epochs={every_n_epochs} and every_n_steps={every_n_steps}: give one cadence")
        unit, every, start = (("step", every_n_steps, start_step) if every_n_steps is not None
                              else ("epoch", 1 if every_n_epochs is None else every_n_epochs, start_epoch))
        other, other_start = ("epoch", start_epoch) if unit == "step" else ("step", start_step)
        if other_start is not None:
            raise ValueError(f"start_{other}={other_start} goes with every_n_{other}s; this cadence counts "
                             f"{unit}s (use start_{unit})")
        for name, value, least in ((f"every_n_{unit}s", every, 1), (f"start_{unit}", start, 0)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < least):
                raise ValueError(f"{name}={value!r} is not an integer >= {least}")
        return cls(unit, every, start or 0)

    def due(self, done: int) -> bool:
        return done >= max(1, self.start) and (done - self.start) % self.every == 0

    def count(self, total: int) -> int:
        """Candidates saved in a run of ``total`` units."""
        first = self.start if self.start >= 1 else self.every
        return 0 if total < first else (total - first) // self.every + 1

    def describe(self) -> str:
        return f"every_n_{self.unit}s={self.every} from start_{self.unit}={self.start}"


def scalar_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The finite scalar values of ``metrics`` (numbers, one-element tensors) as floats."""
    out = {}
    for name, value in metrics.items():
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            value = value.item()
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            out[str(name)] = float(value)
    return out


def set_loader_epoch(loader: Any, epoch: int) -> None:
    """Give a loader's sampler (or the loader itself) its epoch, so that a DistributedSampler
    shuffles anew; a no-op for loaders without ``set_epoch``."""
    objects = [loader, getattr(loader, "sampler", None), getattr(getattr(loader, "batch_sampler", None), "sampler", None)]
    for obj in {id(o): o for o in objects if o is not None}.values():
        if callable(getattr(obj, "set_epoch", None)):
            obj.set_epoch(epoch)


# ---------------------------------------------------------------- ranks


@dataclass(frozen=True)
class Ranks:
    """The trainer's processes as this process sees them (torch.distributed's default group
    when ``world > 1``: the one Lightning's DDP strategy and accelerate set up)."""

    rank: int
    world: int
    device: torch.device

    def broadcast(self, value: Any) -> Any:
        """Rank 0's ``value`` on every rank (a collective)."""
        if self.world == 1:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0, device=self.device if self.device.type == "cuda" else None)
        return box[0]

    def min(self, value: int) -> int:
        """The smallest ``value`` over the ranks (a collective)."""
        if self.world == 1:
            return value
        t = torch.tensor([value], dtype=torch.int64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return int(t.item())


@dataclass
class FitData:
    """What ``average`` needs of the trainer: ``batches(epoch)`` yields this rank's items of
    one pass over its training data (its DistributedSampler shard), ``loss_of(item)`` is the
    trainer's loss of one item on the unwrapped module (None: no loss for that item), at
    most ``steps_per_epoch`` items of each pass are used."""

    ranks: Ranks
    batches: Callable[[int], Iterable]
    loss_of: Callable[[Any], torch.Tensor | None]
    steps_per_epoch: int
    step: int  # optimizer steps of the fit
    epoch: float  # epochs of the fit


@dataclass(frozen=True)
class ShardInfo:
    """This rank's part of the projection: blocks [l0, l1), coordinates [start, end) of D."""

    rank: int
    world: int
    blocks: tuple[int, int]
    coordinates: tuple[int, int]
    num_params: int
    projection_bytes: int


def _average_batchnorm_stats(model: nn.Module, comm, world: int) -> None:
    """Every rank's BatchNorm running statistics -> their mean on every rank (a collective over
    ``comm``, TWA's collectives): each rank recalibrated on its own data shard."""
    if world == 1:
        return
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.track_running_stats:
            for stat in (module.running_mean, module.running_var):
                if stat is not None:
                    stat.copy_(comm.all_reduce_sum(stat.detach().clone()) / world)


# ---------------------------------------------------------------- the callback


class TWACallbackBase:
    """The arguments, state and steps shared by ``twa_ray.integrations.lightning.TWACallback``
    and ``twa_ray.integrations.transformers.TWACallback`` (which add their framework's hooks).

    After fit: ``store_uri``, ``candidate_indices`` (this fit's candidates, the raw final
    weights last), ``raw_state_dict`` (the whole state_dict before averaging, on CPU),
    ``raw_index`` (the raw weights' candidate), ``coefficients`` (n, L), ``history`` (per
    TWA epoch: loss, lr, steps) and ``shard`` (this rank's :class:`ShardInfo`).
    """

    SOURCE = "custom"  # written into each candidate's info

    def __init__(
        self,
        *,
        every_n_epochs: int | None = None,
        every_n_steps: int | None = None,
        start_epoch: int | None = None,
        start_step: int | None = None,
        store: str | None = None,
        twa_epochs: int = _DEFAULTS.epochs,
        lr: float = _DEFAULTS.lr,
        bits: int = _DEFAULTS.bits,
        granularity: str = _DEFAULTS.granularity,
        basis: str = _DEFAULTS.basis,
        start: str | int = _DEFAULTS.start,
        optimizer: str = _DEFAULTS.optimizer,
        momentum: float = _DEFAULTS.momentum,
        weight_decay: float = _DEFAULTS.weight_decay,
        nesterov: bool = _DEFAULTS.nesterov,
        schedule: str = _DEFAULTS.schedule,
        warmup: float = _DEFAULTS.warmup,
        grad_clip: float | None = _DEFAULTS.grad_clip,
        bn_batches: int | None = _DEFAULTS.bn_batches,
        exchange: str = _DEFAULTS.exchange,
        kernel: str = _DEFAULTS.kernel,
    ) -> None:
        """
        Args:
            every_n_epochs: save a candidate after every n-th epoch, counted from
                ``start_epoch`` (epochs completed); the default cadence (n = 1).
            every_n_steps: or after every n-th optimizer step, counted from ``start_step``.
            start_epoch, start_step: where the count starts, in epochs / steps completed: a
                candidate is saved when ``done >= start`` and ``(done - start) % n == 0``
                (``done >= 1``); start_epoch=5, every_n_epochs=2 saves after epochs 5, 7, 9...
            store: the candidate store's path or URI (``s3://...``), readable by every rank;
                default ``twa_candidates`` under the trainer's log / output folder. An
                existing store is reused; TWA averages only this fit's candidates.
            twa_epochs: passes over the train dataloader that train the coefficients.
            lr, optimizer ("sgd" or "adamw"), momentum, weight_decay, nesterov, schedule
                ("cosine", "constant", "linear", "step"), warmup (a fraction), grad_clip:
                the coefficient optimizer.
            bits (1, 2, 4, 8 or 32), granularity ("tensor", "model" or "size:N"), basis
                ("normalized", "orthonormal", "orthonormal-global", "checkpoints"), start
                ("mean", "last" or an index; basis "checkpoints"): the subspace (DESIGN.md
                section 1).
            bn_batches: batches BatchNorm is recalibrated on (None: all).
            exchange, kernel: how a sharded step communicates and computes.

        Defaults and meanings are the Ray job's ``twa.*`` settings
        (``twa_ray.config.TWAConfig``). Every argument is a plain value, so LightningCLI can
        configure the callback; an invalid one raises ValueError naming it.
        """
        # the arguments as given: what transformers re-creates the callback from (ExportableState)
        self.arguments = {name: value for name, value in locals().items() if name not in ("self", "__class__")}
        super().__init__()
        owner = type(self).__name__
        self.cadence = Cadence.from_arguments(every_n_epochs, every_n_steps, start_epoch, start_step)
        if store is not None and (not isinstance(store, str) or not store):
            raise ValueError(f"store={store!r} is not a path or URI")
        self.store = store
        self.settings = twa_settings(owner, dict(
            twa_epochs=twa_epochs, lr=lr, bits=bits, granularity=granularity, basis=basis, start=start,
            optimizer=optimizer, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov,
            schedule=schedule, warmup=warmup, grad_clip=grad_clip, bn_batches=bn_batches, exchange=exchange,
            kernel=kernel))
        self._reset()

    def _reset(self) -> None:
        self.store_uri: str | None = None
        self.candidate_indices: list[int] = []
        self.raw_state_dict: dict[str, torch.Tensor] | None = None
        self.raw_index: int | None = None
        self.coefficients: torch.Tensor | None = None
        self.history: list[dict] = []
        self.shard: ShardInfo | None = None
        self._store: CandidateStore | None = None
        self._last_saved_step: int | None = None

    # ------------------------------------------------------------ fit begins

    def begin(self, model: nn.Module, location: str, rank: int) -> None:
        """A new fit: rank 0 opens (or creates) the store at ``store`` or ``location``."""
        self._reset()
        self.store_uri = self.store or location
        if rank == 0:
            self._store = CandidateStore.create_for_model(
                self.store_uri, model, meta={"source": self.SOURCE, "twa": asdict(self.settings)}, exist_ok=True)
            earlier = len(self._store.list_candidates())
            if earlier:
                log.info("%s: the store %s already holds %d candidates; TWA uses only this fit's",
                         type(self).__name__, self._store.uri, earlier)

    def check_length(self, total: int | None) -> None:
        """Fail before training when a run of ``total`` cadence units (None: unknown) leaves
        TWA fewer than 2 candidates (the cadence's, and the final weights when apart)."""
        if total is None or total < 1:
            return
        expected = self.cadence.count(total) + (0 if self.cadence.due(total) else 1)
        if expected < 2:
            raise ValueError(
                f"{type(self).__name__}: {self.cadence.describe()} saves {self.cadence.count(total)} candidate(s) in "
                f"{total} {self.cadence.unit}(s), {expected} with the final weights: TWA needs at least 2 "
                f"(lower every_n_{self.cadence.unit}s or start_{self.cadence.unit}, or train longer)")
        try:
            check_twa_start(self.settings, expected)
        except ConfigError as exc:
            raise ValueError(f"{type(self).__name__}: {_argument_names(str(exc))}") from None

    def fit_state(self) -> dict[str, Any]:
        """This fit's candidates so far, in plain values: what a framework's checkpoint keeps
        of the callback (Lightning's callback state, transformers' trainer_state.json)."""
        return {"store": self.store_uri, "candidates": list(self.candidate_indices),
                "last_saved_step": self._last_saved_step}

    def resume_fit(self, saved: Mapping[str, Any] | None) -> bool:
        """A fit resumed from a checkpoint goes on with the candidates ``saved`` (``fit_state``)
        when they are in this fit's store; returns whether it did."""
        if not saved or saved.get("store") != self.store_uri:
            return False
        self.candidate_indices = [int(i) for i in saved["candidates"]]
        self._last_saved_step = saved.get("last_saved_step")
        return True

    # ------------------------------------------------------------ during fit

    def after_step(self, model: nn.Module, rank: int, step: int, epoch: float, metrics: Callable[[], Mapping]) -> None:
        """After optimizer step ``step`` (1-based): a candidate when the step cadence is due."""
        if self.cadence.unit == "step" and self.cadence.due(step):
            self._save(model, rank, "step", step, epoch, metrics)

    def after_epoch(self, model: nn.Module, rank: int, epoch: int, step: int, metrics: Callable[[], Mapping]) -> None:
        """After epoch ``epoch`` (1-based): a candidate when the epoch cadence is due."""
        if self.cadence.unit == "epoch" and self.cadence.due(epoch):
            self._save(model, rank, "epoch", step, epoch, metrics)

    def _save(self, model: nn.Module, rank: int, kind: str, step: int, epoch: float,
              metrics: Callable[[], Mapping] = dict) -> None:
        if rank != 0 or step == self._last_saved_step:  # gradient accumulation: one step, several batches
            return
        info = {"source": self.SOURCE, "kind": kind, "step": int(step), "epoch": epoch,
                "metrics": scalar_metrics(metrics())}
        self.candidate_indices.append(self._store.append_flat(flatten_params(model), info))
        self._last_saved_step = step

    # ------------------------------------------------------------ fit ends

    def average(self, model: nn.Module, fit: FitData) -> dict | None:
        """Keep the raw weights, train the coefficients of this fit's candidates on ``fit``,
        leave ``model`` at w(X) with BatchNorm recalibrated; every rank must call it. Returns
        what to log (None when there was nothing to average: fewer than 2 candidates)."""
        ranks = fit.ranks
        self.raw_state_dict = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        if ranks.rank == 0:
            if self._last_saved_step != fit.step:
                self._save(model, 0, "final", fit.step, fit.epoch)
            self.raw_index = self.candidate_indices[-1]
        self.candidate_indices, self.raw_index = ranks.broadcast((self.candidate_indices, self.raw_index))
        owner = type(self).__name__
        if len(self.candidate_indices) < 2:
            if ranks.rank == 0:
                warnings.warn(f"{owner}: {len(self.candidate_indices)} candidate(s) in the store {self.store_uri}: TWA "
                              "needs at least 2; the model keeps its final weights", stacklevel=2)
            return None
        try:
            check_twa_start(self.settings, len(self.candidate_indices))
        except ConfigError as exc:
            raise ValueError(f"{owner}: {_argument_names(str(exc))}") from None
        store = self._store if self._store is not None else CandidateStore.open(self.store_uri)
        steps = ranks.min(fit.steps_per_epoch)  # every rank takes as many steps: each is a collective
        if steps < 1:
            raise ValueError(f"{owner}: the train dataloader has no batch on some rank; TWA needs at least one")
        was_training = model.training
        setup = BlocksMode().build_twa(model, store, self.candidate_indices, self.settings,
                                       steps * self.settings.epochs, ranks.rank, ranks.world)
        twa = setup.twa
        model.train()
        with torch.enable_grad():
            self._train(model, twa, fit, steps)
        with torch.no_grad():
            if has_batchnorm(model):
                recalibrate_bn_with(model, fit.loss_of, fit.batches(self.settings.epochs),
                                    max_batches=self.settings.bn_batches)
                _average_batchnorm_stats(model, twa.comm, ranks.world)
        model.train(was_training)
        (l0, l1), (start, end) = setup.plan.block_runs[ranks.rank], setup.plan.ranges[ranks.rank]
        self.shard = ShardInfo(ranks.rank, ranks.world, (l0, l1), (start, end), twa.layout.num_params,
                               twa.projection.nbytes)
        self.coefficients = twa.X.detach().cpu().clone()
        last = self.history[-1] if self.history else {}
        if ranks.rank == 0:
            log.info("%s: TWA of %d candidates, %d blocks over %d rank(s), %d steps: loss %s", owner,
                     len(self.candidate_indices), len(setup.blocks), ranks.world, twa.num_steps,
                     " -> ".join(f"{h['loss']:.4f}" for h in self.history))
        return {"twa_loss": last.get("loss", math.nan), "twa_steps": twa.num_steps,
                "twa_candidates": len(self.candidate_indices)}

    def _train(self, model: nn.Module, twa, fit: FitData, steps: int) -> None:
        """``twa_epochs`` passes of ``steps`` TWA steps; stops early, with the last good
        coefficients, when the loss stops being finite (on every rank at once: the
        coefficient gradient is all-reduced)."""
        world = fit.ranks.world
        for epoch in range(self.settings.epochs):
            sums = torch.zeros(2, dtype=torch.float64, device=fit.ranks.device)  # loss, batches (this rank)
            for item in itertools.islice(fit.batches(epoch), steps):
                model.zero_grad(set_to_none=True)
                loss = fit.loss_of(item)
                if loss is not None:
                    (loss / world).backward()  # TWA's reduce-scatter sums the ranks' shares
                    sums += torch.stack([loss.detach().double().reshape(()), sums.new_ones(())])
                try:
                    twa.step()
                except FloatingPointError as exc:
                    if fit.ranks.rank == 0:
                        warnings.warn(f"{type(self).__name__}: {exc}; keeping the last good coefficients", stacklevel=3)
                    model.zero_grad(set_to_none=True)
                    return
            sums = twa.comm.all_reduce_sum(sums)
            self.history.append({"epoch": epoch + 1, "loss": float(sums[0] / sums[1].clamp(min=1)),
                                 "lr": twa.lr, "steps": twa.num_steps})
        model.zero_grad(set_to_none=True)


@contextlib.contextmanager
def attribute_patched(obj: Any, **values: Any):
    """Set instance attributes of ``obj`` for the duration of the block, then remove them
    (the class's own attributes show through again)."""
    had = {name: obj.__dict__[name] for name in values if name in obj.__dict__}
    for name, value in values.items():
        setattr(obj, name, value)
    try:
        yield obj
    finally:
        for name in values:
            if name in had:
                setattr(obj, name, had[name])
            else:
                delattr(obj, name)

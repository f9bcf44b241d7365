"""TWA in a Lightning ``Trainer``: one callback saves candidates during fit and averages them at its end.

    from lightning import Trainer
    from twa_ray.integrations.lightning import TWACallback

    trainer = Trainer(max_epochs=10, callbacks=[TWACallback(every_n_epochs=1, start_epoch=5, twa_epochs=2)])
    trainer.fit(model, train_loader)       # model now holds the TWA weights, BatchNorm recalibrated
"""
from __future__ import annotations

from typing import Any, Iterator, Mapping

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy
from lightning.pytorch.utilities.combined_loader import CombinedLoader

from ..store import fs as store_fs
from ._common import DEFAULT_STORE_FOLDER, FitData, Ranks, TWACallbackBase, attribute_patched, set_loader_epoch

__all__ = ["TWACallback"]


class TWACallback(TWACallbackBase, Callback):
    """Trainable Weight Averaging for a ``LightningModule``, in the shape of Lightning's
    ``WeightAveraging`` callbacks.

    During fit, rank 0 saves the trainable parameters into a candidate store at the cadence
    (after every ``every_n_epochs`` epochs from ``start_epoch`` on, or every ``every_n_steps``
    optimizer steps from ``start_step`` on; neither: every epoch). When training ends it keeps
    the raw weights (``raw_state_dict``, and the last candidate of the store), learns the
    averaging coefficients of this fit's candidates for ``twa_epochs`` passes over the train
    dataloader with the module's own ``training_step`` loss (its return value or its
    ``["loss"]``; ``self.log`` is muted meanwhile), loads w(X) into the module and
    recalibrates BatchNorm (when there is any) on the same data. A checkpoint saved after fit
    holds the TWA weights as ``state_dict`` and the raw ones as ``twa_raw_state_dict``.

    Under DDP (``strategy="ddp"``) the projection is sharded across the trainer's ranks as in
    the Ray job (``twa_ray.parallel.sharding.blocks``): each rank holds the packed directions of
    its run of blocks, computes the loss of its own data shard, and every rank ends with the
    same weights and BatchNorm statistics (averaged over the ranks). The store must be a
    location every rank can read (default: ``<trainer.log_dir>/twa_candidates``).

    The arguments (``TWACallbackBase.__init__`` documents each) are plain values, so LightningCLI
    can configure the callback; errors name the argument at fault.

    Example::

        callback = TWACallback(every_n_epochs=1, twa_epochs=2)
        trainer = Trainer(max_epochs=4, callbacks=[callback])
        trainer.fit(model, loader)     # model: the TWA weights
        callback.coefficients          # (candidates, blocks)
        model.load_state_dict(callback.raw_state_dict)   # back to the last SGD weights
    """

    SOURCE = "lightning"

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if not isinstance(trainer.strategy, (SingleDeviceStrategy, DDPStrategy)):
            raise ValueError(f"TWACallback runs with a single-device or DDP strategy, not "
                             f"{type(trainer.strategy).__name__} (its parameters would be sharded)")
        if not pl_module.automatic_optimization:
            raise ValueError("TWACallback needs automatic optimization: with manual optimization training_step "
                             "steps the optimizer itself, so its loss cannot train the coefficients")
        location = store_fs.join(trainer.log_dir or trainer.default_root_dir, DEFAULT_STORE_FOLDER)  # every rank
        self.begin(pl_module, location, trainer.global_rank)

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.check_length(_planned_length(trainer, self.cadence.unit))

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        epoch = trainer.current_epoch + (batch_idx + 1) / max(1, trainer.num_training_batches)
        self.after_step(pl_module, trainer.global_rank, trainer.global_step, epoch, lambda: trainer.callback_metrics)

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.after_epoch(pl_module, trainer.global_rank, trainer.current_epoch + 1, trainer.global_step,
                         lambda: trainer.callback_metrics)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        steps = trainer.num_training_batches
        if steps == float("inf"):
            raise ValueError("TWACallback needs a train dataloader with a length (or limit_train_batches): "
                             "it is how many batches a TWA epoch takes")
        fit = FitData(Ranks(trainer.global_rank, trainer.world_size, pl_module.device),
                      lambda epoch: _batches(trainer, trainer.current_epoch + epoch),
                      lambda item: _training_loss(trainer, pl_module, item), int(steps),
                      trainer.global_step, trainer.current_epoch)
        mute = dict(log=_ignore, log_dict=_ignore)  # self.log is not allowed outside the fit loop's hooks
        with attribute_patched(pl_module, **mute):
            logged = self.average(pl_module, fit)
        if logged is not None:
            for logger in trainer.loggers:
                logger.log_metrics(logged, step=trainer.global_step)

    def state_dict(self) -> dict[str, Any]:
        return self.fit_state()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Resuming a fit from a checkpoint: its candidates so far (when the store is the same)."""
        self.resume_fit(state_dict)

    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        if self.raw_state_dict is not None:  # saved after fit: state_dict holds the TWA weights
            checkpoint["twa_raw_state_dict"] = self.raw_state_dict
            checkpoint["twa_coefficients"] = self.coefficients


def _ignore(*args: Any, **kwargs: Any) -> None:
    return None


def _planned_length(trainer: Trainer, unit: str) -> int | None:
    """Epochs or optimizer steps the fit will run, when the trainer knows (None otherwise)."""
    if unit == "step":
        steps = trainer.estimated_stepping_batches
        return int(steps) if steps != float("inf") else None
    limited_by_steps = trainer.max_steps is not None and trainer.max_steps >= 0
    return trainer.max_epochs if trainer.max_epochs is not None and trainer.max_epochs >= 0 and not limited_by_steps \
        else None


def _batches(trainer: Trainer, epoch: int) -> Iterator[tuple[int, Any]]:
    """(batch_idx, batch) of one pass over the train dataloader(s), as fit draws them
    (several loaders: combined as fit combines them by default, "max_size_cycle")."""
    loaders = trainer.train_dataloader
    if isinstance(loaders, (Mapping, list, tuple)):
        combined = CombinedLoader(loaders, "max_size_cycle")
        for loader in combined.flattened:
            set_loader_epoch(loader, epoch)
        for batch, batch_idx, _ in combined:
            yield batch_idx, batch
    else:
        set_loader_epoch(loaders, epoch)
        yield from enumerate(loaders)


def _training_loss(trainer: Trainer, pl_module: LightningModule, item: tuple[int, Any]) -> torch.Tensor | None:
    """``training_step``'s loss of one (batch_idx, batch), on the unwrapped module (not DDP's)."""
    batch_idx, batch = item
    batch = trainer.strategy.batch_to_device(batch)
    with trainer.strategy.precision_plugin.train_step_context():
        out = pl_module.training_step(batch, batch_idx)
    if isinstance(out, Mapping):
        out = out.get("loss")
    return out

"""TWA in a Hugging Face ``transformers.Trainer``: one callback saves candidates during training
and averages them when training ends.

    from transformers import Trainer
    from twa_ray.integrations.transformers import TWACallback

    trainer = Trainer(model, args, train_dataset=train, eval_dataset=val,
                      callbacks=[TWACallback(every_n_epochs=1, twa_epochs=2)])
    trainer.train()          # the model now holds the TWA weights
    trainer.evaluate()       # ... so this is the averaged model's eval loss
"""
from __future__ import annotations

import inspect
from typing import Any

import torch
from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_callback import ExportableState

from ..store import fs as store_fs
from ._common import DEFAULT_STORE_FOLDER, FitData, Ranks, TWACallbackBase, set_loader_epoch

__all__ = ["TWACallback"]


class TWACallback(TWACallbackBase, TrainerCallback, ExportableState):
    """Trainable Weight Averaging for a ``transformers.Trainer`` (any subclass).

    During training the main process saves the model's trainable parameters into a candidate
    store at the cadence (after every ``every_n_epochs`` epochs from ``start_epoch`` on, or
    every ``every_n_steps`` optimizer steps from ``start_step`` on; neither: every epoch).
    When training ends it keeps the raw weights (``raw_state_dict``, and the last candidate of
    the store), learns the averaging coefficients of this run's candidates for ``twa_epochs``
    passes over the Trainer's train dataloader with ``trainer.compute_loss(model, inputs)``
    (so a subclass's own loss counts), loads w(X) into the model (tied weights stay tied:
    a tied tensor is one parameter, stored once) and recalibrates BatchNorm where the model
    has any. ``trainer.evaluate()`` afterwards evaluates the averaged model; the TWA loss is
    logged (``twa_loss`` in ``trainer.state.log_history``).

    Under DDP (``torchrun``/``accelerate launch``) the projection is sharded across the
    processes as in the Ray job; every process ends with the same weights. DeepSpeed and
    FSDP (sharded parameters) are not supported.

    The arguments (``TWACallbackBase.__init__`` documents each) are plain values; errors name
    the argument at fault. Each checkpoint's trainer_state.json keeps this fit's candidates so
    far (``state``): ``trainer.train(resume_from_checkpoint=...)`` averages those and the ones
    saved after it. The default store is ``<output_dir>/twa_candidates``.
    The callback finds the Trainer it belongs to when training begins (TrainerCallback hooks
    are not given the Trainer): the one whose callbacks hold it.

    Example::

        callback = TWACallback(every_n_steps=100, start_step=1000, twa_epochs=1, lr=0.05)
        trainer = Trainer(model, args, train_dataset=train, callbacks=[callback])
        trainer.train()
        callback.coefficients, callback.history      # what TWA learned
        model.load_state_dict(callback.raw_state_dict)   # back to the last optimizer step's weights
    """

    SOURCE = "transformers"

    def state(self) -> dict[str, Any]:
        """What a checkpoint's trainer_state.json keeps of the callback (transformers'
        ``ExportableState``): its arguments, and this fit's candidates so far, which
        ``trainer.train(resume_from_checkpoint=...)`` goes on with."""
        return {"args": dict(self.arguments), "attributes": {"twa_fit": self.fit_state()}}

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                       model: torch.nn.Module | None = None, **kwargs: Any) -> None:
        self._trainer = _calling_trainer(self)
        if self._trainer.is_deepspeed_enabled or self._trainer.is_fsdp_enabled:
            raise ValueError("TWACallback does not support DeepSpeed or FSDP: their parameters are sharded")
        self.begin(model, store_fs.join(args.output_dir or ".", DEFAULT_STORE_FOLDER), args.process_index)
        if state.global_step > 0:  # resumed: the checkpoint's trainer_state.json holds this fit's candidates so far
            saved = (state.stateful_callbacks or {}).get(type(self).__name__)
            for entry in saved if isinstance(saved, list) else [saved]:
                if isinstance(entry, dict) and self.resume_fit((entry.get("attributes") or {}).get("twa_fit")):
                    break
        total = state.max_steps if self.cadence.unit == "step" else state.num_train_epochs
        self.check_length(int(total) if total and total > 0 else None)

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                    model: torch.nn.Module | None = None, **kwargs: Any) -> None:
        self.after_step(model, args.process_index, state.global_step, state.epoch or 0.0, lambda: _last_log(state))

    def on_epoch_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                     model: torch.nn.Module | None = None, **kwargs: Any) -> None:
        self.after_epoch(model, args.process_index, int(round(state.epoch or 0.0)), state.global_step,
                         lambda: _last_log(state))

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                     model: torch.nn.Module | None = None, train_dataloader: Any = None, **kwargs: Any) -> None:
        trainer = self._trainer
        loader = train_dataloader if train_dataloader is not None else trainer.get_train_dataloader()
        try:
            steps = len(loader)
        except TypeError:
            raise ValueError("TWACallback needs a train dataloader with a length: it is how many batches a TWA "
                             "epoch takes") from None
        first_epoch = int(round(state.epoch or 0.0))

        def batches(epoch: int):
            set_loader_epoch(loader, first_epoch + epoch)
            return iter(loader)

        def loss_of(batch: Any) -> torch.Tensor:
            inputs = trainer._prepare_inputs(batch)
            with trainer.compute_loss_context_manager():
                loss = trainer.compute_loss(model, dict(inputs))
            return loss.mean() if loss.dim() else loss  # one loss per device under DataParallel

        fit = FitData(Ranks(args.process_index, args.world_size, next(model.parameters()).device), batches,
                      loss_of, steps, state.global_step, state.epoch or 0.0)
        logged = self.average(model, fit)
        if logged is not None:
            trainer.log(dict(logged))


def _calling_trainer(callback: TWACallback) -> Trainer:
    """The Trainer whose callbacks hold ``callback``, found among the callers' frames."""
    frame = inspect.currentframe()
    try:
        while frame is not None:
            owner = frame.f_locals.get("self")
            if isinstance(owner, Trainer) and any(c is callback for c in owner.callback_handler.callbacks):
                return owner
            frame = frame.f_back
    finally:
        del frame
    raise RuntimeError("TWACallback: no transformers.Trainer holding this callback is training: pass it in "
                       "Trainer(callbacks=[...]) or trainer.add_callback(...)")


def _last_log(state: TrainerState) -> dict:
    return state.log_history[-1] if state.log_history else {}

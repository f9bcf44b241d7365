"""Lightning checkpoints: the ``.ckpt`` files of ``ModelCheckpoint`` (``trainer.save_checkpoint``).

On disk (lightning 2.6), e.g. ``lightning_logs/version_0/checkpoints/epoch=0-step=2.ckpt``:
one ``torch.save`` file holding a dict

    state_dict                the LightningModule's state_dict: the model's keys behind the
                              attribute that holds it ("model.0.weight" for ``self.model``)
    epoch, global_step, pytorch-lightning_version, loops, callbacks, optimizer_states,
    lr_schedulers, hparams_name, hyper_parameters, datamodule_hyper_parameters, ...
                              plain data: numbers, strings, tensors, dicts, lists

It is read with ``torch.load(weights_only=True)`` plus the plain-data classes Lightning
writes there: the arguments saved by ``save_hyperparameters()`` may be paths
(``pathlib``) or an ``argparse.Namespace``. Anything else (a class or function passed as a
hyper-parameter, an OmegaConf container) is refused with UnsafeCheckpointError naming it.
The attribute prefix is found by matching the model's parameter names
(:func:`~twa_ray.store.formats.common.find_prefix`); other attributes of the module (a loss
with weights, a teacher) are dropped. Any ``.ckpt`` file is read this way, so a plain
state_dict saved as ``.ckpt`` reads too.
"""
from __future__ import annotations

import argparse
import pathlib
from pathlib import Path

import torch

from .common import read_torch, unwrap_state_dict

SUFFIX = ".ckpt"
# the plain-data classes a real lightning 2.6 .ckpt needs beyond torch's own (found by
# reading ones written by Trainer.fit with weights_only=True): no code, only values
SAFE_GLOBALS = (pathlib.PosixPath, pathlib.PurePosixPath, pathlib.WindowsPath, pathlib.PureWindowsPath,
                argparse.Namespace)


def read_lightning(path: Path) -> dict[str, torch.Tensor]:
    """The LightningModule's state_dict of a ``.ckpt`` file (its keys still behind the attribute prefix)."""
    obj = read_torch(path, SAFE_GLOBALS, hint="A Lightning checkpoint holds only plain data unless a "
                     "hyper-parameter is an object: save such a module's hyper-parameters as plain values "
                     "(save_hyperparameters(ignore=[...])).")
    return unwrap_state_dict(obj, str(path))

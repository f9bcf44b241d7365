"""Import a folder of checkpoints made elsewhere into a candidate store.

    from twa_ray.store import import_checkpoints
    store = import_checkpoints("soups/", "runs/soup/candidates", model)   # model: the architecture

:func:`find_checkpoints` tells what the folder is and lists its candidates, in this order:

- a ``torch.distributed.checkpoint`` folder (``.metadata`` + ``*.distcp``, as sharded
  trainers such as torchtitan write them): one candidate (:mod:`.formats.dcp`);
- a Hugging Face ``save_pretrained`` / Trainer ``checkpoint-<step>/`` folder
  (``model.safetensors``, ``pytorch_model.bin`` or their sharded ``*.index.json``): one
  candidate (:mod:`.formats.hf`);
- a Trainer ``output_dir`` (``checkpoint-<step>/`` folders): one candidate each, in step
  order (a final model saved beside them is not one);
- otherwise a folder of checkpoints, one candidate per entry directly inside it:

  - a file ``*.pt``, ``*.pth``, ``*.bin`` (``torch.save``), ``*.safetensors``, or ``*.ckpt``
    (Lightning, :mod:`.formats.lightning`): the TWA paper's ``{i}.pt``, Model Soups'
    ``model_{i}.pt``, Lightning's ``epoch=0-step=100.ckpt``;
  - a subfolder that is a DCP or Hugging Face checkpoint as above, or that holds exactly one
    checkpoint file of the kinds above (a Ray Train checkpoint folder, e.g.
    ``checkpoint_000003/`` holding our ``state.pt`` + ``info.json``; not searched deeper).
    A subfolder without one is skipped with a warning; one with several is an error naming
    them. So a Ray Train run folder gives every checkpoint it kept.

A Ray Tune experiment folder is refused with a pointer to :mod:`twa_ray.tune.ray_results`
(each trial's last or best checkpoint; it needs Ray, which this package never imports).
Hidden entries (``.name``) and other files (``*.json``, logs) are ignored. Candidates are
ordered by natural sort of the entry names (``2.pt`` before ``10.pt``). A folder that
matches none of these is an error naming it.

Each file is read as a state_dict: a dict of tensors, or such a dict under the key
``state_dict``, ``model_state_dict`` or ``model`` (nested at most three deep, e.g. our
base-training ``state.pt`` = {"model": ..., "optimizer": ...}). Key prefixes
``module.`` (DDP) and ``_orig_mod.`` (torch.compile) shared by every key are removed, and
so is the prefix under which the file holds every parameter of the model (a
LightningModule's ``model.``, a DCP's ``app.model.``); keys outside it are not the model's.
A key the file omits because the model ties it to another (GPT-2's ``lm_head.weight``)
is taken from its partner.

``torch.load`` always runs with ``weights_only=True``: a file that needs arbitrary
unpickling (a pickled model object, or a payload with code) is refused with
:class:`UnsafeCheckpointError` and nothing in it runs.

The model decides what is a trainable parameter (``requires_grad``, stored) and what is
a buffer (BatchNorm statistics: ignored by the store, recomputed after averaging; a
checkpoint may omit them). Every candidate must hold every parameter, no key the model
does not know (a DCP checkpoint's other keys are not read), the model's shapes, and the
first candidate's floating dtypes; weights must be finite. Errors name the file and the key.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from ..core.params import ParamLayout, flatten_state
from .candidate_store import CandidateStore
from .formats.common import (CheckpointError, CheckpointFile, ModelKeys, UnsafeCheckpointError, match_model, natural_key,
                             read_safetensors, read_torch, unwrap_state_dict)
from .formats.dcp import find_dcp, read_dcp
from .formats.hf import find_hf, is_trainer_checkpoint, read_hf
from .formats.lightning import SUFFIX as LIGHTNING_SUFFIX, read_lightning

log = logging.getLogger(__name__)

__all__ = [
    "CHECKPOINT_SUFFIXES", "CheckpointError", "CheckpointFile", "UnsafeCheckpointError", "checkpoint_in_folder",
    "find_checkpoints", "import_checkpoints", "load_state_dict", "read_checkpoint", "unwrap_state_dict",
]

TORCH_SUFFIXES = (".pt", ".pth", ".bin")
SAFETENSORS_SUFFIX = ".safetensors"
CHECKPOINT_SUFFIXES = TORCH_SUFFIXES + (LIGHTNING_SUFFIX, SAFETENSORS_SUFFIX)
# what a Ray Tune experiment folder holds beside its trials (file names only: no Ray here)
TUNE_MARKERS = ("tuner.pkl", "experiment_state-*.json")


def _format_of(path: Path) -> str | None:
    suffix = path.suffix.lower()
    if suffix == SAFETENSORS_SUFFIX:
        return "safetensors"
    if suffix == LIGHTNING_SUFFIX:
        return "lightning"
    return "torch" if suffix in TORCH_SUFFIXES else None


def checkpoint_in_folder(folder: str | os.PathLike, entry: str | None = None) -> CheckpointFile | None:
    """The one checkpoint that ``folder`` is or holds: a DCP folder, a Hugging Face folder,
    or a folder with exactly one checkpoint file (not searched deeper); None when it holds
    none. ``entry`` names the candidate (default: the folder's name).

    Raises CheckpointError when it holds several checkpoint files.
    """
    folder = Path(folder)
    entry = folder.name if entry is None else entry
    found = find_dcp(folder, entry) or find_hf(folder, entry)
    if found is not None:
        return found
    inner = sorted((p for p in folder.iterdir() if not p.name.startswith(".") and _format_of(p) and not p.is_dir()),
                   key=lambda p: p.name)
    if len(inner) > 1:
        raise CheckpointError(f"checkpoint folder {folder} holds several checkpoint files "
                              f"{[p.name for p in inner]}; keep one per folder")
    return CheckpointFile(inner[0], entry, _format_of(inner[0])) if inner else None


def find_checkpoints(folder: str | os.PathLike) -> list[CheckpointFile]:
    """The candidates of ``folder`` (see the module docstring), in natural order of their names.

    Raises:
        FileNotFoundError / NotADirectoryError: ``folder`` is missing or a file.
        CheckpointError: it matches no format (no checkpoint in it), a subfolder holds
            several checkpoint files, or it is a Ray Tune experiment.
    """
    folder = Path(folder)
    if not folder.exists():
        raise FileNotFoundError(f"checkpoint folder {folder} does not exist")
    if not folder.is_dir():
        raise NotADirectoryError(f"checkpoint folder {folder} is not a folder")
    marker = next((m for pattern in TUNE_MARKERS for m in folder.glob(pattern)), None)
    if marker is not None:
        raise CheckpointError(f"{folder} is a Ray Tune experiment ({marker.name}): read it with "
                              "twa_ray.tune.ray_results.import_checkpoints (each trial's last or best checkpoint; "
                              "the soup job's checkpoints_dir does)")
    trainer = sorted((p for p in folder.iterdir() if is_trainer_checkpoint(p)), key=lambda p: natural_key(p.name))
    if trainer:  # a Trainer's output_dir
        return [find_hf(p, p.name) for p in trainer]
    own = find_dcp(folder, folder.name) or find_hf(folder, folder.name)
    if own is not None:
        return [own]
    found = []
    for entry in folder.iterdir():
        if entry.name.startswith("."):
            continue
        if entry.is_dir():
            ckpt = checkpoint_in_folder(entry)
            if ckpt is None:
                log.warning("skipping %s: a subfolder without a checkpoint (%s, a Hugging Face or DCP folder)",
                            entry, ", ".join(CHECKPOINT_SUFFIXES))
                continue
            found.append(ckpt)
        elif _format_of(entry):  # also a dangling link: reading it then names the path
            found.append(CheckpointFile(entry, entry.name, _format_of(entry)))
        else:
            log.debug("ignoring %s (not a checkpoint)", entry)
    if not found:
        raise CheckpointError(f"no checkpoints in {folder}: expected files {', '.join('*' + s for s in CHECKPOINT_SUFFIXES)}, "
                              "checkpoint folders holding one (Ray Train), Hugging Face folders (model.safetensors, "
                              "pytorch_model.bin, checkpoint-<step>/) or torch.distributed.checkpoint folders (.metadata)")
    return sorted(found, key=lambda c: (natural_key(c.entry), c.entry))


# ---------------------------------------------------------------- reading one candidate


def load_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read one checkpoint file (torch or Lightning with ``weights_only=True``, or safetensors)
    as a state_dict, its keys as saved.

    Raises UnsafeCheckpointError (needs arbitrary unpickling) or CheckpointError
    (unreadable, truncated, no state_dict), each naming the file.
    """
    path = Path(path)
    fmt = _format_of(path)
    if fmt is None:
        raise CheckpointError(f"{path}: unknown checkpoint type (expected {', '.join(CHECKPOINT_SUFFIXES)})")
    if fmt == "lightning":
        return read_lightning(path)
    return read_safetensors(path) if fmt == "safetensors" else unwrap_state_dict(read_torch(path), str(path))


def read_checkpoint(ckpt: CheckpointFile, model: nn.Module | ModelKeys) -> dict[str, torch.Tensor]:
    """The state_dict of one candidate with the model's keys (prefix removed, tied keys
    filled), not yet checked against the model's shapes and dtypes.

    ``model.load_state_dict(read_checkpoint(c, model))`` loads it (with ``strict=False``
    where the checkpoint omits buffers). Raises UnsafeCheckpointError / CheckpointError naming the file.
    """
    keys = model if isinstance(model, ModelKeys) else ModelKeys.of(model)
    if ckpt.format == "dcp":
        state = read_dcp(ckpt.path, keys)
    elif ckpt.format == "huggingface":
        state = read_hf(ckpt.path)
    else:
        state = load_state_dict(ckpt.path)
    return match_model(state, keys, str(ckpt.path))


# ---------------------------------------------------------------- checking against the model


def _check_state(
    state: Mapping[str, torch.Tensor], layout: ParamLayout, model_shapes: Mapping[str, tuple[int, ...]],
    source: str, reference: tuple[str, list[torch.dtype]] | None,
) -> list[torch.dtype]:
    """Raise CheckpointError naming ``source`` and the key where ``state`` does not fit; returns
    the parameters' dtypes (in layout order). ``reference`` = (first file, its dtypes)."""
    extra = [k for k in state if k not in model_shapes]
    if extra:
        raise CheckpointError(f"{source}: unexpected key {extra[0]!r} (not a parameter or buffer of the model)"
                              + (f", and {len(extra) - 1} more" if len(extra) > 1 else ""))
    for name in layout.names:
        if name not in state:
            raise CheckpointError(f"{source}: missing parameter {name!r}")
    for name, tensor in state.items():
        if tuple(tensor.shape) != tuple(model_shapes[name]):
            raise CheckpointError(f"{source}: key {name!r} has shape {list(tensor.shape)}, the model {list(model_shapes[name])}")
    dtypes = [state[name].dtype for name in layout.names]
    for name, dtype in zip(layout.names, dtypes):
        if not dtype.is_floating_point:
            raise CheckpointError(f"{source}: parameter {name!r} has dtype {dtype}, not a floating dtype")
    if reference is not None:
        first, ref_dtypes = reference
        for name, dtype, ref in zip(layout.names, dtypes, ref_dtypes):
            if dtype != ref:
                raise CheckpointError(f"{source}: parameter {name!r} has dtype {dtype}, the first candidate ({first}) {ref}")
    return dtypes


def import_checkpoints(
    folder: str | os.PathLike, store_uri: str | os.PathLike, model: nn.Module, meta: Mapping[str, Any] | None = None,
    checkpoints: Sequence[CheckpointFile] | None = None,
) -> CandidateStore:
    """Import every checkpoint of ``folder`` into a new candidate store at ``store_uri``.

    Args:
        folder: the checkpoint folder (see the module docstring for what it may hold).
        store_uri: where the new store goes (local path or pyarrow URI); must not exist.
        model: the architecture; its trainable parameters (``requires_grad``) are the
            store's columns, in ``named_parameters()`` order (D values per candidate).
        meta: extra JSON metadata of the store (e.g. the model and data config).
        checkpoints: the candidates, inside ``folder``, when another lister chose them
            (``twa_ray.tune.ray_results``: a Ray Train run's or Tune trials' checkpoints);
            default: ``find_checkpoints(folder)``.

    Returns:
        The store: candidate k (k = 0..n-1) is the k-th checkpoint in natural order, a
        (D,) float32 row; its info holds ``{"stage": "import", "source", "entry", "format"}``.
        The store meta holds ``{"import": {"folder", "entries"}}``.

    Raises:
        CheckpointError (UnsafeCheckpointError): an empty folder, an unreadable or unsafe
            file, or a candidate that does not fit (missing / extra key, shape, dtype,
            non-finite value); it names the file and key. Nothing is left at
            ``store_uri`` then.
        FileExistsError: a store exists at ``store_uri``.
    """
    folder = Path(folder).resolve()
    files = list(find_checkpoints(folder) if checkpoints is None else checkpoints)
    if not files:
        raise CheckpointError(f"no checkpoints in {folder}")
    layout = ParamLayout.from_model(model)
    keys = ModelKeys.of(model)
    store_meta = {**dict(meta or {}), "stage": "import",
                  "import": {"folder": str(folder), "entries": [c.entry for c in files]}}
    store: CandidateStore | None = None
    reference = None
    try:
        for ckpt in files:
            source = str(ckpt.path)
            state = read_checkpoint(ckpt, keys)
            dtypes = _check_state(state, layout, keys.shapes, source, reference)
            try:
                vector = flatten_state(state, layout, source)  # (D,) float32; raises on NaN / Inf
            except ValueError as exc:
                raise CheckpointError(str(exc)) from None
            if store is None:
                reference = (source, dtypes)
                store = CandidateStore.create(store_uri, layout.names, layout.shapes, dtypes, meta=store_meta)
            store.append_flat(vector, {"stage": "import", "source": os.path.relpath(ckpt.path, folder),
                                       "entry": ckpt.entry, "format": ckpt.format})
    except BaseException:
        if store is not None:  # ours, and incomplete: leave nothing half-imported behind
            store.filesystem.delete_dir(store.path)
        raise
    log.info("imported %d checkpoints from %s into %s (D=%d)", len(files), folder, store.uri, layout.num_params)
    return store

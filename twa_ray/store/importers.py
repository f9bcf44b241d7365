"""Import a folder of checkpoints made elsewhere into a candidate store.

    from twa_ray.store import import_checkpoints
    store = import_checkpoints("soups/", "runs/soup/candidates", model)   # model: the architecture

What counts as a checkpoint (one candidate each), directly inside the folder:

- a file ``*.pt``, ``*.pth``, ``*.bin``, ``*.ckpt`` (``torch.save``) or ``*.safetensors``:
  the TWA paper's ``{i}.pt``, Model Soups' ``model_{i}.pt``, Hugging Face style files;
- a subfolder (a Ray Train checkpoint folder, e.g. ``checkpoint_000003/`` holding our
  ``state.pt`` + ``info.json``): it must hold exactly one checkpoint file of the kinds
  above (not searched deeper). A subfolder without one is skipped with a warning; one
  with several is an error naming them.

Hidden entries (``.name``) and other files (``*.json``, logs) are ignored. Candidates
are ordered by natural sort of the entry names (``2.pt`` before ``10.pt``).

Each file is read as a state_dict: a dict of tensors, or such a dict under the key
``state_dict``, ``model_state_dict`` or ``model`` (nested at most three deep, e.g. our
base-training ``state.pt`` = {"model": ..., "optimizer": ...}). Key prefixes
``module.`` (DDP) and ``_orig_mod.`` (torch.compile) shared by every key are removed.

``torch.load`` always runs with ``weights_only=True``: a file that needs arbitrary
unpickling (a pickled model object, or a payload with code) is refused with
:class:`UnsafeCheckpointError` and nothing in it runs.

The model decides what is a trainable parameter (``requires_grad``, stored) and what is
a buffer (BatchNorm statistics: ignored by the store, recomputed after averaging; a
checkpoint may omit them). Every candidate must hold every parameter, no key the model
does not know, the model's shapes, and the first candidate's floating dtypes; weights
must be finite. Errors name the file and the key.
"""
from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from ..core.params import ParamLayout, flatten_state
from .candidate_store import CandidateStore

log = logging.getLogger(__name__)

__all__ = [
    "CHECKPOINT_SUFFIXES", "CheckpointError", "CheckpointFile", "UnsafeCheckpointError",
    "find_checkpoints", "import_checkpoints", "load_state_dict", "unwrap_state_dict",
]

TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
SAFETENSORS_SUFFIX = ".safetensors"
CHECKPOINT_SUFFIXES = TORCH_SUFFIXES + (SAFETENSORS_SUFFIX,)
WRAPPER_KEYS = ("state_dict", "model_state_dict", "model")
STRIP_PREFIXES = ("module.", "_orig_mod.")
_MAX_NESTING = 3


class CheckpointError(ValueError):
    """A checkpoint folder or file cannot be imported; the message names the path (and key)."""


class UnsafeCheckpointError(CheckpointError):
    """A file that ``torch.load(weights_only=True)`` refuses: it needs arbitrary unpickling."""


@dataclass(frozen=True)
class CheckpointFile:
    """One candidate of a checkpoint folder.

    Attributes:
        path: the file to read.
        entry: the folder entry it came from (the file, or its Ray Train checkpoint
            folder); candidates are ordered by this name.
        format: ``"torch"`` or ``"safetensors"``.
    """

    path: Path
    entry: str
    format: str


def natural_key(name: str) -> tuple:
    """Sort key comparing the numbers in a name as numbers: '2.pt' < '10.pt' < 'model_3.pt'."""
    parts = re.split(r"(\d+)", name)  # text, number, text, ... (always starts with text)
    return tuple(int(p) if i % 2 else p.lower() for i, p in enumerate(parts))


def _format_of(path: Path) -> str | None:
    suffix = path.suffix.lower()
    if suffix == SAFETENSORS_SUFFIX:
        return "safetensors"
    return "torch" if suffix in TORCH_SUFFIXES else None


def find_checkpoints(folder: str | os.PathLike) -> list[CheckpointFile]:
    """The checkpoints in ``folder`` (see the module docstring), in natural order of their names.

    Raises:
        FileNotFoundError / NotADirectoryError: ``folder`` is missing or a file.
        CheckpointError: no checkpoint in it, or a subfolder holds several.
    """
    folder = Path(folder)
    if not folder.exists():
        raise FileNotFoundError(f"checkpoint folder {folder} does not exist")
    if not folder.is_dir():
        raise NotADirectoryError(f"checkpoint folder {folder} is not a folder")
    found = []
    for entry in folder.iterdir():
        if entry.name.startswith("."):
            continue
        if entry.is_dir():  # a Ray Train checkpoint folder: exactly one checkpoint file inside
            inner = sorted((p for p in entry.iterdir() if not p.name.startswith(".") and _format_of(p)
                            and not p.is_dir()), key=lambda p: p.name)
            if len(inner) > 1:
                raise CheckpointError(f"checkpoint folder {entry} holds several checkpoint files "
                                      f"{[p.name for p in inner]}; keep one per folder")
            if not inner:
                log.warning("skipping %s: a subfolder without a checkpoint file (%s)", entry, ", ".join(CHECKPOINT_SUFFIXES))
                continue
            found.append(CheckpointFile(inner[0], entry.name, _format_of(inner[0])))
        elif _format_of(entry):  # also a dangling link: reading it then names the path
            found.append(CheckpointFile(entry, entry.name, _format_of(entry)))
        else:
            log.debug("ignoring %s (not a checkpoint)", entry)
    if not found:
        raise CheckpointError(f"no checkpoints in {folder}: expected files {', '.join('*' + s for s in CHECKPOINT_SUFFIXES)} "
                              "or Ray Train checkpoint folders holding one")
    return sorted(found, key=lambda c: (natural_key(c.entry), c.entry))


# ---------------------------------------------------------------- reading one file


def _read_torch(path: Path) -> Any:
    import pickle

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        detail = next((line for line in lines if "unsupported" in line.lower()), lines[0] if lines else "")
        raise UnsafeCheckpointError(
            f"{path}: refused: loading it needs arbitrary unpickling, which could run code ({detail}); "
            "only tensors and state_dicts are imported (torch.load weights_only=True). "
            "Save model.state_dict() instead of the model object."
        ) from None
    except (OSError, RuntimeError, EOFError, ValueError) as exc:
        raise CheckpointError(f"{path}: cannot read it as a torch checkpoint (unreadable, truncated or corrupt): "
                              f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from exc


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        from safetensors.torch import load_file
    except ImportError:  # pragma: no cover - safetensors is an optional dependency
        raise CheckpointError(f"{path}: reading .safetensors needs the safetensors package (pip install safetensors)") from None
    try:
        return load_file(str(path), device="cpu")
    except Exception as exc:  # SafetensorError, OSError: the file is unreadable or corrupt
        raise CheckpointError(f"{path}: cannot read it as a safetensors file (unreadable, truncated or corrupt): {exc}") from exc


def _describe(obj: Any) -> str:
    if isinstance(obj, Mapping):
        keys = list(obj)[:8]
        return f"a dict with keys {keys}{' ...' if len(obj) > 8 else ''}"
    return f"a {type(obj).__name__}"


def _strip_prefixes(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    changed = True
    while changed and state:
        changed = False
        for prefix in STRIP_PREFIXES:
            if all(k.startswith(prefix) for k in state):
                state = {k[len(prefix):]: v for k, v in state.items()}
                changed = True
    return state


def unwrap_state_dict(obj: Any, source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """The state_dict (name -> tensor) inside a loaded checkpoint object.

    Accepts a dict of tensors, or one under ``state_dict`` / ``model_state_dict`` /
    ``model`` (up to three levels), and removes a ``module.`` / ``_orig_mod.`` prefix
    shared by every key. Raises CheckpointError naming ``source`` otherwise.
    """
    for _ in range(_MAX_NESTING + 1):
        if isinstance(obj, Mapping) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            if not all(isinstance(k, str) for k in obj):
                raise CheckpointError(f"{source}: state_dict keys must be strings, got {_describe(obj)}")
            return _strip_prefixes(dict(obj))
        key = next((k for k in WRAPPER_KEYS if isinstance(obj, Mapping) and isinstance(obj.get(k), Mapping)), None)
        if key is None:
            break
        obj = obj[key]
    raise CheckpointError(f"{source}: no state_dict found: expected a dict of tensors, or one under "
                          f"{' / '.join(WRAPPER_KEYS)}; got {_describe(obj)}")


def load_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read one checkpoint file (torch with ``weights_only=True``, or safetensors) as a state_dict.

    Raises UnsafeCheckpointError (needs arbitrary unpickling) or CheckpointError
    (unreadable, truncated, no state_dict), each naming the file.
    """
    path = Path(path)
    fmt = _format_of(path)
    if fmt is None:
        raise CheckpointError(f"{path}: unknown checkpoint type (expected {', '.join(CHECKPOINT_SUFFIXES)})")
    obj = _read_safetensors(path) if fmt == "safetensors" else _read_torch(path)
    return unwrap_state_dict(obj, str(path))


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
) -> CandidateStore:
    """Import every checkpoint of ``folder`` into a new candidate store at ``store_uri``.

    Args:
        folder: the checkpoint folder (see the module docstring for what it may hold).
        store_uri: where the new store goes (local path or pyarrow URI); must not exist.
        model: the architecture; its trainable parameters (``requires_grad``) are the
            store's columns, in ``named_parameters()`` order (D values per candidate).
        meta: extra JSON metadata of the store (e.g. the model and data config).

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
    files = find_checkpoints(folder)
    layout = ParamLayout.from_model(model)
    model_shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    store_meta = {**dict(meta or {}), "stage": "import",
                  "import": {"folder": str(folder), "entries": [c.entry for c in files]}}
    store: CandidateStore | None = None
    reference = None
    try:
        for ckpt in files:
            source = str(ckpt.path)
            state = load_state_dict(ckpt.path)
            dtypes = _check_state(state, layout, model_shapes, source, reference)
            try:
                vector = flatten_state(state, layout, source)  # (D,) float32; raises on NaN / Inf
            except ValueError as exc:
                raise CheckpointError(str(exc)) from None
            if store is None:
                reference = (source, dtypes)
                store = CandidateStore.create(store_uri, layout.names, layout.shapes, dtypes, meta=store_meta)
            store.append_flat(vector, {"stage": "import", "source": str(ckpt.path.relative_to(folder)),
                                       "entry": ckpt.entry, "format": ckpt.format})
    except BaseException:
        if store is not None:  # ours, and incomplete: leave nothing half-imported behind
            store.filesystem.delete_dir(store.path)
        raise
    log.info("imported %d checkpoints from %s into %s (D=%d)", len(files), folder, store.uri, layout.num_params)
    return store

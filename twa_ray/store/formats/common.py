"""What every checkpoint format shares: its errors, one candidate (:class:`CheckpointFile`),
reading one torch file (always ``weights_only=True``) or safetensors file, finding the
state_dict inside what was loaded, and fitting a state_dict's keys to the model
(:func:`match_model`: the prefix the model's keys have in the file, tied parameters the
file stores once).
"""
from __future__ import annotations

import itertools
import logging
import pickle
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Collection, Mapping, Sequence

import torch
from torch import nn

from ...core.params import ParamLayout

log = logging.getLogger(__name__)

WRAPPER_KEYS = ("state_dict", "model_state_dict", "model")
STRIP_PREFIXES = ("module.", "_orig_mod.")
# when the model's keys sit under several prefixes of one file (a LightningModule holding
# ``model`` and an EMA copy ``ema_model``), the one whose first part is named here wins
PREFERRED_PREFIXES = ("model", "module", "net", "network", "app")
_MAX_NESTING = 3
_UNSAFE_GLOBAL = re.compile(r"GLOBAL (\S+) was not an allowed global")


class CheckpointError(ValueError):
    """A checkpoint folder or file cannot be imported; the message names the path (and key)."""


class UnsafeCheckpointError(CheckpointError):
    """A file that ``torch.load(weights_only=True)`` refuses: it needs arbitrary unpickling."""


@dataclass(frozen=True)
class CheckpointFile:
    """One candidate of a checkpoint folder.

    Attributes:
        path: what is read and named in errors: the file, or for a sharded Hugging Face
            checkpoint its index file, or for a ``torch.distributed.checkpoint`` its folder.
        entry: the folder entry it came from (the file, or its checkpoint folder); candidates
            are ordered by this name.
        format: ``"torch"``, ``"safetensors"``, ``"lightning"``, ``"huggingface"`` or ``"dcp"``.
        files: every file that is read (shards included); empty: just ``path``.
    """

    path: Path
    entry: str
    format: str
    files: tuple[Path, ...] = ()

    @property
    def all_files(self) -> tuple[Path, ...]:
        """Every file read for this candidate (to tell a changed checkpoint apart)."""
        return self.files or (self.path,)


def natural_key(name: str) -> tuple:
    """Sort key comparing the numbers in a name as numbers: '2.pt' < '10.pt' < 'model_3.pt'."""
    parts = re.split(r"(\d+)", name)  # text, number, text, ... (always starts with text)
    return tuple(int(p) if i % 2 else p.lower() for i, p in enumerate(parts))


# ---------------------------------------------------------------- reading one file


def read_torch(path: Path, allowed: Sequence[type] = (),
               hint: str = "Save model.state_dict() instead of the model object.") -> Any:
    """``torch.load(path, weights_only=True)`` on CPU, with the plain-data classes ``allowed``
    added to torch's own (tensors, dicts, lists, numbers, strings).

    Raises UnsafeCheckpointError naming the file and the class or function it would need
    (nothing of it runs), or CheckpointError for an unreadable, truncated or corrupt file.
    """
    try:
        with torch.serialization.safe_globals(list(allowed)):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        text = str(exc)
        found = _UNSAFE_GLOBAL.search(text)
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        detail = (f"it refers to {found.group(1)}" if found else
                  next((line for line in lines if "unsupported" in line.lower()), lines[0] if lines else ""))
        raise UnsafeCheckpointError(
            f"{path}: refused: loading it needs arbitrary unpickling, which could run code ({detail}); "
            f"only tensors and plain data are imported (torch.load weights_only=True). {hint}"
        ) from None
    except (OSError, RuntimeError, EOFError, ValueError) as exc:
        raise CheckpointError(f"{path}: cannot read it as a torch checkpoint (unreadable, truncated or corrupt): "
                              f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from exc


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a ``.safetensors`` file, on CPU; CheckpointError naming it if unreadable."""
    try:
        from safetensors.torch import load_file
    except ImportError:  # pragma: no cover - safetensors is a dependency (requirements.txt)
        raise CheckpointError(f"{path}: reading .safetensors needs the safetensors package (pip install safetensors)") from None
    try:
        return load_file(str(path), device="cpu")
    except Exception as exc:  # SafetensorError, OSError: the file is unreadable or corrupt
        raise CheckpointError(f"{path}: cannot read it as a safetensors file (unreadable, truncated or corrupt): {exc}") from exc


def describe(obj: Any) -> str:
    """A short description of a loaded object for error messages."""
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
                raise CheckpointError(f"{source}: state_dict keys must be strings, got {describe(obj)}")
            return _strip_prefixes(dict(obj))
        key = next((k for k in WRAPPER_KEYS if isinstance(obj, Mapping) and isinstance(obj.get(k), Mapping)), None)
        if key is None:
            break
        obj = obj[key]
    raise CheckpointError(f"{source}: no state_dict found: expected a dict of tensors, or one under "
                          f"{' / '.join(WRAPPER_KEYS)}; got {describe(obj)}")


# ---------------------------------------------------------------- fitting keys to the model


@dataclass(frozen=True)
class ModelKeys:
    """What a checkpoint's keys are matched against.

    Attributes:
        params: the trainable parameters (the store's columns), ``named_parameters()`` order;
            a tied parameter appears once, under its first name.
        shapes: every ``state_dict()`` key (parameters, tied names, buffers) -> its shape.
        ties: groups of keys that are one tensor object in the model (an output layer tied
            to the embedding); a file may store a group once, under any of its names.
    """

    params: tuple[str, ...]
    shapes: Mapping[str, tuple[int, ...]]
    ties: tuple[tuple[str, ...], ...] = ()

    @classmethod
    def of(cls, model: nn.Module) -> "ModelKeys":
        shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        groups: dict[int, list[str]] = {}
        named = itertools.chain(model.named_parameters(remove_duplicate=False),
                                model.named_buffers(remove_duplicate=False))
        for name, tensor in named:
            if name in shapes:
                groups.setdefault(id(tensor), []).append(name)
        return cls(ParamLayout.from_model(model).names, shapes, tuple(tuple(g) for g in groups.values() if len(g) > 1))

    def partners(self, name: str) -> tuple[str, ...]:
        """``name`` and the keys tied to it (just ``(name,)`` when it is not tied)."""
        return next((group for group in self.ties if name in group), (name,))


def find_prefix(names: Collection[str], keys: ModelKeys, source: str) -> str:
    """The prefix under which a checkpoint's keys ``names`` hold every parameter of the model
    ("" when they are the model's own keys; ``model.`` for a LightningModule's ``self.model``;
    ``app.model.`` for a ``torch.distributed.checkpoint`` saved as {"app": {"model": ...}}).

    A tied parameter counts as present under any of its names. Where several prefixes hold
    them all, one in PREFERRED_PREFIXES wins. Returns "" when no prefix holds them all but
    the keys match some parameters as they are (the caller's check then names the missing
    one). Raises CheckpointError naming ``source`` when the parameters are found only
    partly under a prefix, under several (ambiguous), or not at all.
    """
    names = set(names)

    def count(prefix: str) -> int:
        return sum(any(prefix + m in names for m in keys.partners(n)) for n in keys.params)

    if count("") == len(keys.params):
        return ""
    anchors = {m for n in keys.params[:8] for m in keys.partners(n)}  # the first parameters, any name
    prefixes = {k[:len(k) - len(m)] for k in names for m in anchors
                if k.endswith(m) and (len(k) == len(m) or k[len(k) - len(m) - 1] == ".")}
    full = sorted((p for p in prefixes if count(p) == len(keys.params)), key=lambda p: (len(p), p))
    if len(full) > 1:
        preferred = [p for p in full if p.split(".")[0] in PREFERRED_PREFIXES]
        if not preferred:
            raise CheckpointError(f"{source}: the model's parameters are all found under several prefixes {full}: "
                                  "ambiguous; save the one model's state_dict")
        full = preferred
    if full:
        return full[0]
    best = max(sorted(prefixes | {""}), key=count)
    if best and count(best) > count(""):
        missing = next(n for n in keys.params if not any(best + m in names for m in keys.partners(n)))
        raise CheckpointError(f"{source}: missing parameter {missing!r}: the file holds the model's other "
                              f"parameters under the prefix {best!r}, but not {best + missing!r}")
    if count("") == 0:
        sample = sorted(names)[:4]
        raise CheckpointError(f"{source}: none of its keys is a parameter of the model, under any prefix: the model "
                              f"has {keys.params[0]!r}, ...; the file {sample}{' ...' if len(names) > 4 else ''}")
    return ""


def match_model(state: Mapping[str, torch.Tensor], keys: ModelKeys, source: str) -> dict[str, torch.Tensor]:
    """``state`` with the model's keys: the prefix of :func:`find_prefix` removed (keys outside
    it are other attributes of the saved object, dropped with a log line) and each tied
    key the file omits filled from its partner."""
    prefix = find_prefix(state.keys(), keys, source)
    if prefix:
        others = [k for k in state if not k.startswith(prefix)]
        if others:
            log.info("%s: reading the keys under %r; %d other keys (e.g. %r) are not the model's", source, prefix,
                     len(others), others[0])
        state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    return fill_tied(dict(state), keys)


def fill_tied(state: dict[str, torch.Tensor], keys: ModelKeys) -> dict[str, torch.Tensor]:
    """Add each key of a tie group that ``state`` lacks, as its partner's tensor (in place)."""
    for group in keys.ties:
        present = next((name for name in group if name in state), None)
        if present is not None:
            for name in group:
                state.setdefault(name, state[present])
    return state

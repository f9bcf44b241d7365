"""Models given by their parameter shapes: a JSON file ``{name: shape}`` for the planner
(``twa_ray.planner.llama`` writes one for a Llama-like transformer).

    python -m twa_ray plan --model llama7b.json --candidates 50 --bits 2 --workers 64
"""
from __future__ import annotations

import json
import os
from typing import Sequence

__all__ = ["SHAPES_SUFFIX", "is_shapes_file", "load_shapes", "write_shapes"]

SHAPES_SUFFIX = ".json"


def is_shapes_file(model: str) -> bool:
    """True when the planner's ``--model`` names a JSON shapes file rather than a model."""
    return model.endswith(SHAPES_SUFFIX)


def load_shapes(path: str | os.PathLike) -> tuple[list[str], list[tuple[int, ...]]]:
    """Names and shapes, in file order, from a JSON object ``{"name": [d0, d1, ...], ...}``.

    Raises:
        ValueError: the file is missing or unreadable, not JSON, not an object, empty, or a
            shape is not a list of positive integers (the message names the file and the field).
    """
    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as f:
            spec = json.load(f)
    except FileNotFoundError:
        raise ValueError(f"model shapes file {path} does not exist") from None
    except OSError as exc:
        raise ValueError(f"model shapes file {path} cannot be read: {exc}") from exc
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"model shapes file {path} is not valid JSON: {exc}") from exc
    if not isinstance(spec, dict) or not spec:
        raise ValueError(f"model shapes file {path}: expected a non-empty JSON object "
                         '{"parameter name": [d0, d1, ...], ...}, got ' + type(spec).__name__)
    names, shapes = [], []
    for name, shape in spec.items():
        if not name:
            raise ValueError(f"model shapes file {path}: a parameter has an empty name")
        if not (isinstance(shape, list) and shape
                and all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape)):
            raise ValueError(f"model shapes file {path}: parameter {name!r}: shape must be a non-empty list of "
                             f"positive integers, got {json.dumps(shape)}")
        names.append(name)
        shapes.append(tuple(shape))
    return names, shapes


def write_shapes(path: str | os.PathLike, shapes: dict[str, Sequence[int]]) -> None:
    """Write ``{name: shape}`` as the JSON file :func:`load_shapes` reads."""
    with open(path, "w", encoding="utf-8") as f:
        json.dump({n: list(s) for n, s in shapes.items()}, f, indent=1)
        f.write("\n")

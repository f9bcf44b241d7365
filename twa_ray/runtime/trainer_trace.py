"""Start-up trace of Ray Train stages, for ``benchmarks/startup.py`` only: off unless the
environment variable ``TWA_RAY_STARTUP_TRACE`` names a file (set before ``ray.init``, so every
Ray worker process inherits it). Off, nothing here runs but one ``os.environ`` look-up in
``trainer.torch_trainer``.

On, every worker appends one JSON line per event to that file: ``{"event", "t" (time.time()),
"pid", "rank"}``. ``traced(loop)`` runs a stage's loop behind ``traced_loop``, which marks:

    loop_called      Ray has started the worker actors and the process group and called the loop
    imports_done     the loop's module imported (twa_ray, torchvision, ...)
    <part>_start/_done   the loop's set-up functions, timed where the loop module defines them
                     (see PARTS): data, store, native kernel build, resume, set-up as a whole
    loop_done        the loop returned

Only the standard library is imported here: unpickling ``traced_loop`` in a worker imports this
module, and its cost must not blur the import time it measures.
"""
from __future__ import annotations

import functools
import importlib
import json
import os
import time

TRACE_ENV = "TWA_RAY_STARTUP_TRACE"

# (module attribute of the loop's module, or "module:attribute" elsewhere) -> the part it is
PARTS = {
    "_setup": "setup",
    "_load_data": "data",  # base training: the task and its data
    "task_data": "data",  # TWA: the task's datasets
    "calibration_loader": "data",
    "_resume": "resume",
    "_start_round": "first_round",  # TWA: the candidates read from the store into the projection
    "CandidateStore.open": "store",
    "twa_ray.core.native:load": "native",
}


def enabled() -> bool:
    return bool(os.environ.get(TRACE_ENV))


def mark(event: str, **fields) -> None:
    """Append one event line to the trace file (nothing when tracing is off)."""
    path = os.environ.get(TRACE_ENV)
    if not path:
        return
    line = {"event": event, "t": time.time(), "pid": os.getpid(), "rank": os.environ.get("TWA_TRACE_RANK"), **fields}
    with open(path, "a") as f:  # O_APPEND: one short write per line, lines of ranks do not mix
        f.write(json.dumps(line) + "\n")


def _timed(fn, part: str):
    seen = []

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        first = not seen
        seen.append(1)
        if first:
            mark(f"{part}_start")
        try:
            return fn(*args, **kwargs)
        finally:
            if first:
                mark(f"{part}_done")

    return wrapper


def _patch(module) -> None:
    for name, part in PARTS.items():
        owner, attr = module, name
        if ":" in name:
            mod_name, attr = name.split(":")
            try:
                owner = importlib.import_module(mod_name)
            except ImportError:
                continue
        elif "." in name:
            cls_name, attr = name.split(".")
            owner = getattr(module, cls_name, None)
        fn = getattr(owner, attr, None) if owner is not None else None
        if fn is None:
            continue
        if isinstance(owner, type):  # a classmethod: rebind the plain function
            setattr(owner, attr, classmethod(_timed(fn.__func__, part)))
        else:
            setattr(owner, attr, _timed(fn, part))


def loop_called() -> None:
    """Mark that Ray called the loop, and label this worker's later events with its rank."""
    try:
        import ray.train

        os.environ["TWA_TRACE_RANK"] = str(ray.train.get_context().get_world_rank())
    except Exception:  # noqa: BLE001 - only a label
        os.environ["TWA_TRACE_RANK"] = "0"
    mark("loop_called")


def traced_loop(module: str, qualname: str, config: dict) -> None:
    """A Ray Train loop that marks its start-up and runs ``module.qualname(config)``."""
    loop_called()
    loop_module = importlib.import_module(module)
    mark("imports_done")
    _patch(loop_module)
    fn = loop_module
    for part in qualname.split("."):
        fn = getattr(fn, part)
    fn(config)
    mark("loop_done")


def traced(loop):
    """``loop`` behind ``traced_loop`` when tracing is on, else ``loop`` itself. A loop defined in
    ``__main__`` (a benchmark's empty loop) is kept: its module cannot be imported by name."""
    if not enabled() or loop.__module__ == "__main__":
        return loop
    return functools.partial(traced_loop, loop.__module__, loop.__qualname__)

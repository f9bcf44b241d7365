"""twa_ray: Trainable Weight Averaging (TWA) on Ray.

    import twa_ray
    model = twa_ray.load_model("runs/quickstart")    # a finished run's TWA model, ready to evaluate

Folders in the order the data flows (config -> base training -> candidate store ->
sharded TWA -> evaluation -> run folder): ``config`` (module), ``data`` and ``models``
(each with ``from_config``), ``core`` (TWA in plain PyTorch), ``store`` (the candidate
store), ``parallel`` (plain torch.distributed: exchanges, sharding modes), ``runtime``
(everything on Ray), ``tune``, ``pipelines`` (each job's stages), ``output`` (the run folder),
``planner``, ``cli`` (the ``twa-ray`` command).
"""

__all__ = ["load_model"]


def __getattr__(name: str):
    # ``import twa_ray`` stays light (no torch) until the loader is asked for
    if name == "load_model":
        from .output.export import load_model

        return load_model
    raise AttributeError(f"module 'twa_ray' has no attribute {name!r}")

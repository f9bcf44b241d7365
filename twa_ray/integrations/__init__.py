"""Callbacks that bring TWA into users' own trainers (DESIGN.md section 5).

- ``twa_ray.integrations.lightning.TWACallback``: a ``lightning.pytorch.Callback``;
- ``twa_ray.integrations.transformers.TWACallback``: a ``transformers.TrainerCallback``.

Both save candidates into a candidate store at a cadence during fit, learn the averaging
coefficients on the trainer's own data and loss when it ends (sharded across the trainer's
DDP ranks as in the Ray job) and leave the model at the averaged weights::

    from twa_ray.integrations.lightning import TWACallback
    Trainer(callbacks=[TWACallback(every_n_epochs=1, twa_epochs=2)])

Importing this package imports neither framework: each lives in its own submodule, which
needs its framework installed (``pip install lightning`` / ``pip install transformers``).
"""

__all__ = ["lightning", "transformers"]

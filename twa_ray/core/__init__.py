"""The TWA core: plain PyTorch, no Ray.

Public names, in the spirit of ``torch.optim.swa_utils``:

- ``TWA``: trains averaging coefficients of saved candidates in your own loop (resumable).
- ``ScheduleSpec``: the learning-rate schedule of the coefficients.
- ``recalibrate_bn``: BatchNorm statistics of an averaged model.
- ``apply_swa``: the SWA baseline (uniform average of the candidates).
- ``best_individual``, ``uniform_soup``, ``greedy_soup``: model-soup baselines.
- ``flatten_params``: a model's trainable parameters as the (D,) vector candidates are rows of.

Everything else is imported from its module: ``twa_ray.core.params`` (the parameter
vector), ``.blocks`` (granularity and shards), ``.quant`` (quantisation and packing),
``.subspace`` (center and basis), ``.projection`` (the packed projection), ``.kernels``
(its kernels, a registry of classes), ``.collectives``, ``.schedules``, ``.baselines`` and
``.soups``.

Example: three candidates of a linear model, TWA over 4-bit directions, one block per
tensor (weight and bias), so the coefficients X are (3 candidates, 2 blocks):

>>> import torch
>>> from torch import nn
>>> from twa_ray.core import TWA, flatten_params
>>> _ = torch.manual_seed(0)
>>> model = nn.Linear(4, 2)
>>> candidates = [flatten_params(model) + 0.5 * torch.randn(10) for _ in range(3)]
>>> twa = TWA.from_candidates(model, candidates, bits=4, lr=0.1)
>>> x, y = torch.randn(64, 4), torch.randint(0, 2, (64,))
>>> start = nn.functional.cross_entropy(model(x), y).item()   # at X = 0: the SWA point
>>> for _ in range(20):
...     model.zero_grad()
...     nn.functional.cross_entropy(model(x), y).backward()
...     twa.step()
>>> tuple(twa.X.shape), twa.num_steps
((3, 2), 20)
>>> nn.functional.cross_entropy(model(x), y).item() < start
True
"""
from .baselines import apply_swa, recalibrate_bn
from .params import flatten_params
from .schedules import ScheduleSpec
from .soups import best_individual, greedy_soup, uniform_soup
from .twa import TWA

__all__ = [
    "TWA",
    "ScheduleSpec",
    "recalibrate_bn",
    "apply_swa",
    "best_individual",
    "uniform_soup",
    "greedy_soup",
    "flatten_params",
]

"""The README's plain-PyTorch TWA example and the ``twa_ray.core`` docstring example run."""
import doctest
import re
from pathlib import Path

import torch

import twa_ray.core
from twa_ray.core import TWA

README = Path(__file__).resolve().parents[2] / "README.md"


def _core_example() -> str:
    """The README's core example over saved checkpoints: the one ```python block that imports
    twa_ray.core and saves twa.pt (the "Your own model" programs run in tests/test_readme_own_model.py)."""
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    core = [b for b in blocks if "from twa_ray.core import" in b and '"twa.pt"' in b]
    assert len(core) == 1, f"expected one core example saving twa.pt in README.md, found {len(core)}"
    return core[0]


def test_readme_core_example_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the example saves twa.pt in the working directory
    ns: dict = {}
    exec(compile(_core_example(), str(README), "exec"), ns)

    twa, model, loader = ns["twa"], ns["model"], ns["loader"]
    assert twa.num_steps == len(loader) > 0
    assert float(twa.X.detach().abs().sum()) > 0  # the coefficients moved away from SWA (X = 0)
    assert int(model[1].num_batches_tracked) > 0  # recalibrate_bn ran over the loader

    saved = torch.load(tmp_path / "twa.pt", weights_only=True)
    fresh = TWA.from_candidates(model, ns["checkpoints"], bits=4, granularity="tensor", lr=0.3)
    fresh.load_state_dict(saved)
    assert torch.equal(fresh.X.detach(), twa.X.detach()) and fresh.num_steps == twa.num_steps


def test_core_docstring_example_runs():
    result = doctest.testmod(twa_ray.core, raise_on_error=False, verbose=False)
    assert result.attempted > 0 and result.failed == 0

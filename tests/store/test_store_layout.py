"""The store knows element ranges, not FSDP (issue 24): no module of twa_ray.store mentions
FSDP, not even in a docstring (which ranges a rank owns is twa_ray.core.fsdp_rows'), and each
is a module of one purpose, under 500 lines."""
from __future__ import annotations

import re

import twa_ray.core.fsdp_rows as fsdp_rows
import twa_ray.store as store
from conftest import ROOT

STORE = ROOT / "twa_ray" / "store"
MAX_LINES = 500


def _sources() -> dict[str, str]:
    files = sorted(STORE.rglob("*.py"))
    assert len(files) >= 8  # the package and its modules, formats/ included
    return {str(f.relative_to(ROOT)): f.read_text(encoding="utf-8") for f in files}


def test_the_store_has_no_mention_of_fsdp():
    hits = [f"{path}:{i}: {line.strip()}" for path, text in _sources().items()
            for i, line in enumerate(text.splitlines(), 1) if re.search("fsdp", line, re.IGNORECASE)]
    assert not hits, "twa_ray.store knows element ranges, not FSDP:\n" + "\n".join(hits)
    assert not [name for name in store.__all__ if "fsdp" in name.lower()]
    assert not [name for name in dir(store.CandidateStore) if "fsdp" in name.lower()]


def test_each_store_module_is_under_500_lines():
    lengths = {path: len(text.splitlines()) for path, text in _sources().items()}
    assert all(n <= MAX_LINES for n in lengths.values()), {p: n for p, n in lengths.items() if n > MAX_LINES}


def test_the_fsdp_row_maths_is_in_core():
    assert {"fsdp_shard", "fsdp_shard_dim", "fsdp_padded_numel", "fsdp_row_range", "fsdp_element_ranges",
            "FsdpShard"} <= set(fsdp_rows.__all__)
    assert fsdp_rows.fsdp_element_ranges([(5, 2, 3), (1,)], 0, 1) == [[(0, 30)], [(0, 1)]]

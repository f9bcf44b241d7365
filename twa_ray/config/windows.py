"""The candidate-window grammar of ``twa.candidates``: which stored candidates TWA trains on.

    "all"                      every candidate
    "first:N", "last:N"        the first / last N
    "stride:K"                 every K-th
    "first:4,last:3,stride:2"  combined, in this order: first, then last, then stride
"""
from __future__ import annotations

from ..core.subspace import check_start
from .schema import ConfigError, TWAConfig


def parse_candidates(spec: str) -> dict[str, int]:
    """'all' | 'first:N,last:M,stride:K' -> {'first': N, ...}; raises ValueError naming spec."""
    if spec == "all":
        return {}
    out: dict[str, int] = {}
    for part in spec.split(","):
        key, _, value = part.strip().partition(":")
        if key not in ("first", "last", "stride") or key in out or not value.strip().isdigit() or int(value) < 1:
            raise ValueError(f"candidates {spec!r}: expected 'all' or comma-separated first:N, last:N, stride:K (N, K >= 1)")
        out[key] = int(value)
    return out


def max_selected(spec: str) -> int | None:
    """The most candidates ``spec`` can select whatever the store holds (None: no bound)."""
    window = parse_candidates(spec)
    bound = min([window[k] for k in ("first", "last") if k in window], default=None)
    return None if bound is None else -(-bound // window.get("stride", 1))


def select_candidates(spec: str, count: int) -> list[int]:
    """Indices of the candidates ``spec`` keeps out of ``count``: first N, then last M, then every K-th."""
    window = parse_candidates(spec)
    idx = list(range(count))
    if "first" in window:
        idx = idx[: window["first"]]
    if "last" in window:
        idx = idx[-window["last"] :]
    return idx[:: window.get("stride", 1)]


def check_twa_start(twa: TWAConfig, count: int) -> None:
    """Raise ConfigError naming twa.start when it is no index into the ``count`` chosen
    candidates (the first round's, with twa.candidates_per_round)."""
    first_round = min(count, twa.candidates_per_round or count)
    try:
        check_start(twa.start, first_round)
    except ValueError as exc:
        where = " of the first round (twa.candidates_per_round)" if first_round < count else ""
        raise ConfigError(f"twa.start: {exc}{where}") from None

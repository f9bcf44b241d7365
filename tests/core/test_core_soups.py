"""Model-soup baselines: best individual, uniform soup, greedy soup, and the BatchNorm-aware scorer."""
from __future__ import annotations

import itertools
import random

import pytest
import torch

from conftest import tiny_mlp
from twa_ray.core import best_individual, flatten_params, greedy_soup, uniform_soup
from twa_ray.core.params import assign_flat
from twa_ray.core.soups import individual_scores, weights_scorer


def _one_hot_candidates(n: int) -> torch.Tensor:
    """Candidate i = e_i (n, n): the mean of a subset S is 1/|S| on S, so S can be read back."""
    return torch.eye(n)


def _table_score(table: dict[frozenset, float], calls: list | None = None):
    """score(w) = table[support of w]: any accuracy for any subset, as hand-made as we like."""
    def score(w: torch.Tensor) -> float:
        members = frozenset(int(i) for i in torch.nonzero(w > 0).flatten())
        assert torch.allclose(w[list(members)], torch.full((len(members),), 1.0 / len(members)))  # an equal-weight mean
        if calls is not None:
            calls.append(members)
        return table[members]
    return score


def _brute_force_greedy(n: int, table: dict[frozenset, float]) -> list[int]:
    """The greedy soup predicted from the table of every subset's score (no averaging involved)."""
    order = sorted(range(n), key=lambda i: (-table[frozenset([i])], i))
    soup = [order[0]]
    for i in order[1:]:
        if table[frozenset(soup + [i])] >= table[frozenset(soup)]:
            soup.append(i)
    return soup


def _all_subsets(n: int):
    return (frozenset(c) for k in range(1, n + 1) for c in itertools.combinations(range(n), k))


def test_greedy_soup_on_hand_made_candidates():
    # 4 models: individually 0.70, 0.80, 0.75, 0.60. {1,2} helps (0.82), adding 0 would
    # drop (0.81), adding 3 ties (0.82: "does not drop" keeps it).
    table = {s: 0.0 for s in _all_subsets(4)}
    table.update({frozenset([0]): 0.70, frozenset([1]): 0.80, frozenset([2]): 0.75, frozenset([3]): 0.60,
                  frozenset([1, 2]): 0.82, frozenset([0, 1, 2]): 0.81, frozenset([1, 2, 3]): 0.82})
    calls: list = []
    soup = greedy_soup(_one_hot_candidates(4), _table_score(table, calls))
    assert soup.members == [1, 2, 3] == _brute_force_greedy(4, table)
    assert soup.score == 0.82
    torch.testing.assert_close(soup.weights, torch.tensor([0, 1, 1, 1]) / 3.0)
    assert [(t["candidate"], t["added"]) for t in soup.trace] == [(2, True), (0, False), (3, True)]
    assert len(calls) == 4 + 3  # n individual scores, then n - 1 trial soups


@pytest.mark.parametrize("seed", range(20))
def test_greedy_soup_matches_brute_force_on_random_tables(seed):
    rng = random.Random(seed)
    n = rng.randint(2, 6)
    # coarse accuracies make ties common (ties in the ranking and "does not drop")
    table = {s: rng.choice([0.5, 0.6, 0.7, 0.8, 0.9]) for s in _all_subsets(n)}
    candidates = _one_hot_candidates(n)
    score = _table_score(table)
    soup = greedy_soup(candidates, score)
    assert soup.members == _brute_force_greedy(n, table)
    assert soup.score == table[frozenset(soup.members)]
    best = best_individual(candidates, score)
    assert soup.score >= best.score  # the greedy soup starts from the best model and never drops
    assert best.members == [max(range(n), key=lambda i: (table[frozenset([i])], -i))]
    # passing known scores gives the same soup without re-scoring the individuals
    calls: list = []
    again = greedy_soup(candidates, _table_score(table, calls), scores=individual_scores(candidates, score))
    assert again.members == soup.members and len(calls) == n - 1


def test_best_individual_and_uniform_soup():
    candidates = torch.tensor([[1.0, 0.0], [3.0, 2.0], [2.0, 4.0]])
    best = best_individual(candidates, scores=[0.5, 0.9, 0.9])  # a tie: the first one
    assert best.members == [1] and best.score == 0.9
    torch.testing.assert_close(best.weights, candidates[1])
    uniform = uniform_soup(candidates)
    torch.testing.assert_close(uniform.weights, torch.tensor([2.0, 2.0]))
    assert uniform.members == [0, 1, 2] and uniform.score is None
    assert uniform_soup(candidates, lambda w: float(w.sum())).score == 4.0


def test_bad_inputs():
    with pytest.raises(ValueError, match=r"\(n, D\)"):
        greedy_soup(torch.zeros(0, 3), lambda w: 1.0)
    with pytest.raises(ValueError, match="held-out score of candidate 1 is nan"):
        individual_scores(torch.eye(2), lambda w: float("nan") if w[1] > 0 else 1.0)
    with pytest.raises(ValueError, match="got 1 scores for 2 candidates"):
        best_individual(torch.eye(2), scores=[1.0])
    with pytest.raises(ValueError, match="pass score"):
        best_individual(torch.eye(2))


def test_scorer_recalibrates_batchnorm_for_each_weight_vector():
    model = tiny_mlp(bn=True)
    gen = torch.Generator().manual_seed(0)
    batches = [(torch.randn(16, 6, generator=gen) * 3 + 1, torch.zeros(16, dtype=torch.long)) for _ in range(3)]
    seen = []
    score = weights_scorer(model, lambda m: seen.append((m[1].running_mean.clone(), m[1].running_var.clone())) or 0.0,
                           bn_data=batches)
    w = flatten_params(model)
    for weights in (w, 2 * w):  # other weights, other statistics: recomputed, never carried over
        score(weights)
        reference = tiny_mlp(bn=True)
        assign_flat(reference, weights)
        torch.optim.swa_utils.update_bn(batches, reference)
        torch.testing.assert_close(seen[-1][0], reference[1].running_mean)
        torch.testing.assert_close(seen[-1][1], reference[1].running_var)
    assert not torch.allclose(seen[0][0], seen[1][0])
    with pytest.raises(ValueError, match="pass bn_data"):
        weights_scorer(tiny_mlp(bn=True), lambda m: 0.0)
    plain = tiny_mlp()
    assert weights_scorer(plain, lambda m: 1.5)(flatten_params(plain)) == 1.5  # no BatchNorm: no data needed

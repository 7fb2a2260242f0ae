"""Tests of the speedup read off plain's interpolated accuracy-vs-budget curve."""

import pytest

from tract_experiment import speedup as speedup_lib
from tract_experiment.speedup import BELOW, BEYOND, INTERPOLATED, crossing, speedup_at

BUDGETS = (1, 2, 3)


@pytest.mark.parametrize('accuracies, target, kind, budget', [
    ((0.80, 0.84, 0.86), 0.82, INTERPOLATED, 1.5),
    ((0.80, 0.84, 0.86), 0.85, INTERPOLATED, 2.5),
    ((0.80, 0.84, 0.86), 0.84, INTERPOLATED, 2.0),   # exactly at a budget
    ((0.80, 0.84, 0.86), 0.80, INTERPOLATED, 1.0),   # exactly the first budget
    ((0.80, 0.84, 0.86), 0.86, INTERPOLATED, 3.0),   # exactly the last budget
    ((0.80, 0.84, 0.86), 0.79, BELOW, 1.0),          # below the smallest budget
    ((0.80, 0.84, 0.86), 0.87, BEYOND, 3.0),         # beyond the last budget
    ((0.80, 0.86, 0.84), 0.85, INTERPOLATED, 1 + 5 / 6),  # the first crossing counts
    ((0.80, 0.86, 0.84), 0.87, BEYOND, 3.0),         # above the peak: no crossing
    ((0.84, 0.82, 0.86), 0.85, INTERPOLATED, 2.75),  # dips, then crosses
])
def test_crossing(accuracies, target, kind, budget):
  result = crossing(BUDGETS, accuracies, target)
  assert result.kind == kind
  assert result.budget == pytest.approx(budget)


def test_crossing_uneven_budgets():
  assert crossing((1, 2, 4, 8), (0.7, 0.8, 0.9, 0.95), 0.85).budget == pytest.approx(3.0)


@pytest.mark.parametrize('budgets, accuracies, message', [
    ((), (), 'non-empty'),
    ((1, 2), (0.8,), 'matching'),
    ((2, 1), (0.8, 0.9), 'budgets must increase'),
])
def test_crossing_rejects_bad_input(budgets, accuracies, message):
  with pytest.raises(ValueError, match=message):
    crossing(budgets, accuracies, 0.85)


PLAIN = {0: (0.80, 0.84, 0.86), 1: (0.81, 0.85, 0.87), 2: (0.79, 0.83, 0.85)}


def test_speedup_per_seed_and_on_the_means():
  result = speedup_at(1, BUDGETS, PLAIN, {0: 0.84, 1: 0.86, 2: 0.83})
  # Per seed: plain@2 (2x), plain@2.5 (2.5x), plain@2 (2x).
  assert [e['factor'] for e in result['per_seed']] == pytest.approx([2.0, 2.5, 2.0])
  assert result['factor_mean'] == pytest.approx(13 / 6)
  assert result['factor_std'] == pytest.approx(0.288675, abs=1e-6)
  # Mean curves: plain (0.80, 0.84, 0.86), TrAct 0.8433 -> plain@2.1667.
  assert result['kind'] == INTERPOLATED
  assert result['plain_budget'] == pytest.approx(13 / 6)
  assert result['factor'] == pytest.approx(13 / 6) and result['bound'] is None
  assert result['verdict'] == 'beyond seed noise'
  assert result['seeds'] == 3 and result['seeds_interpolated'] == 3
  assert result['text'] == ('TrAct@1 ep (0.8433) matches plain@2.17 ep: 2.17x; per seed '
                            '2.17x +- 0.29 (3/3 seeds interpolated); beyond seed noise.')


def test_speedup_within_seed_noise():
  result = speedup_at(1, BUDGETS, PLAIN, {0: 0.79, 1: 0.83, 2: 0.80},
                      label='TrAct rel-lam')
  assert result['per_seed'][0]['kind'] == BELOW
  assert result['verdict'] == 'noise unknown (not every seed interpolates)'
  # Factors 0.875, 1.25, 1.25: |mean - 1| = 0.125, two standard errors 0.25.
  result = speedup_at(2, BUDGETS, PLAIN, {0: 0.83, 1: 0.86, 2: 0.84})
  assert [e['factor'] for e in result['per_seed']] == pytest.approx([0.875, 1.25, 1.25])
  assert result['verdict'] == 'within seed noise'
  assert 'within seed noise' in result['text']


def test_beyond_the_last_budget_is_a_bound_never_an_extrapolation():
  result = speedup_at(2, BUDGETS, PLAIN, {0: 0.90, 1: 0.91, 2: 0.89})
  assert result['kind'] == BEYOND and result['factor'] is None and result['plain_budget'] is None
  assert result['bound'] == pytest.approx(1.5)
  assert result['factor_mean'] is None and result['seeds_interpolated'] == 0
  assert all(e['kind'] == BEYOND and e['factor'] is None and e['bound'] == pytest.approx(1.5)
             for e in result['per_seed'])
  assert result['text'] == (
      'TrAct@2 ep (0.9000) exceeds plain at every budget run (up to 3 ep): '
      '> 1.50x (not extrapolated); no seed interpolates (every seed is beyond the budgets '
      'run); noise unknown (not every seed interpolates).')


def test_below_the_first_budget_is_a_bound():
  result = speedup_at(2, BUDGETS, PLAIN, {0: 0.70, 1: 0.70, 2: 0.70})
  assert result['kind'] == BELOW and result['factor'] is None
  assert result['bound'] == pytest.approx(0.5)
  assert result['text'].startswith(
      "TrAct@2 ep (0.7000) is below plain@1 ep, plain's smallest budget: < 0.50x "
      '(not extrapolated)')


def test_some_seeds_censored_are_named():
  result = speedup_at(1, BUDGETS, PLAIN, {0: 0.85, 1: 0.90, 2: 0.84})
  assert result['seeds_interpolated'] == 2
  assert 'seed 1 beyond the budgets run' in result['text']
  assert '(2/3 seeds interpolated' in result['text']
  assert result['verdict'] == 'noise unknown (not every seed interpolates)'


def test_one_seed_has_no_spread():
  result = speedup_at(1, BUDGETS, {0: PLAIN[0]}, {0: 0.85})
  assert result['factor'] == pytest.approx(2.5) and result['factor_std'] is None
  assert result['verdict'] == 'noise unknown (one seed)'
  assert 'per seed 2.50x (1/1 seeds interpolated)' in result['text']


def test_speedups_need_two_budgets():
  assert speedup_lib.speedups((1,), {0: (0.8,)}, {1: {0: 0.82}}) == []
  assert 'needs plain\'s accuracy at two budgets' in speedup_lib.no_speedup_text((1,))
  assert speedup_lib.no_speedup_text((1, 2)) is None
  entries = speedup_lib.speedups(BUDGETS, PLAIN, {1: {0: 0.84}, 2: {0: 0.85}, 3: {}})
  assert [e['tract_budget'] for e in entries] == [1, 2]


def test_no_common_seed():
  with pytest.raises(ValueError, match='no seed has both'):
    speedup_at(1, BUDGETS, PLAIN, {7: 0.8})

"""The epoch saving read off the accuracy-vs-budget curves, as the paper reads it.

"TrAct@k ep matches plain@x ep": the budget ``x`` at which plain's test
accuracy, linearly interpolated between the budgets run, first reaches
TrAct's accuracy at ``k`` epochs; the speedup is ``x / k``. It is computed on
the mean curves and per seed (TrAct and plain of the same seed, which share
initialisation and data order), so the factor comes with its seed spread.
Nothing is extrapolated: when TrAct@k is below plain's smallest budget or
above everything plain reached, the result says so and gives only the bound.

Part of the experiment application (``tract-optax-train``), not of the library.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Dict, List, Mapping, Optional, Sequence

import numpy as np

#: ``Crossing.kind``: plain reaches the target between two budgets run.
INTERPOLATED = 'interpolated'
#: ``Crossing.kind``: the target is below plain's accuracy at its smallest budget.
BELOW = 'below'
#: ``Crossing.kind``: plain never reaches the target within the budgets run.
BEYOND = 'beyond'


@dataclasses.dataclass(frozen=True)
class Crossing:
  """Where a piecewise-linear accuracy curve first reaches a target.

  Attributes:
    kind: :data:`INTERPOLATED`, :data:`BELOW` or :data:`BEYOND`.
    budget: the interpolated budget for :data:`INTERPOLATED`; the smallest
      budget (an upper bound) for :data:`BELOW`; the largest budget (a lower
      bound) for :data:`BEYOND`.
  """

  kind: str
  budget: float


def crossing(budgets: Sequence[float], accuracies: Sequence[float],
             target: float) -> Crossing:
  """First budget at which the curve through ``(budgets, accuracies)`` reaches ``target``.

  Linear interpolation between neighbouring budgets; no extrapolation.

  Args:
    budgets: increasing budgets (at least one).
    accuracies: the curve's value at each budget.
    target: the accuracy to reach.

  Returns:
    A :class:`Crossing`.

  Raises:
    ValueError: empty, unsorted or mismatched inputs.

  Example:
    >>> from tract_experiment.speedup import crossing
    >>> crossing([1, 2, 3], [0.80, 0.84, 0.86], 0.85)
    Crossing(kind='interpolated', budget=2.5)
    >>> crossing([1, 2, 3], [0.80, 0.84, 0.86], 0.90).kind
    'beyond'
  """
  budgets = [float(b) for b in budgets]
  accuracies = [float(a) for a in accuracies]
  if not budgets or len(budgets) != len(accuracies):
    raise ValueError(f'need matching, non-empty budgets and accuracies; got {len(budgets)} '
                     f'budgets and {len(accuracies)} accuracies.')
  if any(b >= c for b, c in zip(budgets, budgets[1:])):
    raise ValueError(f'budgets must increase; got {budgets}.')
  if target < accuracies[0]:
    return Crossing(BELOW, budgets[0])
  if target == accuracies[0]:
    return Crossing(INTERPOLATED, budgets[0])
  for (b0, a0), (b1, a1) in zip(zip(budgets, accuracies), zip(budgets[1:], accuracies[1:])):
    if a0 < target <= a1:
      return Crossing(INTERPOLATED, b0 + (target - a0) / (a1 - a0) * (b1 - b0))
  return Crossing(BEYOND, budgets[-1])


def _describe(crossing_: Crossing, budget: int) -> str:
  """What TrAct at ``budget`` epochs matches on plain's curve, with the factor or bound."""
  factor = crossing_.budget / budget
  if crossing_.kind == INTERPOLATED:
    return f'matches plain@{crossing_.budget:.2f} ep: {factor:.2f}x'
  if crossing_.kind == BELOW:
    return (f'is below plain@{crossing_.budget:g} ep, plain\'s smallest budget: '
            f'< {factor:.2f}x (not extrapolated)')
  return (f'exceeds plain at every budget run (up to {crossing_.budget:g} ep): '
          f'> {factor:.2f}x (not extrapolated)')


def speedup_at(budget: int, budgets: Sequence[int],
               plain_by_seed: Mapping[int, Sequence[float]],
               tract_by_seed: Mapping[int, float], label: str = 'TrAct') -> Dict[str, Any]:
  """The speedup of TrAct at ``budget`` epochs over plain's curve.

  Args:
    budget: TrAct's budget ``k``.
    budgets: plain's budgets, increasing.
    plain_by_seed: per seed, plain's final accuracy at each of ``budgets``.
    tract_by_seed: per seed, TrAct's final accuracy at ``budget``.
    label: the TrAct method's name in the text.

  Returns:
    A JSON-ready dict: ``tract_budget``, ``tract_accuracy`` (mean), the mean
    curves' ``kind``, ``plain_budget`` and ``factor`` (``None`` unless
    interpolated) or ``bound``; ``per_seed`` (seed, kind, plain_budget,
    factor or bound); ``factor_mean``/``factor_std`` over the interpolated
    seeds; ``seeds``/``seeds_interpolated``; ``verdict``; ``text``.

  A speedup is "beyond seed noise" when every seed interpolates and the mean
  factor is more than two standard errors of the per-seed factors away from
  1 (a rough rule, not a test); "within seed noise" otherwise, or "noise
  unknown" with one seed or with seeds that could not be interpolated.

  Example:
    >>> from tract_experiment.speedup import speedup_at
    >>> plain = {0: [0.80, 0.84, 0.86], 1: [0.81, 0.85, 0.87], 2: [0.79, 0.83, 0.85]}
    >>> result = speedup_at(1, [1, 2, 3], plain, {0: 0.84, 1: 0.86, 2: 0.83})
    >>> round(result['factor'], 2), round(result['factor_mean'], 2), result['verdict']
    (2.17, 2.17, 'beyond seed noise')
  """
  seeds = sorted(seed for seed in tract_by_seed if seed in plain_by_seed)
  if not seeds:
    raise ValueError('no seed has both a TrAct run and a plain curve.')
  plain_mean = np.mean([plain_by_seed[s] for s in seeds], axis=0)
  tract_mean = float(np.mean([tract_by_seed[s] for s in seeds]))
  on_means = crossing(budgets, plain_mean, tract_mean)
  per_seed = []
  for seed in seeds:
    seed_crossing = crossing(budgets, plain_by_seed[seed], tract_by_seed[seed])
    ratio = seed_crossing.budget / budget
    per_seed.append(dict(seed=seed, kind=seed_crossing.kind,
                         plain_budget=seed_crossing.budget,
                         factor=ratio if seed_crossing.kind == INTERPOLATED else None,
                         bound=None if seed_crossing.kind == INTERPOLATED else ratio))
  factors = [entry['factor'] for entry in per_seed if entry['factor'] is not None]
  factor_mean = float(np.mean(factors)) if factors else None
  factor_std = float(np.std(factors, ddof=1)) if len(factors) > 1 else None
  censored = len(seeds) - len(factors)
  if censored:
    verdict = 'noise unknown (not every seed interpolates)'
  elif len(seeds) < 2:
    verdict = 'noise unknown (one seed)'
  else:
    error = factor_std / math.sqrt(len(factors))
    verdict = ('beyond seed noise' if abs(factor_mean - 1.0) > 2 * error
               else 'within seed noise')
  text = f'{label}@{budget} ep ({tract_mean:.4f}) {_describe(on_means, budget)}'
  if factors:
    spread = f' +- {factor_std:.2f}' if factor_std is not None else ''
    text += (f'; per seed {factor_mean:.2f}x{spread} ({len(factors)}/{len(seeds)} seeds '
             'interpolated')
    text += ')' if not censored else (
        ', ' + ', '.join(f'seed {e["seed"]} {e["kind"]} the budgets run'
                         for e in per_seed if e['factor'] is None) + ')')
  else:
    text += f'; no seed interpolates (every seed is {_kinds(per_seed)} the budgets run)'
  text += f'; {verdict}.'
  return dict(tract_budget=budget, tract_accuracy=tract_mean, kind=on_means.kind,
              plain_budget=on_means.budget if on_means.kind == INTERPOLATED else None,
              factor=on_means.budget / budget if on_means.kind == INTERPOLATED else None,
              bound=None if on_means.kind == INTERPOLATED else on_means.budget / budget,
              per_seed=per_seed, factor_mean=factor_mean, factor_std=factor_std,
              seeds=len(seeds), seeds_interpolated=len(factors), verdict=verdict, text=text)


def _kinds(per_seed: Sequence[Dict[str, Any]]) -> str:
  return '/'.join(sorted({entry['kind'] for entry in per_seed}))


def speedups(budgets: Sequence[int], plain_by_seed: Mapping[int, Sequence[float]],
             tract_by_budget: Mapping[int, Mapping[int, float]],
             label: str = 'TrAct') -> List[Dict[str, Any]]:
  """:func:`speedup_at` for every TrAct budget; empty with fewer than two plain budgets.

  Args:
    budgets: plain's budgets, increasing.
    plain_by_seed: per seed, plain's accuracy at each budget.
    tract_by_budget: per TrAct budget, per seed, TrAct's accuracy.
    label: the TrAct method's name in the texts.
  """
  if len(budgets) < 2:
    return []
  return [speedup_at(budget, budgets, plain_by_seed, by_seed, label)
          for budget, by_seed in sorted(tract_by_budget.items()) if by_seed]


def no_speedup_text(budgets: Sequence[int]) -> Optional[str]:
  """Why no speedup is read off (fewer than two budgets), or None."""
  if len(budgets) < 2:
    return ('One budget run: the speedup needs plain\'s accuracy at two budgets or more '
            'to interpolate (e.g. --epochs 1,2,3).')
  return None

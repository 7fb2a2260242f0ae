"""An opt-in amortised statistic: refreshed every k steps, optionally averaged.

A first layer's input statistic depends on the data only, never on the
weights, so each batch's statistic is a noisy estimate of one fixed population
moment. In amortised mode :func:`~tract_optax.tract` keeps a moment per layer
in its state, refreshes it every ``refresh_every`` steps (as an exponential
moving average when ``stats_decay > 0``), and preconditions with the kept
moment in between; the capture may skip computing the statistic on steps where
:func:`stats_due` is false. The paper's (and our default) behaviour is the
exact per-batch statistic.
"""

from __future__ import annotations

import math
from typing import Dict, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp

from tract_optax import paths as paths_lib
from tract_optax.stats import TractStats, to_moment

Cache = Dict[str, TractStats]


def cache_key(path: paths_lib.ModulePath) -> str:
  return '/'.join(path)


def init_cache(params, layers: Sequence[paths_lib.ModulePath]) -> Cache:
  """Zero moments sized from each layer's kernel in ``params``.

  Raises:
    KeyError: if a layer has no ``kernel`` in ``params``.
  """
  kernels = paths_lib.kernel_leaf_index(params)
  leaves = jax.tree_util.tree_leaves(params)
  cache = {}
  for path in layers:
    if path not in kernels:
      raise KeyError(
          f'tract(layers=...) names {path!r}, but params have no kernel under '
          'it. ' + paths_lib.kernel_paths_text(kernels))
    kernel = leaves[kernels[path]]
    n = math.prod(kernel.shape[:-1])
    dtype = jnp.promote_types(kernel.dtype, jnp.float32)
    cache[cache_key(path)] = TractStats(
        moment=jnp.zeros((n, n), dtype), rows=None, count=jnp.zeros([], dtype))
  return cache


def refresh_cache(cache: Cache, fresh: Mapping[paths_lib.ModulePath, TractStats],
                  due: jax.Array, first: jax.Array, decay: float) -> Cache:
  """The cache after a step: fresh statistics blended in where ``due``.

  Args:
    cache: the kept statistics by :func:`cache_key`.
    fresh: this step's statistics by module path (missing layers keep theirs).
    due: scalar bool, whether this step refreshes.
    first: scalar bool, whether no refresh has happened yet (take fresh as is).
    decay: weight of the kept moment in the moving average (0: replace).

  Returns:
    The new cache (same structure and dtypes).
  """
  new_cache = dict(cache)
  for path, stats in fresh.items():
    key = cache_key(path)
    if key not in cache:
      continue
    kept = cache[key]
    if stats.groups != 1:
      raise ValueError(
          f'The amortised statistic supports ungrouped layers; {path!r} has '
          f'{stats.groups} feature groups.')
    moment = to_moment(stats).moment.astype(kept.moment.dtype)
    if moment.shape != kept.moment.shape:
      raise ValueError(
          f'The statistic of {path!r} has shape {moment.shape}, but the '
          f'amortised cache holds {kept.moment.shape} (from the kernel).')
    count = jnp.asarray(stats.count, kept.count.dtype)
    blended = jnp.where(first, moment, decay * kept.moment + (1 - decay) * moment)
    new_cache[key] = TractStats(
        moment=jnp.where(due, blended, kept.moment), rows=None,
        count=jnp.where(due, count, kept.count))
  return new_cache


def stats_due(opt_state) -> jax.Array:
  """Whether the next update of a :func:`~tract_optax.tract` refreshes its statistic.

  Finds the TrAct state anywhere inside an optimizer state (e.g. of an
  ``optax.chain``). Use it to skip computing the statistic on other steps.

  Args:
    opt_state: the optimizer state holding exactly one ``TractState``.

  Returns:
    A scalar bool array (always True without amortisation).

  Raises:
    ValueError: if ``opt_state`` holds no TrAct state, or several.

  Example:
    >>> import optax
    >>> tx = optax.chain(tract_optax.tract(0.1), optax.sgd(0.1))
    >>> bool(tract_optax.stats_due(tx.init({'w': jnp.zeros(2)})))
    True
  """
  from tract_optax.transform import TractState  # pylint: disable=g-import-not-at-top
  found = [s for s in jax.tree_util.tree_leaves(
      opt_state, is_leaf=lambda s: isinstance(s, TractState))
           if isinstance(s, TractState)]
  if len(found) != 1:
    raise ValueError(
        f'stats_due needs an optimizer state with exactly one TrAct state; '
        f'found {len(found)}.')
  state = found[0]
  return state.count % state.refresh_every == 0

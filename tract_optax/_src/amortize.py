"""An opt-in amortised statistic: refreshed every k steps, optionally averaged.

A first layer's input statistic depends on the data only, never on the
weights, so each batch's statistic is a noisy estimate of one fixed population
moment. In amortised mode :func:`~tract_optax.tract` keeps a moment per layer
in its state, refreshes it when a refresh is due (every ``refresh_every``
steps, as an exponential moving average when ``stats_decay > 0``), and
preconditions with the kept moment in between; the capture may skip computing
the statistic on steps where :func:`~tract_optax.stats_due` is false. The
paper's (and our default) behaviour is the exact per-batch statistic.

This module holds the cache arithmetic; the state and the schedule of
refreshes live in :mod:`tract_optax.transform`.
"""

from __future__ import annotations

import math
from typing import Dict, Mapping, Sequence

import jax
import jax.numpy as jnp

from tract_optax._src import paths as paths_lib
from tract_optax._src.stats import TractStats, to_moment

Cache = Dict[str, TractStats]


def cache_key(path: paths_lib.ModulePath) -> str:
  return '/'.join(path)


def init_cache(params, layers: Sequence[paths_lib.ModulePath]) -> Cache:
  """Zero moments (count 0: never refreshed) sized from each layer's kernel.

  Raises:
    KeyError: if a layer has no ``kernel`` in ``params``.
  """
  kernels = paths_lib.kernel_leaf_index(params)
  leaves = jax.tree_util.tree_leaves(params)
  cache = {}
  for path in layers:
    kernel = leaves[paths_lib.require_kernel(kernels, path, 'tract(layers=...)', 'params')]
    n = math.prod(kernel.shape[:-1])
    dtype = jnp.promote_types(kernel.dtype, jnp.float32)
    cache[cache_key(path)] = TractStats(
      moment=jnp.zeros((n, n), dtype), rows=None, count=jnp.zeros([], dtype)
    )
  return cache


def refresh_cache(
  cache: Cache, fresh: Mapping[paths_lib.ModulePath, TractStats], due: jax.Array, decay: float
) -> Cache:
  """The cache with ``fresh`` statistics blended in where ``due``.

  Every kept layer must have a fresh statistic (the caller checks); a layer
  never refreshed before (count 0) takes its fresh statistic as is.

  Args:
    cache: the kept statistics by :func:`cache_key`.
    fresh: this step's statistics by module path, one per kept layer.
    due: scalar bool, whether this step refreshes.
    decay: weight of the kept moment in the moving average (0: replace).

  Returns:
    The new cache (same structure and dtypes).

  Raises:
    ValueError: for a grouped statistic, or one that does not fit the cache.
  """
  new_cache = dict(cache)
  for path, stats in fresh.items():
    key = cache_key(path)
    kept = cache[key]
    if stats.groups != 1:
      raise ValueError(
        f'The amortised statistic (refresh_every/stats_decay) supports '
        f'ungrouped layers; {path!r} has {stats.groups} feature groups. Use '
        'the per-batch statistic (the default) for a grouped or depthwise '
        'first layer.'
      )
    moment = to_moment(stats).moment.astype(kept.moment.dtype)
    if moment.shape != kept.moment.shape:
      raise ValueError(
        f'The statistic of {path!r} has shape {moment.shape}, but the '
        f'amortised cache holds {kept.moment.shape} (from the kernel).'
      )
    count = jnp.asarray(stats.count, kept.count.dtype)
    first = kept.count == 0
    blended = jnp.where(first, moment, decay * kept.moment + (1 - decay) * moment)
    new_cache[key] = TractStats(
      moment=jnp.where(due, blended, kept.moment),
      rows=None,
      count=jnp.where(due, count, kept.count),
    )
  return new_cache


def is_filled(stats: TractStats) -> jax.Array:
  """Whether a kept statistic has been refreshed at least once."""
  return stats.count > 0

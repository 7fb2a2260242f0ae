"""An opt-in amortised statistic: refreshed every k steps, optionally averaged.

A first layer's input statistic depends on the data only, never on the
weights, so each batch's statistic is a noisy estimate of one fixed population
moment. In amortised mode ``tract`` keeps a moment per layer
in its state, refreshes it when a refresh is due (every ``refresh_every``
steps, as an exponential moving average when ``stats_decay > 0``), and
preconditions with the kept moment in between; the capture may skip computing
the statistic on steps where ``stats_due`` is false. The
paper's (and our default) behaviour is the exact per-batch statistic.

This module holds the cache arithmetic; the state and the schedule of
refreshes live in ``tract_optax._src.tract_state`` (the period in
``tract``'s closure, the last refresh in its state). The kept moment is ``n x n``
whatever the batch, so layers with more than ``MAX_AMORTIZED_FEATURES``
input features are refused (the per-batch statistic serves them).
"""

from __future__ import annotations

import math
from typing import Dict, Mapping, Sequence, cast

import jax
import jax.numpy as jnp
import optax
from jax.typing import DTypeLike

from tract_optax._src import docs_link
from tract_optax._src import paths as paths_lib
from tract_optax._src.stats import TractStats, to_moment

Cache = Dict[str, TractStats]

#: Largest input size ``n`` of a layer whose ``n x n`` moment the amortised
#: mode keeps: 8192 features, a 256 MiB float32 moment in the optimizer state
#: (an update needs a few times that for the solve). A Dense layer on
#: flattened 128x128x3 images (n = 49,152) would keep 9 GiB; such layers use
#: the per-batch statistic, whose Woodbury form needs only the batch's rows.
MAX_AMORTIZED_FEATURES = 8192


def _gib(num_bytes: float) -> str:
  return f'{num_bytes / 2**30:.3g} GiB' if num_bytes >= 2**30 else f'{num_bytes / 2**20:.3g} MiB'


def _check_size(path: paths_lib.ModulePath, n: int, dtype: DTypeLike) -> None:
  if n <= MAX_AMORTIZED_FEATURES:
    return
  itemsize = jnp.dtype(dtype).itemsize
  raise ValueError(
    f'{paths_lib.format_path(path)!r} has n = {n} input features, so its moment alone would '
    f'take {_gib(n * n * itemsize)} ({jnp.dtype(dtype).name}); the amortised statistic is '
    f'limited to n <= {MAX_AMORTIZED_FEATURES} ({_gib(MAX_AMORTIZED_FEATURES**2 * itemsize)}). '
    'Leave refresh_every and stats_decay out: the per-batch statistic serves it.'
    + docs_link.see('limits', "The amortised statistic's size")
  )


def cache_key(path: paths_lib.ModulePath) -> str:
  return '/'.join(path)


def init_cache(params: optax.Params, layers: Sequence[paths_lib.ModulePath]) -> Cache:
  """Zero moments (count 0: never refreshed) sized from each layer's kernel.

  Raises:
    ModulePathError: (a ``KeyError``) if a layer has no ``kernel`` in ``params``.
    ValueError: if a layer's input size ``n`` exceeds
      ``MAX_AMORTIZED_FEATURES`` (its moment would not fit sensibly).
  """
  kernels = paths_lib.kernel_leaf_index(params)
  leaves = jax.tree_util.tree_leaves(params)
  cache = {}
  for path in layers:
    kernel = leaves[paths_lib.require_kernel(kernels, path, 'tract(layers=...)', 'params')]
    n = math.prod(kernel.shape[:-1])
    dtype = jnp.promote_types(kernel.dtype, jnp.float32)
    _check_size(path, n, dtype)
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
    cache: the kept statistics by ``cache_key``.
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
        f'The amortised statistic (refresh_every/stats_decay) supports ungrouped layers; '
        f'{path!r} has {stats.groups} feature groups. Leave refresh_every and stats_decay '
        'out for a grouped or depthwise first layer.'
      )
    kept_moment = cast(jax.Array, kept.moment)  # the cache holds moments only
    moment = cast(jax.Array, to_moment(stats).moment).astype(kept_moment.dtype)
    if moment.shape != kept_moment.shape:
      raise ValueError(
        f'The statistic of {path!r} has shape {moment.shape}, but the '
        f'amortised cache holds {kept_moment.shape} (from the kernel).'
      )
    count = jnp.asarray(stats.count, kept.count.dtype)
    first = kept.count == 0
    blended = jnp.where(first, moment, decay * kept_moment + (1 - decay) * moment)
    new_cache[key] = TractStats(
      moment=jnp.where(due, blended, kept_moment),
      rows=None,
      count=jnp.where(due, count, kept.count),
    )
  return new_cache


def is_filled(stats: TractStats) -> jax.Array:
  """Whether a kept statistic has been refreshed at least once."""
  return stats.count > 0

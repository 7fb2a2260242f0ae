"""One statistic per step: the guard that refuses a statistic split by ``jax.vmap``.

TrAct's statistic is that of every row the layer saw in the step. Under
``jax.vmap`` a statistic computed inside the mapped function differs from lane
to lane (each example's own), and preconditioning each lane with it, then
summing, is not TrAct's update (8.8x to 71x off in trials). Both routes pass
the statistic through ``lane_guard``, whose batching rule sees which inputs
``vmap`` batched, so one rule serves ``tract_kernel``, the layer ops and
``tract``'s update alike.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Optional, Tuple

import jax

from tract_optax._src import docs_link
from tract_optax._src.stats import TractStats


def _batched_statistic_message(name: Optional[str], owner: str = 'tract_kernel') -> str:
  where = f' for {name!r}' if name else ''
  return (
    f'{owner}{where} runs inside jax.vmap with a statistic that differs from lane to lane '
    "(each example's own). Compute the statistic of the whole batch outside the vmap "
    '(Equinox: tract_optax.equinox.apply_tract(layer, x) on the batch, or TractLayer), or '
    "name the vmap's axis and pass axis_name='batch'; per_lane_stats=True is for "
    'independent models.' + docs_link.see('routes', 'One statistic per step')
  )


_SHARED_KERNEL_MESSAGE = (
  '{owner}{where}: per_lane_stats=True with a kernel shared by the lanes (jax.grad of a '
  "jax.vmap): the summed gradient would mix every lane's statistic with every "
  "lane's gradient. Give each lane its own kernel (jax.vmap over stacked kernels), or "
  'drop per_lane_stats.'
)


@functools.cache
def lane_guard(
  name: Optional[str], per_lane_stats: bool, owner: str = 'tract_kernel'
) -> Callable[[jax.Array, TractStats], TractStats]:
  """Identity on ``stats`` whose batching rule refuses a statistic split by a vmap.

  ``jax.vmap`` over a function that wraps a kernel would otherwise give every
  lane its own statistic silently. The rule sees which inputs are batched: a
  batched statistic is refused, unless ``per_lane_stats`` and the kernel is
  batched too (each lane its own model: ``vmap(grad)`` over stacked kernels).
  A batched statistic with an unbatched kernel (``grad`` of a ``vmap``) sums
  ``P_j G_i`` over all lane pairs, so it is refused even with
  ``per_lane_stats``. An unbatched statistic (an ensemble on shared data)
  passes. ``kernel`` (or, on the Optax route, the kernel's gradient) only tells
  the rule its batching. Cached by its arguments (a few per program): the
  function it returns holds no state.

  Example:
    >>> import jax.numpy as jnp, tract_optax
    >>> guard = lane_guard('stem', False)
    >>> int(guard(jnp.ones((2, 3)), tract_optax.dense_stats(jnp.ones((4, 2)))).count)
    4
    >>> per_example = lambda x: guard(jnp.ones((2, 3)), tract_optax.dense_stats(x[None]))
    >>> try:
    ...   jax.vmap(per_example)(jnp.ones((4, 2)))
    ... except ValueError as refused:
    ...   print(str(refused).split(' (')[0])
    tract_kernel for 'stem' runs inside jax.vmap with a statistic that differs from lane to lane
  """

  @jax.custom_batching.custom_vmap
  def guard(kernel: jax.Array, stats: TractStats) -> TractStats:
    del kernel
    return stats

  @guard.def_vmap
  def rule(
    axis_size: int,
    in_batched: Tuple[bool, Any],  # per argument: batched? (for stats, a tree of bools)
    kernel: jax.Array,
    stats: TractStats,
  ) -> Tuple[TractStats, Any]:
    del axis_size, kernel
    if any(jax.tree_util.tree_leaves(in_batched[1])):
      if not per_lane_stats:
        raise ValueError(_batched_statistic_message(name, owner))
      if not any(jax.tree_util.tree_leaves(in_batched[0])):
        where = f' for {name!r}' if name else ''
        raise ValueError(
          _SHARED_KERNEL_MESSAGE.format(owner=owner, where=where)
          + docs_link.see('routes', 'One statistic per step')
        )
    return stats, in_batched[1]

  return guard

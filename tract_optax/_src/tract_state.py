"""``TractState``: what ``tract`` keeps from step to step.

The configuration (``refresh_every``, ``stats_decay``, ``layers``) lives in
``tract``'s closure, so a restored checkpoint follows today's settings. The
state holds the step count and, in the amortised mode, the kept statistics and
when they were last refreshed. This module holds the state and its schedule of
refreshes; the cache arithmetic is in ``tract_optax._src.amortize``.
"""

from __future__ import annotations

from typing import Dict, Mapping, NamedTuple, Sequence, Tuple

import jax
import jax.numpy as jnp
import optax

from tract_optax._src import amortize
from tract_optax._src import paths as paths_lib
from tract_optax._src.stats import TractStats

_safe_increment = getattr(optax, 'safe_increment', None) or optax.safe_int32_increment

StatsByPath = Dict[paths_lib.ModulePath, TractStats]


class TractState(NamedTuple):
  """State of ``tract``: only what changes from step to step.

  The configuration (``refresh_every``, ``stats_decay``, ``layers``) lives in
  ``tract``'s closure, so a restored checkpoint follows today's settings.

  Attributes:
    count: number of updates so far (drives a lambda schedule).
    refreshes: number of refreshes of the kept statistics so far (amortised
      mode; 0 in the per-batch mode).
    last_refresh: ``count`` at the last refresh (amortised mode).
    due: whether the next update refreshes the kept statistic, as the last
      update computed it from its ``refresh_every`` (always True in the
      per-batch mode); read by ``stats_due``.
    stats_cache: amortised mode's kept statistic per layer ('a/b' keys);
      empty in the default per-batch mode.
  """

  count: jax.Array  # type: ignore[assignment]  # shadows tuple.count; public field
  refreshes: jax.Array
  last_refresh: jax.Array
  due: jax.Array
  stats_cache: amortize.Cache


def initial(stats_cache: amortize.Cache) -> TractState:
  """The state before the first update: nothing counted, a refresh due."""
  return TractState(
    count=jnp.zeros([], jnp.int32),
    refreshes=jnp.zeros([], jnp.int32),
    last_refresh=jnp.zeros([], jnp.int32),
    due=jnp.ones([], bool),
    stats_cache=stats_cache,
  )


def refresh_due(state: TractState, refresh_every: int) -> jax.Array:
  """Whether the update at ``state.count`` refreshes: never refreshed, or a period is over."""
  return (state.refreshes == 0) | (state.count - state.last_refresh >= refresh_every)


def use_kept_stats(
  state: TractState,
  fresh: Mapping[paths_lib.ModulePath, TractStats],
  layers: Sequence[paths_lib.ModulePath],
  refresh_every: int,
  decay: float,
) -> Tuple[StatsByPath, Dict[paths_lib.ModulePath, jax.Array], TractState]:
  """Amortised mode: refreshes the kept statistics when due; they replace ``fresh``.

  A refresh needs every kept layer's fresh statistic; a step without them
  reuses the kept ones. The closure's ``refresh_every`` decides, not the
  state's ``due`` (which the last update wrote).

  Args:
    state: the state before this update.
    fresh: this step's statistics by module path (possibly none).
    layers: the layers whose statistic the state keeps.
    refresh_every: the refresh period.
    decay: weight of the kept moment in the moving average (0: replace).

  Returns:
    The statistics to solve with (``fresh`` with the kept ones in place),
    whether each kept one was ever refreshed (never: there is no statistic,
    and the TrAct gradient is NaN), and the state with the refreshed cache.
  """
  if all(path in fresh for path in layers):
    due = refresh_due(state, refresh_every)
    state = state._replace(
      stats_cache=amortize.refresh_cache(state.stats_cache, fresh, due, decay),
      refreshes=state.refreshes + due.astype(state.refreshes.dtype),
      last_refresh=jnp.where(due, state.count, state.last_refresh),
    )
  kept = {path: state.stats_cache[amortize.cache_key(path)] for path in layers}
  filled = {path: amortize.is_filled(stats) for path, stats in kept.items()}
  return {**fresh, **kept}, filled, state


def advance(state: TractState, refresh_every: int, amortized: bool) -> TractState:
  """The state after an update: one more step, and whether the next one refreshes."""
  state = state._replace(count=_safe_increment(state.count))
  return state._replace(due=refresh_due(state, refresh_every)) if amortized else state

"""``tract``: the TrAct gradient transformation for Optax.

Placed first in an ``optax.chain``, it replaces the gradient of each named first
layer's ``kernel`` by its TrAct gradient and hands everything on unchanged, so
any optimizer after it sees the TrAct gradient as if it were the gradient.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Callable, Hashable, Mapping, NamedTuple, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax

from tract_optax import amortize
from tract_optax import paths as paths_lib
from tract_optax.precondition import precondition
from tract_optax.stats import TractStats, all_reduce_stats

ScalarOrSchedule = Union[float, jax.Array, Callable[[jax.Array], jax.Array]]
AxisName = Union[Hashable, Sequence[Hashable], None]

_MISSING_STATS = (
    'tract(...).update needs the keyword argument tract_stats: a mapping from '
    "each first layer's module path to its input statistic, e.g. "
    "tx.update(grads, opt_state, params, tract_stats={('stem',): "
    'tract_optax.conv_stats(x, (3, 3), padding="SAME")}). With Flax, '
    'tract_optax.linen.apply_with_stats(...) returns this mapping; inside '
    'optax.chain the keyword reaches tract automatically.')


_safe_increment = getattr(optax, 'safe_increment', None) or optax.safe_int32_increment


class TractState(NamedTuple):
  """State of :func:`tract`.

  Attributes:
    count: number of updates so far (drives a lambda schedule).
    refresh_every: amortised mode's refresh period (1: per-batch statistic).
    refreshes: number of refreshes of the kept statistics so far.
    stats_cache: amortised mode's kept statistic per layer ('a/b' keys);
      empty in the default per-batch mode.
  """

  count: jax.Array
  refresh_every: jax.Array
  refreshes: jax.Array
  stats_cache: dict


def validate_lam(lam: Any, name: str = 'lam') -> None:
  """Raises ``ValueError`` unless ``lam`` is a schedule or a finite number > 0.

  Traced values (inside ``jit`` or ``inject_hyperparams``) cannot be checked
  and pass.

  Example:
    >>> validate_lam(0.1)
    >>> validate_lam(0.0)
    Traceback (most recent call last):
    ...
    ValueError: lam must be a finite number > 0 (the ridge strength lambda, default 0.1); got 0.0.
  """
  if callable(lam):
    return
  if isinstance(lam, jax.core.Tracer):
    return
  message = (f'{name} must be a finite number > 0 (the ridge strength lambda, '
             f'default 0.1); got {lam!r}.')
  if isinstance(lam, (bool, np.bool_)) or isinstance(lam, (str, bytes)):
    raise ValueError(message)
  try:
    array = np.asarray(lam)
  except Exception:  # pylint: disable=broad-except
    raise ValueError(message) from None
  # jnp.issubdtype also knows bfloat16 (inject_hyperparams stores lam in the
  # params dtype), which np.issubdtype does not count as a number.
  if array.ndim != 0 or not jnp.issubdtype(array.dtype, jnp.number):
    raise ValueError(message)
  value = float(array)
  if not math.isfinite(value) or value <= 0:
    raise ValueError(message)


def _normalize_stats(tract_stats) -> dict:
  if tract_stats is None:
    raise TypeError(_MISSING_STATS)
  if not isinstance(tract_stats, Mapping):
    raise TypeError(
        'tract_stats must be a mapping {module path: TractStats}; got '
        f'{type(tract_stats).__name__}. ' + _MISSING_STATS)
  normalized = {}
  for path, stats in tract_stats.items():
    module = paths_lib.normalize_path(path)
    if not isinstance(stats, TractStats):
      raise TypeError(
          f'tract_stats[{path!r}] must be a tract_optax.TractStats (from '
          f'dense_stats, conv_stats or the Flax capture); got {type(stats).__name__}.')
    normalized[module] = stats
  return normalized


_INJECT_HINT = (' With optax.inject_hyperparams, pass static_args=('
                "'refresh_every', 'stats_decay') so that they stay Python numbers.")


def _validate_amortization(layers, refresh_every, stats_decay):
  if isinstance(refresh_every, bool) or not isinstance(refresh_every, int) or refresh_every < 1:
    raise ValueError(f'refresh_every must be an int >= 1; got {refresh_every!r}.'
                     + _INJECT_HINT)
  if not (isinstance(stats_decay, (int, float)) and 0 <= stats_decay < 1):
    raise ValueError(f'stats_decay must be a number in [0, 1); got {stats_decay!r}.'
                     + _INJECT_HINT)
  amortized = refresh_every > 1 or stats_decay > 0
  if amortized and not layers:
    raise ValueError(
        'The amortised statistic (refresh_every > 1 or stats_decay > 0) keeps a '
        'moment per layer in the optimizer state, so tract needs the layers at '
        "construction: tract(..., layers=[('stem',)]).")
  return tuple(paths_lib.normalize_path(p) for p in (layers or ()))


def tract(lam: ScalarOrSchedule = 0.1, *, axis_name: AxisName = None,
          layers: Optional[Sequence[paths_lib.PathLike]] = None,
          refresh_every: Optional[int] = None,
          stats_decay: Optional[float] = None,
          ) -> optax.GradientTransformationExtraArgs:
  """TrAct: first-layer kernel gradients preconditioned by their input statistic.

  For every entry ``path -> stats`` of ``tract_stats``, the gradient ``G`` of the
  ``kernel`` leaf under ``path`` becomes ``(A^T A / N + lam I)^{-1} G``; all
  other leaves, biases included, pass through unchanged. Put it first in an
  ``optax.chain``: the chain forwards ``tract_stats`` to it.

  Args:
    lam: ridge strength lambda > 0 (0.1 is the paper's default; its scale
      assumes standardised inputs), or a schedule ``step -> lambda``.
    axis_name: the ``pmap``/``shard_map`` axis (or axes) over which the batch
      is split; statistics are then averaged to the global-batch statistic
      before the solve. Not needed under ``jit`` with a sharded batch, where
      the statistic is already global.
    layers: module paths whose statistic is kept in the state (amortised mode
      only; the default per-batch mode takes whatever ``tract_stats`` names).
    refresh_every: opt-in amortisation: refresh the kept statistic every k
      updates and reuse it in between (:func:`~tract_optax.stats_due` tells
      the capture when to compute it). None or 1 (default) uses each batch's
      own statistic, as the paper does.
    stats_decay: opt-in: keep a moving average of refreshed statistics with
      this decay (None or 0, the default, replaces the kept statistic at each
      refresh).

  Returns:
    An ``optax.GradientTransformationExtraArgs``; its ``update(updates, state,
    params=None, *, tract_stats, **extra_args)`` needs ``tract_stats``.

  Raises:
    ValueError: if ``lam`` is not a finite number > 0 (or a schedule).

  Example:
    >>> import jax, jax.numpy as jnp, optax
    >>> params = {'stem': {'kernel': jnp.ones((4, 2)), 'bias': jnp.zeros(2)}}
    >>> tx = optax.chain(tract_optax.tract(lam=0.1), optax.sgd(0.1))
    >>> state = tx.init(params)
    >>> x = jax.random.normal(jax.random.key(0), (32, 4))
    >>> grads = jax.tree.map(jnp.ones_like, params)
    >>> stats = {('stem',): tract_optax.dense_stats(x)}
    >>> updates, state = tx.update(grads, state, params, tract_stats=stats)
    >>> updates['stem']['bias'].tolist()  # the bias gradient is unchanged
    [-0.10000000149011612, -0.10000000149011612]
  """
  validate_lam(lam)
  # None defaults, not 1 and 0.0: optax.inject_hyperparams(tract)(lam=...)
  # turns every numeric argument into an array hyperparameter, but leaves None
  # alone, so these structural settings stay static unless given.
  refresh_every = 1 if refresh_every is None else refresh_every
  stats_decay = 0.0 if stats_decay is None else stats_decay
  cached_layers = _validate_amortization(layers, refresh_every, stats_decay)

  def init_fn(params):
    cache = amortize.init_cache(params, cached_layers) if cached_layers else {}
    return TractState(count=jnp.zeros([], jnp.int32),
                      refresh_every=jnp.asarray(refresh_every, jnp.int32),
                      refreshes=jnp.zeros([], jnp.int32), stats_cache=cache)

  def update_fn(updates, state, params=None, *, tract_stats=None, **extra_args):
    del params, extra_args
    stats_by_path = _normalize_stats(tract_stats)
    lam_value = lam(state.count) if callable(lam) else lam
    leaves, treedef = jax.tree_util.tree_flatten(updates)
    kernel_index = paths_lib.kernel_leaf_index(updates)
    if axis_name is not None:
      stats_by_path = {path: all_reduce_stats(stats, axis_name)
                       for path, stats in stats_by_path.items()}
    cache, refreshes = state.stats_cache, state.refreshes
    if cached_layers:
      due = state.count % refresh_every == 0
      cache = amortize.refresh_cache(cache, stats_by_path, due,
                                     state.refreshes == 0, stats_decay)
      refreshes = refreshes + due.astype(refreshes.dtype)
      for path in cached_layers:
        stats_by_path[path] = cache[amortize.cache_key(path)]
    for module, stats in stats_by_path.items():
      if module not in kernel_index:
        raise KeyError(
            f'tract_stats names the module path {module!r} '
            f'({paths_lib.format_path(module)!r}), but the updates have no '
            f"'kernel' under it. " + paths_lib.kernel_paths_text(kernel_index))
      position = kernel_index[module]
      leaves[position] = precondition(leaves[position], stats, lam_value)
    new_state = TractState(count=_safe_increment(state.count),
                           refresh_every=state.refresh_every,
                           refreshes=refreshes, stats_cache=cache)
    return jax.tree_util.tree_unflatten(treedef, leaves), new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
